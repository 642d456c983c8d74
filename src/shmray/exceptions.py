"""The errors a shmray user can see, with Ray's names and bases.

Runs in: every process.

A program that catches ``ray.exceptions.X`` catches ``shmray.exceptions.X`` for the same
reason, so the tree is Ray's.  Each class says when shmray raises it; those marked "never"
exist so that code written for Ray, which names them in ``except`` clauses, runs::

    Exception
     └── RayError                                  never raised itself
          ├── RayTaskError                         a task raised; also an instance of the cause
          ├── RayActorError                        never raised itself
          │    ├── ActorDiedError
          │    └── ActorUnavailableError
          ├── TaskCancelledError
          ├── TaskUnschedulableError
          ├── ActorUnschedulableError
          ├── WorkerCrashedError
          ├── LocalRayletDiedError                 never
          ├── NodeDiedError                        never
          ├── TaskPlacementGroupRemoved
          ├── ActorPlacementGroupRemoved           never
          ├── RaySystemError
          │    ├── RayChannelError                 never
          │    │    └── RayChannelTimeoutError     never (also a TimeoutError)
          │    └── RayCgraphCapacityExceeded       never
          ├── ObjectStoreFullError
          ├── OutOfDiskError
          ├── OutOfMemoryError                     never
          ├── ObjectLostError
          │    ├── ObjectFetchTimedOutError
          │    ├── OwnerDiedError                  never
          │    ├── ObjectFreedError                never
          │    ├── ReferenceCountingAssertionError never (also an AssertionError)
          │    ├── ObjectReconstructionFailedError never
          │    ├── ObjectReconstructionFailedMaxAttemptsExceededError   never
          │    └── ObjectReconstructionFailedLineageEvictedError        never
          ├── GetTimeoutError                      (also a TimeoutError)
          ├── PendingCallsLimitExceeded
          ├── PlasmaObjectNotAvailable             never
          ├── AsyncioActorExit
          ├── RuntimeEnvSetupError                 never
          ├── CrossLanguageError                   never
          ├── ObjectRefStreamEndOfStreamError      never
          ├── OufOfBandObjectRefSerializationException              never
          ├── AuthenticationError                  never
          └── UnserializableException

Remote failures keep their remote traceback as text (CPython's
``concurrent.futures.process._ExceptionWithTraceback`` does the same): the traceback
object itself cannot cross a process boundary.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from . import _pickling, _serialization


class RayError(Exception):
    """Base of every shmray error.  Not raised itself; made only as the ``cause`` of a
    RayTaskError whose exception couldn't be pickled (with Ray's text saying so)."""


class RayTaskError(RayError):
    """A task or actor method raised an exception.

    ``get`` raises it as an instance of both ``RayTaskError`` and the class of the user's
    exception (``as_instanceof_cause``), so ``except ValueError`` and ``except RayTaskError``
    both catch it.  ``cause`` is the user's exception, rebuilt in the caller's process when
    it could be pickled there.  ``str()`` is Ray's: a ``ray::f() (pid=..., ip=...)`` header
    (with the actor's id and repr for an actor's method) over the traceback of the user's
    frames.
    """

    def __init__(
        self,
        function_name: str,
        traceback_str: str,
        cause: Optional[BaseException] = None,
        proctitle: Optional[str] = None,
        pid: Optional[int] = None,
        ip: Optional[str] = None,
        actor_repr: Optional[str] = None,
        actor_id: Optional[str] = None,
    ):
        self._cause_by_state = isinstance(cause, _PortableCause)
        if self._cause_by_state:
            cause = cause.exc
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.proctitle = proctitle or f"ray::{function_name}"
        self.pid = pid or os.getpid()
        self.ip = ip or NODE_IP
        self.actor_repr = actor_repr
        self.actor_id = actor_id
        super().__init__(function_name, traceback_str)

    def __reduce__(self):
        return _rebuild_task_error, self._fields(dual=False)

    def _fields(self, dual: bool) -> tuple:
        """What rebuilds this error elsewhere.  The cause travels as a pickle of its own: a
        process that can't rebuild it (its class is in a module only the task's process
        has) still gets the task's name, header and traceback (``_rebuild_task_error``)."""
        cause = self.cause
        if getattr(self, "_cause_by_state", False):
            cause = _PortableException(cause)
        try:
            pickled_cause = _pickling.dumps(cause)
        except Exception:
            pickled_cause = None
        return (self.function_name, self.traceback_str, pickled_cause, self.proctitle,
                self.pid, dual, type(self.cause).__name__, self.ip, self.actor_repr,
                self.actor_id)

    def header(self) -> str:
        """``ray::f() (pid=1234, ip=127.0.0.1)``, as Ray heads a task's traceback."""
        title = self.proctitle if self.proctitle.endswith(")") else f"{self.proctitle}()"
        where = f"pid={self.pid}, ip={self.ip}"
        if self.actor_repr:
            where += f", actor_id={self.actor_id}, repr={self.actor_repr}"
        return f"{title} ({where})"

    def __str__(self) -> str:
        # Each "Traceback (most recent call last):" (one per chained exception) becomes the
        # header, as in Ray; the frames were trimmed to the user's where the error was made.
        if isinstance(self.cause, UnserializableException):
            return str(self.cause)  # Ray raises that one itself: its text, ours inside
        header = self.header()
        lines = [header if line.startswith("Traceback ") else line
                 for line in self.traceback_str.strip().split("\n")]
        if lines[0] != header:  # an ExceptionGroup's ("+ Exception Group Traceback ...")
            lines.insert(0, header)
        return "\n".join(lines)

    def make_dual_exception_instance(self) -> "RayTaskError":
        """This error as an instance of a class deriving from both RayTaskError and the
        user's exception class (the innermost cause's, for a failure that passed through
        other tasks).  Raises TypeError if that class can't be subclassed."""
        user_error = _innermost_cause(self)
        derived = _dual_class(type(user_error))
        try:
            # ExceptionGroup's __new__ needs its message and exceptions back.
            err = derived.__new__(derived, *_args_of(user_error))
        except TypeError:
            err = derived.__new__(derived)
        err.__dict__.update(self.__dict__)
        try:
            user_state = vars(user_error)
        except TypeError:  # a cause without __dict__: __getattr__ reaches its slots
            user_state = {}
        err.__dict__.update({k: v for k, v in user_state.items() if k not in err.__dict__})
        return err

    def as_instanceof_cause(self) -> "RayTaskError":
        """This error as an instance of the user's exception class too; itself, with a
        warning, if that class can't be subclassed (a final class, one whose layout or
        ``__new__`` refuses it): then only ``except RayTaskError`` catches it, and ``cause``
        holds the user's exception."""
        cause = _innermost_cause(self)
        if cause is None or issubclass(RayTaskError, type(cause)):
            return self  # already satisfied
        if isinstance(cause, (SystemExit, KeyboardInterrupt)):
            return self  # raised in the caller, it would end the caller's program
        try:
            return self.make_dual_exception_instance()
        except TypeError as exc:
            _logger.warning(  # logged, as Ray does: a get must raise the task's error
                f"User exception type {type(cause)} in RayTaskError can't be subclassed! "
                "This exception is raised as RayTaskError only. You can use "
                f"`ray_task_error.cause` to access the user exception. Failure in "
                f"subclassing: {exc}")
            return self


