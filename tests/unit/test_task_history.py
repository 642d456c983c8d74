"""Task rows from the events of several logs (``_task_history``), with fake logs."""

from shmray import _events
from shmray._events import ENDED, STARTED, SUBMITTED, Event
from shmray._task_history import History

DRIVER, WORKER, OTHER, SCHEDULER = 100, 200, 300, 50
T = b"t" * 24


def event(kind, t, name="f", task_id=T, t2=0.0, error=0, message=None, task_type=0,
          ref=None):
    return Event(0, kind, task_type, error, name, message, task_id, ref, t, t2, 0)


def rows_of(*sources, pending=None):
    kwargs = {} if pending is None else {"pending": pending}
    history = History(1 << 62)
    history.take(sources)
    return history.rows(DRIVER, **kwargs)


def test_a_task_submitted_started_and_ended_is_finished_where_it_ran():
    (row,) = rows_of((DRIVER, True, [event(SUBMITTED, 1.0)]),
                     (WORKER, True, [event(STARTED, 2.0), event(ENDED, 3.0, t2=2.0)]))
    assert row["state"] == "FINISHED" and row["worker_pid"] == WORKER
    assert (row["creation_time_ms"], row["start_time_ms"], row["end_time_ms"]) == \
        (1000, 2000, 3000)
    assert row["task_id"] == T.hex() and row["type"] == "NORMAL_TASK"
    assert row["parent_task_id"] is None and row["error_type"] is None


def test_a_task_never_started_is_in_the_state_pending_gives():
    (row,) = rows_of((DRIVER, True, [event(SUBMITTED, 1.0)]),
                     pending=lambda task_id, submitter, name: ("PENDING_ARGS_AVAIL", "waits for x"))
    assert row["state"] == "PENDING_ARGS_AVAIL" and row["waiting_for"] == "waits for x"
    assert row["worker_pid"] is None and row["start_time_ms"] is None


def test_an_attempt_in_a_living_process_without_an_end_is_running():
    (row,) = rows_of((DRIVER, True, [event(SUBMITTED, 1.0)]),
                     (WORKER, True, [event(STARTED, 2.0)]))
    assert row["state"] == "RUNNING" and row["end_time_ms"] is None


def test_an_attempt_whose_process_died_failed_with_it():
    (row,) = rows_of((DRIVER, True, [event(SUBMITTED, 1.0)]),
                     (WORKER, False, [event(STARTED, 2.0)]))
    assert row["state"] == "FAILED" and row["error_type"] == "WORKER_DIED"
    assert str(WORKER) in row["error_message"]


def test_the_schedulers_failure_closes_the_attempt_of_the_dead_worker():
    rows = rows_of((DRIVER, True, [event(SUBMITTED, 1.0)]),
                   (WORKER, False, [event(STARTED, 2.0)]),
                   (SCHEDULER, True, [event(ENDED, 3.0, error=_events.WORKER_DIED,
                                            message="WorkerCrashedError: died")]))
    assert [(r["state"], r["worker_pid"], r["end_time_ms"]) for r in rows] == \
        [("FAILED", WORKER, 3000)]
    assert rows[0]["error_message"] == "WorkerCrashedError: died"


def test_a_retry_is_a_second_attempt():
    rows = rows_of((DRIVER, True, [event(SUBMITTED, 1.0)]),
                   (WORKER, False, [event(STARTED, 2.0)]),
                   (OTHER, True, [event(STARTED, 4.0), event(ENDED, 5.0, t2=4.0)]))
    assert [(r["attempt_number"], r["state"], r["worker_pid"]) for r in rows] == \
        [(0, "FAILED", WORKER), (1, "FINISHED", OTHER)]


def test_a_task_failed_before_it_ran_has_no_start():
    (row,) = rows_of((DRIVER, True, [event(SUBMITTED, 1.0)]),
                     (SCHEDULER, True, [event(ENDED, 2.0, error=_events.TASK_CANCELLED)]))
    assert row["state"] == "FAILED" and row["error_type"] == "TASK_CANCELLED"
    assert row["start_time_ms"] is None and row["worker_pid"] is None


def test_a_task_whose_submission_was_overwritten_keeps_its_name_from_its_run():
    (row,) = rows_of((WORKER, True, [event(STARTED, 2.0, name="g"),
                                     event(ENDED, 3.0, name="g", t2=2.0)]))
    assert row["name"] == "g" and row["state"] == "FINISHED"
    assert row["creation_time_ms"] == 2000


