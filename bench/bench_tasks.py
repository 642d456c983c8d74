"""Remote functions against multiprocessing.Pool(2), in the same run.

Run: python -m pytest bench/bench_tasks.py --benchmark-enable --benchmark-only

Groups (compare within a group):
- startup: ``shmray.init(num_cpus=2, object_store_memory=100 MiB)`` + the first task round trip
  + ``shutdown()`` against ``Pool(2)`` + the first ``apply`` + ``close()``/``join()``.  Each round
  starts from nothing, and the teardown is part of the measured work on both sides.
- startup-excl-teardown: the same, but the previous round's ``shutdown()`` / ``close()+join()``
  runs in pedantic's (untimed) setup, so only start + first round trip is measured.
- roundtrip: ``ray.get(f.remote(i))`` of a no-op against ``pool.apply(f, (i,))``.
- throughput-2000: submit 2,000 no-op tasks, then get them all, against 2,000 ``apply_async``
  then ``.get()`` on each.
- matrix-dag: the seed DAG: two ``create_matrix([1000, 1000])`` tasks (np.random.normal) and
  ``multiply_matrices`` (np.dot) on their refs, against the same through the Pool, where the
  arrays travel by pickling (both created by ``apply_async``, then ``apply`` of the multiply with
  the two arrays as arguments).
- large-result: one task that computes a 16 MiB float64 array and returns it, gotten by the
  driver, against ``pool.apply`` of the same function (the array comes back pickled).  shmray
  workers allocate such arrays in the arena, so the result is sealed where it lies (_lend.py).
- matmul-speedup: eight 600x600 @ 600x600 float64 matmuls, as users run them: no
  OPENBLAS_NUM_THREADS or OMP_NUM_THREADS is set anywhere in the run.  shmray's tasks (inputs
  ``put`` beforehand, one CPU each) run with one BLAS thread each (``_threads``); the
  references keep BLAS's default of one thread per core: the eight run serially in the
  driver, and ``pool.starmap`` on the Pool(2), whose two workers then run four BLAS threads
  on two cores and pickle the arrays both ways.  The shmray case records its speedup over
  each reference that ran before it (``extra_info["speedup_over_pool"]``...).  A last case
  measures what two CPUs of this machine allow at all: a ``Pool(2)`` of one BLAS thread per
  worker, whose workers inherited the inputs when forked, computes the eight and returns
  nothing.

The module-scoped fixtures start shmray and the Pool once (outside the timings) and shut them
down at the end.  No case sets a thread variable: each side runs BLAS as its users get it.
"""

import multiprocessing
import os

import numpy as np
import pytest
import threadpoolctl

import shmray
from benchstats import median, record_rate, record_speedup

MiB = 1 << 20
RAY_INIT = dict(num_cpus=2, object_store_memory=512 * MiB)
N_THROUGHPUT = 2000
MATMUL_N = 600
MATMUL_TASKS = 8
LARGE_RESULT_N = (16 << 20) // 8

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_medians = {}  # matmul-speedup: group member -> median seconds


# Plain module-level functions: the Pool pickles them by reference, shmray wraps them.
def _noop(i):
    return i


def _create_matrix(size):
    return np.random.normal(size=size)


def _multiply_matrices(a, b):
    return np.dot(a, b)


def _matmul(a, b):
    return a @ b


def _large_result(n):
    return np.arange(n, dtype=np.float64) * 0.5


def _blas_threads():
    return {info["num_threads"] for info in threadpoolctl.threadpool_info()
            if info["user_api"] == "blas"}


noop = shmray.remote(_noop)
create_matrix = shmray.remote(_create_matrix)
multiply_matrices = shmray.remote(_multiply_matrices)
matmul = shmray.remote(_matmul)
large_result = shmray.remote(_large_result)
blas_threads = shmray.remote(_blas_threads)


def _rate(benchmark, calls):
    record_rate(benchmark, "calls_per_s", calls)


