"""The public entry points: init, shutdown, remote, get, put, wait and introspection.

Runs in: the driver (and, for remote/get/put/wait, inside tasks too).

``init`` creates the arena and the session folder, then forks the scheduler, which forks the
workers.  ``remote``/``put``/``get``/``wait`` before ``init`` start shmray with the defaults, as
Ray does.  The object store's default size is 30% of the memory available now (Ray's default);
a size larger than what is available, or below Ray's minimum of 75 MiB, is refused with the
size to pass instead.  ``shutdown`` closes the driver's connection: the scheduler sees EOF,
kills the workers, removes the session folder and exits, and the driver reaps it.
"""

from __future__ import annotations

import atexit
import collections.abc
import inspect
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Optional

import psutil

from . import _direct, _object_ref, _process, _protocol as P, _resources, _runtime
from ._connection import connection_pair
from ._object_ref import ObjectRef
from ._object_store import MIN_OBJECT_STORE_MEMORY, ObjectStore
from ._process import fork_child
from ._remote_function import RemoteFunction
from .exceptions import RaySystemError

_DEFAULT_STORE_FRACTION = 0.3

_INIT_KEYWORDS = frozenset({
    "address", "num_cpus", "num_gpus", "resources", "object_store_memory",
    "ignore_reinit_error", "log_to_driver", "namespace", "logging_level", "runtime_env",
    "include_dashboard", "dashboard_host", "dashboard_port", "configure_logging",
    "logging_format", "local_mode", "_temp_dir", "job_config", "_system_config",
})

_lock = threading.RLock()
_runtime_now: Optional[_runtime.Runtime] = None
_scheduler_pid: Optional[int] = None
_job_counter = 0
_forked_from: Optional[int] = None  # a forked child: the process whose session it left


def _store_size(requested: Optional[int]) -> int:
    available = psutil.virtual_memory().available
    if requested is None:
        return max(MIN_OBJECT_STORE_MEMORY, int(available * _DEFAULT_STORE_FRACTION))
    if not isinstance(requested, int) or isinstance(requested, bool):
        raise TypeError(f"object_store_memory must be a number of bytes (int), got {requested!r}")
    if requested < MIN_OBJECT_STORE_MEMORY:
        raise ValueError(
            f"object_store_memory={requested} is below the minimum of "
            f"{MIN_OBJECT_STORE_MEMORY} bytes (75 MiB); pass at least that much"
        )
    if requested > available:
        raise ValueError(
            f"object_store_memory={requested} is more than the {available} bytes of memory "
            f"available on this machine; pass a smaller size, e.g. "
            f"object_store_memory={int(available * _DEFAULT_STORE_FRACTION)} (30% of it)"
        )
    return requested


def _check_init_options(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - _INIT_KEYWORDS)
    if unknown:
        raise TypeError(
            f"init() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"known keywords: {', '.join(sorted(_INIT_KEYWORDS))}"
        )
    address = kwargs.get("address")
    if address not in (None, "local", "auto"):
        raise ValueError(
            f"shmray runs on this machine only; address={address!r} is not supported "
            "(use Ray itself to connect to a cluster)"
        )
    for key in ("num_cpus", "num_gpus"):
        value = kwargs.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or value < 0):
            raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    resources = kwargs.get("resources")
    if resources is not None and (not isinstance(resources, dict) or any(
            not isinstance(v, (int, float)) or v < 0 for v in resources.values())):
        raise ValueError(f"resources must be a dict of name -> amount >= 0, got {resources!r}")
    runtime_env = kwargs.get("runtime_env") or {}
    unsupported = sorted(set(runtime_env) - {"env_vars"})
    if unsupported:
        raise ValueError(
            f"runtime_env keys {unsupported} are not supported on one machine; shmray applies "
            "env_vars only (install packages into the environment you run from)"
        )
    options = dict(kwargs)
    options["num_cpus"] = kwargs.get("num_cpus") if kwargs.get("num_cpus") is not None \
        else (os.cpu_count() or 1)
    options.setdefault("log_to_driver", True)
    options["namespace"] = kwargs.get("namespace") or "default"
    return options


