"""Refs as ``concurrent.futures.Future`` and awaitables (``ref.future()``, ``await ref``).

Runs in: the driver, every worker and every actor.

A future is resolved by whichever thread reads the object's arrival (``Objects.arrived``).
While futures are pending and no thread of the program waits in shmray, a reader thread
("shmray-futures") reads for them, and ends once none is left.  In an async actor the event
loop reads the connection itself, and no such thread starts.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Dict, List, Optional

from .. import exceptions
from .._object_ref import ObjectRef
from .link import Link
from .objects import IN_ARENA, Objects

_PUMP_ROUND = 0.5  # how often the reader thread looks whether it is still wanted


class Futures:
    """The futures waiting for objects, and the thread that reads for them."""

    def __init__(self, link: Link, objects: Objects):
        self.link = link
        self.objects = objects
        # id -> futures waiting for it; the objects' own dict, so that an arrival nobody
        # awaits costs no call here.
        self.pending: Dict[bytes, List[concurrent.futures.Future]] = objects.awaited
        self._pump_thread: Optional[threading.Thread] = None
        objects.on_arrived = self.arrived

    def future_of(self, ref: ObjectRef) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        object_id = ref.binary()
        with self.link.lock:
            if self.objects.is_ready(object_id):
                self._resolve(object_id, [future])
                return future
            # The future holds the ref, so the object lives until it resolves.
            future._shmray_ref = ref  # type: ignore[attr-defined]
            self.pending.setdefault(object_id, []).append(future)
            self.objects.not_ready([object_id])
            self._start_pump()
        self.link.flush()
        return future

    def when_arrived(self, ids) -> concurrent.futures.Future:
        """A future done (with None) once one of ``ids`` has arrived: for ids whose READY
        comes unasked (a generator's next item, and its completion)."""
        future = _Arrival(ids)
        with self.link.lock:
            if any(i in self.objects.locations for i in ids):
                future.set_result(None)
                return future
            for object_id in ids:
                self.pending.setdefault(object_id, []).append(future)
            self._start_pump()
        self.link.flush()
        return future

    async def await_ref(self, ref: ObjectRef):
        import asyncio  # only where something is awaited: it costs ~10 ms at import

        return await asyncio.wrap_future(self.future_of(ref))

    def arrived(self, object_id: bytes) -> None:
        futures = self.pending.pop(object_id, None)
        if futures:
            self._resolve(object_id, futures)

    def _resolve(self, object_id: bytes, futures) -> None:
        arrivals = [f for f in futures if type(f) is _Arrival]
        if arrivals:
            futures = [f for f in futures if type(f) is not _Arrival]
            for arrival in arrivals:
                for other in arrival.ids:  # it waited on those too: no longer
                    waiting = self.pending.get(other)
                    if waiting is not None and arrival in waiting:
                        waiting.remove(arrival)
                        if not waiting:
                            del self.pending[other]
                if arrival.set_running_or_notify_cancel():
                    arrival.set_result(None)
            if not futures:
                return
        location = self.objects.locations.get(object_id, (IN_ARENA, b""))
        try:
            value = self.objects.value_at(object_id, location)
        except BaseException as exc:  # the task's own error, or a lost object
            for future in futures:
                if future.set_running_or_notify_cancel():
                    future.set_exception(exc)
            return
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_result(value)

    def _start_pump(self) -> None:
        if self.link.external_reader or self._pump_thread is not None:
            return
        self._pump_thread = threading.Thread(target=self._pump, name="shmray-futures",
                                             daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        link = self.link
        with link.lock:
            try:
                while self.pending and not link.closed:
                    link.wait_until(lambda: not self.pending or link.closed,
                                    time.monotonic() + _PUMP_ROUND)
            except exceptions.RaySystemError as exc:
                for futures in self.pending.values():
                    for future in futures:
                        if future.set_running_or_notify_cancel():
                            future.set_exception(exc)
                self.pending.clear()
            finally:
                # Under the lock: a future_of() after this point starts a new pump.
                self._pump_thread = None

    def cancel_all(self) -> None:
        for futures in self.pending.values():
            for future in futures:
                future.cancel()
        self.pending.clear()


class _Arrival(concurrent.futures.Future):
    """A future of an arrival, not of a value (``when_arrived``)."""

    def __init__(self, ids):
        super().__init__()
        self.ids = list(ids)