_logger = logging.getLogger(__name__)

NODE_IP = "127.0.0.1"  # every process of a session runs on this machine


def _innermost_cause(error: RayTaskError) -> Optional[BaseException]:
    """The user's exception under a failure that passed through other tasks (a task that
    got a failed argument, or whose get raised): each level is a RayTaskError."""
    cause = error.cause
    while isinstance(cause, RayTaskError) and cause.cause is not None:
        cause = cause.cause
    return cause


def _args_of(exc: BaseException) -> tuple:
    try:
        args = exc.args
        return tuple(args) if isinstance(args, (tuple, list)) else ()
    except Exception:  # an ``args`` property that raises
        return ()


_dual_classes: dict = {}


def _dual_class(cause_cls: type) -> type:
    """``RayTaskError(cause_cls)``: a class that is both; TypeError if Python refuses the
    mix (a class marked final, an instance layout conflict with a C base)."""
    derived = _dual_classes.get(cause_cls)
    if derived is not None:
        return derived

    def __reduce__(self):
        return _rebuild_task_error, self._fields(dual=True)

    def __getattr__(self, name):
        # What the user's exception has that wasn't copied (slots): from the cause, as Ray.
        if name == "cause" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(_innermost_cause(self), name)

    name = f"RayTaskError({cause_cls.__name__})"
    derived = type(name, (RayTaskError, cause_cls), {
        "__reduce__": __reduce__,
        "__str__": RayTaskError.__str__,
        "__repr__": lambda self: f"{type(self).__name__}: {RayTaskError.__str__(self)}",
        "__getattr__": __getattr__,
        "__module__": __name__,
        "__qualname__": name,
        "__init__": lambda self, *a, **k: None,
        # Ray's: the dual's args are (cause,); also what keeps a user class whose ``args``
        # is a read-only property from refusing the copy.
        "args": property(lambda self: (self.cause,)),
    })
    _dual_classes[cause_cls] = derived
    return derived


