"""A worker: runs one task at a time, sent by the scheduler.

Runs in: worker processes (forked by the scheduler).

For each EXECUTE: load the function (cached by id; its code arrives with the first task that
uses it), rebuild the arguments, resolving each top-level ``ArgRef`` to its value (inline bytes
from the message, or a zero-copy view of the arena), run, and write each return value: a small
one goes back inline in TASK_DONE, a large one straight into its arena block.  An exception
becomes a ``RayTaskError`` carrying the cause and the formatted traceback, stored as the value
of every return (inline, so dependents can be failed with it without reading the arena).

While the task waits in ``get``/``wait`` the worker tells the scheduler (BLOCKED/UNBLOCKED), so
its CPU can run other tasks meanwhile: nested tasks never deadlock a small pool.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import traceback
from typing import Optional

import cloudpickle
import setproctitle

from . import _output, _protocol as P, _runtime, exceptions
from ._connection import ConnectionClosed
from ._ids import object_id_for_return
from ._serialization import META_ERROR, deserialize, serialize


class TaskContext:
    """What ``get_runtime_context()`` reports inside a task."""

    def __init__(self):
        self.task_id: Optional[bytes] = None
        self.name: Optional[str] = None
        self.actor_id: Optional[bytes] = None
        self.exit_requested = False  # exit_actor() was called, whether or not it was caught


current_task = TaskContext()


class Worker:
    def __init__(self, runtime: _runtime.Runtime, cancel_slot=None):
        self.runtime = runtime
        self.cancel_slot = cancel_slot  # the scheduler names the task a SIGINT is for here
        self.skip: set = set()          # ids of tasks sent ahead, then cancelled
        self.functions: dict = {}
        self.queue: collections.deque = collections.deque()
        self.exiting = False
        # SIGINT is how the scheduler cancels the running task; it is only acted on while
        # user code runs, so a signal that arrives as a task ends can't hit anything else
        # (the scheduler sends the next task only after this one's TASK_DONE).
        self.in_user_code = False
        self.cancelled = False
        self.cancel_pending = False
        runtime.on_message = self.on_message
        runtime.blocked_hook = self._blocked
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        slot = self.cancel_slot
        if slot is not None and slot[:24] != current_task.task_id:
            return  # meant for a task this worker has finished already
        if current_task.task_id is not None and not self.in_user_code:
            self.cancel_pending = True  # loading the function or arguments: stop before it runs
            return
        if self.in_user_code:
            self.cancelled = True
            raise KeyboardInterrupt("task cancelled")

    def on_message(self, message: tuple) -> None:
        if message[0] == P.EXECUTE:
            self.queue.append(message)
        elif message[0] == P.CANCEL_CALL:
            self.skip.add(message[1])
        elif message[0] == P.EXIT:
            self.exiting = True

    def _blocked(self, blocked: bool) -> None:
        if current_task.task_id is not None:
            self.runtime.conn.send((P.BLOCKED,) if blocked else (P.UNBLOCKED,))
            if not blocked:  # the task computes again now: its CPU must not be lent out
                try:
                    self.runtime.conn.flush()
                except ConnectionClosed:
                    pass

    def run(self) -> None:
        runtime = self.runtime
        while True:
            with runtime._lock:
                try:
                    runtime._wait_until(lambda: self.queue or self.exiting, None)
                except exceptions.RaySystemError:
                    return  # the scheduler is gone: nothing left to do
                if self.exiting and not self.queue:
                    return
                runtime.poll()  # a cancel may have arrived for the task sent ahead
                message = self.queue.popleft()
            if message[1] in self.skip:
                self.skip.discard(message[1])
                results, retryable = _cancelled_results(message[1], message[7]), False
            else:
                results, retryable = self.execute(*message[1:])
            runtime.send((P.TASK_DONE, message[1], results, retryable))
            try:
                runtime.flush()
            except exceptions.RaySystemError:
                return

    def execute(self, task_id, fn_id, pickled, name, args_blob, arg_ids, num_returns, values,
                retry_exceptions, extra=None):
        restore = _apply_env(extra["env_vars"]) if extra and extra.get("env_vars") else None
        try:
            return self._execute(task_id, fn_id, pickled, name, args_blob, arg_ids,
                                 num_returns, values, retry_exceptions)
        finally:
            if restore is not None:
                restore()

    def _execute(self, task_id, fn_id, pickled, name, args_blob, arg_ids, num_returns, values,
                 retry_exceptions):
        self.cancel_pending = False
        self.cancelled = False
        current_task.task_id = task_id
        current_task.name = name
        _output.set_name(name)
        retryable = False
        try:
            fn = self.functions.get(fn_id)
            if fn is None:
                fn = self.functions[fn_id] = cloudpickle.loads(pickled)
            args, kwargs = self._arguments(args_blob, arg_ids, values)
            self.in_user_code = True
            try:
                if self.cancel_pending:
                    self.cancelled = True
                    raise KeyboardInterrupt("task cancelled")
                outcome = fn(*args, **kwargs)
            finally:
                self.in_user_code = False
            del args, kwargs
            results = self._store_returns(task_id, outcome, num_returns, name)
        except BaseException as exc:  # the task's failure is its result
            retryable = _should_retry(exc, retry_exceptions) and not self.cancelled
            if self.cancelled and isinstance(exc, KeyboardInterrupt):
                error = exceptions.TaskCancelledError(task_id.hex())
            else:
                error = task_error(name, exc)
            results = error_results(task_id, error, num_returns)
        finally:
            current_task.task_id = None
            sys_flush()
        return results, retryable

    def _arguments(self, args_blob, arg_ids, values):
        args, kwargs = deserialize(memoryview(args_blob))
        if not arg_ids:
            return args, kwargs
        resolved = [self.runtime.value_at(object_id, values.get(object_id, (None, b"")))
                    for object_id in arg_ids]
        args = [resolved[a.index] if type(a) is P.ArgRef else a for a in args]
        kwargs = {k: resolved[v.index] if type(v) is P.ArgRef else v for k, v in kwargs.items()}
        return args, kwargs

    def _store_returns(self, task_id: bytes, outcome, num_returns: int, name: str):
        """Each return value stored; if one fails, those stored before it are deleted."""
        results = []
        try:
            for i, value in enumerate(_split_returns(outcome, num_returns, name)):
                results.append(self._store_return(object_id_for_return(task_id, i), value))
        except BaseException:
            for object_id, data, _, _ in results:
                if data is None:
                    self.runtime.store.delete(object_id)
            raise
        return results

    def _store_return(self, object_id: bytes, value):
        serialized = serialize(value)
        data = self.runtime.store_object(object_id, serialized)
        return (object_id, data, serialized.metadata, serialized.contained_refs)


def error_results(task_id: bytes, error: BaseException, num_returns: int):
    """TASK_DONE results that make every return of the task raise ``error``.

    Refs pickled inside the exception are reported as contained, so the objects they name
    live as long as the error does.
    """
    serialized = serialize(error, META_ERROR)
    data = serialized.to_bytes()
    return [(object_id_for_return(task_id, i), data, META_ERROR, serialized.contained_refs)
            for i in range(max(num_returns, 1))]


def _apply_env(env_vars: dict):
    """Set runtime_env's env_vars for one task; returns what puts the old values back."""
    previous = {name: os.environ.get(name) for name in env_vars}
    os.environ.update(env_vars)

    def restore():
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return restore


