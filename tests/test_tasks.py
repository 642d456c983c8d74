"""Remote functions end to end: real scheduler, real workers, real shared memory."""

import asyncio
import concurrent.futures
import gc
import os
import sys
import threading
import time

import numpy as np
import pytest

import shmray
from shmray import exceptions
from conftest import in_both_modes, one_cpu_without_leases, runtime, settle, wait_for

DEADLOCK = 60


# Each test runs with shmray's processes and in local mode (``in_both_modes``).
ray = in_both_modes(2)
ray2 = in_both_modes(2)
ray4 = in_both_modes(4)


# -- the seeds ---------------------------------------------------------------------------


@pytest.mark.processes_only("tasks run one at a time in the driver: nothing runs in parallel")
def test_seed_four_parallel_sleeps(ray4):
    @ray4.remote
    def f(x):
        time.sleep(1)
        return x

    ray4.get(f.remote(-1))  # warm the pool
    start = time.monotonic()
    result_ids = [f.remote(i) for i in range(4)]
    assert ray4.get(result_ids) == [0, 1, 2, 3]
    assert time.monotonic() - start < 2.5  # serial would take 4 s


def test_seed_matrix_dag(ray2):
    @ray2.remote
    def create_matrix(size):
        return np.random.normal(size=size)

    @ray2.remote
    def multiply_matrices(x, y):
        return np.dot(x, y)

    x_id = create_matrix.remote([1000, 1000])
    y_id = create_matrix.remote([1000, 1000])
    z_id = multiply_matrices.remote(x_id, y_id)
    z = ray2.get(z_id)
    np.testing.assert_allclose(z, ray2.get(x_id) @ ray2.get(y_id))
    assert z.shape == (1000, 1000) and not z.flags.writeable


@pytest.mark.processes_only("tasks run one at a time in the driver: nothing runs in parallel")
def test_seed_linear_vs_tree_aggregation(ray4):
    @ray4.remote
    def add(x, y):
        time.sleep(0.3)
        return x + y

    ray4.get(add.remote(0, 0))
    start = time.monotonic()
    values = [1, 2, 3, 4, 5, 6, 7, 8]
    while len(values) > 1:
        values = [add.remote(values[0], values[1])] + values[2:]
    assert ray4.get(values[0]) == 36
    linear = time.monotonic() - start

    start = time.monotonic()
    values = [1, 2, 3, 4, 5, 6, 7, 8]
    while len(values) > 1:
        values = values[2:] + [add.remote(values[0], values[1])]
    assert ray4.get(values[0]) == 36
    tree = time.monotonic() - start
    assert linear >= 7 * 0.3 - 0.05  # 7 steps, one after another
    assert tree < linear * 0.75      # 3 steps


# -- remote functions --------------------------------------------------------------------


def test_direct_call_names_remote(ray2):
    @ray2.remote
    def f():
        return 1

    with pytest.raises(TypeError, match=r"f\.remote\(\)"):
        f()


def test_unknown_option_raises_at_decoration():
    with pytest.raises(ValueError, match="num_cpu"):
        @shmray.remote(num_cpu=1)
        def f():
            return 1
    with pytest.raises(TypeError, match="The type of keyword 'max_retries'"):
        shmray.remote(max_retries="x")(lambda: 1)


def test_options_and_multiple_returns(ray2):
    @ray2.remote(num_returns=2)
    def pair(a, b=10):
        return a, b

    x, y = pair.remote(1, b=2)
    assert ray2.get([x, y]) == [1, 2]
    three = ray2.remote(lambda: (1, 2, 3)).options(num_returns=3).remote()
    assert ray2.get(three) == [1, 2, 3]
    assert ray2.remote(lambda: None).options(num_returns=0).remote() is None


def test_wrong_number_of_returns_is_an_error(ray2):
    @ray2.remote(num_returns=2)
    def one():
        return 1

    a, b = one.remote()
    with pytest.raises(ValueError, match="num_returns=2"):
        ray2.get(a)


def test_closures_lambdas_and_main_classes(ray2):
    factor = 3

    class Point:
        def __init__(self, x):
            self.x = x

    @ray2.remote
    def scale(p):
        return Point(p.x * factor)

    assert ray2.get(scale.remote(Point(2))).x == 6
    assert ray2.get(ray2.remote(lambda v: v + 1).remote(1)) == 2


