"""The inspect socket: another process of the user (the ``shmray`` command line) finds the
running sessions and asks their schedulers questions; nothing any other process sends or
does there may harm a session, and nothing of another user is ever reached or answered.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import psutil
import pytest

import shmray
from shmray import _inspect_client as client
from shmray._inspect_client import (
    NoSessionError,
    RequestError,
    SessionEndedError,
    SessionTimeoutError,
    SeveralSessionsError,
)

from conftest import alive, runtime, socket_inodes, wait_for

PING = {"what": "ping"}
PONG = {"pong": True}

# A driver of its own: starts a session, says where, and runs until killed or stdin closes.
DRIVER = """
import sys
import shmray
shmray.init(num_cpus=1, object_store_memory=100 << 20)
shmray._context.runtime.query("ping")  # the scheduler's loop runs: its card is written
print(shmray._context.runtime.session_dir, flush=True)
sys.stdin.read()
"""

# The client from another process: what a command line in another terminal does.
ASK = """
import json, sys
from shmray import _inspect_client as client
try:
    print(json.dumps(client.fetch(json.loads(sys.argv[1]), session=sys.argv[2] or None)))
except client.InspectError as exc:
    print(type(exc).__name__ + ": " + str(exc))
"""


def start():
    """A session of one CPU, whose card is written (the test shuts it down)."""
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    runtime().query("ping")
    return client.read_card(runtime().session_dir)


@pytest.fixture
def session():
    card = start()
    try:
        yield card
    finally:
        shmray.shutdown()


@shmray.remote
def add(a, b):
    return a + b


def ask_from_another_process(request, session=None) -> str:
    done = subprocess.run([sys.executable, "-c", ASK, json.dumps(request), session or ""],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class OtherDriver:
    """A session started by a driver in another process; ``kill()`` SIGKILLs that driver
    and waits until its session's processes are gone."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.session_dir = self.proc.stdout.readline().strip()
        assert self.session_dir, "the other driver did not start its session"
        self.card = client.read_card(self.session_dir)
        self.family = psutil.Process(self.proc.pid).children(recursive=True)

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self.proc.stdin.close()

        def its_processes_are_gone():
            return not any(alive(p.pid) for p in self.family)

        wait_for(its_processes_are_gone, timeout=30)
        wait_for(lambda: not os.path.exists(self.session_dir), timeout=30)


def connect(card) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(card["socket"])
    return sock


