"""Tasks queued on a lease behind others: sent there behind the task making their
argument, or coming back unrun.

Runs in: the driver.

A task whose one ref argument is the result of the task this driver last sent a lease (or
put last in its backlog), not back yet, goes right behind that one (``submit_behind``),
its EXECUTE naming the argument with None for a value: the worker runs it next, with the
value it has just made (``RecentResults``), so a chain of short tasks runs on the lease as
plain tasks do, the scheduler hearing of none.  Should the value not be there (that task
failed, or will be retried), the worker sends the task back unrun (``not_run``) and it
goes through the scheduler, which fails it, or has it wait, as it would have from the
start.  Its argument stays counted here until it is done with it, so that this process
can still publish it then.

Tasks come back unrun from a lease whose running task waits in get() too (HANDED_BACK:
``_handed_back``): they may be what it waits for, and go to other workers.

``SentBehind`` is a part of ``leases.Leases`` (whose backlog, ``send``, ``own``,
``register``, ``publish``... it uses), kept apart to keep each readable.
"""

from __future__ import annotations

import time
from typing import List, Optional

from .. import _protocol as P
from .._object_ref import ObjectRef
from .channels import Channel, Owned


def behind_one(spec: tuple) -> bool:
    """A task that would be leasable but for its one ref argument (``submit_behind``)."""
    return (len(spec[P.SPEC_ARG_IDS]) == 1 and not spec[P.SPEC_CONTAINED]
            and spec[P.SPEC_RESOURCES] == P.LEASE_SHAPE and not spec[P.SPEC_EXTRA]
            and spec[P.SPEC_NUM_RETURNS] >= 0)


class SentBehind:
    """The part of ``Leases`` that queues tasks on a lease behind others, and takes back
    those that come back unrun."""

    def submit_behind(self, spec: tuple, return_ids) -> Optional[List[ObjectRef]]:
        """Send a task whose one ref argument is the result of the task we last sent a
        lease, not back yet, right behind that one: the worker runs it next, with the value
        it has just made (``RecentResults``), so a chain of short tasks runs on the lease
        as plain tasks do, the scheduler hearing of none.  Should the value not be there
        (that task failed, or will be retried), the worker sends it back unrun and it goes
        through the scheduler (``_not_run``): where it fails, or waits, as it would have.
        None if it can't go so (caller holds the lock)."""
        argument = spec[P.SPEC_ARG_IDS][0]
        if not self.can_follow(argument):
            return None
        objects = self.objects
        lease = objects.direct_pending.get(argument)
        self._submitted_at = time.monotonic()
        objects.counts[argument] += 1  # its value is ours until this one is done with it
        record = Owned(spec, return_ids, argument)
        refs = self.objects.own(record)
        if lease is None:
            self.backlog.append(record)
        else:
            self._send_behind(lease, record)
        return refs

    def can_follow(self, argument: bytes) -> bool:
        """Whether a task taking ``argument`` can go right behind the task making it: the
        last we sent a lease, or the last in the backlog (it then goes with it)."""
        producer = self.objects.unregistered.get(argument)
        if producer is None:
            return False
        lease = self.objects.direct_pending.get(argument)
        if lease is not None and lease.actor_id is not None:
            return False  # an actor call's: only a lease runs tasks
        if lease is None:
            return bool(self.backlog) and self.backlog[-1] is producer
        return self._last_on(lease, producer)

    @staticmethod
    def _last_on(lease: Channel, producer: Owned) -> bool:
        """Whether ``producer`` is the last task sent to ``lease``, which may take one
        more.  No room is needed: a task waiting for its predecessor could run on no other
        worker meanwhile (the lease just gets no plain tasks while its queue is long)."""
        return (not (lease.recalled or lease.stalled) and bool(lease.sent)
                and next(reversed(lease.sent.values())) is producer)

    def _send_behind(self, lease: Channel, record: Owned) -> None:
        if self.send(lease, record, {record.holds: None}):
            lease.last_used = time.monotonic()
            if lease.conn in self.link.unflushed:
                self.link.flush_later()

    def _feed_behind(self, record: Owned) -> None:
        """A task at the head of the backlog that was submitted behind the one making its
        argument: to the lease that one went to, or through the scheduler."""
        self.backlog.popleft()
        lease = self.objects.direct_pending.get(record.holds)
        producer = self.objects.unregistered.get(record.holds)
        if lease is not None and producer is not None and self._last_on(lease, producer):
            self._send_behind(lease, record)
        else:
            self.register(record, None)

    def _not_run(self, lease: Channel, task_id) -> None:
        """A task sent behind another came back unrun, its argument not there (it failed,
        or will be retried): it goes through the scheduler, which knows that argument's
        fate or learns it now (``register``)."""
        record = lease.sent.pop(task_id, None)
        if record is None:
            return
        for object_id in record.return_ids:
            self.objects.direct_pending.pop(object_id, None)
        if not record.registered:
            self.register(record, None)
        else:  # the scheduler knows it runs on the lease: it runs it now
            self.link.conn.send(P.lease_handed_back(lease.peer_pid, [task_id]))
            self.objects.owned_pending.update(i for i in record.return_ids
                                              if i in self.objects.counts)
        self._release_hold(record)

    def _release_hold(self, record: Owned) -> None:
        if record.holds is not None:
            self.objects.release_later(record.holds)
            record.holds = None

    def _handed_back(self, lease: Channel, task_ids) -> None:
        """The lease's running task waits in get(), maybe for a task queued behind it: those
        come back, and go to other workers.  It gets no more until its task is done."""
        lease.stalled = True
        if lease.sent:
            head = next(iter(lease.sent.values()))
            self._run_times.note_blocking(head.spec[P.SPEC_FN_ID])
        objects = self.objects
        to_scheduler, to_backlog, behind = [], [], []
        for task_id in task_ids:
            record = lease.sent.pop(task_id, None)
            if record is None:
                continue
            for object_id in record.return_ids:
                objects.direct_pending.pop(object_id, None)
            if record.registered:  # the scheduler runs it
                to_scheduler.append(task_id)
                objects.owned_pending.update(i for i in record.return_ids
                                             if i in objects.counts)
                self._release_hold(record)
            elif record.holds is not None:  # its argument is not ready: not for a lease
                behind.append(record)
            else:
                to_backlog.append(record)
        self.backlog.extendleft(reversed(to_backlog))  # first, in the order they were sent
        for record in behind:  # after: publishing its argument may register one of those
            self.register(record, None)
        if to_scheduler:
            self.link.conn.send(P.lease_handed_back(lease.peer_pid, to_scheduler))
            self.link.flush_later()
        other = self._roomiest()
        if other is not None:
            self._feed(other)
        self._want()
