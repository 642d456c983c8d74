"""Asking a session questions while it works: the 2,000-task burst alone, and while another
process asks the scheduler over the inspect socket in a loop, in the same run.

Run: python -m pytest bench/bench_inspect.py --benchmark-enable --benchmark-only

Group burst-2000-inspected (compare within it; each case submits 2,000 no-op tasks, then
gets them all, as bench_tasks' throughput case):
- quiet: nobody asks anything;
- busy-neighbour: another process spins pure Python the whole time, touching nothing of the
  session: what a CPU taken away costs on this 2-CPU machine, the floor for the cases below
  (the command line itself needs a CPU);
- ping-tight: another process fetches ``{"what": "ping"}`` in a tight loop, a new connection
  each time (``_inspect_client.fetch``: find the session, connect, ask): the most the
  scheduler can be asked;
- status-tight: the same with ``{"what": "status"}`` (what ``shmray status`` asks; answered
  by the session's state, or with an error while a session has none: as cheap as a ping);
- ping-every-10ms: a ping every 10 ms, as ``watch -n 0.01 shmray status`` would (less the
  command line's own start).

Group inspect-roundtrip: one ``fetch({"what": "ping"})`` from this process (find the
session, connect, ask, read the answer), with the scheduler idle otherwise; the scheduler's
own CPU time per answer (``extra_info["scheduler_cpu_us_per_answer"]``, from its
utime+stime) is what each question costs the session, whatever else loads the machine.

The cases take turns, round after round (each asker paused with SIGSTOP while it is not
its turn), so what else runs on the machine weighs on every case alike.  Recorded in
``extra_info``: each case's median and best burst (ms), its median against quiet's
(``slowdown_vs_quiet``: 1.05 = 5% slower), and how many answers a second each asker got.
"""

import json
import signal
import statistics
import subprocess
import sys
import time

import psutil
import pytest

import shmray
from shmray import _inspect_client as client

MiB = 1 << 20
N = 2000
ROUNDS = 40

# Runs until its stdin closes, then prints how many answers it got and in how many seconds.
ASKER = """
import json, select, sys, time
from shmray import _inspect_client as client

mode, session, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
request = {"what": mode}
count, started = 0, None
while not select.select([sys.stdin], [], [], 0)[0]:
    if mode == "spin":
        json.loads(json.dumps({"value": {"pong": True}}))
    else:
        client.fetch(request, session=session)
    count += 1
    if started is None:
        print("ready", flush=True)
        started = time.monotonic()
    if pause:
        time.sleep(pause)
print(json.dumps({"count": count, "seconds": time.monotonic() - started}), flush=True)
"""

CASES = {  # case -> (what the other process does, its pause between requests)
    "quiet": None,
    "busy-neighbour": ("spin", 0.0),
    "ping-tight": ("ping", 0.0),
    "status-tight": ("status", 0.0),
    "ping-every-10ms": ("ping", 0.01),
}


@shmray.remote
def noop(i):
    return i


@pytest.fixture(scope="module")
def ray():
    shmray.init(num_cpus=2, object_store_memory=512 * MiB)
    shmray.get([noop.remote(i) for i in range(N)])  # workers started and warm
    yield shmray
    shmray.shutdown()


class Asker:
    """Another process asking the session (or spinning) in its turns, until ``stop()``."""

    def __init__(self, mode: str, pause: float, session_dir: str):
        self.proc = subprocess.Popen([sys.executable, "-c", ASKER, mode, session_dir,
                                      str(pause)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.idle = 0.0  # seconds paused
        self.pause()  # until its turn

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.paused_at = time.monotonic()

    def resume(self) -> None:
        self.idle += time.monotonic() - self.paused_at
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> dict:
        """How many answers it got, and in how many seconds of its turns."""
        self.resume()
        out, _ = self.proc.communicate(timeout=60)  # closes its stdin
        assert self.proc.returncode == 0
        asked = json.loads(out.strip().splitlines()[-1])
        asked["seconds"] -= self.idle
        return asked


def test_burst_while_inspected(benchmark, ray):
    benchmark.group = f"burst-{N}-inspected"
    session_dir = shmray._context.runtime.session_dir
    askers = {case: Asker(*how, session_dir) for case, how in CASES.items() if how}
    times = {case: [] for case in CASES}

    def burst():
        return ray.get([noop.remote(i) for i in range(N)])

    def rounds():
        for _ in range(1 if benchmark.disabled else ROUNDS):
            for case in CASES:
                asker = askers.get(case)
                if asker:
                    asker.resume()
                started = time.perf_counter()
                assert burst() == list(range(N))
                times[case].append(time.perf_counter() - started)
                if asker:
                    asker.pause()

    try:
        benchmark.pedantic(rounds, rounds=1, iterations=1)
    finally:
        asked = {case: asker.stop() for case, asker in askers.items()}
    quiet = statistics.median(times["quiet"])
    for case, seconds in times.items():
        info = {"median_ms": round(statistics.median(seconds) * 1000, 2),
                "best_ms": round(min(seconds) * 1000, 2),
                "slowdown_vs_quiet": round(statistics.median(seconds) / quiet, 3)}
        if case in asked and CASES[case][0] != "spin":
            assert asked[case]["count"] > 0
            info["answers_per_s"] = round(asked[case]["count"] / asked[case]["seconds"])
        benchmark.extra_info[case] = info


def test_inspect_roundtrip(benchmark, ray):
    benchmark.group = "inspect-roundtrip"
    session_dir = shmray._context.runtime.session_dir
    scheduler = psutil.Process(shmray._session._scheduler_pid)
    answers = []

    def ask():
        answers.append(client.fetch({"what": "ping"}, session=session_dir))

    before = sum(scheduler.cpu_times()[:2])
    benchmark.pedantic(ask, rounds=20 if benchmark.disabled else 2000, iterations=1)
    used = sum(scheduler.cpu_times()[:2]) - before
    assert answers and all(answer == {"pong": True} for answer in answers)
    benchmark.extra_info["scheduler_cpu_us_per_answer"] = round(used / len(answers) * 1e6, 1)
