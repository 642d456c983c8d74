"""Direct channels: actor calls that go straight to the actor, not through the scheduler.

Runs in: the driver, every worker and every sync or threaded actor (an async actor's event
loop reads only its own descriptors, and calls actors through the scheduler).

A call with no ref among its arguments goes down a socket to the actor (``_direct``), and
its result comes back the same way; the scheduler hears of the call afterwards, with the
next frame (DIRECT_CALL), so it can fail or retry it should the actor die.  Order: a call
must never overtake an earlier call of ours to the same actor, so while one of ours that
went through the scheduler is unfinished (``routed``), later ones go that way too.  When a
channel breaks, the scheduler tells us what became of the calls it owed
(``Objects.channel_gone``), and the next call connects afresh, to the actor's next
incarnation if it restarts.

``Channel`` is also what a driver holds to a worker it leases (``leases``).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from .. import _direct, _protocol as P
from .._connection import Connection
from .._object_ref import ObjectRef
from .link import Link
from .objects import Objects


class Channel:
    """This process's direct connection to an actor, or to a worker it leases."""

    __slots__ = ("actor_id", "conn", "peer_pid", "last_write", "sent", "last_used",
                 "recalled", "stalled", "depth_limit")

    def __init__(self, actor_id: Optional[bytes], conn: Connection, peer_pid: int):
        self.actor_id = actor_id  # None for a leased worker
        self.conn = conn
        self.peer_pid = peer_pid  # which process got our work, for the scheduler
        self.last_write = 0.0
        self.sent: dict = {}          # a lease: tasks sent, not answered, in order
        self.last_used = 0.0
        self.recalled = False         # a lease: the scheduler wants it back
        self.stalled = False          # a lease: its task waits in get(); send nothing more
        self.depth_limit = 1          # a lease: how many tasks it may have (``leases``)


class Channels:
    """This process's direct channels to actors, one per actor it calls."""

    def __init__(self, link: Link, objects: Objects, socket_dir: str):
        self.link = link
        self.objects = objects
        self.socket_dir = socket_dir
        self.enabled = True  # False in an async actor (see above)
        self.by_actor: Dict[bytes, Channel] = {}
        self._routed: Dict[bytes, set] = {}     # actor id -> first result ids of calls that
        self._routed_ids: Dict[bytes, bytes] = {}  # went through the scheduler, unfinished
        objects.on_ready = self._routed_done

    def call(self, actor_id: bytes, spec: tuple, return_ids, direct_ok: bool,
             ordered: bool = True) -> List[ObjectRef]:
        """Send an actor call: straight to the actor when ``direct_ok`` (no ref among its
        arguments) and order allows (always, to an actor that is not ``ordered``), else
        through the scheduler (caller holds the lock)."""
        self.objects.actor_calls.add(spec[P.SPEC_TASK_ID])
        channel = self._channel(actor_id, ordered) if direct_ok else None
        if channel is not None:
            channel.conn.send(P.call(spec, {}))
            if self.link.write_soon(channel):
                self.link.send(P.direct_call(actor_id, channel.peer_pid, spec))
                for object_id in return_ids:
                    self.objects.direct_pending[object_id] = channel
                refs = [self.objects.add_owned_ref(object_id) for object_id in return_ids]
                self.link.flush_later()
                return refs
            self.lost(channel)  # it died: the scheduler knows what became of the call
        first = return_ids[0]
        self._routed.setdefault(actor_id, set()).add(first)
        self._routed_ids[first] = actor_id
        return self.objects.send_owning(P.actor_call(actor_id, spec), return_ids)

    def _channel(self, actor_id: bytes, ordered: bool) -> Optional[Channel]:
        if (ordered and self._routed.get(actor_id)) or not self.enabled:
            return None  # calls of ours still in the scheduler would be overtaken
        channel = self.by_actor.get(actor_id)
        if channel is not None:
            return channel
        connected = _direct.connect(_direct.address(self.socket_dir, actor_id))
        if connected is None:  # not listening yet: try again once the routed calls are done
            return None
        channel = self.by_actor[actor_id] = Channel(actor_id, *connected)
        self.link.readers[channel.conn.fd] = lambda: self._read(channel)
        self.link.wake_reader()
        return channel

    def _routed_done(self, object_id: bytes) -> None:
        if self._routed_ids:
            actor_id = self._routed_ids.pop(object_id, None)
            if actor_id is not None:
                routed = self._routed[actor_id]
                routed.discard(object_id)
                if not routed:  # one entry per actor ever called would pile up
                    del self._routed[actor_id]

    def _read(self, channel: Channel) -> None:
        """Results the actor sent straight back (caller holds the lock)."""
        messages, lost = channel.conn.read_available()
        for _, _, delivered, undelivered, _, _ in messages:  # RESULT, the only kind
            self.objects.take_direct(delivered, undelivered)
        if lost:
            self.lost(channel)

    def lost(self, channel: Channel) -> None:
        """The actor died (or restarted): the scheduler tells what it still owes us.  The
        next call connects afresh once the calls made meanwhile, which go through the
        scheduler, are done."""
        self.link.drop(channel.conn)
        if self.by_actor.get(channel.actor_id) is channel:
            del self.by_actor[channel.actor_id]
        self.objects.channel_gone(channel)

    def killed(self, actor_id: bytes) -> None:
        """The actor is dead, and the scheduler has dealt with its death."""
        with self.link.lock:
            channel = self.by_actor.get(actor_id)
            if channel is not None:  # to a dead process: the scheduler says what it owed
                self.lost(channel)

    def close(self) -> None:
        for channel in self.by_actor.values():
            channel.conn.close()
        self.by_actor.clear()