def _cancelled_results(task_id: bytes, num_returns: int):
    return error_results(task_id, exceptions.TaskCancelledError(task_id.hex()), num_returns)


def _split_returns(outcome, num_returns: int, name: str):
    if num_returns == 1:
        return [outcome]
    if num_returns == 0:
        return [None]  # the hidden return the scheduler tracks; nobody holds a ref to it
    try:
        values = list(outcome)
    except TypeError:
        values = None
    if values is None or len(values) != num_returns:
        raise ValueError(
            f"{name}() was declared with num_returns={num_returns} but returned "
            f"{type(outcome).__name__} "
            f"{'of length %d' % len(values) if values is not None else 'that is not a sequence'}"
        )
    return values


def _should_retry(exc: BaseException, retry_exceptions) -> bool:
    if not retry_exceptions:
        return False
    if retry_exceptions is True:
        return isinstance(exc, Exception)
    return isinstance(exc, tuple(retry_exceptions))


def task_error(name: str, exc: BaseException) -> exceptions.RayError:
    """The error to store for a task that raised ``exc``."""
    if isinstance(exc, exceptions.RayTaskError):
        # A failure that reached us from a nested get: keep the original function and cause
        # (so ``except TheirError`` still works), and add where it passed through here.
        here = "".join(traceback.format_tb(exc.__traceback__))
        trail = f"{exc.traceback_str.rstrip()}\n\nwhich reached {name}() through get():\n{here}"
        exc.__traceback__ = None
        return exceptions.RayTaskError(exc.function_name, trail, exc.cause, exc.proctitle,
                                       exc.pid)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    cause = exc
    try:
        cloudpickle.loads(cloudpickle.dumps(exc))
    except Exception:
        cause = exceptions.portable_exception(exc)  # rebuilt from args and __dict__
        if cause is None:
            cause = exceptions.UnserializableException(text)
    exc.__traceback__ = None
    return exceptions.RayTaskError(name, text, cause, setproctitle.getproctitle(), os.getpid())


def sys_flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def worker_main(conn, store, session_dir: str, options: dict, cancel_slot=None) -> None:
    _output.redirect(options.get("log_to_driver", True),
                     os.path.join(session_dir, "logs"), "worker")
    runtime = _runtime.Runtime(store, conn, session_dir, options)
    _runtime.install(runtime)
    try:
        Worker(runtime, cancel_slot).run()
    except ConnectionClosed:
        pass
