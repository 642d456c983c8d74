"""An actor process: one instance of the user's class, serving the calls sent to it.

Runs in: actor processes (forked by the scheduler, named ``shmray::ClassName``).

Calls arrive two ways: straight from their callers over direct channels (``_direct``: a
listening socket, one connection per calling process; calls without refs among their
arguments), and forwarded by the scheduler (the rest, in each caller's order).  Results go back
the way their call came (``Worker.report``).  Here they run:

- sync actor (``max_concurrency=1``): one call at a time, in arrival order, on the main thread,
  which also reads its sockets between calls (at most every 0.5 ms while calls are queued);
  replies wait for the next one while calls are queued, a millisecond at most, parked in
  shared memory meanwhile: should a later call crash the actor, the calls that finished keep
  their results (``Worker.report``);
- threaded actor (sync methods, ``max_concurrency > 1`` or concurrency groups): calls run on
  a pool of that many threads, one pool per concurrency group, while the main thread reads;
  a thread blocked in ``get`` lets the main thread read for it (the runtime's
  leader/followers reading);
- async actor (any ``async def`` method): asyncio loops (``_actor_async``); the connection is
  one of the main loop's readers; each call is a task, at most ``max_concurrency`` (Ray's
  default 1000) at once, on its concurrency group's loop; ``await ref`` inside a method is
  resolved by READY messages that the main loop reads, so it never blocks a loop.

``__init__`` runs first (inside the loop for an async actor, so objects like ``asyncio.Event``
bind to it).  If it raises, the actor reports an ``ActorDiedError`` carrying the error and
exits; the scheduler fails every call with it.  ``exit_actor()`` ends the actor after the
current call, and the scheduler does not restart it.  A graceful end runs
``__ray_shutdown__`` and then the actor's atexit handlers (``actor_main``).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import functools
import inspect
import os
import threading
import time

from . import (
    _accelerators,
    _actor_async,
    _context,
    _direct,
    _events,
    _output,
    _pickling,
    _protocol as P,
    _runtime,
    _slot,
    _threads,
    exceptions,
)
from ._actor_instance import bound_method, init_failed, run_shutdown_hook
from ._context import Call, current_call, current_task
from ._connection import ConnectionClosed
from ._object_ref_generator import DynamicObjectRefGenerator
from ._serialization import META_ERROR, serialize, short_repr
from ._task_results import (
    arguments,
    cancelled_results,
    error_results,
    flush_output,
    report_item,
    should_retry,
    store_returns,
    task_error,
)
from ._worker import ParkedReports, Worker, record_end

_CANCELLED_EARLY_KEPT = 10_000  # cancels remembered for direct calls not arrived (yet)
_POLL_INTERVAL = 0.0005  # while calls are queued, look for new messages this often
_NO_FAILURE = (0, None)  # what a call that did not fail records (``_events``)


class ActorProcess(Worker):
    """The actor's loop; method calls reuse the worker's argument and result handling."""

    # Any process may call an actor, and owns its direct calls: their results go to it
    # alone, but for those it can't use at once, and those in the arena, which the
    # scheduler hears of from here first (``Worker.report``).
    reports_arena = True
    hold_reports = False
    names_parent = False
    direct_shapes = {P.CALL: P.CALL_FIELDS}
    parkable = frozenset((P.DIRECT_DONE, P.HOLD, P.RELEASE))

    def __init__(self, runtime: _runtime.Runtime, start_message: tuple, slot=None):
        super().__init__(runtime)
        self.parking = ParkedReports(slot, self.parkable)  # slot: shared with the scheduler
        runtime.link.after_flush = self.parking.clear
        _, self.spec, pickled_class, self.init_values, restarted, gpu_ids = start_message
        options = self.spec[P.ACTOR_OPTIONS]
        self.class_name = self.spec[P.ACTOR_CLASS_NAME]
        self.actor_id = self.spec[P.ACTOR_ID]
        os.environ.update(options.get("env_vars") or {})  # runtime_env, for the actor's life
        # Its GPUs, for its life, set once: its methods may change the variable (Ray's rule).
        current_task.gpu_ids = gpu_ids
        _accelerators.start(gpu_ids)
        # Before the class loads: a library it imports reads OMP_NUM_THREADS as it loads.
        _threads.fit(options["hold"], options.get("env_vars"))
        self.cls = _pickling.loads(pickled_class)
        self.is_async = options["is_async"]
        self.max_concurrency = options["max_concurrency"]
        self.concurrency_groups = options.get("concurrency_groups") or {}
        self.groups: dict = {}  # an async actor's (``_actor_async``)
        self.instance = None
        self.methods: dict = {}  # name -> the instance's bound method (``_method``)
        self.exit_requested = False
        self.running_calls: dict = {}  # task id -> asyncio.Task (async actors)
        self.running: set = set()      # task ids of the calls running now
        self.canceled: set = set()     # ...of those cancelled (is_canceled; a sync call runs on)
        self.hold = options["hold"]    # what the actor holds: get_assigned_resources()
        self.consumed_events: dict = {}  # task id -> asyncio.Event (async generators)
        self.wake = None               # async actors: schedules the queued calls on the loop
        current_task.actor_id = self.actor_id
        current_task.actor_options = options
        current_task.restarted = restarted
        current_task.placement = options.get("placement")
        current_task.actor_class = self.cls
        current_task.in_asyncio_actor = self.is_async
        _context.is_canceled = self._is_canceled
        _output.set_name(self.class_name)
        runtime.link.blocked_hook = None  # an actor holds no CPU it could lend
        # An async actor's event loop reads only its own sockets: it calls others through the
        # scheduler.
        runtime.channels.enabled = not self.is_async
        self.cancelled_early: dict = {}  # cancels that overtook their direct call (ordered)
        # A sync actor with more calls queued holds replies back a little (see Worker).
        self.batch_replies = (not self.is_async and self.max_concurrency == 1
                              and not self.concurrency_groups)
        self.last_poll = 0.0
        self.listen(_direct.listen(_direct.address(runtime.socket_dir, self.actor_id)))

    def _take_direct(self, message: tuple, origin) -> None:
        task_id = message[1]
        if task_id in self.cancelled_early:
            del self.cancelled_early[task_id]
            self.origins[task_id] = origin
            _events.failed_unrun(task_id, message[3], _events.TASK_CANCELLED, None,
                                 _events.ACTOR_TASK, self.actor_id)
            self.report(task_id, cancelled_results(task_id, message[6]), False)
            return
        super()._take_direct(message, origin)

    def poll_now_and_then(self) -> None:
        """Handle new messages before the next queued call, at most every
        ``_POLL_INTERVAL`` while calls are queued (a poll is a system call or two)."""
        now = time.monotonic()
        if not self.queue or now - self.last_poll > _POLL_INTERVAL:
            self.last_poll = now
            self.runtime.link.poll()

    def handlers(self) -> dict:
        return {P.CALL: self._on_call, P.CANCEL_CALL: self._cancel, P.EXIT: self._on_exit,
                P.CONSUMED: self._on_consumed}

    def _on_call(self, *fields) -> None:
        self.take_work((P.CALL, *fields))

    def take_work(self, message: tuple) -> None:
        self.queue.append(message)
        if self.wake is not None:  # async: a call read by a get inside a coroutine
            self.wake()

    def _is_canceled(self, task_id: bytes) -> bool:
        """Whether the call was cancelled: a cancel may wait unread while a sync call runs
        (the thread that reads runs it), so what has arrived is read first."""
        if task_id not in self.canceled:
            with self.runtime.link.lock:
                self.runtime.link.poll()
        return task_id in self.canceled

    def _cancel(self, task_id: bytes) -> None:
        """Drop a call not started yet; cancel a running async one; a running sync call
        finishes (Ray cannot interrupt those either)."""
        for queue in (self.queue, *(group.waiting for group in self.groups.values())):
            for message in queue:
                if message[1] == task_id:
                    queue.remove(message)
                    _events.failed_unrun(task_id, message[3], _events.TASK_CANCELLED, None,
                                         _events.ACTOR_TASK, self.actor_id)
                    self.report(task_id, cancelled_results(task_id, message[6]), False)
                    return
        if task_id in self.running:
            self.canceled.add(task_id)  # a sync call runs on, but can ask (is_canceled)
        running = self.running_calls.get(task_id)
        if running is not None:  # a task of the main loop (a group's call is wrapped there)
            running.get_loop().call_soon_threadsafe(running.cancel)
        elif self.listener is not None:
            # A direct call still on its way, perhaps; the oldest such call is long done.
            if len(self.cancelled_early) >= _CANCELLED_EARLY_KEPT:
                del self.cancelled_early[next(iter(self.cancelled_early))]
            self.cancelled_early[task_id] = None

    # -- construction ------------------------------------------------------------------

    def construct(self) -> bool:
        """Run __init__; report how it went.  False if it raised."""
        spec = self.spec
        name = f"{self.class_name}.__init__"
        began = _events.started(self.actor_id[:24], name, _events.ACTOR_CREATION_TASK,
                                self.actor_id)
        try:
            args, kwargs = arguments(self.runtime, spec[P.ACTOR_ARGS], spec[P.ACTOR_ARG_IDS],
                                     self.init_values)
            self.instance = self.cls(*args, **kwargs)
        except BaseException as exc:
            _events.ended(self.actor_id[:24], name, began, _events.ACTOR_CREATION_TASK,
                          self.actor_id, _events.ACTOR_CREATION_FAILED,
                          _events.error_message(exc))
            died = init_failed(self.class_name, exc)
            self.runtime.send(P.actor_started(serialize(died, META_ERROR).to_bytes()))
            self.runtime.flush()
            return False
        finally:
            flush_output()
        _events.ended(self.actor_id[:24], name, began, _events.ACTOR_CREATION_TASK,
                      self.actor_id)
        self.runtime.send(P.actor_started(None))
        self.runtime.flush()
        return True

    # -- one call ------------------------------------------------------------------------

    def call(self, message: tuple):
        """Run one CALL message; returns TASK_DONE's (results, retryable)."""
        _, task_id, method_name, name, args_blob, arg_ids, num_returns, values, extra = message
        self.running.add(task_id)
        call = current_call.set(Call(task_id, name, method_name, self.hold))
        began, failure = time.time(), _NO_FAILURE
        if self.batch_replies and self.parking.slot is not None:
            _slot.mark_started(self.parking.slot, task_id, began)  # one at a time: ``_slot``
        else:
            _events.started(task_id, name, _events.ACTOR_TASK, self.actor_id, began)
        try:
            if method_name == "__ray_ready__":
                outcome = True
            elif method_name == "__ray_terminate__":
                self.exit_requested = True
                outcome = None
            else:
                args, kwargs = arguments(self.runtime, args_blob, arg_ids, values)
                outcome = self._method(method_name)(*args, **kwargs)
                del args, kwargs
            return self._exited_or(task_id, num_returns) or \
                (self._results(task_id, outcome, num_returns, name, extra), False)
        except BaseException as exc:
            failure = (_events.error_code(exc), _events.error_message(exc))
            return self._exited_or(task_id, num_returns, exc) or \
                self._error_results(task_id, exc, num_returns, name, extra)
        finally:
            if self.batch_replies:  # logged once reported (``record_end``)
                self.ending = (task_id, name, began, time.time(), _events.ACTOR_TASK,
                               self.actor_id, failure, self.parking.slot)
            else:
                _events.ended(task_id, name, began, _events.ACTOR_TASK, self.actor_id,
                              *failure)
            current_call.reset(call)
            self.running.discard(task_id)
            self.canceled.discard(task_id)
            flush_output()

    def _method(self, name: str):
        return bound_method(self.instance, name, self.methods)

    def _exited_or(self, task_id, num_returns, exc=None):
        """If exit_actor() or sys.exit() was called during this call: the caller sees the
        actor's death (Ray: 'observes the actor's death rather than a return value')."""
        how = "exit_actor()" if current_task.exit_requested else "sys.exit()"
        if not current_task.exit_requested and not isinstance(exc, SystemExit):
            return None
        current_task.exit_requested = False
        self.exit_requested = True
        died = exceptions.ActorDiedError(
            f"The actor {self.class_name} exited: {how} was called in this call")
        return error_results(task_id, died, num_returns), False

    async def call_async(self, message: tuple):
        import asyncio  # only here: see _actor_async.run

        _, task_id, method_name, name, args_blob, arg_ids, num_returns, values, extra = message
        if method_name in ("__ray_ready__", "__ray_terminate__"):
            return self.call(message)
        self.running.add(task_id)
        current_call.set(Call(task_id, name, method_name, self.hold))  # this asyncio task's
        began = _events.started(task_id, name, _events.ACTOR_TASK, self.actor_id)
        failure = _NO_FAILURE
        try:
            args, kwargs = arguments(self.runtime, args_blob, arg_ids, values)
            outcome = self._method(method_name)(*args, **kwargs)
            del args, kwargs
            if inspect.isawaitable(outcome):
                outcome = await outcome
            elif num_returns < 0 and inspect.isasyncgen(outcome):
                outcome = await self._generate_async(task_id, outcome, num_returns, extra)
                num_returns = 1
            return self._exited_or(task_id, num_returns) or \
                (self._results(task_id, outcome, num_returns, name, extra), False)
        except asyncio.CancelledError:
            failure = (_events.TASK_CANCELLED, None)
            return cancelled_results(task_id, num_returns), False
        except BaseException as exc:
            failure = (_events.error_code(exc), _events.error_message(exc))
            return self._exited_or(task_id, num_returns, exc) or \
                self._error_results(task_id, exc, num_returns, name, extra)
        finally:
            _events.ended(task_id, name, began, _events.ACTOR_TASK, self.actor_id, *failure)
            self.running.discard(task_id)
            self.canceled.discard(task_id)
            flush_output()

    def _results(self, task_id, outcome, num_returns, name, extra):
        if num_returns < 0:  # a generator method: it runs as its items are stored
            outcome = self._generate(task_id, outcome, num_returns, name, extra)
        return store_returns(self.runtime, task_id, outcome, max(num_returns, 1), name)

    async def _generate_async(self, task_id, items, num_returns, extra):
        """An async generator method's items, as ``_generate`` does a generator's; waits
        for its caller on the loop, not in poll()."""
        import asyncio  # only here: see _actor_async.run

        if num_returns == P.DYNAMIC:
            return DynamicObjectRefGenerator([self.runtime.put(value) async for value in items])
        backpressure = (extra or {}).get("backpressure", -1)
        index = 0
        try:
            async for value in items:
                report_item(self.runtime, task_id, index, value)
                index += 1
                while backpressure > 0 and index - self.consumed.get(task_id, 0) >= backpressure:
                    event = asyncio.Event()
                    self.consumed_events[task_id] = (asyncio.get_running_loop(), event)
                    await event.wait()
        finally:
            self.consumed_events.pop(task_id, None)
            self.consumed.pop(task_id, None)
        return index

    def _on_consumed(self, task_id: bytes, count: int) -> None:
        super()._on_consumed(task_id, count)
        waiting = self.consumed_events.get(task_id)
        if waiting is not None:  # an async generator waits, on its group's loop
            loop, event = waiting
            loop.call_soon_threadsafe(event.set)

    def _error_results(self, task_id, exc, num_returns, name, extra):
        """(results, retryable): the call's error, and whether its retry_exceptions cover it
        (the scheduler then runs it again, while it has max_task_retries)."""
        if isinstance(exc, KeyboardInterrupt):  # as in a task: the call was cancelled
            return cancelled_results(task_id, num_returns), False
        retryable = bool(extra) and should_retry(exc, extra.get("retry_exceptions"))
        error = task_error(name, exc, self.instance_repr(), self.actor_id.hex())
        return error_results(task_id, error, num_returns), retryable

    def instance_repr(self) -> str:
        """The actor's repr, for the header of its methods' errors (Ray's ``repr=``)."""
        return short_repr(self.instance)

    def shut_down(self) -> None:
        """A graceful end: the instance's ``__ray_shutdown__``, if it has one (an exception
        in it is printed, not raised: nobody waits for it)."""
        run_shutdown_hook(self.instance, self.class_name)

    def _reported(self) -> None:
        if self.exit_requested:
            self.runtime.send(P.actor_exiting())

    # -- the loops -------------------------------------------------------------------------

    def run(self) -> None:
        if self.is_async:
            _actor_async.run(self)
        elif self.max_concurrency > 1 or self.concurrency_groups:
            self._run_threaded()
        else:
            self._run_sync()

    def _next_call(self):
        """The next CALL, reading the connection if none is queued; None when it's over."""
        queue = self.queue
        if queue and not self.exit_requested and (
                time.monotonic() - self.last_poll <= _POLL_INTERVAL):
            return queue.popleft()  # no look for messages due: nothing to hold the lock for
        runtime = self.runtime
        with runtime.link.lock:
            try:
                self.poll_now_and_then()  # a CANCEL_CALL may be waiting behind queued calls
                runtime.link.wait_until(lambda: self.queue or self.exiting or self.exit_requested,
                                    None)
            except exceptions.RaySystemError:
                return None
            if self.exit_requested or not self.queue:
                return None
            return self.queue.popleft()

    def _run_sync(self) -> None:
        if not self.construct():
            return
        while True:
            message = self._next_call()
            if message is None:
                return
            results, retryable = self.call(message)
            self.report(message[1], results, retryable)
            record_end(self)

    def _run_threaded(self) -> None:
        """Calls on threads: ``max_concurrency`` for the default group, and each concurrency
        group's own, so a group whose calls block never holds up another."""
        if not self.construct():
            return
        pools = {name: concurrent.futures.ThreadPoolExecutor(
                     max_workers=limit, thread_name_prefix=f"shmray-{self.class_name}-{name}")
                 for name, limit in [(None, self.max_concurrency),
                                     *self.concurrency_groups.items()]}
        try:
            while True:
                message = self._next_call()
                if message is None:
                    return
                pools.get(_actor_async.group_of(message), pools[None]).submit(
                    self._call_and_report, message)
        finally:
            for pool in pools.values():
                pool.shutdown(wait=True)

    def _call_and_report(self, message) -> None:
        results, retryable = self.call(message)
        try:
            self.report(message[1], results, retryable)
        except exceptions.RaySystemError:
            pass
        if self.exit_requested:
            self.runtime.link.wake_waiters()