def init(**kwargs: Any):
    """Start shmray on this machine.  Keywords as ``ray.init``; returns a context dict."""
    global _runtime_now, _scheduler_pid, _job_counter, _forked_from
    options = _check_init_options(kwargs)
    if _process.in_child:  # inside a task or actor: the session is already there
        if kwargs.get("ignore_reinit_error"):
            return None
        raise RuntimeError(
            "shmray.init() called inside a task or actor: shmray is already running there. "
            "Check shmray.is_initialized() first, or pass ignore_reinit_error=True"
        )
    with _lock:
        if _runtime_now is not None:
            if kwargs.get("ignore_reinit_error"):
                return _context(_runtime_now)
            raise RuntimeError(
                "shmray.init() was called twice: shut down first with shmray.shutdown(), or "
                "pass ignore_reinit_error=True"
            )
        level = kwargs.get("logging_level")
        if level is not None:
            logging.getLogger("shmray").setLevel(level)
        for name, value in ((options.get("runtime_env") or {}).get("env_vars") or {}).items():
            os.environ[name] = str(value)  # inherited by the scheduler and every worker
        store = ObjectStore(_store_size(kwargs.get("object_store_memory")))
        options["total"] = _resources.session_totals(options, store.capacity)
        session_dir = tempfile.mkdtemp(prefix="shmray-session-", dir=kwargs.get("_temp_dir"))
        options["socket_dir"] = _direct.socket_folder(session_dir)
        _job_counter += 1
        options["job_id"] = _job_counter
        driver_end, scheduler_end = connection_pair("driver", "scheduler")
        driver_pid = os.getpid()

        def scheduler_main():
            from ._scheduler import Scheduler
            from ._worker_pool import spawn_actor, spawn_worker

            driver_end.close()
            Scheduler(scheduler_end, driver_pid, store, session_dir, options, spawn_worker,
                      spawn_actor).run()

        _scheduler_pid = fork_child("shmray::scheduler", scheduler_main,
                                    death_signal=signal.SIGTERM)
        scheduler_end.close()
        # The driver runs its plain tasks on workers it leases (``_runtime``, "leases").
        runtime = _runtime.Runtime(store, driver_end, session_dir, options, leasing=True)
        _runtime.install(runtime)
        _runtime_now = runtime
        _forked_from = None  # a forked child with a session of its own now
        return _context(runtime)


class RayContext(collections.abc.Mapping):
    """What ``init()`` returns, as Ray's: a read-only mapping of the session's facts, with
    attributes, and a context manager: ``with shmray.init(): ...`` shuts down at the end."""

    def __init__(self, runtime: _runtime.Runtime):
        import platform

        self.address_info = {
            "node_ip_address": "127.0.0.1",
            "node_id": "0" * 56,
            "session_dir": runtime.session_dir,
            "object_store_memory": runtime.store.capacity,
            "num_cpus": runtime.options["num_cpus"],
        }
        self.dashboard_url = None  # no dashboard on one machine
        self.python_version = platform.python_version()
        self.ray_version = __import__("shmray").__version__

    def __getitem__(self, key):
        return self.address_info[key]

    def __iter__(self):
        return iter(self.address_info)

    def __len__(self) -> int:
        return len(self.address_info)

    def __enter__(self) -> "RayContext":
        return self

    def __exit__(self, *exc_info) -> None:
        shutdown()

    def disconnect(self) -> None:
        shutdown()


def _context(runtime: _runtime.Runtime) -> RayContext:
    return RayContext(runtime)


def is_initialized() -> bool:
    """True in a driver after init(), and always inside tasks and actors."""
    return _runtime_now is not None or _object_ref._default_tracker is not None


def shutdown() -> None:
    """Stop shmray: end the scheduler and every worker, free the store, remove the session folder."""
    global _runtime_now, _scheduler_pid
    with _lock:
        runtime, _runtime_now = _runtime_now, None
        pid, _scheduler_pid = _scheduler_pid, None
        if runtime is None:
            return
        _runtime.install(None)
        runtime.close()
        if pid is not None and pid != os.getpid():
            _wait_for_exit(pid, timeout=10.0)
        # The scheduler removes it; this covers a scheduler that was killed first.
        shutil.rmtree(runtime.session_dir, ignore_errors=True)
        _direct.remove_socket_folder(runtime.socket_dir)


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.002)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


