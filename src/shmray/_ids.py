"""Binary identifiers for tasks and objects, shaped like Ray's.

Runs in: every process.

A TaskID is 24 bytes: a 16-byte prefix drawn at random once per process (and again in a
forked child) followed by a 64-bit counter, so ids are unique across the session without
asking anyone and cost a counter increment, not a system call.  An ObjectID is 28 bytes: the
id of the task that produces it and a 4-byte index, as in Ray.  Return value ``i`` of a task
has index ``i + 1``; ``put`` makes a fresh TaskID and uses index 0.
"""

from __future__ import annotations

import itertools
import os
import struct

from ._object_store import LENT_MARK

TASK_ID_SIZE = 24
OBJECT_ID_SIZE = 28  # == SHM_ID_SIZE in _store.h

_index = struct.Struct("<I")
_counter_bytes = struct.Struct("<Q")


class _IdSource:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(16)
        while self.prefix.startswith(LENT_MARK):  # ids of buffers lent to numpy start so
            self.prefix = os.urandom(16)
        self.counter = itertools.count(1)  # next() on it is atomic under the GIL


_source = _IdSource()
_FIRST_INDEX = _index.pack(1)
os.register_at_fork(after_in_child=_source.reset)


def new_task_id() -> bytes:
    return _source.prefix + _counter_bytes.pack(next(_source.counter))


def object_id_for_return(task_id: bytes, index: int) -> bytes:
    return task_id + _index.pack(index + 1)


def first_return_id(task_id: bytes) -> bytes:
    """``object_id_for_return(task_id, 0)``, on the paths every task takes."""
    return task_id + _FIRST_INDEX


def object_id_for_put() -> bytes:
    return new_task_id() + _index.pack(0)


def task_id_of(object_id: bytes) -> bytes:
    return object_id[:TASK_ID_SIZE]
