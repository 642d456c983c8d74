"""Where ready tasks go: the ready queues, dispatch to workers, and sending short tasks ahead.

Runs in: the scheduler.

Ready tasks wait in one queue per resource shape ({"CPU": 1.0} for most), so when the CPUs
are all taken a turn costs one check per shape, not one per waiting task.  Dispatch starts
them FIFO while resources and workers allow.  When every CPU is taken, a busy worker
running a function known to be short and never to block gets the next task of the same
shape in advance and starts it without a round trip (``_prefetch``): functions that never
took over 2 ms get up to 16.  Under the same rules a task waiting for results of tasks
one worker runs or has queued goes to that worker before they are ready (``send_ahead``):
a chain of short tasks runs there back to back, no round trip between links.  The code of every function is registered here, and goes to a
worker with its first task that needs it (a leased worker asks: ``send_function``).  When
queued work needs CPUs that leased workers hold, the leases' part hears of it
(``cpu_wanted``, wired by ``loop``).  Tasks in a placement group queue apart (their
shape names the group and bundle) and go to ``dispatch_placed``, which takes from the
bundle's reservation.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Dict, Optional

from .. import _protocol as P
from .._run_times import SHORT_BUDGET, SLOWEST_DECAY
from .clients import Client, Clients
from .objects import Directory
from .records import Task
from .resources import Resources
from .workers import WorkerPool, clear_started

_PREFETCH_MAX_SECONDS = 0.02  # tasks sent ahead to a busy worker: only of functions that
                              # take less than this, so a task waits behind another for
                              # 20 ms at most; more than one only of functions that never
_PREFETCH_BUDGET = SHORT_BUDGET  # took longer than this, while their typical run times add up
_PREFETCH_MAX_DEPTH = 16      # to no more than it, and never more than this many


class Dispatcher:
    def __init__(self, clients: Clients, objects: Directory, resources: Resources,
                 pool: WorkerPool):
        self.clients = clients
        self.objects = objects
        self.resources = resources
        self.pool = pool
        self.functions: Dict[bytes, tuple] = {}        # fn id -> (pickled, name)
        self.function_waiters: Dict[bytes, list] = {}  # fn id -> [(client, request id)]
        self.ready_by_shape: Dict[tuple, collections.deque] = {}
        self.blocking_functions: set = set()   # fn ids whose tasks have waited in get()
        self.durations: Dict[bytes, float] = {}  # fn id -> typical run time (EWMA), seconds
        self.slowest: Dict[bytes, float] = {}    # fn id -> longest run time lately, seconds
        self.cpu_wanted: Callable[[Dict[str, float]], None] = lambda demand: None
        # Starts what it can of a queue of tasks in one placement group's bundle
        # (``placement_groups``, wired by ``loop``).
        self.dispatch_placed: Callable[[collections.deque], None] = lambda queue: None
        # A task went to a worker: tasks waiting for its results may follow it there
        # (``tasks.extend_ahead``, wired by ``loop``).
        self.task_sent: Callable[[Client], None] = lambda worker: None
        self.sent_ahead = 0  # tasks sent before their arguments were ready (tests, curiosity)

    # -- functions -------------------------------------------------------------------------

    def on_register_function(self, client: Client, fn_id, pickled, name) -> None:
        self.functions[fn_id] = (pickled, name)
        for waiter, request_id in self.function_waiters.pop(fn_id, ()):
            self.clients.send(waiter, P.reply(request_id, pickled))

    def send_function(self, client: Client, request_id, fn_id: bytes) -> None:
        """A function's code, asked for by a leased worker.  Its driver registered it before
        sending the task, but on another socket, which may be read after this one: then
        answered once it is in."""
        client.functions.add(fn_id)
        if fn_id in self.functions:
            self.clients.send(client, P.reply(request_id, self.functions[fn_id][0]))
        else:
            self.function_waiters.setdefault(fn_id, []).append((client, request_id))

    # -- queues -----------------------------------------------------------------------------

    def enqueue(self, task: Task) -> None:
        shape = task.shape
        queue = self.ready_by_shape.get(shape)
        if queue is None:
            queue = self.ready_by_shape[shape] = collections.deque()
        queue.append(task)

    def requeue_front(self, task: Task) -> None:
        self.enqueue(task)
        self.ready_by_shape[task.shape].rotate(1)  # back at the head, where it was

    def dispatch(self) -> None:
        """Start ready tasks while resources and workers allow, FIFO within each shape."""
        for shape, queue in list(self.ready_by_shape.items()):
            if queue and queue[0].placement is not None:  # in a placement group's bundle
                self.dispatch_placed(queue)
                if not queue:
                    del self.ready_by_shape[shape]
                continue
            demand = queue[0].resources if queue else None
            while queue and self.resources.fits(demand):
                task = queue.popleft()
                if task.finished:
                    continue
                worker = self.pool.idle_worker()
                if worker is None:
                    queue.appendleft(task)
                    self.pool.warn_cap()
                    return
                self.start(task, worker)
            if queue:
                self._prefetch(shape, queue)
                if queue:
                    self.cpu_wanted(demand)
            if not queue:
                del self.ready_by_shape[shape]

    def _prefetch(self, shape: tuple, queue: collections.deque) -> None:
        """Send short tasks ahead to busy workers of the same shape.

        A worker that finishes a task then starts the next without waiting for the
        scheduler: no round trip, and no wake-up, which are most of a short task's cost; a
        worker with several queued reports them in one message (``Worker.report``).  Only
        functions seen to run under _PREFETCH_MAX_SECONDS qualify, so a task never waits
        long behind another while some other worker could have taken it; and only behind a
        running task of such a function that has never blocked in get(): a task queued behind
        one that waits for it, directly or not, would wait forever (and should one wait
        after all, the worker hands back what it has queued: HANDED_BACK).  Never behind a
        task with max_calls or env_vars: its worker may retire after it.  Workers get one
        task each in turn, so a burst is spread evenly.
        """
        takers = [worker for worker in self.pool.busy
                  if not worker.blocked and worker.task is not None
                  and worker.task.shape == shape and not worker.task.spec[P.SPEC_EXTRA]
                  and self.safe_to_queue_behind(worker.task)]
        while queue and takers:
            for worker in list(takers):
                if not queue:
                    return
                task = queue[0]
                if task.finished:
                    queue.popleft()
                    continue
                fn_id = task.spec[P.SPEC_FN_ID]
                took = self.durations.get(fn_id, 1.0)
                if took >= _PREFETCH_MAX_SECONDS or task.spec[P.SPEC_EXTRA]:
                    # env_vars/max_calls: one at a time.  A task holding GPUs (its extra
                    # says what it holds) never goes ahead: it gets its ids as it starts.
                    return
                if worker.queued and not self._room_behind(worker, fn_id, took):
                    takers.remove(worker)
                    continue
                queue.popleft()
                worker.queued.append(task)
                self.send_execute(task, worker)
                self.task_sent(worker)

    def _room_behind(self, worker: Client, fn_id: bytes, took: float) -> bool:
        """Whether a task of ``fn_id`` (typical run time ``took``) may queue behind what
        ``worker`` has queued already."""
        ahead = len(worker.queued)
        return (ahead < _PREFETCH_MAX_DEPTH
                and self.safe_to_queue_behind(worker.queued[-1])
                and (ahead + 1) * took <= _PREFETCH_BUDGET
                and self.slowest.get(fn_id, 1.0) <= _PREFETCH_BUDGET)

    @staticmethod
    def room_ahead(worker: Client) -> bool:
        """Whether ``worker`` may take one more task sent ahead, at a glance (``send_ahead``
        looks closer)."""
        return len(worker.queued) < _PREFETCH_MAX_DEPTH

    def send_ahead(self, task: Task, worker: Client) -> bool:
        """Send a task whose arguments are not all ready to the worker that runs (or has
        queued) the tasks that make the missing ones: it runs it right after them, with
        the values it has just made, and this round trip is saved (``tasks.send_ahead``
        decides which worker; ``Worker`` keeps its latest results).  Under the rules of
        ``_prefetch``, which bound how long it can wait there and keep it off workers whose
        task might block.  An argument not ready goes as None in the values: the worker
        finds it among its latest results, or sends the task back unrun (``not_run``)."""
        running = worker.task
        if (not self.room_ahead(worker) or running is None or worker.blocked
                or worker.leased_to is not None or not worker.alive
                or running.shape != task.shape
                or running.spec[P.SPEC_EXTRA] or not self.safe_to_queue_behind(running)):
            return False
        fn_id = task.spec[P.SPEC_FN_ID]
        took = self.durations.get(fn_id, 1.0)
        if took >= _PREFETCH_MAX_SECONDS or (worker.queued and
                                             not self._room_behind(worker, fn_id, took)):
            return False
        worker.queued.append(task)
        task.ahead = True
        self.sent_ahead += 1
        self.send_execute(task, worker)
        return True

    def safe_to_queue_behind(self, task: Task) -> bool:
        fn_id = task.spec[P.SPEC_FN_ID]
        return (self.durations.get(fn_id, 1.0) < _PREFETCH_MAX_SECONDS
                and fn_id not in self.blocking_functions)

    def start(self, task: Task, worker: Client) -> None:
        clear_started(worker)
        self.make_running(task, worker)
        self.send_execute(task, worker)
        self.task_sent(worker)

    def make_running(self, task: Task, worker: Client) -> None:
        task.gpu_ids = (task.pool or self.resources).take(task.resources)
        worker.task = task
        task.started_at = time.monotonic()
        self.pool.busy.add(worker)

    def send_execute(self, task: Task, worker: Client) -> None:
        task.worker = worker
        spec = task.spec
        fn_id = spec[P.SPEC_FN_ID]
        pickled = None
        if fn_id not in worker.functions:
            pickled = self.functions[fn_id][0]
            worker.functions.add(fn_id)
        values = self.objects.inline_values(spec[P.SPEC_ARG_IDS], pending=True)
        self.clients.send(worker, P.execute(spec, pickled, values, task.gpu_ids))
        if task.consumed:  # a retried streaming task: its caller has taken some already
            self.clients.send(worker, P.consumed(task.task_id, task.consumed))

    def note_run_time(self, task: Task, task_id: bytes, took: Optional[float]) -> None:
        fn_id = task.spec[P.SPEC_FN_ID]
        if took is None or task.task_id != task_id:
            took = time.monotonic() - task.started_at
        previous = self.durations.get(fn_id)
        self.durations[fn_id] = took if previous is None else 0.8 * previous + 0.2 * took
        # The longest lately: one hiccup (a page fault storm, a preemption) must not keep a
        # function off deep prefetch for good; 20 calls later it is half.
        self.slowest[fn_id] = max(took, SLOWEST_DECAY * self.slowest.get(fn_id, 0.0))
