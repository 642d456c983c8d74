"""A call's message: its arguments checked and packed, its TaskSpec or ActorSpec built.

Runs in: the driver, workers and actors (whoever calls ``.remote()``).

Every task, actor creation and actor call is built here, the one place that knows the
spec tuples' layout besides ``_protocol``, which documents it.  Arguments are serialized
with each top-level ObjectRef replaced by ``ArgRef(i)``, so the scheduler knows a call's
dependencies without unpickling anything.  Refs nested inside containers stay refs (Ray's
rule) and are held for the call while it is pending.  Large top-level values are put into
the object store first, as Ray does, so the message stays small and the worker maps them
without a copy.  A call whose arguments can't bind to the function's parameters, or can't
be pickled, raises ``TypeError`` at the call, naming the argument.
"""

from __future__ import annotations

import inspect
from typing import List, Optional

from . import _pickling, _protocol as P
from ._check_serialize import serializability_report
from ._ids import first_return_id, object_id_for_return
from ._object_ref import ObjectRef, _runtime_for
from ._serialization import (
    META_VALUE,
    SCALARS,
    deserialize_inline,
    scalars_to_bytes,
    serialize,
    short_repr,
)


def task_spec(task_id: bytes, fn_id, name: str, args_blob: bytes, arg_ids, contained,
              num_returns: int, resources: dict, max_retries: int, retry_exceptions,
              extra) -> tuple:
    """A TaskSpec (``_protocol``): a task, or an actor call (``fn_id`` is then the method's
    name, ``resources`` empty)."""
    return (task_id, fn_id, name, args_blob, arg_ids, contained, num_returns, resources,
            max_retries, retry_exceptions, extra)


def actor_spec(actor_id: bytes, class_id: bytes, class_name: str, args_blob: bytes, arg_ids,
               contained, options: dict) -> tuple:
    """An ActorSpec (``_protocol``)."""
    return (actor_id, class_id, class_name, args_blob, arg_ids, contained, options)


def return_ids(task_id: bytes, num_returns: int) -> List[bytes]:
    """The ids of a call's results (one, hidden, for ``num_returns=0``)."""
    if num_returns == 1:
        return [first_return_id(task_id)]
    return [object_id_for_return(task_id, i) for i in range(max(num_returns, 1))]


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
    if signature and (key, len(args), tuple(kwargs)) not in _bindable:  # as _check_bind's
        _check_bind(signature, key, name, args, kwargs)


def _check_bind(signature: inspect.Signature, key, name: str, args, kwargs) -> None:
    # Whether arguments bind depends on how many and which keywords, not on their values:
    # a shape that bound once binds again (bind() costs ~1 us a call).
    shape = (key, len(args), tuple(kwargs))
    if shape in _bindable:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{name}.remote(): {exc}") from None
    if len(_bindable) < 10_000:
        _bindable.add(shape)


