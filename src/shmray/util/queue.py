"""``shmray.util.queue.Queue``: a first-in first-out queue that tasks and actors share, as
Ray's ``ray.util.queue``.

Runs in: any process that makes or uses a queue; the queue itself lives in an actor.

The items live in an async actor, which holds an ``asyncio.Queue``: a blocked ``put`` or
``get`` is an awaiting call there, so any number of them wait at once without holding a
thread, and the queue serves others meanwhile.  A Queue pickles as its actor's handle, so
passing it to tasks and actors shares the one queue.  ``Empty`` and ``Full`` are the
standard library's ``queue.Empty`` and ``queue.Full`` too, so code written for
``queue.Queue`` or ``multiprocessing.Queue`` catches them unchanged.

An item too large to travel inline in a message (a numpy array of 100 KiB or more, say) is
put into the object store by the process that puts it, and only its ref goes through the
actor: the array is copied once, into shared memory, and ``get`` returns a zero-copy view of
it, where passing the item itself would have the actor hold it and copy it out again.
"""

from __future__ import annotations

import asyncio
import queue as _stdlib_queue
from collections.abc import Iterable
from typing import Any, Dict, List, Optional

from .._actor import kill
from .._api import get, put, remote, wait
from .._runtime.objects import INLINE_THRESHOLD
from .._serialization import SCALARS, serialize


class Empty(_stdlib_queue.Empty):
    """get() found nothing (or nothing within its timeout)."""


class Full(_stdlib_queue.Full):
    """put() found no room (or none within its timeout)."""


class _Stored:
    """A large item in the object store: the queue's actor holds this ref, not the item."""

    __slots__ = ("ref",)

    def __init__(self, ref):
        self.ref = ref

    def __reduce__(self):
        return _Stored, (self.ref,)


def _stored_if_large(item):
    if type(item) in SCALARS or serialize(item).total_size < INLINE_THRESHOLD:
        return item
    return _Stored(put(item))


def _fetched(item):
    return get(item.ref) if type(item) is _Stored else item