def _rebuild_task_error(function_name, traceback_str, pickled_cause, proctitle, pid, dual,
                        cause_name, ip=None, actor_repr=None, actor_id=None):
    error = RayTaskError(function_name, traceback_str, None, proctitle, pid, ip, actor_repr,
                         actor_id)
    try:
        error.cause = _pickling.loads(pickled_cause) if pickled_cause is not None else None
    except Exception as exc:
        error.cause = UnserializableException(
            f"{type(error).__module__}.{type(error).__name__}: {error}",
            cause_name, f"{type(exc).__name__}: {exc}")
    return error.as_instanceof_cause() if dual else error


class _PortableException:
    """Pickles an exception as its class, args and __dict__, never calling its __init__.

    For exceptions whose constructor doesn't take their ``args`` back (``__init__(self, a, b)``
    calling ``super().__init__(message)``), which plain pickling can't rebuild.
    """

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __reduce__(self):
        exc = self.exc
        return _rebuild_exception, (type(exc), _args_of(exc),
                                    dict(getattr(exc, "__dict__", {})))


def _rebuild_exception(cls, args, state):
    try:
        exc = cls.__new__(cls, *args)  # ExceptionGroup's __new__ needs its arguments
    except TypeError:
        exc = cls.__new__(cls)
    # Through BaseException's own slot: a class may make ``args`` a read-only property.
    BaseException.args.__set__(exc, args)
    exc.__dict__.update(state)
    return exc


def portable_exception(exc: BaseException):
    """``exc`` in a form that pickles (class, args, __dict__), or None if even that fails."""
    try:
        rebuilt = _pickling.loads(_pickling.trial_dumps(_PortableException(exc)))
    except Exception:
        return None
    return _PortableCause(rebuilt)


