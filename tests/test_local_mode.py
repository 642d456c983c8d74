"""Local mode, ``init(local_mode=True)``: what it adds to the behaviour every task and actor
test checks in both modes (``in_both_modes`` in test_tasks.py and test_actors.py): calls
run in the driver, at their ``.remote()``, in order, where a debugger can stop in them."""

import asyncio
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shmray
from shmray import exceptions
from conftest import arena_fds, in_both_modes, runtime, shmray_children


@pytest.fixture
def local():
    shmray.init(local_mode=True, num_cpus=2)
    try:
        yield shmray
    finally:
        shmray.shutdown()


def test_tasks_run_in_the_driver_at_remote_in_submission_order(local, tmp_path):
    log = tmp_path / "log"

    @shmray.remote
    def note(i):
        with open(log, "a") as f:
            f.write(f"{i} {os.getpid()}\n")
        return os.getpid()

    refs = []
    for i in range(5):
        refs.append(note.remote(i))
        # it ran before .remote() returned: its line is there, after the earlier ones
        assert [line.split()[0] for line in log.read_text().splitlines()] == \
            [str(j) for j in range(i + 1)]
    assert shmray.get(refs) == [os.getpid()] * 5
    assert shmray_children() == [] and arena_fds() == []  # no process, no arena
    ready, not_ready = shmray.wait(refs, num_returns=5, timeout=0)
    assert len(ready) == 5 and not not_ready


def test_breakpoint_stops_inside_a_task_and_an_actor_call_in_the_driver(local, monkeypatch):
    stops = []

    def hook(*args, **kwargs):  # what a debugger sees: the remote code's own frame
        frame = sys._getframe(1)
        stops.append((os.getpid(), frame.f_code.co_name, dict(frame.f_locals)))

    monkeypatch.setattr(sys, "breakpointhook", hook)

    @shmray.remote
    def square(x):
        y = x * x
        breakpoint()
        return y

    @shmray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, k):
            self.n += k
            breakpoint()
            return self.n

    assert shmray.get(square.remote(7)) == 49
    counter = Counter.remote()
    assert shmray.get(counter.add.remote(3)) == 3
    assert [(pid, name) for pid, name, _ in stops] == [(os.getpid(), "square"),
                                                      (os.getpid(), "add")]
    assert stops[0][2]["y"] == 49 and stops[1][2]["k"] == 3


