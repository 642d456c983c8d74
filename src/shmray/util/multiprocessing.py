"""``shmray.util.multiprocessing.Pool``: ``multiprocessing.pool.Pool``'s interface over shmray
actors, as Ray's ``ray.util.multiprocessing``.  Changing the import is the whole port.

Runs in: the process that makes the pool (the workers are ``_pool_worker.PoolWorker`` actors).

What it keeps from multiprocessing: the methods, arguments and defaults, the chunking (one
task per chunk, the same default ``chunksize`` for ``map``), results in input order (also to
``map_async``'s callback), callbacks run in a thread of the pool (its collector, or a thread
of the caller's blocked in ``map``/``apply`` that read the result), ``AsyncResult`` and its
``multiprocessing.TimeoutError``, ``close``/``join``/``terminate``, ``with`` ending in
``terminate``, and per-process state: an ``initializer`` that sets a module global is what
the mapped function reads, also when both live in ``__main__`` (``_pool_worker`` says how).

What it does better: numpy arguments and results cross through the shared-memory store
instead of a pipe (an array named by many items of one map is stored once); a worker error
is raised as the original exception type carrying the remote traceback; a worker that dies
fails the task it ran with ``shmray.exceptions.WorkerCrashedError`` and is replaced, where
multiprocessing waits forever.  What differs: arrays a task receives or returns are
read-only views of the store (copy one to write to it), as in Ray; an iterable is consumed
when a map is submitted, as multiprocessing's task thread does.
"""

from __future__ import annotations

import collections
import functools
import multiprocessing
import os
import threading
from typing import Any, Callable, Dict, Iterable, Optional

from ._pool_dispatch import Dispatcher, Task
from ._pool_worker import CALL, MAP, STAR
from .queue import JoinableQueue  # Ray's module exports it; ours can go to tasks and actors

TimeoutError = multiprocessing.TimeoutError

_RUN, _CLOSE, _TERMINATE = range(3)


class AsyncResult:
    """The result of ``apply_async``/``map_async``/``starmap_async``, as multiprocessing's."""

    def __init__(self, chunks: int, callback: Optional[Callable],
                 error_callback: Optional[Callable], single: bool):
        self._event = threading.Event()
        self._callback, self._error_callback = callback, error_callback
        self._single = single
        self._chunks: list = [None] * chunks
        self._left = chunks
        self._success: Optional[bool] = None
        self._value: Any = None
        self._lock = threading.Lock()
        if chunks == 0:
            self._finish(True, [])

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return bool(self._success)

    def wait(self, timeout: Optional[float] = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: Optional[float] = None):
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _chunk_done(self, index: int, ok: bool, value) -> None:
        with self._lock:
            if self._success is not None:
                return  # already failed by an earlier chunk
            if not ok:
                self._success = False
                self._left = 0
            else:
                self._chunks[index] = value
                self._left -= 1
                if self._left:
                    return
        if not ok:
            self._finish(False, value)
        elif self._single:
            self._finish(True, self._chunks[0][0])
        else:
            values: list = []
            for chunk in self._chunks:
                values += chunk
            self._finish(True, values)

    def _finish(self, ok: bool, value) -> None:
        self._success, self._value = ok, value
        self._chunks = []
        try:
            if ok and self._callback is not None:
                self._callback(value)
            elif not ok and self._error_callback is not None:
                self._error_callback(value)
        finally:
            self._event.set()


ApplyResult = AsyncResult
MapResult = AsyncResult


class IMapIterator:
    """The iterator ``imap`` (in order) and ``imap_unordered`` return; ``next(timeout)``."""

    def __init__(self, ordered: bool):
        self._ordered = ordered
        self._cond = threading.Condition(threading.Lock())
        self._done: Dict[int, tuple] = {}  # chunk index -> (ok, values)
        self._arrived: collections.deque = collections.deque()  # (ok, values), unordered
        self._next_chunk = 0
        self._buffer: collections.deque = collections.deque()
        self._chunks: Optional[int] = None
        self._finished = 0

    def _set_chunks(self, chunks: int) -> None:
        with self._cond:
            self._chunks = chunks
            self._cond.notify_all()

    def _chunk_done(self, index: int, ok: bool, value) -> None:
        with self._cond:
            if self._ordered:
                self._done[index] = (ok, value)
            else:
                self._arrived.append((ok, value))
            self._finished += 1
            self._cond.notify_all()

    def __iter__(self):
        return self

    def next(self, timeout: Optional[float] = None):
        with self._cond:
            while not self._buffer:
                chunk = self._take_chunk()
                if chunk is None:
                    if self._chunks is not None and self._next_chunk == self._chunks:
                        raise StopIteration
                    if not self._cond.wait(timeout):
                        raise TimeoutError
                    continue
                ok, values = chunk
                if not ok:
                    raise values
                self._buffer.extend(values)
            return self._buffer.popleft()

    __next__ = next

    def _take_chunk(self):
        if self._ordered:
            chunk = self._done.pop(self._next_chunk, None)
        else:
            chunk = self._arrived.popleft() if self._arrived else None
        if chunk is not None:
            self._next_chunk += 1
        return chunk


