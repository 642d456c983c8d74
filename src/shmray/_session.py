"""A session's life: init, shutdown, and "this process's runtime, or start one".

Runs in: the driver (which starts and ends a session), and every process of one (which asks
for its runtime, or finds it was forked from one: ``current``).

``init`` creates the arena and the session folder, then forks the scheduler, which forks the
workers.  The first ``remote``/``put``/``get``/``wait`` before ``init`` starts shmray with the
defaults, as Ray does (``current``).  The object store's default size is 30% of the memory
available now (Ray's default); a size larger than what is available, or below Ray's minimum
of 75 MiB, is refused with the size to pass instead.  ``shutdown`` closes the driver's
connection: the scheduler sees EOF, kills the workers, removes the session folder and
exits, and the driver reaps it.
``init(local_mode=True)`` starts none of that: its runtime runs every call in the driver
(``_local_mode``).
"""

from __future__ import annotations

import atexit
import collections.abc
import logging
import os
import select
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Optional

import psutil

from . import (
    _accelerators,
    _context,
    _direct,
    _events,
    _local_mode,
    _options,
    _process,
    _ray_backend,
    _resources,
    _runtime,
    _threads,
)
from ._connection import connection_pair
from ._logging_config import LoggingConfig
from ._object_store import MIN_OBJECT_STORE_MEMORY, ObjectStore
from ._process import fork_child
from ._scheduler import Scheduler
from ._worker_pool import spawn_actor, spawn_first_worker, spawn_worker
from .exceptions import RaySystemError
from .job_config import JobConfig

_DEFAULT_STORE_FRACTION = 0.3

_INIT_KEYWORDS = frozenset({
    "address", "num_cpus", "num_gpus", "resources", "object_store_memory",
    "ignore_reinit_error", "log_to_driver", "namespace", "logging_level", "runtime_env",
    "include_dashboard", "dashboard_host", "dashboard_port", "configure_logging",
    "logging_format", "local_mode", "_temp_dir", "job_config", "_system_config",
    "logging_config", "labels",
})

_lock = threading.RLock()
_scheduler_pid: Optional[int] = None  # set while this process runs a session it started
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
    for key in ("num_cpus", "num_gpus"):
        value = kwargs.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or value < 0):
            raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    resources = kwargs.get("resources")
    if resources is not None and (not isinstance(resources, dict) or any(
            not isinstance(v, (int, float)) or v < 0 for v in resources.values())):
        raise ValueError(f"resources must be a dict of name -> amount >= 0, got {resources!r}")
    _options.check_runtime_env(kwargs.get("runtime_env"))
    _options.check_namespace(kwargs.get("namespace"))
    logging_config = kwargs.get("logging_config")
    if logging_config is not None and not isinstance(logging_config, LoggingConfig):
        raise TypeError("logging_config must be a shmray.LoggingConfig, got "
                        f"{type(logging_config).__name__}")
    job_config = kwargs.get("job_config") or JobConfig()
    if not isinstance(job_config, JobConfig):
        raise TypeError("job_config must be a shmray.job_config.JobConfig, got "
                        f"{type(job_config).__name__}")
    options = dict(kwargs)
    options["num_cpus"] = kwargs.get("num_cpus") if kwargs.get("num_cpus") is not None \
        else (os.cpu_count() or 1)
    options.setdefault("log_to_driver", True)
    # init's own namespace and runtime_env win over the job config's, as in Ray
    options["namespace"] = kwargs.get("namespace") or job_config.ray_namespace or "default"
    if kwargs.get("runtime_env") is None:
        options["runtime_env"] = job_config.runtime_env
    options["default_actor_lifetime"] = job_config.default_actor_lifetime
    system = kwargs.get("_system_config") or {}
    # How long an actor ending gracefully may take over __ray_shutdown__ and its atexit
    # handlers before it is killed (Ray's setting, in ms; its default, 30 s).
    options["graceful_shutdown_s"] = system.get("actor_graceful_shutdown_timeout_ms",
                                                30_000) / 1000
    options["task_events"] = _events.capacity_of(options)  # each process's log, in events
    _events.history_limit(options)  # (checked here: the scheduler takes it as it starts)
    return options


