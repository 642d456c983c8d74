"""The public entry points besides a session's life: remote, get, put, wait, cancel, and
introspection.

Runs in: the driver, and inside tasks and actors.

Each call asks ``_session.current()`` for this process's runtime (starting a session in a
driver that has none, as Ray does) and checks its arguments before anything is sent: a
wrong type or value raises at the call, naming what was wrong.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional

from . import _accelerators, _context, _object_ref, _placement_group, _ray_backend
from ._actor import ActorClass, ActorHandle
from ._object_ref import ObjectRef
from ._object_ref_generator import ObjectRefGenerator
from ._remote_function import RemoteFunction
from ._runtime import Runtime
from ._scheduling_strategies import NODE_ID
from ._session import current


def remote(*args, **options):
    """``@remote`` / ``@remote(**options)`` on a function (a task) or a class (an actor)."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args or not options:
        raise TypeError(
            "The @remote decorator must be applied either with no arguments and no "
            "parentheses, @shmray.remote, or with some options, "
            "@shmray.remote(num_cpus=2) (as in Ray)"
        )
    return lambda target: _make_remote(target, options)


def _make_remote(target, options: dict):
    if inspect.isclass(target):
        return ActorClass(target, options)
    if not callable(target):
        raise TypeError(f"remote() needs a function or a class, got {type(target).__name__}")
    return RemoteFunction(target, options)


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the object store; returns its ObjectRef."""
    if _ray_backend.ray is not None:
        return _ray_backend.ray.put(value)
    return current().put(value)


def get(object_refs, *, timeout: Optional[float] = None):
    """The value of one ObjectRef, or the values of a list of them, in order."""
    if _ray_backend.ray is not None:
        return _ray_backend.get(object_refs, timeout)
    runtime = current()
    if isinstance(object_refs, ObjectRef):
        _check_session(object_refs, runtime)
        return runtime.get_values([object_refs], _check_timeout(timeout))[0]
    if isinstance(object_refs, (list, tuple)):
        _check_refs(object_refs, "get", runtime)
        return runtime.get_values(list(object_refs), _check_timeout(timeout))
    if isinstance(object_refs, ObjectRefGenerator):
        raise TypeError(
            "get() can't take an ObjectRefGenerator (as in Ray): iterate it for the refs of "
            "its items and get() those, or get() its completed() to wait for the task's end"
        )
    raise TypeError(
        f"get() takes an ObjectRef or a list of ObjectRefs, got {type(object_refs).__name__}"
    )


def wait(object_refs, *, num_returns: int = 1, timeout: Optional[float] = None,
         fetch_local: bool = True):
    """(ready, not_ready): the first ``num_returns`` refs whose objects are ready, in input
    order.  An ObjectRefGenerator among them is ready when its ``next()`` would not wait."""
    if _ray_backend.ray is not None:
        return _ray_backend.wait(object_refs, num_returns, timeout, fetch_local)
    if isinstance(object_refs, ObjectRef) or not isinstance(object_refs, (list, tuple)):
        raise TypeError(
            f"wait() takes a list of ObjectRefs, got {type(object_refs).__name__}"
        )
    if not object_refs:
        return [], []  # before any num_returns check, as Ray does
    runtime = current()
    streams = {i: item._stream for i, item in enumerate(object_refs)
               if isinstance(item, ObjectRefGenerator)}
    as_refs = [item.completed() if i in streams else item for i, item in enumerate(object_refs)]
    _check_refs(as_refs, "wait", runtime)
    if len(set(as_refs)) != len(as_refs):
        raise ValueError("wait() got the same ObjectRef more than once")
    if not isinstance(num_returns, int) or (num_returns < 1 and object_refs):
        raise ValueError(f"num_returns must be an int >= 1, got {num_returns!r}")
    if num_returns > len(object_refs):
        raise ValueError(
            f"num_returns ({num_returns}) is more than the number of refs ({len(object_refs)})"
        )
    if streams:
        return runtime.wait_streams(list(object_refs), streams, num_returns,
                                    _check_timeout(timeout))
    return runtime.wait(list(object_refs), num_returns, _check_timeout(timeout))


def cancel(object_ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Stop the task that makes ``object_ref``; ``get`` of it then raises TaskCancelledError.

    A queued task is dropped; a running one gets KeyboardInterrupt, or with ``force=True``
    its worker is killed (and replaced).  ``recursive`` cancels the tasks it submitted too.
    Actor calls: queued ones are dropped and running async ones cancelled; ``force`` is not
    allowed for them (as in Ray).  A task that already finished is left alone.
    """
    if _ray_backend.ray is not None:
        return _ray_backend.ray.cancel(object_ref, force=force, recursive=recursive)
    if isinstance(object_ref, ObjectRefGenerator):
        object_ref = object_ref.completed()  # the generator's task
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(
            f"cancel() takes the ObjectRef of a task, got {type(object_ref).__name__}; to stop "
            "an actor use kill()"
        )
    current().cancel(object_ref, bool(force), bool(recursive))


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
    """What ``get_runtime_context()`` returns: where the code that asks runs (the job, the
    task or actor call, the actor, the worker, the node), as Ray's does."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime

    def get_job_id(self) -> str:
        return f"{self._runtime.options.get('job_id', 1):08x}"

    def get_task_id(self) -> Optional[str]:
        """The running task's or actor call's id (hex); None in the driver."""
        call = _context.running_call()
        return call.task_id.hex() if call is not None else None

    def get_task_name(self) -> Optional[str]:
        """Its name: ``options(name=...)``, else the function's (``Class.method`` for an
        actor call); None in the driver."""
        call = _context.running_call()
        return call.name if call is not None else None

    def get_task_function_name(self) -> Optional[str]:
        """The full name of what runs: ``module.function`` or ``module.Class.method``."""
        call = _context.running_call()
        if call is None:
            return None
        if isinstance(call.function, str):  # an actor's method, by name
            cls = _context.current_task.actor_class
            return f"{cls.__module__}.{cls.__qualname__}.{call.function}"
        function = call.function
        return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', '?')}"

    def get_worker_id(self) -> str:
        return f"{os.getpid():056x}"

    def get_node_id(self) -> str:
        return NODE_ID

    @property
    def node_id(self) -> str:
        return self.get_node_id()

    def get_actor_id(self) -> Optional[str]:
        actor_id = _context.current_task.actor_id
        return actor_id.hex() if actor_id is not None else None

    def get_actor_name(self) -> Optional[str]:
        options = _context.current_task.actor_options
        return options.get("name") if options else None

    @property
    def current_actor(self) -> "ActorHandle":
        """A handle to the actor this code runs in."""
        actor_id = _context.current_task.actor_id
        if actor_id is None:
            raise RuntimeError("current_actor is only available inside an actor's methods")
        return ActorHandle(ObjectRef(actor_id), _context.current_task.actor_options)

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """Whether this actor's process replaces one that died (a restart)."""
        return _context.current_task.restarted

    def get_assigned_resources(self) -> dict:
        """What the running task or actor holds (``{"CPU": 1.0}`` for a plain task)."""
        call = _context.running_call()
        if call is not None:
            return dict(call.resources)
        options = _context.current_task.actor_options
        return dict(options["hold"]) if options else {}

    def get_accelerator_ids(self) -> dict:
        """The accelerator ids this task or actor may use, as strings, by resource name:
        ``{"GPU": ["0"]}``; ``{"GPU": []}`` in the driver and where none was asked for."""
        return {"GPU": list(_context.current_task.gpu_ids)}

    def is_canceled(self) -> bool:
        """Whether the running task or actor call was cancelled (a sync actor call runs on
        after a cancel; it can look here and stop)."""
        call = _context.running_call()
        if call is None:
            raise RuntimeError("is_canceled() is only meaningful inside a task or actor call")
        return _context.is_canceled(call.task_id)

    def get_placement_group_id(self) -> Optional[str]:
        """The placement group the running task or actor is in (hex), or None."""
        return _placement_group.current_placement_group_id()

    @property
    def namespace(self) -> str:
        return self._runtime.options.get("namespace", "default")

    def get(self) -> dict:
        """The ids as a dict: the task's and the actor's only where there are some."""
        context = {"job_id": self.get_job_id(), "node_id": self.get_node_id(),
                   "namespace": self.namespace}
        if self.get_task_id() is not None:
            context["task_id"] = self.get_task_id()
        if self.get_actor_id() is not None:
            context["actor_id"] = self.get_actor_id()
        return context


