"""Regressions for bugs found in review; each test failed before its fix.

They run through real processes, like the feature tests, with timeouts only a deadlock
reaches.
"""

import gc
import os
import threading
import time

import numpy as np
import pytest

import shmray
from shmray import exceptions
from conftest import alive, learn_short, runtime, settle, wait_for

DEADLOCK = 60


def test_async_actor_survives_large_pipelined_results(ray):
    """A full socket buffer once made an async actor write half a frame, killing the scheduler."""
    @ray.remote
    class Big:
        async def blob(self):
            return b"x" * 90_000

    b = Big.remote()
    assert len(ray.get([b.blob.remote() for _ in range(300)], timeout=DEADLOCK)) == 300


def test_blocking_get_in_async_actor_and_calls_that_arrive_meanwhile(ray):
    @ray.remote
    def slow():
        time.sleep(1)
        return 7

    @ray.remote
    class A:
        async def ping(self):
            return "pong"

        async def blocking(self, refs):
            return ray.get(refs[0])

    a = A.remote()
    ray.get(a.ping.remote(), timeout=DEADLOCK)
    r1 = a.blocking.remote([slow.remote()])
    time.sleep(0.3)
    r2 = a.ping.remote()  # read by the blocking get; must still run afterwards
    assert ray.get(r1, timeout=DEADLOCK) == 7
    assert ray.get(r2, timeout=10) == "pong"


@pytest.mark.parametrize("how", ["failed dependency", "cancel"])
def test_actor_calls_behind_a_dropped_call_still_run(ray, how):
    @ray.remote
    def slow_fail():
        time.sleep(0.3)
        raise ValueError("no")

    @ray.remote
    def slow():
        time.sleep(0.5)
        return 1

    @ray.remote
    class A:
        def f(self, x):
            return x

        def g(self):
            return "g"

    a = A.remote()
    ray.get(a.g.remote(), timeout=DEADLOCK)
    first = a.f.remote(slow_fail.remote() if how == "failed dependency" else slow.remote())
    second = a.g.remote()
    if how == "cancel":
        ray.cancel(first)
    assert ray.get(second, timeout=10) == "g"


def test_nested_task_of_the_same_function_on_one_cpu():
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        def inner(x):
            return x + 1

        @shmray.remote
        def outer():
            return shmray.get(inner.remote(1))

        assert shmray.get(outer.remote(), timeout=DEADLOCK) == 2

        @shmray.remote
        def apply(fn, x):  # a remote function passed as an argument keeps its identity
            return shmray.get(fn.remote(x))

        assert shmray.get([apply.remote(inner, i) for i in range(3)], timeout=DEADLOCK) == [1, 2, 3]
        assert len(set(inner.__reduce__()[1][2] for _ in range(2))) == 1
    finally:
        shmray.shutdown()


def test_a_task_waiting_on_children_sent_ahead_behind_it_on_its_own_worker():
    """Children of a short function, submitted before it blocks, were sent ahead to its own
    worker's queue, behind it: it waited for them forever.  Now they are handed back."""
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        def f(n):
            if n == 0:
                return 1
            refs = [f.remote(0) for _ in range(8)]
            time.sleep(0.05)  # the scheduler sends them ahead meanwhile
            return sum(shmray.get(refs))

        shmray.get([f.remote(0) for _ in range(30)])  # learned: short, never waits
        assert shmray.get(f.remote(1), timeout=DEADLOCK) == 8
        assert shmray.get([f.remote(1) for _ in range(4)], timeout=DEADLOCK) == [8] * 4
    finally:
        shmray.shutdown()


@pytest.mark.parametrize("arg", [5, "big"])
def test_restarted_actor_gets_its_constructor_arguments_again(ray, arg):
    value = np.ones(1_000_000) if arg == "big" else arg

    @ray.remote(max_restarts=1)
    class A:
        def __init__(self, v):
            self.v = v

        def size(self):
            return int(np.size(self.v)), os.getpid()

    a = A.remote(ray.put(value) if arg == 5 else value)
    size, pid = ray.get(a.size.remote(), timeout=DEADLOCK)
    os.kill(pid, 9)

    def restarted():
        try:
            return ray.get(a.size.remote(), timeout=DEADLOCK)[1] != pid
        except exceptions.RayActorError:
            return False

    wait_for(restarted, timeout=DEADLOCK)
    assert ray.get(a.size.remote(), timeout=DEADLOCK)[0] == size