def test_pdb_runs_inside_a_remote_function(tmp_path):
    script = tmp_path / "debug_me.py"
    script.write_text(textwrap.dedent("""
        import shmray

        shmray.init(local_mode=True, num_cpus=1)

        @shmray.remote
        def f(x):
            secret = x * 3
            breakpoint()
            return secret

        print("result", shmray.get(f.remote(14)))
        shmray.shutdown()
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONBREAKPOINT"}
    done = subprocess.run([sys.executable, str(script)], input="p secret\nc\n", text=True,
                          capture_output=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "(Pdb) 42" in done.stdout and "result 42" in done.stdout


def test_arguments_and_results_are_copies_as_between_processes(local):
    @shmray.remote
    def mutate(items):
        items.append("task")
        return items

    mine = ["driver"]
    ref = mutate.remote(mine)
    assert mine == ["driver"]
    first = shmray.get(ref)
    first.append("again")
    assert shmray.get(ref) == ["driver", "task"]

    @shmray.remote
    def write(array):
        array[0] = 1.0

    with pytest.raises(ValueError, match="read-only"):
        shmray.get(write.remote(np.zeros(1 << 18)))  # a large argument: read-only, as ever

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("no pickling here")

    with pytest.raises(TypeError, match="serialize the argument"):
        mutate.remote(Unpicklable())


def test_errors_are_the_users_class_and_name_the_driver(local):
    class Oops(Exception):
        pass

    @shmray.remote
    def fail():
        raise Oops("bad")

    @shmray.remote
    def after(value):
        return value

    ref = fail.remote()
    with pytest.raises(Oops) as caught:
        shmray.get(ref)
    assert isinstance(caught.value, exceptions.RayTaskError)
    assert f"pid={os.getpid()}" in str(caught.value) and "bad" in str(caught.value)
    with pytest.raises(Oops):  # a failed argument fails the task without running it
        shmray.get(after.remote(ref))

    @shmray.remote(num_cpus=64)
    def too_big():
        return 1

    with pytest.raises(exceptions.TaskUnschedulableError):
        too_big.remote()


def test_ctrl_c_and_pdb_quit_stop_the_program_not_the_task(local):
    import bdb

    @shmray.remote
    def interrupted(kind):
        raise kind()

    for kind in (KeyboardInterrupt, bdb.BdbQuit):
        with pytest.raises(kind):
            interrupted.remote(kind)
    assert shmray.get(shmray.put(1)) == 1  # the session goes on


def test_retry_exceptions_retries_in_the_driver(local, tmp_path):
    tries = tmp_path / "tries"

    @shmray.remote(max_retries=2, retry_exceptions=[ValueError])
    def flaky():
        with open(tries, "a") as f:
            f.write("x")
        if len(tries.read_text()) < 3:
            raise ValueError("not yet")
        return "done"

    assert shmray.get(flaky.remote()) == "done"
    assert tries.read_text() == "xxx"


def test_objects_go_with_their_last_ref(local):
    before = runtime().query("objects")
    ref = shmray.put(np.ones(1000))
    outer = shmray.put([ref])
    del ref
    assert runtime().query("objects") == before + 2  # the list holds the array
    del outer
    assert runtime().query("objects") == before


def test_async_actor_from_the_drivers_own_event_loop(local):
    @shmray.remote
    class Echo:
        def __init__(self):
            self.event = asyncio.Event()  # bound to the actor's loop

        async def set_then_wait(self, value):
            self.event.set()
            await self.event.wait()
            return value

    @shmray.remote
    class Relay:
        async def through(self, echo, value):
            return await echo.set_then_wait.remote(value)

    echo, relay = Echo.remote(), Relay.remote()

    async def main():
        first = await echo.set_then_wait.remote(1)
        second = await relay.through.remote(echo, 2)
        return first, second

    assert asyncio.run(main()) == (1, 2)
    assert shmray.get(echo.set_then_wait.remote(3)) == 3


def test_actor_ends_and_restarts_in_the_driver(local, tmp_path):
    ended = tmp_path / "ended"

    @shmray.remote(max_restarts=1)
    class Keeper:
        def __init__(self):
            self.n = 0

        def add(self):
            self.n += 1
            return self.n, shmray.get_runtime_context().was_current_actor_reconstructed

        def __ray_shutdown__(self):
            ended.write_text("yes")

    keeper = Keeper.remote()
    assert shmray.get(keeper.add.remote()) == (1, False)
    shmray.kill(keeper, no_restart=False)
    assert shmray.get(keeper.add.remote()) == (1, True)  # fresh state
    assert not ended.exists()  # kill runs no __ray_shutdown__
    del keeper
    shmray.put(None)  # the runtime's next call lets the last handle go
    assert ended.read_text() == "yes"


def test_placement_groups_are_refused_saying_why(local):
    with pytest.raises(NotImplementedError, match="local mode"):
        shmray.util.placement_group([{"CPU": 1}])
    assert shmray.util.placement_group_table() == {}


def test_a_call_holding_gpus_sees_the_sessions_first_ids():
    shmray.init(local_mode=True, num_cpus=1, num_gpus=2)
    try:
        @shmray.remote(num_gpus=1)
        def ids():
            return shmray.get_gpu_ids()

        @shmray.remote(num_gpus=0)
        def none():
            return shmray.get_gpu_ids()

        assert shmray.get(ids.remote()) == [0] and shmray.get(none.remote()) == []
        assert shmray.get_gpu_ids() == []
    finally:
        shmray.shutdown()


def test_an_async_call_stuck_waiting_for_a_later_call_says_so(local, monkeypatch, capfd):
    import threading

    from shmray import _local_actors

    monkeypatch.setattr(_local_actors, "STUCK_AFTER", 0.2)

    @shmray.remote
    class Gate:
        def __init__(self):
            self.opened = asyncio.Event()

        async def wait_open(self):
            loop = asyncio.get_running_loop()
            # only a thread opens it here; in a real program a later call would (never)
            threading.Timer(1.0, loop.call_soon_threadsafe, (self.opened.set,)).start()
            await self.opened.wait()
            return "open"

        async def nap(self):
            await asyncio.sleep(0.5)  # a timer is pending: nothing to say
            return "rested"

    gate = Gate.remote()
    assert shmray.get(gate.nap.remote()) == "rested"
    assert "nothing left on its event loop" not in capfd.readouterr().err
    assert shmray.get(gate.wait_open.remote()) == "open"
    assert "a call of actor Gate has waited 0.2 s" in capfd.readouterr().err


# -- the same errors as with processes ---------------------------------------------------------

both = in_both_modes(2)


def test_sys_exit_is_a_crashed_worker_or_a_dead_actor_in_both_modes(both):
    """In local mode sys.exit() ends no process, but it must not end the driver either (a
    RayTaskError that is also a SystemExit would): it is reported as a session reports it."""

    @both.remote(max_retries=0)
    def leave():
        sys.exit(3)

    with pytest.raises(exceptions.WorkerCrashedError, match="sys.exit|exit"):
        both.get(leave.remote(), timeout=60)

    @both.remote
    class Leaves:
        def leave(self):
            sys.exit(4)

        def ping(self):
            return "pong"

    actor = Leaves.remote()
    with pytest.raises(exceptions.ActorDiedError):
        both.get(actor.leave.remote(), timeout=60)
    with pytest.raises(exceptions.ActorDiedError):
        both.get(actor.ping.remote(), timeout=60)


def test_a_failed_argument_reads_the_same_in_both_modes(both):
    @both.remote
    def fails():
        raise ValueError("upstream")

    @both.remote
    def uses(x):
        return x

    with pytest.raises(ValueError) as info:
        both.get(uses.remote(fails.remote()), timeout=60)
    text = str(info.value)
    assert text.startswith("ray::uses()")
    assert "At least one of the input arguments for this task could not be computed" in text
    assert "upstream" in text