@pytest.fixture(scope="module")
def ray():
    assert not any(name in os.environ for name in THREAD_VARIABLES), "measure as users run"
    shmray.init(**RAY_INIT)
    assert shmray.get(blas_threads.remote()) == {1}  # a one-CPU task: one BLAS thread
    yield shmray
    shmray.shutdown()


@pytest.fixture(scope="module")
def pool():
    p = multiprocessing.Pool(2)
    p.apply(_noop, (0,))
    yield p
    p.close()
    p.join()


# --- startup: these must run while shmray is not initialized ------------------------------

class _NoRuntime:
    """Shut down a runtime left by an earlier test (if any) and restore it afterwards."""

    def __enter__(self):
        self.was = shmray.is_initialized()
        if self.was:
            shmray.shutdown()

    def __exit__(self, *exc):
        if shmray.is_initialized():
            shmray.shutdown()
        if self.was:
            shmray.init(**RAY_INIT)


def _shmray_start():
    shmray.init(num_cpus=2, object_store_memory=100 * MiB)
    assert shmray.get(noop.remote(1)) == 1


def _pool_start():
    p = multiprocessing.Pool(2)
    assert p.apply(_noop, (1,)) == 1
    return p


def _pool_stop(p):
    p.close()
    p.join()


def test_startup_shmray(benchmark):
    benchmark.group = "startup"

    def cycle():
        _shmray_start()
        shmray.shutdown()

    with _NoRuntime():
        benchmark.pedantic(cycle, rounds=8, iterations=1, warmup_rounds=1)


def test_startup_mp_pool(benchmark):
    benchmark.group = "startup"
    benchmark.pedantic(lambda: _pool_stop(_pool_start()), rounds=8, iterations=1,
                       warmup_rounds=1)


def test_startup_excl_teardown_shmray(benchmark):
    benchmark.group = "startup-excl-teardown"

    def teardown_previous():
        if shmray.is_initialized():
            shmray.shutdown()

    with _NoRuntime():
        benchmark.pedantic(_shmray_start, setup=teardown_previous, rounds=8, iterations=1,
                           warmup_rounds=1)


def test_startup_excl_teardown_mp_pool(benchmark):
    benchmark.group = "startup-excl-teardown"
    pools = []

    def teardown_previous():
        while pools:
            _pool_stop(pools.pop())

    def start():
        pools.append(_pool_start())

    try:
        benchmark.pedantic(start, setup=teardown_previous, rounds=8, iterations=1,
                           warmup_rounds=1)
    finally:
        teardown_previous()


# --- roundtrip ---------------------------------------------------------------------------

def test_roundtrip_shmray(benchmark, ray):
    benchmark.group = "roundtrip"
    benchmark(lambda: ray.get(noop.remote(7)))
    _rate(benchmark, 1)


def test_roundtrip_mp_pool(benchmark, pool):
    benchmark.group = "roundtrip"
    benchmark(pool.apply, _noop, (7,))
    _rate(benchmark, 1)


# --- throughput-2000 ---------------------------------------------------------------------

def test_throughput_shmray(benchmark, ray):
    benchmark.group = f"throughput-{N_THROUGHPUT}"

    def run():
        refs = [noop.remote(i) for i in range(N_THROUGHPUT)]
        return ray.get(refs)

    result = benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    assert result == list(range(N_THROUGHPUT))
    _rate(benchmark, N_THROUGHPUT)


def test_throughput_mp_pool(benchmark, pool):
    benchmark.group = f"throughput-{N_THROUGHPUT}"

    def run():
        pending = [pool.apply_async(_noop, (i,)) for i in range(N_THROUGHPUT)]
        return [p.get() for p in pending]

    result = benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    assert result == list(range(N_THROUGHPUT))
    _rate(benchmark, N_THROUGHPUT)


# --- matrix-dag --------------------------------------------------------------------------