class Pool:
    """A pool of worker processes: ``multiprocessing.pool.Pool``'s interface (``context`` is
    accepted and ignored: the workers are shmray actors, forked by shmray's scheduler)."""

    def __init__(self, processes: Optional[int] = None, initializer: Optional[Callable] = None,
                 initargs: Iterable = (), maxtasksperchild: Optional[int] = None,
                 context: Any = None):
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._processes = processes
        self._state = _RUN
        self._dispatcher = Dispatcher(processes, initializer, initargs, maxtasksperchild)

    # -- submitting ---------------------------------------------------------------------

    def apply(self, func: Callable, args: tuple = (), kwds: Optional[dict] = None):
        self._check_running()
        result = AsyncResult(1, None, None, single=True)
        self._submit(func, CALL, [[(tuple(args), dict(kwds or {}))]], result, claim=True)
        return self._wait(result)

    def apply_async(self, func: Callable, args: tuple = (), kwds: Optional[dict] = None,
                    callback: Optional[Callable] = None,
                    error_callback: Optional[Callable] = None) -> AsyncResult:
        self._check_running()
        result = AsyncResult(1, callback, error_callback, single=True)
        self._submit(func, CALL, [[(tuple(args), dict(kwds or {}))]], result)
        return result

    def map(self, func: Callable, iterable: Iterable, chunksize: Optional[int] = None) -> list:
        return self._wait(self._map_async(func, iterable, MAP, chunksize, None, None, True))

    def map_async(self, func: Callable, iterable: Iterable, chunksize: Optional[int] = None,
                  callback: Optional[Callable] = None,
                  error_callback: Optional[Callable] = None) -> AsyncResult:
        return self._map_async(func, iterable, MAP, chunksize, callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable,
                chunksize: Optional[int] = None) -> list:
        return self._wait(self._map_async(func, iterable, STAR, chunksize, None, None, True))

    def starmap_async(self, func: Callable, iterable: Iterable,
                      chunksize: Optional[int] = None, callback: Optional[Callable] = None,
                      error_callback: Optional[Callable] = None) -> AsyncResult:
        return self._map_async(func, iterable, STAR, chunksize, callback, error_callback)

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> IMapIterator:
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable, iterable: Iterable,
                       chunksize: int = 1) -> IMapIterator:
        return self._imap(func, iterable, chunksize, ordered=False)

    def _map_async(self, func, iterable, mode, chunksize, callback, error_callback,
                   claim: bool = False):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            # multiprocessing's rule: about four chunks per worker
            chunksize, extra = divmod(len(iterable), self._processes * 4)
            if extra:
                chunksize += 1
        chunks = _chunked(iterable, chunksize)
        result = AsyncResult(len(chunks), callback, error_callback, single=False)
        self._submit(func, mode, chunks, result, bundle=True, claim=claim)
        return result

    def _imap(self, func, iterable, chunksize, ordered: bool) -> IMapIterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        chunks = _chunked(iterable, chunksize)
        result = IMapIterator(ordered)
        result._set_chunks(len(chunks))
        self._submit(func, MAP, chunks, result)
        return result

    def _submit(self, func, mode: int, chunks: list, result, bundle: bool = False,
                claim: bool = False) -> None:
        blob = self._dispatcher.pickled(func)
        refs: dict = {}  # the map's large arrays, put in the store once (``pack_call``)
        done = result._chunk_done
        self._dispatcher.submit([
            Task(blob, mode, chunk, functools.partial(done, index), job=result,
                 bundle=bundle, refs=refs)
            for index, chunk in enumerate(chunks)], claim=claim)

    def _wait(self, result: AsyncResult):
        """``result.get()`` for a call that blocks: this thread collects the results."""
        self._dispatcher.collect(result, result._event)
        return result.get()

    def _check_running(self) -> None:
        if self._state != _RUN:
            raise ValueError("Pool not running")

    # -- ending -------------------------------------------------------------------------

    def close(self) -> None:
        """No more tasks; the workers end once the ones given are done."""
        if self._state == _RUN:
            self._state = _CLOSE
            self._dispatcher.close()

    def terminate(self) -> None:
        """End the workers now; unfinished tasks fail."""
        if self._state != _TERMINATE:
            self._state = _TERMINATE
            self._dispatcher.terminate()

    def join(self) -> None:
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        self._dispatcher.join()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc_info) -> None:
        self.terminate()

    def __del__(self) -> None:
        if getattr(self, "_state", _TERMINATE) == _RUN:
            self._dispatcher.terminate()

    def __repr__(self) -> str:
        state = ("RUN", "CLOSE", "TERMINATE")[self._state]
        return f"<{type(self).__module__}.Pool state={state} pool_size={self._processes}>"


def _chunked(iterable: Iterable, chunksize: int) -> list:
    """Lists of ``chunksize`` items (the last may be shorter), each item made once: slices
    of a list, lists of slices of a range (which has its length, so no regrowing)."""
    if hasattr(iterable, "__len__") and not len(iterable):
        return []
    if chunksize < 1:
        raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
    if type(iterable) is range:
        return [list(iterable[i:i + chunksize]) for i in range(0, len(iterable), chunksize)]
    if type(iterable) is not list:
        iterable = list(iterable)
    return [iterable[i:i + chunksize] for i in range(0, len(iterable), chunksize)]


__all__ = ["AsyncResult", "IMapIterator", "JoinableQueue", "Pool", "TimeoutError"]
