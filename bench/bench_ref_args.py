"""Tasks whose arguments are refs of other tasks, against plain tasks in the same run.

Run: python -m pytest bench/bench_ref_args.py --benchmark-enable --benchmark-only
     --benchmark-columns=median --benchmark-sort=name

One group, ``ref-arguments``; per-task microseconds in extra_info (``us_per_task``), and
for the two with ref arguments, how many times a plain task's cost (``x_plain``: the goal
is under 2):
- plain: 1,000 no-op tasks submitted, then one get of all their refs (they run on workers
  the driver leases; the scheduler does nothing per task).
- chain: 1,000 no-op tasks, each taking the previous one's ref (the first a number), then a
  get of the last: each waits for the one before it, so nothing runs in parallel.
- tree: a tree reduce of 1,024 values, the results of 1,024 tasks run beforehand (not
  timed): 1,023 two-argument ``add`` tasks, level by level, then a get of the root.

Each round is the whole path, from the first submission to the last value in the driver.
"""

import gc

import pytest

import shmray
from benchstats import median

N = 1_000
LEAVES = 1_024

_medians = {}  # case -> median seconds per task


@pytest.fixture(scope="module")
def ray():
    shmray.init(num_cpus=2, object_store_memory=256 << 20)
    yield shmray
    shmray.shutdown()


@shmray.remote
def noop(x=None):
    return x


@shmray.remote
def add(a, b):
    return a + b


def _plain():
    assert len(shmray.get([noop.remote() for _ in range(N)], timeout=600)) == N


def _chain():
    ref = noop.remote(0)
    for _ in range(N - 1):
        ref = noop.remote(ref)
    assert shmray.get(ref, timeout=600) == 0


def _leaves():
    leaves = [noop.remote(i) for i in range(LEAVES)]
    shmray.get(leaves, timeout=600)
    return (leaves,), {}


def _tree(leaves):
    refs = leaves
    while len(refs) > 1:
        refs = [add.remote(refs[i], refs[i + 1]) for i in range(0, len(refs), 2)]
    assert shmray.get(refs[0], timeout=600) == LEAVES * (LEAVES - 1) // 2


def _record(benchmark, case: str, tasks: int) -> None:
    seconds = median(benchmark)
    if not seconds:
        return
    per_task = _medians[case] = seconds / tasks
    benchmark.extra_info["us_per_task"] = round(per_task * 1e6, 2)
    if case != "plain" and "plain" in _medians:
        benchmark.extra_info["x_plain"] = round(per_task / _medians["plain"], 2)


@pytest.mark.parametrize("case", ["plain", "chain", "tree"])
def test_ref_arguments(benchmark, ray, case):
    benchmark.group = "ref-arguments"
    for _ in range(2):  # warm: workers forked, functions known short everywhere
        _plain()
        _chain()
        _tree(*_leaves()[0])
    gc.collect()
    if case == "tree":
        benchmark.pedantic(_tree, setup=_leaves, rounds=15, iterations=1)
        _record(benchmark, case, LEAVES - 1)
    else:
        benchmark.pedantic(_plain if case == "plain" else _chain, rounds=15, iterations=1)
        _record(benchmark, case, N)