def init(**kwargs: Any):
    """Start shmray on this machine, or, with a Ray cluster's ``address``, hand the session
    to Ray (``_ray_backend``).  Keywords as ``ray.init``; returns a context dict."""
    global _scheduler_pid, _job_counter, _forked_from
    cluster = _ray_backend.cluster_address(kwargs.get("address"))
    if cluster is not None and not _process.in_child:
        return _init_on_ray(cluster, kwargs)
    options = _check_init_options(kwargs)
    if _process.in_child:  # inside a task or actor: the session is already there
        if kwargs.get("ignore_reinit_error"):
            return None
        raise RuntimeError(
            "shmray.init() called inside a task or actor: shmray is already running there. "
            "Check shmray.is_initialized() first, or pass ignore_reinit_error=True"
        )
    with _lock:
        if _session_running(kwargs):
            return RayContext(_context.runtime) if _context.runtime else None
        level = kwargs.get("logging_level")
        if level is not None:
            logging.getLogger("shmray").setLevel(level)
        if kwargs.get("logging_config") is not None:
            kwargs["logging_config"]._apply()
        # The driver's own environment says which GPUs there are, as Ray's node sees it.
        options["gpu_ids"], options["gpus_named"] = _accelerators.session_gpus(
            kwargs.get("num_gpus"))
        options["num_gpus"] = len(options["gpu_ids"])
        for name, value in ((options.get("runtime_env") or {}).get("env_vars") or {}).items():
            os.environ[name] = str(value)  # inherited by the scheduler and every worker
        _job_counter += 1
        options["job_id"] = _job_counter
        if options.get("local_mode"):
            return _start_local(options, kwargs)
        store = ObjectStore(_store_size(kwargs.get("object_store_memory")))
        options["total"] = _resources.session_totals(options, store.capacity)
        session_dir = tempfile.mkdtemp(prefix="shmray-session-", dir=kwargs.get("_temp_dir"))
        options["socket_dir"] = _direct.socket_folder(session_dir)
        driver_end, scheduler_end = connection_pair("driver", "scheduler")
        driver_pid = os.getpid()
        driver_events = _events.new_log(options["task_events"])  # the scheduler's too

        def scheduler_main():
            driver_end.close()
            Scheduler.catch_sigterm()
            # The first task waits for the first worker: it starts while the scheduler does.
            first = spawn_first_worker(scheduler_end, store, session_dir, options)
            Scheduler(scheduler_end, driver_pid, store, session_dir, options, spawn_worker,
                      spawn_actor, first_worker=first, driver_events=driver_events).run()

        # Every process forked from here inherits what this finds: in the driver it costs
        # a millisecond or two, once, where a freshly forked scheduler takes twice that.
        _threads.find_libraries()
        _scheduler_pid = fork_child("shmray::scheduler", scheduler_main,
                                    death_signal=signal.SIGTERM)
        scheduler_end.close()
        _events.start(driver_events, options["task_events"])
        # The driver runs its plain tasks on workers it leases (``_runtime.leases``).
        runtime = _runtime.Runtime(store, driver_end, session_dir, options, leasing=True)
        _context.install(runtime)
        _forked_from = None  # a forked child with a session of its own now
        return RayContext(runtime)


def _init_on_ray(address: str, kwargs: dict):
    with _lock:
        if _session_running(kwargs):
            return None
        return _ray_backend.connect(address, kwargs)


def _session_running(kwargs: dict) -> bool:
    """Whether this process has a session already, of its own or Ray's (caller holds
    ``_lock``): kept with ``ignore_reinit_error``, else a second init() is an error."""
    if _scheduler_pid is None and _ray_backend.ray is None:
        return False
    if kwargs.get("ignore_reinit_error"):
        return True
    raise RuntimeError(
        "shmray.init() was called twice: shut down first with shmray.shutdown(), or pass "
        "ignore_reinit_error=True")


def _start_local(options: dict, kwargs: dict):
    """A local-mode session (``_local_mode``): no arena, no scheduler, no worker; every
    call runs in this process.  Caller holds ``_lock``."""
    global _scheduler_pid, _forked_from
    options["total"] = _resources.session_totals(
        options, _store_size(kwargs.get("object_store_memory")))
    session_dir = tempfile.mkdtemp(prefix="shmray-session-", dir=kwargs.get("_temp_dir"))
    runtime = _local_mode.LocalRuntime(options, session_dir)
    _context.install(runtime)
    capacity = options["task_events"]
    _events.start(_events.new_log(capacity), capacity)
    _scheduler_pid = os.getpid()  # the session is this process's own: shutdown() waits for none
    _forked_from = None
    return RayContext(runtime)


