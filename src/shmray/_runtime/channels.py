"""Direct channels: actor calls that go straight to the actor, not through the scheduler.

Runs in: the driver, every worker and every sync or threaded actor (an async actor's event
loop reads only its own descriptors, and calls actors through the scheduler).

A call with no ref among its arguments goes down a socket to the actor (``_direct``), and
its result comes back the same way.  We own such a call, as the driver owns the tasks it
runs on leased workers (``leases``): the scheduler hears of it only when it must
(``register``): a ref to one of its results leaves this process, a call of ours through
the scheduler follows it (and must not overtake it), our last handle to the actor goes (the
actor ends once the calls made before are done), the actor could not hand us the results
(refs inside, a failure to retry, results in the arena: it reports those itself), or the
channel broke first.  Otherwise the results live here alone (``Objects.owner_only``), and
are published if a ref to one ever leaves: for a burst of calls the scheduler does nothing
per call.  A registered call's results we report (CALLER_DONE) unless the actor did.

When the channel breaks (the actor died, or is restarting), we are the witness of what came
back: we read all the actor sent, register the calls left unanswered and name them
(CALLS_LOST); the scheduler, which keeps the registered calls the dead process owed waiting
for this word (``_scheduler.actors``), retries or fails them as it would its own.

Order: a call must never overtake an earlier call of ours to the same actor.  While one of
ours that went through the scheduler is unfinished (``routed``), later ones go that way too;
a routed call registers the unanswered direct calls before it, behind which the scheduler
holds it; and after a channel broke owing us calls, the next call goes through the
scheduler, behind those it retries.  The call after that connects afresh, to the actor's
next incarnation if it restarts.

``Channel`` is also what a driver holds to a worker it leases (``leases``), and ``Owned``
what a task or call of ours is while the scheduler may not know of it.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from .. import _direct, _protocol as P, exceptions
from .._connection import Connection, wait_readable
from .._object_ref import ObjectRef
from .link import Link
from .objects import Objects, any_in_arena

_LOST_CHANNEL_WAIT = 1.0      # a dead peer's channel is at its end well within this
_OWED_TICK = 0.002            # how often the flusher reads answers to registered calls
_SETTLE_PATIENCE = 5.0        # how long an exiting process waits for them


class Channel:
    """This process's direct connection to an actor, or to a worker it leases."""

    __slots__ = ("actor_id", "conn", "peer_pid", "last_write", "sent", "last_used",
                 "recalled", "stalled", "depth_limit")

    def __init__(self, actor_id: Optional[bytes], conn: Connection, peer_pid: int):
        self.actor_id = actor_id  # None for a leased worker
        self.conn = conn
        self.peer_pid = peer_pid  # which process got our work, for the scheduler
        self.last_write = 0.0
        self.sent: dict = {}          # task id -> Owned: sent, not answered, in order
        self.last_used = 0.0
        self.recalled = False         # a lease: the scheduler wants it back
        self.stalled = False          # a lease: its task waits in get(); send nothing more
        self.depth_limit = 1          # a lease: how many tasks it may have (``leases``)


class Owned:
    """A task or call of ours sent straight to its callee, or waiting for a lease (the
    driver's backlog), which the scheduler knows of only once ``registered``."""

    __slots__ = ("spec", "return_ids", "registered", "holds")

    def __init__(self, spec: tuple, return_ids, holds=None):
        self.spec = spec
        self.return_ids = return_ids
        self.registered = False
        self.holds = holds  # a leased task sent behind another: its argument (``behind``)


