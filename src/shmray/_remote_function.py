"""``@shmray.remote`` on a function: ``f.remote(...)`` submits a task and returns ObjectRefs.

Runs in: the driver, and workers (tasks submit tasks).

Submitting costs one message: the function's code is pickled (cloudpickle, so closures and
functions defined in ``__main__`` after ``init`` work) and registered once per session; what
the task's spec takes from its options is worked out once per ``options()``, not per call;
the arguments are checked and packed by ``_task_spec``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict

from . import _context, _options, _pickling, _placement_group, _protocol as P, _ray_backend
from ._ids import new_task_id
from ._session import current
from ._task_spec import check_call, pack_arguments, return_ids, task_spec
from .dag import FunctionNode


class RemoteFunction:
    """A function turned into a task factory by ``@shmray.remote``."""

    def __init__(self, function, options: Dict[str, Any]):
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            raise ValueError(  # Ray's text
                "'async def' should not be used for remote tasks. You can wrap the async "
                "function with `asyncio.run(f())`, or make it a method of an actor: an actor "
                "with async methods runs them on its event loop.")
        self._function = function
        self._name = getattr(function, "__name__", "function")
        options = _options.check(options, _options.TASK_DEFAULTS, "remote functions")
        self._options = {**_options.TASK_DEFAULTS, **options}
        if inspect.isgeneratorfunction(function) and "num_returns" not in options:
            self._options["num_returns"] = "streaming"  # Ray's default for a generator
        self._fn_id = os.urandom(16)
        self._pickled = None
        self._fields = self._spec_fields(self._options)
        self.__doc__ = function.__doc__
        self.__name__ = self._name
        self.__qualname__ = getattr(function, "__qualname__", self._name)
        self.__module__ = getattr(function, "__module__", None)

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"remote functions cannot be called directly: instead of {self._name}(), "
            f"call {self._name}.remote() and get() its result"
        )

    def __reduce__(self):
        # the id travels too: the code is registered and shipped once, wherever it is used
        return _rebuild, (self._function, _user_options(self._options), self._fn_id)

    def remote(self, *args, **kwargs):
        return self._submit(args, kwargs, self._fields)

    def bind(self, *args, **kwargs) -> FunctionNode:
        """This call, recorded in a graph (``shmray.dag``), made by ``execute()``."""
        return FunctionNode(self, args, kwargs, {})

    def options(self, **options):
        merged = {**self._options, **_options.check(options, _options.TASK_DEFAULTS,
                                                    "remote functions", in_options=True)}
        fields = self._spec_fields(merged)
        parent = self

        class _Bound:
            def remote(self, *args, **kwargs):
                return parent._submit(args, kwargs, fields, options)

            def bind(self, *args, **kwargs) -> FunctionNode:
                return FunctionNode(parent, args, kwargs, options)

        return _Bound()

    def _spec_fields(self, options: Dict[str, Any]) -> tuple:
        """What a task's spec takes from its options, worked out once, not per call."""
        name = options.get("name") or self._name
        resources = _options.task_resources(options)
        placement, capturable = _placement_group.resolve(options, resources, f"task {name}()")
        extra = _options.task_extra(options)
        if placement is not None:
            extra = {**(extra or {}), "placement": placement}
        return (name, _options.num_returns_code(options["num_returns"]), resources,
                options["max_retries"],
                _options.retry_exceptions_field(options["retry_exceptions"]), extra, capturable)

    def _code(self) -> bytes:
        if self._pickled is None:
            self._pickled = _pickling.dumps(self._function)
        return self._pickled

    def _submit(self, args, kwargs, fields, options=None):
        check_call(self._function, self._name, args, kwargs)
        runtime = _context.runtime  # this process's, if shmray runs
        if runtime is None and _ray_backend.ray is not None:  # the session is Ray's
            return _ray_backend.call(
                _ray_backend.remote_function(self, _user_options(self._options)),
                options, args, kwargs)
        if runtime is None:
            runtime = current()  # starts shmray if nobody has
        runtime.ensure_function(self._fn_id, self._code, self._name)
        task_id = new_task_id()
        args_blob, arg_ids, contained, temporaries = pack_arguments(runtime, args, kwargs,
                                                                    self._function)
        name, num_returns, resources, max_retries, retry, extra, capturable = fields
        if capturable and _context.current_task.placement is not None:
            extra = _captured(extra, resources, name)
        spec = task_spec(task_id, self._fn_id, name, args_blob, arg_ids, contained,
                         num_returns, resources, max_retries, retry, extra)
        refs = runtime.submit(spec, return_ids(task_id, num_returns))
        del temporaries  # the task holds them now; our refs can go
        if num_returns == 1 or num_returns == P.DYNAMIC:
            return refs[0]
        if num_returns == P.STREAMING:
            return runtime.generator(refs[0], task_id)
        return refs if num_returns else None


def _captured(extra, resources, name: str):
    """A task started without a strategy in a task or actor that runs in a placement
    group: into that group, if it captures its children."""
    placement = _context.current_task.placement
    if not placement[2]:
        return extra
    return {**(extra or {}),
            "placement": _placement_group.captured(placement, resources, f"task {name}()")}


def _rebuild(function, options, fn_id) -> "RemoteFunction":
    remote_function = RemoteFunction(function, options)
    remote_function._fn_id = fn_id
    return remote_function


def _user_options(options: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in options.items() if _options.TASK_DEFAULTS.get(k) != v}