class RayContext(collections.abc.Mapping):
    """What ``init()`` returns, as Ray's: a read-only mapping of the session's facts, with
    attributes, and a context manager: ``with shmray.init(): ...`` shuts down at the end."""

    def __init__(self, runtime: _runtime.Runtime):
        import platform

        # Ray's keys.  The address is the session folder: no other driver attaches to a
        # shmray session (a Ray cluster is Ray's job), and it names this one.
        self.address_info = {
            "node_ip_address": "127.0.0.1",
            "raylet_ip_address": "127.0.0.1",
            "address": runtime.session_dir,
            "gcs_address": runtime.session_dir,
            "session_dir": runtime.session_dir,
            "webui_url": None,  # no dashboard on one machine
            "node_id": "0" * 56,
            "object_store_memory": int(runtime.total["object_store_memory"]),
            "num_cpus": runtime.options["num_cpus"],
        }
        self.dashboard_url = None
        self.python_version = platform.python_version()
        self.ray_version = __import__("shmray").__version__
        self.ray_commit = "shmray"

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


def is_initialized() -> bool:
    """True in a driver after init(), and always inside tasks and actors."""
    return _context.runtime is not None or _ray_backend.ray is not None


def shutdown() -> None:
    """Stop shmray: end the scheduler and every worker, free the store, remove the session folder.
    Only the process that started the session ends it (in a task or actor this does nothing)."""
    global _scheduler_pid
    with _lock:
        if _ray_backend.ray is not None:
            _ray_backend.disconnect()
            return
        pid, _scheduler_pid = _scheduler_pid, None
        if pid is None:
            return
        runtime = _context.runtime
        _context.install(None)
        _events.stop()
        runtime.close()
        if pid != os.getpid():
            _wait_for_exit(pid, timeout=10.0)
        # The scheduler removes it; this covers a scheduler that was killed first.
        shutil.rmtree(runtime.session_dir, ignore_errors=True)
        if runtime.socket_dir is not None:  # None in local mode
            _direct.remove_socket_folder(runtime.socket_dir)


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    _sleep_until_exit(pid, timeout)
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


def _sleep_until_exit(pid: int, timeout: float) -> None:
    """Sleep until ``pid`` exits, or ``timeout`` passes, without polling: a pidfd becomes
    readable at the exit (Linux 5.3).  Where there is none, the caller's polling does."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(timeout * 1000)
    finally:
        os.close(fd)


atexit.register(shutdown)


def _forget_session_after_fork() -> None:
    """A child the user (or a library) forks from a process of a session never touches that
    session, not even on exit (this module's atexit shutdown used to end the parent's
    session, spill files and all): it lets go of it (``Runtime.forget_after_fork``).  Using
    shmray there raises a clear error until the child starts a session of its own with
    ``init()``.  shmray's own forks (the scheduler, workers, actors) happen where no
    session is attached, so this does nothing for them."""
    global _scheduler_pid, _lock, _forked_from
    runtime = _context.runtime
    _lock = threading.RLock()  # another thread may have held it at the fork
    if runtime is None:
        return
    _forked_from = os.getppid()
    _scheduler_pid = None
    _context.install(None)
    _process.in_child = False  # a task's helper process may start a session of its own
    runtime.forget_after_fork(_forked_from)


os.register_at_fork(after_in_child=_forget_session_after_fork)


def current() -> _runtime.Runtime:
    """This process's runtime; in a driver with no session yet, one is started (Ray's
    implicit init)."""
    runtime = _context.runtime
    if runtime is None:
        if _ray_backend.ray is not None:
            raise RuntimeError(
                "this session runs on a Ray cluster (init(address=...)), where this part of "
                "shmray is not available yet: use Ray's own API for it (import ray)")
        if _forked_from is not None:
            raise RaySystemError(
                f"this process was forked from process {_forked_from} while that one ran a "
                "shmray session, and a forked child can't use its parent's session. Call "
                "shmray.init() here to start a session of this process's own, or send the "
                "work back to the parent.")
        if _process.in_child:
            raise RaySystemError("this shmray process has no session any more")
        with _lock:
            if _context.runtime is None:
                init()
            runtime = _context.runtime
    return runtime