def test_cpu_is_taken_back_when_a_get_returns():
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        def quick():
            return 1

        @shmray.remote
        def a():
            shmray.get(quick.remote())
            start = time.time()
            while time.time() - start < 1.5:
                pass
            return start, time.time()

        @shmray.remote
        def b():
            return time.time()

        ra = a.remote()
        time.sleep(0.5)
        (start, end), b_started = shmray.get([ra, b.remote()], timeout=DEADLOCK)
        assert b_started >= end - 0.05  # b waited for the CPU a took back
    finally:
        shmray.shutdown()


def test_a_blocked_task_keeps_its_gpu():
    shmray.init(num_cpus=2, num_gpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        def slow():
            time.sleep(0.8)
            return 1

        @shmray.remote(num_gpus=1)
        def gpu_waits():
            start = time.time()
            shmray.get(slow.remote())
            return start, time.time()

        @shmray.remote(num_gpus=1)
        def gpu_quick():
            return time.time()

        first = gpu_waits.remote()
        time.sleep(0.2)
        (start, end), second = shmray.get([first, gpu_quick.remote()], timeout=DEADLOCK)
        assert second >= end - 0.05
    finally:
        shmray.shutdown()


def test_failed_multi_return_leaves_nothing_in_the_store(ray):
    @ray.remote(num_returns=2)
    def two():
        return np.ones(10**6), threading.Lock()

    a, b = two.remote()
    for ref in (a, b):
        with pytest.raises(TypeError):
            ray.get(ref, timeout=DEADLOCK)
    del a, b
    gc.collect()
    settle()
    wait_for(lambda: runtime().store.list() == [])


def test_num_returns_zero_leaves_no_entry(ray):
    f = ray.remote(lambda: None).options(num_returns=0)
    ray.get(ray.remote(lambda: 0).remote(), timeout=DEADLOCK)
    settle()
    before = runtime().query("objects")
    for _ in range(20):
        assert f.remote() is None
    ray.get(ray.remote(lambda: 0).remote(), timeout=DEADLOCK)  # after the 20 in the same queue
    wait_for(lambda: (settle(), runtime().query("objects"))[1] <= before)


def test_cancel_before_user_code_starts_is_kept(ray):
    def slow_load():
        time.sleep(0.3)
        return "arg"

    class SlowToLoad:
        def __reduce__(self):
            return (slow_load, ())

    @ray.remote
    def long(x):
        time.sleep(2)
        return "finished"

    ray.get(ray.remote(lambda: 0).remote(), timeout=DEADLOCK)
    ref = long.remote(SlowToLoad())
    time.sleep(0.1)
    ray.cancel(ref)
    with pytest.raises(exceptions.TaskCancelledError):
        ray.get(ref, timeout=DEADLOCK)


def test_max_pending_calls_clears_without_a_get(ray):
    @ray.remote(max_pending_calls=2)
    class A:
        def f(self):
            return 1

    a = A.remote()
    a.f.remote()
    a.f.remote()
    time.sleep(1.5)  # both done by now, though nobody read their results
    a.f.remote()


def test_an_actor_serves_calls_made_before_its_last_handle_went(ray):
    @ray.remote
    class S:
        def __init__(self, v):
            time.sleep(0.3)  # still starting when the handle goes
            self.v = v

        def m(self):
            return self.v

    s = S.remote(7)
    ref = s.m.remote()
    del s
    assert ray.get(ref, timeout=DEADLOCK) == 7


def test_wait_on_no_refs(ray):
    assert ray.wait([]) == ([], [])
    assert ray.wait([], timeout=0) == ([], [])


def test_exit_actor_ends_a_threaded_actor(ray):
    @ray.remote(max_concurrency=2)
    class T:
        def pid(self):
            return os.getpid()

        def leave(self):
            shmray.actor.exit_actor()

    t = T.remote()
    pid = ray.get(t.pid.remote(), timeout=DEADLOCK)
    t.leave.remote()
    wait_for(lambda: not alive(pid), timeout=10)


def test_init_inside_a_task(ray):
    @ray.remote
    def inside():
        already = shmray.is_initialized()
        shmray.init(ignore_reinit_error=True)
        try:
            shmray.init()
        except RuntimeError as exc:
            return already, str(exc)
        return already, None

    already, error = ray.get(inside.remote(), timeout=DEADLOCK)
    assert already and "inside a task" in error


# -- second review ---------------------------------------------------------------------


def test_shutdown_while_another_thread_puts_does_not_crash():
    """shutdown() once unmapped the arena under a copy running in another thread (SIGSEGV)."""
    shmray.init(num_cpus=1, object_store_memory=150 << 20)
    errors = []
    stop = threading.Event()

    def putter():
        array = np.ones(5 << 20)
        try:
            # no new put once shutdown is under way: like Ray's, it would start a new session
            while not stop.is_set():
                shmray.put(array)
        except Exception as exc:  # StoreClosedError / RaySystemError once shut down
            errors.append(exc)

    thread = threading.Thread(target=putter)
    thread.start()
    time.sleep(0.2)
    stop.set()
    shmray.shutdown()
    thread.join(timeout=DEADLOCK)
    assert not thread.is_alive()
    assert all(isinstance(e, exceptions.RaySystemError) for e in errors)


def test_shutdown_wakes_a_thread_blocked_in_get_with_a_clear_error():
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    outcome = []

    @shmray.remote
    def forever():
        time.sleep(1000)

    ref = forever.remote()

    def getter():
        try:
            shmray.get(ref)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=getter)
    thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    shmray.shutdown()
    thread.join(timeout=DEADLOCK)
    assert time.monotonic() - start < 5
    assert isinstance(outcome[0], exceptions.RaySystemError) and "shut down" in str(outcome[0])


