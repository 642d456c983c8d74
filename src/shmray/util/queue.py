"""``shmray.util.queue.Queue``: a first-in first-out queue that tasks and actors share, as
Ray's ``ray.util.queue``; and ``JoinableQueue``, the same with ``task_done``/``join``.

Runs in: any process that makes or uses a queue, and the queue's keeper actor.

The items are in shared memory, in a ring of records (``_ring.c``) that lives in an arena
object: a put or get is a lock, a copy and, if someone sleeps, a futex wake, all in the
calling process, with no message to anyone.  (Ray's queue is an actor, and so was ours: a
round trip to it per item cost ~80 us, 20 times a ``multiprocessing.Queue``.)  A blocked
put or get sleeps in the kernel on a futex word of the ring, holding no thread of anyone
else's.  A Queue pickles as the ring's ObjectRef and its keeper's handle, so passing it to
tasks and actors shares the one queue, and the ring is freed with the last Queue.

What does not go in the ring, and the keeper actor that holds it:

- An item whose pickle is larger than ``RING_ITEM_MAX`` (a numpy array of any size, say)
  is put into the object store by the process that puts it, and only its id goes through
  the ring: the array is copied once, into shared memory, and ``get`` returns a zero-copy
  view of it.  An item holding ObjectRefs or actor handles goes the same way, so that what
  it refers to stays alive while it waits in the queue.  The keeper holds the refs of
  such items until a get has taken them.
- A queue without ``maxsize`` takes every put, even when its ring is full of records: the
  items that don't fit go to the keeper, and the ring counts them in order (see
  ``_ring.c``), so the queue is as unbounded as Ray's, at actor speed while it overflows.

``Empty`` and ``Full`` are the standard library's ``queue.Empty`` and ``queue.Full`` too, so
code written for ``queue.Queue`` or ``multiprocessing.Queue`` catches them unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue as _stdlib_queue
import time
import weakref
from collections.abc import Iterable
from typing import Any, Dict, List, Optional

import numpy as np

from .. import _session
from .._actor import kill
from .._api import get, put, remote, wait
from .._object_ref import ObjectRef
from .._ring import Ring, RingClosed, deadline_after
from .._serialization import ALIGN, deserialize_inline, serialize

RING_BYTES = 256 * 1024  # a queue costs this much of the arena however little it holds
RING_ITEM_MAX = 32 * 1024
_IN_RING = b"I"    # a record's first byte: the item's pickle follows
_IN_STORE = b"S"   # ... the id of the object holding the item follows
_REF_IN_STORE = b"R"  # ... the id of an object holding [the item], an ObjectRef
_NO_WAIT = 0.0     # a deadline that has passed already
_ASYNC_SLICE = 0.5  # longest wait of a thread behind put_async/get_async
_local_rings: "weakref.WeakValueDictionary[bytes, np.ndarray]" = weakref.WeakValueDictionary()


class Empty(_stdlib_queue.Empty):
    """get() found nothing (or nothing within its timeout)."""


class Full(_stdlib_queue.Full):
    """put() found no room (or none within its timeout)."""


def _new_ring_memory(runtime):
    """Memory for a ring, and the token that finds it again in any process of the session:
    an arena object's ref; in local mode, where every process is this one, a key."""
    if getattr(runtime, "local_mode", False):
        room = np.zeros(RING_BYTES + ALIGN, np.uint8)
        skip = (-room.ctypes.data) % ALIGN
        memory = room[skip : skip + RING_BYTES]
        key = os.urandom(16)
        _local_rings[key] = memory
        return key, memory
    token = put(np.zeros(RING_BYTES, np.uint8))
    return token, get(token)


def _ring_memory(token):
    if isinstance(token, ObjectRef):
        return get(token)  # a read-only view of the arena, pinned while the ring uses it
    memory = _local_rings.get(token)
    if memory is None:
        raise RuntimeError("this queue's ring is gone: its session ended")
    return memory


def _open_ring(token) -> Ring:
    memory = _ring_memory(token)
    return Ring(memory, memory.ctypes.data)


class _Keeper:
    """The actor behind a queue: holds the refs of items in the store while they wait in
    the queue, and the items that overflowed the ring.  Gets and puts that fit the ring
    never come here."""

    def __init__(self, token_in_list: list):
        self.ring = _open_ring(token_in_list[0])
        self.overflow: collections.deque = collections.deque()
        self.held: Dict[bytes, ObjectRef] = {}
        self.dropped_early: set = set()

    async def qsize(self) -> int:
        return self.ring.counts()[0]

    async def push(self, payloads: list) -> None:
        self.overflow.extend(payloads)
        self.ring.arrived(len(payloads))

    async def pop(self, count: int) -> list:
        return [self.overflow.popleft() for _ in range(count)]

    async def hold(self, refs: list) -> None:
        for ref in refs:
            if ref.binary() in self.dropped_early:
                self.dropped_early.discard(ref.binary())
            else:
                self.held[ref.binary()] = ref

    async def drop(self, ids: list) -> None:
        # A get's drop may overtake the put's hold: they come from different processes.
        for object_id in ids:
            if self.held.pop(object_id, None) is None:
                self.dropped_early.add(object_id)


