"""Start-up and shut-down: shmray's session against a multiprocessing Pool, in the same run.

Run: python -m pytest bench/bench_startup.py --benchmark-enable --benchmark-only

Groups (compare within a group):
- start-and-first-call: ``shmray.init(num_cpus=2)`` and one task's round trip, with the
  default arena (30% of memory), 1 GiB and 16 GiB (start-up must not depend on the arena's
  size: nothing of it is touched before it is used), against ``multiprocessing.Pool(2)``
  and one ``apply``.
- shut-down: ``shmray.shutdown()`` against ``Pool.terminate()`` + ``join()``.
"""

import multiprocessing

import pytest

import shmray

GiB = 1 << 30
ROUNDS = 15


@shmray.remote
def one():
    return 1


def _one():
    return 1


def _start_shmray(arena):
    shmray.init(num_cpus=2, object_store_memory=arena)
    assert shmray.get(one.remote(), timeout=60) == 1


def _start_pool():
    pool = multiprocessing.get_context("fork").Pool(2)
    assert pool.apply(_one) == 1
    return pool


def _end_pool(pool):
    pool.terminate()
    pool.join()


@pytest.mark.benchmark(group="start-and-first-call")
def test_start_multiprocessing_pool(benchmark):
    pools = []

    def start():
        pools.append(_start_pool())

    def end_previous():
        while pools:
            _end_pool(pools.pop())

    try:
        benchmark.pedantic(start, setup=end_previous, rounds=ROUNDS)
    finally:
        end_previous()


@pytest.mark.benchmark(group="start-and-first-call")
@pytest.mark.parametrize("arena", [None, 1 * GiB, 16 * GiB], ids=["default", "1GiB", "16GiB"])
def test_start_shmray(benchmark, arena):
    def end_previous():
        shmray.shutdown()

    try:
        benchmark.pedantic(_start_shmray, args=(arena,), setup=end_previous, rounds=ROUNDS)
    finally:
        shmray.shutdown()


@pytest.mark.benchmark(group="shut-down")
def test_end_multiprocessing_pool(benchmark):
    pools = []

    def start():
        pools.append(_start_pool())
        return (pools[-1],), {}

    def end(pool):
        pools.remove(pool)
        _end_pool(pool)

    try:
        benchmark.pedantic(end, setup=start, rounds=ROUNDS)
    finally:
        for pool in pools:
            _end_pool(pool)


@pytest.mark.benchmark(group="shut-down")
def test_end_shmray(benchmark):
    try:
        benchmark.pedantic(shmray.shutdown, setup=lambda: _start_shmray(None), rounds=ROUNDS)
    finally:
        shmray.shutdown()