def test_a_failed_restore_can_be_retried(ray):
    refs = [ray.put(np.full(5 << 20, i, dtype=np.float64)) for i in range(5)]  # 200 MiB
    spilled = [r for r in refs if runtime().store.contains(r.binary()) == "spilled"]
    path = runtime().spiller.path(spilled[0].binary())
    os.rename(path, path + ".away")
    with pytest.raises(exceptions.ObjectLostError, match="can't be read back"):
        ray.get(spilled[0], timeout=DEADLOCK)
    os.rename(path + ".away", path)
    assert ray.get(spilled[0], timeout=DEADLOCK)[0] == refs.index(spilled[0])


def test_sys_exit_in_a_task_does_not_exit_the_driver(ray):
    import sys

    @ray.remote
    def quits():
        sys.exit(3)

    with pytest.raises(exceptions.RayTaskError) as info:
        ray.get(quits.remote(), timeout=DEADLOCK)
    assert not isinstance(info.value, SystemExit)


class TwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")
        self.a, self.b = a, b


def test_exception_whose_init_differs_from_its_args_keeps_its_class(ray):
    @ray.remote
    def fails():
        raise TwoArgs(1, 2)

    with pytest.raises(TwoArgs) as info:
        ray.get(fails.remote(), timeout=DEADLOCK)
    assert (info.value.a, info.value.b) == (1, 2)


def test_refs_inside_an_exception_stay_alive(ray):
    @ray.remote
    def fails():
        raise ValueError(shmray.put(np.arange(300_000)), shmray.put("small"))

    with pytest.raises(ValueError) as info:
        ray.get(fails.remote(), timeout=DEADLOCK)
    big, small = info.value.args
    time.sleep(0.2)
    assert ray.get(small, timeout=DEADLOCK) == "small"
    assert ray.get(big, timeout=DEADLOCK).sum() == np.arange(300_000).sum()


def test_nested_failures_keep_the_frames_they_passed(ray):
    @ray.remote
    def innermost():
        raise KeyError("deep")

    @ray.remote
    def middle():
        return shmray.get(innermost.remote())

    with pytest.raises(KeyError) as info:
        ray.get(middle.remote(), timeout=DEADLOCK)
    text = str(info.value)
    assert "innermost" in text and "which reached middle() through get()" in text


# -- third review: conformance with Ray -------------------------------------------------


def test_exit_actor_makes_the_calling_call_raise_and_always_ends(ray):
    @ray.remote
    class E:
        def bye(self):
            shmray.actor.exit_actor()

        def stubborn_bye(self):
            try:
                shmray.actor.exit_actor()
            except SystemExit:
                pass  # user code catching it must not keep the actor alive
            return "still here?"

        def ping(self):
            return 1

    for method in ("bye", "stubborn_bye"):
        e = E.remote()
        with pytest.raises(exceptions.ActorDiedError, match="exit_actor"):
            ray.get(getattr(e, method).remote(), timeout=DEADLOCK)
        with pytest.raises(exceptions.RayActorError):
            ray.get(e.ping.remote(), timeout=DEADLOCK)


