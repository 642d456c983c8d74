"""What recording task events costs (``_events``): the same work with recording on (the
default) and off (``_system_config={"task_events_per_process": 0}``), in the same run.

Run: python -m pytest bench/bench_events.py --benchmark-enable --benchmark-only
     (add --benchmark-json=FILE to read the figures in ``extra_info``)

The goal: on is within 5% of off.  Two workloads, each 2,000 items then one get of all:
- tasks: no-op tasks (an event where each is submitted, another where it runs);
- actor: calls of a no-op actor method (the same, in the caller and the actor).

A session records or not for its whole life, so the two can't share one, and sessions run
one after another drift with the machine: on this shared 2-core VM, from one minute to the
next, more than the difference measured.  So the case alternates: a session off, a session
on, then on, off, ... (``SESSIONS`` each), each giving its best of ``ROUNDS`` bursts per
workload; ``extra_info`` holds each side's median of those bests and their ratio
(``on_over_off``: 1.03 = 3% slower).  pytest-benchmark's own time is the whole alternation's.
"""

import statistics
import time

import shmray

MiB = 1 << 20
N = 2000
SESSIONS = 8  # per side
ROUNDS = 6


@shmray.remote
def noop(i):
    return i


@shmray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n


def _bests(capacity: int, rounds: int) -> dict:
    """Each workload's best burst in one session recording ``capacity`` events a process."""
    shmray.init(num_cpus=2, object_store_memory=256 * MiB,
                _system_config={"task_events_per_process": capacity})
    try:
        counter = Counter.remote()
        assert shmray.get(counter.inc.remote()) == 1
        assert shmray.get([noop.remote(i) for i in range(200)]) == list(range(200))  # warm
        bursts = {"tasks": lambda: shmray.get([noop.remote(i) for i in range(N)]),
                  "actor": lambda: shmray.get([counter.inc.remote() for _ in range(N)])}
        bests = {}
        for name, burst in bursts.items():
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                assert len(burst()) == N
                best = min(best, time.perf_counter() - start)
            bests[name] = best
        return bests
    finally:
        shmray.shutdown()


def test_recording_cost(benchmark):
    benchmark.group = f"events-{N}"
    # A smoke run (benchmarks disabled: each once, in the suite) alternates once.
    sessions = SESSIONS if benchmark.enabled else 1
    rounds = ROUNDS if benchmark.enabled else 1
    seen = {"off": [], "on": []}

    def alternate():
        for i in range(sessions):
            for side in (("off", "on") if i % 2 == 0 else ("on", "off")):
                seen[side].append(_bests(0 if side == "off" else 8192, rounds))

    benchmark.pedantic(alternate, rounds=1, iterations=1)
    for workload in ("tasks", "actor"):
        off = statistics.median(b[workload] for b in seen["off"])
        on = statistics.median(b[workload] for b in seen["on"])
        benchmark.extra_info[workload] = {"off_ms": round(off * 1e3, 2),
                                          "on_ms": round(on * 1e3, 2),
                                          "on_over_off": round(on / off, 3)}