def test_top_level_refs_resolve_nested_refs_stay_refs(ray2):
    @ray2.remote
    def inspect_args(top, nested, kw=None):
        return (type(top).__name__, type(nested[0]).__name__, shmray.get(nested[0]),
                type(kw).__name__)

    ref = ray2.put(41)
    assert ray2.get(inspect_args.remote(ref, [ref], kw=ref)) == ("int", "ObjectRef", 41, "int")


def test_large_arrays_reach_tasks_zero_copy(ray2):
    @ray2.remote
    def describe(a):
        return a.flags.writeable, a.flags.owndata, float(a.sum())

    big = np.ones(2_000_000)
    writeable, owndata, total = ray2.get(describe.remote(ray2.put(big)))
    assert (writeable, owndata, total) == (False, False, 2_000_000.0)
    # a large array passed by value is put into the store for the task, as in Ray
    assert ray2.get(describe.remote(big)) == (False, False, 2_000_000.0)


def test_resources_are_accounted(ray2):
    assert ray2.cluster_resources()["CPU"] == 2

    @ray2.remote(num_cpus=2)
    def whole_machine():
        return shmray.available_resources().get("CPU", 0)

    assert ray2.get(whole_machine.remote()) == 0

    @ray2.remote(num_cpus=3)
    def too_big():
        return 1

    with pytest.raises(exceptions.TaskUnschedulableError, match="num_cpus"):
        ray2.get(too_big.remote(), timeout=30)


def test_custom_resources_limit_concurrency():
    shmray.init(num_cpus=2, resources={"slot": 1}, object_store_memory=100 << 20)
    try:
        @shmray.remote(resources={"slot": 1})
        def hold():
            time.sleep(0.4)
            return time.monotonic()

        ends = sorted(shmray.get([hold.remote(), hold.remote()]))
        assert ends[1] - ends[0] >= 0.35  # one after the other
    finally:
        shmray.shutdown()


# -- nested tasks ------------------------------------------------------------------------


def test_nested_fib_on_two_cpus(ray2):
    @ray2.remote
    def fib(n):
        if n < 2:
            return n
        return sum(shmray.get([fib.remote(n - 1), fib.remote(n - 2)]))

    assert ray2.get(fib.remote(7), timeout=120) == 13


def test_task_submits_and_waits(ray2):
    @ray2.remote
    def leaf(i):
        return i * i

    @ray2.remote
    def parent(n):
        refs = [leaf.remote(i) for i in range(n)]
        ready, rest = shmray.wait(refs, num_returns=n, timeout=60)
        return sum(shmray.get(ready)), len(rest)

    assert ray2.get(parent.remote(5)) == (30, 0)


# -- get, wait, futures ------------------------------------------------------------------


@pytest.mark.processes_only(
    "a task has run to its end when .remote() returns: get() has nothing to time out")
def test_get_timeout(ray2):
    @ray2.remote
    def slow():
        time.sleep(5)

    with pytest.raises(exceptions.GetTimeoutError):
        ray2.get(slow.remote(), timeout=0.2)
    assert issubclass(exceptions.GetTimeoutError, TimeoutError)


@pytest.mark.processes_only("a task has run to its end when .remote() returns: every ref is ready")
def test_wait_returns_ready_in_input_order(ray2):
    @ray2.remote
    def sleep_then(t):
        time.sleep(t)
        return t

    refs = [sleep_then.remote(t) for t in (2.0, 0.0, 0.0)]
    ready, not_ready = ray2.wait(refs, num_returns=2, timeout=30)
    assert ready == refs[1:] and not_ready == refs[:1]
    ready, not_ready = ray2.wait(refs, num_returns=3, timeout=0.01)
    assert len(ready) + len(not_ready) == 3
    with pytest.raises(ValueError):
        ray2.wait(refs, num_returns=4)
    with pytest.raises(TypeError):
        ray2.wait(refs[0])


