"""Leases: a driver runs its plain tasks on workers the scheduler lends it, and owns them.

Runs in: the driver (a worker or actor submits through the scheduler).

A task with no ref among its arguments that asks for one CPU is ours to run: it waits in
our backlog until a worker the scheduler lends us (a lease) has room, goes to it down a
direct channel (``_direct``), and its result comes straight back.  The scheduler hears of
it only when it must (``register``): a ref to it leaves this process, it is cancelled,
its result holds refs or lives in the arena, it will be retried, it submitted tasks or
waited in get() (its worker says so), or its worker died.  Otherwise its result lives here
alone (``Objects.owner_only``) and is published (PUT) if a ref to it is ever sent
anywhere.  This is Ray's ownership: for a burst of short tasks the scheduler does nothing
per task.  (The scheduler's side, and the protocol drawn whole: ``_scheduler.leases``.)

How much to send a lease at once is learnt (``_run_times``): as many tasks of a short
function as run within a budget, one of any other.  A task that waits in get() makes its
worker hand back the tasks queued behind it (HANDED_BACK): they may be what it waits for.
A task whose one ref argument is the result of our last task on a lease goes right
behind it there (``behind``): a chain runs on the lease as plain tasks do.

The flusher thread (``link``) looks after the leases while the program is busy elsewhere:
it keeps them fed from the backlog, and gives back those left idle for ``IDLE_SECONDS``.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import List, Optional

from .. import _direct, _protocol as P, exceptions
from .._object_ref import ObjectRef
from .._run_times import RunTimes
from .behind import SentBehind
from .channels import Channel, Owned, read_to_the_end
from .link import FLUSH_DELAY, Link
from .objects import Objects, any_in_arena

IDLE_SECONDS = 0.002          # a lease unused this long goes back to the scheduler
_BUSY_TICK = 0.01             # how often the flusher looks at a lease whose task runs
_PIPELINE_MAX_DEPTH = 256     # tasks in flight on one leased worker, at most
_BACKLOG_POLL_EVERY = 16      # while submitting into a backlog, look for results this often
_UNREACHABLE_MAX = 3          # leases in a row we can't connect to before we stop leasing


def leasable(spec: tuple) -> bool:
    """A task a leased worker may run: nothing to wait for or hold, one CPU, no per-task
    environment, not a generator; the rest go through the scheduler."""
    return (not spec[P.SPEC_ARG_IDS] and not spec[P.SPEC_CONTAINED]
            and spec[P.SPEC_RESOURCES] == P.LEASE_SHAPE and not spec[P.SPEC_EXTRA]
            and spec[P.SPEC_NUM_RETURNS] >= 0)


class Leases(SentBehind):
    """The workers this driver leases, and its tasks waiting for one."""

    def __init__(self, link: Link, objects: Objects, socket_dir: str, max_leases: int,
                 enabled: bool):
        self.link = link
        self.objects = objects
        self.socket_dir = socket_dir
        self.enabled = enabled
        self.held: List[Channel] = []
        self.backlog: collections.deque = collections.deque()  # Owned, waiting for room
        self.tasks_sent = 0           # how many went to a lease (for tests and curiosity)
        self._backlog_submits = 0     # tasks submitted into the backlog (polls among them)
        # When the program last submitted a task: while it does, it writes as it goes, and
        # the flusher keeps off the lock (two threads taking turns at it cost more than
        # they save).
        self._submitted_at = 0.0
        self._wanted = 0              # more leases asked for, as the scheduler knows it
        self._max = max_leases
        self._run_times = RunTimes(_PIPELINE_MAX_DEPTH)
        self._unreachable = 0         # workers lent to us in a row that we couldn't reach
        self.register_call = None     # (Owned, Channel): an actor call's (``channels``)
        link.handlers[P.LEASE_GRANTED] = self._granted
        link.handlers[P.LEASE_RECALL] = self._recalled
        link.handlers[P.LEASE_LOST] = self._lost
        link.submitting = lambda: time.monotonic() - self._submitted_at < FLUSH_DELAY
        link.before_reading = self._before_reading
        objects.before_waiting_on = self._free_for

    # -- submitting ------------------------------------------------------------------------

    def submit(self, spec: tuple, return_ids) -> List[ObjectRef]:
        """Own a plain task: into the backlog, from which the roomiest lease takes it at
        once if nothing waits before it; else ask for leases (caller holds the lock)."""
        now = self._submitted_at = time.monotonic()
        if now - self.link.last_flush > FLUSH_DELAY:
            self.link.send_all()
        record = Owned(spec, return_ids)
        refs = self.objects.own(record)
        backlog = self.backlog
        backlog.append(record)
        if len(backlog) == 1:
            lease = self._roomiest()
            if lease is not None:
                self._feed(lease)
        if backlog:
            self._want()
            self._backlog_submits += 1
            if self._backlog_submits % _BACKLOG_POLL_EVERY == 0:
                self.link.poll()  # results in: their workers have room again
        return refs

    def _roomiest(self) -> Optional[Channel]:
        best = None
        for lease in self.held:
            if not (lease.recalled or lease.stalled) and (
                    best is None or len(lease.sent) < len(best.sent)):
                best = lease
        return best

    def _feed(self, lease: Channel) -> None:
        """Send the lease what it has room for from the backlog (caller holds the lock).  A
        recalled lease gets nothing and goes back once its tasks are done."""
        if lease.recalled:
            if not lease.sent:
                self._give_back(lease)
            return
        backlog = self.backlog
        sent = 0
        while backlog and not lease.stalled:
            record = backlog[0]
            if record.holds is not None:
                self._feed_behind(record)
                continue
            if not self._has_room(lease, record.spec[P.SPEC_FN_ID]):
                break
            backlog.popleft()
            sent += 1
            if not self.send(lease, record):
                return
        if sent:
            lease.last_used = time.monotonic()
            if lease.conn in self.link.unflushed:
                self.link.flush_later()
            if backlog:
                other = self._roomiest()  # spread a burst over every lease
                if other is not None and other is not lease and not other.sent:
                    self._feed(other)

    def _has_room(self, lease: Channel, fn_id: bytes) -> bool:
        """Whether a task of ``fn_id`` may queue on the lease: behind tasks of short
        functions only, as many as the shortest allowance among them all."""
        sent = len(lease.sent)
        return not sent or sent < min(lease.depth_limit, self._run_times.depth(fn_id))

    def send(self, lease: Channel, record: Owned, values=None) -> bool:
        spec = record.spec
        depth = self._run_times.depth(spec[P.SPEC_FN_ID])
        lease.depth_limit = min(lease.depth_limit, depth) if lease.sent else depth
        lease.conn.send(P.execute(spec, None, values or {}))
        lease.sent[spec[P.SPEC_TASK_ID]] = record
        for object_id in record.return_ids:
            self.objects.direct_pending[object_id] = lease
        self.tasks_sent += 1
        if not self.link.write_soon(lease):  # it died: the scheduler runs its tasks instead
            self.lost(lease)
            return False
        return True

    # -- results ---------------------------------------------------------------------------

    def _read(self, lease: Channel) -> None:
        """What the worker sent back (caller holds the lock)."""
        messages, lost = lease.conn.read_available()
        self._take(lease, messages)
        if lost:
            self.lost(lease)

    def _take(self, lease: Channel, messages) -> None:
        objects = self.objects
        for message in messages:
            if message[0] == P.HANDED_BACK:
                self._handed_back(lease, message[1])
                continue
            if message[0] == P.TASK_DONE:  # not run: ``submit_behind``
                self._not_run(lease, message[1])
                continue
            _, task_id, delivered, undelivered, took, must_register = message  # RESULT
            record = self._done(lease, task_id, delivered, undelivered, took, must_register)
            if record is not None and not record.registered:
                objects.keep_unregistered(delivered)
            else:
                objects.take_direct(delivered, undelivered)
        if lease in self.held:
            self._feed(lease)

    def _done(self, lease: Channel, task_id, delivered, undelivered, took, must_register):
        """A leased task is done: the record it was sent as, or None."""
        record = lease.sent.pop(task_id, None)
        if record is None:
            return None
        lease.stalled = False
        if record.holds is not None:
            self._release_hold(record)
        self._run_times.note(record.spec[P.SPEC_FN_ID], took, must_register)
        if not record.registered and (undelivered or must_register
                                      or any_in_arena(delivered)):
            self.register(record, lease)
        if record.registered and not undelivered:
            # We are the scheduler's only source for these (``Worker.report``), whether or
            # not we still hold them.
            self.link.conn.send(P.caller_done(task_id, delivered))
        return record

    # -- telling the scheduler -------------------------------------------------------------

    def register(self, record: Owned, lease: Optional[Channel]) -> None:
        """Tell the scheduler of a task of ours: one sent to ``lease``, or (None) one still
        in the backlog, which the scheduler then runs itself (caller holds the lock)."""
        objects, conn = self.objects, self.link.conn
        spec = record.spec
        if spec[P.SPEC_ARG_IDS]:  # sent behind the task making it: the scheduler must know it
            self.publish(spec[P.SPEC_ARG_IDS])
        if lease is None:
            if record.holds is None or record in self.backlog:  # (one sent behind another
                self.backlog.remove(record)                     # may never have been)
            conn.send(P.submit(spec))
            objects.owned_pending.update(i for i in record.return_ids if i in objects.counts)
        else:
            conn.send(P.direct_submit(lease.peer_pid, spec))
        gone = objects.now_registered(record)
        if gone:
            conn.send(P.release(gone))
        self._release_hold(record)  # the scheduler holds its argument for it now
        self.link.flush_later()

    def publish(self, ids) -> None:
        """Refs about to leave this process: the scheduler must know their objects first
        (a PUT for a result only we had, the registration of a task only we knew of)."""
        objects = self.objects
        if self.link.closed or not (objects.owner_only or objects.unregistered):
            return
        with self.link.lock:
            for object_id in ids:
                if object_id in objects.owner_only:
                    objects.owner_only.discard(object_id)
                    data, metadata = objects.locations[object_id]
                    self.link.conn.send(P.put(object_id, data, metadata, ()))
                    continue
                record = objects.unregistered.get(object_id)
                if record is None:
                    continue
                channel = objects.direct_pending.get(object_id)
                if channel is not None and channel.actor_id is not None:
                    self.register_call(record, channel)  # an actor call (``channels``)
                else:
                    self.register(record, channel)

    def _want(self) -> None:
        """Ask for as many more workers as the backlog could use (caller holds the lock);
        the request stands until granted or replaced."""
        want = 0
        if self.backlog:
            usable = stalled = 0
            demand = len(self.backlog)
            for lease in self.held:
                demand += len(lease.sent)
                usable += not (lease.recalled or lease.stalled)
                stalled += lease.stalled  # its task waits in get(): its CPU is lent back
            want = max(min(demand, self._max + stalled) - usable, 0)
        if want != self._wanted:
            first = self._wanted == 0
            self._wanted = want
            self.link.conn.send(P.lease_request(want))
            if first and want:
                self.link.flush()  # the backlog waits on the answer...
            self.link.flush_later()  # ...which the flusher reads if the program is busy

    # -- the scheduler's messages ----------------------------------------------------------

    def _granted(self, worker_pid: int) -> None:
        self._wanted = max(self._wanted - 1, 0)
        if not self.enabled:  # granted before our request for no more arrived
            self.link.conn.send(P.lease_return(worker_pid, []))
            return
        connected = _direct.connect(_direct.worker_address(self.socket_dir, worker_pid))
        if connected is None:
            self._unreachable_lease(worker_pid)
            return
        self._unreachable = 0
        # Named by the grant: the kernel's idea of the peer is whoever made the listening
        # socket, which for a worker is the scheduler (``_worker_pool.spawn_worker``).
        lease = Channel(None, connected[0], worker_pid)
        lease.last_used = time.monotonic()
        self.held.append(lease)
        self.link.readers[lease.conn.fd] = lambda: self._read(lease)
        self.link.wake_reader()
        self._feed(lease)
        self._want()
        self.link.flush_later()  # the flusher gives leases left idle back

    def _unreachable_lease(self, worker_pid: int) -> None:
        """The worker lent to us can't be reached (it died meanwhile, or one of us is out of
        descriptors): the scheduler replaces it.  Should that keep happening, our tasks go
        through the scheduler from now on, rather than asking for workers in a loop."""
        self.link.conn.send(P.lease_return(worker_pid, None))
        self._unreachable += 1
        if self._unreachable < _UNREACHABLE_MAX:
            self._want()
            return
        print(f"shmray: {self._unreachable} workers lent to this process in a row could "
              "not be reached; its tasks go through the scheduler from now on",
              file=sys.stderr, flush=True)
        self.enabled = False
        while self.backlog:
            self.register(self.backlog[0], None)
        self._want()

    def _recalled(self, worker_pid: int) -> None:
        """The scheduler has queued work that needs the CPU a lease holds."""
        for lease in self.held:
            if lease.peer_pid == worker_pid:
                lease.recalled = True
                if not lease.sent:
                    self._give_back(lease)
                self._want()
                return

    def _lost(self, worker_pid: int) -> None:
        """LEASE_LOST: report all the dead worker sent us (``lost``), then say we are done."""
        for lease in list(self.held):
            if lease.peer_pid == worker_pid:
                self.lost(lease)
        self.link.conn.send(P.lease_verdict(worker_pid))
        self.link.flush_later()

    def lost(self, lease: Channel) -> None:
        """The worker died, or its channel broke.  Tasks of ours on it never answered: the
        scheduler learns of them now (all but the one it died in run again without using a
        retry), and settles them at once (ending the worker if it lives)."""
        if lease in self.held:
            self.held.remove(lease)
            read_to_the_end(lease, self._take)
            unanswered = list(lease.sent)
            for record in lease.sent.values():
                if not record.registered:
                    self.register(record, lease)
            self.link.conn.send(P.lease_return(lease.peer_pid, unanswered))
            lease.sent.clear()
            self.link.flush_later()
            self._want()
        self.link.drop(lease.conn)
        self.objects.channel_gone(lease)

    # -- giving leases back ----------------------------------------------------------------

    def _free_for(self, missing) -> None:
        """About to wait on work that goes through the scheduler: idle leases go back now,
        their CPUs may be what it waits for (caller holds the lock).  Waiting on a task of
        ours keeps them: the next will want one (the wait gives them back if it lasts)."""
        pending, unregistered = self.objects.direct_pending, self.objects.unregistered
        if self.held and any(i not in pending and i not in unregistered for i in missing):
            self.return_idle(0.0)

    def return_idle(self, idle_for: float) -> None:
        """Give back every lease with no task running for ``idle_for`` seconds (caller holds
        the lock)."""
        now = time.monotonic()
        for lease in list(self.held):
            if not lease.sent and now - lease.last_used >= idle_for:
                self._give_back(lease)

    def _give_back(self, lease: Channel) -> None:
        self.held.remove(lease)
        self.link.drop(lease.conn)
        self.link.conn.send(P.lease_return(lease.peer_pid, []))
        self.link.flush_later()
        if self.backlog:
            self._want()

    # -- the flusher's part, and waits -----------------------------------------------------

    def tend_interval(self) -> Optional[float]:
        """How soon the flusher should look after the leases: each millisecond while a backlog
        waits (their workers must not run dry while the program is busy elsewhere), soon
        while one idles or is asked for, now and then while tasks run, never without."""
        if self.backlog and self.held:
            return FLUSH_DELAY
        if self._wanted or any(not lease.sent for lease in self.held):
            return IDLE_SECONDS
        return _BUSY_TICK if self.held else None

    def tend(self) -> None:
        """The flusher's round while leases are held: give back those left idle, answer
        recalls, and keep the leases fed while the program is busy elsewhere."""
        if not (self.held or self._wanted):
            return
        link = self.link
        with link.lock:
            if link.closed or link.reading or not (self.held or self._wanted):
                return
            try:
                link.poll()
                self.return_idle(IDLE_SECONDS)
                link.flush()
            except exceptions.RaySystemError:
                pass

    def _before_reading(self, remaining: Optional[float]) -> Optional[float]:
        """A wait is about to block: leases idle that long go back, and one idle now makes
        it wake in time to give that one back too."""
        if self.held:
            self.return_idle(IDLE_SECONDS)
            if any(not lease.sent for lease in self.held):
                remaining = IDLE_SECONDS if remaining is None else min(remaining, IDLE_SECONDS)
        return remaining

    def close(self) -> None:
        for lease in self.held:
            lease.conn.close()
        self.held.clear()
        self.backlog.clear()
