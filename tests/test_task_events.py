"""Task events end to end: what processes record (``_events``) and what the scheduler makes
of it (``_scheduler.state``) when work dies, is cancelled, spills, waits for ever, or
outgrows the history; read through the state API as a user would."""

import os
import signal
import time

import numpy as np
import pytest
from conftest import MiB, wait_for, wait_for_tasks

import shmray
from shmray.util import state
from shmray.util.state import _source

DEADLOCK = 60


@shmray.remote(max_retries=0)
def sleeper(seconds):
    time.sleep(seconds)
    return os.getpid()


@shmray.remote
def identity(x):
    return x


def test_a_task_whose_worker_is_killed_failed_with_it(ray):
    ref = sleeper.remote(DEADLOCK)
    (running,) = wait_for_tasks("sleeper", 1, state="RUNNING")
    os.kill(running.worker_pid, signal.SIGKILL)
    with pytest.raises(shmray.exceptions.WorkerCrashedError):
        shmray.get(ref, timeout=DEADLOCK)
    (failed,) = wait_for_tasks("sleeper", 1, state="FAILED")
    assert failed.error_type == "WORKER_DIED" and failed.worker_pid == running.worker_pid
    assert failed.start_time_ms == running.start_time_ms


def test_a_cancelled_task_that_never_ran_is_failed_as_cancelled(ray):
    @shmray.remote(num_cpus=2)
    def wide():
        return 1

    blocker = sleeper.remote(DEADLOCK)  # holds a CPU: the two-CPU task waits in the scheduler
    queued = wide.remote()
    wait_for_tasks("wide", 1, state="PENDING_NODE_ASSIGNMENT")
    shmray.cancel(queued)
    with pytest.raises(shmray.exceptions.TaskCancelledError):
        shmray.get(queued, timeout=DEADLOCK)
    (row,) = wait_for_tasks("wide", 1, state="FAILED")
    assert row.error_type == "TASK_CANCELLED" and row.start_time_ms is None
    shmray.cancel(blocker, force=True)


def test_work_that_waits_until_an_actor_ends_is_named_stuck(ray):
    @shmray.remote(num_cpus=2)
    class Hog:
        def ping(self):
            return "pong"

    hog = Hog.remote()
    assert shmray.get(hog.ping.remote(), timeout=DEADLOCK) == "pong"
    ref = identity.remote(1)
    (waiting,) = wait_for_tasks("identity", 1, state="PENDING_NODE_ASSIGNMENT")
    assert "actors hold CPU: 2" in waiting.waiting_for
    status = _source.fetch({"what": "status"})
    (stuck,) = status["stuck"]
    assert stuck["reason"] == "infeasible" and "1 task(s)" in stuck["name"]
    assert "actors hold CPU: 2" in stuck["text"] and "kill one" in stuck["text"]
    assert status["tasks"]["PENDING_NODE_ASSIGNMENT"] == 1
    shmray.kill(hog)
    assert shmray.get(ref, timeout=DEADLOCK) == 1
    wait_for(lambda: _source.fetch({"what": "status"})["stuck"] == [], timeout=DEADLOCK)


def test_actor_calls_and_constructors_are_recorded_where_they_ran(ray):
    @shmray.remote
    class Box:
        def __init__(self, fail):
            if fail:
                raise RuntimeError("no box")

        def where(self):
            return os.getpid()

        def broken(self):
            raise KeyError("on purpose")

    box = Box.remote(False)
    pid = shmray.get(box.where.remote(), timeout=DEADLOCK)
    with pytest.raises(KeyError):
        shmray.get(box.broken.remote(), timeout=DEADLOCK)
    bad = Box.remote(True)
    with pytest.raises(shmray.exceptions.ActorDiedError):
        shmray.get(bad.where.remote(), timeout=DEADLOCK)
    created = wait_for_tasks("Box.__init__", 2)
    assert sorted(row.state for row in created) == ["FAILED", "FINISHED"]
    assert all(row.type == "ACTOR_CREATION_TASK" for row in created)
    failed_init = next(row for row in created if row.state == "FAILED")
    assert failed_init.error_type == "ACTOR_CREATION_FAILED"
    assert "no box" in failed_init.error_message
    (call,) = wait_for_tasks("Box.where", 1, state="FINISHED")
    assert call.worker_pid == pid and call.type == "ACTOR_TASK"
    assert call.actor_id == box._actor_id.hex()
    (broken,) = wait_for_tasks("Box.broken", 1, state="FAILED")
    assert broken.error_type == "TASK_EXECUTION_EXCEPTION" and "on purpose" in \
        broken.error_message


def test_spills_and_restores_show_on_the_timeline(ray):
    refs = [shmray.put(np.full(30 * MiB // 8, i, dtype=np.int64)) for i in range(8)]
    assert int(shmray.get(refs[0])[0]) == 0  # the first went to disk to make room: back
    events = shmray.timeline()
    names = {event["name"].split()[0] for event in events if event.get("ph") == "X"}
    assert {"spill", "restore"} <= names, names


def test_the_history_keeps_each_processes_newest_events():
    shmray.init(num_cpus=1, _system_config={"task_events_per_process": 64})
    try:
        refs = [identity.remote(i) for i in range(300)]
        assert shmray.get(refs, timeout=DEADLOCK) == list(range(300))
        rows = [row for row in state.list_tasks(limit=10_000, detail=True)
                if row.name == "identity"]
        # the driver's log holds its last 64 submissions; the worker's its last 32 tasks
        assert 32 <= len(rows) <= 64 + 32
        kept = {row.task_id for row in rows}
        assert refs[-1].task_id().hex() in kept and refs[0].task_id().hex() not in kept
    finally:
        shmray.shutdown()


def test_recording_can_be_switched_off():
    shmray.init(num_cpus=1, _system_config={"task_events_per_process": 0})
    try:
        assert shmray.get(identity.remote(1), timeout=DEADLOCK) == 1
        assert state.list_tasks() == []
        assert state.list_workers(), "the rest of the state API still answers"
    finally:
        shmray.shutdown()


def test_a_bad_history_setting_is_refused_at_init():
    with pytest.raises(ValueError, match="task_events_per_process"):
        shmray.init(num_cpus=1, _system_config={"task_events_per_process": 3})
    assert not shmray.is_initialized()


def test_a_status_counts_what_every_process_did_without_listing_it(ray):
    @shmray.remote(max_retries=0)
    def boom():
        raise ValueError("on purpose")

    @shmray.remote
    class Echo:
        def echo(self, x):
            return x

    assert shmray.get([identity.remote(i) for i in range(5)], timeout=DEADLOCK) == list(range(5))
    with pytest.raises(ValueError):
        shmray.get(boom.remote(), timeout=DEADLOCK)
    echo = Echo.remote()
    assert shmray.get(echo.echo.remote(1), timeout=DEADLOCK) == 1
    blocker = sleeper.remote(DEADLOCK)
    wait_for(lambda: _source.fetch({"what": "status"})["tasks"].get("RUNNING") == 1,
             timeout=DEADLOCK)
    tasks = _source.fetch({"what": "status"})["tasks"]
    assert tasks == {"FINISHED": 5 + 2, "FAILED": 1, "RUNNING": 1}  # 2: Echo's init, echo
    shmray.cancel(blocker, force=True)
    wait_for(lambda: _source.fetch({"what": "status"})["tasks"].get("RUNNING") is None,
             timeout=DEADLOCK)
