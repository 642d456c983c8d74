"""This process's objects: its refs, put, and get/wait.

Runs in: the driver, every worker and every actor.

- Refs are counted locally; the scheduler hears only of first holds and last releases,
  queued and sent with the next message.  ``ObjectRef.__del__`` only appends to a deque
  (``release_later``), drained under the lock before anything else is sent (``drain``).
- ``put`` serializes once.  A value under ``INLINE_THRESHOLD`` travels as bytes inside
  messages (Ray keeps objects under 100 KiB out of plasma the same way); a larger one is
  written straight into its arena block by this process: one copy of each buffer.  When
  the arena is full: a garbage collection first (refs caught in reference cycles), then
  spilling (``_spill.Spiller``), then ``ObjectStoreFullError`` saying what holds the memory.
- ``get`` of an arena object is a table lookup and a mapping: a read-only, zero-copy view,
  pinned for as long as anything built on it lives.  A result this process waits for is
  announced by READY from the scheduler, or comes straight back on a direct channel
  (``take_direct``) from an actor or a leased worker.  A get of n refs counts down one
  ``_Waiter`` as they arrive: O(1) a message, not a rescan of all n.

Some results are known to this process alone (``unregistered``, ``owner_only``): tasks it
ran on leased workers, and actor calls it sent straight to their actors, without telling
the scheduler (``leases``, ``channels``).  This module keeps them apart, so a release or a
get of one never asks the scheduler about it.
"""

from __future__ import annotations

import collections
import gc
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .. import _protocol as P, exceptions
from .._check_serialize import serializability_report
from .._ids import object_id_for_put
from .._object_ref import ObjectRef
from .._object_store import ObjectNotFoundError, ObjectNotSealedError, ObjectSpilledError
from .._serialization import (
    META_ERROR,
    deserialize,
    deserialize_inline,
    serialize,
    short_repr,
)
from .._spill import store_full_error, too_large_error
from .link import Link

INLINE_THRESHOLD = 100 * 1024
IN_ARENA = None  # location of an object whose bytes are sealed in the arena
_RESTORE_WAIT = 120.0   # how long a get waits for another process to restore an object
_WRITE_ATTEMPTS = 10    # writes of an object into a full arena, spilling between
_LOOK_IN_ARENA = 8      # a get/wait of more ids than this doesn't look in the arena for
                        # results of our own tasks (their READY is coming)


def _nothing(*args):
    return None


def any_in_arena(results) -> bool:
    """Whether any of a task's results (delivered, or as reported) is in the arena: the
    scheduler frees those, so it must know them."""
    for result in results:
        if result[1] is IN_ARENA:
            return True
    return False


