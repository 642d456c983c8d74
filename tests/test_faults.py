"""Fault tolerance and control: crashes, retries, cancel, memory pressure, dead processes.

Every wait has a timeout that only a deadlock reaches.
"""

import ctypes
import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shmray
from shmray import exceptions
from conftest import (alive, arena_mappings, dev_shm_files, one_cpu_without_leases, runtime,
                      session_dirs, wait_for, worker_pids)

DEADLOCK = 60


# -- worker death ------------------------------------------------------------------------


def _crash(how):
    if how == "exit":
        os._exit(7)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)


@pytest.mark.crash
@pytest.mark.parametrize("how, shown", [("exit", "exit code 7"), ("sigkill", "SIGKILL"),
                                        ("segfault", "SIGSEGV")])
def test_worker_death_retries_then_raises(ray, tmp_path, how, shown):
    attempts = tmp_path / "attempts"

    @ray.remote(max_retries=2)
    def dies(path):
        with open(path, "a") as f:
            f.write("x")
        _crash(how)

    with pytest.raises(exceptions.WorkerCrashedError, match=shown):
        ray.get(dies.remote(str(attempts)), timeout=DEADLOCK)
    assert attempts.read_text() == "xxx"  # the first run and two retries
    wait_for(lambda: len(worker_pids()) >= 2)  # the pool was refilled

    @ray.remote
    def fine():
        return "ok"

    assert ray.get(fine.remote(), timeout=DEADLOCK) == "ok"


@pytest.mark.crash
def test_a_retry_can_succeed(ray, tmp_path):
    marker = tmp_path / "crashed-once"

    @ray.remote  # max_retries=3 by default, as in Ray
    def flaky(path):
        if not os.path.exists(path):
            open(path, "w").close()
            os._exit(1)
        return "second time lucky"

    assert ray.get(flaky.remote(str(marker)), timeout=DEADLOCK) == "second time lucky"


def test_application_errors_are_not_retried_by_default(ray, tmp_path):
    count = tmp_path / "count"

    @ray.remote
    def fails(path):
        with open(path, "a") as f:
            f.write("x")
        raise ValueError("app error")

    with pytest.raises(ValueError):
        ray.get(fails.remote(str(count)), timeout=DEADLOCK)
    assert count.read_text() == "x"


@pytest.mark.parametrize("retry", [True, [ValueError]])
def test_retry_exceptions(ray, tmp_path, retry):
    count = tmp_path / "count"

    @ray.remote(max_retries=2, retry_exceptions=retry)
    def fails_twice(path):
        with open(path, "a") as f:
            f.write("x")
        if len(open(path).read()) < 3:
            raise ValueError("not yet")
        return "done"

    assert ray.get(fails_twice.remote(str(count)), timeout=DEADLOCK) == "done"
    assert count.read_text() == "xxx"


def test_retry_exceptions_list_only_retries_listed(ray, tmp_path):
    count = tmp_path / "count"

    @ray.remote(max_retries=3, retry_exceptions=[KeyError])
    def fails(path):
        with open(path, "a") as f:
            f.write("x")
        raise ValueError("not listed")

    with pytest.raises(ValueError):
        ray.get(fails.remote(str(count)), timeout=DEADLOCK)
    assert count.read_text() == "x"


