"""shmray.util.multiprocessing.Pool against multiprocessing.Pool (fork): one behaviour suite,
run on both.  Where shmray must differ, the test says so and runs on shmray only."""

import contextlib
import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shmray
from shmray.exceptions import WorkerCrashedError
from shmray.util.multiprocessing import Pool as ShmrayPool

from conftest import dev_shm_files, runtime, settle, shmray_children, wait_for

MiB = 1 << 20
DEADLOCK = 60

# -- functions the workers run (module level: multiprocessing pickles them by name) --------


def square(x):
    return x * x


def add(a, b):
    return a + b


def pid_of(_):
    return os.getpid()


def slow_square(x):
    time.sleep(0.01 * (10 - x))  # later items end first
    return x * x


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def fail_on_3(x):
    if x == 3:
        raise ValueError(f"three is bad: {x}")
    return x


def die_on_2(x):
    if x == 2:
        # Not at once: a result the worker sent just before dying can still be reported
        # lost by the core (the actor's death outrunning its last reply), which is no
        # question of the pool's; the pool is tested on what it is told.
        time.sleep(0.2)
        os._exit(7)
    return x


_state = None


def set_state(value):
    global _state
    _state = value


def read_state(_):
    return _state


def data_address(array, i):
    return array.__array_interface__["data"][0], array.flags.writeable, float(array[0]) + i


def doubled(array):
    return array * 2


# -- the two pools --------------------------------------------------------------------------


@pytest.fixture(params=["multiprocessing", "shmray"])
def make_pool(request):
    shmray_side = request.param == "shmray"
    if shmray_side:
        shmray.init(num_cpus=2, object_store_memory=200 * MiB)
    made = []

    def make(*args, **kwargs):
        pool_class = ShmrayPool if shmray_side else multiprocessing.get_context("fork").Pool
        pool = pool_class(*args, **kwargs)
        made.append(pool)
        return pool

    make.shmray = shmray_side
    try:
        yield make
    finally:
        for pool in made:
            pool.terminate()
            pool.join()
        if shmray_side:
            shmray.shutdown()


@pytest.fixture
def shmray_pool(make_pool):
    if not make_pool.shmray:
        pytest.skip("shmray only")
    return make_pool


def test_map_keeps_input_order_in_chunks_of_chunksize(make_pool):
    pool = make_pool(2)
    assert pool.map(square, range(100)) == [x * x for x in range(100)]
    assert pool.map(square, []) == []
    pids = pool.map(pid_of, range(20), chunksize=5)
    for start in range(0, 20, 5):  # a chunk is one task: one process runs all of it
        assert len(set(pids[start:start + 5])) == 1


def test_map_async_callback_gets_results_in_input_order(make_pool):
    pool = make_pool(2)
    got = []
    result = pool.map_async(slow_square, range(10), chunksize=1, callback=got.append)
    assert result.get(timeout=DEADLOCK) == [x * x for x in range(10)]
    result.wait(DEADLOCK)
    assert got == [[x * x for x in range(10)]]
    assert result.ready() and result.successful()


def test_starmap_and_apply(make_pool):
    pool = make_pool(2)
    assert pool.starmap(add, [(i, 10) for i in range(7)]) == [i + 10 for i in range(7)]
    assert pool.starmap_async(add, [(1, 2)]).get(DEADLOCK) == [3]
    assert pool.apply(add, (2, 3)) == 5
    assert pool.apply(add, (2,), {"b": 4}) == 6
    got = []
    pool.apply_async(square, (9,), callback=got.append).get(DEADLOCK)
    time.sleep(0.01)
    assert got == [81]


def test_errors_arrive_with_their_type_and_error_callback(make_pool):
    pool = make_pool(2)
    with pytest.raises(ValueError, match="three is bad"):
        pool.map(fail_on_3, range(6))
    errors = []
    result = pool.map_async(fail_on_3, range(6), error_callback=errors.append)
    result.wait(DEADLOCK)
    assert result.ready() and not result.successful()
    with pytest.raises(ValueError):
        result.get(DEADLOCK)
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    with pytest.raises(ValueError):
        pool.apply(fail_on_3, (3,))
    assert pool.map(square, [2]) == [4]  # the pool goes on


