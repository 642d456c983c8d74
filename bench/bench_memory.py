"""Idle memory: a session's processes against a multiprocessing Pool's, in the same run.

Run: python -m pytest bench/bench_memory.py --benchmark-enable --benchmark-only -s

Memory is not time, so the benchmark timer measures only how long reading the figures takes;
the figures are in extra_info (and printed with ``-s``), in MiB of PSS (proportional set
size: each shared page split among the processes sharing it, so the sums add up to what the
processes cost the machine together) and USS (pages of that process alone):

- mp-pool: ``multiprocessing.Pool(2)``'s two workers, after one ``apply`` each.
- shmray-session: the scheduler and two workers of ``init(num_cpus=2)``, after ten tasks.
- shmray-actor: one actor process, after one call.
- shmray-actor-forker: the process that forks actors (``_spawner``), once per session that
  has any: what the first actor costs beside its own process.
- driver: the driving process itself (shmray's imports included).

Where a session's extra PSS is (pages told apart by physical frame, this file run alone):
its three processes split the driver's pages four ways where the Pool's two split them
three ways (25 MiB against 21 for the same pages), and each keeps 3.2-4.1 MiB of its own
against a Pool worker's 2.1.  Those are pages of objects it inherited and touched: CPython
3.11 writes to each object it uses (reference counts, quickened bytecode), and a worker runs
more code than the Pool's loop; what it allocates after the fork is ~40 KiB (tracemalloc).
The larger the driver, the closer the ratio comes to 3/4 over 2/3 (1.125x).
"""

import multiprocessing
import os
import time

import psutil
import pytest

import shmray

MiB = 1 << 20
SETTLE = 0.5  # let freshly forked processes finish their start before measuring


def _footprint(pids):
    pss = uss = 0
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        pss, uss = pss + info.pss, uss + info.uss
    return round(pss / MiB, 1), round(uss / MiB, 1)


_pool_pss: list = []  # the reference's PSS, once test_mp_pool_workers has run


def _record(benchmark, name, pids, pool_workers: int = 0):
    """Record the figures, and their ratio to ``pool_workers`` of the Pool's workers (2 for
    a session, 1 for an actor) when the reference ran first in this run."""
    pss, uss = benchmark.pedantic(_footprint, args=(pids,), rounds=1, iterations=1)
    benchmark.extra_info.update({"processes": len(pids), "pss_mib": pss, "uss_mib": uss})
    against = ""
    if pool_workers and _pool_pss:
        ratio = pss / (_pool_pss[0] * pool_workers / 2)
        benchmark.extra_info["pss_vs_pool"] = round(ratio, 2)
        against = f", {ratio:.2f}x the PSS of {pool_workers} Pool worker(s)"
    print(f"\n{name}: {len(pids)} processes, PSS {pss} MiB, USS {uss} MiB{against}")
    return pss


def _one():
    return 1


@shmray.remote
def one():
    return 1


@shmray.remote
class Idle:
    def ping(self):
        return 1


def _children() -> set:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.mark.benchmark(group="idle-memory")
def test_mp_pool_workers(benchmark):
    others = _children()  # in a run of all of bench/, other modules' pools may live on
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.apply(_one) == 1 and pool.apply(_one) == 1
        time.sleep(SETTLE)
        workers = sorted(_children() - others)
        _pool_pss[:] = [_record(benchmark, "mp-pool", workers)]


@pytest.mark.benchmark(group="idle-memory")
def test_shmray_session(benchmark):
    others = _children()
    shmray.init(num_cpus=2)
    try:
        assert sum(shmray.get([one.remote() for _ in range(10)], timeout=60)) == 10
        time.sleep(SETTLE)
        processes = sorted(_children() - others)
        _record(benchmark, "shmray-session", processes, pool_workers=2)
    finally:
        shmray.shutdown()


def _with_one_actor(benchmark, name: str, ending: str) -> None:
    """Record the processes whose name ends with ``ending`` in a session with one actor."""
    shmray.init(num_cpus=2)
    try:
        actor = Idle.remote()
        assert shmray.get(actor.ping.remote(), timeout=60) == 1
        time.sleep(SETTLE)
        pids = [child.pid for child in psutil.Process().children(recursive=True)
                if child.name().endswith(ending)]  # ps shows shmray::Idle, shmray::spawner
        _record(benchmark, name, pids, pool_workers=1)
    finally:
        shmray.shutdown()


@pytest.mark.benchmark(group="idle-memory")
def test_shmray_actor(benchmark):
    _with_one_actor(benchmark, "shmray-actor", "Idle")


@pytest.mark.benchmark(group="idle-memory")
def test_shmray_actor_forker(benchmark):
    _with_one_actor(benchmark, "shmray-actor-forker", "spawner")


@pytest.mark.benchmark(group="idle-memory")
def test_driver(benchmark):
    _record(benchmark, "driver", [os.getpid()])