class _Items:
    """The actor holding a queue's items.  What could not be done comes back as a value, not
    an exception, so the caller raises a plain Empty or Full, with no remote traceback."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.items: asyncio.Queue = asyncio.Queue(maxsize)

    async def qsize(self) -> int:
        return self.items.qsize()

    async def put(self, item, timeout: Optional[float]) -> bool:
        if not self.items.full():  # the common case: no wait_for, whose timeout costs a task (9 us)
            self.items.put_nowait(item)
            return True
        try:
            await asyncio.wait_for(self.items.put(item), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def get(self, timeout: Optional[float]) -> tuple:
        if not self.items.empty():
            return True, self.items.get_nowait()
        try:
            return True, await asyncio.wait_for(self.items.get(), timeout)
        except asyncio.TimeoutError:
            return False, None

    async def put_nowait(self, item) -> bool:
        try:
            self.items.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    async def get_nowait(self) -> tuple:
        try:
            return True, self.items.get_nowait()
        except asyncio.QueueEmpty:
            return False, None

    async def put_nowait_batch(self, items: list) -> int:
        """How many items were there, if the batch did not fit (-1 if it did)."""
        if self.maxsize > 0 and len(items) + self.items.qsize() > self.maxsize:
            return self.items.qsize()
        for item in items:
            self.items.put_nowait(item)
        return -1

    async def get_nowait_batch(self, num_items: int) -> tuple:
        if num_items > self.items.qsize():
            return False, self.items.qsize()
        return True, [self.items.get_nowait() for _ in range(num_items)]


class Queue:
    """A FIFO queue shared by the processes it is passed to (Ray's ``ray.util.queue.Queue``).

    ``maxsize`` <= 0 means no limit; ``actor_options`` are options for the actor that holds
    the items (``num_cpus``, ``name``, ...)."""

    def __init__(self, maxsize: int = 0, actor_options: Optional[Dict[str, Any]] = None):
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"maxsize must be an int, got {maxsize!r}")
        self.maxsize = maxsize
        options = {"num_cpus": 0, **(actor_options or {})}
        self.actor = remote(_Items).options(**options).remote(maxsize)

    def __reduce__(self):
        return _rebuild, (self.maxsize, self.actor)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """How many items the queue holds now."""
        return get(self._items().qsize.remote())

    qsize = size

    def empty(self) -> bool:
        return self.size() == 0

    def full(self) -> bool:
        return self.maxsize > 0 and self.size() >= self.maxsize

    def put(self, item, block: bool = True, timeout: Optional[float] = None) -> None:
        """Add ``item``; if the queue is full, wait (up to ``timeout`` s) unless ``block``
        is False, then raise Full."""
        timeout = _checked(timeout) if block else None
        item = _stored_if_large(item)
        if not block:
            _put_done(get(self._items().put_nowait.remote(item)), self.maxsize, None)
        else:
            _put_done(get(self._items().put.remote(item, timeout)), self.maxsize, timeout)

    async def put_async(self, item, block: bool = True,
                        timeout: Optional[float] = None) -> None:
        timeout = _checked(timeout) if block else None
        item = _stored_if_large(item)
        if not block:
            _put_done(await self._items().put_nowait.remote(item), self.maxsize, None)
        else:
            _put_done(await self._items().put.remote(item, timeout), self.maxsize, timeout)

    def get(self, block: bool = True, timeout: Optional[float] = None):
        """Take the oldest item; if there is none, wait (up to ``timeout`` s) unless
        ``block`` is False, then raise Empty."""
        if not block:
            return _got(get(self._items().get_nowait.remote()), None)
        return _got(get(self._items().get.remote(_checked(timeout))), timeout)

    async def get_async(self, block: bool = True, timeout: Optional[float] = None):
        if not block:
            return _got(await self._items().get_nowait.remote(), None)
        return _got(await self._items().get.remote(_checked(timeout)), timeout)

    def put_nowait(self, item) -> None:
        self.put(item, block=False)

    def get_nowait(self):
        return self.get(block=False)

    def put_nowait_batch(self, items) -> None:
        """Add all of ``items`` at once, or none (Full) if they don't all fit."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        items = [_stored_if_large(item) for item in items]
        size = get(self._items().put_nowait_batch.remote(items))
        if size >= 0:
            raise Full(f"Cannot add {len(items)} items to queue of size {size} and maxsize "
                       f"{self.maxsize}.")

    def get_nowait_batch(self, num_items: int) -> List[Any]:
        """Take ``num_items`` items at once, or none (Empty) if there are fewer."""
        if not isinstance(num_items, int) or isinstance(num_items, bool):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        done, got = get(self._items().get_nowait_batch.remote(num_items))
        if not done:
            raise Empty(f"Cannot get {num_items} items from queue of size {got}.")
        return got

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """End the actor holding the items: at once with ``force``, else once the calls
        made before are done, or after ``grace_period_s`` at most."""
        actor, self.actor = self.actor, None
        if actor is None:
            return
        if not force:
            ready, _ = wait([actor.__ray_terminate__.remote()], timeout=grace_period_s)
            if ready:
                return
        kill(actor, no_restart=True)

    def _items(self):
        if self.actor is None:
            raise RuntimeError("this queue was shut down (Queue.shutdown()); make a new one")
        return self.actor


def _put_done(done: bool, maxsize: int, timeout: Optional[float]) -> None:
    if not done:
        within = "" if timeout is None else f" within {timeout} s"
        raise Full(f"no room in the queue (maxsize {maxsize}){within}")


def _got(answer: tuple, timeout: Optional[float]):
    found, item = answer
    if not found:
        raise Empty("the queue is empty" if timeout is None else
                    f"nothing arrived in the queue within {timeout} s")
    return _fetched(item)


def _checked(timeout: Optional[float]) -> Optional[float]:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return timeout


def _rebuild(maxsize: int, actor) -> Queue:
    rebuilt = Queue.__new__(Queue)
    rebuilt.maxsize, rebuilt.actor = maxsize, actor
    return rebuilt


__all__ = ["Empty", "Full", "Queue"]
