"""Tasks: admission, dependencies, what workers report, retries and endings.

Runs in: the scheduler.

A task is admitted with its results (held by, and announced to, its submitter) and the
objects it holds while pending (its arguments, and refs nested in them).  It waits for its
top-level ref arguments (a failed one fails it with the same error), then goes to the ready
queues (``dispatch``).  A worker's report finishes its task (or retries it, for an exception
its retry_exceptions covers); a worker waiting in get() lends its CPU back; a task whose
worker died is retried while retries are left, then fails with WorkerCrashedError.

A short task waiting only for results of tasks one worker runs or has queued is sent there
before they are ready (``send_ahead``): a chain of short tasks then costs no round trip
through here per link.  It is still counted as waiting, so whatever brings it back unrun
(its worker's death, a get() there, an argument the worker lacks) has it wait again
(``take_back``), and a failed argument fails it here as it would any task.

An actor call is a task too: its ready-ness and its end go to the actors' part
(``forward_actor``, wired by ``loop``).
"""

from __future__ import annotations

import collections
from typing import Callable, Dict, Optional

from .. import _events, _protocol as P, _resources, _slot, exceptions
from .._serialization import serialize
from .clients import Client, Clients, how
from .dispatch import Dispatcher
from .objects import Directory, ObjectEntry, kind_of, serialized
from .records import Task
from .resources import Resources
from .workers import WorkerPool, started

_NONE = serialize(None).to_bytes()  # the value of a return a task did not report


