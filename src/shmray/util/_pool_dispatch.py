"""The engine under ``Pool`` and ``ProcessPoolExecutor``: hands tasks (chunks of calls) to a
fixed set of worker actors, replaces workers that die or reach their task limit.

Runs in: the process that made the pool (a thread of its own, "shmray-pool").

::

    caller threads --submit(Task)--> events --> dispatcher thread --run.remote()--> workers
                                       ^                                              |
                                       +---- DONE(worker, task, future) <-------------+
                                             (ref.future() callback)

- The caller only puts a task on ``events``; the dispatcher thread alone owns the pending
  queue and the workers, so no lock guards them.
- Each worker actor has at most ``_DEPTH`` tasks in flight: its next task already waits in
  its mailbox when one ends (no idle round trip), yet a slow task holds back little.
- A task's end comes back as its ref's future resolving; the callback only posts an event.
  ``Task.on_done(ok, value)`` runs in the dispatcher thread: the front end keeps results.
- A worker that dies fails only the task it was running (its oldest in flight, actor calls
  run in order) with ``WorkerCrashedError``; its later tasks go back to the queue, and a new
  worker takes its place.  Nothing waits for an answer that can no longer come.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import sys
import threading
import traceback
from typing import Callable, List, Optional

from .. import exceptions
from .._actor import kill
from .._api import remote
from ._pool_worker import PoolWorker, pack_function

_DEPTH = 2
_TASK, _DONE, _CANCEL, _CLOSE, _TERMINATE = range(5)


class Task:
    """Calls of one function, run in order by one worker; ``on_done(ok, results_or_error)``.
    ``start()`` (if given) is asked just before dispatch: False drops the task (cancelled)."""

    __slots__ = ("blob", "mode", "items", "on_done", "start")

    def __init__(self, blob: bytes, mode: int, items: list, on_done: Callable,
                 start: Optional[Callable[[], bool]] = None):
        self.blob, self.mode, self.items = blob, mode, items
        self.on_done, self.start = on_done, start


class _Worker:
    __slots__ = ("actor", "inflight", "started", "dead")

    def __init__(self, actor):
        self.actor = actor
        self.inflight: collections.deque = collections.deque()
        self.started = 0
        self.dead = False


class PoolTerminated(RuntimeError):
    """The pool was terminated before this task ran."""


class Dispatcher:
    def __init__(self, processes: int, initializer, initargs: tuple,
                 max_tasks_per_worker: Optional[int]):
        self.init_blob = None if initializer is None else pack_function(initializer)
        self.initargs = tuple(initargs)
        self.max_tasks = max_tasks_per_worker
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: collections.deque = collections.deque()
        self.actor_class = remote(PoolWorker).options(num_cpus=0)
        self.workers: List[_Worker] = [self._new_worker() for _ in range(processes)]
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="shmray-pool", daemon=True)
        self.thread.start()

    # -- called from any thread -------------------------------------------------------

    def submit(self, task: Task) -> None:
        self.events.put((_TASK, task))

    def cancel_pending(self) -> None:
        """Fail every task not yet handed to a worker with ``CancelledError``; return once
        done.  Tasks submitted before are handed out first, as far as workers take them."""
        done = threading.Event()
        self.events.put((_CANCEL, done))
        while not done.wait(0.1) and self.thread.is_alive():
            pass  # (the thread ended already if the pool was closed before)

    def close(self) -> None:
        """End once every task given so far is done."""
        self.events.put((_CLOSE,))

    def terminate(self) -> None:
        """End now: kill the workers; unfinished tasks fail with ``PoolTerminated``."""
        self.events.put((_TERMINATE,))

    def join(self, timeout: Optional[float] = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- the dispatcher thread ----------------------------------------------------------

    def _new_worker(self) -> _Worker:
        return _Worker(self.actor_class.remote(self.init_blob, self.initargs))

    def _loop(self) -> None:
        events = self.events
        while True:
            event = events.get()
            kind = event[0]
            if kind == _TASK:
                self.pending.append(event[1])
            elif kind == _DONE:
                self._finished(*event[1:])
            elif kind == _CANCEL:
                self._dispatch()
                self._cancel_pending()
                event[1].set()
            elif kind == _CLOSE:
                self.closing = True
            else:
                self._terminate()
                return
            self._dispatch()
            if self.closing and not self.pending and not any(w.inflight for w in self.workers):
                self._kill_all()
                return

    def _cancel_pending(self) -> None:
        cancelled = list(self.pending)
        self.pending.clear()
        for task in cancelled:
            _report(task, False, concurrent.futures.CancelledError())

    def _dispatch(self) -> None:
        for depth in range(1, _DEPTH + 1):
            for worker in self.workers:
                while self.pending and len(worker.inflight) < depth and self._usable(worker):
                    task = self.pending.popleft()
                    if task.start is not None and not task.start():
                        continue
                    self._send(worker, task)

    def _usable(self, worker: _Worker) -> bool:
        return not worker.dead and (self.max_tasks is None or worker.started < self.max_tasks)

    def _send(self, worker: _Worker, task: Task) -> None:
        try:
            ref = worker.actor.run.remote(task.blob, task.mode, task.items)
        except BaseException as exc:  # e.g. an item that can't be pickled
            _report(task, False, exc)
            return
        worker.inflight.append(task)
        worker.started += 1
        events = self.events
        ref.future().add_done_callback(lambda f: events.put((_DONE, worker, task, f)))

    def _finished(self, worker: _Worker, task: Task, future) -> None:
        if task not in worker.inflight:
            return  # sent back to the queue when its worker died
        error = future.exception()
        if isinstance(error, exceptions.RayActorError):
            self._worker_died(worker, error)
            return
        worker.inflight.remove(task)
        if error is None:
            _report(task, True, future.result())
        else:
            _report(task, False, error)
        if not worker.inflight and not self._usable(worker):
            self._replace(worker)

    def _worker_died(self, worker: _Worker, error: BaseException) -> None:
        running = worker.inflight.popleft()
        self.pending.extendleft(reversed(worker.inflight))
        worker.inflight.clear()
        worker.dead = True
        self._replace(worker)
        crash = exceptions.WorkerCrashedError(
            f"A pool worker died while running this task: {error}  It may have run out of "
            "memory, been killed, or crashed in native code; the pool started a new worker.")
        crash.__cause__ = error
        _report(running, False, crash)

    def _replace(self, worker: _Worker) -> None:
        index = self.workers.index(worker)
        if not worker.dead:
            kill(worker.actor)
        if self.closing and not self.pending:
            self.workers.pop(index)
        else:
            self.workers[index] = self._new_worker()

    def _kill_all(self) -> None:
        for worker in self.workers:
            _quiet_kill(worker.actor)
        self.workers = []

    def _terminate(self) -> None:
        unfinished = [t for w in self.workers for t in w.inflight] + list(self.pending)
        self.pending.clear()
        self._kill_all()
        gone = PoolTerminated("the pool was terminated before this task finished")
        for task in unfinished:
            _report(task, False, gone)


def _quiet_kill(actor) -> None:
    try:
        kill(actor)
    except Exception:  # the session already ended: the actor went with it
        pass


def _report(task: Task, ok: bool, value) -> None:
    try:
        task.on_done(ok, value)
    except BaseException:  # a user's callback raised: say so, keep the pool going
        print("Exception in a shmray pool callback:", file=sys.stderr)
        traceback.print_exc()