atexit.register(shutdown)


def _forget_session_after_fork() -> None:
    """A child the user (or a library) forks from a process of a session never touches that
    session, not even on exit (this module's atexit shutdown used to end the parent's
    session, spill files and all): it lets go of it (``Runtime.forget_after_fork``).  Using
    shmray there raises a clear error until the child starts a session of its own with
    ``init()``.  shmray's own forks (the scheduler, workers, actors) happen where no
    session is attached, so this does nothing for them."""
    global _runtime_now, _scheduler_pid, _lock, _forked_from
    runtime = _runtime_now or _object_ref._default_tracker
    _lock = threading.RLock()  # another thread may have held it at the fork
    if runtime is None:
        return
    _forked_from = os.getppid()
    _runtime_now = _scheduler_pid = None
    _runtime.install(None)
    _process.in_child = False  # a task's helper process may start a session of its own
    runtime.forget_after_fork(_forked_from)


os.register_at_fork(after_in_child=_forget_session_after_fork)


def _current() -> _runtime.Runtime:
    runtime = _runtime_now
    if runtime is None:
        # Inside a worker the runtime is installed on the ObjectRef tracker, not here.
        tracker = _object_ref._default_tracker
        if tracker is not None:
            return tracker
        if _forked_from is not None:
            raise RaySystemError(
                f"this process was forked from process {_forked_from} while that one ran a "
                "shmray session, and a forked child can't use its parent's session. Call "
                "shmray.init() here to start a session of this process's own, or send the "
                "work back to the parent.")
        if _process.in_child:
            raise RaySystemError("this shmray process has no session any more")
        with _lock:
            if _runtime_now is None:
                init()
            runtime = _runtime_now
    return runtime


def remote(*args, **options):
    """``@remote`` / ``@remote(**options)`` on a function (a task) or a class (an actor)."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError(
            "remote() takes a function or class, or only keyword options: "
            "@shmray.remote or @shmray.remote(num_cpus=2)"
        )
    return lambda target: _make_remote(target, options)


def _make_remote(target, options: dict):
    if inspect.isclass(target):
        from ._actor import ActorClass

        return ActorClass(target, options)
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        raise TypeError(
            f"{target.__name__} is a generator function; shmray does not run generator tasks "
            "(Ray's num_returns='streaming') yet: return a list, or use num_returns=N"
        )
    if inspect.iscoroutinefunction(target):
        raise TypeError(
            f"{target.__name__} is an async function; remote tasks can't be coroutines (as in "
            "Ray). Wrap it: a sync remote function that calls asyncio.run(), or make it a "
            "method of an async actor"
        )
    if not callable(target):
        raise TypeError(f"remote() needs a function or a class, got {type(target).__name__}")
    return RemoteFunction(target, options)


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the object store; returns its ObjectRef."""
    return _current().put(value)


def get(object_refs, *, timeout: Optional[float] = None):
    """The value of one ObjectRef, or the values of a list of them, in order."""
    runtime = _current()
    if isinstance(object_refs, ObjectRef):
        _check_session(object_refs, runtime)
        return runtime.get_values([object_refs], _check_timeout(timeout))[0]
    if isinstance(object_refs, (list, tuple)):
        _check_refs(object_refs, "get", runtime)
        return runtime.get_values(list(object_refs), _check_timeout(timeout))
    raise TypeError(
        f"get() takes an ObjectRef or a list of ObjectRefs, got {type(object_refs).__name__}"
    )


