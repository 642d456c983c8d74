"""``shmray.util.ActorPool``: spread work over a fixed set of actors, as Ray's ActorPool.

Runs in: the driver (or any process that holds the actors' handles).

Pure Python on top of actor calls: each actor takes one job at a time; ``map`` keeps the
input order, ``map_unordered`` yields results as they finish; ``submit``/``get_next`` give
the same control by hand.  A job is what ``fn(actor, value)`` returns: one ObjectRef, or a
list of them (a method with ``num_returns=2``), whose result is then the list of values.

As in Ray, ``map`` and ``map_unordered`` submit all their work when called, not when their
results are iterated, and first drop (never wait for) results of earlier submissions nobody
fetched: the actor that ran such a job goes back to the pool at once, and the new job just
queues behind the old call on that actor.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ._api import get, wait
from ._object_ref import ObjectRef
from .exceptions import ActorDiedError, GetTimeoutError


class ActorPool:
    """A pool of actors that take one job each: ``fn(actor, value)`` must return an ObjectRef
    (or a list of ObjectRefs)."""

    def __init__(self, actors: List[Any]):
        self._idle = list(actors)
        self._jobs: Dict[int, Tuple[Any, Any]] = {}   # submission index -> (job, actor)
        self._ready: set = set()                      # refs wait() has seen ready
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending: collections.deque = collections.deque()  # (fn, value) waiting for an actor

    def map(self, fn: Callable, values: Iterable) -> Iterator:
        """Results of ``fn(actor, v)`` for each v, in input order; all submitted now."""
        self._submit_all(fn, values)
        return self._results(self.get_next)

    def map_unordered(self, fn: Callable, values: Iterable) -> Iterator:
        """Results of ``fn(actor, v)`` for each v, as they finish; all submitted now."""
        self._submit_all(fn, values)
        return self._results(self.get_next_unordered)

    def _submit_all(self, fn: Callable, values: Iterable) -> None:
        self._drop_unfetched()
        for value in values:
            self.submit(fn, value)

    def _results(self, next_result: Callable) -> Iterator:
        while self.has_next():
            yield next_result()

    def _drop_unfetched(self) -> None:
        for _, actor in self._jobs.values():
            self._idle.append(actor)
        self._jobs.clear()
        self._ready.clear()
        self._pending.clear()
        self._next_return_index = self._next_task_index

    def submit(self, fn: Callable, value) -> None:
        """Run ``fn(actor, value)`` on an idle actor, or as soon as one is free."""
        if not self._idle:
            self._pending.append((fn, value))
            return
        actor = self._idle.pop()
        job = fn(actor, value)
        if not _refs_of(job):
            self._idle.append(actor)
            raise TypeError(
                f"ActorPool's fn(actor, value) must return an ObjectRef or a list of them "
                f"(e.g. lambda a, v: a.method.remote(v)), got {type(job).__name__}")
        self._jobs[self._next_task_index] = (job, actor)
        self._next_task_index += 1

    def has_next(self) -> bool:
        """Whether there are submitted results not yet returned."""
        return bool(self._jobs) or bool(self._pending)

    def get_next(self, timeout: Optional[float] = None, ignore_if_timedout: bool = False):
        """The next result in submission order."""
        self._check_has_next()
        if self._next_return_index not in self._jobs:
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        job, _ = self._jobs[self._next_return_index]
        if timeout is not None:
            refs = _refs_of(job)
            ready, _ = wait(refs, num_returns=len(refs), timeout=timeout)
            if len(ready) < len(refs):
                if ignore_if_timedout:
                    self._forget(self._next_return_index)
                    self._next_return_index += 1
                return self._timed_out(timeout, ignore_if_timedout)
        index = self._next_return_index
        self._next_return_index += 1
        return self._result_of(index)

    def get_next_unordered(self, timeout: Optional[float] = None,
                           ignore_if_timedout: bool = False):
        """Whichever result is ready first."""
        self._check_has_next()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            index = self._a_finished_job()
            if index is not None:
                self._next_return_index = max(self._next_return_index, index + 1)
                return self._result_of(index)
            waiting = [r for job, _ in self._jobs.values() for r in _refs_of(job)
                       if r not in self._ready]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, waiting = wait(waiting, num_returns=1, timeout=left)
            if not ready:
                if ignore_if_timedout:
                    oldest = next(iter(self._jobs))
                    self._forget(oldest)
                    self._next_return_index = max(self._next_return_index, oldest + 1)
                return self._timed_out(timeout, ignore_if_timedout)
            self._ready.update(ready)
            if waiting:  # collect the others already done too: one wait() for many results
                self._ready.update(wait(waiting, num_returns=len(waiting), timeout=0)[0])

    def _check_has_next(self) -> None:
        if not self.has_next():
            raise StopIteration("No more results to get")
        if not self._jobs:
            raise ValueError(f"{len(self._pending)} submitted jobs wait for an actor, but the "
                             f"pool has none left (pop_idle() took them or they died); "
                             f"push() one")

    def _a_finished_job(self) -> Optional[int]:
        for index, (job, _) in self._jobs.items():
            if all(r in self._ready for r in _refs_of(job)):
                return index
        return None

    @staticmethod
    def _timed_out(timeout: float, ignored: bool):
        text = "Timed out waiting for result"
        raise GetTimeoutError(text + (", which has been ignored" if ignored else "")
                              + f" (timeout={timeout} s)")

    def _forget(self, index: int) -> None:
        """Drop a job's result unread; its actor takes new work (queued behind that call)."""
        job, actor = self._jobs.pop(index)
        self._ready.difference_update(_refs_of(job))
        self._return_actor(actor)

    def _result_of(self, index: int):
        job, actor = self._jobs.pop(index)
        self._ready.difference_update(_refs_of(job))
        alive = True
        try:
            return get(job)
        except ActorDiedError:
            alive = False  # kept out of the pool, or every later job would fail the same way
            raise
        finally:
            self._return_actor(actor, alive)

    def _return_actor(self, actor, alive: bool = True) -> None:
        if alive:
            self._idle.append(actor)
        if self._pending and self._idle:
            fn, value = self._pending.popleft()
            self.submit(fn, value)

    def has_free(self) -> bool:
        """Whether an actor is idle and no submitted work waits for one."""
        return bool(self._idle) and not self._pending

    def pop_idle(self):
        """An idle actor, taken out of the pool (None if there is none)."""
        return self._idle.pop() if self.has_free() else None

    def push(self, actor) -> None:
        """Add an actor to the pool."""
        busy = [a for _, a in self._jobs.values()]
        if actor in self._idle or actor in busy:
            raise ValueError("Actor already belongs to current ActorPool")
        self._return_actor(actor)


def _refs_of(job) -> List[ObjectRef]:
    """The refs a job's result needs: empty if ``fn`` returned something else."""
    if isinstance(job, ObjectRef):
        return [job]
    if isinstance(job, (list, tuple)) and job and all(isinstance(r, ObjectRef) for r in job):
        return list(job)
    return []