def test_remote_traceback_names_the_failing_line(make_pool):
    pool = make_pool(2)
    with pytest.raises(ValueError) as info:
        pool.apply(fail_on_3, (3,))
    # multiprocessing chains a RemoteTraceback; shmray puts it in the message, as Ray does
    text = str(info.value) + str(info.value.__cause__)
    assert 'raise ValueError(f"three is bad: {x}")' in text


def test_timeouts_and_not_ready(make_pool):
    pool = make_pool(1)
    result = pool.apply_async(sleep_for, (1.0,))
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.05)
    assert not result.ready()
    with pytest.raises(ValueError):
        result.successful()
    result.wait(0.01)
    assert result.get(DEADLOCK) == 1.0


def test_imap_and_imap_unordered(make_pool):
    pool = make_pool(2)
    assert list(pool.imap(slow_square, range(10))) == [x * x for x in range(10)]
    assert list(pool.imap(square, range(10), chunksize=3)) == [x * x for x in range(10)]
    assert sorted(pool.imap_unordered(slow_square, range(10))) == [x * x for x in range(10)]
    assert list(pool.imap(square, [])) == []
    it = pool.imap(fail_on_3, range(6))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError):
        next(it)
    assert next(it) == 4
    slow = pool.imap(sleep_for, [1.0])
    with pytest.raises(multiprocessing.TimeoutError):
        slow.next(timeout=0.05)
    assert slow.next(timeout=DEADLOCK) == 1.0


def test_initializer_state_is_what_the_function_reads(make_pool):
    pool = make_pool(2, initializer=set_state, initargs=("model",))
    assert pool.map(read_state, range(8), chunksize=1) == ["model"] * 8


_MAIN_SCRIPT = """
import sys
model = None

def load(name):
    global model
    model = {"name": name}

def helper(x):
    return model["name"] + str(x)

def predict(x):
    return helper(x)

if __name__ == "__main__":
    if sys.argv[1] == "shmray":
        import shmray
        from shmray.util.multiprocessing import Pool
        shmray.init(num_cpus=2, object_store_memory=100 << 20)
    else:
        from multiprocessing import Pool
    with Pool(2, initializer=load, initargs=("m",)) as pool:
        print(pool.map(predict, range(4), chunksize=1))
    if sys.argv[1] == "shmray":
        shmray.shutdown()
"""


