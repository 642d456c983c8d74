"""The task event log (``_events``): records written in one process, read in another."""

import mmap
import os
import threading

import pytest

from shmray import _events
from shmray._events import ENDED, STARTED, SUBMITTED, EventLog

CAPACITY = 64


def read(buf, capacity: int) -> list:
    """All the events a log holds, oldest first."""
    return _events.Reader(buf, capacity).new()


def _log(capacity=CAPACITY):
    log = EventLog(mmap.mmap(-1, _events.log_bytes(capacity)), capacity)
    log.write = log.writer()
    return log


def test_events_read_back_in_order_with_their_strings():
    log = _log()
    log.write(SUBMITTED, _events.ACTOR_TASK, b"t" * 24, "Counter.inc", b"a" * 28)
    log.write(STARTED, _events.ACTOR_TASK, b"t" * 24, "Counter.inc", b"a" * 28, t=5.0)
    log.write(ENDED, _events.ACTOR_TASK, b"t" * 24, "Counter.inc", t2=5.0,
              error=_events.TASK_EXECUTION_EXCEPTION, message="ValueError: boom")
    events = read(log.buf, CAPACITY)
    assert [e.kind for e in events] == [SUBMITTED, STARTED, ENDED]
    assert {e.name for e in events} == {"Counter.inc"}
    assert events[0].ref_id == b"a" * 28 and events[2].ref_id is None
    assert events[1].time == 5.0 and events[2].time2 == 5.0
    assert events[2].message == "ValueError: boom"
    assert _events.ERRORS[events[2].error] == "TASK_EXECUTION_EXCEPTION"


def test_a_full_ring_keeps_the_newest_events():
    log = _log()
    for i in range(CAPACITY * 3 + 5):
        log.write(SUBMITTED, 0, i.to_bytes(24, "little"), "f")
    events = read(log.buf, CAPACITY)
    numbers = [int.from_bytes(e.task_id, "little") for e in events]
    assert numbers == list(range(CAPACITY * 2 + 5, CAPACITY * 3 + 5))


def test_a_record_caught_half_written_is_skipped():
    log = _log()
    for i in range(3):
        log.write(SUBMITTED, 0, i.to_bytes(24, "little"), "f")
    # Tear the second record (the i-th event goes to slot i % capacity, counting from 1):
    # its trailing sequence number no longer matches its first.
    end = _events.STRINGS_BYTES + 3 * _events.RECORD.size - 4
    log.buf[end : end + 4] = b"\xff\xff\xff\xff"
    numbers = [int.from_bytes(e.task_id, "little") for e in read(log.buf, CAPACITY)]
    assert numbers == [0, 2]


def test_strings_past_the_region_are_dropped_not_corrupting():
    log = _log()
    long = "x" * 300
    written = 0
    while log._sid(f"{written}{long}"):
        written += 1
    assert 0 < written < _events.STRINGS_BYTES // 300
    log.write(SUBMITTED, 0, b"a" * 24, f"new{long}")  # no room: no name
    log.write(SUBMITTED, 0, b"b" * 24, f"0{long}")          # known: named
    events = read(log.buf, CAPACITY)
    assert events[0].name is None and events[1].name == f"0{long}"


def test_threads_never_share_a_slot():
    log = _log(capacity=4096)

    def write(prefix):
        for i in range(500):
            log.write(SUBMITTED, 0, prefix + i.to_bytes(23, "little"), "f")

    threads = [threading.Thread(target=write, args=(bytes([n]),)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({e.task_id for e in read(log.buf, 4096)}) == 2000


def test_a_child_process_writes_what_the_parent_reads():
    buf = mmap.mmap(-1, _events.log_bytes(CAPACITY))
    pid = os.fork()
    if pid == 0:
        try:
            _events.start(buf, CAPACITY)
            began = _events.started(b"c" * 24, "child_task")
            _events.ended(b"c" * 24, "child_task", began)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    events = read(buf, CAPACITY)
    assert [(e.kind, e.name) for e in events] == [(STARTED, "child_task"),
                                                  (ENDED, "child_task")]
    assert events[1].time2 == events[0].time


def test_a_forked_child_records_nothing_into_its_parents_log():
    buf = mmap.mmap(-1, _events.log_bytes(CAPACITY))
    _events.start(buf, CAPACITY)
    try:
        pid = os.fork()
        if pid == 0:
            _events.submitted(b"c" * 24, "in the child")
            os._exit(0 if _events.log is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert read(buf, CAPACITY) == []
    finally:
        _events.stop()


@pytest.mark.parametrize("bad", [-1, 1, 15, 2.5, True, "8192"])
def test_a_bad_capacity_is_refused_naming_the_setting(bad):
    with pytest.raises(ValueError, match="task_events_per_process"):
        _events.capacity_of({"_system_config": {"task_events_per_process": bad}})


def test_capacity_zero_records_nothing():
    assert _events.capacity_of({"_system_config": {"task_events_per_process": 0}}) == 0
    assert _events.start(None, 0) is None
    _events.submitted(b"x" * 24, "f")  # no log: a no-op


def test_error_codes_are_rays_names():
    from shmray import exceptions
    assert _events.ERRORS[_events.error_code(ValueError())] == "TASK_EXECUTION_EXCEPTION"
    assert _events.ERRORS[_events.error_code(exceptions.TaskCancelledError("x"))] == \
        "TASK_CANCELLED"
    assert _events.ERRORS[_events.error_code(exceptions.WorkerCrashedError("x"))] == \
        "WORKER_DIED"
    assert _events.ERRORS[_events.error_code(exceptions.OwnerDiedError("x"))] == "OWNER_DIED"