def test_arguments_are_checked_where_remote_is_called(ray):
    @ray.remote
    def two(a, b):
        return a + b

    @ray.remote
    class A:
        def __init__(self, x):
            self.x = x

        def add(self, y, *, z=0):
            return self.x + y + z

    with pytest.raises(TypeError, match="two.remote"):
        two.remote(1)
    with pytest.raises(TypeError, match="A.remote"):
        A.remote()
    a = A.remote(1)
    with pytest.raises(TypeError, match="A.add.remote"):
        a.add.remote(1, 2)
    assert ray.get(a.add.remote(1, z=2), timeout=DEADLOCK) == 4


def test_generator_functions_are_refused_clearly():
    with pytest.raises(TypeError, match="generator"):
        @shmray.remote
        def gen():
            yield 1


def test_init_returns_a_context_like_rays():
    with shmray.init(num_cpus=1, object_store_memory=100 << 20) as context:
        assert context["node_ip_address"] == "127.0.0.1"
        assert context.dashboard_url is None and "session_dir" in context.address_info
        assert shmray.is_initialized()
    assert not shmray.is_initialized()


def test_runtime_env_and_max_calls_on_tasks_and_actors(ray):
    @ray.remote(runtime_env={"env_vars": {"SHMRAY_TEST_VAR": "task"}})
    def read_env():
        return os.environ.get("SHMRAY_TEST_VAR")

    @ray.remote
    def plain():
        return os.environ.get("SHMRAY_TEST_VAR")

    assert ray.get(read_env.remote(), timeout=DEADLOCK) == "task"
    assert ray.get(read_env.options(runtime_env={"env_vars": {"SHMRAY_TEST_VAR": "opt"}})
                   .remote(), timeout=DEADLOCK) == "opt"
    assert ray.get([plain.remote() for _ in range(4)], timeout=DEADLOCK) == [None] * 4

    @ray.remote(runtime_env={"env_vars": {"SHMRAY_TEST_VAR": "actor"}})
    class Env:
        def read(self):
            return os.environ.get("SHMRAY_TEST_VAR")

    assert ray.get(Env.remote().read.remote(), timeout=DEADLOCK) == "actor"
    with pytest.raises(ValueError, match="pip"):
        ray.remote(runtime_env={"pip": ["x"]})(lambda: 1)

    @ray.remote(max_calls=1)
    def pid():
        return os.getpid()

    pids = [ray.get(pid.remote(), timeout=DEADLOCK) for _ in range(3)]
    assert len(set(pids)) == 3  # a fresh worker each time


def test_wait_with_timeout_zero_sees_results_arrive(ray):
    """A polling loop of wait(timeout=0) must read what has arrived (it never did)."""
    @ray.remote
    def slow():
        time.sleep(0.2)
        return 1

    ref = slow.remote()
    deadline = time.monotonic() + 10
    while not ray.wait([ref], timeout=0)[0]:
        assert time.monotonic() < deadline, "wait(timeout=0) never saw the result"
        time.sleep(0.01)
    assert ray.get(ref) == 1


def _one_cpu_without_leases():
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    runtime().leasing = False  # every task through the scheduler, sent ahead when short


def _crash_in_a_burst(make, read):
    """Fifty tasks of a short function (so sent ahead, their reports held back), the 26th
    crashing its worker: the indices whose get() raised WorkerCrashedError.  Each other's
    value is ``make(i)``, and ``read`` of it must give back i."""
    _one_cpu_without_leases()
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


def test_tasks_sent_ahead_behind_a_max_calls_task_all_finish():
    _one_cpu_without_leases()
    try:
        @shmray.remote(max_calls=1)
        def retiring():
            return os.getpid()

        @shmray.remote(max_retries=0)
        def f(i):
            return i

        for _ in range(3):
            shmray.get([f.remote(i) for i in range(20)])
            shmray.get([retiring.remote() for _ in range(3)])
        refs = [retiring.remote()] + [f.remote(i) for i in range(20)]
        assert shmray.get(refs[1:], timeout=DEADLOCK) == list(range(20))
    finally:
        shmray.shutdown()


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


