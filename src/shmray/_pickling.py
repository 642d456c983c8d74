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
"""

from __future__ import annotations

import io
import linecache
import os
import pickle
import types
from collections import ChainMap
from typing import Callable, Optional

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
    if entry is None or len(entry) != 4 or os.path.exists(filename):
        return None
    return entry[2]


def _rebuild_code(rebuild: Callable, args: tuple, filename: str, lines: Optional[list]):
    code = rebuild(*args)
    if lines is not None and filename not in linecache.cache:
        # mtime None: linecache.checkcache() keeps the entry (it can't be stale).
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    return code if code.co_filename == filename else code.replace(co_filename=filename)


class _Pickler(cloudpickle.CloudPickler):
    dispatch_table = ChainMap({types.CodeType: _reduce_code},
                              cloudpickle.CloudPickler.dispatch_table)


def dumps(value, buffer_callback=None) -> bytes:
    """``cloudpickle.dumps(value, protocol=5)``, code keeping its file name and source."""
    with io.BytesIO() as file:
        _Pickler(file, protocol=5, buffer_callback=buffer_callback).dump(value)
        return file.getvalue()


loads = pickle.loads