def test_futures(ray2):
    @ray2.remote
    def some_task():
        return 1

    futs = [some_task.remote().future() for _ in range(4)]
    assert [f.result(timeout=30) for f in concurrent.futures.as_completed(futs)] == [1] * 4

    async def await_obj_ref():
        assert await some_task.remote() == 1
        if sys.version_info < (3, 11):  # the seed: asyncio.wait takes awaitables before 3.11
            done, pending = await asyncio.wait([some_task.remote()])
            assert [d.result() for d in done] == [1] and not pending
        fut = asyncio.wrap_future(some_task.remote().future())
        assert await fut == 1
        return await asyncio.gather(*[some_task.remote() for _ in range(3)])

    assert asyncio.run(await_obj_ref()) == [1, 1, 1]


def test_future_of_a_failing_task_raises(ray2):
    @ray2.remote
    def boom():
        raise KeyError("nope")

    with pytest.raises(KeyError):
        boom.remote().future().result(timeout=30)


# -- errors ------------------------------------------------------------------------------


def test_task_error_is_both_classes_with_remote_traceback(ray2):
    @ray2.remote
    def divide(a, b):
        return a / b

    with pytest.raises(ZeroDivisionError) as info:
        ray2.get(divide.remote(1, 0))
    err = info.value
    assert isinstance(err, exceptions.RayTaskError)
    assert str(err).startswith("ray::divide() (pid=") and "a / b" in str(err)


def test_error_propagates_through_a_dag(ray2):
    @ray2.remote
    def fail():
        raise ValueError("root cause")

    @ray2.remote
    def add_one(x):
        return x + 1

    ref = fail.remote()
    for _ in range(3):
        ref = add_one.remote(ref)
    with pytest.raises(ValueError, match="root cause") as info:
        ray2.get(ref)
    assert "fail" in str(info.value)


def test_unpicklable_argument_raises_at_submit(ray2):
    import threading

    @ray2.remote
    def f(x):
        return x

    with pytest.raises(TypeError, match="Could not serialize the argument <unlocked") as info:
        f.remote(threading.Lock())
    assert "lock" in str(info.value).lower()


# -- lifetime ----------------------------------------------------------------------------


@pytest.mark.processes_only(
    "counts the arena's bytes; local mode has no arena (test_local_mode checks its objects "
    "go)")
def test_objects_are_freed_when_no_ref_remains(ray2):
    store = shmray._context.runtime.store

    @ray2.remote
    def make(n):
        return np.ones(n)

    @ray2.remote
    def total(a):
        return float(a.sum())

    start = store.statistics().bytes_in_use
    for _ in range(3):
        refs = [make.remote(200_000) for _ in range(10)]
        sums = ray2.get([total.remote(r) for r in refs])
        assert sums == [200_000.0] * 10
        nested = ray2.put([refs[0]])
        del refs
        assert ray2.get(ray2.get(nested)[0]).sum() == 200_000
        del nested
    gc.collect()
    deadline = time.monotonic() + 10
    while store.statistics().bytes_in_use != start and time.monotonic() < deadline:
        shmray._context.runtime.flush()
        time.sleep(0.05)
    assert store.statistics().bytes_in_use == start


def test_referenced_objects_survive_their_creator_task(ray2):
    @ray2.remote
    def make_inner():
        return [shmray.put(np.arange(300_000))]

    (inner,) = ray2.get(make_inner.remote())
    time.sleep(0.2)  # let the worker's releases arrive
    assert ray2.get(inner).sum() == np.arange(300_000).sum()


# -- introspection -----------------------------------------------------------------------


@pytest.mark.processes_only("a task's worker is the driver in local mode")
def test_runtime_context_and_nodes(ray2):
    @ray2.remote
    def context():
        ctx = shmray.get_runtime_context()
        return ctx.get_task_id(), ctx.get_job_id(), ctx.get_worker_id()

    task_id, job_id, worker_id = ray2.get(context.remote())
    assert task_id and len(task_id) == 48
    assert job_id == ray2.get_runtime_context().get_job_id()
    assert worker_id != ray2.get_runtime_context().get_worker_id()
    assert ray2.get_runtime_context().get_task_id() is None
    (node,) = ray2.nodes()
    assert node["Alive"] and node["Resources"]["CPU"] == 2


def test_nested_task_of_the_same_function_onone_cpu():
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


@pytest.mark.processes_only("looks into the arena; local mode has none")
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


@pytest.mark.processes_only("max_calls starts a fresh worker process; local mode has none")
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


def test_tasks_sent_ahead_behind_a_max_calls_task_all_finish():
    one_cpu_without_leases()
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
