"""``shmray.util.ActorPool``: spread work over a fixed set of actors, as Ray's ActorPool.

Runs in: the driver (or any process that holds the actors' handles).

Pure Python on top of actor calls: each actor takes one job at a time; ``map`` keeps the
input order, ``map_unordered`` yields results as they finish; ``submit``/``get_next`` give
the same control by hand.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, List, Optional

from ._api import get, wait
from .exceptions import GetTimeoutError


class ActorPool:
    """A pool of actors that take one job each: ``fn(actor, value)`` must return an ObjectRef."""

    def __init__(self, actors: List[Any]):
        self._idle = list(actors)
        self._future_to_actor: dict = {}   # ref -> (index, actor)
        self._index_to_future: dict = {}   # submission index -> ref
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending: collections.deque = collections.deque()  # (fn, value) waiting for an actor

    def map(self, fn: Callable, values: Iterable) -> Iterable:
        """Results of ``fn(actor, v)`` for each v, in input order."""
        while self.has_next():  # results of earlier submissions are discarded, as in Ray
            self.get_next_unordered()
        for value in values:
            self.submit(fn, value)
        while self.has_next():
            yield self.get_next()

    def map_unordered(self, fn: Callable, values: Iterable) -> Iterable:
        """Results of ``fn(actor, v)`` for each v, as they finish."""
        while self.has_next():
            self.get_next_unordered()
        for value in values:
            self.submit(fn, value)
        while self.has_next():
            yield self.get_next_unordered()

    def submit(self, fn: Callable, value) -> None:
        """Run ``fn(actor, value)`` on an idle actor, or as soon as one is free."""
        if self._idle:
            actor = self._idle.pop()
            ref = fn(actor, value)
            self._future_to_actor[ref] = (self._next_task_index, actor)
            self._index_to_future[self._next_task_index] = ref
            self._next_task_index += 1
        else:
            self._pending.append((fn, value))

    def has_next(self) -> bool:
        return bool(self._future_to_actor) or bool(self._pending)

    def get_next(self, timeout: Optional[float] = None, ignore_if_timedout: bool = False):
        """The next result in submission order."""
        if not self.has_next():
            raise StopIteration("the pool has no submitted work left to return")
        if self._next_return_index >= self._next_task_index:
            raise ValueError(
                "get_next() returns results in submission order, which get_next_unordered() "
                "has already broken; keep using get_next_unordered()"
            )
        ref = self._index_to_future[self._next_return_index]
        if timeout is not None:
            ready, _ = wait([ref], timeout=timeout)
            if not ready:
                if ignore_if_timedout:
                    return None
                raise GetTimeoutError(f"no result was ready within {timeout} s")
        del self._index_to_future[self._next_return_index]
        self._next_return_index += 1
        _, actor = self._future_to_actor.pop(ref)
        self._return_actor(actor)
        return get(ref)

    def get_next_unordered(self, timeout: Optional[float] = None,
                           ignore_if_timedout: bool = False):
        """Whichever result is ready first."""
        if not self.has_next():
            raise StopIteration("the pool has no submitted work left to return")
        ready, _ = wait(list(self._future_to_actor), num_returns=1, timeout=timeout)
        if not ready:
            if ignore_if_timedout:
                return None
            raise GetTimeoutError(f"no result was ready within {timeout} s")
        ref = ready[0]
        index, actor = self._future_to_actor.pop(ref)
        self._index_to_future.pop(index, None)
        self._next_return_index = max(self._next_return_index, index + 1)
        self._return_actor(actor)
        return get(ref)

    def _return_actor(self, actor) -> None:
        self._idle.append(actor)
        if self._pending:
            fn, value = self._pending.popleft()
            self.submit(fn, value)

    def has_free(self) -> bool:
        return bool(self._idle) and not self._pending

    def pop_idle(self):
        """An idle actor, taken out of the pool (None if there is none)."""
        return self._idle.pop() if self.has_free() else None

    def push(self, actor) -> None:
        """Add an actor to the pool."""
        busy = [a for _, a in self._future_to_actor.values()]
        if actor in self._idle or actor in busy:
            raise ValueError("this actor is in the pool already")
        self._return_actor(actor)
