"""What other processes may do to a session: malformed frames on the sockets its actors and
workers listen on, another user trying to reach or squat them, sockets that can't be reached.

The session must survive all of it: the process that got the bad input lives on, nothing runs
what another user sent, and nothing spins.
"""

import os
import pickle
import signal
import socket
import struct

import pytest

import shmray
from shmray import _direct

from conftest import alive, runtime, wait_for

MALFORMED = [
    [5],                          # not a tuple
    [()],                         # no opcode
    [(35, b"x" * 24)],            # a CALL cut short
    [(32,)],                      # EXIT: only the scheduler may say that
    [(31, b"y" * 24)],            # an EXECUTE cut short
    [("x", b"z" * 24)],           # an opcode that isn't one
    [(35, b"short", "m", "m", b"", (), 1, {})],  # a task id of the wrong size
    {"a": 1},                     # a frame that isn't a list of messages
]


def _send_frame(path: str, payload) -> socket.socket:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(path)
    data = pickle.dumps(payload)
    probe.sendall(struct.pack("<I", len(data)) + data)
    return probe


def _closed_by_peer(probe: socket.socket) -> bool:
    probe.settimeout(10)
    try:
        return probe.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def ray2():
    with shmray.init(num_cpus=2, object_store_memory=100 << 20):
        yield shmray


def started():
    """A session for a test that reads what its processes print with capfd: started in the
    test itself, since during fixture set-up pytest's own capture holds the descriptors the
    session's processes inherit."""
    return shmray.init(num_cpus=2, object_store_memory=100 << 20)


@pytest.mark.parametrize("kind", ["sync", "async", "threaded"])
def test_a_malformed_frame_closes_the_connection_not_the_actor(capfd, kind):
    """A well-formed pickle of the wrong shape made a sync actor exit with code 1 (its
    callers got ActorDiedError)."""
    with started() as _:
        _malformed_frames_to_an_actor(shmray, kind, capfd)


def _malformed_frames_to_an_actor(ray2, kind, capfd):
    if kind == "async":
        @ray2.remote
        class Target:
            async def pid(self):
                return os.getpid()
    else:
        @ray2.remote(max_concurrency=4 if kind == "threaded" else 1)
        class Target:
            def pid(self):
                return os.getpid()

    actor = Target.remote()
    pid = ray2.get(actor.pid.remote(), timeout=60)
    path = _direct.address(runtime().socket_dir, actor._actor_id)
    for payload in MALFORMED:
        probe = _send_frame(path, payload)
        assert _closed_by_peer(probe), payload
        probe.close()
        assert ray2.get(actor.pid.remote(), timeout=60) == pid, payload
    seen = []
    wait_for(lambda: seen.append(capfd.readouterr().err) or "malformed message" in "".join(seen))


def test_a_malformed_frame_closes_the_connection_not_the_worker(ray2):
    """Workers died on three of the malformed frames (one of them a foreign EXIT)."""
    @ray2.remote
    def pid():
        return os.getpid()

    ray2.get([pid.remote() for _ in range(20)], timeout=60)
    workers = set(runtime().query("workers"))
    for payload in MALFORMED:
        for worker in workers:
            path = _direct.worker_address(runtime().socket_dir, worker)
            probe = _send_frame(path, payload)
            assert _closed_by_peer(probe), payload
            probe.close()
        assert all(alive(worker) for worker in workers), payload
    assert len(ray2.get([pid.remote() for _ in range(20)], timeout=60)) == 20
    assert set(runtime().query("workers")) == workers


def _as_another_user(action) -> int:
    """Run action() in a child that has become uid/gid 65534; its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = action()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")


@needs_root
def test_another_user_can_neither_reach_nor_squat_the_sessions_sockets(ray2):
    """Worker socket names were predictable (abstract names, sequential pids): another uid
    that bound the next replacement worker's name made every task wait forever while the
    driver and scheduler spun, retrying the connection."""
    @ray2.remote
    def pid():
        return os.getpid()

    @ray2.remote
    class Echo:
        def echo(self, x):
            return x

    echo = Echo.remote()
    assert ray2.get(echo.echo.remote(1), timeout=60) == 1
    workers = set(ray2.get([pid.remote() for _ in range(20)], timeout=60))
    folder = runtime().socket_dir
    existing = [os.path.join(folder, name) for name in os.listdir(folder)]
    future = [_direct.worker_address(folder, p)
              for p in range(max(workers) + 1, max(workers) + 200)]

    def refused(paths, attempt) -> int:
        count = 0
        for path in paths:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                attempt(sock, path)
            except PermissionError:
                count += 1
            finally:
                sock.close()
        return count

    def intrude() -> int:
        connects = refused(existing, socket.socket.connect)  # to what listens
        binds = refused(future, socket.socket.bind)  # the names of workers not forked yet
        return 0 if connects + binds == len(existing) + len(future) else 3

    assert _as_another_user(intrude) == 0
    for worker in workers:  # replacements are forked, and must be reachable
        os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not set(runtime().query("workers")) & workers)
    assert ray2.get([pid.remote() for _ in range(50)], timeout=60)
    assert ray2.get(echo.echo.remote(2), timeout=60) == 2


def test_workers_the_driver_cannot_reach_are_replaced_then_not_asked_for(capfd, monkeypatch):
    """A lease that can't be connected to was given back and granted again at once, in a
    loop (150k connection attempts in 8 s, ~90% of both cores)."""
    with started() as _:
        _unreachable_leases(shmray, monkeypatch, capfd)


def _unreachable_leases(ray2, monkeypatch, capfd):
    @ray2.remote
    def pid():
        return os.getpid()

    reachable = _direct.connect
    attempts = []

    def unreachable_workers(path):
        if os.path.basename(path).startswith("w"):
            attempts.append(path)
            return None
        return reachable(path)

    monkeypatch.setattr(_direct, "connect", unreachable_workers)
    assert len(ray2.get([pid.remote() for _ in range(200)], timeout=60)) == 200
    assert len(attempts) == 3  # then the driver stops leasing
    assert not runtime().leases.enabled
    assert "could not be reached" in capfd.readouterr().err
    unreachable = {int(os.path.basename(path)[1:]) for path in attempts}
    wait_for(lambda: not any(alive(p) for p in unreachable))  # killed, and replaced:
    wait_for(lambda: len(set(runtime().query("workers")) - unreachable) == 2)


def test_sockets_live_in_a_private_folder_even_under_a_deep_temp_dir(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    shmray.init(num_cpus=1, object_store_memory=100 << 20, _temp_dir=str(deep))
    try:
        folder = runtime().socket_dir
        assert len(_direct.address(folder, b"\xff" * 28)) <= 107
        assert os.stat(folder).st_mode & 0o777 == 0o700

        @shmray.remote
        class Echo:
            def echo(self, x):
                return x

        echo = Echo.remote()
        assert [shmray.get(echo.echo.remote(i), timeout=60) for i in range(3)] == [0, 1, 2]
        assert runtime().channels.calls_sent >= 2
    finally:
        shmray.shutdown()
    assert not os.path.exists(folder)
