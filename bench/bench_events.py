"""What recording task events costs (``_events``): the same work with recording on (the
default) and off (``_system_config={"task_events_per_process": 0}``), in the same run.

Run: python -m pytest bench/bench_events.py --benchmark-enable --benchmark-only

Groups (compare within a group; the goal: on is within 5% of off):
- events-throughput-2000: submit 2,000 no-op tasks, then get them all (three events each:
  submitted by the driver, started and ended by a worker).
- events-actor-pipelined-2000: 2,000 calls of an actor method, then one get of all.

Each case starts its own session (outside the timing) and shuts it down at the end.
The two are interleaved round by round by pytest-benchmark's order: off, on, off, on.
"""

import pytest

import shmray
from benchstats import record_rate

MiB = 1 << 20
N = 2000


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


@pytest.fixture(params=["off", "on"])
def recording(request):
    system = {} if request.param == "on" else {"task_events_per_process": 0}
    shmray.init(num_cpus=2, object_store_memory=256 * MiB, _system_config=system)
    try:
        yield request.param
    finally:
        shmray.shutdown()


def test_throughput(benchmark, recording):
    benchmark.group = f"events-throughput-{N}"
    benchmark.name = f"recording-{recording}"
    assert shmray.get([noop.remote(i) for i in range(100)]) == list(range(100))  # warm

    def run():
        return shmray.get([noop.remote(i) for i in range(N)])

    assert benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2) == list(range(N))
    record_rate(benchmark, "tasks_per_s", N)


def test_actor_pipelined(benchmark, recording):
    benchmark.group = f"events-actor-pipelined-{N}"
    benchmark.name = f"recording-{recording}"
    counter = Counter.remote()
    assert shmray.get(counter.inc.remote()) == 1

    def run():
        results = shmray.get([counter.inc.remote() for _ in range(N)])
        assert results[-1] - results[0] == N - 1
        return results

    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
    record_rate(benchmark, "calls_per_s", N)
