"""ObjectRef: the handle to an object, hashable and picklable, counted while it lives.

Runs in: every process.

Every live ObjectRef counts as one local reference of its process's runtime, so an object is
freed once no ref to it is left anywhere.  ``__del__`` can run at any point, inside any
lock, when the garbage collector fires, so it never takes a lock or talks to anyone: it
drops the id on the runtime's release queue (an atomic ``deque.append``), which the runtime
drains at its next call.  This is also what batches releases.
"""

from __future__ import annotations

from . import _context, _pickling
from .exceptions import RaySystemError


class ObjectRef:
    """A reference to an object in shmray: the result of ``.remote()`` or ``put``."""

    __slots__ = ("_id", "_tracker", "__weakref__")

    def __init__(self, object_id: bytes, tracker=None, counted: bool = False):
        if not isinstance(object_id, bytes) or len(object_id) != 28:
            raise ValueError("an ObjectRef is made from a 28-byte object id")
        self._id = object_id
        self._tracker = tracker if tracker is not None else _context.runtime
        # ``counted``: the runtime has already counted this ref (it made it)
        if self._tracker is not None and not counted:
            self._tracker.add_local_ref(object_id)

    @classmethod
    def counted(cls, object_id: bytes, tracker) -> "ObjectRef":
        """A ref its runtime made and has counted already (skips the checks: one per task
        return, on the submit path)."""
        ref = object.__new__(cls)
        ref._id = object_id
        ref._tracker = tracker
        return ref

    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    def task_id(self) -> bytes:
        return self._id[:24]

    def is_nil(self) -> bool:
        return self._id == bytes(28)

    def job_id(self) -> str:
        return f"{_runtime_for(self).options.get('job_id', 1):08x}"

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __repr__(self) -> str:
        return f"ObjectRef({self._id.hex()})"

    def __reduce__(self):
        tracker = self._tracker
        if tracker is not _context.runtime and tracker is not None \
                and _context.runtime is not None:
            _runtime_for(self)  # raises: sent into a session it doesn't belong to
        _pickling.note_ref(self._id)
        if tracker is not None:
            tracker.exported(self._id)  # the scheduler must know the object it names
        return _rebuild_ref, (self._id,)

    def __copy__(self) -> "ObjectRef":  # immutable; and a copy exports nothing
        return self

    def __deepcopy__(self, memo) -> "ObjectRef":
        return self

    def __del__(self):
        tracker = self._tracker
        if tracker is not None:
            tracker.release_later(self._id)

    # futures (``future()``, ``__await__``) are attached by the runtime that resolves them
    def future(self):
        """This ref as a ``concurrent.futures.Future`` holding the object's value."""
        return _runtime_for(self).future_of(self)

    def __await__(self):
        return _runtime_for(self).await_ref(self).__await__()

    def as_future(self):
        """This ref as an ``asyncio.Future`` of the running loop (Ray's ``as_future``)."""
        import asyncio  # only where one is awaited: it costs every driver ~10 ms at import

        return asyncio.wrap_future(self.future())


def _runtime_for(ref: ObjectRef):
    tracker = ref._tracker
    if tracker is None or tracker is not _context.runtime:
        raise stale_session_error(
            tracker, repr(ref),
            "An application is trying to access a Ray object whose owner is unknown"
            f"({ref.hex()}). Please make sure that all Ray objects you are trying to access "
            "are part of the current Ray session: ",
            "its object is gone (refs can't outlive shmray.shutdown())")
    return tracker


def stale_session_error(tracker, what: str, ray_text: str, gone: str) -> RaySystemError:
    """The error for ``what`` (a ref, an actor handle) used outside the session it belongs
    to (``tracker``, its runtime): one shut down, or the parent's of a forked child."""
    parent = getattr(tracker, "forked_from", None)
    if parent is not None:
        return RaySystemError(
            f"{ray_text}{what} belongs to the shmray session of process {parent}, from which "
            "this process was forked; a forked child can't use its parent's session. Send "
            "the work back to that process, or start a session of this process's own "
            "with shmray.init() and make the objects there."
        )
    return RaySystemError(
        f"{ray_text}{what} belongs to a shmray session that has been shut down, and {gone}."
    )


def _rebuild_ref(object_id: bytes) -> ObjectRef:
    return ObjectRef(object_id)
