"""``@shmray.remote`` on a function: ``f.remote(...)`` submits a task and returns ObjectRefs.

Runs in: the driver, and workers (tasks submit tasks).

Submitting costs one message: the function's code is pickled (cloudpickle, so closures and
functions defined in ``__main__`` after ``init`` work) and registered once per session; the
arguments are serialized with each top-level ObjectRef replaced by ``ArgRef(i)``, so the
scheduler knows the task's dependencies without unpickling anything.  Refs nested inside
containers stay refs (Ray's rule) and are held for the task while it is pending.  Large
top-level values are put into the object store first, as Ray does, so the message stays small
and the worker maps them without a copy.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict, List

from . import _context, _options, _pickling, _protocol as P
from ._ids import first_return_id, new_task_id, object_id_for_return
from ._object_ref import ObjectRef
from ._serialization import SCALARS, scalars_to_bytes, serialize
from ._session import current


class RemoteFunction:
    """A function turned into a task factory by ``@shmray.remote``."""

    def __init__(self, function, options: Dict[str, Any]):
        self._function = function
        self._name = getattr(function, "__name__", "function")
        self._options = {**_options.TASK_DEFAULTS,
                         **_options.check(options, _options.TASK_DEFAULTS, "remote functions")}
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

    def options(self, **options):
        merged = {**self._options,
                  **_options.check(options, _options.TASK_DEFAULTS, "remote functions")}
        fields = self._spec_fields(merged)
        parent = self

        class _Bound:
            def remote(self, *args, **kwargs):
                return parent._submit(args, kwargs, fields)

        return _Bound()

    def _spec_fields(self, options: Dict[str, Any]) -> tuple:
        """What a task's spec takes from its options, worked out once, not per call."""
        retry = options["retry_exceptions"]
        return (options.get("name") or self._name, options["num_returns"],
                _options.task_resources(options), options["max_retries"],
                list(retry) if isinstance(retry, (list, tuple)) else retry,
                _options.task_extra(options))

    def _code(self) -> bytes:
        if self._pickled is None:
            self._pickled = _pickling.dumps(self._function)
        return self._pickled

    def _submit(self, args, kwargs, fields):
        check_call(self._function, self._name, args, kwargs)
        runtime = _context.runtime  # this process's, if shmray runs
        if runtime is None:
            runtime = current()  # starts shmray if nobody has
        runtime.ensure_function(self._fn_id, self._code, self._name)
        task_id = new_task_id()
        args_blob, arg_ids, contained, temporaries = pack_arguments(runtime, args, kwargs)
        name, num_returns, resources, max_retries, retry, extra = fields
        spec = (task_id, self._fn_id, name, args_blob, arg_ids, contained, num_returns,
                resources, max_retries, retry, extra)
        return_ids = ([first_return_id(task_id)] if num_returns == 1 else
                      [object_id_for_return(task_id, i) for i in range(max(num_returns, 1))])
        refs = runtime.submit(spec, return_ids)
        del temporaries  # the task holds them now; our refs can go
        if num_returns == 0:
            return None
        return refs[0] if num_returns == 1 else refs


_signatures: dict = {}
_bindable: set = set()  # (function key, number of args, keywords) seen to bind


def check_call(function, name: str, args, kwargs, skip_self: bool = False) -> None:
    """TypeError at the call site if the arguments can't bind to ``function``'s parameters."""
    key = (function, skip_self)
    signature = _signatures.get(key)
    if signature is None:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):  # a builtin or C function: nothing to check
            signature = False
        if signature and skip_self:
            parameters = list(signature.parameters.values())[1:]
            signature = signature.replace(parameters=parameters)
        _signatures[key] = signature
    if signature:
        # Whether arguments bind depends on how many and which keywords, not on their
        # values: a shape that bound once binds again (bind() costs ~1 us a call).
        shape = (key, len(args), tuple(kwargs))
        if shape in _bindable:
            return
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}.remote(): {exc}") from None
        if len(_bindable) < 10_000:
            _bindable.add(shape)


def _rebuild(function, options, fn_id) -> "RemoteFunction":
    remote_function = RemoteFunction(function, options)
    remote_function._fn_id = fn_id
    return remote_function


def _user_options(options: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in options.items() if _options.TASK_DEFAULTS.get(k) != v}


def pack_arguments(runtime, args, kwargs):
    """(args blob, top-level ref ids, nested ref ids, temporary refs) for a task message."""
    if not args and not kwargs:
        return _NO_ARGUMENTS, [], [], []
    if not kwargs:  # most small tasks' arguments are a few numbers
        for a in args:
            if type(a) not in SCALARS:
                break
        else:
            return scalars_to_bytes((list(args), {})), [], [], []
    arg_ids: List[bytes] = []

    def placeholder(value):
        if isinstance(value, ObjectRef):
            arg_ids.append(value.binary())
            return P.ArgRef(len(arg_ids) - 1)
        return value

    packed_args = [placeholder(a) for a in args]
    packed_kwargs = {k: placeholder(v) for k, v in kwargs.items()}
    serialized = _serialize_arguments(packed_args, packed_kwargs)
    temporaries = []
    if serialized.total_size >= runtime.inline_threshold:
        # Put each large value into the store and pass it by reference.
        def promote(value):
            if isinstance(value, P.ArgRef):
                return value
            if serialize(value).total_size < runtime.inline_threshold:
                return value
            ref = runtime.put(value)
            temporaries.append(ref)
            arg_ids.append(ref.binary())
            return P.ArgRef(len(arg_ids) - 1)

        packed_args = [promote(a) for a in packed_args]
        packed_kwargs = {k: promote(v) for k, v in packed_kwargs.items()}
        serialized = _serialize_arguments(packed_args, packed_kwargs)
    return serialized.to_bytes(), arg_ids, list(serialized.contained_refs), temporaries


_NO_ARGUMENTS = serialize(([], {})).to_bytes()


def _serialize_arguments(args, kwargs):
    try:
        return serialize((args, kwargs))
    except TypeError as exc:
        for position, value in enumerate(args):
            _explain(f"argument {position}", value)
        for key, value in kwargs.items():
            _explain(f"keyword argument {key!r}", value)
        raise exc


def _explain(label: str, value) -> None:
    try:
        _pickling.trial_dumps(value)
    except Exception as exc:
        raise TypeError(
            f"{label} ({type(value).__qualname__}) can't be sent to a task: it can't be "
            f"pickled ({exc}). Pass what is needed to rebuild it instead, or create it inside "
            "the task."
        ) from exc
