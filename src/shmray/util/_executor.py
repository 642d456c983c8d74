"""``shmray.util.ProcessPoolExecutor``: a ``concurrent.futures.Executor`` over shmray actors,
with the standard library's ``ProcessPoolExecutor`` signature, so porting is one import line.

Runs in: the process that makes the executor (the workers are the same ``PoolWorker`` actors
as ``Pool``'s, driven by the same ``_pool_dispatch.Dispatcher``).

Its futures are ``concurrent.futures.Future`` objects, so ``wait``, ``as_completed`` and
``asyncio.wrap_future`` take them.  A future is running from the moment its call is handed
to a worker (at most two calls per worker at a time; a call of a quick function carries
several, ``_pool_dispatch`` says how many); until then ``cancel()`` works, and
``shutdown(cancel_futures=True)`` cancels those.  A worker that dies fails the call it was
running with ``BrokenProcessPool`` (the standard library's), as the standard executor does;
unlike it, the executor is not broken for good: a new worker takes the dead one's place and
the other calls run.  ``mp_context`` is accepted and ignored (workers are forked by shmray's
scheduler).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import Callable, Iterable, Iterator, Optional

from .. import exceptions
from ._pool_dispatch import Dispatcher, Task
from ._pool_worker import CALL, STAR


class ProcessPoolExecutor(concurrent.futures.Executor):
    """Runs calls in a fixed set of worker processes; ``concurrent.futures``' interface."""

    def __init__(self, max_workers: Optional[int] = None, mp_context=None,
                 initializer: Optional[Callable] = None, initargs: tuple = (), *,
                 max_tasks_per_child: Optional[int] = None):
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._max_workers = max_workers
        self._dispatcher = Dispatcher(max_workers, initializer, initargs, max_tasks_per_child)
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable, /, *args, **kwargs) -> concurrent.futures.Future:
        blob = self._dispatcher.pickled(fn)
        return self._submit(blob, CALL, [(args, kwargs)], single=True, refs={})

    def _submit(self, blob: bytes, mode: int, items: list, single: bool,
                refs: dict) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def start() -> bool:
            return future.set_running_or_notify_cancel()

        def on_done(ok: bool, value) -> None:
            if ok:
                future.set_result(value[0] if single else value)
            elif isinstance(value, concurrent.futures.CancelledError):  # cancel_futures
                future.cancel()
                future.set_running_or_notify_cancel()
            elif isinstance(value, exceptions.WorkerCrashedError):
                # Imported here: it brings multiprocessing (~20 ms), which `import shmray`
                # should not pay for; only a crash needs it.
                from concurrent.futures.process import BrokenProcessPool

                broken = BrokenProcessPool(str(value))
                broken.__cause__ = value
                future.set_exception(broken)
            else:
                future.set_exception(value)

        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._dispatcher.submit([Task(blob, mode, items, on_done, start, refs=refs)])
        return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: Optional[float] = None,
            chunksize: int = 1) -> Iterator:
        """Like ``Executor.map``: every call is submitted now (``chunksize`` per task), the
        results come in order; ``timeout`` counts from this call."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else timeout + time.monotonic()
        blob = self._dispatcher.pickled(fn)
        items = list(zip(*iterables))
        refs: dict = {}  # the map's large arrays, put in the store once (``pack_call``)
        futures = [self._submit(blob, STAR, items[i:i + chunksize], single=False, refs=refs)
                   for i in range(0, len(items), chunksize)]
        return _results(futures, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._shutdown:  # the dispatcher ends at close: tell it things once
                self._shutdown = True
                if cancel_futures:
                    self._dispatcher.cancel_pending()
                self._dispatcher.close()
        if wait:
            self._dispatcher.join()

    def __del__(self) -> None:
        if not getattr(self, "_shutdown", True):
            self._dispatcher.close()


def _results(futures: list, end: Optional[float]) -> Iterator:
    try:
        futures.reverse()  # pop() from the end: the earliest first
        while futures:
            future = futures[-1]
            if end is None:
                chunk = future.result()
            else:
                chunk = future.result(end - time.monotonic())
            futures.pop()
            yield from chunk
    finally:
        for future in futures:
            future.cancel()