def wait(object_refs, *, num_returns: int = 1, timeout: Optional[float] = None,
         fetch_local: bool = True):
    """(ready, not_ready): the first ``num_returns`` refs whose objects are ready, in input order."""
    if isinstance(object_refs, ObjectRef) or not isinstance(object_refs, (list, tuple)):
        raise TypeError(
            f"wait() takes a list of ObjectRefs, got {type(object_refs).__name__}"
        )
    if not object_refs:
        return [], []  # before any num_returns check, as Ray does
    runtime = _current()
    _check_refs(object_refs, "wait", runtime)
    if len(set(object_refs)) != len(object_refs):
        raise ValueError("wait() got the same ObjectRef more than once")
    if not isinstance(num_returns, int) or (num_returns < 1 and object_refs):
        raise ValueError(f"num_returns must be an int >= 1, got {num_returns!r}")
    if num_returns > len(object_refs):
        raise ValueError(
            f"num_returns ({num_returns}) is more than the number of refs ({len(object_refs)})"
        )
    if not object_refs:
        return [], []
    return runtime.wait(list(object_refs), num_returns, _check_timeout(timeout))


def cancel(object_ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Stop the task that makes ``object_ref``; ``get`` of it then raises TaskCancelledError.

    A queued task is dropped; a running one gets KeyboardInterrupt, or with ``force=True``
    its worker is killed (and replaced).  ``recursive`` cancels the tasks it submitted too.
    Actor calls: queued ones are dropped and running async ones cancelled; ``force`` is not
    allowed for them (as in Ray).  A task that already finished is left alone.
    """
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(
            f"cancel() takes the ObjectRef of a task, got {type(object_ref).__name__}; to stop "
            "an actor use kill()"
        )
    runtime = _current()
    task_id = object_ref.task_id()
    if force and task_id in runtime.actor_calls:
        raise ValueError(
            "force=True is not supported for actor calls (as in Ray): use kill() on the actor"
        )
    runtime.publish([object_ref.binary()])  # a task only we knew of: the scheduler's now
    runtime.send((P.CANCEL, task_id, bool(force), bool(recursive)))
    runtime.flush()


def _check_refs(refs, what: str, runtime) -> None:
    for i, ref in enumerate(refs):
        if not isinstance(ref, ObjectRef):
            raise TypeError(
                f"{what}() takes ObjectRefs; item {i} of the list is a {type(ref).__name__}"
            )
        _check_session(ref, runtime)


def _check_session(ref: ObjectRef, runtime) -> None:
    if ref._tracker is not runtime:
        _object_ref._runtime_for(ref)  # raises: the ref's session was shut down


def _check_timeout(timeout):
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    return float(timeout)


# -- introspection -------------------------------------------------------------------------


class RuntimeContext:
    """What ``get_runtime_context()`` returns: ids of the job, task, worker and node."""

    def __init__(self, runtime: _runtime.Runtime):
        self._runtime = runtime

    def get_job_id(self) -> str:
        return f"{self._runtime.options.get('job_id', 1):08x}"

    def get_task_id(self) -> Optional[str]:
        from ._worker import current_task

        return current_task.task_id.hex() if current_task.task_id is not None else None

    def get_worker_id(self) -> str:
        return f"{os.getpid():056x}"

    def get_node_id(self) -> str:
        return "0" * 56

    def get_actor_id(self) -> Optional[str]:
        from ._worker import current_task

        return current_task.actor_id.hex() if current_task.actor_id is not None else None

    @property
    def namespace(self) -> str:
        return self._runtime.options.get("namespace", "default")

    def get(self) -> dict:
        return {"job_id": self.get_job_id(), "task_id": self.get_task_id(),
                "worker_id": self.get_worker_id(), "node_id": self.get_node_id()}


def get_runtime_context() -> RuntimeContext:
    return RuntimeContext(_current())


def cluster_resources() -> dict:
    """Every resource of this machine shmray schedules with (CPU, GPU, custom, memory)."""
    return _current().query("resources")


def available_resources() -> dict:
    """The resources not held by running tasks right now."""
    runtime = _current()
    runtime.return_idle_leases()  # a worker merely lent to us is available
    return runtime.query("available")


def nodes() -> list:
    """The one node: this machine."""
    runtime = _current()
    resources = runtime.query("resources")
    return [{
        "NodeID": "0" * 56,
        "Alive": True,
        "NodeManagerAddress": "127.0.0.1",
        "NodeManagerHostname": os.uname().nodename,
        "Resources": resources,
        "ObjectStoreSocketName": "memfd:shmray-arena",
    }]