def _keep(queue, opcode: int, *fields) -> None:
    queue.append((opcode, *fields))


def actor_main(conn, store, session_dir: str, options: dict, slot=None) -> None:
    _output.redirect(options.get("log_to_driver", True),
                     os.path.join(session_dir, "logs"), "actor")
    runtime = _runtime.Runtime(store, conn, session_dir, options)
    _context.install(runtime)
    _events.start(getattr(slot, "events", None), options["task_events"])
    atexit._clear()  # the handlers it inherited are its parent's, never to run here
    actor = None
    try:
        start = collections.deque()  # START_ACTOR, and what arrives with it (calls, cancels)
        for opcode in (P.START_ACTOR, P.CALL, P.CANCEL_CALL, P.EXIT):
            runtime.link.handlers[opcode] = functools.partial(_keep, start, opcode)
        with runtime.link.lock:
            runtime.link.wait_until(lambda: start, None)
        message = start.popleft()
        actor = ActorProcess(runtime, message, slot)  # its handlers replace those
        for early in start:
            runtime.link.handle(early)
        actor.run()
        actor.wind_up()
    except (ConnectionClosed, exceptions.RaySystemError):
        pass
    # Not killed: a graceful end (exit_actor, __ray_terminate__, its handles gone, the
    # session ending).  Its cleanup runs, within the grace period.
    deadline = threading.Timer(options.get("graceful_shutdown_s", 30.0), os._exit, (1,))
    deadline.daemon = True
    deadline.start()
    if actor is not None:
        actor.shut_down()
    atexit._run_exitfuncs()  # the actor's own: those it inherited were cleared at start