class Queue:
    """A FIFO queue shared by the processes it is passed to (Ray's ``ray.util.queue.Queue``).

    ``maxsize`` <= 0 means no limit; ``actor_options`` are options for the keeper actor
    (``num_cpus``, ``name``, ...)."""

    def __init__(self, maxsize: int = 0, actor_options: Optional[Dict[str, Any]] = None):
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"maxsize must be an int, got {maxsize!r}")
        self.maxsize = maxsize
        token, memory = _new_ring_memory(_session.current())
        self._opened = Ring.format(memory, memory.ctypes.data, RING_BYTES, max(maxsize, 0))
        self._token = token
        options = {"num_cpus": 0, **(actor_options or {})}
        self.actor = remote(_Keeper).options(**options).remote([token])

    def __reduce__(self):
        return _rebuild, (type(self), self.maxsize, self.actor, self._token)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """How many items the queue holds now."""
        return self._counts()[0]

    qsize = size

    def empty(self) -> bool:
        return self.size() == 0

    def full(self) -> bool:
        return self.maxsize > 0 and self.size() >= self.maxsize

    def put(self, item, block: bool = True, timeout: Optional[float] = None) -> None:
        """Add ``item``; if the queue is full, wait (up to ``timeout`` s) unless ``block``
        is False, then raise Full."""
        deadline = deadline_after(_checked(timeout)) if block else _NO_WAIT
        if not self._put([item], deadline):
            raise self._full(timeout if block else None)

    async def put_async(self, item, block: bool = True,
                        timeout: Optional[float] = None) -> None:
        deadline = deadline_after(_checked(timeout)) if block else _NO_WAIT
        while not self._put([item], _NO_WAIT):
            if not block or not await self._wait_async(True, deadline):
                raise self._full(timeout if block else None)

    def get(self, block: bool = True, timeout: Optional[float] = None):
        """Take the oldest item; if there is none, wait (up to ``timeout`` s) unless
        ``block`` is False, then raise Empty."""
        deadline = deadline_after(_checked(timeout)) if block else _NO_WAIT
        taken = self._take(1, deadline)
        if taken is None:
            raise _empty(timeout if block else None)
        return taken[0]

    async def get_async(self, block: bool = True, timeout: Optional[float] = None):
        deadline = deadline_after(_checked(timeout)) if block else _NO_WAIT
        while True:
            taken = self._take(1, _NO_WAIT)
            if taken is not None:
                return taken[0]
            if not block or not await self._wait_async(False, deadline):
                raise _empty(timeout if block else None)

    def put_nowait(self, item) -> None:
        self.put(item, block=False)

    def get_nowait(self):
        return self.get(block=False)

    def put_nowait_batch(self, items) -> None:
        """Add all of ``items`` at once, or none (Full) if they don't all fit."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        items = list(items)
        if items and not self._put(items, _NO_WAIT):
            raise Full(f"Cannot add {len(items)} items to queue of size {self.size()} and "
                       f"maxsize {self.maxsize}.")

    def get_nowait_batch(self, num_items: int) -> List[Any]:
        """Take ``num_items`` items at once, or none (Empty) if there are fewer."""
        if not isinstance(num_items, int) or isinstance(num_items, bool):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        if num_items == 0:
            return []
        taken = self._take(num_items, _NO_WAIT)
        if taken is None:
            raise Empty(f"Cannot get {num_items} items from queue of size {self.size()}.")
        return taken

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """Shut the queue for every process that shares it (their calls raise from now on)
        and end its keeper: at once with ``force``, else once the calls made to it before
        are done, or after ``grace_period_s`` at most."""
        actor, self.actor = self.actor, None
        if actor is None:
            return
        try:
            self._ring.close()
        except RingClosed:
            pass
        if not force:
            ready, _ = wait([actor.__ray_terminate__.remote()], timeout=grace_period_s)
            if ready:
                return
        kill(actor, no_restart=True)

    # -- the ring and the keeper ------------------------------------------------------------

    @property
    def _ring(self) -> Ring:
        # Opened at first use, not when unpickled: unpickling runs inside the runtime's
        # own calls (a task's arguments), where a get can't.
        if self._opened is None:
            self._opened = _open_ring(self._token)
        return self._opened

    def _keeper(self):
        if self.actor is None:
            raise RuntimeError("this queue was shut down (Queue.shutdown()); make a new one")
        return self.actor

    def _full(self, timeout: Optional[float]) -> Full:
        within = "" if timeout is None else f" within {timeout} s"
        return Full(f"no room in the queue (maxsize {self.maxsize}){within}")

    async def _wait_async(self, for_room: bool, deadline: Optional[float]) -> bool:
        """Wait in a thread until the queue has an item (room for one), taking nothing: a
        caller cancelled meanwhile loses no item, and puts none.  The thread waits a slice
        at a time, so none is left waiting behind a cancelled caller."""
        keeper = self._keeper()
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            return False
        limit = now + _ASYNC_SLICE if deadline is None else min(deadline, now + _ASYNC_SLICE)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self._ring.wait, for_room, limit)
        except RingClosed:
            raise _closed_error(keeper) from None
        return True  # the caller tries again (and comes back here if it lost the race)

    def _counts(self):
        keeper = self._keeper()
        try:
            return self._ring.counts()
        except RingClosed:
            raise _closed_error(keeper) from None

    def _put(self, items: list, deadline: Optional[float]) -> bool:
        """Whether the items went in (all of them, in order) by ``deadline``."""
        keeper = self._keeper()
        payloads, refs = [], []
        for item in items:
            if isinstance(item, ObjectRef):  # put() takes no bare ref: it goes in a list
                ref = put([item])
                refs.append(ref)
                payloads.append(_REF_IN_STORE + ref.binary())
                continue
            serialized = serialize(item)
            if serialized.contained_refs or serialized.total_size > RING_ITEM_MAX:
                ref = put(serialized)  # stored as it is: not pickled a second time
                refs.append(ref)
                payloads.append(_IN_STORE + ref.binary())
            else:
                payloads.append(_IN_RING + serialized.to_bytes())
        if refs:  # sent before the ids enter the ring, so the keeper's hold is never late
            keeper.hold.remote(refs)
        try:
            overflowed = self._ring.put(payloads, deadline)
        except RingClosed:
            raise _closed_error(keeper) from None
        if overflowed is None:
            if refs:
                keeper.drop.remote([ref.binary() for ref in refs])
            return False
        if overflowed:
            get(keeper.push.remote(payloads))
        return True

    def _take(self, count: int, deadline: Optional[float]) -> Optional[list]:
        """``count`` items, oldest first, or None if there were not that many by
        ``deadline``."""
        keeper = self._keeper()
        try:
            taken = self._ring.get(count, deadline)
        except RingClosed:
            raise _closed_error(keeper) from None
        if taken is None:
            return None
        payloads, overflowed = taken
        if overflowed:
            payloads += get(keeper.pop.remote(overflowed))
        values, stored = [], []
        for payload in payloads:
            if payload[:1] == _IN_RING:
                values.append(deserialize_inline(memoryview(payload)[1:]))
            else:
                ref = ObjectRef(payload[1:])
                value = get(ref)
                values.append(value[0] if payload[:1] == _REF_IN_STORE else value)
                stored.append(ref.binary())
        if stored:
            keeper.drop.remote(stored)
        return values


class JoinableQueue(Queue):
    """A Queue that counts unfinished items, as ``multiprocessing.JoinableQueue``: each put
    adds one, each ``task_done()`` takes one off, and ``join()`` waits until none is left.
    Unlike multiprocessing's, it can be passed to tasks and actors at any time."""

    _closed_here = False  # close() was called in this process

    def task_done(self) -> None:
        """Say that an item taken from the queue has been processed."""
        keeper = self._keeper()
        try:
            done = self._ring.task_done(1)
        except RingClosed:
            raise _closed_error(keeper) from None
        if not done:
            raise ValueError("task_done() called too many times")

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until every item put has been processed (``task_done()`` called for it);
        with ``timeout``, for at most that long: returns whether they were."""
        keeper = self._keeper()
        try:
            return self._ring.join(deadline_after(_checked(timeout)))
        except RingClosed:
            raise _closed_error(keeper) from None

    def unfinished(self) -> int:
        """How many items were put and not yet marked done."""
        return self._counts()[1]

    # multiprocessing's queues have these for their feeder thread, which a put into shared
    # memory does not need: what was put is in the queue when put() returns.
    def close(self) -> None:
        """No more puts from this process (multiprocessing's ``close``)."""
        self._closed_here = True

    def join_thread(self) -> None:
        """Nothing to wait for: there is no feeder thread."""

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: there is no feeder thread."""

    def _put(self, items: list, deadline: Optional[float]) -> bool:
        if self._closed_here:
            raise ValueError(f"Queue {self!r} is closed")
        return super()._put(items, deadline)


def _empty(timeout: Optional[float]) -> Empty:
    return Empty("the queue is empty" if timeout is None else
                 f"nothing arrived in the queue within {timeout} s")


def _closed_error(keeper) -> RuntimeError:
    return RuntimeError(f"the queue was shut down (Queue.shutdown(), keeper {keeper!r}); "
                        "make a new one")


def _checked(timeout: Optional[float]) -> Optional[float]:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return timeout


def _rebuild(cls, maxsize: int, actor, token) -> Queue:
    rebuilt = cls.__new__(cls)
    rebuilt.maxsize, rebuilt.actor, rebuilt._token = maxsize, actor, token
    rebuilt._opened = None
    return rebuilt


__all__ = ["Empty", "Full", "JoinableQueue", "Queue"]