def get_runtime_context() -> RuntimeContext:
    if _ray_backend.ray is not None:
        return _ray_backend.ray.get_runtime_context()
    return RuntimeContext(current())


def get_gpu_ids() -> list:
    """The GPU ids this task or actor may use (those in its ``CUDA_VISIBLE_DEVICES``): ints,
    or the strings ``CUDA_VISIBLE_DEVICES`` listed when the session started.  Empty in the
    driver, and in a task or actor that asked for no GPU."""
    if _ray_backend.ray is not None:
        return _ray_backend.ray.get_gpu_ids()
    runtime = current()
    return _accelerators.as_returned(_context.current_task.gpu_ids,
                                     runtime.options.get("gpus_named", False))


def cluster_resources() -> dict:
    """Every resource of this machine shmray schedules with (CPU, GPU, custom, memory)."""
    if _ray_backend.ray is not None:
        return _ray_backend.ray.cluster_resources()
    return current().query("resources")


def available_resources() -> dict:
    """The resources not held by running tasks right now."""
    if _ray_backend.ray is not None:
        return _ray_backend.ray.available_resources()
    runtime = current()
    runtime.return_idle_leases()  # a worker merely lent to us is available
    return runtime.query("available")


def nodes() -> list:
    """The one node: this machine (on a Ray cluster, Ray's nodes)."""
    if _ray_backend.ray is not None:
        return _ray_backend.ray.nodes()
    runtime = current()
    resources = runtime.query("resources")
    return [{
        "NodeID": NODE_ID,
        "Alive": True,
        "NodeManagerAddress": "127.0.0.1",
        "NodeManagerHostname": os.uname().nodename,
        "Resources": resources,
        "ObjectStoreSocketName": "memfd:shmray-arena",
    }]
