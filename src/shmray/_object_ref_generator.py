"""What generator tasks return: ``ObjectRefGenerator`` (streaming) and
``DynamicObjectRefGenerator`` (``num_returns="dynamic"``).

Runs in: every process that calls a generator task; a dynamic generator is also made in
the worker that ran the task.

A remote function or actor method that yields streams by default, as in Ray:
``f.remote()`` returns an ``ObjectRefGenerator`` at once, and each ``next()`` gives the ref
of the next item as soon as the task has yielded it, while the task goes on.  An exception
in the task arrives at the ``next()`` after the items before it: that ``next()`` returns a
ref whose ``get`` raises it, and the one after ends the iteration.  ``completed()`` is the
ref of the task's end (``get`` raises the task's error, if any).  The generator can't be
sent to another task (as in Ray): send the refs it yields.  Dropping it gives back the items
it did not hand out (``_runtime.streams``).
"""

from __future__ import annotations

from typing import List

from ._object_ref import ObjectRef
from ._serialization import META_ERROR


class ObjectRefGenerator:
    """The refs a streaming generator task yields, in order, as it yields them."""

    def __init__(self, completion: ObjectRef, runtime, stream):
        self._completion = completion
        self._runtime = runtime
        self._stream = stream

    def __iter__(self) -> "ObjectRefGenerator":
        return self

    def __next__(self) -> ObjectRef:
        ref = self._runtime.streams.take(self._stream, None)
        if ref is None:
            raise StopIteration
        return ref

    def __aiter__(self) -> "ObjectRefGenerator":
        return self

    async def __anext__(self) -> ObjectRef:
        import asyncio  # only where one is awaited: it costs every driver ~10 ms at import

        streams, stream = self._runtime.streams, self._stream
        while not streams.ready(stream):
            arrival = self._runtime.futures.when_arrived(
                [stream.item_id(stream.taken), stream.completion])
            await asyncio.wrap_future(arrival)
        ref = streams.take(stream, None)  # at once: it is ready
        if ref is None:
            raise StopAsyncIteration
        return ref

    def completed(self) -> ObjectRef:
        """The ref of the task's end: ready when it has yielded its last item (or failed)."""
        return self._completion

    def next_ready(self) -> bool:
        """Whether ``next()`` would return (or end) without waiting."""
        return self._runtime.streams.ready(self._stream)

    def is_finished(self) -> bool:
        """Whether the task has ended and every ref it yielded has been taken."""
        stream, locations = self._stream, self._runtime.objects.locations
        return (stream.completion in locations
                and stream.item_id(stream.taken) not in locations
                and (stream.error_given or locations[stream.completion][1] != META_ERROR))

    def task_id(self) -> bytes:
        return self._stream.task_id

    def __reduce__(self):
        raise TypeError(
            "an ObjectRefGenerator can't be sent to another task or actor (as in Ray): send "
            "the refs it yields instead, or use num_returns='dynamic'"
        )

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._stream.task_id.hex()})"

    def __del__(self):
        # Anywhere, inside any lock: only mark it; the runtime lets go under its lock.
        stream = getattr(self, "_stream", None)
        if stream is not None and not stream.dropped:
            stream.dropped = True
            self._runtime.objects.streams_dropped.append(stream)


class DynamicObjectRefGenerator:
    """The value of a ``num_returns="dynamic"`` task: the refs of what it yielded."""

    def __init__(self, refs: List[ObjectRef]):
        self._refs = list(refs)

    def __iter__(self):
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __reduce__(self):
        return DynamicObjectRefGenerator, (self._refs,)

    def __repr__(self) -> str:
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"

