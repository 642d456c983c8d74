"""shmray.util.ProcessPoolExecutor against concurrent.futures.ProcessPoolExecutor (fork): one
behaviour suite, run on both.  Where shmray differs, the test says so and runs on shmray only."""

import asyncio
import concurrent.futures
import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

import shmray
from shmray.util import ProcessPoolExecutor as ShmrayExecutor

MiB = 1 << 20
DEADLOCK = 60


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def fail(message):
    raise KeyError(message)


def die(code):
    os._exit(code)


def die_on_5(x):
    if x == 5:
        time.sleep(0.05)  # its neighbours in the call have run: they must run again
        os._exit(5)
    return x


def pid_of(_):
    return os.getpid()


_state = None


def set_state(value):
    global _state
    _state = value


def read_state():
    return _state


@pytest.fixture(params=["concurrent.futures", "shmray"])
def make_executor(request):
    shmray_side = request.param == "shmray"
    if shmray_side:
        shmray.init(num_cpus=2, object_store_memory=150 * MiB)
    made = []

    def make(*args, **kwargs):
        if shmray_side:
            executor = ShmrayExecutor(*args, **kwargs)
        else:
            executor = concurrent.futures.ProcessPoolExecutor(
                *args, mp_context=multiprocessing.get_context("fork"), **kwargs)
        made.append(executor)
        return executor

    make.shmray = shmray_side
    try:
        yield make
    finally:
        for executor in made:
            executor.shutdown(wait=True, cancel_futures=True)
        if shmray_side:
            shmray.shutdown()


def test_submit_and_exceptions(make_executor):
    executor = make_executor(2)
    assert executor.submit(add, 2, b=3).result(DEADLOCK) == 5
    future = executor.submit(fail, "nope")
    assert isinstance(future.exception(DEADLOCK), KeyError)
    with pytest.raises(KeyError, match="nope"):
        future.result(DEADLOCK)
    assert future.done() and not future.cancelled()


def test_map_in_order_with_chunksize_and_timeout(make_executor):
    executor = make_executor(2)
    assert list(executor.map(square, range(20))) == [x * x for x in range(20)]
    assert list(executor.map(add, range(10), range(10), chunksize=3)) == list(range(0, 20, 2))
    assert list(executor.map(square, [])) == []
    results = executor.map(sleep_for, [0.0, 1.0], timeout=0.3)
    assert next(results) == 0.0
    with pytest.raises(TimeoutError):
        next(results)


def test_cancel_a_call_still_queued(make_executor):
    executor = make_executor(1)
    futures = [executor.submit(sleep_for, 0.3) for _ in range(5)]
    assert futures[-1].cancel()
    assert futures[-1].cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        futures[-1].result()
    assert futures[0].result(DEADLOCK) == 0.3
    assert not futures[0].cancel()  # done: too late


def test_shutdown_cancel_futures(make_executor):
    executor = make_executor(1)
    futures = [executor.submit(sleep_for, 0.2) for _ in range(6)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert futures[0].result(0) == 0.2
    assert futures[-1].cancelled()
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError):
        executor.submit(square, 1)


def test_context_manager_waits(make_executor):
    with make_executor(2) as executor:
        futures = [executor.submit(sleep_for, 0.05) for _ in range(4)]
    assert all(f.done() and f.result() == 0.05 for f in futures)


def test_wait_and_as_completed(make_executor):
    executor = make_executor(2)
    futures = [executor.submit(sleep_for, s) for s in (0.3, 0.0)]
    done, not_done = concurrent.futures.wait(futures, timeout=DEADLOCK,
                                             return_when=concurrent.futures.FIRST_COMPLETED)
    assert futures[1] in done
    order = [f.result() for f in concurrent.futures.as_completed(futures, timeout=DEADLOCK)]
    assert sorted(order) == [0.0, 0.3]


def test_wrap_future(make_executor):
    executor = make_executor(2)

    async def main():
        futures = [asyncio.wrap_future(executor.submit(square, x)) for x in range(5)]
        return await asyncio.gather(*futures)

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]


def test_initializer(make_executor):
    executor = make_executor(2, initializer=set_state, initargs=("ready",))
    assert [executor.submit(read_state).result(DEADLOCK) for _ in range(4)] == ["ready"] * 4


def test_a_crashed_worker_breaks_its_call(make_executor):
    executor = make_executor(2)
    with pytest.raises(BrokenProcessPool):
        executor.submit(die, 3).result(DEADLOCK)
    if make_executor.shmray:
        # shmray differs: it replaces the worker, where the standard executor is broken
        # for good and refuses every later call.
        assert executor.submit(square, 4).result(DEADLOCK) == 16


def test_a_crash_among_quick_calls_breaks_only_its_own(make_executor):
    """Calls of a quick function share the workers' calls; one killing its worker fails
    alone (shmray); the standard executor is broken for good and fails the rest too."""
    executor = make_executor(2)
    for _ in range(3):  # known quick from now on
        assert [f.result(DEADLOCK) for f in [executor.submit(die_on_5, 1)
                                             for _ in range(100)]] == [1] * 100
    futures = [executor.submit(die_on_5, x) for x in list(range(10)) * 4]
    concurrent.futures.wait(futures, timeout=DEADLOCK)
    broken = [x for x, f in zip(list(range(10)) * 4, futures)
              if isinstance(f.exception(), BrokenProcessPool)]
    if make_executor.shmray:
        assert broken == [5] * 4
        assert [f.result() for x, f in zip(list(range(10)) * 4, futures) if x != 5] == \
            [x for x in list(range(10)) * 4 if x != 5]
    else:
        assert 5 in broken


def test_bad_arguments(make_executor):
    with pytest.raises(ValueError):
        make_executor(0)
    with pytest.raises(TypeError):
        make_executor(1, initializer=3)


def test_max_tasks_per_child(make_executor):
    if not make_executor.shmray:
        pytest.skip("the standard executor refuses max_tasks_per_child with fork")
    executor = make_executor(1, max_tasks_per_child=2)
    pids = [executor.submit(pid_of, i).result(DEADLOCK) for i in range(6)]
    assert len(set(pids)) == 3
