"""Large numpy buffers of a worker live in the arena, so a returned array is never copied.

Runs in: task workers.

A task that returns a large array used to pay for a copy of it into the arena: 8 ms for
128 MiB, 0.4 ms for a 600x600 matmul's product (which takes 5.5 ms), with both CPUs busy.
Ray copies too.  Instead, each worker gives numpy an allocator (numpy >= 1.22's
``PyDataMem_Handler``, in ``_lend.c``) that takes buffers of ``THRESHOLD`` bytes and more
from the arena, each the data of an unsealed object with room in front of it for the
object's header.  When the task's return value is such an array and nothing else refers to
it, the worker seals the buffer, header written in front, as the return object: no copy.
The array keeps a pin on the object until numpy frees it, a moment later.

Only a value the task hands over is adopted: an array with other references (a global, a
view, an actor's state) could still change after ``get`` returned it, so it is copied as
before.  Lent buffers can be neither spilled nor moved, so they must neither crowd out
objects nor cut the heap into pieces too small for them: they are taken from the top of the
heap (objects are packed at its bottom), only while half of the heap stays free, only up to
a sixteenth of the heap each, and only while the worker holds at most an eighth of the heap
in them.  A worker that keeps lent buffers past the task that made them (in a global, a
cache) lends no more: each kept buffer may cut the heap in two.  A process short of room
for an object waits up to 10 s for other processes' lent buffers to come back, if they
could make the room and are not kept (``_spill.Spiller.make_room``).  numpy's own allocator
serves everything else: small, huge or zeroed buffers, and every process but the task
workers.

A child the task forks gets private copies of the lent buffers it inherits (the arena
itself is shared), as of any other memory, but made at fork rather than on write; it lends
nothing.  A worker that dies leaves its lent buffers and the pins of its adopted ones to
the scheduler, which reaps them with the rest of its half-made objects.  As with malloc,
``np.empty`` returns whatever the memory held before: here, possibly bytes of a freed
object of the same session.
"""

from __future__ import annotations

import ctypes
import gc
import sys

import numpy as np

from ._serialization import array_header, lendable_array
from ._store_cffi import ffi, lib

THRESHOLD = 1 << 20
# Lent buffers can be neither spilled nor moved: each is at most this share of the heap, so
# that none can cut it into pieces too small for a large object.
_LARGEST_SHARE = 16
_MOST_LENT_SHARE = 8  # of the heap, to one worker at once: buffers it keeps can't hoard
_HANDLER_NAME = b"mem_handler"  # numpy's capsule name; these bytes outlive the capsule
_SET_HANDLER, _GET_HANDLER = 304, 305  # slots of numpy's C-API table, fixed since 1.22

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

_lending_store = None  # the store lent from, in this process


def _numpy_c_api():
    """numpy's C-API function table, or None before numpy 1.22 (no allocator handlers)."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath
    if not hasattr(umath, "get_handler_version"):
        return None
    table = _capsule_pointer(umath._ARRAY_API, None)
    return ctypes.cast(table, ctypes.POINTER(ctypes.c_void_p))


def _handler_functions():
    """numpy's (get, set) allocator-handler functions, or None if this numpy has none."""
    try:
        api = _numpy_c_api()
    except (ImportError, AttributeError, ValueError):  # a numpy unlike any we know: copy
        return None
    if api is None:
        return None
    return (ctypes.PYFUNCTYPE(ctypes.py_object)(api[_GET_HANDLER]),
            ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(api[_SET_HANDLER]))


# Found once, as this module is imported (in the driver): each worker forked from there
# would otherwise build them again as it starts, copying ~70 pages (0.3 ms) to do it.
_HANDLER_FUNCTIONS = _handler_functions()


def lend_to_numpy(store) -> bool:
    """Make numpy allocate this thread's large buffers in ``store``'s arena (see above)."""
    global _lending_store
    if _HANDLER_FUNCTIONS is None:
        return False
    get_handler, set_handler = _HANDLER_FUNCTIONS
    current = _capsule_pointer(get_handler(), _HANDLER_NAME)
    heap = store.statistics().heap_size
    ours = store.numpy_handler(current, THRESHOLD, heap // _LARGEST_SHARE,
                               heap // _MOST_LENT_SHARE, heap // 2)
    if not ours:
        return False
    set_handler(_capsule_new(ours, _HANDLER_NAME, None))
    _lending_store = store
    return True


def after_task() -> None:
    """Stop lending in this worker once it keeps lent buffers past the task that made them
    (in a global, a cache): they can't move, and more of them would split the heap.  Those
    only garbage holds (a reference cycle) go first: an idle worker collects none."""
    global _lending_store
    if _lending_store is not None and lib.shm_lent_outstanding():
        gc.collect()
        if lib.shm_lent_outstanding():
            lib.shm_lend_no_more()
            _lending_store = None  # nothing more to adopt, or to collect for


def handed_over(value) -> bool:
    """Whether ``value`` is a large array held by one reference alone (the caller's local
    variable), so nothing can change it once it is stored."""
    return (_lending_store is not None and type(value) is np.ndarray
            and value.nbytes >= THRESHOLD and sys.getrefcount(value) == _HELD_ONCE)


def _count_references(value) -> int:
    return sys.getrefcount(value)


def _references_of_one_local() -> int:
    """What getrefcount says, one call down, of an object that one local variable holds:
    the count handed_over compares with (it varies between Python versions)."""
    value = np.empty(1)
    return _count_references(value)


_HELD_ONCE = _references_of_one_local()


def adopt(object_id: bytes, value: np.ndarray, metadata: bytes) -> bool:
    """Seal ``value``'s buffer as the object ``object_id`` where it lies; False if it is
    not a whole lent buffer (store a copy then)."""
    if not lendable_array(value):
        return False
    address = value.ctypes.data
    prefix = lib.shm_lent_prefix(ffi.cast("void *", address))
    if not prefix:
        return False
    header = array_header(value, prefix)
    return _lending_store.adopt_lent(object_id, address, value.nbytes, header, metadata)
