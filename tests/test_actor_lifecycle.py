"""How actors end: gracefully (exit_actor, __ray_terminate__, the last handle dropped, the
session ending), when ``__ray_shutdown__`` and then the actor's atexit handlers run, or
killed, when neither does."""

import atexit
import os
import time

import pytest

import shmray
from shmray import exceptions

from conftest import alive, socket_inodes, wait_for

DEADLOCK = 60


def cleanup_actor(ray, folder):
    """An actor that notes, in ``folder``, each cleanup that runs, in order."""
    log = folder / "cleanup"

    @ray.remote
    class Tidy:
        def __init__(self):
            atexit.register(lambda: log.open("a").write("atexit\n"))

        def __ray_shutdown__(self):
            log.open("a").write("__ray_shutdown__\n")

        def pid(self):
            return os.getpid()

        def leave(self):
            shmray.actor.exit_actor()

    actor = Tidy.remote()
    return actor, ray.get(actor.pid.remote(), timeout=DEADLOCK), log


def cleanups(log):
    return log.read_text().split() if log.exists() else []


def test_exit_actor_runs_ray_shutdown_then_atexit(ray, tmp_path):
    actor, pid, log = cleanup_actor(ray, tmp_path)
    with pytest.raises(exceptions.ActorDiedError, match="exit_actor"):
        ray.get(actor.leave.remote(), timeout=DEADLOCK)
    wait_for(lambda: not alive(pid), timeout=DEADLOCK)
    assert cleanups(log) == ["__ray_shutdown__", "atexit"]


def test_ray_terminate_runs_both(ray, tmp_path):
    actor, pid, log = cleanup_actor(ray, tmp_path)
    actor.__ray_terminate__.remote()
    wait_for(lambda: not alive(pid), timeout=DEADLOCK)
    assert cleanups(log) == ["__ray_shutdown__", "atexit"]


def test_kill_runs_neither(ray, tmp_path):
    actor, pid, log = cleanup_actor(ray, tmp_path)
    ray.kill(actor)
    assert not alive(pid)
    time.sleep(0.2)
    assert cleanups(log) == []


def test_dropping_the_last_handle_ends_the_actor_while_the_driver_idles(ray, tmp_path):
    """It lingered until the driver next called shmray; here the driver only sleeps."""
    actor, pid, log = cleanup_actor(ray, tmp_path)
    del actor
    deadline = time.monotonic() + DEADLOCK
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # nothing of shmray's is called meanwhile
    assert not alive(pid)
    assert cleanups(log) == ["__ray_shutdown__", "atexit"]


def test_shutdown_runs_ray_shutdown(tmp_path):
    shmray.init(num_cpus=1)
    try:
        actor, pid, log = cleanup_actor(shmray, tmp_path)
    finally:
        shmray.shutdown()
    assert not alive(pid)
    assert cleanups(log)[:1] == ["__ray_shutdown__"]


def test_an_error_in_ray_shutdown_is_printed_and_the_cleanup_goes_on(ray, tmp_path):
    log = tmp_path / "log"

    @ray.remote
    class Clumsy:
        def __init__(self):
            atexit.register(lambda: log.write_text("atexit ran"))

        def __ray_shutdown__(self):
            raise ValueError("dropped the keys")  # printed: test_output.py

        def pid(self):
            return os.getpid()

    actor = Clumsy.remote()
    pid = ray.get(actor.pid.remote(), timeout=DEADLOCK)
    actor.__ray_terminate__.remote()
    wait_for(lambda: not alive(pid), timeout=DEADLOCK)
    assert log.read_text() == "atexit ran"


def test_a_hanging_ray_shutdown_is_cut_short(tmp_path):
    started, finished = tmp_path / "started", tmp_path / "finished"
    shmray.init(num_cpus=1, _system_config={"actor_graceful_shutdown_timeout_ms": 300})
    try:
        @shmray.remote
        class Hangs:
            def __ray_shutdown__(self):
                started.write_text("yes")
                time.sleep(DEADLOCK)
                finished.write_text("yes")

            def pid(self):
                return os.getpid()

        actor = Hangs.remote()
        pid = shmray.get(actor.pid.remote(), timeout=DEADLOCK)
        actor.__ray_terminate__.remote()
        wait_for(lambda: not alive(pid), timeout=DEADLOCK / 2)
        assert started.exists() and not finished.exists()
    finally:
        shmray.shutdown()