def test_cancel_of_a_task_the_scheduler_thinks_is_still_queued_leaks_nothing():
    """Reports of the short tasks before it are held back while a C loop holds the GIL, so
    the scheduler may take the running task for one still sent ahead: its cancel must not
    leave the result it stores when it ends behind (a report nobody wants is dropped)."""
    _one_cpu_without_leases()
    try:
        @shmray.remote
        def nap(t):
            time.sleep(t)

        @shmray.remote
        def crunch(n):  # one C loop: holds the GIL while it runs
            sum(range(n))
            return b"x" * (1 << 20)

        for _ in range(5):  # both known short
            shmray.get([nap.remote(0.001), crunch.remote(10)])
        head, short, long = nap.remote(0.015), nap.remote(0.001), crunch.remote(20_000_000)
        time.sleep(0.1)  # `head` and `short` are done, their reports held; `long` runs
        shmray.cancel(long)
        with pytest.raises(exceptions.TaskCancelledError):
            shmray.get(long, timeout=DEADLOCK)
        assert shmray.get([head, short], timeout=DEADLOCK) == [None, None]
        del head, short, long
        wait_for(lambda: (settle(), runtime().store.statistics().bytes_in_use)[1] == 0,
                 timeout=10)
    finally:
        shmray.shutdown()



# -- owner-fed leases (tasks pipelined onto leased workers) ------------------------------


def _one_cpu():
    shmray.init(num_cpus=1, object_store_memory=100 << 20)


