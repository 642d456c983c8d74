"""cancel(): stop a task, wherever it is, and the tasks it submitted.

Runs in: the scheduler.

A task waiting for its arguments or in a ready queue is failed with TaskCancelledError at
once.  One on a worker is interrupted: a KeyboardInterrupt in the task, which only that task
takes (the worker's slot names it as the target), or, with ``force``, the worker is killed
and its death fails the task.  A task sent ahead to a worker that has not started it is
skipped by the worker (CANCEL_CALL).  An actor call is dropped if not started, cancelled if
async; a running sync call finishes (as in Ray).  A leased task whose worker died waits for
its driver's verdict instead: the driver may have its result.
"""

from __future__ import annotations

import signal

from .. import _protocol as P, _slot
from .._connection import ConnectionClosed
from .clients import Client, Clients, kill_quietly, signal_quietly
from .leases import Leases
from .records import Task
from .tasks import Tasks
from .workers import started


class Cancel:
    def __init__(self, clients: Clients, tasks: Tasks, leases: Leases):
        self.clients = clients
        self.tasks = tasks
        self.leases = leases

    def on_cancel(self, client: Client, task_id, force, recursive) -> None:
        task = self.tasks.get(task_id)
        if task is not None:
            self.cancel(task, force, recursive)

    def cancel(self, task: Task, force: bool, recursive: bool) -> None:
        if task.finished or task.cancelled:
            return
        task.cancelled = True
        task.retries_left = 0  # a cancelled task is never retried
        if recursive:
            for child in list(task.children):
                self.cancel(child, force, recursive)
        actor = task.actor
        if actor is not None:
            if task.task_id in actor.inflight and actor.client is not None:
                self.clients.send(actor.client, P.cancel_call(task.task_id))
            else:
                self.tasks.fail(task, *self.tasks.cancelled_error(task))
            return
        if task.task_id in self.leases.awaiting_verdict:
            return  # its worker is dead; its driver may have its result: LEASE_VERDICT says
        worker = task.worker
        if worker is None:  # queued, or waiting for its arguments
            self.tasks.fail(task, *self.tasks.cancelled_error(task))
            return
        # On a worker: the cancel is counted first, then the slot read for the task it
        # started last.  The worker names each task there before it reads the count, so
        # one of us sees the other (``Worker.run``): a task the slot does not name yet is
        # skipped by the worker, which reports it cancelled.
        self._send_cancel_call(worker, task.task_id)
        slot = worker.cancel_slot
        if slot is None or bytes(slot[_slot.SLOT_STARTED]) == task.task_id:
            self._interrupt(worker, task, force)  # it runs (or has just finished)
        elif not task.direct and task not in started(worker):
            self.tasks.fail(task, *self.tasks.cancelled_error(task))  # sent ahead, unstarted
        # Else: a leased task not started (skipped) or finished (its result comes), or the
        # task the scheduler sent first, not named yet: the worker skips it.

    def _interrupt(self, worker: Client, task: Task, force: bool) -> None:
        """Stop the task ``worker`` runs: kill the worker if forced (its death fails the
        task), else a KeyboardInterrupt in the task, which only that task takes (the slot
        names it as the target)."""
        if force:
            # The one to charge for its death: it may have moved on to a task nobody
            # cancelled by the time the signal lands.
            worker.killed_for = task.task_id
            kill_quietly(worker.pid)
            return
        if worker.cancel_slot is not None:
            worker.cancel_slot[_slot.SLOT_TARGET] = task.task_id
        signal_quietly(worker.pid, signal.SIGINT)

    def _send_cancel_call(self, worker: Client, task_id: bytes) -> None:
        """Skip that task if it has not started: the worker looks for this message before
        each task while its slot counts more than it has read, so it is written first (the
        loop's turn may be long: a recursive cancel of many tasks)."""
        self.clients.send(worker, P.cancel_call(task_id))
        try:
            worker.conn.flush_nonblocking()  # what doesn't fit goes when the socket has room
        except ConnectionClosed:
            return  # its death is read next
        if worker.cancel_slot is not None:
            _slot.count_cancel(worker.cancel_slot)