def test_an_actor_call_names_its_actor_and_type():
    actor = b"a" * 28
    (row,) = rows_of((DRIVER, True, [event(SUBMITTED, 1.0, "A.inc", task_type=1, ref=actor)]),
                     (WORKER, True, [event(STARTED, 2.0, "A.inc", task_type=1, ref=actor),
                                     event(ENDED, 3.0, "A.inc", t2=2.0, task_type=1)]))
    assert row["type"] == "ACTOR_TASK" and row["actor_id"] == actor.hex()


def test_rows_come_oldest_task_first_and_a_worker_submits_as_a_parent():
    other = b"u" * 24
    rows = rows_of((DRIVER, True, [event(SUBMITTED, 2.0)]),
                   (WORKER, True, [event(SUBMITTED, 1.0, "child", task_id=other)]))
    assert [r["name"] for r in rows] == ["child", "f"]
    assert rows[0]["submitter_pid"] == WORKER and rows[1]["submitter_pid"] is None


# -- starts named in slots, not logged (a worker's, a sync actor's) ------------------------


def test_a_task_its_slot_names_is_running_until_its_end_is_logged():
    history = History(100)
    history.take([(DRIVER, True, [event(SUBMITTED, 1.0)]), (WORKER, True, [])],
                 {WORKER: (T, 2.0)})
    (row,) = history.rows(DRIVER)
    assert (row["state"], row["worker_pid"], row["start_time_ms"]) == ("RUNNING", WORKER, 2000)
    history.take([(WORKER, True, [event(ENDED, 3.0, t2=2.0)])], {WORKER: (T, 2.0)})
    (row,) = history.rows(DRIVER)
    assert (row["state"], row["start_time_ms"], row["end_time_ms"]) == ("FINISHED", 2000, 3000)
    assert history.states(history.open_states()) == {"FINISHED": 1}


def test_an_end_logged_before_its_slot_was_read_makes_one_attempt():
    history = History(100)
    history.take([(WORKER, True, [event(ENDED, 3.0, t2=2.0)])], {WORKER: (T, 2.0)})
    assert [(r["state"], r["worker_pid"]) for r in history.rows(DRIVER)] == [
        ("FINISHED", WORKER)]


def test_a_task_its_slot_stopped_naming_without_an_end_never_ran():
    history = History(100)
    history.take([(DRIVER, True, [event(SUBMITTED, 1.0)])], {WORKER: (T, 2.0)})
    history.take([], {WORKER: None})  # sent back unrun; the slot was cleared
    (row,) = history.rows(DRIVER)
    assert row["state"] == "SUBMITTED_TO_WORKER" and row["worker_pid"] is None


def test_a_task_its_slot_named_when_its_process_died_failed_with_it():
    history = History(100)
    history.take([(DRIVER, True, [event(SUBMITTED, 1.0)])], {WORKER: (T, 2.0)})
    history.take([(WORKER, False, [])], {WORKER: (T, 2.0)})
    history.process_ended(WORKER)
    history.take([(SCHEDULER, True, [event(ENDED, 4.0, error=_events.WORKER_DIED)])], {})
    (row,) = history.rows(DRIVER)
    assert (row["state"], row["error_type"], row["worker_pid"], row["end_time_ms"]) == (
        "FAILED", "WORKER_DIED", WORKER, 4000)


def test_the_oldest_finished_tasks_go_past_the_limit_and_running_ones_stay():
    history = History(10)
    first = b"a" * 24
    history.take([(WORKER, True, [event(STARTED, 0.5, task_id=first)])])
    history.take([(WORKER, True, [event(STARTED, t, task_id=bytes([n]) * 24)
                                  for n, t in zip(range(1, 40), range(1, 40))]
                   + [event(ENDED, t + 0.5, task_id=bytes([n]) * 24, t2=t)
                      for n, t in zip(range(1, 40), range(1, 40))])])
    kept = {row["task_id"] for row in history.rows(DRIVER)}
    assert first.hex() in kept and len(kept) <= 10 + 10 // 4
    assert history.dropped == 40 - len(kept)
    assert sum(history.states(history.open_states()).values()) == len(kept)