def test_retry_exceptions_of_a_class_defined_in_main_after_init():
    """The scheduler could not unpickle the task (the class exists only in the driver and
    the worker): it dropped the driver's message and closed its connection."""
    script = textwrap.dedent("""
        import os, sys, tempfile
        import shmray as ray
        ray.init(num_cpus=1, object_store_memory=100 << 20)

        class Late(Exception):
            pass

        @ray.remote(max_retries=2, retry_exceptions=[Late])
        def flaky(path):
            tries = int(open(path).read()) if os.path.exists(path) else 0
            open(path, "w").write(str(tries + 1))
            if tries < 2:
                raise Late("again")
            return tries

        @ray.remote
        class Flaky:
            def __init__(self):
                self.tries = 0

            @ray.method(max_task_retries=2, retry_exceptions=[Late])
            def call(self):
                self.tries += 1
                if self.tries < 3:
                    raise Late("again")
                return self.tries

        print(ray.get(flaky.remote(tempfile.mktemp()), timeout=60),
              ray.get(Flaky.remote().call.remote(), timeout=60))
        ray.shutdown()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "3"]


def test_actor_method_retries_follow_rays_order(ray):
    @ray.remote(max_task_retries=0)
    class Flaky:
        def __init__(self):
            self.tries = {}

        def _fail_first(self, name, times):
            self.tries[name] = self.tries.get(name, 0) + 1
            if self.tries[name] <= times:
                raise KeyError(name)
            return self.tries[name]

        @shmray.method(max_task_retries=2, retry_exceptions=[KeyError])
        def decorated(self):
            return self._fail_first("decorated", 2)

        def plain(self, name, times):
            return self._fail_first(name, times)

    actor = Flaky.remote()
    assert ray.get(actor.decorated.remote(), timeout=DEADLOCK) == 3
    with pytest.raises(KeyError):  # the actor's max_task_retries=0 applies
        ray.get(actor.plain.remote("plain", 1), timeout=DEADLOCK)
    retried = actor.plain.options(max_task_retries=1, retry_exceptions=True)
    assert ray.get(retried.remote("options", 1), timeout=DEADLOCK) == 2
    with pytest.raises(KeyError):  # retries run out
        ray.get(retried.remote("twice", 2), timeout=DEADLOCK)
    with pytest.raises(TypeError, match="The type of keyword .max_task_retries."):
        actor.plain.options(max_task_retries="3")


def test_a_call_to_a_restarting_actor_without_retries_is_unavailable_at_once(ray, tmp_path):
    started, go_on = tmp_path / "started", tmp_path / "go on"

    @ray.remote(max_restarts=1)
    class Slow:
        def __init__(self):
            if started.exists():  # the restart waits until the test says
                deadline = time.monotonic() + DEADLOCK
                while not go_on.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            started.write_text("x")

        def ping(self):
            return "pong"

    actor = Slow.remote()
    assert ray.get(actor.ping.remote(), timeout=DEADLOCK) == "pong"
    ray.kill(actor, no_restart=False)  # returns once the restart has begun
    with pytest.raises(exceptions.ActorUnavailableError, match="restarting"):
        ray.get(actor.ping.remote(), timeout=DEADLOCK)  # while the restart waits
    waiting = actor.ping.options(max_task_retries=1).remote()  # waits for the restart
    go_on.write_text("x")
    assert ray.get(waiting, timeout=DEADLOCK) == "pong"


# -- cancel ------------------------------------------------------------------------------


# -- memory pressure ---------------------------------------------------------------------


def test_spill_files_live_as_long_as_their_objects(ray):
    """A restored object keeps its file (spilling it again writes nothing); the files go
    with their objects."""
    runtime = shmray._context.runtime
    refs = [ray.put(np.full(5 << 20, i, dtype=np.float64)) for i in range(5)]  # 40 MiB each
    spill = os.path.join(runtime.session_dir, "spill")
    spilled = set(os.listdir(spill))
    assert spilled
    for _ in range(2):  # every object restored, and spilled again, twice
        for i, ref in enumerate(refs):
            assert float(ray.get(ref, timeout=DEADLOCK)[-1]) == i
    assert spilled <= set(os.listdir(spill))
    assert not [name for name in os.listdir(spill) if "." in name]  # no draft left
    del refs, ref
    gc.collect()
    wait_for(lambda: (runtime.settle(), os.listdir(spill))[1] == [])


@pytest.mark.parametrize("how", ["retired", "crashed", "actor killed"])
def test_the_pins_of_a_process_that_died_are_freed_when_its_death_is_seen(ray, how):
    """Pins held by a dead process were freed only at shutdown: a session whose workers
    crash or retire (max_calls) leaked store memory."""
    runtime = shmray._context.runtime
    ref = ray.put(np.ones(1 << 20))  # 8 MiB: in the arena

    @ray.remote(max_calls=1)
    def keep_a_view(arrays):
        global KEPT
        KEPT = ray.get(arrays[0])  # a view kept past the task; then the worker retires
        return os.getpid()

    @ray.remote(max_retries=0)
    def crash_holding_a_view(arrays):
        view = ray.get(arrays[0])  # noqa: F841
        os._exit(7)

    @ray.remote
    class Keeper:
        def keep(self, arrays):
            self.view = ray.get(arrays[0])
            return os.getpid()

    if how == "retired":
        pids = [ray.get(keep_a_view.remote([ref]), timeout=DEADLOCK) for _ in range(3)]
    elif how == "crashed":
        with pytest.raises(exceptions.WorkerCrashedError):
            ray.get(crash_holding_a_view.remote([ref]), timeout=DEADLOCK)
        pids = []
    else:
        keeper = Keeper.remote()
        pids = [ray.get(keeper.keep.remote([ref]), timeout=DEADLOCK)]
        ray.kill(keeper)
    wait_for(lambda: not any(alive(pid) for pid in pids))
    object_id = ref.binary()
    wait_for(lambda: runtime.store.info(object_id).pin_count == 0)
    del ref
    gc.collect()
    wait_for(lambda: (runtime.settle(), runtime.store.statistics().num_objects)[1] == 0)


def test_results_spill_and_restore_across_processes(ray):
    @ray.remote
    def make(i):
        return np.full(5 << 20, i, dtype=np.float64)  # 40 MiB each, 200 MiB in all

    refs = [make.remote(i) for i in range(5)]
    for i, ref in enumerate(refs):
        value = ray.get(ref, timeout=DEADLOCK)
        assert value[0] == i and value[-1] == i
        del value

    @ray.remote
    def first(a):
        return float(a[0])

    assert ray.get([first.remote(r) for r in refs], timeout=DEADLOCK) == [0, 1, 2, 3, 4]
    runtime = shmray._context.runtime
    runtime.store.check()


def test_processes_spilling_at_once_never_fail_a_task(ray):
    """Two workers short of room may pick the same victim: the one that finds it spilled
    (or being restored) by the other goes on to the next."""
    @ray.remote
    def big(i):
        a = np.empty((3 << 20) // 8)
        a[:] = i
        return a

    for _ in range(3):  # 240 MiB a round through a 150 MiB store
        refs = [big.remote(i) for i in range(80)]
        for i, ref in enumerate(refs):
            assert ray.get(ref, timeout=DEADLOCK)[0] == i
        del refs
    shmray._context.runtime.store.check()


# -- the scheduler or the driver dies ----------------------------------------------------


@pytest.mark.crash
def test_scheduler_death_is_a_clear_error():
    shmray.init(num_cpus=2, object_store_memory=100 << 20)
    try:
        @shmray.remote
        def f():
            return 1

        assert shmray.get(f.remote(), timeout=DEADLOCK) == 1
        workers = worker_pids()
        os.kill(shmray._session._scheduler_pid, signal.SIGKILL)
        wait_for(lambda: not alive(shmray._session._scheduler_pid))  # kill() doesn't wait
        with pytest.raises(exceptions.RaySystemError, match="scheduler"):
            shmray.get(f.remote(), timeout=DEADLOCK)
        for pid in workers:
            wait_for(lambda: not alive(pid))
    finally:
        shmray.shutdown()


@pytest.mark.crash
def test_sigkilled_driver_leaves_nothing_within_seconds():
    before_shm, before_dirs = dev_shm_files(), session_dirs()
    script = textwrap.dedent("""
        import os, sys, time, shmray
        shmray.init(num_cpus=2, object_store_memory=100 << 20)

        @shmray.remote
        def forever():
            time.sleep(1000)

        @shmray.remote
        class Holder:
            def pid(self):
                return os.getpid()

        h = Holder.remote()
        refs = [forever.remote() for _ in range(2)]
        actor = shmray.get(h.pid.remote())
        while len(shmray._context.runtime.query("workers")) < 2:  # the pool fills as it idles
            time.sleep(0.01)
        pids = shmray._context.runtime.query("workers") + [actor]
        print(shmray._session._scheduler_pid, *pids, flush=True)
        sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) >= 4
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids), "a shmray process outlived its driver by 5 s"
        assert all(arena_mappings(p) == [] for p in pids)
        wait_for(lambda: session_dirs() == before_dirs, timeout=5)
        assert dev_shm_files() == before_shm
    finally:
        if child.poll() is None:
            child.kill()


