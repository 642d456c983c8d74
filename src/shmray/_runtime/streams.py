"""Streams: the items of streaming generator tasks this process called, as they arrive.

Runs in: the driver, every worker and every actor (whoever calls a generator task).

A streaming task's items are objects with ids known in advance (item ``k`` is return
``k + 1`` of the task; return 0 is its completion, which holds how many items there were or
the task's error).  The scheduler sends each item to the caller as it is yielded (READY of
an id nobody here has a ref to yet), and the completion last, on the same connection: when
the completion has arrived, so has every item.  Each item is counted here as it arrives,
held for the generator until ``take`` hands it out as a ref.  A generator dropped before
its end gives back what it did not hand out, and what arrives after.

``ObjectRefGenerator.__del__`` may run anywhere, inside any lock: it only marks its stream
and queues it (``dropped``), and the next drain of releases does the rest, under the lock.

Backpressure: a stream asked for with ``_generator_backpressure_num_objects`` tells the
producer (CONSUMED, through the scheduler) how many items it has handed out, and the
producer waits while that many are outstanding.
"""

from __future__ import annotations

import collections
import time
from typing import Dict, Optional, Sequence

from .. import _protocol as P
from .._ids import first_return_id, object_id_for_return
from .._object_ref import ObjectRef
from .._serialization import META_ERROR
from .link import Link
from .objects import Objects


class Stream:
    """One generator task's items, as this process sees them."""

    __slots__ = ("task_id", "completion", "taken", "backpressure", "error_given", "dropped")

    def __init__(self, task_id: bytes, backpressure: int):
        self.task_id = task_id
        self.completion = first_return_id(task_id)
        self.taken = 0               # items handed out as refs
        self.backpressure = backpressure
        self.error_given = False     # the completion's error was handed out as the last ref
        self.dropped = False         # its generator was garbage collected

    def item_id(self, index: int) -> bytes:
        return object_id_for_return(self.task_id, index + 1)


class Streams:
    """The streams of this process's generator tasks, by task id."""

    def __init__(self, link: Link, objects: Objects):
        self.link = link
        self.objects = objects
        self.table: Dict[bytes, Stream] = {}
        self.dropped: collections.deque = collections.deque()  # streams to let go of
        objects.streams_dropped = self.dropped
        objects.on_streams_dropped = self._let_go
        objects.on_unheld_ready = self._item_ready

    def open(self, task_id: bytes, backpressure: int) -> Stream:
        """Before the task is sent: its first item may come back before the call returns."""
        with self.link.lock:
            stream = self.table[task_id] = Stream(task_id, backpressure)
        return stream

    def _item_ready(self, object_id: bytes, data, metadata: bytes) -> None:
        """READY of an id nobody here holds: an item of one of our streams (caller holds the
        lock).  Held for the generator until it is handed out."""
        stream = self.table.get(object_id[:24])
        if stream is None:
            return
        if object_id == stream.completion:  # its ref was dropped: the stream is over
            del self.table[stream.task_id]
            return
        objects = self.objects
        objects.counts[object_id] = objects.counts.get(object_id, 0) + 1
        objects.arrived(object_id, (data, metadata))
        if stream.dropped:
            objects.releases.append(object_id)

    def _let_go(self) -> None:
        """Streams whose generator was dropped: what arrived and was not handed out goes
        back (caller holds the lock)."""
        objects = self.objects
        while self.dropped:
            stream = self.dropped.popleft()
            index = stream.taken
            while True:
                item_id = stream.item_id(index)
                if item_id not in objects.counts:
                    break
                objects.releases.append(item_id)
                index += 1
            stream.taken = index
            if stream.completion in objects.locations or stream.completion not in objects.counts:
                self.table.pop(stream.task_id, None)  # nothing more will come (or its READY
                                                      # ends it: ``_item_ready``)

    # -- the generator's side --------------------------------------------------------------

    def ready(self, stream: Stream) -> bool:
        """Whether ``take`` would return at once."""
        locations = self.objects.locations
        return stream.item_id(stream.taken) in locations or stream.completion in locations

    def take(self, stream: Stream, timeout: Optional[float]) -> Optional[ObjectRef]:
        """The next item's ref, waiting for it; the completion's ref once if the task
        failed; None at the end.  TimeoutError if none came in time."""
        objects = self.objects
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.link.lock:
            while True:
                item_id = stream.item_id(stream.taken)
                if item_id in objects.locations:
                    stream.taken += 1
                    if stream.backpressure > 0:
                        self.link.send(P.consumed(stream.task_id, stream.taken))
                        self.link.flush_soon()
                    return ObjectRef.counted(item_id, objects.tracker)  # its count is ours
                location = objects.locations.get(stream.completion)
                if location is not None:
                    if location[1] == META_ERROR and not stream.error_given:
                        stream.error_given = True
                        return objects.add_owned_ref(stream.completion)
                    return None
                objects.owned_pending.add(item_id)  # its READY comes unasked: no SUBSCRIBE
                try:
                    waited = objects.wait_for_any([item_id, stream.completion], deadline)
                finally:
                    objects.owned_pending.discard(item_id)
                if not waited:
                    raise TimeoutError(f"no item of the generator came within {timeout} s")

    def wait(self, items: Sequence, streams: Dict[int, Stream], num_returns: int,
             timeout: Optional[float]):
        """``wait()`` over refs and generators (``streams``: position -> its stream): a
        generator is ready when ``take`` would not block."""
        objects = self.objects
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.link.lock:
            while True:
                ready = [i for i, item in enumerate(items)
                         if (self.ready(streams[i]) if i in streams
                             else objects.is_ready(item.binary()))]
                remaining = None if deadline is None else deadline - time.monotonic()
                if len(ready) >= num_returns or (remaining is not None and remaining <= 0):
                    break
                watched, plain = [], []
                for i, item in enumerate(items):
                    if i in ready:
                        continue
                    if i in streams:
                        item_id = streams[i].item_id(streams[i].taken)
                        objects.owned_pending.add(item_id)  # no SUBSCRIBE: see ``take``
                        watched += [item_id, streams[i].completion]
                    else:
                        plain.append(item.binary())
                objects.not_ready(plain)  # asks to hear of those no READY is coming for
                watched += plain
                try:
                    objects.wait_for_any(watched, deadline)
                finally:
                    for i in streams:
                        objects.owned_pending.discard(streams[i].item_id(streams[i].taken))
        chosen = set(ready[:num_returns])
        return ([item for i, item in enumerate(items) if i in chosen],
                [item for i, item in enumerate(items) if i not in chosen])

