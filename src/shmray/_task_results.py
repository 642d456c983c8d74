"""What a task or actor call takes and gives: its arguments rebuilt, its outcome turned
into results (its return values stored, or its error).

Runs in: worker and actor processes.

A result is ``(object_id, data, metadata, contained)``, as TASK_DONE carries it: ``data`` is
the serialized value for a small one, or ``IN_ARENA`` for one written straight into its
arena block (``Objects.store_object``); ``contained`` are the ids of refs pickled inside.
A failure is stored as the value of every return: a ``RayTaskError`` carrying the cause and
the formatted traceback, inline, so dependents can be failed with it without reading the
arena.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

from . import _context, _lend, _pickling, _protocol as P, exceptions
from ._context import cancel_point
from ._ids import first_return_id, object_id_for_return
from ._object_ref_generator import DynamicObjectRefGenerator
from ._runtime import IN_ARENA
from ._serialization import (
    META_ERROR,
    META_VALUE,
    SCALARS,
    deserialize_inline,
    scalars_to_bytes,
    serialize,
)


def arguments(runtime, args_blob, arg_ids, values):
    """The call's (args, kwargs), each top-level ``ArgRef`` resolved to its value: inline
    bytes sent with the call, or a zero-copy view of the arena."""
    args, kwargs = deserialize_inline(args_blob)
    if not arg_ids:
        return args, kwargs
    resolved = [runtime.value_at(object_id, values.get(object_id, (None, b"")))
                for object_id in arg_ids]
    args = [resolved[a.index] if type(a) is P.ArgRef else a for a in args]
    kwargs = {k: resolved[v.index] if type(v) is P.ArgRef else v for k, v in kwargs.items()}
    return args, kwargs


def store_returns(runtime, task_id: bytes, outcome, num_returns: int, name: str,
                  handed_over: bool = False):
    """Each return value stored; if one fails, those stored before it are deleted.
    An array ``handed_over`` by the task (see _lend) may become its object uncopied."""
    if num_returns == 1 and type(outcome) in SCALARS:  # the most common result
        return [(first_return_id(task_id), scalars_to_bytes(outcome), META_VALUE, ())]
    if num_returns == 1 and handed_over and _lend.adopt(first_return_id(task_id), outcome,
                                                         META_VALUE):
        return [(first_return_id(task_id), IN_ARENA, META_VALUE, ())]
    results = []
    try:
        for i, value in enumerate(split_returns(outcome, num_returns, name)):
            results.append(_store_return(runtime, object_id_for_return(task_id, i), value))
    except BaseException:
        for object_id, data, _, _ in results:
            if data is None:
                runtime.store.delete(object_id)
        raise
    return results


def _store_return(runtime, object_id: bytes, value):
    serialized = serialize(value)
    hold(runtime, serialized.contained_refs)
    data = runtime.store_object(object_id, serialized)
    return (object_id, data, serialized.metadata, serialized.contained_refs)


_KEPT_BYTES = 16 << 10  # of one value kept inline by RecentResults: 1 MiB for 64 at most


class RecentResults:
    """The latest results of the tasks this worker ran: those of the tasks the scheduler
    sent (``keep``), and the last task's whoever sent it (``last``: a driver sends a task
    right behind the one making its argument, ``_runtime.leases``).  A task sent ahead
    behind the tasks making its arguments (``_scheduler.dispatch``) finds them here, its
    EXECUTE naming them with None for a value.  Not errors (a dependent of a failed task
    fails as it would on the usual route), nor results of a failure to be retried, nor
    values holding refs (the scheduler must count those first), nor values of over
    ``_KEPT_BYTES`` (a worker would hold megabytes): a task lacking one goes back unrun."""

    __slots__ = ("values", "limit", "last")

    def __init__(self, limit: int = 64):  # well beyond the tasks sent ahead to a worker
        self.values: dict = {}  # object id -> (data, metadata); data IN_ARENA: sealed there
        self.limit = limit
        self.last = ()  # the results of the task run last; () if it will be retried

    def keep(self, results) -> None:
        values = self.values
        for object_id, data, metadata, contained in results:
            if _keepable(data, metadata, contained):
                values[object_id] = (data, metadata)
        while len(values) > self.limit:
            del values[next(iter(values))]  # the oldest

    def fill(self, arguments: dict) -> bool:
        """Fill in the arguments a task sent ahead is to find here; False if one is not
        (its task failed or will be retried, or it is long gone)."""
        values = self.values
        for object_id, location in arguments.items():
            if location is None:
                location = values.get(object_id) or self._in_last(object_id)
                if location is None:
                    return False
                arguments[object_id] = location
        return True

    def _in_last(self, object_id: bytes):
        for result_id, data, metadata, contained in self.last:
            if result_id == object_id and _keepable(data, metadata, contained):
                return (data, metadata)
        return None


def _keepable(data, metadata: bytes, contained) -> bool:
    return (not contained and metadata != META_ERROR
            and (data is IN_ARENA or len(data) <= _KEPT_BYTES))


# -- generator tasks ------------------------------------------------------------------------

_END = object()


def items_of(outcome, name: str):
    """The iterator a generator task's items come from."""
    try:
        return iter(outcome)
    except TypeError:
        raise TypeError(
            f"{name}() has num_returns='streaming' or 'dynamic' but returned "
            f"{type(outcome).__name__}, not a generator: make it yield its values"
        ) from None