def test_initializer_state_in_a_main_script(make_pool, tmp_path):
    """Functions of __main__ travel by value: the worker gives them one namespace, so the
    global the initializer sets is the one the function (and its helper) reads."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(_MAIN_SCRIPT))
    kind = "shmray" if make_pool.shmray else "multiprocessing"
    out = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True,
                         timeout=DEADLOCK)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['m0', 'm1', 'm2', 'm3']"


def test_maxtasksperchild_restarts_workers(make_pool):
    pool = make_pool(2, maxtasksperchild=1)
    pids = pool.map(pid_of, range(6), chunksize=1)
    assert len(set(pids)) == 6
    with pytest.raises(ValueError):
        make_pool(2, maxtasksperchild=0)


def test_close_join_terminate(make_pool):
    pool = make_pool(2)
    result = pool.map_async(slow_square, range(6), chunksize=1)
    with pytest.raises(ValueError):
        pool.join()  # still running
    pool.close()
    with pytest.raises(ValueError):
        pool.map(square, [1])
    pool.join()  # waits for the work given before close
    assert result.get(0) == [x * x for x in range(6)]

    other = make_pool(2)
    other.apply_async(sleep_for, (30,))
    other.terminate()
    other.join()
    with pytest.raises(ValueError):
        other.apply(square, (1,))


def test_context_manager_terminates_on_exit(make_pool):
    with make_pool(2) as pool:
        assert pool.map(square, range(3)) == [0, 1, 4]
    with pytest.raises(ValueError):
        pool.map(square, [1])


def test_bad_arguments(make_pool):
    with pytest.raises(ValueError):
        make_pool(0)
    with pytest.raises(TypeError):
        make_pool(1, initializer=3)


# -- where shmray differs ---------------------------------------------------------------------


def test_a_dead_worker_raises_instead_of_hanging(shmray_pool):
    """multiprocessing's Pool waits forever for the task of a worker that died; shmray's
    fails that task with WorkerCrashedError, replaces the worker, and runs the rest."""
    pool = shmray_pool(2)
    with pytest.raises(WorkerCrashedError, match="exit code 7"):
        pool.map(die_on_2, range(4), chunksize=1)
    assert pool.map(square, range(4), chunksize=1) == [0, 1, 4, 9]
    it = pool.imap(die_on_2, range(4))
    assert next(it) == 0 and next(it) == 1
    with pytest.raises(WorkerCrashedError):
        it.next(timeout=DEADLOCK)
    assert it.next(timeout=DEADLOCK) == 3


def test_quick_tasks_streamed_one_by_one_keep_their_own_outcomes(make_pool):
    """Tasks of a quick function share calls (imap, apply_async), yet each still fails or
    succeeds alone, with its own error and traceback."""
    pool = make_pool(2)
    for _ in range(3):  # known quick: from now on its tasks share calls
        assert pool.map(fail_on_3, [0, 1, 2] * 50) == [0, 1, 2] * 50
    it = pool.imap(fail_on_3, [1, 3, 5] * 20)
    for _ in range(20):
        assert next(it) == 1
        with pytest.raises(ValueError, match="three is bad: 3") as info:
            next(it)
        assert 'raise ValueError(f"three is bad: {x}")' in \
            str(info.value) + str(info.value.__cause__)
        assert next(it) == 5
    results = [pool.apply_async(fail_on_3, (x,)) for x in range(6) for _ in range(30)]
    for index, result in enumerate(results):
        if index // 30 == 3:
            with pytest.raises(ValueError, match="three is bad"):
                result.get(DEADLOCK)
        else:
            assert result.get(DEADLOCK) == index // 30
    assert sorted(pool.imap_unordered(fail_on_3, [0, 1, 2] * 30)) == sorted([0, 1, 2] * 30)


def test_a_dead_worker_fails_only_its_task_among_quick_ones(shmray_pool):
    """A worker dying in a call that several quick tasks share: only the task that killed
    it fails (the others run again, each alone, as Ray retries a crashed worker's task)."""
    pool = shmray_pool(2)
    for _ in range(3):  # known quick: its tasks share calls
        assert pool.map(die_on_2, [0, 1] * 50) == [0, 1] * 50
    items = [0, 1, 3, 4, 2, 5, 6, 7, 8, 9] * 2
    it = pool.imap(die_on_2, items)
    for x in items:
        if x == 2:
            with pytest.raises(WorkerCrashedError):
                it.next(timeout=DEADLOCK)
        else:
            assert it.next(timeout=DEADLOCK) == x


def test_an_array_many_items_name_is_stored_once(shmray_pool):
    """multiprocessing pickles the array into every task; shmray puts it in the store once
    and every worker reads the same pages (read-only, as Ray's zero-copy views)."""
    pool = shmray_pool(2)
    array = np.ones(4 * MiB // 8)
    got = pool.starmap(data_address, [(array, i) for i in range(8)], chunksize=1)
    assert len({address for address, _, _ in got}) == 1
    assert [writeable for _, writeable, _ in got] == [False] * 8
    assert [value for _, _, value in got] == [1.0 + i for i in range(8)]


def test_arguments_leave_the_store_when_the_map_ends_without_a_gc(shmray_pool):
    """The arrays a map put in the store are freed once it returns, without waiting for
    Python's cyclic garbage collector: objects held until then push each new map into
    arena pages never touched before, at a page fault per 4 KiB (a map of 8 arrays of
    16 MiB took 4x longer for its first dozen calls)."""
    pool = shmray_pool(2)
    arrays = [np.full(2 * MiB // 8, float(i)) for i in range(4)]
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            assert float(pool.map(doubled, arrays)[3][0]) == 6.0

        def store_empty():
            settle()
            return runtime().store.statistics().num_objects == 0
        wait_for(store_empty, timeout=DEADLOCK)
    finally:
        gc.enable()


def test_large_arrays_round_trip(make_pool):
    pool = make_pool(2)
    arrays = [np.full(2 * MiB // 8, float(i)) for i in range(4)]
    results = pool.map(doubled, arrays)
    assert [float(r[0]) for r in results] == [0.0, 2.0, 4.0, 6.0]
    assert all(r.shape == arrays[0].shape for r in results)


# -- soak: many rounds of everything, nothing left behind ---------------------------------


def fail_on_multiple_of_7(x):
    if x and x % 7 == 0:
        raise KeyError(x)
    return _state, x * x


def pool_workers():
    return [p for p in shmray_children() if "PoolWorker" in " ".join(p.cmdline())]


def _pool_soak(make_pool, rounds: int) -> None:
    """``rounds`` of map, imap, imap_unordered, starmap and apply_async (with callbacks) on
    pools with an initializer and maxtasksperchild (so workers keep being replaced), some
    raising; every result exact, every error the right one, and once the pools are
    closed, terminated or left by ``with``, no worker process and no /dev/shm file left."""
    before_shm = dev_shm_files()
    endings = ["close", "terminate", "with"]
    for number, ending in enumerate(endings):
        tag = f"pool {number}"
        pool = make_pool(2, initializer=set_state, initargs=(tag,), maxtasksperchild=20)
        with (pool if ending == "with" else contextlib.nullcontext()):
            for r in range(rounds):
                n = 20 + r % 13
                assert pool.map(square, range(n)) == [x * x for x in range(n)]
                assert list(pool.imap(square, range(n), chunksize=3)) == \
                    [x * x for x in range(n)]
                assert sorted(pool.imap_unordered(square, range(n))) == \
                    [x * x for x in range(n)]
                assert pool.starmap(add, [(x, r) for x in range(n)], chunksize=4) == \
                    [x + r for x in range(n)]
                got, errors = [], []
                results = [pool.apply_async(fail_on_multiple_of_7, (x,), callback=got.append,
                                            error_callback=errors.append)
                           for x in range(r, r + 8)]
                for x, result in zip(range(r, r + 8), results):
                    if x and x % 7 == 0:
                        with pytest.raises(KeyError):
                            result.get(DEADLOCK)
                    else:
                        assert result.get(DEADLOCK) == (tag, x * x)  # the initializer's state
                for result in results:
                    result.wait(DEADLOCK)  # callbacks run before a result is ready
                assert sorted(v for _, v in got) == \
                    [x * x for x in range(r, r + 8) if not (x and x % 7 == 0)]
                assert len(errors) == 8 - len(got)
                assert all(isinstance(e, KeyError) for e in errors)
                if r % 5 == 4:
                    with pytest.raises(KeyError):
                        pool.map(fail_on_multiple_of_7, range(n), chunksize=2)
            if ending == "close":
                pool.close()
                pool.join()
            elif ending == "terminate":
                pool.terminate()
                pool.join()
        wait_for(lambda: pool_workers() == [], timeout=DEADLOCK)
    assert dev_shm_files() - before_shm == set()


def test_pool_soak_short(shmray_pool):
    _pool_soak(shmray_pool, 3)


@pytest.mark.slow
def test_pool_soak(shmray_pool):
    _pool_soak(shmray_pool, 25)
