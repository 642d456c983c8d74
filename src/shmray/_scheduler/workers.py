"""The worker pool: forking workers, which are idle, which are busy.

Runs in: the scheduler.

There are as many workers as CPUs (at least one); more are forked only while workers wait
in get() with their CPUs lent, up to a bound (each costs a fork and its memory), with a
warning once it is reached.  Each worker shares a slot of memory with the scheduler
(``_protocol``): the scheduler names there the task a SIGINT is meant for, the worker the
last task it started, which is how the scheduler knows, when a worker dies, which of the
tasks it was sent it had started (``started``).
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

from .. import _slot
from .clients import Client, Clients

_EXTRA_WORKERS = 256  # beyond the CPUs, for tasks blocked in get()


class WorkerPool:
    def __init__(self, clients: Clients, spawn: Callable, num_cpus: float, events_size: int):
        self.clients = clients
        self.events_size = events_size  # of each worker's event log (``_events``)
        self._spawn = spawn  # (cancel slot) -> (Connection, pid)
        self.idle: List[Client] = []
        self.busy: set = set()  # workers running a task
        self.num_workers = 0
        self.min_workers = max(1, int(num_cpus))
        self.max_workers = self.min_workers + _EXTRA_WORKERS
        self.warned_cap = False

    def start_worker(self) -> Client:
        # Shared with the worker before it is forked: SIGINT cancels the task named in the
        # first 24 bytes and no other, whatever the worker has moved on to meanwhile; the
        # worker names the last task it started in the next 24 (``started``).
        slot = _slot.new_slot(self.events_size)
        conn, pid = self._spawn(slot)
        return self.adopt(conn, pid, slot)

    def adopt(self, conn, pid: int, slot) -> Client:
        """A worker forked with ``slot`` (by ``start_worker``, or before the scheduler was
        built: ``_worker_pool.spawn_first_worker``) joins the pool, idle."""
        worker = self.clients.add(conn, pid, "worker")
        worker.cancel_slot = slot
        self.num_workers += 1
        self.idle.append(worker)
        return worker

    def idle_worker(self) -> Optional[Client]:
        """A worker with nothing to do, forked if none is (the others wait in get(), their
        CPUs lent), or None at the cap on workers."""
        if self.idle:
            return self.idle.pop()
        if self.num_workers >= self.max_workers:
            return None
        self.start_worker()
        return self.idle.pop()

    def warn_cap(self) -> None:
        if not self.warned_cap:
            self.warned_cap = True
            print(f"shmray: {self.num_workers} workers are running or blocked in get(), the "
                  "most shmray starts; tasks wait until one is free. Deeply nested get() calls "
                  "can deadlock this way: have tasks return refs instead of waiting on them.",
                  file=sys.stderr, flush=True)

    def gone(self, worker: Client) -> None:
        """A worker died: it is no longer counted, idle or busy."""
        self.num_workers -= 1
        if worker in self.idle:
            self.idle.remove(worker)
        self.busy.discard(worker)

    def short(self) -> bool:
        """Fewer workers than the pool keeps."""
        return self.num_workers < self.min_workers

    def refill(self) -> None:
        while self.num_workers < self.min_workers:
            self.start_worker()


def clear_started(worker: Client) -> None:
    """Before an idle worker (so not writing its slot) is given work: nothing started yet."""
    if worker.cancel_slot is not None:
        worker.cancel_slot[_slot.SLOT_STARTED] = bytes(24)


def started(worker: Client) -> list:
    """The tasks ``worker`` has started of those it was sent, in order: the running one, and
    any sent ahead behind it up to the last it named as started in its slot (it may have
    finished some whose reports it has not sent yet)."""
    if worker.task is None:
        return []
    done = [worker.task]
    slot = worker.cancel_slot
    if slot is None or not worker.queued:
        return done
    last = slot[_slot.SLOT_STARTED]
    if last == worker.task.task_id:
        return done
    for task in worker.queued:
        done.append(task)
        if task.task_id == last:
            return done
    return done[:1]  # it names none of them: it is still on the first
