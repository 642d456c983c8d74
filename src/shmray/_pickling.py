"""cloudpickle, keeping where the code it pickles by value came from.

Runs in: every process.

Functions and classes defined in ``__main__``, in test modules, in notebooks or as closures
travel by value (cloudpickle), as in Ray.  Since cloudpickle 3.1.3 every code object pickled
that way is renamed ``<dynamic-code>`` (for payloads that don't depend on where code was
defined), so a remote traceback would lose the user's file names and source lines.  ``dumps``
pickles each code object with its real file name, and, for code whose file is not on disk
(a notebook cell, code typed at a prompt), with the source lines ``linecache`` holds for it;
unpickling puts those lines into the receiving process's ``linecache``, so its tracebacks
show them.  Nothing else differs from ``cloudpickle.dumps``, for every cloudpickle release
shmray allows (pyproject.toml).

Pickles of shmray's own (values for its messages, checks that never leave the process) are
told apart from the user's: an ObjectRef pickled in one of ours is recorded (the holder of
the value holds it too), one pickled by the user is exported (``Runtime.exported``).
"""

from __future__ import annotations

import io
import linecache
import os
import pickle
import threading
import types
from collections import ChainMap
from typing import Callable, List, Optional

import cloudpickle

_cloudpickle_code_reduce = cloudpickle.CloudPickler.dispatch_table[types.CodeType]


def _reduce_code(code: types.CodeType):
    rebuild, args = _cloudpickle_code_reduce(code)
    filename = code.co_filename
    return _rebuild_code, (rebuild, args, filename, _source_lines(filename))


def _source_lines(filename: str) -> Optional[list]:
    """The lines of a file that exists only in this process's linecache; None for a file
    on disk (the receiver, on this machine, reads it there) or one nobody knows."""
    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4 or _on_disk(filename):
        return None
    return entry[2]


_seen_on_disk: dict = {}  # file name -> whether it exists: one stat per file, not per code


def _on_disk(filename: str) -> bool:
    found = _seen_on_disk.get(filename)
    if found is None:
        if len(_seen_on_disk) > 4096:
            _seen_on_disk.clear()
        found = _seen_on_disk[filename] = os.path.exists(filename)
    return found


def _rebuild_code(rebuild: Callable, args: tuple, filename: str, lines: Optional[list]):
    code = rebuild(*args)
    if lines is not None and filename not in linecache.cache:
        # mtime None: linecache.checkcache() keeps the entry (it can't be stale).
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    return code if code.co_filename == filename else code.replace(co_filename=filename)


# type -> reducer, for the types given a serializer of the user's (``register_serializer``)
_custom_reducers: dict = {}


class _Pickler(cloudpickle.CloudPickler):
    dispatch_table = ChainMap(_custom_reducers, {types.CodeType: _reduce_code},
                              cloudpickle.CloudPickler.dispatch_table)


def register_serializer(cls: type, *, serializer: Callable, deserializer: Callable) -> None:
    """Pickle instances of exactly ``cls`` as ``serializer(instance)``, rebuilt by
    ``deserializer`` (which travels with them, so any process can rebuild them), in what
    this process sends from now on: as Ray's, per process (a process forked later inherits
    it)."""
    if not isinstance(cls, type):
        raise TypeError(f"register_serializer() takes a class, got {cls!r}")
    if not callable(serializer) or not callable(deserializer):
        raise TypeError("register_serializer() needs callable serializer= and deserializer=")

    def reduce(instance):
        return _deserialize_custom, (deserializer, serializer(instance))

    _custom_reducers[cls] = reduce


def deregister_serializer(cls: type) -> None:
    """Pickle ``cls`` as usual again; nothing happens if it had no serializer."""
    _custom_reducers.pop(cls, None)


def _deserialize_custom(deserializer: Callable, serialized):
    return deserializer(serialized)


def dumps(value, buffer_callback=None) -> bytes:
    """``cloudpickle.dumps(value, protocol=5)``, code keeping its file name and source."""
    with io.BytesIO() as file:
        _Pickler(file, protocol=5, buffer_callback=buffer_callback).dump(value)
        return file.getvalue()


loads = pickle.loads


class _OwnPickle(threading.local):
    refs: Optional[List[bytes]] = None  # in a pickle of shmray's own: ids of its refs


_own = _OwnPickle()


def start_own_pickle() -> Optional[List[bytes]]:
    """What this thread pickles from now on is shmray's own; returns what to hand to
    ``end_own_pickle`` (pickles of ours nest: a value's __reduce__ may call serialize)."""
    previous, _own.refs = _own.refs, []
    return previous


def end_own_pickle(previous: Optional[List[bytes]]) -> List[bytes]:
    """The ids of the refs pickled since the matching ``start_own_pickle``."""
    refs, _own.refs = _own.refs, previous
    return refs


def in_own_pickle() -> bool:
    return _own.refs is not None


def note_ref(object_id: bytes) -> None:
    """Called by ObjectRef.__reduce__: remember a ref pickled into a pickle of ours."""
    if _own.refs is not None:
        _own.refs.append(object_id)


def trial_dumps(value) -> bytes:
    """``dumps`` for a check that stays in this process (can it be pickled, and rebuilt?):
    refs in it don't leave, so they are not exported."""
    previous = start_own_pickle()
    try:
        return dumps(value)
    finally:
        end_own_pickle(previous)
