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
The chunks of a call travel as one pickle, and their results come back as one
(``pack_call``, ``_packed_results``), unless they hold large arrays.
"""

from __future__ import annotations

import functools
import sys
import types
from itertools import starmap
from typing import Any, Dict, List, Optional

from .._api import get, put
from .._pickling import dumps, loads
from .._task_results import task_error

# Arrays at least this big go into the store once per map, however many items name them.
_SHARE_AT_BYTES = 100 * 1024
_MAX_CACHED_FUNCTIONS = 256

MAP, STAR, CALL = 0, 1, 2  # how a chunk's items are applied: f(x), f(*x), f(*args, **kwargs)
RESOLVE = 4  # added to the mode when items hold arrays put in the store (``share_large``)
_SEQUENCES = {tuple, list}


def pack_function(fn) -> bytes:
    return dumps(fn)


class _Stored:
    """An argument replaced by its ref in the store, resolved back in the worker."""

    __slots__ = ("ref",)

    def __init__(self, ref):
        self.ref = ref


class _LargeBuffer(Exception):
    """A pickle met a buffer worth passing through the store (raised to stop it)."""


def _in_band_if_small(buffer) -> bool:
    if memoryview(buffer).nbytes >= _SHARE_AT_BYTES:
        raise _LargeBuffer
    return True  # pickle writes it in the stream


def _pickle_small(value) -> Optional[bytes]:
    """``value`` as one pickle, or None if it holds a large buffer (an array), which is
    better passed through the store as it is: zero-copy, once.  The check rides on the
    pickling (protocol 5 hands every buffer to the callback), so a value without arrays
    costs no extra pass."""
    try:
        return dumps(value, buffer_callback=_in_band_if_small)
    except _LargeBuffer:
        return None


def pack_call(chunks: List[tuple], refs: Dict[int, Any]):
    """A call's chunks ((mode, items) pairs) as ``PoolWorker.run`` takes them.

    One pickle for the whole call, made as the call is sent: an actor call's argument list
    of thousands of small items costs shmray's serialization far more (about 0.1 ms per
    thousand) than one bytes object does, and a pickle per call rather than per chunk
    saves a pickler's set-up per chunk on both sides.  If the items hold large numpy
    arrays, they go as they are instead, each array put in the store once however many
    items of the map name it (``refs``, id -> ref, shared by the map's calls), and are
    resolved back in the worker."""
    try:
        data = _pickle_small(chunks)
    except Exception:  # shmray's own serialization says what can't be pickled, and why
        data = None
    if data is not None:
        return data
    return [(mode | RESOLVE, _share_large(items, refs)) for mode, items in chunks]


def _share_large(items: list, refs: Dict[int, Any]) -> list:
    """``items`` with large numpy arrays (as items, or inside their tuples, lists and
    dicts) replaced by refs: ``refs`` (id -> ref) puts each array once per map."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return items
    return [_shared(item, refs, numpy.ndarray) for item in items]


def _shared(value, refs: Dict[int, Any], ndarray):
    # A module function, not a closure: a closure that calls itself is a reference cycle,
    # which would keep ``refs``, and so every argument of the map in the store, until the
    # cyclic garbage collector ran; new objects meanwhile land in arena pages never
    # touched, at a page fault each.
    if type(value) is ndarray and value.nbytes >= _SHARE_AT_BYTES:
        stored = refs.get(id(value))
        if stored is None:
            stored = refs[id(value)] = (_Stored(put(value)), value)
        return stored[0]
    if type(value) in _SEQUENCES:
        return type(value)(_shared(v, refs, ndarray) for v in value)
    if type(value) is dict:
        return {k: _shared(v, refs, ndarray) for k, v in value.items()}
    return value


def _packed_results(results: list):
    """The results (a list per chunk) as one pickle, unless they hold large buffers
    (arrays), which go back through the store as they are (zero-copy)."""
    try:
        data = _pickle_small(results)
    except Exception:  # shmray's serialization of the result reports it
        return results
    return results if data is None else data


def unpack_results(value) -> list:
    """What ``PoolWorker.run`` returned, as the list of each chunk's results."""
    return loads(value) if type(value) is bytes else value


def _resolved(value):
    if type(value) is _Stored:
        return get(value.ref)
    if type(value) in _SEQUENCES:
        return type(value)(_resolved(v) for v in value)
    if type(value) is dict:
        return {k: _resolved(v) for k, v in value.items()}
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
            fn = self.functions[blob] = self.namespaces.rebound(loads(blob))
        return fn

    def run(self, blob: bytes, chunks) -> Any:
        """Each chunk's results (``chunks``: what ``pack_call`` made), packed for the trip.
        A chunk alone raises as any actor call does; chunks sharing a call each have
        their own outcome (a ``ChunkFailed`` for one that raised)."""
        fn = self._function(blob)
        if type(chunks) is bytes:
            chunks = loads(chunks)
        if len(chunks) == 1:
            mode, items = chunks[0]
            return _packed_results([_run_chunk(fn, mode, items)])
        results = []
        for mode, items in chunks:
            try:
                results.append(_run_chunk(fn, mode, items))
            except Exception as exc:
                results.append(ChunkFailed(task_error(_name_of(fn), exc)))
        return _packed_results(results)


class ChunkFailed:
    """The error a chunk of a shared call raised (a ``RayTaskError``, as a call's own)."""

    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error

    def __reduce__(self):
        return ChunkFailed, (self.error,)


def _name_of(fn) -> str:
    fn = getattr(fn, "func", fn)  # a functools.partial's
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _run_chunk(fn, mode: int, items) -> list:
    if mode & RESOLVE:
        items = [_resolved(item) for item in items]
    mode &= 3
    if mode == MAP:
        return list(map(fn, items))
    if mode == STAR:
        return list(starmap(fn, items))
    return [fn(*args, **kwargs) for args, kwargs in items]
