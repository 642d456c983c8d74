"""The engine under ``Pool`` and ``ProcessPoolExecutor``: hands tasks (chunks of calls) to a
fixed set of worker actors, replaces workers that die or reach their task limit.

Runs in: the process that made the pool (the caller's threads, and a thread of its own,
"shmray-pool", that collects results).

::

    caller thread --submit(tasks)--> pending --run.remote()--> worker actors
          |          (sends at once to workers with room)           |
          |                                                         |
          +-- collect(job): a caller blocked in map/apply  <--------+ its own job's calls
    "shmray-pool" thread <--- wait(refs in flight) / get -----------+ every other call
        on_done(ok, value) for the task; sends the next pending tasks

- Each worker actor has at most ``_DEPTH`` calls in flight: its next call already waits in
  its mailbox when one ends (no idle round trip), yet a slow task holds back little.
- A call carries one task, unless the function is known to be quick (a call of it took
  under ``_QUICK`` seconds).  Then a call carries a worker's fair share of the pending
  chunks of a ``map``, or, of tasks streamed one by one (``imap``, ``apply_async``, an
  executor's ``submit``), as many as ran in ``_BATCH`` seconds last time (at most a fair
  share).  An actor call costs ~0.1 ms of CPU on each side here, more than a chunk of tiny
  items takes to run (``imap`` of 10,000 tiny items: 0.8-1 s with a call each, 33 ms so,
  multiprocessing's 150 ms); joblib batches by measured duration likewise.  Tasks sharing
  a call keep their own outcomes (``ChunkFailed``); if the worker dies running such a call,
  which task killed it is unknown, so they all run again, each in a call of its own.
- A call's chunks travel as one pickle, and their results come back as one
  (``_pool_worker.pack_call``): pickled as the calls are sent, every call of a dispatch
  first, then all sent back to back (a worker woken by its call tends to take this
  thread's CPU, here; the next worker's call would wait for it).
- Whoever changes the state (a caller submitting, a thread after a result) sends what can
  be sent, under ``lock``; ``on_done`` callbacks run after it is released, so a callback
  may submit again.
- Results are read with ``shmray.wait`` by the thread that wants them: a result costs no
  extra thread hand-off (a ref's ``future()`` would add a reader thread's).  A caller that
  blocks anyway (``map``, ``starmap``, ``apply``) claims its job as it submits and reads
  that job's results itself (``collect``): handing them over from the collector thread
  would cost two wake-ups (an Event, then the GIL), ~0.1 ms here, a tenth of a map of
  10,000 tiny items.  The collector thread reads every other call.  A thread waiting
  cannot hear of calls sent meanwhile, so it waits at most ``_POLL`` seconds while one it
  should read may be sent (a worker had room, or another thread may free one); otherwise
  it waits for a result.
- A worker that dies fails only the task it was running with ``WorkerCrashedError`` (actor
  calls run in order: the first of its calls to fail with the actor's death); its later
  tasks go back to the queue, and a new worker takes its place at once.  Nothing waits for
  an answer that can no longer come.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional

from .. import exceptions
from .._actor import kill
from .._api import get, remote, wait
from ._pool_worker import ChunkFailed, PoolWorker, pack_call, pack_function, unpack_results

_DEPTH = 2
_POLL = 0.005
_QUICK = 0.005
_BATCH = 0.002  # seconds of work a call of tasks streamed one by one carries, at most


class Task:
    """Calls of one function, run in order by one worker; ``on_done(ok, results_or_error)``.
    ``start()`` (if given) is asked just before dispatch: False drops the task (cancelled).
    ``job``: what the task is part of (a map's result; None: nothing to tell apart), for
    ``bundle`` (the job's results are wanted all at once: its tasks may share a call, and
    then fail together) and ``collect``.  ``refs``: where the large arrays of the job are
    put in the store (``pack_call``), kept as long as the task."""

    __slots__ = ("blob", "mode", "items", "on_done", "start", "job", "bundle", "refs", "alone")

    def __init__(self, blob: bytes, mode: int, items: list, on_done: Callable,
                 start: Optional[Callable[[], bool]] = None, job: object = None,
                 bundle: bool = False, refs: Optional[dict] = None):
        self.blob, self.mode, self.items = blob, mode, items
        self.on_done, self.start = on_done, start
        self.job, self.bundle = job, bundle
        self.refs = {} if refs is None else refs
        self.alone = False  # never to share a call (it was in one a worker died running)


class _Worker:
    __slots__ = ("actor", "inflight", "started", "dead", "outcomes", "crash_reported")

    def __init__(self, actor):
        self.actor = actor
        self.inflight: collections.deque = collections.deque()  # refs, oldest first
        self.started = 0
        self.dead = False
        self.outcomes: dict = {}  # once dead: ref -> (ok, value), till settled in order
        self.crash_reported = False


class PoolTerminated(RuntimeError):
    """The pool was terminated before this task ran."""


class Dispatcher:
    def __init__(self, processes: int, initializer, initargs: tuple,
                 max_tasks_per_worker: Optional[int]):
        self.init_blob = None if initializer is None else pack_function(initializer)
        self.initargs = tuple(initargs)
        self.max_tasks = max_tasks_per_worker
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.pending: collections.deque = collections.deque()
        self.sent: Dict[object, tuple] = {}  # ref in flight -> (worker, tasks, time sent)
        self.quick: Dict[bytes, bool] = {}  # function -> whether its last call was quick
        self.cost: Dict[bytes, float] = {}  # function -> seconds a task took, last call
        self.claimed: dict = {}  # job -> the thread that collects its results (``collect``)
        self.blobs: Dict[Callable, bytes] = {}  # function -> its pickle (``pickled``)
        self.actor_class = remote(PoolWorker).options(num_cpus=0)
        self.workers: List[_Worker] = [self._new_worker() for _ in range(processes)]
        self.closing = False
        self.ended = False
        self.thread = threading.Thread(target=self._collect, name="shmray-pool", daemon=True)
        self.thread.start()

    # -- called from any thread -------------------------------------------------------

    def submit(self, tasks: List[Task], claim: bool = False) -> None:
        """Queue ``tasks`` and send what can be sent.  ``claim``: the caller will wait for
        their job in ``collect`` (all the tasks are of one job)."""
        with self.lock:
            if claim and tasks:
                self.claimed[tasks[0].job] = threading.get_ident()
            self.pending.extend(tasks)
            reports = self._dispatch()
        _report_all(reports)

    def collect(self, job, done: threading.Event) -> None:
        """Collect the results of ``job`` (submitted with ``claim``) in this thread until
        ``done`` is set: a caller that blocks on a map anyway reads its results itself,
        which spares it the hand-off from the collector thread (two wake-ups, ~0.1 ms).
        Results of other jobs are still the collector thread's."""
        try:
            while not done.is_set():
                with self.lock:
                    if self.ended:
                        return
                    refs = [ref for ref, (_, tasks, _) in self.sent.items()
                            if tasks[0].job is job]
                    # A task of the job still queued may be sent by another thread
                    # meanwhile, which this wait would not hear of: look again soon.
                    queued = any(task.job is job for task in self.pending)
                    if not refs:
                        self.wake.wait(_POLL)
                        continue
                if not self._collect_some(refs, queued):
                    return
        finally:
            with self.lock:
                self.claimed.pop(job, None)
                # Calls of a failed map still out are the collector's now; a closing pool
                # ends once nothing is out.
                if self.closing or any(tasks[0].job is job for _, tasks, _ in self.sent.values()):
                    self.wake.notify_all()

    def pickled(self, fn: Callable) -> bytes:
        """``fn`` pickled once for the many calls of it a pool usually sees (a worker would
        not see a later change of what it was pickled with anyway: its first load stays)."""
        try:
            blob = self.blobs.get(fn)
        except TypeError:  # an unhashable callable
            return pack_function(fn)
        if blob is None:
            if len(self.blobs) >= 256:
                self.blobs.clear()
            blob = self.blobs[fn] = pack_function(fn)
        return blob

    def cancel_pending(self) -> None:
        """Fail every task not yet handed to a worker with ``CancelledError``."""
        with self.lock:
            reports = [(t, False, concurrent.futures.CancelledError()) for t in self.pending]
            self.pending.clear()
        _report_all(reports)

    def close(self) -> None:
        """End once every task given so far is done."""
        with self.lock:
            self.closing = True
            self.wake.notify_all()

    def terminate(self) -> None:
        """End now: kill the workers; unfinished tasks fail with ``PoolTerminated``."""
        with self.lock:
            unfinished = [t for _, tasks, _ in self.sent.values() for t in tasks]
            unfinished += self.pending
            self.pending.clear()
            self.sent.clear()
            self._end()
        gone = PoolTerminated("the pool was terminated before this task finished")
        _report_all([(task, False, gone) for task in unfinished])

    def join(self, timeout: Optional[float] = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- under the lock -------------------------------------------------------------------

    def _new_worker(self) -> _Worker:
        return _Worker(self.actor_class.remote(self.init_blob, self.initargs))

    def _dispatch(self) -> list:
        """Send what can be sent; wake the threads that will want to collect it, unless
        that is this one (a wake-up of a thread costs more than what it does here)."""
        reports: list = []
        if not self.workers:
            return reports
        share = -(-len(self.pending) // len(self.workers))  # of a quick map's chunks
        calls = []
        planned: Dict[_Worker, int] = {}
        for depth in range(1, _DEPTH + 1):
            for worker in self.workers:
                while (self.pending and len(worker.inflight) + planned.get(worker, 0) < depth
                       and self._usable(worker)):
                    tasks = self._next_call(worker, share)
                    if tasks:
                        worker.started += len(tasks)
                        planned[worker] = planned.get(worker, 0) + 1
                        calls.append((worker, tasks))
        # Every call pickled first, then all sent back to back: a worker woken by its call
        # would take the CPU from this thread mid-way through the next one's pickling.
        calls = [(worker, tasks, self._packed(tasks, reports)) for worker, tasks in calls]
        me = threading.get_ident()
        wake = False
        for worker, tasks, payload in calls:
            if payload is not None and self._send(worker, tasks, payload, reports):
                wake = wake or self.claimed.get(tasks[0].job, -1) != me
            else:
                worker.started -= len(tasks)
        if wake:
            self.wake.notify_all()
        return reports

    def _next_call(self, worker: _Worker, share: int) -> List[Task]:
        """The tasks of the worker's next call: one, or if its function is quick, a fair
        share of a map's chunks, or tasks of it streamed one by one (``imap``,
        ``apply_async``, an executor's) worth up to ``_BATCH`` seconds."""
        task = self.pending.popleft()
        if not _started(task):
            return []
        tasks = [task]
        if task.alone or not self.quick.get(task.blob):
            return tasks
        if self.max_tasks is not None:
            share = min(share, self.max_tasks - worker.started)
        if task.bundle:
            while (len(tasks) < share and self.pending and self.pending[0].bundle
                   and self.pending[0].job is task.job):
                tasks.append(self.pending.popleft())
            return tasks
        limit = min(share, int(_BATCH / max(self.cost.get(task.blob, _BATCH), 1e-7)))
        claimer = self.claimed.get(task.job)
        while len(tasks) < limit and self.pending:
            other = self.pending[0]
            if (other.bundle or other.alone or other.blob != task.blob
                    or (other.job is not task.job
                        and (claimer is not None or other.job in self.claimed))):
                break  # a call's tasks are collected by one thread (``collect``)
            self.pending.popleft()
            if _started(other):
                tasks.append(other)
        return tasks

    @staticmethod
    def _packed(tasks: List[Task], reports: list):
        try:
            return pack_call([(t.mode, t.items) for t in tasks], tasks[0].refs)
        except BaseException as exc:  # e.g. the store is full
            reports.extend((task, False, exc) for task in tasks)
            return None

    def _send(self, worker: _Worker, tasks: List[Task], payload, reports: list) -> bool:
        try:
            ref = worker.actor.run.remote(tasks[0].blob, payload)
        except BaseException as exc:  # e.g. an item that can't be pickled
            reports.extend((task, False, exc) for task in tasks)
            return False
        worker.inflight.append(ref)
        self.sent[ref] = (worker, tasks, time.monotonic())
        return True

    def _usable(self, worker: _Worker) -> bool:
        return not worker.dead and (self.max_tasks is None or worker.started < self.max_tasks)

    def _finished(self, ref, ok: bool, value, reports: list) -> None:
        entry = self.sent.get(ref)
        if entry is None:
            return  # terminated
        worker, tasks, sent_at = entry
        if not ok and isinstance(value, exceptions.RayActorError) and not worker.dead:
            worker.dead = True
            self._replace(worker)
        if worker.dead:
            worker.outcomes[ref] = (ok, value)
            self._settle_dead(worker, reports)
            return
        del self.sent[ref]
        worker.inflight.remove(ref)
        if len(self.quick) > 1024:
            self.quick.clear()
            self.cost.clear()
        took = time.monotonic() - sent_at
        self.quick[tasks[0].blob] = took < _QUICK
        self.cost[tasks[0].blob] = took / len(tasks)
        _deliver(tasks, ok, value, reports)
        if not worker.inflight and not self._usable(worker):
            self._replace(worker)

    def _settle_dead(self, worker: _Worker, reports: list) -> None:
        """Settle a dead worker's calls in the order it ran them, each once its own outcome
        is in: a death may be heard of before the results of calls that ended before it.
        Calls ending well count as usual; the first that met the death was running and
        fails; those after it never ran and go back to the queue.  If that first call
        carried several tasks streamed one by one, which of them killed the worker is
        unknown: they all go back to the queue, each to run in a call of its own (the
        culprit then fails alone, as it would have without the sharing)."""
        again = []
        while worker.inflight and worker.inflight[0] in worker.outcomes:
            ref = worker.inflight.popleft()
            ok, value = worker.outcomes.pop(ref)
            tasks = self.sent.pop(ref)[1]
            if ok or not isinstance(value, exceptions.RayActorError):
                _deliver(tasks, ok, value, reports)
            elif not worker.crash_reported and len(tasks) > 1 and not tasks[0].bundle:
                worker.crash_reported = True
                for task in tasks:
                    task.alone = True
                again.extend(tasks)
            elif not worker.crash_reported:
                worker.crash_reported = True
                crash = exceptions.WorkerCrashedError(
                    f"A pool worker died while running this task: {value}  It may have run "
                    "out of memory, been killed, or crashed in native code; the pool "
                    "started a new worker.")
                crash.__cause__ = value
                reports.extend((task, False, crash) for task in tasks)
            else:
                again.extend(tasks)
        self.pending.extendleft(reversed(again))

    def _replace(self, worker: _Worker) -> None:
        index = self.workers.index(worker)
        if not worker.dead:
            kill(worker.actor)
        if self.closing and not self.pending:
            self.workers.pop(index)
        else:
            self.workers[index] = self._new_worker()

    def _end(self) -> None:
        self.ended = True
        for worker in self.workers:
            try:
                kill(worker.actor)
            except Exception:  # the session already ended: the actor went with it
                pass
        self.workers = []
        self.wake.notify_all()

    # -- the collector thread -------------------------------------------------------------

    def _collect(self) -> None:
        while True:
            with self.lock:
                while True:
                    if self.ended:
                        return
                    refs = [ref for ref, (_, tasks, _) in self.sent.items()
                            if tasks[0].job not in self.claimed]
                    if refs:
                        break
                    if self.closing and not self.pending and not self.sent:
                        self._end()
                        return
                    self.wake.wait()
                # A caller may send meanwhile if a worker has room, or if a caller
                # collecting its own results frees one: look again soon then.
                room = len(refs) < len(self.sent) or any(
                    len(w.inflight) < _DEPTH and self._usable(w) for w in self.workers)
            collecting = self._collect_some(refs, room)
            del refs  # else the last calls' results stay in the store while the pool idles
            if not collecting:
                return

    def _collect_some(self, refs: list, room: bool) -> bool:
        """Wait for results of ``refs`` and hand them on (a function of its own, so no
        result outlives it: the caller may have dropped them already, and large arrays
        should go back to the store at once).  False once the session is gone."""
        try:
            ready, _ = wait(refs, num_returns=1, timeout=_POLL if room else None)
            if ready and len(refs) > 1:
                ready, _ = wait(refs, num_returns=len(refs), timeout=0)
        except exceptions.RaySystemError:  # the session ended under the pool
            self.terminate()
            return False
        results = []
        for ref in ready:  # unpickled here, outside the lock
            try:
                results.append((ref, True, unpack_results(get(ref))))
            except BaseException as exc:
                results.append((ref, False, exc))
        with self.lock:
            reports: list = []
            for ref, ok, value in results:
                self._finished(ref, ok, value, reports)
            reports += self._dispatch()
        _report_all(reports)
        return True


def _started(task: Task) -> bool:
    """Whether the task is to run (not cancelled); asked once, not again if it goes back
    to the queue (a worker died before running it)."""
    start, task.start = task.start, None
    return start is None or start()


def _deliver(tasks: List[Task], ok: bool, value, reports: list) -> None:
    if ok and len(value) != len(tasks):  # never expected: but no task may wait forever
        ok, value = False, exceptions.RaySystemError(
            f"a pool worker answered {len(value)} results for {len(tasks)} tasks")
    if ok:
        for task, v in zip(tasks, value):
            if type(v) is ChunkFailed:
                reports.append((task, False, v.error.as_instanceof_cause()))
            else:
                reports.append((task, True, v))
    else:  # a chunk of a call failed: the map they belong to fails
        reports.extend((task, False, value) for task in tasks)


def _report_all(reports: list) -> None:
    for task, ok, value in reports:
        try:
            task.on_done(ok, value)
        except BaseException:  # a user's callback raised: say so, keep the pool going
            print("Exception in a shmray pool callback:", file=sys.stderr)
            traceback.print_exc()
