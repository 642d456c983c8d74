"""The Python face of ``_ring.c``: a FIFO of byte records in memory that processes share.

Runs in: every process that uses a ``shmray.util.queue.Queue`` (and its keeper actor).

A ``Ring`` wraps memory that something else keeps alive and shared (a pinned arena view, or
a private buffer in local mode) and holds a reference to it, so the memory outlives the
ring.  Records are ``bytes``; framing them (a u64 length, padding to 8) happens here, so a
batch crosses the C boundary as one buffer, under one lock.

Waits are sliced: C sleeps at most ``_SLICE`` seconds per call and Python loops until the
deadline, so Ctrl-C and signal handlers run within a slice, not at the end of a long wait.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

from ._store_cffi import ffi, lib
from .exceptions import RaySystemError

HEADER_SIZE = lib.shm_ring_header_size()
_SLICE = 0.1
_NS = 1_000_000_000
_length = struct.Struct("<Q")
_PADDING = [b"\0" * ((8 - n) % 8) for n in range(8)]


class RingClosed(Exception):
    """The ring was shut down (by any process)."""


class _Scratch(threading.local):
    """Each thread's buffer for records coming out of a ring, grown as needed."""

    buffer = bytearray(64 * 1024)


_scratch = _Scratch()


def frame(payloads: Sequence[bytes]) -> bytes:
    parts = []
    for payload in payloads:
        parts += (_length.pack(len(payload)), payload, _PADDING[len(payload) % 8])
    return b"".join(parts)


def _unframe(data, size: int) -> List[bytes]:
    records, position = [], 0
    while position < size:
        (n,) = _length.unpack_from(data, position)
        records.append(bytes(data[position + 8 : position + 8 + n]))
        position += 8 + n + (-n) % 8
    return records


def _check(status: int) -> None:
    if status == lib.SHM_OK:
        return
    if status == lib.SHM_ERR_CLOSED:
        raise RingClosed()
    if status == lib.SHM_ERR_INVALID:
        raise ValueError("invalid call on a queue's ring (bad arguments or not a ring)")
    raise RaySystemError(f"a queue's ring failed (status {status}): its memory may be damaged")


class Ring:
    """A ring in ``memory`` (an object exposing the buffer protocol, 64-byte aligned)."""

    def __init__(self, memory, address: int):
        self._memory = memory  # keeps the bytes mapped and pinned while this ring lives
        self._ring = ffi.cast("void *", address)

    @classmethod
    def format(cls, memory, address: int, size: int, max_items: int) -> "Ring":
        _check(lib.shm_ring_format(ffi.cast("void *", address), size, max_items))
        return cls(memory, address)

    def put(self, payloads: Sequence[bytes], deadline: Optional[float]) -> Optional[bool]:
        """Add the records, all or none: None if there was no room by ``deadline`` (None:
        wait for as long as it takes; 0: don't wait), else whether they overflowed (the
        caller must then hand them to the keeper)."""
        records = frame(payloads)
        overflow = ffi.new("int *")
        if not _waited(lambda wait_ns: lib.shm_ring_put(
                self._ring, records, len(records), len(payloads), wait_ns, overflow),
                lib.SHM_ERR_FULL, deadline):
            return None
        return bool(overflow[0])

    def get(self, count: int, deadline: Optional[float]) -> Optional[Tuple[List[bytes], int]]:
        """Take ``count`` items, all or none: None if there were not that many by
        ``deadline``; else the records from the ring, and how many more items to fetch
        from the keeper."""
        size, overflow = ffi.new("uint64_t *"), ffi.new("uint64_t *")

        def attempt(wait_ns: int) -> int:
            while True:
                buffer = _scratch.buffer
                status = lib.shm_ring_get(self._ring, ffi.from_buffer(buffer), len(buffer),
                                          count, wait_ns, size, overflow)
                if status != lib.SHM_ERR_BUFFER:
                    return status
                _scratch.buffer = bytearray(max(size[0], 2 * len(buffer)))

        if not _waited(attempt, lib.SHM_ERR_EMPTY, deadline):
            return None
        return _unframe(_scratch.buffer, size[0]), overflow[0]

    def wait(self, for_room: bool, deadline: Optional[float]) -> bool:
        """Whether the queue had an item (``for_room``: room for one) by ``deadline``;
        takes or puts nothing."""
        return _waited(lambda wait_ns: lib.shm_ring_wait(self._ring, for_room, wait_ns),
                       lib.SHM_ERR_FULL if for_room else lib.SHM_ERR_EMPTY, deadline)

    def arrived(self, count: int) -> None:
        _check(lib.shm_ring_arrived(self._ring, count))

    def task_done(self, count: int = 1) -> bool:
        """False if more items would be done than were put."""
        status = lib.shm_ring_task_done(self._ring, count)
        if status == lib.SHM_ERR_INVALID:
            return False
        _check(status)
        return True

    def join(self, deadline: Optional[float]) -> bool:
        """Whether every item put was processed by ``deadline``."""
        return _waited(lambda wait_ns: lib.shm_ring_join(self._ring, wait_ns),
                       lib.SHM_ERR_EMPTY, deadline)

    def close(self) -> None:
        _check(lib.shm_ring_close(self._ring))

    def counts(self) -> Tuple[int, int]:
        """How many items are in the queue, and how many are not yet processed."""
        items, unfinished = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        _check(lib.shm_ring_counts(self._ring, items, unfinished))
        return items[0], unfinished[0]


def _waited(attempt: Callable[[int], int], missing: int, deadline: Optional[float]) -> bool:
    """Call ``attempt(wait_ns)`` a slice at a time until it returns other than ``missing``
    (checked: True) or ``deadline`` passes (False)."""
    while True:
        status = attempt(_slice(deadline))
        if status != missing:
            _check(status)
            return True
        if _past(deadline):
            return False


def deadline_after(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _slice(deadline: Optional[float]) -> int:
    if deadline is None:
        return int(_SLICE * _NS)
    if deadline == 0:
        return 0
    return int(min(_SLICE, max(0.0, deadline - time.monotonic())) * _NS)


def _past(deadline: Optional[float]) -> bool:
    return deadline is not None and (deadline == 0 or time.monotonic() >= deadline)
