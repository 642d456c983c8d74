"""A process's slot: memory the scheduler shares with each worker and actor it starts.

Runs in: the scheduler (which makes the slots and reads them), workers and actors (each
writes its own).

What a process must tell the scheduler even if it dies the next instant goes here, not in a
message: which task it started, and the reports of finished work it holds back while it
runs the next (a message per short task would cost more than the task).  The scheduler
reads the slot when the process dies (``parked_reports``).  After the slot, in the same
memory, comes the process's event log (``_events``), which the scheduler reads when asked
what happened (``_scheduler.state``).
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
from typing import Optional

from ._protocol import RESULT, result

# A worker's slot: shared memory the scheduler maps before forking it.  An actor process has
# one too, of which it uses the parked reports (DIRECT_DONE or RESULT: ``Worker.report``)
# and, a sync actor, the call it started.
#   [0:24]   the task a SIGINT from the scheduler is meant for (the scheduler writes it)
#   [24:48]  the last task the worker started (the worker writes it; the scheduler clears it
#            before it gives an idle worker work)
#   [48:56]  u64 how many CANCEL_CALLs the scheduler has sent it: between tasks it reads its
#            socket only while it has handled fewer (a poll(2) per task costs more than the
#            task, for short ones)
#   [56:64]  u64 bytes parked after [72]
#   [64:72]  f64 when it started [24:48] (``time.time()``): what the state API lists as
#            running is read here, not logged (``_events``: a log record costs more)
#   [72:]    the reports of the replies the worker holds
#            back (TASK_DONE, DIRECT_DONE, or a leased task's RESULT) one after another:
#            the scheduler reads them if it dies.  Each is pickled, but for a RESULT of one
#            result, the reply held back in a burst of leased tasks, which has a record of
#            its own (``_RESULT_RECORD``): a third of the cost of a pickle, on every task.
SLOT_SIZE = 1 << 18
SLOT_TARGET = slice(0, 24)
SLOT_STARTED = slice(24, 48)
SLOT_CANCELS = 48
SLOT_PARKED = 56
SLOT_STARTED_AT = 64
PARKED_START = SLOT_STARTED_AT + 8
_u64 = struct.Struct("<Q")
_f64 = struct.Struct("<d")
# tag, task id, object id, bytes of data (or _IN_ARENA) and of metadata; then both
_RESULT_RECORD = struct.Struct("<B24s28sII")
_RESULT_TAG = 1                # no pickle starts with it (they start with PROTO, 0x80)
_IN_ARENA = 0xFFFFFFFF         # data None: the object is sealed in the arena


class Slot(mmap.mmap):
    """A process's slot, with its event log (``events``) mapped after it."""

    events: Optional[mmap.mmap] = None


def map_slot(fd: int, events_size: int) -> Slot:
    """Map the slot and event log a memfd of ``SLOT_SIZE + events_size`` bytes holds."""
    slot = Slot(fd, SLOT_SIZE)
    if events_size:
        slot.events = mmap.mmap(fd, events_size, offset=SLOT_SIZE)
    return slot


def new_slot(events_size: int) -> Slot:
    """A new slot and event log, in memory that processes forked after share."""
    fd = os.memfd_create("shmray-slot", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SLOT_SIZE + events_size)
        return map_slot(fd, events_size)
    finally:
        os.close(fd)


def mark_started(slot, task_id: bytes, at: float) -> None:
    """Name the task this process starts, and when (the time first: a reader that sees the
    new task sees its time)."""
    _f64.pack_into(slot, SLOT_STARTED_AT, at)
    slot[SLOT_STARTED] = task_id


def mark_ended(slot) -> None:
    """The task named started has ended (its name stays: the scheduler reads which task a
    process that dies last started)."""
    _f64.pack_into(slot, SLOT_STARTED_AT, 0.0)


def running(slot) -> Optional[tuple]:
    """(task id, when it started) of the task the process runs; None if none, or if it was
    just changing (read again next time)."""
    task_id = bytes(slot[SLOT_STARTED])
    (at,) = _f64.unpack_from(slot, SLOT_STARTED_AT)
    if not at or task_id == bytes(24) or bytes(slot[SLOT_STARTED]) != task_id:
        return None
    return task_id, at


def count_cancel(slot) -> None:
    _u64.pack_into(slot, SLOT_CANCELS, _u64.unpack_from(slot, SLOT_CANCELS)[0] + 1)


def cancels_sent(slot) -> int:
    return _u64.unpack_from(slot, SLOT_CANCELS)[0]


def parking_pickler(slot) -> pickle.Pickler:
    """What pickles reports into a slot (``park_report``): straight into it, at the slot's
    file position, which only parking moves (not pickled to bytes, then copied)."""
    clear_parked(slot)
    return pickle.Pickler(slot, protocol=5)


def park_report(slot, pickler: pickle.Pickler, end: int, message: tuple) -> int:
    """Append a held-back report at ``end`` (``PARKED_START`` when none is parked), then
    count it; the new end, or 0 if it does not fit."""
    if message[0] == RESULT and len(message[2]) == 1:
        ((object_id, data, metadata),) = message[2]  # data: bytes, or None (in the arena)
        start = end + _RESULT_RECORD.size
        size = 0 if data is None else len(data)
        new_end = start + size + len(metadata)
        if new_end > len(slot):
            return 0
        _RESULT_RECORD.pack_into(slot, end, _RESULT_TAG, message[1], object_id,
                                 _IN_ARENA if data is None else size, len(metadata))
        if size:
            slot[start : start + size] = data
        if metadata:
            slot[start + size : new_end] = metadata
        _u64.pack_into(slot, SLOT_PARKED, new_end - PARKED_START)  # last: a death before
        return new_end                                            # leaves the rest whole
    slot.seek(end)
    try:
        pickler.dump(message)
    except ValueError:  # past the end (mmap.write)
        return 0
    finally:
        pickler.clear_memo()  # each stands alone
    end = slot.tell()
    _u64.pack_into(slot, SLOT_PARKED, end - PARKED_START)
    return end


def clear_parked(slot) -> None:
    _u64.pack_into(slot, SLOT_PARKED, 0)


def parked_reports(slot) -> list:
    """The reports parked in a dead process's slot (a RESULT's ``took`` is not kept)."""
    if slot is None:
        return []
    used = _u64.unpack_from(slot, SLOT_PARKED)[0]
    parked = slot[PARKED_START : PARKED_START + used]
    stream = io.BytesIO(parked)
    messages = []
    position = 0
    while position < used:
        if parked[position] != _RESULT_TAG:
            stream.seek(position)
            messages.append(pickle.load(stream))
            position = stream.tell()
            continue
        _, task_id, object_id, size, metadata_size = _RESULT_RECORD.unpack_from(parked,
                                                                                position)
        position += _RESULT_RECORD.size
        if size == _IN_ARENA:
            data = None
        else:
            data = parked[position : position + size]
            position += size
        metadata = parked[position : position + metadata_size]
        position += metadata_size
        messages.append(result(task_id, [(object_id, data, metadata)], [], 0.0, False))
    return messages
