"""A worker: runs one task at a time, sent by the scheduler or by the driver leasing it.

Runs in: worker processes (forked by the scheduler); ``Worker`` is also the base of actors.

For each EXECUTE: load the function (cached by id; its code arrives with the first task the
scheduler sends that uses it, or is asked of the scheduler when a leased task needs it),
rebuild the arguments, run, and store the results (``_task_results``).  Results go to the
scheduler (TASK_DONE), and for work sent straight here back to its sender (RESULT), the
scheduler hearing first (DIRECT_DONE) only of results the sender can't use at once: the
sender owns the work, and reports the others itself if the scheduler must know of it
(``report``).  While more short tasks are queued, a few tasks' replies wait to go
out in one message, each parked in the slot meanwhile (``ParkedReports``): should a later
task crash the worker, the scheduler reads there which finished, and with what.

A task the scheduler sent ahead, before its arguments were ready, finds those made here
among the latest results (``RecentResults``); one it lacks sends the task back unrun
(``not_run``): the scheduler runs it once that argument is ready.

While the task waits in ``get``/``wait`` the worker tells the scheduler (BLOCKED/UNBLOCKED), so
its CPU can run other tasks meanwhile: nested tasks never deadlock a small pool.  Tasks
queued behind it go back where they came from (HANDED_BACK: the one it waits for may be
among them), and a driver leasing the worker hears that its task waits even if none were.

Between tasks it names the one it starts in its slot (shared with the scheduler, which
reads it if the worker dies), and reads its socket only while the slot counts a cancel it
has not read: a poll(2) per task would cost more than a short task does.  How a running
task is cancelled: ``_task_cancel``.  A generator task's items are stored and sent as it
yields them (``_task_results``).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from typing import Dict

import setproctitle

from . import (
    _accelerators,
    _context,
    _direct,
    _events,
    _lend,
    _output,
    _pickling,
    _protocol as P,
    _runtime,
    _slot,
    _threads,
    exceptions,
)
from ._context import cancel_point, current_task
from ._runtime.objects import any_in_arena
from ._connection import ConnectionClosed, wait_writable
from ._task_cancel import TaskCancel
from ._task_results import (
    RecentResults,
    apply_env,
    arguments,
    cancelled_results,
    dynamic_items,
    error_results,
    flush_output,
    items_of,
    release_held,
    should_retry,
    store_returns,
    stream_items,
    task_error,
)


_REPLY_BATCH = 64   # replies held back at most, while more work is queued
_NO_FAILURE = (0, None)  # what a task that did not fail records (``_events``)
# What may be unsent beside parked reports: the reports themselves, and refs' holds and
# releases (a dead process's holds are dropped anyway).
_PARKABLE = frozenset((P.TASK_DONE, P.DIRECT_DONE, P.HOLD, P.RELEASE))


class ParkedReports:
    """Reports held back, parked in this process's slot, where the scheduler reads them if
    the process dies before sending them (``_protocol``); cleared once they are sent."""

    __slots__ = ("slot", "pickler", "parkable", "end", "seen_list", "seen")

    def __init__(self, slot, parkable: frozenset):
        self.slot = slot
        self.pickler = _slot.parking_pickler(slot) if slot is not None else None
        self.parkable = parkable  # what may be unsent beside them
        self.end = _slot.PARKED_START  # where the next goes in the slot
        self.seen_list = None     # the queue to the scheduler last looked at...
        self.seen = 0             # ...and how much of it

    def park(self, report: tuple, pending: list) -> bool:
        """Park ``report`` (queued last in ``pending``, the queue to the scheduler, or sent
        to a caller); False if it can't wait: no slot, many unsent, or too big, or unsent
        beside what it may depend on (a put, a child task: refs in it would name nothing)."""
        if self.slot is None or len(pending) >= _REPLY_BATCH:
            return False
        if pending:  # (a leased task's reply: mostly nothing is)
            # Each flush starts a new list: only what was queued since the last look is
            # looked at (all of up to 64 messages, each report, would cost a microsecond).
            seen = self.seen if self.seen_list is pending else 0
            while seen < len(pending):
                if pending[seen][0] not in self.parkable:
                    return False
                seen += 1
            self.seen_list, self.seen = pending, seen
        end = _slot.park_report(self.slot, self.pickler, self.end, report)
        if not end:
            return False
        self.end = end
        return True

    def clear(self) -> None:
        """After each flush: what was parked has been sent."""
        if self.end != _slot.PARKED_START:
            self.end = _slot.PARKED_START
            self.seen_list = None  # the queue sent: its messages may go
            _slot.clear_parked(self.slot)


class Worker:
    """Runs what it is sent: by the scheduler, or straight from the driver leasing it (an
    actor: from its callers; ``_direct``).  Work sent straight here remembers where it came
    from (``origins``); its results go back that way, and to the scheduler (``report``)."""

    exit_requested = False
    batch_replies = True  # one task at a time: replies may wait while more work is queued
    reports_arena = False  # results in the arena: to the scheduler too (``report``)
    ending = None  # the end of the task run last, logged once it is reported (record_end)
    hold_reports = True    # reports of tasks from the scheduler wait while more are queued
    names_parent = True    # a leased task names itself in what it submits
    parkable = _PARKABLE   # what may be unsent beside the reports parked in the slot
    direct_shapes = {P.EXECUTE: P.EXECUTE_FIELDS}  # what a driver leasing it may send

    def __init__(self, runtime: _runtime.Runtime, cancel_slot=None):
        self.runtime = runtime
        self.cancel_slot = cancel_slot  # shared with the scheduler (``_protocol``)
        self.cancel = TaskCancel(runtime, cancel_slot)
        self.functions: dict = {}
        self.queue: collections.deque = collections.deque()
        self.exiting = False
        self.consumed: Dict[bytes, int] = {}  # streaming tasks: items their caller took
        self.waiting = False  # the running task waits in get/wait
        self.parking = ParkedReports(cancel_slot, self.parkable)
        self.loading = 0.0    # of the task running: time spent loading its function
        self.recent = RecentResults()  # for tasks sent ahead behind the ones making them
        runtime.link.after_flush = self.parking.clear
        runtime.link.handlers.update(self.handlers())
        runtime.link.blocked_hook = self._blocked
        _context.is_canceled = lambda task_id: (self.cancel.cancelled
                                                or self.cancel.pending == task_id)
        # Direct channels: peers connect to the listener; one connection per peer process.
        self.listener = None
        self.callers: dict = {}         # fd -> (connection, peer pid)
        self.origins: dict = {}         # task id -> (connection, peer pid): sent straight here
        self.held_replies: set = set()  # connections with replies not written yet
        runtime.link.before_wait = self.write_replies

    # -- direct channels ------------------------------------------------------------------

    def listen(self, listener) -> None:
        """Serve direct channels on ``listener`` (None: this process has none)."""
        self.listener = listener
        if listener is not None:
            self.runtime.link.listeners.add(self.listener.fileno())
            self.watch(self.listener.fileno(), self._accept)

    def watch(self, fd: int, callback) -> None:
        """Have ``callback`` read ``fd`` when it is readable (an async actor's loop does it
        its own way)."""
        self.runtime.link.readers[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.runtime.link.readers.pop(fd, None)

    def _accept(self) -> None:
        while True:
            accepted = _direct.accept(self.listener)
            if accepted is None:
                return
            conn, peer_pid = accepted
            self.callers[conn.fd] = (conn, peer_pid)
            self.watch(conn.fd, lambda conn=conn, pid=peer_pid: self._read_caller(conn, pid))

    def _read_caller(self, conn, peer_pid: int) -> None:
        """Work from one peer, in its order (the runtime's lock is held).  A message of
        the wrong shape ends that peer's connection, never this process."""
        messages, closed = conn.read_available()
        for message in messages:
            if not P.well_formed(message, self.direct_shapes):
                print(f"shmray: {setproctitle.getproctitle()} (pid {os.getpid()}) got a "
                      f"malformed message from pid {peer_pid} on its direct channel; "
                      "dropping it and closing that connection", file=sys.stderr, flush=True)
                closed = True
                break
            self._take_direct(message, (conn, peer_pid))
        if closed:  # the peer is gone; results still owed it are reported to the scheduler
            self.unwatch(conn.fd)
            self.callers.pop(conn.fd, None)
            self.runtime.link.unflushed.discard(conn)
            conn.close()

    def _take_direct(self, message: tuple, origin) -> None:
        self.origins[message[1]] = origin
        self.take_work(message)  # the one kind ``direct_shapes`` allows

    def report(self, task_id: bytes, results, retryable: bool, took: float = 0.0) -> None:
        """Results of a task or call: to the scheduler, and straight back to a direct caller.

        Straight back go only results the caller may use at once: not those holding refs
        (the scheduler must count those refs first) and none of a failure that will be
        retried; the caller hears of those from the scheduler, which hears of them from
        here first.  Delivered results go to the caller alone, which owns the work: it
        reports them if it has told the scheduler of it, and is the witness of what it saw
        should this process die; the scheduler takes them from the slot if this process dies
        holding them back.  An actor reports results in the arena too (``reports_arena``):
        its caller may be a worker that dies before it registers the call, and the
        scheduler must know them to free them.
        """
        runtime = self.runtime
        origin = self.origins.pop(task_id, None)
        conn = origin[0] if origin is not None else None
        if conn is not None and self.callers.get(conn.fd, (None,))[0] is not conn:
            conn = None  # the caller is gone (and its descriptor number may be reused)
        undelivered = [r[0] for r in results if retryable or r[3]]
        with runtime.link.lock:
            done = told = None
            if origin is None:
                done = P.task_done(task_id, results, retryable, took)
                runtime.send(done)
            elif conn is None or undelivered or (self.reports_arena
                                                  and any_in_arena(results)):
                told = P.direct_done(task_id, results, origin[1], retryable)
                runtime.send(told)
            self._reported()
            release_held(runtime, results)  # after the message that now holds them
            if conn is None:
                if (done is not None and self.hold_reports and self.queue
                        and self.parking.park(done, runtime.link.conn.pending)):
                    # Sent with the next report, before this process waits, or by the
                    # flusher within a millisecond (should the next task hold the GIL: when
                    # it lets go); the scheduler only sends ahead tasks expected to be short.
                    runtime.flush_later()
                else:
                    runtime.flush()
                return
            delivered = [] if retryable else [(object_id, data, metadata)
                                              for object_id, data, metadata, inner in results
                                              if not inner]
            reply = P.result(task_id, delivered, undelivered, took,
                             runtime.leased_must_register)
            conn.send(reply)
            runtime.leased_must_register = False
            self.held_replies.add(conn)
            if (self.batch_replies and self.queue and len(conn.pending) < _REPLY_BATCH
                    and self.parking.park(reply if told is None else told,
                                          runtime.link.conn.pending)):
                # Sent with the next, before this process waits, or by the flusher within
                # a millisecond, should the next call be long.  Parked meanwhile: should
                # the next crash this process, the scheduler reads there that this one
                # finished (Ray returns its result; it must not run again): the report it
                # was told, or else the reply only its caller gets.
                runtime.flush_later()
            else:
                self.write_replies()

    def write_replies(self) -> None:
        """Write the replies held back, after what the scheduler must hear first (caller
        holds the lock)."""
        if not self.held_replies:
            return
        runtime = self.runtime
        runtime.flush()
        for conn in self.held_replies:
            runtime.link.write_some(conn)
            if conn in runtime.link.unflushed:
                self.on_unflushed(conn)
        self.held_replies.clear()

    def _reported(self) -> None:
        """Hook: what follows a report to the scheduler (an actor's exit)."""

    def on_unflushed(self, conn) -> None:
        """A peer's socket is full: the runtime's reader finishes the write (an async
        actor's loop replaces this)."""

    def wind_up(self, patience: float = 2.0) -> None:
        """Before exiting cleanly: write what peers are still owed (one that doesn't read
        for ``patience`` gets its results from the scheduler instead), wait for the answers
        to actor calls of ours that others wait on (``Channels.settle``), and send the
        scheduler what it has not heard yet."""
        runtime = self.runtime
        deadline = time.monotonic() + patience
        with runtime.link.lock:
            self.write_replies()
            while runtime.link.unflushed and time.monotonic() < deadline:
                for conn in list(runtime.link.unflushed):
                    runtime.link.write_some(conn)
                for conn in list(runtime.link.unflushed)[:1]:
                    wait_writable(conn.fd, 0.05)
        runtime.channels.settle()
        runtime.flush()

    def handlers(self) -> dict:
        """The messages this process acts on itself, beside those its runtime handles:
        opcode -> handler of the message's fields (they join the link's one table)."""
        return {P.EXECUTE: self._on_execute, P.CANCEL_CALL: self.cancel.on_cancel_call,
                P.EXIT: self._on_exit, P.CONSUMED: self._on_consumed}

    def _on_execute(self, *fields) -> None:
        self.take_work((P.EXECUTE, *fields))

    def take_work(self, message: tuple) -> None:
        """Queue a task (an actor: a call), from the scheduler or a direct channel."""
        self.queue.append(message)
        if self.waiting:
            self._hand_back()

    def _on_exit(self) -> None:
        self.exiting = True

    def _on_consumed(self, task_id: bytes, count: int) -> None:
        if len(self.consumed) > 1024:  # of tasks long over: told too late
            self.consumed.clear()
        self.consumed[task_id] = count

    def _blocked(self, blocked: bool) -> None:
        if current_task.task_id is not None:
            self.waiting = blocked
            if blocked:
                self._hand_back()
            if not blocked:
                self.runtime.link.conn.send(P.unblocked())
            elif self.runtime.running_leased is not None:
                self.runtime.leased_must_register = True
                self.runtime.link.conn.send(P.blocked(self.runtime.running_leased))
            else:
                self.runtime.link.conn.send(P.blocked())
            if not blocked:  # the task computes again now: its CPU must not be lent out
                try:
                    self.runtime.link.conn.flush()
                except ConnectionClosed:
                    pass

    def _hand_back(self) -> None:
        """Tasks queued here go back to whoever sent them while the running task waits: it
        may be waiting for one of them.  A driver leasing this worker hears that its task
        waits even if none were queued: it may lease another worker meanwhile, this one's
        CPU being lent.  Caller holds the runtime's lock."""
        ahead, leased = [], {}
        running = self.origins.get(current_task.task_id) if self.waiting else None
        if running is not None:
            leased[running[0]] = []
        for message in self.queue:
            origin = self.origins.get(message[1])
            if origin is None:
                ahead.append(message[1])
            else:
                leased.setdefault(origin[0], []).append(message[1])
        if not (ahead or leased):
            return
        returned = set(ahead).union(*leased.values())
        self.queue = collections.deque(m for m in self.queue if m[1] not in returned)
        if ahead:
            for task_id in ahead:
                self.cancel.skip.pop(task_id, None)
            self.runtime.link.conn.send(P.handed_back(ahead))
        for conn, task_ids in leased.items():
            for task_id in task_ids:
                del self.origins[task_id]
            if self.callers.get(conn.fd, (None,))[0] is conn:
                conn.send(P.handed_back(task_ids))
                self.held_replies.add(conn)
        self.write_replies()

    def run(self) -> None:
        runtime = self.runtime
        while True:
            with runtime.link.lock:
                try:
                    runtime.link.wait_until(lambda: self.queue or self.exiting, None)
                    self.cancel.read_cancels()  # for the task it is about to start?
                except exceptions.RaySystemError:
                    return  # the scheduler is gone: nothing left to do
                if self.exiting and not self.queue:
                    return
                message = self.queue.popleft()
            task_id = message[1]
            try:
                self.cancel.starting(task_id)
            except exceptions.RaySystemError:
                return
            started = time.perf_counter()
            self.loading = 0.0
            values = message[8]
            if task_id in self.cancel.skip:
                results, retryable = cancelled_results(task_id, message[7]), False
                _events.failed_unrun(task_id, message[4], _events.TASK_CANCELLED)
            elif values and None in values.values() and not self.recent.fill(values):
                results, retryable = None, True  # sent ahead, lacking an argument: not run
            else:
                results, retryable = self.execute(*message[1:])
                _lend.after_task()
                if not retryable and task_id not in self.origins:
                    self.recent.keep(results)
            self.recent.last = () if retryable else results
            self.cancel.skip.pop(task_id, None)  # a cancel that came as it ran, too
            if self.consumed:
                self.consumed.pop(task_id, None)
            try:
                if results is None:
                    send_back_unrun(self, task_id)
                else:
                    self.report(task_id, results, retryable,
                                time.perf_counter() - started - self.loading)
            except exceptions.RaySystemError:
                return
            record_end(self)

    def execute(self, task_id, fn_id, pickled, name, args_blob, arg_ids, num_returns, values,
                retry_exceptions, extra=None):
        if extra is None:  # the usual task: one CPU, no runtime_env, no GPU
            _threads.fit(P.LEASE_SHAPE)
            return self._execute(task_id, fn_id, pickled, name, args_blob, arg_ids,
                                 num_returns, values, retry_exceptions, extra)
        gpu_ids = extra.get("gpu_ids")
        env_vars = extra.get("env_vars")
        restore = apply_env(env_vars) if env_vars else None
        _threads.fit(extra.get("resources") or P.LEASE_SHAPE, env_vars)
        if gpu_ids:  # after env_vars: the GPUs it was given win, as in Ray
            current_task.gpu_ids = gpu_ids
            _accelerators.make_visible(gpu_ids)
        try:
            return self._execute(task_id, fn_id, pickled, name, args_blob, arg_ids,
                                 num_returns, values, retry_exceptions, extra)
        finally:
            if gpu_ids:  # the next task may hold none: it must see none
                current_task.gpu_ids = ()
                _accelerators.make_visible(())
            if restore is not None:
                restore()

    @cancel_point  # the task's own code runs (nothing of shmray's is under it)
    def _execute(self, task_id, fn_id, pickled, name, args_blob, arg_ids, num_returns, values,
                 retry_exceptions, extra):
        current_task.task_id = task_id
        began, failure = self.cancel.started_at, _NO_FAILURE  # (its start: in the slot)
        if self.names_parent and task_id in self.origins:
            self.runtime.running_leased = task_id
            self.runtime.leased_must_register = False
        _output.set_name(name)
        retryable = False
        try:
            fn = self.functions.get(fn_id)
            if fn is None:
                loading = time.perf_counter()
                if pickled is None:  # sent by a lease holder, which leaves the code to us
                    pickled = fetch_function(self.runtime, fn_id)
                fn = self.functions[fn_id] = _pickling.loads(pickled)
                self.loading = time.perf_counter() - loading  # once: not the task's run time
            args, kwargs = arguments(self.runtime, args_blob, arg_ids, values)
            current_task.name, current_task.function = name, fn
            if extra:
                current_task.resources = extra.get("resources") or P.LEASE_SHAPE
                current_task.placement = extra.get("placement")
            else:
                current_task.resources = P.LEASE_SHAPE
                current_task.placement = None
            cancel = self.cancel
            cancel.in_user_code = True
            try:
                if cancel.pending == task_id:  # it came while the task loaded
                    cancel.stop_before_running()
                outcome = fn(*args, **kwargs)
                if num_returns < 0:  # a generator task: it runs as its items are stored
                    outcome = self._generate(task_id, outcome, num_returns, name, extra)
                    num_returns = 1
            finally:
                cancel.in_user_code = False
            del args, kwargs
            handed_over = _lend.handed_over(outcome)
            results = store_returns(self.runtime, task_id, outcome, num_returns, name,
                                    handed_over)
        except BaseException as exc:  # the task's failure is its result
            if isinstance(exc, SystemExit):
                # As in Ray: sys.exit() in a task ends its worker, and the task is a
                # system failure (retried while max_retries lasts, then WorkerCrashedError).
                raise
            retryable = should_retry(exc, retry_exceptions) and not self.cancel.cancelled
            if isinstance(exc, KeyboardInterrupt):  # ray.cancel's, or the task's own
                retryable = False
                error = exceptions.TaskCancelledError(task_id.hex())
            else:
                error = task_error(name, exc)
            failure = (_events.error_code(error), _events.error_message(exc))
            results = error_results(task_id, error, num_returns)
            # The error holds the traceback, whose first frame is this one, which holds the
            # error: a cycle only the garbage collector would free, keeping what the task's
            # frames held (large arrays, lent buffers) alive meanwhile.
            del error
        finally:
            self.ending = (task_id, name, began, time.time(), _events.NORMAL_TASK,
                           _events.NO_ID, failure, self.cancel_slot)
            current_task.task_id = None
            self.runtime.running_leased = None
            self.runtime.link.pending_interrupt = False  # it ended before it took the cancel
            flush_output()
        return results, retryable

    def _generate(self, task_id: bytes, outcome, num_returns: int, name: str, extra):
        """A streaming task's item count, or a dynamic one's refs (``_task_results``)."""
        items = items_of(outcome, name)
        if num_returns == P.DYNAMIC:
            return dynamic_items(self.runtime, items)
        backpressure = (extra or {}).get("backpressure", -1)
        return stream_items(self.runtime, task_id, items, backpressure,
                            lambda task: self.consumed.get(task, 0))


def record_end(worker: Worker) -> None:
    """Log the end of the task (or call) just reported, and say in its slot that it ended
    (``_events``, ``_slot``): after its reply went out, not before, so neither adds to
    the round trip of a task waited for."""
    ending, worker.ending = worker.ending, None
    if ending is not None:
        task_id, name, began, at, kind, actor_id, (error, message), slot = ending
        _events.ended(task_id, name, began, kind, actor_id, error, message, at)
        if slot is not None:
            _slot.mark_ended(slot)


def fetch_function(runtime: _runtime.Runtime, fn_id: bytes) -> bytes:
    """A function's code, from the scheduler (which has every function registered)."""
    hook, runtime.link.blocked_hook = runtime.link.blocked_hook, None  # a fetch lends no CPU
    try:
        return runtime.query(("function", fn_id))
    finally:
        runtime.link.blocked_hook = hook


def send_back_unrun(worker: Worker, task_id: bytes) -> None:
    """A task sent ahead that lacks an argument it was to find here goes back to its
    sender, after the results sent before it (they may be what it lacks): the scheduler,
    or the driver leasing this worker.  Either runs it where it waits for that argument."""
    runtime = worker.runtime
    with runtime.link.lock:
        origin = worker.origins.pop(task_id, None)
        if origin is None:
            runtime.send(P.not_run(task_id))
            runtime.flush()
        elif worker.callers.get(origin[0].fd, (None,))[0] is origin[0]:
            origin[0].send(P.not_run(task_id))
            worker.held_replies.add(origin[0])
            worker.write_replies()


def worker_main(conn, store, session_dir: str, options: dict, cancel_slot, listener) -> None:
    _output.redirect(options.get("log_to_driver", True),
                     os.path.join(session_dir, "logs"), "worker")
    runtime = _runtime.Runtime(store, conn, session_dir, options)
    _context.install(runtime)
    _events.start(cancel_slot.events, options["task_events"])
    _lend.lend_to_numpy(store)
    _accelerators.start()  # a task sees GPUs only while it holds some (``execute``)
    try:
        worker = Worker(runtime, cancel_slot)
        worker.listen(listener)  # for the driver that leases it
        worker.run()
        worker.wind_up()
    except (ConnectionClosed, exceptions.RaySystemError):
        pass