def read_lines(sock: socket.socket, count: int) -> list:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed after {len(data.splitlines())} of {count} answers"
        data += chunk
    return [json.loads(line) for line in data.split(b"\n")[:count]]


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end hung up (what it sent before is read and dropped)."""
    sock.settimeout(30)
    try:
        while True:
            if not sock.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True


def still_works(card):
    assert shmray.get(add.remote(1, 2), timeout=60) == 3
    assert client.fetch(PING, session=card["session_dir"]) == PONG
    assert alive(card["scheduler_pid"])


# -- finding and asking ----------------------------------------------------------------------

def test_a_session_is_found_and_answers_here_and_from_another_process(session):
    assert [card["session_dir"] for card in client.list_sessions()] == [session["session_dir"]]
    assert session["driver_pid"] == os.getpid()
    assert session["scheduler_pid"] == shmray._session._scheduler_pid
    assert client.fetch(PING) == PONG
    assert ask_from_another_process(PING) == json.dumps(PONG)
    for name in (session["session_name"], session["session_name"][len("shmray-session-"):],
                 session["session_dir"], session["socket"]):
        assert client.fetch(PING, session=name) == PONG
    # What the scheduler can't answer yet is an answer too, not a broken connection.
    assert "error" in client.fetch({"what": "no such thing"})


def test_folder_card_and_socket_are_owner_only(session):
    modes = {path: stat.S_IMODE(os.lstat(path).st_mode) for path in (
        session["session_dir"], os.path.dirname(session["socket"]), session["socket"],
        os.path.join(session["session_dir"], client.SESSION_FILE))}
    assert list(modes.values()) == [0o700, 0o700, 0o600, 0o600], modes
    assert stat.S_ISSOCK(os.lstat(session["socket"]).st_mode)


def test_a_session_under_a_deep_temp_dir_is_reached_by_its_folder(tmp_path):
    """Its socket lives in a folder of its own in /tmp (a socket's path is short); the card
    in the session folder says where."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    shmray.init(num_cpus=1, object_store_memory=100 << 20, _temp_dir=str(deep))
    try:
        runtime().query("ping")
        card = client.read_card(runtime().session_dir)
        assert not card["socket"].startswith(card["session_dir"])
        assert client.list_sessions(str(deep)) == [card]
        assert client.fetch(PING, session=card["session_dir"]) == PONG
        socket_folder = os.path.dirname(card["socket"])
    finally:
        shmray.shutdown()
    assert not os.path.exists(socket_folder)


def test_several_sessions_are_listed_and_must_be_chosen(session):
    other = OtherDriver()
    try:
        listed = {card["session_name"] for card in client.list_sessions()}
        assert listed == {session["session_name"], other.card["session_name"]}
        with pytest.raises(SeveralSessionsError, match="choose one with --session") as raised:
            client.fetch(PING)
        assert other.card["session_name"] in str(raised.value)
        assert session["session_name"] in str(raised.value)
        assert len(raised.value.sessions) == 2
        assert isinstance(raised.value, ConnectionError)
        assert client.fetch(PING, session=other.card["session_name"]) == PONG
        assert "SeveralSessionsError" in ask_from_another_process(PING)
        assert ask_from_another_process(PING, other.session_dir) == json.dumps(PONG)
    finally:
        other.kill()
    # Killed with SIGKILL: its scheduler cleaned up; what was left is one session, ours.
    assert [card["session_name"] for card in client.list_sessions()] == \
        [session["session_name"]]
    assert client.fetch(PING) == PONG
    with pytest.raises(NoSessionError, match="no shmray session of yours"):
        client.fetch(PING, session=other.card["session_name"])
    with pytest.raises(NoSessionError, match="no shmray session of yours"):
        client.fetch(PING, session=other.session_dir)
    assert "NoSessionError" in ask_from_another_process(PING, other.card["session_name"])


def test_a_session_that_ended_says_so():
    card = start()
    attached = client.Attached(card)
    assert attached.ask(PING) == PONG
    shmray.shutdown()
    assert not os.path.exists(card["session_dir"])
    with pytest.raises(SessionEndedError, match="ended"):
        attached.ask(PING)
    attached.close()
    with pytest.raises(NoSessionError, match="no shmray session of yours is running"):
        client.fetch(PING)
    with pytest.raises(SessionEndedError, match="has ended"):
        client.Attached(card)  # a card read before it ended


def test_a_stale_card_is_skipped(tmp_path):
    """A session whose scheduler is gone (both it and the driver killed: nobody cleaned
    up) is not listed, even if its scheduler's pid is another process's now."""
    card = start()
    try:
        stale = dict(card, scheduler_pid=os.getpid())  # a live pid, of another process
        folder = tmp_path / "shmray-session-stale"
        folder.mkdir(mode=0o700)
        (folder / client.SESSION_FILE).write_text(json.dumps(stale))
        os.chmod(folder / client.SESSION_FILE, 0o600)
        assert client.read_card(str(folder)) is None
        assert client.list_sessions(str(tmp_path)) == []
    finally:
        shmray.shutdown()


def test_a_stopped_scheduler_times_out_instead_of_hanging(session):
    os.kill(session["scheduler_pid"], signal.SIGSTOP)
    try:
        with pytest.raises(SessionTimeoutError, match="did not answer within"):
            client.fetch(PING, timeout=0.5)
    finally:
        os.kill(session["scheduler_pid"], signal.SIGCONT)
    still_works(session)


# -- hostile peers ---------------------------------------------------------------------------

def test_malformed_requests_get_errors_and_the_connection_goes_on(capfd):
    card = start()
    try:
        sock = connect(card)
        bad = [b"not json", b"\xff\xfe\x00garbage", b"[1, 2]", b'"a string"', b"",
               b"[" * 60000, b"1" * 5000, b'{"what": "ping"', b"{}"]
        sock.sendall(b"\n".join(bad) + b"\n" + json.dumps(PING).encode() + b"\n")
        replies = read_lines(sock, len(bad) + 1)
        assert all("error" in reply for reply in replies[:-2]), replies
        assert "error" in replies[-2]["value"]  # {} is well-formed JSON, but asks nothing
        assert replies[-1] == {"value": PONG}
        sock.close()
        still_works(card)
    finally:
        shmray.shutdown()
    assert "Traceback" not in capfd.readouterr().err


def test_a_line_too_long_closes_that_connection_only(session):
    huge = connect(session)
    huge.sendall(b'{"what": "' + b"x" * (client.MAX_REQUEST + 10))
    assert closed_by_peer(huge)
    huge.close()
    endless = connect(session)  # no newline, ever: cut off at the bound, not buffered on
    try:
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(1000):
                endless.sendall(b"y" * (1 << 16))
    finally:
        endless.close()
    still_works(session)


def test_peers_that_never_read_or_leave_mid_answer_harm_nothing(session):
    requests = (json.dumps(PING).encode() + b"\n") * 50_000
    never_reads = connect(session)
    never_reads.setblocking(False)
    sent = 0
    try:
        while sent < len(requests):  # until its answers fill both buffers and it is
            sent += never_reads.send(requests[sent:])  # read from no more
    except BlockingIOError:
        pass
    assert sent < len(requests)
    still_works(session)
    leavers = []
    for _ in range(20):
        leaver = connect(session)
        leaver.sendall(requests[:len(requests) // 10])
        leavers.append(leaver)
    for leaver in leavers:
        leaver.close()  # answers half written
    half = connect(session)
    half.sendall(b'{"what": "pi')
    half.close()
    still_works(session)
    never_reads.setblocking(True)
    assert read_lines(never_reads, 100) == [{"value": PONG}] * 100  # served as it reads
    never_reads.close()
    still_works(session)


def test_many_connections_at_once(session):
    peers = [connect(session) for _ in range(100)]
    try:
        for peer in peers:
            try:
                peer.sendall(json.dumps(PING).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # one too many: told so, and hung up on
        replies = [read_lines(peer, 1)[0] for peer in peers]
        served = [reply for reply in replies if reply == {"value": PONG}]
        refused = [reply for reply in replies if "too many connections" in
                   reply.get("error", "")]
        assert len(served) >= 1 and len(served) + len(refused) == len(peers)
        assert shmray.get(add.remote(1, 2), timeout=60) == 3
        with pytest.raises(RequestError, match="too many connections"):
            client.fetch(PING)
    finally:
        for peer in peers:
            peer.close()

    def the_slots_are_free():
        try:
            return client.fetch(PING) == PONG
        except RequestError:  # too many connections: their closing not seen yet
            return False

    wait_for(the_slots_are_free)
    assert [client.fetch(PING) for _ in range(50)] == [PONG] * 50


def test_workers_hold_no_inspect_connection(session):
    """A worker forked while a peer is connected must not keep that connection open, or
    the peer would never see the scheduler hang up."""
    peer = connect(session)
    peer.sendall(json.dumps(PING).encode() + b"\n")
    assert read_lines(peer, 1) == [{"value": PONG}]

    @shmray.remote
    def own_sockets():
        return _socket_inodes_of(os.getpid())

    workers = runtime().query("workers")
    for pid in workers:
        os.kill(pid, signal.SIGKILL)  # replacements are forked while the peer is connected
    wait_for(lambda: not set(runtime().query("workers")) & set(workers))
    held = set().union(*shmray.get([own_sockets.remote() for _ in range(4)], timeout=60))
    inspect = _inspect_inodes(session)
    assert inspect & socket_inodes(session["scheduler_pid"])  # the listener, the peer's end
    assert not held & inspect, "a worker holds an inspect socket"
    peer.close()


def _socket_inodes_of(pid):
    return socket_inodes(pid)


def _inspect_inodes(card):
    """Inodes of the scheduler's end of inspect connections and of its listener."""
    found = set()
    with open("/proc/net/unix") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == card["socket"]:
                found.add(int(fields[6]))
    return found


# -- other users -----------------------------------------------------------------------------

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")


def fork_as_another_user(action) -> int:
    """Fork a child that becomes uid/gid 65534 and exits with action()'s code; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = action()
        finally:
            os._exit(code)
    return pid


def as_another_user(action) -> int:
    """Run action() in a forked child that has become uid/gid 65534; its exit code."""
    return os.waitstatus_to_exitcode(os.waitpid(fork_as_another_user(action), 0)[1])


class Opened:
    """Folders and the socket made reachable by all (a user's mistake) for a while."""

    def __init__(self, card):
        root = os.path.dirname(card["session_dir"])
        self.modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in (
            root, card["session_dir"], os.path.dirname(card["socket"]), card["socket"])}

    def __enter__(self):
        for path in self.modes:
            os.chmod(path, 0o777 if stat.S_ISSOCK(os.stat(path).st_mode) else 0o711)

    def __exit__(self, *exc):
        for path, mode in self.modes.items():
            os.chmod(path, mode)


@needs_root
def test_another_user_is_refused(session):
    def reach_it() -> int:
        try:
            client.fetch(PING, session=session["session_dir"])
            return 10  # answered
        except NoSessionError as exc:
            if "no shmray session of yours" not in str(exc):
                return 11
        if client.list_sessions(os.path.dirname(session["session_dir"])):
            return 12
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(session["socket"])
            return 13  # the folder let us in
        except PermissionError:
            return 0
        finally:
            sock.close()

    assert as_another_user(reach_it) == 0

    def reach_it_through_open_folders() -> int:
        """Only the server's own uid check stands in the way now."""
        try:
            client.fetch(PING, session=session["socket"])
            return 20
        except NoSessionError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        try:
            sock.connect(session["socket"])  # the kernel lets it in
            try:
                sock.sendall(json.dumps(PING).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # hung up on already
            data = b""
            try:
                while True:
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                pass
            return 0 if data == b"" else 21
        finally:
            sock.close()

    with Opened(session):
        assert as_another_user(reach_it_through_open_folders) == 0
    still_works(session)


@needs_root
def test_a_session_of_another_user_is_never_connected_to():
    """What the client would attach to is checked first: a folder and socket that another
    user made (its process listening, ready to send anything) are "no session of yours"."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="theirs-"))  # short: a socket path's limit
    os.chown(root, NOBODY, NOBODY)
    temp_mode = stat.S_IMODE(os.stat(tempfile.gettempdir()).st_mode)
    os.chmod(tempfile.gettempdir(), 0o711)  # for them to reach ``root``
    folder = root / "shmray-session-theirs"
    socket_path = folder / "s" / "inspect"
    ready_r, ready_w = os.pipe()
    connected_r, connected_w = os.pipe()

    def serve() -> int:
        os.close(ready_r)
        os.close(connected_r)
        (folder / "s").mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(socket_path))
        listener.listen(8)
        (folder / client.SESSION_FILE).write_text(json.dumps({
            "socket": str(socket_path), "driver_pid": os.getpid(),
            "scheduler_pid": os.getpid(), "scheduler_start": client.process_start(os.getpid()),
            "start_time_ms": 0}))
        os.write(ready_w, b"x")
        listener.settimeout(3)
        try:
            sock, _ = listener.accept()
            sock.sendall(b'{"value": "their data"}\n')
            os.write(connected_w, b"!")
        except socket.timeout:
            pass
        return 0

    pid = fork_as_another_user(serve)
    os.close(ready_w)
    os.close(connected_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert client.list_sessions(str(root)) == []
        for name in (str(folder), str(socket_path)):
            with pytest.raises(NoSessionError, match="no shmray session of yours"):
                client.fetch(PING, session=name, timeout=1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert os.read(connected_r, 1) == b"", "the client connected to another user"
    finally:
        os.close(ready_r)
        os.close(connected_r)
        os.chmod(tempfile.gettempdir(), temp_mode)
        shutil.rmtree(root)
