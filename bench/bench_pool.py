"""shmray.util.multiprocessing.Pool and shmray.util.ProcessPoolExecutor against
multiprocessing.Pool(2) and concurrent.futures.ProcessPoolExecutor(2), in the same run.

Run: python -m pytest bench/bench_pool.py --benchmark-enable --benchmark-only

Groups (compare within a group; each pool is started once, outside the timings):
- map-tiny-10000: ``pool.map(f, range(10_000))`` of a function returning its argument, with
  the default chunksize (both chunk alike: about four chunks per worker, one task each).
- map-16MiB: ``pool.map(f, arrays)`` over eight float64 arrays of 16 MiB, ``f`` returning a
  new 16 MiB array (``a * 2``).  multiprocessing pickles each array through a pipe both
  ways; shmray puts each into the store (one copy) and returns results through it.
- executor-submit-1000: 1,000 ``submit`` of a no-op, then every ``result()``.

The shmray cases record their speedup over the reference measured before them in the same
run (``extra_info["speedup"]``).
"""

import concurrent.futures
import multiprocessing

import numpy as np
import pytest

import shmray
from shmray.util import ProcessPoolExecutor
from shmray.util.multiprocessing import Pool
from benchstats import median, record_speedup

MiB = 1 << 20
ARRAY_N = 16 * MiB // 8
_medians = {}


def _same(x):
    return x


def _double(array):
    return array * 2


@pytest.fixture(scope="module")
def session():
    shmray.init(num_cpus=2, object_store_memory=1024 * MiB)
    yield
    shmray.shutdown()


@pytest.fixture(scope="module")
def mp_pool():
    pool = multiprocessing.get_context("fork").Pool(2)
    pool.map(_same, range(4))
    yield pool
    pool.terminate()
    pool.join()


@pytest.fixture(scope="module")
def shmray_pool(session):
    pool = Pool(2)
    pool.map(_same, range(4))
    yield pool
    pool.terminate()
    pool.join()


@pytest.fixture(scope="module")
def arrays():
    return [np.full(ARRAY_N, float(i)) for i in range(8)]


def _record(benchmark, group: str, side: str) -> None:
    _medians[(group, side)] = median(benchmark)
    if side == "shmray":
        record_speedup(benchmark, "speedup", _medians.get((group, "reference")))


@pytest.mark.benchmark(group="map-tiny-10000")
def test_map_tiny_multiprocessing(benchmark, mp_pool):
    result = benchmark(mp_pool.map, _same, range(10_000))
    assert result[-1] == 9_999
    _record(benchmark, "map-tiny", "reference")


@pytest.mark.benchmark(group="map-tiny-10000")
def test_map_tiny_shmray(benchmark, shmray_pool):
    result = benchmark(shmray_pool.map, _same, range(10_000))
    assert result[-1] == 9_999
    _record(benchmark, "map-tiny", "shmray")


@pytest.mark.benchmark(group="map-16MiB")
def test_map_arrays_multiprocessing(benchmark, mp_pool, arrays):
    result = benchmark.pedantic(mp_pool.map, (_double, arrays), rounds=10, warmup_rounds=3)
    assert float(result[7][0]) == 14.0
    _record(benchmark, "map-16MiB", "reference")


@pytest.mark.benchmark(group="map-16MiB")
def test_map_arrays_shmray(benchmark, shmray_pool, arrays):
    result = benchmark.pedantic(shmray_pool.map, (_double, arrays), rounds=10, warmup_rounds=3)
    assert float(result[7][0]) == 14.0
    del result
    _record(benchmark, "map-16MiB", "shmray")


def _submit_all(executor):
    return [f.result() for f in [executor.submit(_same, i) for i in range(1000)]]


@pytest.mark.benchmark(group="executor-submit-1000")
def test_executor_submit_concurrent_futures(benchmark):
    with concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context("fork")) as executor:
        _submit_all(executor)
        assert benchmark(_submit_all, executor)[-1] == 999
    _record(benchmark, "executor", "reference")


@pytest.mark.benchmark(group="executor-submit-1000")
def test_executor_submit_shmray(benchmark, session):
    with ProcessPoolExecutor(2) as executor:
        _submit_all(executor)
        assert benchmark(_submit_all, executor)[-1] == 999
    _record(benchmark, "executor", "shmray")
