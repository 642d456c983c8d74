"""joblib ``Parallel`` on shmray against joblib's default backend (loky), in the same run.

Run: python -m pytest bench/bench_joblib.py --benchmark-enable --benchmark-only

Group parallel-8x16MiB: ``Parallel(n_jobs=2)(delayed(transform)(x) for x in arrays)`` over
eight float64 arrays of 16 MiB each, where ``transform`` returns a new 16 MiB array computed
from its input (``x * 2 + 1``); the caller gets the eight results.  Under ``"loky"``
(joblib's default: its workers warm from a first call, inputs over 1 MiB dumped to memmap
files, results pickled back through pipes) and under ``"shmray"`` (inputs put in the arena
once per call and passed as refs, results allocated in the arena by the workers and read
where they lie).  Both on the same two CPUs; the shmray case records its speedup over the
loky case that ran before it (``extra_info["speedup_over_loky"]``).

The module-scoped fixtures start shmray and the loky workers once, outside the timings, and
shut them down at the end.
"""

import numpy as np
import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed  # noqa: E402
from joblib.externals.loky import get_reusable_executor  # noqa: E402

import shmray  # noqa: E402
from shmray.util.joblib import register_shmray  # noqa: E402
from benchstats import median, record_speedup

MiB = 1 << 20
N_ARRAYS = 8
medians: dict = {}


def transform(x):
    return x * 2 + 1


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return [rng.random(16 * MiB // 8) for _ in range(N_ARRAYS)]


def run(backend, arrays):
    with joblib.parallel_backend(backend):
        out = Parallel(n_jobs=2)(delayed(transform)(x) for x in arrays)
    assert len(out) == len(arrays) and out[0].nbytes == 16 * MiB
    return out


@pytest.fixture(scope="module")
def loky(arrays, tmp_path_factory):
    import os

    os.environ["JOBLIB_TEMP_FOLDER"] = str(tmp_path_factory.mktemp("joblib"))
    try:
        run("loky", arrays[:2])  # the workers start outside the timings
        yield "loky"
    finally:
        get_reusable_executor().shutdown(wait=True, kill_workers=True)
        del os.environ["JOBLIB_TEMP_FOLDER"]


@pytest.fixture(scope="module")
def session(arrays):
    register_shmray()
    shmray.init(num_cpus=2, object_store_memory=1024 * MiB)
    try:
        run("shmray", arrays[:2])  # the workers start outside the timings
        yield "shmray"
    finally:
        shmray.shutdown()


def test_parallel_loky(benchmark, loky, arrays):
    benchmark.group = "parallel-8x16MiB"
    out = benchmark.pedantic(run, args=(loky, arrays), rounds=8, iterations=1,
                             warmup_rounds=1)
    np.testing.assert_array_equal(out[3], transform(arrays[3]))
    medians["loky"] = median(benchmark)


def test_parallel_shmray(benchmark, session, arrays):
    benchmark.group = "parallel-8x16MiB"
    out = benchmark.pedantic(run, args=(session, arrays), rounds=8, iterations=1,
                             warmup_rounds=1)
    np.testing.assert_array_equal(out[3], transform(arrays[3]))
    del out
    record_speedup(benchmark, "speedup_over_loky", medians.get("loky"))