def test_matrix_dag_shmray(benchmark, ray):
    benchmark.group = "matrix-dag"

    def dag():
        a = create_matrix.remote([1000, 1000])
        b = create_matrix.remote([1000, 1000])
        return ray.get(multiply_matrices.remote(a, b)).shape

    shape = benchmark.pedantic(dag, rounds=15, iterations=1, warmup_rounds=1)
    assert shape == (1000, 1000)


def test_matrix_dag_mp_pool(benchmark, pool):
    benchmark.group = "matrix-dag"

    def dag():
        a = pool.apply_async(_create_matrix, ([1000, 1000],))
        b = pool.apply_async(_create_matrix, ([1000, 1000],))
        return pool.apply(_multiply_matrices, (a.get(), b.get())).shape

    shape = benchmark.pedantic(dag, rounds=15, iterations=1, warmup_rounds=1)
    assert shape == (1000, 1000)


# --- large-result ------------------------------------------------------------------------

def test_large_result_shmray(benchmark, ray):
    benchmark.group = "large-result-16MiB"
    value = benchmark(lambda: ray.get(large_result.remote(LARGE_RESULT_N)))
    assert value[-1] == (LARGE_RESULT_N - 1) * 0.5


def test_large_result_mp_pool(benchmark, pool):
    benchmark.group = "large-result-16MiB"
    value = benchmark(pool.apply, _large_result, (LARGE_RESULT_N,))
    assert value[-1] == (LARGE_RESULT_N - 1) * 0.5


# --- matmul-speedup ----------------------------------------------------------------------

def _matmul_inputs():
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((MATMUL_N, MATMUL_N)), rng.standard_normal((MATMUL_N, MATMUL_N)))
            for _ in range(MATMUL_TASKS)]


def test_matmul_serial_driver(benchmark):
    benchmark.group = "matmul-speedup"
    inputs = _matmul_inputs()

    def serial():
        return [a @ b for a, b in inputs]

    benchmark.pedantic(serial, rounds=8, iterations=1, warmup_rounds=1)
    _medians["serial"] = median(benchmark)
    _rate(benchmark, MATMUL_TASKS)


def test_matmul_mp_pool(benchmark, pool):
    benchmark.group = "matmul-speedup"
    inputs = _matmul_inputs()
    expected = inputs[0][0] @ inputs[0][1]
    results = benchmark.pedantic(pool.starmap, (_matmul, inputs), {"chunksize": 1},
                                 rounds=8, iterations=1, warmup_rounds=1)
    assert np.allclose(results[0], expected)
    _medians["pool"] = median(benchmark)
    _rate(benchmark, MATMUL_TASKS)


def test_matmul_shmray_tasks(benchmark, ray):
    benchmark.group = "matmul-speedup"
    inputs = _matmul_inputs()
    refs = [(ray.put(a), ray.put(b)) for a, b in inputs]
    expected = inputs[0][0] @ inputs[0][1]

    def parallel():
        return ray.get([matmul.remote(a, b) for a, b in refs])

    results = benchmark.pedantic(parallel, rounds=8, iterations=1, warmup_rounds=1)
    assert np.allclose(results[0], expected)
    del results
    _rate(benchmark, MATMUL_TASKS)
    for reference, seconds in _medians.items():
        record_speedup(benchmark, f"speedup_over_{reference}", seconds)


_inherited = []  # the inputs, set before the ceiling's Pool forks


def _matmul_inherited(index):
    a, b = _inherited[index]
    a @ b


def _one_blas_thread():
    threadpoolctl.threadpool_limits(1, user_api="blas")


def test_matmul_mp_pool_ceiling(benchmark):
    benchmark.group = "matmul-speedup"
    _inherited[:] = _matmul_inputs()
    with multiprocessing.get_context("fork").Pool(2, initializer=_one_blas_thread) as pool:
        pool.map(_matmul_inherited, range(2), chunksize=1)
        benchmark.pedantic(pool.map, (_matmul_inherited, range(MATMUL_TASKS)),
                           {"chunksize": 1}, rounds=8, iterations=1, warmup_rounds=1)
    _inherited.clear()
    _rate(benchmark, MATMUL_TASKS)
