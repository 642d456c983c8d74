"""Task events: each process's flight recorder, in memory the scheduler can read.

Runs in: every process of a session (each writes its own log); the scheduler reads them all
when asked what happened (``_scheduler.state``).

Most work never passes through the scheduler: a driver's plain tasks go straight to workers
it leases, and actor calls straight to their actors.  So what happened is known only where it
happened, and each process records it there: the submitter that it submitted a task, the
process that ran it that it ended (with its start).  Each record is a fixed-size struct
written with one ``pack_into`` into a ring in shared memory (a third of a microsecond, no
system call, no message), written after the task or its reply has gone out, so that it
adds nothing to a round trip.  The scheduler, which maps every process's log, reads the
rings only when somebody asks (``shmray list tasks``, the state API, the timeline).  What a
task runs now is not logged where one task runs at a time (workers, sync actors): their
slot names it (``_slot.running``), for less.  Recording so costs little enough to stay on;
what a process did longest ago is overwritten first, so the history is bounded: each log
holds its last ``capacity`` events (``_system_config`` ``"task_events_per_process"``),
about half of that in tasks.

A log is a region of ``log_bytes(capacity)``:

    [0 : 24]              u64 counts of tasks submitted, ended, and of those failed: a
                          status reads them, not the records (``counts``), so watching a
                          session costs it nothing per task
    [24 : STRINGS_BYTES]  the strings its records name (task names, error messages):
                          u32 bytes used, then (u16 length, UTF-8 bytes) each, append-only;
                          a record names the i-th as i + 1 (0: none)
    [STRINGS_BYTES : ...] ``capacity`` records of ``RECORD`` (96 bytes), the i-th event
                          written at index i % capacity

A record starts and ends with its sequence number (the low 32 bits of i + 1): a reader
copying the ring while a record is half written sees the two differ and skips it, and a
slot never written holds zeros.  Threads of one process take indexes from one
``itertools.count``, whose ``next`` is atomic under the GIL, so they never share a slot.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np

# Kinds of record
SUBMITTED = 1   # by the submitter: a task or call exists, and what it is
STARTED = 2     # by the process that runs it
ENDED = 3       # by the process that ran it, or by whoever failed it without a run
SPILLED = 4     # an object written to disk (``time2``: when it began; ``size``: bytes)
RESTORED = 5    # an object read back from disk

# Types of task (Ray's names, ``TYPES[code]``)
NORMAL_TASK, ACTOR_TASK, ACTOR_CREATION_TASK = 0, 1, 2
TYPES = ("NORMAL_TASK", "ACTOR_TASK", "ACTOR_CREATION_TASK")

# Why a task failed: Ray's ErrorType names (``ERRORS[code]``; 0: it did not), and the
# exception each stands for (``error_code``).
ERRORS = (None, "TASK_EXECUTION_EXCEPTION", "TASK_CANCELLED", "WORKER_DIED", "ACTOR_DIED",
          "ACTOR_UNAVAILABLE", "OWNER_DIED", "OBJECT_LOST", "TASK_UNSCHEDULABLE_ERROR",
          "ACTOR_UNSCHEDULABLE_ERROR", "TASK_PLACEMENT_GROUP_REMOVED",
          "ACTOR_PLACEMENT_GROUP_REMOVED", "OUT_OF_MEMORY", "ACTOR_CREATION_FAILED")
TASK_EXECUTION_EXCEPTION, TASK_CANCELLED, WORKER_DIED, ACTOR_DIED = 1, 2, 3, 4
ACTOR_CREATION_FAILED = 13
_CODES = {"TaskCancelledError": 2, "WorkerCrashedError": 3, "ActorDiedError": 4,
          "RayActorError": 4, "ActorUnavailableError": 5, "OwnerDiedError": 6,
          "ObjectLostError": 7, "TaskUnschedulableError": 8, "ActorUnschedulableError": 9,
          "TaskPlacementGroupRemoved": 10, "ActorPlacementGroupRemoved": 11,
          "OutOfMemoryError": 12}

# seq, kind, type, error, (pad), name, message, task id, actor or object id, time, time2,
# size, seq again
RECORD = struct.Struct("<IBBBxII24s28sddQI")
_SIZE = RECORD.size
STRINGS_BYTES = 1 << 18
_COUNTS = struct.Struct("<QQQ")  # submitted, ended, failed (of the ended)
_STRINGS_USED = _COUNTS.size     # u32: where the strings end
DEFAULT_CAPACITY = 8192
_MAX_STRING = 400          # bytes of an error message kept (a traceback's last lines)
_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")
_u16 = struct.Struct("<H")
NO_ID = bytes(28)


def error_code(error: BaseException) -> int:
    """The ErrorType a failure with ``error`` is (the task's own exception, else shmray's
    for what happened to it)."""
    for cls in type(error).__mro__:
        code = _CODES.get(cls.__name__)
        if code is not None:
            return code
    return TASK_EXECUTION_EXCEPTION


def error_message(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def log_bytes(capacity: int) -> int:
    """The size of a log holding ``capacity`` records, in whole pages (it is mapped); 0
    when nothing is recorded."""
    if not capacity:
        return 0
    size = STRINGS_BYTES + capacity * RECORD.size
    page = 4096
    return (size + page - 1) // page * page


def capacity_of(options: dict) -> int:
    """The session's per-process log capacity: ``_system_config`` may set it (0: record
    nothing; the state API then lists no tasks)."""
    return _setting(options, "task_events_per_process", DEFAULT_CAPACITY,
                    lambda capacity: capacity == 0 or capacity >= 16,
                    "0 (record no task events) or an int >= 16 (the events each process "
                    "keeps for the state API and the timeline)")


def history_limit(options: dict) -> int:
    """How many tasks the answers remember (Ray's setting and its default); those still
    pending or running are kept beyond it."""
    return _setting(options, "task_events_max_num_task_in_gcs", 100_000,
                    lambda limit: limit >= 1,
                    "an int >= 1 (the tasks the state API remembers)")


def _setting(options: dict, key: str, default: int, valid, meaning: str) -> int:
    """An int ``_system_config`` may set, checked: a ValueError saying what it must be."""
    value = (options.get("_system_config") or {}).get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not valid(value):
        raise ValueError(f"_system_config[{key!r}] must be {meaning}, got {value!r}")
    return value


class EventLog:
    """This process's log, for writing (one per process: ``log``)."""

    def __init__(self, buf, capacity: int):
        self.buf = buf  # a writable buffer of ``log_bytes(capacity)``: mapped, shared
        self.capacity = capacity
        self._counter = itertools.count(1)
        self._strings: Dict[str, int] = {}
        self._strings_used = _STRINGS_USED + 4  # (after the u32 of where they end)
        self._strings_lock = threading.Lock()

    def _sid(self, text: Optional[str]) -> int:
        """The number records name ``text`` by, appending it the first time (0: no text,
        or no room left)."""
        if not text:
            return 0
        sid = self._strings.get(text)
        if sid is not None:
            return sid
        with self._strings_lock:
            sid = self._strings.get(text)
            if sid is not None:
                return sid
            data = text.encode("utf-8", "replace")[:_MAX_STRING]
            end = self._strings_used + 2 + len(data)
            if end > STRINGS_BYTES:
                return 0
            _u16.pack_into(self.buf, self._strings_used, len(data))
            self.buf[self._strings_used + 2 : end] = data
            self._strings_used = end
            _u32.pack_into(self.buf, _STRINGS_USED, end)  # last: a reader sees it whole
            sid = self._strings[text] = len(self._strings) + 1
            return sid

    def writer(self):
        """``write(kind, task_type, task_id, name, ref_id, t, t2, error, message, size)``:
        one record (``t`` 0: now).  A closure over what it uses: a write is on the path of
        every task, where an attribute look-up is a measurable part of its cost."""
        pack, buf, counter, capacity = RECORD.pack_into, self.buf, self._counter, self.capacity
        strings, sid, now = self._strings, self._sid, time.time
        count, counts = _u64.pack_into, [itertools.count(1) for _ in range(3)]

        def write(kind: int, task_type: int, task_id: bytes, name: Optional[str],
                  ref_id: bytes = NO_ID, t: float = 0.0, t2: float = 0.0, error: int = 0,
                  message: Optional[str] = None, size: int = 0) -> None:
            i = next(counter)
            seq = i & 0xFFFFFFFF
            pack(buf, STRINGS_BYTES + (i % capacity) * _SIZE, seq, kind, task_type, error,
                 strings.get(name) or sid(name), sid(message) if message else 0, task_id,
                 ref_id, t or now(), t2, size, seq)
            if kind == SUBMITTED:
                count(buf, 0, next(counts[0]))
            elif kind == ENDED:
                count(buf, 8, next(counts[1]))
                if error:
                    count(buf, 16, next(counts[2]))

        return write


log: Optional[EventLog] = None  # this process's; None: nothing is recorded here
_write: Optional[Callable] = None  # its ``writer()``


def new_log(capacity: int):
    """Memory for a log (None if nothing is recorded): mapped, so that its pages take
    memory only once written, and shared with the processes forked after (the driver's
    is read by the scheduler it forks)."""
    size = log_bytes(capacity)
    return mmap.mmap(-1, size) if size else None


def start(buf, capacity: int) -> Optional[EventLog]:
    """Record this process's events into ``buf`` from now on (None, or a capacity of 0:
    record nothing)."""
    global log, _write
    log = EventLog(buf, capacity) if buf is not None and capacity else None
    _write = log.writer() if log is not None else None
    return log


def stop() -> None:
    """Record nothing more here (the session ended, or this is a child forked from a
    recording process: it writes its own log, or none)."""
    global log, _write
    log = _write = None


os.register_at_fork(after_in_child=stop)


# -- what the recording processes call ------------------------------------------------------

def submitted(task_id: bytes, name: str, task_type: int = NORMAL_TASK,
              ref_id: bytes = NO_ID, at: float = 0.0) -> None:
    """A task submitted (at ``at``, else now): ``ref_id`` names its actor (an actor call or
    creation), or its first ref argument (a task: whose result it may be waiting for)."""
    if _write is not None:
        _write(SUBMITTED, task_type, task_id, name, ref_id, at)


def started(task_id: bytes, name: str, task_type: int = NORMAL_TASK,
            actor_id: bytes = NO_ID, now: float = 0.0) -> float:
    """Record a start (at ``now``, else now); returns its time, for ``ended``.  Where one
    task runs at a time, its start is named in the process's slot instead (``_slot``), for
    less: threaded and async actors, and actor constructors, record theirs."""
    now = now or time.time()
    if _write is not None:
        _write(STARTED, task_type, task_id, name, actor_id, now)
    return now


def ended(task_id: bytes, name: str, began: float, task_type: int = NORMAL_TASK,
          actor_id: bytes = NO_ID, error: int = 0, message: Optional[str] = None,
          at: float = 0.0) -> None:
    """Record an end (at ``at``, else now) of what started at ``began``."""
    if _write is not None:
        _write(ENDED, task_type, task_id, name, actor_id, at, began, error, message)


def failed_unrun(task_id: bytes, name: str, error: int, message: Optional[str] = None,
                 task_type: int = NORMAL_TASK, actor_id: bytes = NO_ID) -> None:
    """A task that ends failed without having run (cancelled while queued, its actor or
    worker gone, an argument failed): an end with no start."""
    ended(task_id, name, 0.0, task_type, actor_id, error, message)


def transfer(kind: int, object_id: bytes, size: int, began: float) -> None:
    """An object spilled to or restored from disk, from ``began`` to now."""
    if _write is not None:
        _write(kind, 0, object_id[:24], None, object_id, 0.0, began, 0, None, size)


# -- reading -------------------------------------------------------------------------------

class Event(NamedTuple):
    seq: int          # order within its log (the full count, not the stored 32 bits)
    kind: int
    task_type: int
    error: int
    name: Optional[str]
    message: Optional[str]
    task_id: bytes
    ref_id: Optional[bytes]  # the actor (calls, creation) or object (transfers); None
    time: float
    time2: float
    size: int


class Reader:
    """Reads one log as it fills: each ``new()`` gives the events written since the last
    (decoding only those), oldest first.  ``buf`` may be written meanwhile: it is copied
    first, and records caught half written are skipped (read next time, if still there)."""

    def __init__(self, buf, capacity: int):
        self.buf = buf
        self.capacity = capacity
        self.last = 0   # the number of the last event read (counting from 1; 0: none yet)
        self.lost = 0   # events overwritten before they were read
        self.strings: List[str] = []
        self._strings_end = _STRINGS_USED + 4  # where the strings read so far end

    def new(self) -> List[Event]:
        capacity = self.capacity
        data = bytes(self.buf[: log_bytes(capacity)])
        self._strings_end = _read_strings(data, self.strings, self._strings_end)
        heads = np.frombuffer(data, np.uint32, capacity * _SIZE // 4, STRINGS_BYTES)[
            :: _SIZE // 4]
        # How far past the last read each slot's record is, in events (uint32 arithmetic
        # wraps as the stored numbers do); fresh records are 1 to 2**31 ahead.
        ahead = heads - np.uint32(self.last & 0xFFFFFFFF)
        fresh = np.flatnonzero((heads != 0) & (ahead != 0) & (ahead < np.uint32(1 << 31)))
        if not len(fresh):
            return []
        order = fresh[np.argsort(ahead[fresh], kind="stable")]
        furthest = int(ahead[order[-1]])
        events = []
        strings = self.strings
        for slot in order.tolist():
            (seq, kind, task_type, error, name, message, task_id, ref_id, t, t2, size,
             check) = RECORD.unpack_from(data, STRINGS_BYTES + slot * _SIZE)
            if seq != check:
                continue
            events.append(Event(self.last + ((seq - self.last) & 0xFFFFFFFF), kind,
                                task_type, error,
                                strings[name - 1] if 0 < name <= len(strings) else None,
                                strings[message - 1] if 0 < message <= len(strings)
                                else None,
                                task_id, None if ref_id == NO_ID else ref_id, t, t2, size))
        self.lost += max(furthest - capacity, 0)
        self.last += furthest
        return events


def counts(buf) -> tuple:
    """(tasks submitted, ended, failed) a log has counted (``Reader`` not needed)."""
    return _COUNTS.unpack_from(buf, 0)


def _read_strings(data: bytes, strings: List[str], at: int) -> int:
    """Append to ``strings`` those the log holds from byte ``at`` on (where the last read
    ended: they are never changed); returns where they end."""
    used = min(_u32.unpack_from(data, _STRINGS_USED)[0], STRINGS_BYTES)
    while at + 2 <= used:
        (length,) = _u16.unpack_from(data, at)
        if at + 2 + length > used:
            break
        strings.append(data[at + 2 : at + 2 + length].decode("utf-8", "replace"))
        at += 2 + length
    return at