class _PortableCause:
    """Marks a cause to be pickled by state: see RayTaskError.__reduce__."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class FailedArgument:
    """What the scheduler stores for a task it fails because an argument failed, without
    unpickling that argument's error: it is rebuilt where it is read, as Ray's text for a
    task that got a failed argument (``failed_argument_error``)."""

    def __init__(self, function_name: str, argument_error: bytes):
        self.function_name = function_name
        self.argument_error = argument_error

    def __reduce__(self):
        return failed_argument_error, (self.function_name, self.argument_error)


def failed_argument_error(function_name: str, argument_error: bytes):
    """The error of ``function_name``, which never ran because one of its arguments is an
    error (``argument_error``, serialized): the task's own RayTaskError around a task
    error, as Ray; any other error (a lost object, a crashed worker) as it is."""
    error = _serialization.deserialize_inline(argument_error)
    if not isinstance(error, RayTaskError):
        return error
    return RayTaskError(
        function_name,
        "Traceback (most recent call last):\n"
        "  At least one of the input arguments for this task could not be computed:\n"
        f"{type(error).__module__}.{type(error).__qualname__}: {error}",
        error, pid=error.pid, ip=error.ip)


class RayActorError(RayError):
    """An actor can no longer run calls.  Catch this one: it is never raised itself, only
    its subclasses are (``ActorDiedError``), as in Ray."""

    def __init__(self, message: str = "The actor died unexpectedly before finishing this task."):
        self.error_msg = message
        super().__init__(message)


class ActorDiedError(RayActorError):
    """The actor died (killed, crashed, exited, or its ``__init__`` raised); its calls fail."""


class ActorUnavailableError(RayActorError):
    """A call made while its actor restarts, with no retries left (``max_task_retries``), as
    in Ray: the actor may be back later.  A call with retries waits for it instead."""


class TaskCancelledError(RayError):
    """``get`` of a task that ``cancel`` stopped before it produced a value."""

    def __init__(self, task_id: Optional[str] = None):
        self.task_id = task_id
        super().__init__(task_id)

    def __str__(self) -> str:
        return f"Task {self.task_id} was cancelled." if self.task_id else "The task was cancelled."


class TaskUnschedulableError(RayError):
    """A task asks for resources this machine does not have."""


class ActorUnschedulableError(RayError):
    """An actor asks for resources this machine does not have."""


class WorkerCrashedError(RayError):
    """The worker running a task died (exit code or signal in the message) and retries ran out."""


class LocalRayletDiedError(RayError):
    """Kept for Ray compatibility, never raised: Ray raises it for a task whose node's
    raylet died.  shmray's counterpart, the death of its scheduler process, raises
    ``RaySystemError`` at the call that finds it gone."""


class RaySystemError(RayError):
    """shmray itself can't go on: its scheduler process is gone, the session was shut down
    while a call waited, or a ref outlived its session (or belongs to the parent of a forked
    child); the message says which, and what to do."""


class ObjectStoreFullError(RayError):
    """An object could not be stored: the store is full of objects still in use and none
    could be spilled.  The message gives the request, the capacity and what holds memory."""


class OutOfDiskError(RayError):
    """Spilling an object to disk failed for lack of space."""


class OutOfMemoryError(RayError):
    """Kept for Ray compatibility, never raised: Ray's memory monitor raises it for a task it
    killed to keep the node alive.  shmray has no memory monitor; a worker the kernel's
    OOM killer ends is a ``WorkerCrashedError`` (signal 9) once its retries run out."""


class ObjectLostError(RayError):
    """An object's value is gone and cannot be recovered."""


class ObjectFetchTimedOutError(ObjectLostError):
    """A get waited over two minutes for another process to restore a spilled object from
    disk (Ray raises it when fetching an object from another node takes too long)."""


class OwnerDiedError(ObjectLostError):
    """The object's owner died before it had the object: the result of an actor call that a
    process sent straight to the actor (which answers that process alone), that process
    having passed a ref to it on and died before the answer came.  Every other object
    another process can see is kept by the scheduler, so a maker's death loses nothing."""


class ObjectFreedError(ObjectLostError):
    """Kept for Ray compatibility, never raised: Ray raises it for an object freed with its
    internal ``free()`` API, which shmray does not have."""


class ReferenceCountingAssertionError(ObjectLostError, AssertionError):
    """Kept for Ray compatibility, never raised: Ray raises it for an object freed while
    still referenced, which is a bug.  shmray reports a ref to an object that is gone as
    ``ObjectLostError``."""


class ObjectReconstructionFailedError(ObjectLostError):
    """Kept for Ray compatibility, never raised: Ray raises it when re-running the tasks
    that made a lost object fails.  shmray's objects live in shared memory or its spill
    files, not on nodes that can vanish, and it does not re-run tasks to rebuild one."""


class GetTimeoutError(RayError, TimeoutError):
    """``get`` or ``wait`` ran out of its ``timeout`` before the objects were ready."""


class PendingCallsLimitExceeded(RayError):
    """An actor handle has more pending calls than its ``max_pending_calls``."""


class PlasmaObjectNotAvailable(RayError):
    """Kept for Ray compatibility, never raised (inside Ray, it is raised and caught by its
    own object store client)."""


class AsyncioActorExit(RayError):
    """Raised inside an asyncio actor by ``exit_actor()`` (a sync or threaded actor's raises
    ``SystemExit``).  The actor ends after the call even if the code catches it."""


