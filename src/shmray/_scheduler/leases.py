"""Leases: workers lent to a driver, which sends them its plain tasks itself.

Runs in: the scheduler.  (The driver's side is in ``_runtime.leases``.)

A driver owns the tasks it submits with no ref among their arguments and one CPU, as in
Ray: it keeps them in a backlog, leases workers from the scheduler and sends the tasks
straight to them, several at a time for short functions; results come straight back.  The
scheduler hears of such a task only when it must (a ref to its result leaves the driver, it
is cancelled, it waited in get() or submitted tasks, its results hold refs or live in the
arena, it will be retried), and the driver is the one witness of what came back::

    driver                          scheduler                       worker
    ──────                          ─────────                       ──────
    LEASE_REQUEST(n) ─────────────▶ lends idle workers while no
                                    work queued here needs a CPU
                ◀──── LEASE_GRANTED(pid)
    connect to the worker's socket
    EXECUTE, EXECUTE, ... ────────────────────────────────────────▶ runs them in order
                ◀─────────────────────────────────────── RESULT, ... (HANDED_BACK: its
                                                         task waits in get(); those
                                                         queued behind go back)
    only if it must:
      DIRECT_SUBMIT(pid, spec) ───▶ records the task on that worker
      CALLER_DONE(task, results) ─▶ finishes it
                                    ◀───────────────────── DIRECT_DONE (results the
                                                           driver can't use at once)
    LEASE_HANDED_BACK(pid, ids) ──▶ registered tasks given back: run here
    LEASE_RETURN(pid, []) ────────▶ idle 2 ms, or recalled:
                ◀──── LEASE_RECALL(pid)   work queued here needs the CPU
    LEASE_RETURN(pid, None) ──────▶ couldn't connect: the worker is replaced

    When a leased worker dies:
                ◀──── LEASE_LOST(pid)     (the scheduler keeps its tasks: awaiting_verdict,
                                          and reads the replies it held back, parked in its
                                          slot: those tasks finished)
    reads all the worker sent, reports it (CALLER_DONE), registers the tasks left
    unanswered (DIRECT_SUBMIT) and names them:
      LEASE_RETURN(pid, unanswered) ─▶ settles them now; or, if none,
      LEASE_VERDICT(pid) ────────────▶ settles them: those with a parked reply finish with
                                       its results, the one the worker died in (its slot
                                       names it) is retried or failed, the rest never
                                       started and run again without using a retry; a
                                       result the driver has seen is never retried or
                                       failed.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

from .. import _protocol as P, _slot
from .clients import Client, Clients, kill_quietly
from .objects import Directory
from .resources import Resources
from .records import Task
from .tasks import Tasks
from .workers import WorkerPool, clear_started


class Leases:
    def __init__(self, clients: Clients, objects: Directory, resources: Resources,
                 pool: WorkerPool, tasks: Tasks):
        self.clients = clients
        self.objects = objects
        self.resources = resources
        self.pool = pool
        self.tasks = tasks
        self.leased: set = set()         # workers lent to a driver
        self.wanters: set = set()        # drivers with a lease request standing
        # Leased tasks whose worker died before their results were reported, until their
        # driver's LEASE_VERDICT: task id -> (task, worker pid, exit status).
        self.awaiting_verdict: Dict[bytes, tuple] = {}
        # Leased workers that died, until their driver's verdict: pid -> (exit status, the
        # last task id the worker named as started in its slot, the results of tasks it
        # finished whose replies died with it: task id -> delivered).
        self.deaths: Dict[int, tuple] = {}
        # Hook to the actors' part (``loop`` wires it): what actors waiting to be placed ask.
        self.placements_waiting: Callable[[], Iterable[dict]] = lambda: ()

    # -- what leases keep from running -----------------------------------------------------

    def in_the_way(self, demand) -> bool:
        """Would ``demand`` fit if the CPUs lent to drivers were free?  Only then is a lease
        worth recalling, or not granting, for it: a task waiting for a resource an actor
        holds, or for more CPUs than are free and leased, waits either way."""
        leased = sum(not worker.blocked for worker in self.leased)  # the others' are lent
        available = self.resources.available
        return (all(amount <= available.get(name, 0.0) + (leased if name == "CPU" else 0.0)
                    for name, amount in demand.items())
                and ("GPU" not in demand or self.resources.gpus.fits(demand["GPU"])))

    def _work_waits(self) -> bool:
        """Queued work that leases keep from running: it goes before new leases."""
        return (any(queue and queue[0].placement is None
                    and self.in_the_way(queue[0].resources)
                    for queue in self.tasks.dispatcher.ready_by_shape.values())
                or any(self.in_the_way(place) for place in self.placements_waiting()))

    def recall_if_in_the_way(self, demand) -> None:
        if self.in_the_way(demand):
            self.recall()

    def recall(self) -> None:
        """Work waits for a CPU: ask lease holders to give theirs back."""
        for worker in self.leased:
            if not worker.recalled:
                worker.recalled = True
                self.clients.send(worker.leased_to, P.lease_recall(worker.pid))

    # -- granting and returning ----------------------------------------------------------------

    def on_lease_request(self, client: Client, count: int) -> None:
        """A driver asks for ``count`` more workers, as they become free (0: none)."""
        client.lease_wanted = count if client.kind == "driver" else 0
        if client.lease_wanted:
            self.wanters.add(client)
            self.grant()
        else:
            self.wanters.discard(client)

    def grant(self) -> None:
        """Lend workers to the drivers asking, while no work of ours waits for a CPU (the
        work queued here goes first: it may be what a leased task waits for)."""
        if self._work_waits():
            return
        for client in list(self.wanters):
            while client.lease_wanted > 0:
                if not client.alive or not self.resources.fits(P.LEASE_SHAPE):
                    return
                worker = self.pool.idle_worker()
                if worker is None:
                    return
                clear_started(worker)
                worker.leased_to = client
                worker.recalled = False
                worker.verdict_given = False
                worker.unanswered = []
                client.leases.add(worker)
                self.leased.add(worker)
                self.resources.available["CPU"] -= 1.0
                client.lease_wanted -= 1
                self.clients.send(client, P.lease_granted(worker.pid))
            self.wanters.discard(client)

    def on_lease_return(self, client: Client, worker_pid, unanswered) -> None:
        """Done with a lease; ``unanswered``: the tasks sent on it whose results never came
        (its channel ended), which the driver has registered just before; None: the driver
        could not reach the worker, which is replaced."""
        if unanswered:  # the driver has reported all that came back on it
            self._settle_verdict(client, worker_pid, unanswered)
        for worker in client.leases:
            if worker.pid == worker_pid:
                self._end_lease(worker)
                if unanswered is None:
                    kill_quietly(worker.pid)  # its death refills the pool
                elif unanswered and worker.direct:
                    # Tasks on it whose results can no longer reach their driver: lost
                    # once it is gone (the driver has had its say).
                    worker.verdict_given = True
                    worker.unanswered = unanswered
                    kill_quietly(worker.pid)
                elif worker.alive and worker.task is None:
                    self.pool.idle.append(worker)
                return

    def _end_lease(self, worker: Client) -> None:
        worker.leased_to.leases.discard(worker)
        worker.leased_to = None
        self.leased.discard(worker)
        if worker.blocked:  # its CPU was lent back while a task waited in get()
            worker.blocked = False
        else:
            self.resources.available["CPU"] += 1.0

    def on_lease_handed_back(self, client: Client, worker_pid, task_ids) -> None:
        """Tasks a driver had sent to its leased worker, which gave them back unstarted
        (its running task waits in get()): they run here."""
        worker = next((w for w in client.leases if w.pid == worker_pid), None)
        for task_id in reversed(task_ids):  # each to the front: they keep their order
            task = self.tasks.get(task_id)
            if task is None or task.finished:
                continue
            if worker is not None:
                worker.direct.pop(task_id, None)
            task.worker = None
            if task.cancelled:  # its cancel was on its way to the worker
                self.tasks.fail(task, *self.tasks.cancelled_error(task))
            else:
                self.tasks.requeue(task, front=True)

    # -- tasks the driver registers ----------------------------------------------------------

    def on_direct_submit(self, client: Client, worker_pid, spec: tuple) -> None:
        """A task its submitter sent straight to the worker ``worker_pid`` it leases."""
        task = self.tasks.admit(spec, client)
        task.direct = True
        early = self.objects.take_early(task.task_id)
        if early is not None:
            for worker in client.leases:  # it is over: children it left are nobody's now
                if worker.pid == worker_pid:
                    self._adopt(worker, task)
                    task.children = []
            self._leased_task_done(task, early[0], early[2])
            self.objects.unprotect(early[0])
            return
        if task.finished:
            return
        for worker in client.leases:
            if worker.pid == worker_pid and worker.alive:
                worker.direct[task.task_id] = task
                task.worker = worker
                self._adopt(worker, task)
                return
        # It died before this registration came: its driver may have seen the result.
        self._await_verdict(task, worker_pid, None)

    def _adopt(self, worker: Client, task: Task) -> None:
        """What a leased worker said of ``task`` before its registration came: its children,
        and that it waited in get()."""
        if worker.orphans:
            task.children.extend(t for p, t in worker.orphans if p == task.task_id)
            worker.orphans = [(p, t) for p, t in worker.orphans if p != task.task_id]
        if task.task_id in worker.blocked_unknown:
            worker.blocked_unknown.discard(task.task_id)
            self.tasks.dispatcher.blocking_functions.add(task.spec[P.SPEC_FN_ID])

    def on_leased_done(self, client: Client, task_id, delivered) -> None:
        """Results a leased worker sent straight to ``client``, reported by it."""
        task = self.tasks.get(task_id)
        if task is None or task.finished:
            return
        if task.worker is not None:
            task.worker.direct.pop(task_id, None)
        self.awaiting_verdict.pop(task_id, None)
        self.tasks.finish_direct(task, [(object_id, data, metadata, ())
                                        for object_id, data, metadata in delivered], False)

    def on_direct_done(self, worker: Client, task_id, results, caller_pid, retryable) -> None:
        """Results a leased worker reports itself: those its driver can't use at once."""
        task = worker.direct.pop(task_id, None)
        if task is not None:
            self._leased_task_done(task, results, retryable)
        elif self.tasks.get(task_id) is None:
            self.objects.keep_early(task_id, results, caller_pid, retryable)

    def _leased_task_done(self, task: Task, results, retryable: bool) -> None:
        if task.finished:
            return
        if retryable and task.retries_left != 0:
            self.tasks.retry(task)  # through the scheduler this time; its caller hears of it
        elif retryable:
            self.tasks.finish(task, results)  # it was told to wait for this
        else:
            self.tasks.finish_direct(task, results, False)

    # -- a leased worker's death -----------------------------------------------------------

    def worker_died(self, worker: Client, status: Optional[int]) -> None:
        """A worker died: if it was lent, its driver has a say in what became of its tasks
        (it may hold tasks the scheduler never heard of, and results of those it did)."""
        holder = worker.leased_to
        if holder is not None:
            self._end_lease(worker)
        slot = worker.cancel_slot
        started_id = worker.killed_for or (bytes(slot[_slot.SLOT_STARTED]) if slot is not None
                                           else None)
        finished = self._replay_parked(worker)
        if worker.verdict_given:
            self._settle_lost_lease(list(worker.direct.values()), worker.unanswered,
                                    started_id, worker.pid, status, finished)
        else:
            if holder is not None and holder.alive:
                # It reports, registers the rest and answers (LEASE_VERDICT).
                self.deaths[worker.pid] = (status, started_id, finished)
                self.clients.send(holder, P.lease_lost(worker.pid))
            for task in list(worker.direct.values()):
                self._await_verdict(task, worker.pid, status)
        worker.direct.clear()

    def _replay_parked(self, worker: Client) -> Dict[bytes, list]:
        """What a dead worker parked in its slot for the replies it held back as it ran the
        next task (``Worker.report``): the reports it had for us, replayed now, before its
        holds go (they keep the refs inside); and the results it had for its driver alone,
        returned (task id -> delivered) for the verdict: those tasks finished."""
        finished = {}
        for message in _slot.parked_reports(worker.cancel_slot):
            if message[0] == P.DIRECT_DONE:
                self.on_direct_done(worker, *message[1:])
            elif message[0] == P.RESULT:
                finished[message[1]] = message[2]
        return finished

    def _await_verdict(self, task: Task, pid: int, status: Optional[int]) -> None:
        """A leased worker died with ``task`` unreported: only its driver knows whether it
        saw the results; ask it (once it has read everything the worker sent)."""
        if task.finished:
            return
        task.worker = None
        asked = pid in self.deaths or any(
            p == pid for _, p, _ in self.awaiting_verdict.values())
        self.awaiting_verdict[task.task_id] = (task, pid, status)
        if not asked:
            self.clients.send(task.owner, P.lease_lost(pid))

    def on_lease_verdict(self, client: Client, worker_pid) -> None:
        """The driver has reported every result the dead worker sent it, and registered
        the tasks it left unanswered (LEASE_RETURN, which settled them)."""
        self._settle_verdict(client, worker_pid, ())

    def _settle_verdict(self, client: Client, worker_pid: int, unanswered) -> None:
        """The tasks of ``client`` a dead leased worker left unreported never finished (the
        driver has reported all it got): the one the worker died in, and any the driver
        does not list in ``unanswered``, are charged (``_settle_lost_lease``)."""
        status, started_id, finished = self.deaths.pop(worker_pid, (None, None, {}))
        lost = []
        for task_id, (task, pid, died_of) in list(self.awaiting_verdict.items()):
            if pid == worker_pid and task.owner is client:
                del self.awaiting_verdict[task_id]
                lost.append(task)
                status = died_of if died_of is not None else status
        self._settle_lost_lease(lost, unanswered, started_id, worker_pid, status, finished)

    def _settle_lost_lease(self, tasks, unanswered, started_id, pid: int, status,
                           finished) -> None:
        """Tasks a dead leased worker never answered.  Those it finished, their replies held
        back for the next frame, have their results parked (``finished``): done.  It names
        each task in its slot as it starts it (``started_id``): that one is lost (retried
        while retries are left: ``Tasks.task_lost``).  The others in ``unanswered`` did not
        kill it: those sent after it never started, and run again without using a retry, as
        do any it finished whose results were too big to park."""
        unanswered = set(unanswered)
        for task in tasks:
            if task.finished:
                continue
            task.worker = None
            delivered = finished.get(task.task_id)
            if delivered is not None:
                self.tasks.finish(task, [(object_id, data, metadata, ())
                                         for object_id, data, metadata in delivered])
            elif (task.task_id == started_id or task.cancelled
                  or task.task_id not in unanswered):
                self.tasks.task_lost(task, pid, status)
            else:
                self.tasks.delete_partial_returns(task)  # a finished one's, sealed unreported
                self.tasks.requeue(task)
