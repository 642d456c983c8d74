"""Seeing inside a running session, end to end: the state API (``shmray.util.state``), the
timeline and the ``shmray`` command line against a session that ran tasks and actors, some
failing and some waiting, checked against what happened.  The command line runs as a
separate process, attached to the live session through its inspect socket.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import MiB, wait_for, wait_for_tasks

import shmray
from shmray.util import state
from shmray.util.state import _source

DEADLOCK = 60


def hold_until(path: str) -> None:
    """Block the calling task until ``path`` exists (a test's gate; never past DEADLOCK)."""
    deadline = time.monotonic() + DEADLOCK
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@shmray.remote
def square(x):
    return x * x


@shmray.remote(max_retries=0)
def fail():
    raise ValueError("on purpose")


@shmray.remote
def gate(path):
    hold_until(path)
    return os.getpid()


@shmray.remote
def after(pid):
    return pid


@shmray.remote
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n

    def pid(self):
        return os.getpid()

    def broken(self):
        raise KeyError("on purpose")


# -- tasks ----------------------------------------------------------------------------------


def test_tasks_are_listed_with_what_happened_to_them(ray, tmp_path):
    refs = [square.remote(i) for i in range(5)]
    assert shmray.get(refs, timeout=DEADLOCK) == [0, 1, 4, 9, 16]
    with pytest.raises(shmray.exceptions.RayTaskError):
        shmray.get(fail.remote(), timeout=DEADLOCK)
    opened = str(tmp_path / "open")
    held = gate.remote(opened)
    waiting = after.remote(held)
    wide = square.options(num_cpus=2).remote(3)  # waits for the CPU the gate holds
    try:
        finished = wait_for_tasks("square", 5, state="FINISHED")
        assert all(t.type == "NORMAL_TASK" and t.worker_pid for t in finished)
        assert {t.task_id for t in finished} == {r.task_id().hex() for r in refs}
        assert all(t.end_time_ms >= t.start_time_ms >= t.creation_time_ms for t in finished)

        failed = wait_for_tasks("fail", 1, state="FAILED")[0]
        assert failed.error_type and "on purpose" in (failed.error_message or "")

        running = wait_for_tasks("gate", 1, state="RUNNING")[0]
        assert running.worker_pid in shmray._context.runtime.query("workers")
        pending = wait_for_tasks("after", 1)[0]
        assert pending.state == "PENDING_ARGS_AVAIL" and pending.waiting_for
        queued = wait_for_tasks("square", 1, state="PENDING_NODE_ASSIGNMENT")[0]
        assert queued.task_id == wide.task_id().hex() and queued.waiting_for

        status = _source.fetch({"what": "status"})
        assert status["tasks"]["RUNNING"] == 1 and status["tasks"]["FAILED"] == 1
        assert sum(p["count"] for p in status["pending"]) == 2  # after, and the wide one
        assert status["stuck"] == []  # both will run once the gate opens

        summary = state.summarize_tasks()["cluster"]
        assert summary["summary"]["square"]["state_counts"] == {
            "FINISHED": 5, "PENDING_NODE_ASSIGNMENT": 1}
        assert summary["summary"]["fail"]["state_counts"] == {"FAILED": 1}
        assert summary["total_tasks"] == 9 and summary["total_actor_tasks"] == 0

        assert state.get_task(refs[2]).state == "FINISHED"
        assert state.get_task(refs[2].task_id().hex()).name == "square"
    finally:
        open(opened, "w").close()
    assert shmray.get(waiting, timeout=DEADLOCK) == running.worker_pid
    assert shmray.get(wide, timeout=DEADLOCK) == 9
    wait_for_tasks("after", 1, state="FINISHED")
    wait_for_tasks("square", 6, state="FINISHED")


def test_a_retried_task_lists_each_attempt(ray, tmp_path):
    marker = str(tmp_path / "tried")

    @shmray.remote(max_retries=1, retry_exceptions=True)
    def flaky():
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise OSError("first try")
        return "second"

    ref = flaky.remote()
    assert shmray.get(ref, timeout=DEADLOCK) == "second"
    wait_for(lambda: isinstance(state.get_task(ref), list), timeout=DEADLOCK)
    attempts = state.get_task(ref)
    assert [(a.attempt_number, a.state) for a in attempts] == [(0, "FAILED"), (1, "FINISHED")]


# -- actors ---------------------------------------------------------------------------------


def test_actors_and_their_calls_are_listed(ray):
    counter = Counter.remote()
    assert shmray.get([counter.incr.remote() for _ in range(3)], timeout=DEADLOCK) == [1, 2, 3]
    pid = shmray.get(counter.pid.remote(), timeout=DEADLOCK)
    with pytest.raises(shmray.exceptions.RayTaskError):
        shmray.get(counter.broken.remote(), timeout=DEADLOCK)
    doomed = Counter.options(name="doomed").remote()
    shmray.get(doomed.incr.remote(), timeout=DEADLOCK)
    shmray.kill(doomed)

    def by_state():
        return {a.state: a for a in state.list_actors(detail=True)}

    wait_for(lambda: set(by_state()) == {"ALIVE", "DEAD"}, timeout=DEADLOCK)
    alive, dead = by_state()["ALIVE"], by_state()["DEAD"]
    assert alive.class_name == "Counter" and alive.pid == pid
    assert dead.name == "doomed" and dead.death_cause
    assert state.get_actor(alive.actor_id).pid == pid
    assert state.summarize_actors()["cluster"]["summary"]["Counter"]["state_counts"] == {
        "ALIVE": 1, "DEAD": 1}

    calls = wait_for_tasks("Counter.incr", 4, state="FINISHED")
    assert {c.type for c in calls} == {"ACTOR_TASK"}
    assert {c.worker_pid for c in calls if c.actor_id == alive.actor_id} == {pid}
    assert wait_for_tasks("Counter.broken", 1, state="FAILED")[0].actor_id == alive.actor_id
    summary = state.summarize_tasks()["cluster"]
    assert summary["total_actor_scheduled"] == 2
    assert summary["summary"]["Counter.incr"]["type"] == "ACTOR_TASK"


# -- inside tasks and actors ----------------------------------------------------------------


@shmray.remote
def list_myself():
    me = shmray.get_runtime_context().get_task_id()
    return [t.state for t in state.list_tasks(filters=[("task_id", "=", me)])]


@shmray.remote
class Asker:
    def running(self):
        return [t.name for t in state.list_tasks(filters=[("state", "=", "RUNNING")])]


def test_the_state_api_works_inside_tasks_and_actors(ray):
    assert shmray.get(list_myself.remote(), timeout=DEADLOCK) == ["RUNNING"]
    asker = Asker.remote()
    assert "Asker.running" in shmray.get(asker.running.remote(), timeout=DEADLOCK)


# -- objects, workers, nodes ----------------------------------------------------------------


def test_objects_are_listed_with_their_sizes_and_holders(ray):
    big = shmray.put(np.zeros(8 * MiB, dtype=np.uint8))
    rows = state.get_objects(big.hex())
    assert rows, "the driver's ref to a put object is listed"
    row = next(r for r in rows if r.pid == os.getpid())
    assert row.object_size >= 8 * MiB and row.type == "DRIVER"
    assert row.reference_type == "LOCAL_REFERENCE" and row.task_status == "NIL"
    assert row.where == "arena" and row.spilled is False

    report_rows = state.list_objects(detail=True, limit=10_000)
    in_arena = {r.object_id: r.object_size for r in report_rows if r.where == "arena"}
    store = _source.fetch({"what": "status"})["store"]
    # The objects in the arena account for the store's used bytes (the rest: allocation
    # headers and alignment, a few KiB per object).
    assert sum(in_arena.values()) <= store["used"]
    assert store["used"] - sum(in_arena.values()) <= 64 * 1024 * max(1, len(in_arena))
    del big


def test_workers_and_the_node(ray):
    wait_for(lambda: len(state.list_workers(filters=[("worker_type", "=", "WORKER")]))
             == len(shmray._context.runtime.query("workers")), timeout=DEADLOCK)
    workers = state.list_workers(detail=True)
    driver = [w for w in workers if w.worker_type == "DRIVER"]
    assert [w.pid for w in driver] == [os.getpid()]
    assert {w.pid for w in workers if w.worker_type == "WORKER"} == set(
        shmray._context.runtime.query("workers"))
    assert all(w.is_alive for w in workers)
    assert all(w.state in ("IDLE", "BUSY", "LEASED", "BLOCKED") for w in workers
               if w.worker_type == "WORKER")
    [node] = state.list_nodes()
    assert node.state == "ALIVE" and node.is_head_node
    assert node.resources_total["CPU"] == 2
    assert state.get_node(node.node_id).node_ip == "127.0.0.1"


# -- timeline -------------------------------------------------------------------------------


def test_the_timeline_shows_each_task_on_its_workers_lane(ray, tmp_path):
    refs = [square.remote(i) for i in range(4)]
    shmray.get(refs, timeout=DEADLOCK)
    wait_for_tasks("square", 4, state="FINISHED")
    events = shmray.timeline()
    ran = {e["args"]["task_id"]: e for e in events if e["ph"] == "X" and e["name"] == "square"}
    assert set(ran) == {r.task_id().hex() for r in refs}
    lanes = {e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {e["tid"] for e in ran.values()} <= lanes
    assert all(e["dur"] >= 0 for e in ran.values())
    path = tmp_path / "trace.json"
    shmray.timeline(str(path))
    assert {e["args"].get("task_id") for e in json.loads(path.read_text())} >= set(ran)


# -- the command line, from another process -------------------------------------------------


def shmray_command(*argv, check=True):
    done = subprocess.run([sys.executable, "-m", "shmray", *argv], capture_output=True,
                          text=True, timeout=DEADLOCK)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_the_command_line_attaches_to_the_session(ray, tmp_path):
    folder = shmray._context.runtime.session_dir
    shmray.get([square.remote(i) for i in range(3)], timeout=DEADLOCK)
    wait_for_tasks("square", 3, state="FINISHED")

    listed = json.loads(shmray_command("list", "tasks", "--session", folder,
                                       "--filter", "name=square", "--format", "json").stdout)
    assert [t["state"] for t in listed] == ["FINISHED"] * 3
    assert listed == [dict(t) for t in state.list_tasks(filters=[("name", "=", "square")])]

    status = shmray_command("status", "--session", folder).stdout
    assert "Workers" in status and "Store" in status and "3 FINISHED" in status
    summary = json.loads(shmray_command("summary", "tasks", "--session", folder,
                                        "--format", "json").stdout)
    assert summary["cluster"]["summary"]["square"]["state_counts"] == {"FINISHED": 3}
    memory = json.loads(shmray_command("memory", "--session", folder,
                                       "--format", "json").stdout)
    assert memory["store"]["capacity"] == 150 * MiB
    trace = tmp_path / "trace.json"
    shmray_command("timeline", "--session", folder, "-o", str(trace))
    assert sum(e["name"] == "square" for e in json.loads(trace.read_text())) == 3


def test_the_command_line_says_so_when_the_session_has_ended(ray):
    folder = shmray._context.runtime.session_dir
    shmray.shutdown()
    done = shmray_command("status", "--session", folder, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_local_mode_answers_too():
    shmray.init(num_cpus=1, local_mode=True)
    try:
        assert shmray.get(square.remote(4), timeout=DEADLOCK) == 16
        assert [t.state for t in state.list_tasks(filters=[("name", "=", "square")])] == [
            "FINISHED"]
    finally:
        shmray.shutdown()