class RuntimeEnvSetupError(RayError):
    """Kept for Ray compatibility, never raised: Ray raises it when it can't set up a
    runtime_env (a pip install that fails, say).  shmray applies only ``env_vars``, which
    can't fail; any other key raises ``ValueError`` at the call that passes it."""


class CrossLanguageError(RayError):
    """Kept for Ray compatibility, never raised: Ray raises it for errors in calls across
    languages (Java, C++); shmray runs Python only."""


class UnserializableException(RayError):
    """Stands for a task's exception that could not be rebuilt where it arrived (its class
    can't be imported there, or its pickle doesn't load); ``original_stack_trace`` keeps the
    task's error as text, ``class_name`` names the class it stands for.  A RayTaskError
    whose cause it is is an instance of it too."""

    def __init__(self, original_stack_trace: str, class_name: Optional[str] = None,
                 reason: Optional[str] = None):
        self.original_stack_trace = original_stack_trace
        self.class_name = class_name
        self.reason = reason
        super().__init__(original_stack_trace)

    def __reduce__(self):
        return UnserializableException, (self.original_stack_trace, self.class_name,
                                         self.reason)

    def __str__(self) -> str:
        why = f" ({self.reason}; most likely the exception's class is defined in a module " \
              "this process can't import)" if self.reason else ""
        return (f"Failed to deserialize exception{why}. Refer to "
                "https://docs.ray.io/en/latest/ray-core/objects/serialization.html"
                "#custom-serializers-for-exceptions for more information.\n"
                f"Original exception:\n{self.original_stack_trace}")


class TaskPlacementGroupRemoved(RayError):
    """The placement group a task was to run in was removed (``remove_placement_group``,
    or the end of the process that created it) before it ran, or while it ran (its worker
    is killed); also what ``get()`` of a removed group's ``ready()`` raises."""


class ActorPlacementGroupRemoved(RayError):
    """Kept for Ray compatibility, never raised: an actor whose placement group is removed
    dies, and its calls raise ActorDiedError saying so."""


class ObjectReconstructionFailedMaxAttemptsExceededError(ObjectLostError):
    """Kept for Ray compatibility, never raised: Ray raises it when rebuilding a lost
    object ran out of retries; shmray does not rebuild objects (see
    ``ObjectReconstructionFailedError``)."""


class ObjectReconstructionFailedLineageEvictedError(ObjectLostError):
    """Kept for Ray compatibility, never raised: Ray raises it when the record of how to
    rebuild a lost object was evicted; shmray does not rebuild objects."""


class NodeDiedError(RayError):
    """Kept for Ray compatibility, never raised: Ray raises it for a task whose node died;
    shmray runs on one machine, whose end is the end of the session."""


class RayChannelError(RaySystemError):
    """Kept for Ray compatibility, never raised: Ray raises it for errors of its compiled
    graphs' channels, which shmray does not have."""


class RayChannelTimeoutError(RayChannelError, TimeoutError):
    """Kept for Ray compatibility, never raised: a compiled graph channel timed out."""


class RayCgraphCapacityExceeded(RaySystemError):
    """Kept for Ray compatibility, never raised: a compiled graph has too many
    executions in flight."""


class ObjectRefStreamEndOfStreamError(RayError):
    """Kept for Ray compatibility, never raised: inside Ray, it ends the reading of a
    streaming generator's refs; shmray's generators end with StopIteration."""


class OufOfBandObjectRefSerializationException(RayError):
    """Kept for Ray compatibility (the name is Ray's, misspelling included), never raised:
    Ray raises it for a ref pickled by the user when its configuration forbids that;
    shmray always allows it."""


class AuthenticationError(RayError):
    """Kept for Ray compatibility, never raised: Ray raises it when a client's token is
    missing or wrong; a shmray session is reachable only by this user's processes on this
    machine, and needs no token."""

    def __init__(self, message: str = ""):
        self.message = message
        super().__init__(message)


__all__ = [name for name, obj in list(globals().items())
           if isinstance(obj, type) and issubclass(obj, RayError)]