def test_force_cancel_of_a_queued_leased_task_spares_the_one_running():
    """The scheduler killed the worker, and the task running ahead of the cancelled one died
    with it (WorkerCrashedError with max_retries=0)."""
    _one_cpu()
    try:
        @shmray.remote(max_retries=0)
        def work(i, secs):
            time.sleep(secs)
            return i

        learn_short(work, 0, 0)
        running = work.remote("innocent", 1.0)
        queued = [work.remote(i, 0) for i in range(5)]
        time.sleep(0.2)
        shmray.cancel(queued[2], force=True)
        assert shmray.get(running, timeout=DEADLOCK) == "innocent"
        with pytest.raises(exceptions.TaskCancelledError):
            shmray.get(queued[2], timeout=DEADLOCK)
        assert [shmray.get(queued[i], timeout=DEADLOCK) for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    finally:
        shmray.shutdown()


def test_a_cancelled_task_handed_back_by_its_worker_does_not_run(tmp_path):
    """Handed back before the worker read the cancel, it was queued again and ran."""
    ran = tmp_path / "ran"
    _one_cpu()
    try:
        @shmray.remote
        def child():
            return "child"

        @shmray.remote
        def blocker():
            time.sleep(0.5)
            return shmray.get(child.remote())  # waits in get(): hands back what is queued

        @shmray.remote
        def victim(i, mark):
            if mark:
                ran.write_text("x")
            return i

        learn_short(victim, -1, False)
        b = blocker.remote()
        v = victim.remote(7, True)  # queued behind blocker on the one leased worker
        time.sleep(0.1)
        shmray.cancel(v)
        assert shmray.get(b, timeout=DEADLOCK) == "child"
        with pytest.raises(exceptions.TaskCancelledError):
            shmray.get(v, timeout=DEADLOCK)
        assert not ran.exists()
    finally:
        shmray.shutdown()


def test_a_task_waiting_for_a_resource_an_actor_holds_does_not_stop_plain_tasks():
    """While it waited in the scheduler's queue, no lease was granted: plain tasks, which
    run on leases, never ran though both CPUs were free."""
    shmray.init(num_cpus=2, resources={"R": 1}, object_store_memory=100 << 20)
    try:
        @shmray.remote(num_cpus=0, resources={"R": 1})
        class Holder:
            def ping(self):
                return "held"

        @shmray.remote(resources={"R": 1})
        def needs_r():
            return "got R"

        @shmray.remote
        def plain(i):
            return i

        holder = Holder.remote()
        assert shmray.get(holder.ping.remote(), timeout=DEADLOCK) == "held"
        waiting = needs_r.remote()  # until the actor goes
        time.sleep(0.2)
        assert sum(shmray.get([plain.remote(i) for i in range(10)], timeout=DEADLOCK)) == 45
        shmray.kill(holder)
        assert shmray.get(waiting, timeout=DEADLOCK) == "got R"
    finally:
        shmray.shutdown()


def test_a_leased_task_waiting_in_get_lends_its_cpu_to_the_drivers_tasks():
    """One CPU: the leased task waits for a flag the driver sets once its plain tasks are
    done; the driver asked for no other worker, and both waited for ever."""
    _one_cpu()
    try:
        @shmray.remote(num_cpus=0)
        class Flag:
            def __init__(self):
                self.value = False

            def set(self):
                self.value = True

            def get(self):
                return self.value

        @shmray.remote
        def waiter():
            flag = shmray.get_actor("flag")
            while not shmray.get(flag.get.remote()):
                time.sleep(0.01)
            return "flag seen"

        @shmray.remote
        def plain(i):
            return i

        flag = Flag.options(name="flag").remote()
        shmray.get(flag.get.remote(), timeout=DEADLOCK)
        w = waiter.remote()
        time.sleep(0.3)
        assert sum(shmray.get([plain.remote(i) for i in range(10)], timeout=DEADLOCK)) == 45
        flag.set.remote()
        assert shmray.get(w, timeout=DEADLOCK) == "flag seen"
    finally:
        shmray.shutdown()


def test_short_tasks_do_not_queue_behind_a_long_one(ray):
    """They were sent to the long task's worker (only their own function's run time was
    looked at) and waited for it, the other CPU idle."""
    @ray.remote
    def short(i):
        return i

    @ray.remote
    def long_one():
        time.sleep(3)
        return "long"

    assert ray.get(long_one.remote(), timeout=DEADLOCK) == "long"  # known to be long
    learn_short(short, 0)
    started = time.monotonic()
    slow = long_one.remote()
    assert ray.get([short.remote(i) for i in range(200)], timeout=DEADLOCK) == list(range(200))
    assert time.monotonic() - started < 2.0
    assert ray.get(slow, timeout=DEADLOCK) == "long"


def test_a_force_cancel_as_a_leased_task_starts_still_stops_it():
    """The scheduler saw the slot not yet naming the task, did not kill, and its SIGINT
    came before the worker named the task: the task ran to the end."""
    import random

    _one_cpu()
    try:
        @shmray.remote(max_retries=0)
        def long_one(i):
            time.sleep(1.0)
            return "ran to the end"

        for i in range(150):  # the window is narrow: it was hit about once in 150
            ref = long_one.remote(i)
            end = time.perf_counter() + random.uniform(0, 150e-6)
            while time.perf_counter() < end:
                pass
            shmray.cancel(ref, force=True)
            with pytest.raises((exceptions.TaskCancelledError, exceptions.WorkerCrashedError)):
                shmray.get(ref, timeout=DEADLOCK)
    finally:
        shmray.shutdown()


def test_a_blocked_leased_tasks_lent_cpu_is_not_counted_twice():
    """A task needing both CPUs (one held by an actor) looked placeable if the leases came
    back, counting the CPU a waiting leased task had lent already: no lease was granted,
    and plain tasks never ran though a CPU was free."""
    shmray.init(num_cpus=2, object_store_memory=100 << 20)
    try:
        @shmray.remote(num_cpus=1)
        class Holder:
            def ping(self):
                return "held"

        @shmray.remote(num_cpus=0, max_concurrency=2)
        class Flag:
            def __init__(self):
                self.event = threading.Event()

            def set(self):
                self.event.set()

            def wait(self):
                return self.event.wait(DEADLOCK)

        @shmray.remote
        def waiter():
            assert shmray.get(shmray.get_actor("flag").wait.remote())
            return "flag seen"

        @shmray.remote(num_cpus=2)
        def big():
            return "big"

        @shmray.remote
        def plain(i):
            return i

        holder = Holder.remote()
        shmray.get(holder.ping.remote(), timeout=DEADLOCK)
        flag = Flag.options(name="flag").remote()
        w = waiter.remote()
        time.sleep(0.3)
        b = big.remote()  # waits for the holder to go
        time.sleep(0.3)
        assert sum(shmray.get([plain.remote(i) for i in range(10)], timeout=DEADLOCK)) == 45
        flag.set.remote()
        assert shmray.get(w, timeout=DEADLOCK) == "flag seen"
        shmray.kill(holder)
        assert shmray.get(b, timeout=DEADLOCK) == "big"
    finally:
        shmray.shutdown()


def test_actor_calls_go_out_while_the_program_keeps_submitting(ray):
    """Calls waiting for their channel's next frame stayed unsent as long as tasks were
    submitted less than a millisecond apart (the flusher kept off)."""
    @ray.remote(num_cpus=0)
    class Clock:
        def now(self, i):
            return time.monotonic()

    @ray.remote
    def plain(i):
        return i

    clock = Clock.remote()
    for _ in range(5):
        ray.get(clock.now.remote(-1), timeout=DEADLOCK)  # its direct channel is open
    for _ in range(3):
        time.sleep(0.1)
        sent = time.monotonic()
        calls = [clock.now.remote(i) for i in range(3)]  # the last wait for the next frame
        refs = []
        while time.monotonic() - sent < 1.0:
            refs.append(plain.remote(0))
            time.sleep(0.0002)
        assert max(ray.get(calls, timeout=DEADLOCK)) - sent < 0.1  # was 0.15-0.36 s
        ray.get(refs, timeout=DEADLOCK)


@pytest.mark.parametrize("num_cpus", [0.5, 1.0])
def test_a_cancel_right_after_submit_stops_the_task(ray, num_cpus):
    """Through the scheduler (num_cpus=0.5) the task was taken for started before its worker
    had named it: the SIGINT came too early, was ignored, and the task ran to the end."""
    import random

    @ray.remote(num_cpus=num_cpus, max_retries=0)
    def long_one(i):
        time.sleep(0.3)
        return "ran to the end"

    ray.get([long_one.remote(-1), long_one.remote(-2)], timeout=DEADLOCK)
    for i in range(60):
        ref = long_one.remote(i)
        end = time.perf_counter() + random.uniform(0, 400e-6)
        while time.perf_counter() < end:
            pass
        ray.cancel(ref)
        with pytest.raises(exceptions.TaskCancelledError):
            ray.get(ref, timeout=DEADLOCK)


def test_cancelling_a_running_leased_task_then_those_queued_behind_it(ray):
    """Each cancel named its task as the SIGINT's target; the later ones (queued tasks)
    overwrote the first before the worker read it, and the running task ran to the end."""
    for trial in range(3):
        @ray.remote(max_retries=0)
        def work(seconds, trial=trial):  # a new function each trial
            time.sleep(seconds)
            return "ran to the end"

        learn_short(work, 0)
        running = work.remote(1.0)
        queued = [work.remote(0.0005) for _ in range(30)]
        time.sleep(0.05)
        ray.cancel(running)
        for ref in queued:
            ray.cancel(ref)
        with pytest.raises(exceptions.TaskCancelledError):
            ray.get(running, timeout=DEADLOCK)
        for ref in queued:
            try:
                ray.get(ref, timeout=DEADLOCK)
            except exceptions.TaskCancelledError:
                pass


def test_a_cancel_that_lands_while_a_task_is_inside_shmray_waits_until_it_is_out():
    """The KeyboardInterrupt came in the middle of writing a message to the scheduler: the
    frame was cut, the scheduler found it unreadable and killed the worker."""
    shmray.init(num_cpus=2, resources={"R": 1}, object_store_memory=100 << 20)
    try:
        @shmray.remote(num_cpus=0, resources={"R": 1})
        class Holder:
            def ping(self):
                return 1

        @shmray.remote(resources={"R": 1})
        def child(i, pad):
            return i

        @shmray.remote(max_retries=0)
        def parent():
            pad = b"x" * 90_000  # each submission a 90 KB message: mostly inside send()
            refs = []
            while True:
                refs.append(child.remote(len(refs), pad))

        holder = Holder.remote()
        shmray.get(holder.ping.remote(), timeout=DEADLOCK)
        workers = set(runtime().query("workers"))
        for _ in range(3):
            p = parent.remote()
            time.sleep(0.4)
            shmray.cancel(p, recursive=True)
            with pytest.raises(exceptions.TaskCancelledError):
                shmray.get(p, timeout=DEADLOCK)
        assert set(runtime().query("workers")) == workers  # none killed (and replaced)
    finally:
        shmray.shutdown()