def parameters_of(function, skip_self: bool = False) -> Optional[tuple]:
    """``function``'s parameters as plain data that pickles anywhere: (name, kind, whether
    it has a default) each; None if it has no signature to check against."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    if skip_self:
        parameters = parameters[1:]
    return tuple((p.name, int(p.kind), p.default is not inspect.Parameter.empty)
                 for p in parameters)


def check_parameters(parameters: tuple, name: str, args, kwargs) -> None:
    """``check_call`` against parameters from ``parameters_of``."""
    signature = _signatures.get(parameters)
    if signature is None:
        signature = _signatures[parameters] = inspect.Signature([
            inspect.Parameter(p_name, kind, default=None if has_default else
                              inspect.Parameter.empty)
            for p_name, kind, has_default in parameters])
    _check_bind(signature, parameters, name, args, kwargs)


def pack_arguments(runtime, args, kwargs, callee=None, method=None):
    """(args blob, top-level ref ids, nested ref ids, temporary refs) for a task message.
    ``callee`` (the function, the actor's class or its name) and ``method`` are named by
    the error for an argument that can't be pickled."""
    if not args and not kwargs:
        return _NO_ARGUMENTS, [], [], []
    if not kwargs:  # most small tasks' arguments are a few numbers, or refs and numbers
        for a in args:
            if type(a) not in SCALARS:
                break
        else:
            return scalars_to_bytes((list(args), {})), [], [], []
        packed = _refs_and_scalars(runtime, args)
        if packed is not None:
            return packed
    arg_ids: List[bytes] = []

    def placeholder(value):
        if isinstance(value, ObjectRef):
            if value._tracker is not runtime:
                _runtime_for(value)  # raises: a ref of a session shut down
            arg_ids.append(value.binary())
            return P.ArgRef(len(arg_ids) - 1)
        return value

    packed_args = [placeholder(a) for a in args]
    packed_kwargs = {k: placeholder(v) for k, v in kwargs.items()}
    serialized = _serialize_arguments(packed_args, packed_kwargs, callee, method)
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
        serialized = _serialize_arguments(packed_args, packed_kwargs, callee, method)
    return serialized.to_bytes(), arg_ids, list(serialized.contained_refs), temporaries


_NO_ARGUMENTS = serialize(([], {})).to_bytes()


def _refs_and_scalars(runtime, args):
    """``pack_arguments`` of positional arguments that are all ObjectRefs or ``SCALARS``
    (the usual task of a DAG): the C pickler takes them as they are once each ref is an
    ``ArgRef``, with no cloudpickle and no size check (1 us against 8 us); None if any
    argument is something else.

    A ref to a number that only this process has (a result of a task it ran on a worker
    it leases: ``Objects.owner_only``) goes as its value, which is what the task gets
    anyway: a task taking only those is a plain task, run on a lease, and the scheduler
    never has to learn of the object.  (Others go through the scheduler, which knows
    their objects already.)"""
    arg_ids = []
    packed = []
    objects = runtime.objects
    owner_only = getattr(objects, "owner_only", None)  # local mode has none: runs no lease
    for a in args:
        kind = type(a)
        if kind is ObjectRef:
            if a._tracker is not runtime:
                _runtime_for(a)  # raises: a ref of a session shut down
            object_id = a.binary()
            if owner_only is not None and object_id in objects.direct_pending:
                runtime.take_arrived(object_id)  # it may be back already, unread
            if owner_only and object_id in owner_only:
                value = _number_at(objects.locations.get(object_id))
                if value is not _NOT_A_NUMBER:
                    packed.append(value)
                    continue
            arg_ids.append(object_id)
            packed.append(P.ArgRef(len(arg_ids) - 1))
        elif kind in SCALARS:
            packed.append(a)
        else:
            return None
    return scalars_to_bytes((packed, {})), arg_ids, [], []


_NOT_A_NUMBER = object()


def _number_at(location):
    """The value at an object's ``location`` in this process if it is one of ``SCALARS``
    (pickled, they are a few dozen bytes: nothing longer is looked into)."""
    if location is None:
        return _NOT_A_NUMBER
    data, metadata = location
    if metadata != META_VALUE or data is None or len(data) > 64:
        return _NOT_A_NUMBER
    value = deserialize_inline(data)
    return value if type(value) in SCALARS else _NOT_A_NUMBER


def _serialize_arguments(args, kwargs, callee, method):
    try:
        return serialize((args, kwargs))
    except TypeError as exc:
        for value in (*args, *kwargs.values()):
            _explain(value, callee, method)
        raise exc


def _explain(value, callee, method) -> None:
    """Ray's TypeError for an argument that can't be pickled, if ``value`` is one."""
    try:
        _pickling.trial_dumps(value)
    except Exception as exc:
        raise TypeError(
            f"Could not serialize the argument {short_repr(value)} for a task or actor "
            f"{_callee_name(callee, method)}:\n{serializability_report(value)}"
            "shmray pickles arguments with cloudpickle; objects holding locks, open files, "
            "sockets or generators can't be pickled: pass what is needed to rebuild one "
            "instead, or create it inside the task."
        ) from exc


def _callee_name(callee, method) -> str:
    """``module.qualname`` of a function or class (Ray's function descriptor), then the
    method's name."""
    name = callee if isinstance(callee, str) else \
        f"{getattr(callee, '__module__', '?')}.{getattr(callee, '__qualname__', callee)}"
    return f"{name}.{method}" if method else name
