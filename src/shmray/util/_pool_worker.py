"""The process behind a ``Pool`` or ``ProcessPoolExecutor`` worker: an actor that runs chunks
of calls, with one module namespace per process for the functions it is sent.

Runs in: pool worker actors (``PoolWorker``); the driver (``pack_function``, ``share_large``).

Why functions are rebound here.  In ``multiprocessing`` a worker is a fork of the script, so
an ``initializer`` that sets a module global and the mapped function that reads it see one
``__main__``.  shmray ships functions defined in ``__main__`` (or a test module, a notebook)
by value with cloudpickle, and each unpickled function gets its own copy of the globals it
names: the initializer would set a global the mapped function never sees (Ray's Pool has
that bug).  So each worker keeps one namespace dict per module it receives functions of by
value, and rebinds every such function (``types.FunctionType`` over the same code, closure
and defaults) to that dict.  A name the namespace already holds keeps its value (what the
initializer or an earlier call set wins over the snapshot the function carried, as in a
forked worker, where later changes in the parent are never seen); a name it lacks is taken
from the function's pickled globals, with the functions among them rebound too, so helpers
the function calls share the namespace.  Functions of importable modules are pickled by
reference and already use their real module, so they are left alone.  Classes pickled by
value keep cloudpickle's behaviour (their methods' globals are not rebound).

Functions travel as bytes pickled once per map (``pack_function``) and each worker unpickles
and rebinds a given function once, so repeated calls of one function share one object.
"""

from __future__ import annotations

import functools
import pickle
import sys
import types
from typing import Any, Dict

from .._api import get, put
from .._pickling import dumps

# Arrays at least this big go into the store once per map, however many items name them.
_SHARE_AT_BYTES = 100 * 1024
_MAX_CACHED_FUNCTIONS = 256

MAP, STAR, CALL = 0, 1, 2  # how a chunk's items are applied: f(x), f(*x), f(*args, **kwargs)


def pack_function(fn) -> bytes:
    return dumps(fn)


class _Stored:
    """An argument replaced by its ref in the store, resolved back in the worker."""

    __slots__ = ("ref",)

    def __init__(self, ref):
        self.ref = ref


def share_large(items: list, refs: Dict[int, Any]) -> list:
    """``items`` with large numpy arrays (as items, or inside an item's tuple or list)
    replaced by refs: ``refs`` (id -> ref) puts each array once per map, and the caller
    keeps it until the map is done, so the arrays stay stored."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return items
    ndarray = numpy.ndarray

    def shared(value):
        if type(value) is ndarray and value.nbytes >= _SHARE_AT_BYTES:
            stored = refs.get(id(value))
            if stored is None:
                stored = refs[id(value)] = (_Stored(put(value)), value)
            return stored[0]
        if type(value) in (tuple, list) and any(type(v) is ndarray for v in value):
            return type(value)(shared(v) for v in value)
        return value

    return [shared(item) for item in items]


def _resolved(value):
    if type(value) is _Stored:
        return get(value.ref)
    if type(value) in (tuple, list) and any(type(v) is _Stored for v in value):
        return type(value)(_resolved(v) for v in value)
    return value


class Namespaces:
    """One globals dict per module whose functions arrive by value, in this process."""

    def __init__(self):
        self.modules: Dict[str, dict] = {}

    def rebound(self, fn):
        if isinstance(fn, types.FunctionType):
            return self._rebind_function(fn, {})
        if isinstance(fn, functools.partial) and isinstance(fn.func, types.FunctionType):
            return functools.partial(self._rebind_function(fn.func, {}), *fn.args,
                                     **fn.keywords)
        return fn

    def _rebind_function(self, fn: types.FunctionType, done: dict):
        module = sys.modules.get(fn.__module__)
        if module is not None and fn.__globals__ is getattr(module, "__dict__", None):
            return fn  # pickled by reference: already in its real module
        if id(fn) in done:
            return done[id(fn)]
        namespace = self.modules.get(fn.__module__)
        if namespace is None:
            namespace = self.modules[fn.__module__] = {"__name__": fn.__module__,
                                                       "__builtins__": __builtins__}
        new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
        new.__kwdefaults__ = fn.__kwdefaults__
        new.__qualname__ = fn.__qualname__
        new.__module__ = fn.__module__
        new.__doc__ = fn.__doc__
        new.__dict__.update(fn.__dict__)
        done[id(fn)] = new
        for name, value in list(fn.__globals__.items()):
            if name in namespace:
                continue
            if isinstance(value, types.FunctionType) and value.__globals__ is fn.__globals__:
                value = self._rebind_function(value, done)
            namespace[name] = value
        return new


class PoolWorker:
    """One pool worker process: runs the initializer once, then chunks of calls in order."""

    def __init__(self, initializer_blob, initargs: tuple):
        self.namespaces = Namespaces()
        self.functions: Dict[bytes, Any] = {}
        if initializer_blob is not None:
            self._function(initializer_blob)(*initargs)

    def _function(self, blob: bytes):
        fn = self.functions.get(blob)
        if fn is None:
            if len(self.functions) >= _MAX_CACHED_FUNCTIONS:
                self.functions.clear()
            fn = self.functions[blob] = self.namespaces.rebound(pickle.loads(blob))
        return fn

    def run(self, blob: bytes, mode: int, items: list) -> list:
        fn = self._function(blob)
        if mode == MAP:
            return [fn(_resolved(item)) for item in items]
        if mode == STAR:
            return [fn(*_resolved(args)) for args in items]
        return [fn(*_resolved(args), **kwargs) for args, kwargs in items]