def read_to_the_end(channel: Channel, take) -> None:
    """Hand ``take`` every message a lost channel's peer sent while work is owed on it
    (when the peer died, the end of its stream is there; one alive but cut off gets a
    moment)."""
    while channel.sent:
        if not wait_readable(channel.conn.fd, _LOST_CHANNEL_WAIT):
            return
        messages, lost = channel.conn.read_available()
        take(channel, messages)
        if lost:
            return


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
        self._settling: set = set()  # actors whose lost channel owed us calls (see above)
        self.calls_sent = 0          # how many went straight (for tests and curiosity)
        self._owed = 0               # registered calls not answered yet (``tend``)
        objects.on_ready = self._routed_done

    def call(self, actor_id: bytes, spec: tuple, return_ids, direct_ok: bool,
             ordered: bool = True) -> List[ObjectRef]:
        """Send an actor call: straight to the actor when ``direct_ok`` (no ref among its
        arguments) and order allows (always, to an actor that is not ``ordered``), else
        through the scheduler (caller holds the lock)."""
        objects = self.objects
        task_id = spec[P.SPEC_TASK_ID]
        objects.actor_calls.add(task_id)
        channel = self._channel(actor_id, ordered) if direct_ok else None
        if channel is not None:
            channel.conn.send(P.call(spec, {}))
            if self.link.write_soon(channel):
                self.calls_sent += 1
                record = channel.sent[task_id] = Owned(spec, return_ids)
                for object_id in return_ids:
                    objects.direct_pending[object_id] = channel
                if channel.conn in self.link.unflushed:
                    self.link.flush_later()  # a burst: sent with the next, or by the flusher
                return objects.own(record)
            self.lost(channel)  # it died: the scheduler knows what became of the call
        channel = self.by_actor.get(actor_id)
        if channel is not None:
            self._register_sent(channel)  # the scheduler holds this call behind those
        self._settling.discard(actor_id)  # this call waits behind the calls it settles
        first = return_ids[0]
        self._routed.setdefault(actor_id, set()).add(first)
        self._routed_ids[first] = actor_id
        return objects.send_owning(P.actor_call(actor_id, spec), return_ids)

    def _channel(self, actor_id: bytes, ordered: bool) -> Optional[Channel]:
        if not self.enabled or (ordered and (self._routed.get(actor_id)
                                             or actor_id in self._settling)):
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
        self.objects.before_release = self._releasing
        return channel

    def _routed_done(self, object_id: bytes) -> None:
        if self._routed_ids:
            actor_id = self._routed_ids.pop(object_id, None)
            if actor_id is not None:
                routed = self._routed[actor_id]
                routed.discard(object_id)
                if not routed:  # one entry per actor ever called would pile up
                    del self._routed[actor_id]

    # -- results ---------------------------------------------------------------------------

    def _read(self, channel: Channel) -> None:
        """Results the actor sent straight back (caller holds the lock)."""
        messages, lost = channel.conn.read_available()
        self._take(channel, messages)
        if lost:
            self.lost(channel)

    def _take(self, channel: Channel, messages) -> None:
        objects = self.objects
        for _, task_id, delivered, undelivered, _, _ in messages:  # RESULT, the only kind
            record = channel.sent.pop(task_id, None)
            reported = bool(undelivered) or any_in_arena(delivered)  # by the actor
            if record is not None and record.registered:
                self._owed -= 1
            elif record is not None:
                if not reported:
                    objects.keep_unregistered(delivered)
                    continue
                self.register(record, channel)  # the scheduler keeps the actor's report
            if record is not None and record.registered and not reported:
                self.link.conn.send(P.caller_done(task_id, delivered, channel.actor_id))
                self.link.flush_later()
            objects.take_direct(delivered, undelivered)

    # -- telling the scheduler -------------------------------------------------------------

    def register(self, record: Owned, channel: Channel) -> None:
        """Tell the scheduler of a call of ours sent straight to ``channel``'s actor
        (caller holds the lock)."""
        objects, conn = self.objects, self.link.conn
        conn.send(P.direct_call(channel.actor_id, channel.peer_pid, record.spec))
        if record.spec[P.SPEC_TASK_ID] in channel.sent:
            self._owed += 1  # its answer is read by the flusher if not by the program
        gone = objects.now_registered(record)
        if gone:
            conn.send(P.release(gone))
        self.link.flush_later()

    def _register_sent(self, channel: Channel) -> None:
        for record in channel.sent.values():
            if not record.registered:
                self.register(record, channel)

    def _releasing(self, released) -> None:
        """Our last handle to an actor goes: calls of ours it has not answered are
        registered first, and it ends only once they are done (caller holds the lock)."""
        by_actor = self.by_actor
        for object_id in released:
            channel = by_actor.get(object_id)
            if channel is not None and channel.sent:
                self._register_sent(channel)

    def lost(self, channel: Channel) -> None:
        """The actor died (or restarted), or the channel broke: take all it sent, then
        tell the scheduler which calls never came back, which it retries or fails."""
        actor_id = channel.actor_id
        self.link.readers.pop(channel.conn.fd, None)  # not read again meanwhile: a
        read_to_the_end(channel, self._take)          # future's callback may wait in get()
        unanswered = list(channel.sent.values())
        if unanswered:
            for record in unanswered:
                if not record.registered:
                    self.register(record, channel)
            self._owed -= len(unanswered)
            self.link.conn.send(P.calls_lost(actor_id, channel.peer_pid,
                                             [r.spec[P.SPEC_TASK_ID] for r in unanswered]))
            self._settling.add(actor_id)
            self.link.flush_later()
        channel.sent.clear()
        self.link.drop(channel.conn)
        if self.by_actor.get(actor_id) is channel:
            del self.by_actor[actor_id]
        self.objects.channel_gone(channel)

    # -- while the program is busy elsewhere, and before this process exits ----------------

    def tend_interval(self) -> Optional[float]:
        return _OWED_TICK if self._owed else None

    def tend(self) -> None:
        """The flusher's round: answers to calls we registered are read and reported though
        the program is busy elsewhere, for the scheduler waits on them (a call through it
        queued behind them, the actor's end after our last handle went, a ref to them
        elsewhere, the fate of calls a dead actor owed)."""
        link = self.link
        if not self._owed or link.reading:
            return
        with link.lock:
            if link.closed or link.reading or not self._owed:
                return
            try:
                link.poll()
                link.flush()
            except exceptions.RaySystemError:
                pass

    def settle(self, patience: float = _SETTLE_PATIENCE) -> None:
        """Before this process exits: wait (a while) for the answers to calls we registered,
        and report them: refs to their results live elsewhere, and the answers come to us
        alone."""
        if not self._owed:
            return
        with self.link.lock:
            try:
                self.link.wait_until(lambda: not self._owed or self.link.closed,
                                     time.monotonic() + patience)
                self.link.flush()
            except exceptions.RaySystemError:
                pass

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
