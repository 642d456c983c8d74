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
          ├── RaySystemError
          ├── ObjectStoreFullError
          ├── OutOfDiskError
          ├── OutOfMemoryError                     never
          ├── ObjectLostError
          │    ├── ObjectFetchTimedOutError
          │    ├── OwnerDiedError                  never
          │    ├── ObjectFreedError                never
          │    ├── ReferenceCountingAssertionError never (also an AssertionError)
          │    └── ObjectReconstructionFailedError never
          ├── GetTimeoutError                      (also a TimeoutError)
          ├── PendingCallsLimitExceeded
          ├── PlasmaObjectNotAvailable             never
          ├── AsyncioActorExit
          ├── RuntimeEnvSetupError                 never
          ├── CrossLanguageError                   never
          └── UnserializableException

Remote failures keep their remote traceback as text (CPython's
``concurrent.futures.process._ExceptionWithTraceback`` does the same): the traceback
object itself cannot cross a process boundary.
"""

from __future__ import annotations

from typing import Optional

from . import _pickling


class RayError(Exception):
    """Base of every shmray error; never raised directly."""


class RayTaskError(RayError):
    """A task or actor method raised an exception.

    ``get`` raises it as an instance of both ``RayTaskError`` and the class of the user's
    exception (see ``as_instanceof_cause``), so ``except ValueError`` and
    ``except RayTaskError`` both catch it.  ``cause`` is the user's exception, rebuilt in
    the caller's process when it could be pickled.
    """

    def __init__(
        self,
        function_name: str,
        traceback_str: str,
        cause: Optional[BaseException] = None,
        proctitle: str = "",
        pid: int = 0,
    ):
        self._cause_by_state = isinstance(cause, _PortableCause)
        if self._cause_by_state:
            cause = cause.exc
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.proctitle = proctitle
        self.pid = pid
        super().__init__(function_name, traceback_str)

    def __reduce__(self):
        return _rebuild_task_error, self._fields(dual=False)

    def _fields(self, dual: bool) -> tuple:
        """What rebuilds this error elsewhere.  The cause travels as a pickle of its own: a
        process that can't rebuild it (its class is in a module only the task's process
        has) still gets the task's name, message and traceback (``_rebuild_task_error``)."""
        cause = self.cause
        if getattr(self, "_cause_by_state", False):
            cause = _PortableException(cause)
        try:
            pickled_cause = _pickling.dumps(cause)
        except Exception:
            pickled_cause = None
        return (self.function_name, self.traceback_str, pickled_cause, self.proctitle,
                self.pid, dual, type(self.cause).__name__)

    def __str__(self) -> str:
        where = f"{self.proctitle} pid={self.pid}" if self.pid else self.proctitle
        cause = self.cause
        head = (getattr(cause, "class_name", None) if isinstance(cause, UnserializableException)
                else None) or (type(cause).__name__ if cause is not None else "Error")
        return (
            f"{head} raised in {self.function_name}() ({where}):\n"
            f"{self.traceback_str.rstrip()}"
        )

    def as_instanceof_cause(self) -> "RayTaskError":
        """This error as an instance of a class deriving from RayTaskError and the cause's class."""
        cause_cls = type(self.cause) if self.cause is not None else None
        if cause_cls is None or issubclass(cause_cls, RayTaskError):
            return self
        if not issubclass(cause_cls, Exception):
            # SystemExit, KeyboardInterrupt, GeneratorExit in a task must not end or
            # interrupt the caller: sys.exit(3) in a task would exit the driver with 0.
            return self
        derived = _dual_class(cause_cls)
        if derived is None:
            return self
        err = derived.__new__(derived)
        # BaseException.__new__ leaves args empty; the cause's args make str()/repr()
        # of the user's class behave, ours come from the fields below.
        err.args = getattr(self.cause, "args", ())
        err.function_name = self.function_name
        err.traceback_str = self.traceback_str
        err.cause = self.cause
        err.proctitle = self.proctitle
        err.pid = self.pid
        err._cause_by_state = getattr(self, "_cause_by_state", False)
        try:
            err.__dict__.update(
                {k: v for k, v in vars(self.cause).items() if k not in err.__dict__}
            )
        except TypeError:  # a cause without __dict__
            pass
        return err


_dual_classes: dict = {}


def _dual_class(cause_cls: type) -> Optional[type]:
    """``RayTaskError(cause_cls)``: a class that is both; None if Python refuses the mix."""
    if cause_cls in _dual_classes:
        return _dual_classes[cause_cls]

    def __reduce__(self):
        return _rebuild_task_error, self._fields(dual=True)

    try:
        derived = type(
            f"RayTaskError({cause_cls.__name__})",
            (RayTaskError, cause_cls),
            {
                "__reduce__": __reduce__,
                "__str__": RayTaskError.__str__,
                "__repr__": lambda self: f"{type(self).__name__}: {RayTaskError.__str__(self)}",
                "__module__": __name__,
                "__init__": lambda self, *a, **k: None,
            },
        )
    except TypeError:  # e.g. an instance layout conflict with a C base
        derived = None
    _dual_classes[cause_cls] = derived
    return derived


def _rebuild_task_error(function_name, traceback_str, pickled_cause, proctitle, pid, dual,
                        cause_name):
    try:
        cause = _pickling.loads(pickled_cause) if pickled_cause is not None else None
    except Exception as exc:
        cause = UnserializableException(
            f"the {cause_name} that {function_name}() raised can't be rebuilt in this process "
            f"({type(exc).__name__}: {exc}); most likely its class is defined in a module "
            f"this process can't import. Its traceback:\n{traceback_str}", cause_name)
    error = RayTaskError(function_name, traceback_str, cause, proctitle, pid)
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
        return _rebuild_exception, (type(exc), exc.args, dict(getattr(exc, "__dict__", {})))


def _rebuild_exception(cls, args, state):
    exc = cls.__new__(cls)
    exc.args = args
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
    """Kept for Ray compatibility, never raised: Ray raises it for an object whose owner (the
    process that made it) died.  In shmray the scheduler keeps every object another process
    can see, so a maker's death loses nothing that is still referenced."""


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
    """Stands for a task's exception that could not be pickled where it was raised, or not
    rebuilt where it arrived (its class can't be imported there); its text is kept, and
    ``class_name`` names the class it stands for."""

    def __init__(self, original_stack_trace: str, class_name: Optional[str] = None):
        self.original_stack_trace = original_stack_trace
        self.class_name = class_name
        super().__init__(original_stack_trace)

    def __reduce__(self):
        return UnserializableException, (self.original_stack_trace, self.class_name)


__all__ = [name for name, obj in list(globals().items())
           if isinstance(obj, type) and issubclass(obj, RayError)]