@cancel_point  # the generator's own code runs under it
def _next_item(items):
    return next(items, _END)


def report_item(runtime, task_id: bytes, index: int, value) -> None:
    """Store one item of a streaming task and send it on its way (GENERATED) at once: the
    caller waits for it, and it survives the task's crash a moment later."""
    result = _store_return(runtime, object_id_for_return(task_id, index + 1), value)
    runtime.send(P.generated(task_id, index, result))
    release_held(runtime, (result,))  # after the message that now holds them
    runtime.flush()


def stream_items(runtime, task_id: bytes, items, backpressure: int, consumed) -> int:
    """Run a streaming task's generator: each item reported as it is yielded, the producer
    waiting while ``backpressure`` items are not yet taken by the caller (``consumed(task_id)``
    says how many are).  Returns how many there were."""
    index = 0
    while True:
        value = _next_item(items)
        if value is _END:
            return index
        report_item(runtime, task_id, index, value)
        del value
        index += 1
        if backpressure > 0 and index - consumed(task_id) >= backpressure:
            with runtime.link.lock:
                runtime.link.wait_until(lambda: index - consumed(task_id) < backpressure,
                                        None)


def dynamic_items(runtime, items) -> DynamicObjectRefGenerator:
    """Run a ``num_returns="dynamic"`` task's generator to its end: each item put as it
    comes, the refs returned together."""
    refs = []
    while True:
        value = _next_item(items)
        if value is _END:
            return DynamicObjectRefGenerator(refs)
        refs.append(runtime.put(value))


def error_results(task_id: bytes, error: BaseException, num_returns: int):
    """TASK_DONE results that make every return of the task raise ``error``.

    Refs pickled inside the exception are reported as contained, so the objects they name
    live as long as the error does.
    """
    serialized = serialize(error, META_ERROR)
    hold(_context.runtime, serialized.contained_refs)
    data = serialized.to_bytes()
    return [(object_id_for_return(task_id, i), data, META_ERROR, serialized.contained_refs)
            for i in range(max(num_returns, 1))]


def hold(runtime, ids) -> None:
    """Keep the refs a result holds counted here until the message reporting the result
    is queued (``Worker.report``): the values holding them die as the task returns, and a release
    sent before that message would free objects the result still needs."""
    if runtime is not None:
        for object_id in ids:
            runtime.add_local_ref(object_id, announce=False)


def release_held(runtime, results) -> None:
    for _, _, _, contained in results:
        for object_id in contained:
            runtime.release_later(object_id)


def apply_env(env_vars: dict):
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


def cancelled_results(task_id: bytes, num_returns: int):
    return error_results(task_id, exceptions.TaskCancelledError(task_id.hex()), num_returns)


def split_returns(outcome, num_returns: int, name: str):
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


def should_retry(exc: BaseException, retry_exceptions) -> bool:
    """Whether ``retry_exceptions`` (True, False, or a pickle of the classes it lists:
    ``pickle_retry_exceptions``) covers ``exc``."""
    if not retry_exceptions:
        return False
    if retry_exceptions is True:
        return isinstance(exc, Exception)
    classes = _retry_classes.get(retry_exceptions)
    if classes is None:
        classes = _retry_classes[retry_exceptions] = tuple(_pickling.loads(retry_exceptions))
    return isinstance(exc, classes)


_retry_classes: dict = {}  # the pickle of a retry_exceptions list -> its classes


def task_error(name: str, exc: BaseException, actor_repr: Optional[str] = None,
               actor_id: Optional[str] = None) -> exceptions.RayError:
    """The error to store for a task that raised ``exc``: a RayTaskError holding it and the
    traceback of the user's frames (shmray's are left out, as Ray leaves out its own).  An
    ``exc`` that can't be pickled even by its state becomes a RayError saying so, as in
    Ray.  A RayTaskError raised by a get in the task is the cause like any other: the
    caller still catches the innermost user exception's class."""
    report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    _drop_shmray_frames(report, set())
    text = "".join(report.format())
    cause = exc
    try:
        _pickling.loads(_pickling.trial_dumps(exc))
    except Exception as pickling_error:
        cause = exceptions.portable_exception(exc)  # rebuilt from args and __dict__
        if cause is None:
            cause = exceptions.RayError(
                f"The original cause of the RayTaskError ({type(exc)}) isn't serializable: "
                f"{pickling_error}. Overwriting the cause to a RayError.")
    exc.__traceback__ = None
    return exceptions.RayTaskError(name, text, cause, None, os.getpid(), None, actor_repr,
                                   actor_id)


_SHMRAY_DIR = os.path.dirname(os.path.abspath(exceptions.__file__)) + os.sep


def _drop_shmray_frames(report: traceback.TracebackException, seen: set) -> None:
    """Leave out shmray's frames (the worker loop that called the task, a get inside it),
    in ``report`` and the exceptions chained to it; all of them if no other frame is left
    (the error came from shmray itself, and its frames are what explains it)."""
    if id(report) in seen:
        return
    seen.add(id(report))
    users = [frame for frame in report.stack if not frame.filename.startswith(_SHMRAY_DIR)]
    if users:
        report.stack = traceback.StackSummary.from_list(users)
    grouped = getattr(report, "exceptions", None) or ()  # an ExceptionGroup's
    for chained in (report.__cause__, report.__context__, *grouped):
        if chained is not None:
            _drop_shmray_frames(chained, seen)


def flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