class Tasks:
    def __init__(self, clients: Clients, objects: Directory, resources: Resources,
                 pool: WorkerPool, dispatcher: Dispatcher):
        self.clients = clients
        self.objects = objects
        self.resources = resources
        self.pool = pool
        self.dispatcher = dispatcher
        self.table: Dict[bytes, Task] = {}
        self.forward_actor: Callable = lambda actor: None  # an actor call's progress
        self.actor_call_ready: Callable = lambda task: None  # ...its arguments are ready
        self.not_run = 0  # tasks sent ahead that came back lacking an argument (tests)

    def get(self, task_id: bytes) -> Optional[Task]:
        return self.table.get(task_id)

    # -- admission ---------------------------------------------------------------------------

    def register(self, task: Task, client: Client, parent_id: Optional[bytes] = None) -> None:
        """Record a task; one submitted by a running task is its child, for cancel.  A
        leased worker names the task it runs (``parent_id``): its registration comes from
        the driver, maybe later than this."""
        self.table[task.task_id] = task
        if parent_id is None:
            parent = client.task
        else:
            parent = self.table.get(parent_id)
            if parent is None:
                client.orphans.append((parent_id, task))  # until it is (``leases.adopt``)
        if parent is not None:
            parent.children.append(task)

    def on_submit(self, client: Client, spec: tuple, parent_id=None) -> None:
        task = self.admit(spec, client, parent_id)
        if task.finished:
            return
        missing = _resources.shortfall(task.resources, self.resources.total)
        if missing:  # its submitter checked (``_resources``): this is a backstop
            self.fail(task, *serialized(exceptions.TaskUnschedulableError(
                _resources.unschedulable_message(f"task {task.name}()", task.resources,
                                                 self.resources.total, missing))))
            return
        self.count_dependencies(task)
        if task.finished:
            return
        if task.waiting_on == 0:
            self.task_ready(task)
        else:
            self.send_ahead(task)

    def admit(self, spec: tuple, client: Client, parent_id: Optional[bytes] = None) -> Task:
        """Record a submitted task or actor call: its results (held by and announced to the
        submitter) and the refs it holds while pending.  An unknown argument fails it."""
        task = Task(spec, client)
        self.register(task, client, parent_id)
        for object_id in task.return_ids:
            entry = self.objects.entry(object_id)
            entry.holders.add(client)
            entry.subscribers.append(client)  # the owner hears of its results unasked
            client.holds.add(object_id)
        if task.held_ids:  # (an actor call sent straight to its actor holds none)
            task.held_ids, unknown = self.objects.hold_arguments(task.held_ids)
            if unknown:
                self.fail(task, *self.objects.lost(unknown[0]))
        return task

    def count_dependencies(self, task: Task) -> None:
        """Wait for the arguments not ready yet; fail at once with a failed one's error."""
        for object_id in task.spec[P.SPEC_ARG_IDS]:
            entry = self.objects.get(object_id)
            if not entry.ready:
                task.waiting_on += 1
                entry.dependents.append((task, self.argument_ready))
            elif entry.failed:
                self.fail_for_argument(task, entry)
                return

    def argument_ready(self, task: Task, entry: ObjectEntry) -> None:
        if task.finished:
            return
        if entry.failed:
            self.fail_for_argument(task, entry)
            return
        task.waiting_on -= 1
        if task.ahead:  # its worker has it already
            return
        if task.waiting_on == 0:
            self.task_ready(task)
        else:
            self.send_ahead(task)

    def task_ready(self, task: Task) -> None:
        if task.actor is not None:
            self.actor_call_ready(task)
        else:
            self.dispatcher.enqueue(task)

    # -- sending tasks ahead -----------------------------------------------------------------

    def send_ahead(self, task: Task) -> bool:
        """Send a task that waits for its arguments to the worker that will make them, if
        one worker runs or has queued every task whose result it waits for, and the
        dispatcher's rules allow (``Dispatcher.send_ahead``).  Until it starts there, it is
        still counted as waiting: should it come back unrun (the worker died or blocked, or
        lacked an argument: ``not_run``), it waits again (``take_back``); should an
        argument fail, it fails here, as any task would, and the worker's report of it is
        dropped."""
        spec = task.spec
        # Only a task waiting for one argument: looking costs a pass over its arguments,
        # and one waiting for more (a reduce) seldom waits for one worker alone; it may go
        # once all but one are ready.
        if (task.waiting_on != 1 or task.actor is not None or task.placement is not None
                or spec[P.SPEC_EXTRA] or spec[P.SPEC_NUM_RETURNS] < 0):
            return False
        entries = self.objects.entries
        for object_id in spec[P.SPEC_ARG_IDS]:
            entry = entries.get(object_id)
            if entry is not None and not entry.ready:
                break
        else:
            return False
        producer = self.table.get(object_id[:-4])  # a return id is its task's id + 4 bytes
        if (producer is None or producer.worker is None or producer.direct
                or producer.actor is not None or producer.spec[P.SPEC_NUM_RETURNS] < 0):
            return False
        return self.dispatcher.send_ahead(task, producer.worker)

    def extend_ahead(self, worker: Client) -> None:
        """The worker has room behind its last task: send there the tasks waiting for that
        one's results (and, in turn, for theirs)."""
        wake = self.argument_ready
        entries = self.objects.entries
        while worker.task is not None and self.dispatcher.room_ahead(worker):
            last = worker.queued[-1] if worker.queued else worker.task
            for object_id in last.return_ids:
                entry = entries.get(object_id)
                if entry is not None and entry.dependents:
                    for dependent, callback in list(entry.dependents):
                        if (callback == wake and dependent.waiting_on == 1
                                and not dependent.ahead and not dependent.finished):
                            self.send_ahead(dependent)
            if (worker.queued[-1] if worker.queued else worker.task) is last:
                return

    def take_back(self, task: Task) -> None:
        """A task sent to a worker that will not run it: back to the head of its queue, or,
        if sent ahead, to waiting for the arguments it still lacks."""
        task.worker = None
        task.ahead = False
        self.requeue(task, front=True)

    def requeue(self, task: Task, front: bool = False) -> None:
        """Back to the ready queue (its head, if ``front``), unless it waits for an
        argument.  A task its driver sent to a lease right behind the one making its
        argument (``_runtime.leases``) was admitted running, never counted as waiting: it
        may wait, or fail for that argument, only now."""
        if task.waiting_on == 0:
            self.count_dependencies(task)
            if task.waiting_on == 0 and not task.finished:
                if front:
                    self.dispatcher.requeue_front(task)
                else:
                    self.dispatcher.enqueue(task)

    # -- what workers report -----------------------------------------------------------------

    def on_task_done(self, worker: Client, task_id, results, retryable,
                     took: Optional[float] = None) -> None:
        task = worker.task
        self._give_back(task, worker)
        if task is not None and results is not None:
            self.dispatcher.note_run_time(task, task_id, took)
        if task is not None and self._used_up(worker, task):
            worker.task = None
            self.pool.busy.discard(worker)
            self.clients.send(worker, P.exit_())  # after what was sent ahead; EOF refills
        elif worker.queued:  # it has started the next one already
            self.dispatcher.make_running(worker.queued.popleft(), worker)
            self.extend_ahead(worker)  # room behind its last task again
        else:
            worker.task = None
            self.pool.busy.discard(worker)
            if worker.alive:
                self.pool.idle.append(worker)
        if task is None or task.task_id != task_id or task.finished:
            if results:  # e.g. cancelled meanwhile: nobody wants these
                self.objects.drop_unclaimed(results)
            return
        if results is None:  # sent ahead, it lacked an argument it was to find there
            self.not_run += 1
            self.take_back(task)
            return
        if retryable and task.retries_left != 0:
            self.retry(task)
            return
        self.finish(task, results)

    def on_generated(self, worker: Client, task_id, index: int, result) -> None:
        """A streaming task yielded an item: it is its owner's, announced at once.  An item
        a retried attempt yields again is dropped (the owner has it)."""
        task = self.table.get(task_id)
        if (task is None or task.finished or index < task.streamed or not task.owner.alive):
            self.objects.drop_unclaimed([result])
            return
        task.streamed = index + 1
        object_id, data, metadata, contained = result
        entry = self.objects.entry(object_id)
        entry.holders.add(task.owner)
        task.owner.holds.add(object_id)
        entry.subscribers.append(task.owner)
        self.objects.make_ready(object_id, entry, data, metadata, contained)

    def on_consumed(self, client: Client, task_id, count: int) -> None:
        """A streaming task's caller has taken ``count`` items: its producer may go on."""
        task = self.table.get(task_id)
        if task is None or task.finished or count <= task.consumed:
            return
        task.consumed = count
        if task.worker is not None and task.worker.alive:
            self.clients.send(task.worker, P.consumed(task_id, count))

    def _used_up(self, worker: Client, task: Task) -> bool:
        """max_calls: a worker retires after that many calls of the function (Ray's rule,
        e.g. to give back memory a library won't free)."""
        extra = task.spec[P.SPEC_EXTRA]
        if not extra or not extra.get("max_calls"):
            return False
        fn_id = task.spec[P.SPEC_FN_ID]
        worker.calls[fn_id] = worker.calls.get(fn_id, 0) + 1
        return worker.calls[fn_id] >= extra["max_calls"]

    def _give_back(self, task: Optional[Task], worker: Client) -> None:
        if task is not None:
            (task.pool or self.resources).give(task.resources, task.gpu_ids,
                                               cpu_lent=worker.blocked)
            task.gpu_ids = ()
        worker.blocked = False

    def on_blocked(self, worker: Client, task_id=None) -> None:
        """The worker's task waits in get(): its CPU is lent back (a leased worker's is the
        lease's), and its function is never again one to send tasks ahead behind."""
        task = worker.task
        if worker.leased_to is not None and task is None and not worker.blocked:
            worker.blocked = True
            self.resources.available["CPU"] += 1.0
            leased = self.table.get(task_id)
            if leased is not None:
                self.dispatcher.blocking_functions.add(leased.spec[P.SPEC_FN_ID])
            elif task_id is not None:
                worker.blocked_unknown.add(task_id)  # noted once its task is registered
            return
        if task is None or worker.blocked:
            return
        self.dispatcher.blocking_functions.add(task.spec[P.SPEC_FN_ID])
        worker.blocked = True
        (task.pool or self.resources).available["CPU"] += task.resources.get("CPU", 0.0)

    def on_unblocked(self, worker: Client) -> None:
        task = worker.task
        if worker.leased_to is not None and task is None and worker.blocked:
            worker.blocked = False
            self.resources.available["CPU"] -= 1.0  # may go below zero for a while
            return
        if task is None or not worker.blocked:
            return
        worker.blocked = False
        (task.pool or self.resources).available["CPU"] -= task.resources.get("CPU", 0.0)  # ditto

    def on_handed_back(self, worker: Client, task_ids) -> None:
        """Tasks sent ahead to ``worker`` that it will not run: they go back to the front of
        the queue (a cancelled one was failed already)."""
        returned = set(task_ids)
        kept = collections.deque()
        handed = []
        for task in worker.queued:
            (handed if task.task_id in returned else kept).append(task)
        worker.queued = kept
        for task in reversed(handed):
            if not task.finished:
                self.take_back(task)

    # -- endings -----------------------------------------------------------------------------

    def retry(self, task: Task) -> None:
        if task.retries_left > 0:
            task.retries_left -= 1
        task.worker = None
        task.ahead = False
        self.delete_partial_returns(task)
        self.requeue(task)  # (it may have died with the task it waits for: retried too)

    def delete_partial_returns(self, task: Task) -> None:
        """A crashed attempt may have sealed some of its returns already."""
        for object_id in task.return_ids:
            self.objects.delete_quietly(object_id)

    def finish(self, task: Task, results) -> None:
        task.finished = True
        task.children = []
        self.table.pop(task.task_id, None)
        if task.actor is not None and task.worker is None:
            # it never reached the actor: the calls queued behind it may go now
            task.actor.parked.discard(task)
            self.forward_actor(task.actor)
        reported = set()
        for object_id, data, metadata, contained in results:
            reported.add(object_id)
            entry = self.objects.get(object_id)
            if entry is None:  # nobody holds it any more: drop what the worker stored
                if data is None:
                    self.objects.delete_quietly(object_id)
                continue
            self.objects.make_ready(object_id, entry, data, metadata, contained)
        for object_id in task.return_ids:  # e.g. the hidden return of num_returns=0
            if object_id not in reported:
                entry = self.objects.get(object_id)
                if entry is not None and not entry.ready:
                    self.objects.make_ready(object_id, entry, _NONE, b"", [])
        if task.held_ids:
            held, task.held_ids = task.held_ids, []
            self.objects.release_arguments(held)

    def finish_direct(self, task: Task, results, retryable: bool) -> None:
        """Results its caller (an actor's, or the driver leasing the worker) already has,
        but those with refs inside and a failure meant for a retry (``Worker.report``): only
        those are announced to it."""
        for object_id, _, _, contained in results:
            entry = self.objects.get(object_id)
            if (not contained and not retryable and entry is not None
                    and task.owner in entry.subscribers):
                entry.subscribers.remove(task.owner)
        self.finish(task, results)

    def fail(self, task: Task, data: bytes, metadata: bytes) -> None:
        if task.actor is None:
            error, message = kind_of(data, _events.TASK_EXECUTION_EXCEPTION)
            _events.failed_unrun(task.task_id, task.name, error, message)
        else:
            error, message = kind_of(data, _events.ACTOR_DIED)
            _events.failed_unrun(task.task_id, task.name, error, message, _events.ACTOR_TASK,
                                 task.actor.actor_id)
        self.finish(task, [(object_id, data, metadata, []) for object_id in task.return_ids])

    def fail_for_argument(self, task: Task, argument: ObjectEntry) -> None:
        """Fail a task that can't run because an argument is an error: with Ray's text for
        it ("At least one of the input arguments for this task could not be computed"),
        made where it is read; the argument's error travels inside, still pickled."""
        self.fail(task, *serialized(exceptions.FailedArgument(task.name, argument.data)))

    def cancelled_error(self, task: Task) -> tuple:
        return serialized(exceptions.TaskCancelledError(task.task_id.hex()))

    def task_lost(self, task: Task, pid: int, status: Optional[int]) -> None:
        """The worker running ``task`` died: a cancelled task is cancelled, others are
        retried while retries are left, then fail with WorkerCrashedError."""
        if task.cancelled:
            self.delete_partial_returns(task)
            self.fail(task, *self.cancelled_error(task))
        elif task.retries_left != 0:
            self.retry(task)
        else:
            self.delete_partial_returns(task)
            self.fail(task, *serialized(exceptions.WorkerCrashedError(
                f"the worker (pid {pid}) running {task.name}() died of {how(status)}. It "
                f"was retried {task.spec[P.SPEC_MAX_RETRIES]} time(s) (max_retries). Likely "
                "causes: the process ran out of memory, a C extension crashed, or the task "
                "called sys.exit() or os._exit(); set max_retries to try more often.")))

    def worker_died(self, worker: Client, status: Optional[int]) -> None:
        """What became of the tasks the scheduler sent a worker that died."""
        for message in _slot.parked_reports(worker.cancel_slot):
            # Reports it held back (a few short tasks', ``Worker.report``): as if sent.
            if worker.task is not None and message[1] == worker.task.task_id:
                self.on_task_done(worker, *message[1:])
        ran = started(worker)
        while len(worker.queued) > max(len(ran) - 1, 0):  # sent ahead, never started:
            queued = worker.queued.pop()                 # run elsewhere, no retry used
            if not queued.finished:
                self.take_back(queued)
        task = worker.task
        if task is not None:  # what it held (replaying reports may have moved it on)
            self._give_back(task, worker)
        worker.task = None
        self.pool.busy.discard(worker)
        # The one it ran when it died (or, should a report have been too big to park, one it
        # finished before: its result died with it).
        for lost in ran:
            if not lost.finished:
                lost.worker = None
                if worker.killed_for in (None, lost.task_id):
                    self.task_lost(lost, worker.pid, status)
                else:  # killed for another (cancelled) task: this one did nothing wrong
                    self.delete_partial_returns(lost)
                    self.take_back(lost)
        worker.queued.clear()
