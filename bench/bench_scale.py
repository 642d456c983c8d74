"""Cost per item as work grows: each path at 1k, 10k and 100k items, per-item microseconds
in extra_info (``us_per_item``); a path whose cost per item grows with n is a bug.

Run: python -m pytest bench/bench_scale.py --benchmark-enable --benchmark-only
     --benchmark-columns=median --benchmark-sort=name

Paths (each a group; compare the sizes within it):
- scale-tasks: n no-op tasks submitted, then one get of all their refs.
- scale-objects: n small objects put, all got, all freed (the scheduler has let them go).
- scale-wait: one wait for n refs, all ready.
- scale-chain: a chain of n tasks, each taking the previous one's ref.
- scale-actors: n actors created, each called once, then dropped (processes: 100 and 1,000;
  a process costs milliseconds to fork, so 100k would be minutes, and would not say more).

With ``--benchmark-disable`` (the test suite's smoke run) only the smallest size runs.
"""

import gc

import pytest

import shmray
from benchstats import median

SIZES = [1_000, 10_000, 100_000]
ACTOR_SIZES = [100, 1_000]


@pytest.fixture(scope="module")
def ray():
    shmray.init(num_cpus=2, object_store_memory=1 << 30)
    yield shmray
    shmray.shutdown()


@shmray.remote
def noop(x=None):
    return x


@shmray.remote(num_cpus=0)
class Tiny:
    def ping(self):
        return 1


def _tasks(n):
    assert len(shmray.get([noop.remote() for _ in range(n)], timeout=600)) == n


def _objects(n):
    refs = [shmray.put(i) for i in range(n)]
    assert shmray.get(refs, timeout=600)[-1] == n - 1
    del refs
    shmray._context.runtime.settle()


def _chain(n):
    ref = noop.remote(0)
    for _ in range(n - 1):
        ref = noop.remote(ref)
    assert shmray.get(ref, timeout=600) == 0


def _actors(n):
    actors = [Tiny.remote() for _ in range(n)]
    assert sum(shmray.get([a.ping.remote() for a in actors], timeout=600)) == n
    del actors


def _smallest_only_in_a_smoke_run(benchmark, n, sizes):
    if benchmark.disabled and n != sizes[0]:
        pytest.skip("a smoke run takes the smallest size only")


def _run(benchmark, work, n, sizes):
    _smallest_only_in_a_smoke_run(benchmark, n, sizes)
    gc.collect()
    benchmark.pedantic(work, args=(n,), rounds=3 if n < sizes[-1] else 1, iterations=1)
    seconds = median(benchmark)
    if seconds:
        benchmark.extra_info["us_per_item"] = round(seconds / n * 1e6, 2)


@pytest.mark.parametrize("n", SIZES)
def test_tasks(benchmark, ray, n):
    benchmark.group = "scale-tasks"
    _run(benchmark, _tasks, n, SIZES)


@pytest.mark.parametrize("n", SIZES)
def test_objects(benchmark, ray, n):
    benchmark.group = "scale-objects"
    _run(benchmark, _objects, n, SIZES)


@pytest.mark.parametrize("n", SIZES)
def test_wait(benchmark, ray, n):
    benchmark.group = "scale-wait"
    _smallest_only_in_a_smoke_run(benchmark, n, SIZES)
    refs = [noop.remote() for _ in range(n)]
    shmray.get(refs, timeout=600)

    def wait_all(n):
        ready, _ = shmray.wait(refs, num_returns=n, timeout=600)
        assert len(ready) == n

    _run(benchmark, wait_all, n, SIZES)


@pytest.mark.parametrize("n", SIZES)
def test_chain(benchmark, ray, n):
    benchmark.group = "scale-chain"
    _run(benchmark, _chain, n, SIZES)


@pytest.mark.parametrize("n", ACTOR_SIZES)
def test_actors(benchmark, ray, n):
    benchmark.group = "scale-actors"
    _run(benchmark, _actors, n, ACTOR_SIZES)