def test_exit_actor_in_init_still_runs_atexit(ray, tmp_path):
    log = tmp_path / "log"

    @ray.remote
    class Leaves:
        def __init__(self):
            atexit.register(lambda: log.write_text("atexit"))
            shmray.actor.exit_actor()
            log.write_text("after exit_actor")  # never

        def ping(self):
            return 1

    actor = Leaves.remote()
    with pytest.raises(exceptions.RayActorError):
        ray.get(actor.ping.remote(), timeout=DEADLOCK)
    wait_for(lambda: log.exists() and log.read_text() == "atexit", timeout=DEADLOCK)


def test_exit_actor_outside_an_actor_says_so_as_ray_does(ray):
    with pytest.raises(TypeError, match="exit_actor API is called on a non-actor worker"):
        shmray.actor.exit_actor()

    @ray.remote
    def task():
        shmray.actor.exit_actor()

    with pytest.raises(TypeError, match="exit_actor API is called on a non-actor worker"):
        ray.get(task.remote(), timeout=DEADLOCK)


# -- the actor forker (``_spawner``) ------------------------------------------------------


def _forker_pid():
    import psutil

    found = [p.pid for p in psutil.Process().children(recursive=True)
             if "shmray::spawner" in " ".join(p.cmdline())]
    return found[0] if found else None


@pytest.mark.processes_only("looks at actor processes; local mode has none")
@pytest.mark.parametrize("how, shown", [("exit", "exit code 7"), ("kill", "SIGKILL")])
def test_an_actor_is_forked_by_the_forker_and_its_end_is_still_named(ray, how, shown):
    import psutil
    import signal

    @ray.remote
    class Doomed:
        def pid(self):
            return os.getpid()

        def end(self):
            os._exit(7)

    actor = Doomed.remote()
    pid = ray.get(actor.pid.remote())
    assert psutil.Process(pid).ppid() == _forker_pid()
    if how == "exit":
        ending = actor.end.remote()
    else:
        os.kill(pid, signal.SIGKILL)
        ending = actor.pid.remote()
    with pytest.raises(exceptions.ActorDiedError, match=shown):
        ray.get(ending, timeout=30)


@pytest.mark.processes_only("looks at actor processes; local mode has none")
def test_actors_are_forked_again_after_the_forker_is_killed(ray):
    import signal

    @ray.remote
    class Echo:
        def pid(self):
            return os.getpid()

    first = Echo.remote()
    first_pid = ray.get(first.pid.remote())
    forker = _forker_pid()
    os.kill(forker, signal.SIGKILL)  # its actors end with it
    wait_for(lambda: not alive(first_pid))
    with pytest.raises(exceptions.ActorDiedError):
        ray.get(first.pid.remote(), timeout=30)
    second = Echo.remote()
    assert ray.get(second.pid.remote(), timeout=30) != first_pid
    assert _forker_pid() not in (None, forker)


@pytest.mark.processes_only("looks at actor processes; local mode has none")
def test_the_forker_and_its_actors_hold_no_socket_of_another_process(ray):
    """Each end of a connection must be held by its one process, or a death would not be
    seen as the end of that connection while the other holder lives."""
    from shmray import _session

    @ray.remote
    class Echo:
        def pid(self):
            return os.getpid()

    actors = [Echo.remote() for _ in range(3)]
    pids = ray.get([actor.pid.remote() for actor in actors])
    holders = [_forker_pid(), _session._scheduler_pid, *pids]
    sockets = [socket_inodes(pid) for pid in holders]
    assert all(sockets)
    for i, mine in enumerate(sockets):
        for theirs in sockets[i + 1:]:
            assert not mine & theirs