class Objects:
    """The refs this process holds, and what it knows of their objects."""

    def __init__(self, link: Link, store, spiller, tracker):
        self.link = link
        self.store = store
        self.spiller = spiller
        self.tracker = tracker  # what the refs made here report to (the Runtime)
        self.counts: Dict[bytes, int] = {}
        # id -> (data, metadata) for objects this process knows are ready; data is
        # IN_ARENA for objects in the arena.
        self.locations: Dict[bytes, Tuple[Optional[bytes], bytes]] = {}
        self.releases: collections.deque = collections.deque()
        self.subscribed: set = set()         # ids we asked to hear of
        self.owned_pending: set = set()      # our tasks' results: READY comes unasked
        self.direct_pending: Dict[bytes, object] = {}  # result id -> channel that owes it
        self.actor_calls: set = set()        # task ids of our actor calls (cancel's force rule)
        self.unregistered: Dict[bytes, object] = {}  # results of tasks only we know of
        self.owner_only: set = set()         # results only we have (published if one leaves)
        self._waiters: Dict[bytes, list] = {}  # id -> _Waiters counting it down
        self.awaited: dict = {}  # id -> the futures waiting for it (``futures``)
        # Hooks: an awaited object arrived (futures), READY of a call routed through the
        # scheduler (channels), about to wait on ids (leases give idle workers back).
        self.on_arrived: Callable[[bytes], None] = _nothing
        self.on_ready: Callable[[bytes], None] = _nothing
        # Streaming generators (``streams``): READY of an id nobody here holds (an item),
        # and the streams whose generator was dropped, let go of at the next drain.
        self.on_unheld_ready: Callable[[bytes, object, bytes], None] = _nothing
        self.streams_dropped: collections.deque = collections.deque()
        self.on_streams_dropped: Callable[[], None] = _nothing
        self.before_waiting_on: Callable[[Sequence[bytes]], None] = _nothing
        # Ids about to be released (the channels register calls to an actor whose last
        # handle here goes); None while no channel is open.
        self.before_release: Optional[Callable[[list], None]] = None
        link.handlers[P.READY] = self.ready
        link.drain = self.drain

    # -- counting --------------------------------------------------------------------------

    def add_local_ref(self, object_id: bytes, announce: bool = True) -> None:
        with self.link.lock:
            count = self.counts.get(object_id, 0)
            self.counts[object_id] = count + 1
            if count == 0 and announce:
                self.link.conn.send(P.hold([object_id]))

    def own(self, record) -> List[ObjectRef]:
        """Our refs to the results of a task or call the scheduler does not know of (yet):
        ``record`` (``channels.Owned``) is how we tell it, should we have to."""
        unregistered, counts, tracker = self.unregistered, self.counts, self.tracker
        refs = []
        for object_id in record.return_ids:
            unregistered[object_id] = record
            counts[object_id] = counts.get(object_id, 0) + 1
            refs.append(ObjectRef.counted(object_id, tracker))
        return refs

    def now_registered(self, record) -> List[bytes]:
        """The scheduler is told of ``record``'s task or call now: its results are not ours
        alone any more.  Returns those we dropped before, for the scheduler to drop too."""
        record.registered = True
        gone = []
        for object_id in record.return_ids:
            del self.unregistered[object_id]
            if object_id not in self.counts:
                gone.append(object_id)
        return gone

    def add_owned_ref(self, object_id: bytes) -> ObjectRef:
        """A ref the scheduler already counts for us (a put or a task return we submitted)."""
        with self.link.lock:
            self.counts[object_id] = self.counts.get(object_id, 0) + 1
        return ObjectRef.counted(object_id, self.tracker)

    def release_later(self, object_id: bytes) -> None:
        self.releases.append(object_id)

    def drain(self) -> None:
        """Apply the releases queued by ObjectRef.__del__ (caller holds the lock)."""
        if self.streams_dropped:
            self.on_streams_dropped()
        releases = self.releases
        if not releases:
            return
        released = []
        while releases:
            object_id = releases.popleft()
            count = self.counts[object_id] - 1
            if count:
                self.counts[object_id] = count
                continue
            del self.counts[object_id]
            self.locations.pop(object_id, None)
            if object_id in self.owner_only or object_id in self.unregistered:
                self.owner_only.discard(object_id)  # the scheduler never knew it (or
                continue                            # hears of it with its registration)
            self.subscribed.discard(object_id)
            self.owned_pending.discard(object_id)
            self.direct_pending.pop(object_id, None)
            self.actor_calls.discard(object_id[:24])
            released.append(object_id)
        if released and self.before_release is not None:
            self.before_release(released)
        if released and not self.link.closed:
            self.link.conn.send(P.release(released))

    def num_local_refs(self) -> int:
        with self.link.lock:
            self.drain()
            return len(self.counts)

    def settle(self) -> None:
        """Return once the scheduler has processed our releases (and freed what they let go)."""
        self.link.request(P.query, "ping")

    # -- put -------------------------------------------------------------------------------

    def put(self, value) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError(
                "calling put() on an ObjectRef is not allowed (as in Ray): pass the ref itself "
                "where it is needed, or wrap it in a list, put([ref]), to store a reference to it"
            )
        try:
            serialized = serialize(value)
        except TypeError as exc:
            raise TypeError(
                f"Could not serialize the put value {short_repr(value)}:\n"
                f"{serializability_report(value)}shmray pickles values with cloudpickle; "
                "objects holding locks, open files, sockets or generators can't be pickled: "
                "pass what is needed to rebuild them.") from exc.__cause__
        object_id = object_id_for_put()
        data = self.store_object(object_id, serialized)
        with self.link.lock:
            self.locations[object_id] = (data, serialized.metadata)
            self.link.conn.send(P.put(object_id, data, serialized.metadata,
                                      serialized.contained_refs))
            ref = self.add_owned_ref(object_id)
        # No hurry: whatever uses the object reaches the scheduler after this message.
        self.link.flush_soon()
        self.link.take_interrupt()
        return ref

    def store_object(self, object_id: bytes, serialized, force_inline: bool = False):
        """Inline bytes for a small value (returned), or IN_ARENA once it is sealed there."""
        if force_inline or serialized.total_size < INLINE_THRESHOLD:
            return serialized.to_bytes()
        self._write_with_room(object_id, serialized)
        return IN_ARENA

    def _write_with_room(self, object_id: bytes, serialized) -> None:
        needed = serialized.total_size
        # Room made by spilling may be taken by another process writing at the same time:
        # try again while spilling still finds room, a few times over.
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                self.store.write_serialized(object_id, serialized)
                return
            except exceptions.ObjectStoreFullError as exc:
                if needed > self.store.statistics().heap_size:
                    raise too_large_error(self.store, needed) from exc
                if attempt == 0:
                    gc.collect()  # refs in reference cycles release their objects
                    if self.releases:
                        self.link.flush()
                    self.settle()
                elif not self.spiller.make_room(needed):
                    break
        raise store_full_error(self.store, needed)

    def send_owning(self, message: tuple, return_ids: Sequence[bytes]) -> List[ObjectRef]:
        """Send a task or call; we own its results, whose READY will come unasked."""
        with self.link.lock:
            self.link.conn.send(message)
            self.owned_pending.update(return_ids)
            refs = [self.add_owned_ref(object_id) for object_id in return_ids]
        self.link.flush_soon()
        self.link.take_interrupt()
        return refs

    # -- arrivals --------------------------------------------------------------------------

    def ready(self, object_id: bytes, data, metadata: bytes) -> None:
        """READY from the scheduler, or a result straight from a channel (caller holds the
        lock)."""
        self.owned_pending.discard(object_id)
        self.on_ready(object_id)
        if object_id in self.counts:
            self.subscribed.discard(object_id)
            self.arrived(object_id, (data, metadata))
        else:
            self.on_unheld_ready(object_id, data, metadata)

    def arrived(self, object_id: bytes, location) -> None:
        """An object we hold is ready: where it is, and who waits for it."""
        self.locations[object_id] = location
        if self._waiters:
            for waiter in self._waiters.pop(object_id, ()):
                waiter.remaining -= 1
                if location[1] == META_ERROR and waiter.failed is None:
                    waiter.failed = object_id
        if self.awaited:
            self.on_arrived(object_id)

    def take_direct(self, delivered, undelivered) -> None:
        """Results a channel brought (caller holds the lock): those delivered are ready;
        the others hold refs or will be retried, and the scheduler will say (if it has not
        yet)."""
        pending = self.direct_pending
        for object_id, data, metadata in delivered:
            if pending.pop(object_id, None) is not None:
                self.ready(object_id, data, metadata)
        for object_id in undelivered:
            if pending.pop(object_id, None) is not None and object_id not in self.locations:
                self.owned_pending.add(object_id)

    def keep_unregistered(self, delivered) -> None:
        """Results of a task the scheduler never heard of (all small, no refs inside): ours
        alone from now on, published if a ref to one leaves us (``leases``).  Marked so
        before a future's callback runs: it may pass the ref on."""
        for object_id, _, _ in delivered:
            del self.unregistered[object_id]
            self.direct_pending.pop(object_id, None)
            if object_id in self.counts:
                self.owner_only.add(object_id)
        for object_id, data, metadata in delivered:
            if object_id in self.counts:
                self.arrived(object_id, (data, metadata))

    def channel_gone(self, channel) -> None:
        """A channel closed owing us results: ask the scheduler, which retries or fails the
        work as it would its own (caller holds the lock)."""
        owed = [i for i, c in self.direct_pending.items() if c is channel]
        for object_id in owed:
            del self.direct_pending[object_id]
        owed = [i for i in owed if i in self.counts]
        if owed:
            self.subscribed.update(owed)
            self.link.conn.send(P.subscribe(owed))

    # -- readiness -------------------------------------------------------------------------

    def is_ready(self, object_id: bytes, batch: bool = False) -> bool:
        """Known ready, or sealed in the arena already (then no message is needed at all).
        In a batch, our own tasks' results are left to their READY, already on its way: a
        look in the arena takes the store's lock, ~1 us an id."""
        if object_id in self.locations:
            return True
        if (object_id in self.direct_pending or object_id in self.unregistered
                or (batch and object_id in self.owned_pending)):
            return False  # its RESULT or READY will say
        if self.store.contains(object_id) in ("sealed", "spilled"):
            self.locations[object_id] = (IN_ARENA, b"")
            return True
        return False

    def not_ready(self, ids: Sequence[bytes]) -> List[bytes]:
        """The ids not ready yet; asks to hear of those no READY is already coming for."""
        batch = len(ids) > _LOOK_IN_ARENA
        missing = [i for i in ids if not self.is_ready(i, batch)]
        unannounced = [i for i in missing
                       if i not in self.owned_pending and i not in self.subscribed
                       and i not in self.direct_pending and i not in self.unregistered]
        if unannounced:
            self.subscribed.update(unannounced)
            self.link.conn.send(P.subscribe(unannounced))
        return missing

    def still_pending(self, ids) -> set:
        """Those of ``ids`` we hold and have not seen ready (READYs waiting are read first)."""
        with self.link.lock:
            self.link.poll()
            return {i for i in ids if i in self.counts and i not in self.locations}

    # -- get / wait ------------------------------------------------------------------------

    def get_values(self, refs: Sequence[ObjectRef], timeout: Optional[float]) -> list:
        ids = [ref.binary() for ref in refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.link.lock:
            missing = self.not_ready(ids)
            if missing:
                # One failed already raises now, as in Ray: no waiting for the slow ones.
                failed = self._failed_among(ids, missing)
                if failed is None:
                    waiter = self._wait_for(missing, len(missing), deadline, stop_on_error=True)
                    failed = waiter.failed
                    if failed is None and waiter.remaining > 0:
                        raise exceptions.GetTimeoutError(
                            f"get() timed out after {timeout} s: {waiter.remaining} of "
                            f"{len(ids)} objects were not ready"
                        )
                if failed is not None:  # an error is inline: this raises it, no I/O
                    self.value_at(failed, self.locations[failed])
            locations = [self.locations.get(i, (IN_ARENA, b"")) for i in ids]
        return [self.value_at(i, location) for i, location in zip(ids, locations)]

    def _failed_among(self, ids: Sequence[bytes], missing: Sequence[bytes]) -> Optional[bytes]:
        """The first of ``ids`` known ready and holding an error (an error is inline, so its
        metadata is known without a look in the arena)."""
        if len(missing) == len(ids):
            return None
        missing = set(missing)
        for object_id in ids:
            if object_id not in missing and self.locations[object_id][1] == META_ERROR:
                return object_id
        return None

    def wait(self, refs: Sequence[ObjectRef], num_returns: int, timeout: Optional[float]):
        ids = [ref.binary() for ref in refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.link.lock:
            missing = self.not_ready(ids)
            needed = num_returns - (len(ids) - len(missing))
            if needed > 0:
                self._wait_for(missing, needed, deadline)
            ready, not_ready = [], []
            for ref, object_id in zip(refs, ids):
                if len(ready) < num_returns and object_id in self.locations:
                    ready.append(ref)
                else:
                    not_ready.append(ref)
        return ready, not_ready

    def _wait_for(self, missing: Sequence[bytes], needed: int, deadline: Optional[float],
                  stop_on_error: bool = False) -> "_Waiter":
        """Read messages until ``needed`` of ``missing`` have arrived, or one holding an
        error has (``stop_on_error``), or the deadline (caller holds the lock)."""
        self.before_waiting_on(missing)
        waiter = _Waiter(len(missing))
        for object_id in missing:
            self._waiters.setdefault(object_id, []).append(waiter)
        enough = len(missing) - needed  # stop when this many are still missing
        if stop_on_error:
            done = lambda: waiter.remaining <= enough or waiter.failed is not None  # noqa: E731
        else:
            done = lambda: waiter.remaining <= enough  # noqa: E731
        try:
            self.link.wait_until(done, deadline)
        finally:
            for object_id in missing:
                waiters = self._waiters.get(object_id)
                if waiters and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._waiters[object_id]
        return waiter

    def wait_for_any(self, ids: Sequence[bytes], deadline: Optional[float]) -> bool:
        """Read messages until one of ``ids`` has arrived (caller holds the lock, and has
        asked to hear of them); False on timeout."""
        missing = [i for i in ids if i not in self.locations]
        if len(missing) < len(ids):
            return True
        return self._wait_for(missing, 1, deadline).remaining < len(missing)

    def value_at(self, object_id: bytes, location) -> object:
        data, metadata = location
        if data is not None:
            return _unwrap(deserialize_inline(data), metadata)
        view, metadata = self._pinned_view(object_id)
        return _unwrap(deserialize(view), metadata)

    def _pinned_view(self, object_id: bytes):
        deadline = time.monotonic() + _RESTORE_WAIT
        while True:
            try:
                return self.store.pinned_view(object_id)
            except ObjectSpilledError:
                info = self.store.info(object_id)
                self.spiller.restore(object_id, info.data_size + info.metadata_size)
            except ObjectNotSealedError:
                if time.monotonic() > deadline:
                    info = self.store.info(object_id)
                    raise exceptions.ObjectFetchTimedOutError(
                        f"object {object_id.hex()} has been being restored from disk by process "
                        f"{info.creator_pid} for over {_RESTORE_WAIT:.0f} s"
                    ) from None
                time.sleep(0.0005)  # another process is restoring it
            except ObjectNotFoundError:
                raise exceptions.ObjectLostError(
                    f"object {object_id.hex()} is not in the object store any more"
                ) from None

    def clear(self) -> None:
        self.releases.clear()
        self.counts.clear()
        self.locations.clear()
        self.unregistered.clear()
        self.owner_only.clear()


class _Waiter:
    __slots__ = ("remaining", "failed")

    def __init__(self, remaining: int):
        self.remaining = remaining
        self.failed: Optional[bytes] = None  # an object that arrived holding an error


def _unwrap(value, metadata: bytes):
    if metadata == META_ERROR:
        if isinstance(value, exceptions.RayTaskError):
            raise value.as_instanceof_cause()
        raise value
    return value
