"""The object directory: for each object, where it is and who holds it.

Runs in: the scheduler.

An object is inline bytes kept here (small values) or sealed in the arena.  It is held by
the processes with a live ObjectRef to it, by the pending tasks and actor constructors that
take it as an argument, and by the stored objects that contain a ref to it; it is freed once
nothing holds it (an arena object still viewed somewhere is only marked: the store frees it
at the last unpin).  Those who wait for it are told when it is ready: subscribers get READY,
dependents (a task or an actor waiting for its arguments) are woken through the callback
they registered with.  An actor handle is a pseudo-object here: when nothing holds it any
more, the actors' part hears of it (``on_actor_unheld``).

Holds of and subscriptions to ids nobody has made known yet wait in ``doubtful`` until the
loop has read everything every process sent (``settle_doubtful``); results of direct calls
and leased tasks that overtook their registration wait in ``early``.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Dict, List, Optional

from .. import _events, _protocol as P, exceptions
from .._object_store import ObjectNotFoundError, ObjectStore
from .._serialization import META_ERROR, serialize
from .clients import Client, Clients


class ObjectEntry:
    __slots__ = ("ready", "data", "metadata", "holders", "arg_holds", "container_holds",
                 "contained", "subscribers", "dependents", "actor")

    def __init__(self):
        self.ready = False
        self.data: Optional[bytes] = None   # inline bytes; None while pending or in the arena
        self.metadata = b""
        self.holders: set = set()           # Clients with a live ref
        self.arg_holds = 0                  # pending tasks that take it as an argument
        self.container_holds = 0            # stored objects that contain a ref to it
        self.contained: List[bytes] = []    # refs this object's value contains
        self.subscribers: List[Client] = []
        self.dependents: list = []          # (dependent, wake(dependent, entry))
        self.actor = False                  # the pseudo-object that actor handles hold

    @property
    def in_arena(self) -> bool:
        return self.ready and self.data is None and not self.actor

    @property
    def failed(self) -> bool:
        return self.metadata == META_ERROR

    @property
    def unheld(self) -> bool:
        return not self.holders and not self.arg_holds and not self.container_holds


_KINDS_KEPT = 256
_kinds: Dict[bytes, tuple] = {}  # the latest errors made here -> (error code, message)


def serialized(error: BaseException) -> tuple:
    """(data, metadata) of an error, as the value of the objects it fails."""
    data = serialize(error, META_ERROR).to_bytes()
    if len(_kinds) >= _KINDS_KEPT:
        del _kinds[next(iter(_kinds))]
    _kinds[data] = (_events.error_code(error), _events.error_message(error))
    return data, META_ERROR


def kind_of(data: bytes, default: int) -> tuple:
    """(error code, message) of an error ``serialized`` made lately; else ``default`` and
    no message (the scheduler never unpickles what other processes made: ``_events``)."""
    return _kinds.get(data) or (default, None)


class Directory:
    def __init__(self, store: ObjectStore, clients: Clients, session_dir: str):
        self.store = store
        self.clients = clients
        self.session_dir = session_dir
        self.entries: Dict[bytes, ObjectEntry] = {}
        self.doubtful: list = []  # (client, id, subscribe) of ids unknown when read
        # Results that overtook their call's registration: task id -> (results, caller
        # pid, retryable).
        self.early: Dict[bytes, tuple] = {}
        self.on_actor_unheld: Callable[[bytes], None] = lambda actor_id: None

    def __contains__(self, object_id: bytes) -> bool:
        return object_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, object_id: bytes) -> Optional[ObjectEntry]:
        return self.entries.get(object_id)

    def entry(self, object_id: bytes) -> ObjectEntry:
        entry = self.entries.get(object_id)
        if entry is None:
            entry = self.entries[object_id] = ObjectEntry()
        return entry

    # -- holders ---------------------------------------------------------------------------

    def on_put(self, client: Client, object_id, data, metadata, contained) -> None:
        entry = self.entry(object_id)
        entry.holders.add(client)
        client.holds.add(object_id)
        self.make_ready(object_id, entry, data, metadata, contained)

    def on_hold(self, client: Client, ids) -> None:
        for object_id in ids:
            entry = self.entries.get(object_id)
            if entry is not None:
                entry.holders.add(client)
                client.holds.add(object_id)
            else:  # a ref that came by a way of the user's own, faster: ``settle_doubtful``
                self.doubtful.append((client, object_id, False))

    def on_escaped(self, client: Client, ids) -> None:
        """Refs the client pickled itself (for a queue or a file of its own): we can't see
        where they go, so it holds their objects until it exits (as Ray does)."""
        for object_id in ids:
            entry = self.entries.get(object_id)
            if entry is not None:
                entry.holders.add(client)
                client.holds.add(object_id)
                client.escaped.add(object_id)

    def on_release(self, client: Client, ids) -> None:
        for object_id in ids:
            if object_id in client.escaped:
                continue
            client.holds.discard(object_id)
            entry = self.entries.get(object_id)
            if entry is not None:
                entry.holders.discard(client)
                self.maybe_free(object_id, entry)

    def release_holds_of(self, client: Client) -> None:
        """A process is gone: so are its refs."""
        for object_id in list(client.holds):
            entry = self.entries.get(object_id)
            if entry is not None:
                entry.holders.discard(client)
                self.maybe_free(object_id, entry)
        client.holds.clear()
        client.escaped.clear()

    def hold_arguments(self, ids) -> tuple:
        """Hold the ids a pending task or actor constructor takes: (those held, those
        unknown, whose objects are gone: they fail it)."""
        held, unknown = [], []
        for object_id in ids:
            entry = self.entries.get(object_id)
            if entry is None:
                unknown.append(object_id)
            else:
                entry.arg_holds += 1
                held.append(object_id)
        return held, unknown

    def release_arguments(self, ids) -> None:
        """Drop the holds a pending task or actor constructor had on its arguments."""
        for object_id in ids:
            entry = self.entries.get(object_id)
            if entry is not None:
                entry.arg_holds -= 1
                self.maybe_free(object_id, entry)

    def inline_values(self, ids, pending: bool = False) -> dict:
        """{id: (data, metadata)} of those of ``ids`` kept here (the rest are in the arena),
        and, if ``pending``, {id: None} of those not ready yet (a task sent ahead: its
        worker makes them)."""
        values = {}
        for object_id in ids:
            entry = self.entries[object_id]
            if entry.data is not None:
                values[object_id] = (entry.data, entry.metadata)
            elif pending and not entry.ready:
                values[object_id] = None
        return values

    # -- readiness -------------------------------------------------------------------------

    def on_subscribe(self, client: Client, ids) -> None:
        for object_id in ids:
            if object_id in self.entries:
                self.subscribe(client, object_id)
            else:
                # Perhaps named in a message another process sent first that is not read
                # yet (a driver registers a task's result before a ref to it leaves by a
                # way of its own): answered once all that has arrived is read.
                self.doubtful.append((client, object_id, True))

    def subscribe(self, client: Client, object_id: bytes) -> None:
        entry = self.entries.get(object_id)
        if entry is None:
            self.clients.send(client, P.ready(object_id, *self.lost(object_id)))
        elif entry.ready:
            self.clients.send(client, P.ready(object_id, entry.data, entry.metadata))
        else:
            entry.subscribers.append(client)

    def settle_doubtful(self, doubtful: list) -> None:
        """Answer holds and subscriptions of ids unknown when read, now that the loop has
        read everything every process had sent since (``Scheduler._settle_doubtful``)."""
        for client, object_id, subscribe in doubtful:
            if not client.alive:
                continue
            if subscribe:
                self.subscribe(client, object_id)
            elif object_id in self.entries:  # else it is gone, and its get says so
                self.on_hold(client, (object_id,))

    @staticmethod
    def lost(object_id: bytes) -> tuple:
        return serialized(exceptions.ObjectLostError(
            f"object {object_id.hex()} is unknown to this session: it was freed (no ref was "
            "left to it) or it belongs to another session"
        ))

    def make_ready(self, object_id, entry: ObjectEntry, data, metadata, contained) -> None:
        entry.ready = True
        entry.data = data
        entry.metadata = metadata
        entry.contained = list(contained)
        for inner in entry.contained:
            inner_entry = self.entries.get(inner)
            if inner_entry is not None:
                inner_entry.container_holds += 1
        for subscriber in entry.subscribers:
            self.clients.send(subscriber, P.ready(object_id, data, metadata))
        entry.subscribers = []
        dependents, entry.dependents = entry.dependents, []
        for dependent, wake in dependents:
            wake(dependent, entry)
        self.maybe_free(object_id, entry)

    def maybe_free(self, object_id: bytes, entry: ObjectEntry) -> None:
        # Freeing cascades (a failed dependent releases its arguments, a freed object its
        # contained refs), so an entry may already be gone when its caller gets here.
        if not entry.ready or not entry.unheld or self.entries.get(object_id) is not entry:
            return
        del self.entries[object_id]
        if entry.actor:
            self.on_actor_unheld(object_id)
        elif entry.in_arena:
            try:
                outcome = self.store.delete(object_id)
            except ObjectNotFoundError:
                outcome = 0
            if outcome & 4:  # SHM_DELETED_SPILLED: the spill file is ours to remove
                _unlink_quietly(os.path.join(self.session_dir, "spill", object_id.hex()))
        for inner in entry.contained:
            inner_entry = self.entries.get(inner)
            if inner_entry is not None:
                inner_entry.container_holds -= 1
                self.maybe_free(inner, inner_entry)

    # -- results ---------------------------------------------------------------------------

    def keep_early(self, task_id: bytes, results, caller_pid: int, retryable: bool) -> None:
        """Results that overtook their call's registration: kept, and the refs inside them
        held, until it arrives; dropped if the caller is gone (it never will)."""
        if not self.clients.has_pid(caller_pid):
            self.drop_results(results)
            return
        for _, _, _, contained in results:
            for inner in contained:
                entry = self.entries.get(inner)
                if entry is not None:
                    entry.container_holds += 1
        self.early[task_id] = (results, caller_pid, retryable)

    def take_early(self, task_id: bytes) -> Optional[tuple]:
        """(results, caller pid, retryable) kept for this task, if they came first; the
        caller hands the results on, then calls ``unprotect`` on them."""
        return self.early.pop(task_id, None)

    def drop_early_of(self, caller_pid: int) -> None:
        """The caller died: the registrations its kept results waited for will never come."""
        for task_id, (results, pid, _) in list(self.early.items()):
            if pid == caller_pid:
                del self.early[task_id]
                self.drop_results(results)
                self.unprotect(results)

    def unprotect(self, results) -> None:
        for _, _, _, contained in results:
            for inner in contained:
                entry = self.entries.get(inner)
                if entry is not None:
                    entry.container_holds -= 1
                    self.maybe_free(inner, entry)

    def drop_unclaimed(self, results) -> None:
        """Arena results of a report that is ignored, unless the object is one the
        directory knows is in the arena (then it is that very object)."""
        for object_id, data, _, _ in results:
            entry = self.entries.get(object_id)
            if data is None and (entry is None or not entry.in_arena):
                self.delete_quietly(object_id)

    def drop_results(self, results) -> None:
        for object_id, data, _, _ in results:
            if data is None:
                self.delete_quietly(object_id)

    def delete_quietly(self, object_id: bytes) -> None:
        try:
            self.store.delete(object_id)
        except ObjectNotFoundError:
            pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