# -- chaos and soak ----------------------------------------------------------------------


def _fork_a_child_that_exits() -> int:
    """Fork this process; the child does what exiting would (shmray's exit handler, the
    finalizers of what it inherited) and leaves.  Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        try:
            shmray._session.shutdown()  # what atexit runs at a normal exit
            gc.collect()
        finally:
            os._exit(0)
    return pid


@pytest.mark.crash
def test_chaos_dag_survives_worker_kills_and_forks():
    """A 2,000-task DAG gives the exact result while a random worker dies every 50 ms and
    the driver forks a child that exits every 250 ms (a child's exit ended the session)."""
    shmray.init(num_cpus=2, object_store_memory=150 << 20)
    try:
        @shmray.remote(max_retries=-1)
        def leaf(i):
            time.sleep(0.002)  # long enough for the kills to land mid-run
            return i

        @shmray.remote(max_retries=-1)
        def combine(*values):
            return sum(values)

        refs = [leaf.remote(i) for i in range(1600)]
        while len(refs) > 1:  # 400 combine tasks over chunks of up to 5
            refs = [combine.remote(*refs[i:i + 5]) for i in range(0, len(refs), 5)]
        rng = random.Random(0)
        kills = 0
        deadline = time.monotonic() + 120
        ready = []
        children = []
        while not ready and time.monotonic() < deadline:
            pids = worker_pids()
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            if kills % 5 == 0:
                children.append(_fork_a_child_that_exits())
            ready, _ = shmray.wait(refs, timeout=0.05)
        assert shmray.get(refs[0], timeout=DEADLOCK) == sum(range(1600))
        assert kills > 5 and children
        assert all(os.waitpid(child, 0)[1] == 0 for child in children)
    finally:
        shmray.shutdown()


@pytest.mark.crash
def test_chaos_actor_calls_survive_kills_and_forks():
    """Calls in flight while their actor is killed (and restarted) and the driver forks:
    each returns its own value or raises RayActorError (ActorDiedError, or, for a call that
    reached the scheduler while the actor restarted, ActorUnavailableError), none hangs,
    and once kill() returns a call with retries reaches the new process."""
    shmray.init(num_cpus=2, object_store_memory=150 << 20)
    try:
        @shmray.remote(max_restarts=-1)
        class Echo:
            def echo(self, i):
                time.sleep(0.0005)
                return i, os.getpid()

        echo = Echo.remote()
        answered = died = 0
        children = []
        for round_ in range(15):
            pid = shmray.get(echo.echo.remote(-1), timeout=DEADLOCK)[1]
            refs = [echo.echo.remote(i) for i in range(100)]
            time.sleep(0.01)
            if round_ % 3 == 0:
                children.append(_fork_a_child_that_exits())
            shmray.kill(echo, no_restart=False)
            assert not alive(pid)
            for i, ref in enumerate(refs):
                try:
                    assert shmray.get(ref, timeout=DEADLOCK)[0] == i
                    answered += 1
                except exceptions.RayActorError:
                    died += 1
            waits = echo.echo.options(max_task_retries=1)  # for the restart
            assert shmray.get(waits.remote(0), timeout=DEADLOCK)[1] != pid
        assert answered and died
        assert all(os.waitpid(child, 0)[1] == 0 for child in children)
    finally:
        shmray.shutdown()


def _soak(seconds):
    shmray.init(num_cpus=2, object_store_memory=150 << 20)
    try:
        import psutil

        @shmray.remote
        def work(a):
            return a * 2

        @shmray.remote
        class Acc:
            def __init__(self):
                self.total = 0.0

            def add(self, a):
                self.total += float(a.sum())
                return self.total

        acc = Acc.remote()
        runtime = shmray._context.runtime
        scheduler = psutil.Process(shmray._session._scheduler_pid)

        def one_round():
            arrays = [shmray.put(np.ones(50_000)) for _ in range(4)]
            doubled = [work.remote(a) for a in arrays]
            shmray.get([acc.add.remote(d) for d in doubled], timeout=DEADLOCK)

        for _ in range(20):  # warm up: pools, caches, allocator
            one_round()
        runtime.settle()
        workers = [psutil.Process(pid) for pid in runtime.query("workers")]
        base_store = runtime.store.statistics().bytes_in_use
        base_rss = [p.memory_info().rss for p in [scheduler] + workers]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            one_round()
        runtime.settle()
        assert runtime.store.statistics().bytes_in_use == base_store
        for process, before in zip([scheduler] + workers, base_rss):
            grown = process.memory_info().rss - before
            assert grown < (8 << 20), f"{process.cmdline()} grew by {grown >> 10} KiB"
    finally:
        shmray.shutdown()


def test_soak_short():
    _soak(5)


@pytest.mark.slow
@pytest.mark.timeout(400)  # three minutes of work, past the suite's usual deadlock timeout
def test_soak_long():
    _soak(180)


def test_a_failed_restore_can_be_retried(ray):
    refs = [ray.put(np.full(5 << 20, i, dtype=np.float64)) for i in range(5)]  # 200 MiB
    spilled = [r for r in refs if runtime().store.contains(r.binary()) == "spilled"]
    path = runtime().spiller.path(spilled[0].binary())
    os.rename(path, path + ".away")
    with pytest.raises(exceptions.ObjectLostError, match="can't be read back"):
        ray.get(spilled[0], timeout=DEADLOCK)
    os.rename(path + ".away", path)
    assert ray.get(spilled[0], timeout=DEADLOCK)[0] == refs.index(spilled[0])


def _crash_in_a_burst(make, read):
    """Fifty tasks of a short function (so sent ahead, their reports held back), the 26th
    crashing its worker: the indices whose get() raised WorkerCrashedError.  Each other's
    value is ``make(i)``, and ``read`` of it must give back i."""
    one_cpu_without_leases()
    try:
        @shmray.remote(max_retries=0)
        def f(i, crash_at):
            if i == crash_at:
                os._exit(1)
            return make(i)

        for _ in range(5):  # known short: many are sent ahead
            assert [read(v) for v in shmray.get([f.remote(i, -1) for i in range(50)])] \
                == list(range(50))
        failed = []
        for i, ref in enumerate([f.remote(i, 25) for i in range(50)]):
            try:
                assert read(shmray.get(ref, timeout=DEADLOCK)) == i
            except exceptions.WorkerCrashedError:
                failed.append(i)
        return failed
    finally:
        shmray.shutdown()


def test_a_crash_fails_the_task_that_crashed_not_those_whose_reports_it_held():
    """A crash in a later task lost the held reports, failed tasks that had finished, and
    re-ran the crashing one."""
    assert _crash_in_a_burst(lambda i: i, lambda value: value) == [25]


def test_a_crash_keeps_no_finished_report_whose_puts_died_with_the_worker():
    """Reports parked while a put (or a child task) made by the task was still unsent were
    replayed after a crash: the task looked done, its refs named nothing."""
    def make(i):
        return [shmray.put(i), shmray.put(-1)]

    def read(value):
        return shmray.get(value[0], timeout=DEADLOCK)

    assert _crash_in_a_burst(make, read) == [25]


def test_actor_calls_finished_before_a_crash_keep_their_results(ray):
    @ray.remote
    class A:
        def ok(self, x):
            return x

        def crash(self, x):
            os._exit(1)

    a = A.remote()
    arg = ray.put(1)  # a ref among the arguments: the calls go through the scheduler
    ray.get(a.ok.remote(arg))
    oks = [a.ok.remote(arg) for _ in range(30)]
    a.crash.remote(arg)
    assert ray.get(oks, timeout=DEADLOCK) == [1] * 30


class _Calls:
    """An actor whose ``ok`` returns at once and whose ``crash`` kills its process; under
    concurrency ``crash`` waits a moment first, so the calls before it have finished."""

    def __init__(self, concurrent):
        self.concurrent = concurrent

    def ok(self, x):
        return x

    def crash(self, how):
        if self.concurrent:
            time.sleep(0.2)
        _crash(how)


class _AsyncCalls:
    async def ok(self, x):
        return x

    async def crash(self, how):
        import asyncio

        await asyncio.sleep(0.2)
        _crash(how)


@pytest.mark.crash
@pytest.mark.parametrize("how", ["exit", "sigkill"])
@pytest.mark.parametrize("kind", ["sync", "threaded", "async"])
def test_direct_actor_calls_finished_before_a_crash_keep_their_results(ray, kind, how):
    """A sync actor holds back the replies of calls sent straight to it while more are
    queued; a crash in the next call lost them, and calls that had finished raised
    ActorDiedError."""
    for _ in range(5):
        if kind == "async":
            a = ray.remote(_AsyncCalls).remote()
        else:
            a = ray.remote(_Calls).options(max_concurrency=4 if kind == "threaded" else 1) \
                .remote(kind != "sync")
        assert ray.get(a.ok.remote(0), timeout=DEADLOCK) == 0  # connected: calls go direct
        oks = [a.ok.remote(i) for i in range(30)]
        crashed = a.crash.remote(how)
        ray.wait([*oks, crashed], num_returns=31, timeout=DEADLOCK)
        assert ray.get(oks, timeout=DEADLOCK) == list(range(30))
        with pytest.raises(exceptions.ActorDiedError):
            ray.get(crashed, timeout=DEADLOCK)


@pytest.mark.crash
def test_direct_actor_calls_finished_before_a_crash_keep_results_in_the_arena_and_refs(ray):
    """The reports held back with the replies name objects in the arena and refs the actor
    held for its results: they must outlive its death, as its reports do."""
    @ray.remote
    class A:
        def big(self, i):
            return np.full(1 << 18, i)

        def holding(self, i):
            return [ray.put(i)]

        def crash(self):
            os._exit(1)

    for _ in range(3):
        a = A.remote()
        ray.get(a.big.remote(0), timeout=DEADLOCK)
        bigs = [a.big.remote(i) for i in range(10)]
        holding = [a.holding.remote(i) for i in range(10)]
        a.crash.remote()
        assert [int(v[-1]) for v in ray.get(bigs, timeout=DEADLOCK)] == list(range(10))
        assert [ray.get(v[0], timeout=DEADLOCK) for v in ray.get(holding, timeout=DEADLOCK)] \
            == list(range(10))


@pytest.mark.crash
def test_direct_actor_calls_finished_before_a_crash_do_not_run_again_after_its_restart(
        ray, tmp_path):
    """Their held-back replies lost, the calls that had finished ran again on the restarted
    actor (with max_task_retries), their side effects twice."""
    @ray.remote(max_restarts=1, max_task_retries=1)
    class A:
        def ok(self, i):
            (tmp_path / f"{i}-{os.getpid()}").touch()
            return i

        def crash_once(self):
            if not (tmp_path / "crashed").exists():
                (tmp_path / "crashed").touch()
                os._exit(1)
            return "restarted"

    a = A.remote()
    assert ray.get(a.ok.remote(-1), timeout=DEADLOCK) == -1
    oks = [a.ok.remote(i) for i in range(30)]
    crashed = a.crash_once.remote()
    assert ray.get(oks, timeout=DEADLOCK) == list(range(30))
    assert ray.get(crashed, timeout=DEADLOCK) == "restarted"
    runs = [path.name.rsplit("-", 1)[0] for path in tmp_path.iterdir() if path.name != "crashed"]
    assert sorted(runs, key=int) == [str(i) for i in range(-1, 30)]
