"""Values to bytes and back: pickle protocol 5 with out-of-band buffers.

Runs in: every process.

One layout serves both homes of an object, the arena (large values) and an inline bytes
string (small values, carried in messages), so one reader rebuilds either::

    offset 0   u32 FORMAT_MAGIC, u32 number of buffers n, u64 length of the pickle stream
    16         n x (u64 offset, u64 length) of each out-of-band buffer
    16 + 16n   the pickle stream (protocol 5; buffers are not in it)
    ...        each buffer, starting on a 64-byte boundary

A numpy array's data is such a buffer: ``put`` copies it once, straight into the arena, and
``get`` hands ``pickle.loads`` read-only slices of the arena, so the array it returns is a
view of shared memory (zero copies).  Alignment keeps those views SIMD-friendly.

Values are pickled with cloudpickle, as in Ray, so functions, lambdas and classes defined in
``__main__`` after ``init`` travel by value; plain data (scalars, numpy arrays, shallow
containers of them) takes the C pickler directly, which is several times faster for it.

ObjectRefs inside a value are recorded while it is pickled (``contained_refs``): the holder of
the outer object holds the inner ones too.
"""

from __future__ import annotations

import pickle
import struct
from typing import List, Sequence, Tuple

import numpy as np

from . import _pickling

ALIGN = 64
FORMAT_MAGIC = 0x53485231  # "SHR1"
ARRAY_MAGIC = 0x53485241   # "SHRA": a plain numpy array, see _layout_array
_head = struct.Struct("<IIQ")
_span = struct.Struct("<QQ")
_PLAIN_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes})
_CONTAINERS = (tuple, list)


def _is_plain(value, depth: int = 2) -> bool:
    """True if the C pickler can take ``value`` as it is: built-in scalars, numpy arrays of
    built-in dtypes, and shallow tuples/lists/dicts of those.  Anything else (functions,
    classes, instances of classes that may live only in ``__main__``) needs cloudpickle,
    which pickles them by value; checking costs far less than cloudpickle's per-object hook
    (on a small array: 3.8 us against 10.5 us for the pickling itself)."""
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return True
    if kind is np.ndarray:
        return not value.dtype.hasobject
    if depth and kind in _CONTAINERS:
        return all(_is_plain(item, depth - 1) for item in value)
    if depth and kind is dict:
        return all(type(k) in _PLAIN_TYPES and _is_plain(v, depth - 1)
                   for k, v in value.items())
    return False


# Metadata tags: what kind of value the bytes hold.
META_VALUE = b""
META_ERROR = b"E"  # a pickled RayError: get raises it instead of returning it


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class SerializedObject:
    """A value pickled, its buffers not yet copied anywhere.

    ``header`` holds the layout table and the pickle stream; ``buffers`` are
    ``(offset, memoryview)`` pairs to copy to those offsets; ``data_size`` is the total.
    """

    __slots__ = ("header", "buffers", "data_size", "metadata", "contained_refs")

    def __init__(self, header: bytes, buffers: List[Tuple[int, memoryview]], data_size: int,
                 metadata: bytes, contained_refs: Sequence[bytes]):
        self.header = header
        self.buffers = buffers
        self.data_size = data_size
        self.metadata = metadata
        self.contained_refs = contained_refs

    @property
    def total_size(self) -> int:
        return self.data_size + len(self.metadata)

    def to_bytes(self) -> bytes:
        """The whole object as one bytes string (for values kept inline)."""
        out = bytearray(self.data_size)
        out[: len(self.header)] = self.header
        for offset, buf in self.buffers:
            out[offset : offset + buf.nbytes] = buf
        return bytes(out)


def serialize(value, metadata: bytes = META_VALUE) -> SerializedObject:
    """Pickle ``value``; raise TypeError naming the value's type if it can't be pickled.

    A value serialized already is returned as it is, so ``put(serialize(x))`` stores ``x``:
    a caller that had to serialize a value to decide where it goes (a queue's put, by its
    size) does not pay for pickling it twice (170 ms for a list of 100k tuples)."""
    if type(value) is SerializedObject:
        return value
    if type(value) is np.ndarray and _plain_array(value):
        return _layout_array(value, metadata)
    raw_buffers: List[pickle.PickleBuffer] = []
    previous = _pickling.start_own_pickle()
    try:
        if _is_plain(value):
            stream = pickle.dumps(value, protocol=5, buffer_callback=raw_buffers.append)
        else:
            stream = _pickling.dumps(value, buffer_callback=raw_buffers.append)
    except Exception as exc:
        raise TypeError(
            f"Could not serialize {short_repr(value)}:\n!!! FAIL serialization: {exc}\n"
            "shmray pickles values with cloudpickle; objects holding locks, open files, "
            "sockets or generators can't be pickled: pass what is needed to rebuild them."
        ) from exc
    finally:
        contained = _pickling.end_own_pickle(previous)
    return _layout(stream, raw_buffers, metadata, contained)


def short_repr(value, limit: int = 500) -> str:
    """``repr(value)`` for an error message: cut short, and never raising."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= limit else f"{text[:limit]}..."


SCALARS = frozenset({type(None), bool, int, float})


def scalars_to_bytes(value) -> bytes:
    """The inline bytes of a value made of ``SCALARS`` in tuples, lists and dicts only (the
    caller checked): no buffer and no ref can be inside, so ``serialize``'s checks and
    layout are skipped (0.6 us against 2.5 us for a task's few int arguments)."""
    stream = pickle.dumps(value, protocol=5)
    return _head.pack(FORMAT_MAGIC, 0, len(stream)) + stream


def _layout(stream: bytes, raw_buffers: Sequence[pickle.PickleBuffer], metadata: bytes,
            contained: Sequence[bytes]) -> SerializedObject:
    views = [buf.raw() for buf in raw_buffers]
    table_end = _head.size + _span.size * len(views)
    position = table_end + len(stream)
    spans = []
    for view in views:
        position = _align(position)
        spans.append((position, view))
        position += view.nbytes
    header = bytearray(_head.pack(FORMAT_MAGIC, len(views), len(stream)))
    for offset, view in spans:
        header += _span.pack(offset, view.nbytes)
    header += stream
    return SerializedObject(bytes(header), spans, position, metadata, contained)


def deserialize_inline(data: bytes):
    """``deserialize`` for a value that came as bytes (inline in a message): its buffers
    are 64-byte aligned from the start of the value, which a bytes object's data may not
    be.  One holding a buffer of ``REALIGN_MIN`` or more is moved to memory that is: a
    large array arrives aligned wherever it was kept."""
    view = memoryview(data)
    if len(data) >= REALIGN_MIN and _has_large_buffer(view):
        view = _aligned(view)
    return deserialize(view)


REALIGN_MIN = 4096  # smaller buffers fit a cache line or two: their alignment buys nothing


def _has_large_buffer(data: memoryview) -> bool:
    magic, count, _ = _head.unpack_from(data, 0)
    if magic == ARRAY_MAGIC:
        return True  # the array is all the value is, and the value is that large
    return any(_span.unpack_from(data, _head.size + _span.size * i)[1] >= REALIGN_MIN
               for i in range(count))


def _aligned(data: memoryview) -> memoryview:
    """``data``, or a read-only copy of it that starts on an ``ALIGN`` boundary."""
    source = np.frombuffer(data, np.uint8)
    if source.ctypes.data % ALIGN == 0:
        return data
    room = np.empty(len(source) + ALIGN, np.uint8)
    skip = (-room.ctypes.data) % ALIGN
    copy = room[skip : skip + len(source)]
    copy[:] = source
    copy.flags.writeable = False
    return memoryview(copy)


def deserialize(data: memoryview):
    """Rebuild a value from its bytes; out-of-band buffers become slices of ``data``.

    ``data`` should be read-only: numpy arrays rebuilt over read-only buffers are read-only,
    which is what keeps shared objects immutable.
    """
    magic, count, stream_len = _head.unpack_from(data, 0)
    if magic == ARRAY_MAGIC:
        return _rebuild_array(data)
    if magic != FORMAT_MAGIC:
        raise ValueError("not a shmray object (bad format magic); the store may be corrupt")
    buffers = []
    position = _head.size
    for _ in range(count):
        offset, length = _span.unpack_from(data, position)
        buffers.append(data[offset : offset + length])
        position += _span.size
    return pickle.loads(data[position : position + stream_len], buffers=buffers)


# -- numpy arrays without pickle ---------------------------------------------------------
#
# A plain array (contiguous, a built-in dtype without fields) is the most common value by
# far, and numpy's own pickling costs 3.8 us to write and 3.3 us to rebuild a 1 KiB one here.
# Its own layout is a header and the raw bytes, rebuilt with frombuffer + reshape (zero-copy,
# read-only over the arena):
#
#     u32 ARRAY_MAGIC, u32 ndim, u64 data offset, u32 fortran, u32 len(dtype str)
#     ndim x u64 shape, the dtype string (e.g. b"<f8", b"<M8[ns]"), then at the 64-byte
#     aligned data offset, the bytes in memory order

_ARRAY_KINDS = frozenset("biufcmMSU")
_array_head = struct.Struct("<IIQII")
_dtypes: dict = {}  # dtype string -> np.dtype: parsing one costs more than the rest of a get


def _plain_array(value: np.ndarray) -> bool:
    dtype = value.dtype
    return (dtype.kind in _ARRAY_KINDS and dtype.fields is None and dtype.subdtype is None
            and (value.flags.c_contiguous or value.flags.f_contiguous))


def _layout_array(value: np.ndarray, metadata: bytes) -> SerializedObject:
    start = _align(_array_head.size + 8 * value.ndim + len(value.dtype.str))
    header = array_header(value, start)
    # a byte view: datetime arrays, for one, can't export a buffer of their own dtype
    raw = memoryview(value.ravel(order="K").view(np.uint8)) if value.size else memoryview(b"")
    return SerializedObject(header, [(start, raw)], start + raw.nbytes, metadata, ())


def array_header(value: np.ndarray, start: int) -> bytes:
    """The header of a plain array whose bytes begin ``start`` bytes into its object."""
    dtype = value.dtype.str.encode()
    fortran = int(value.ndim > 1 and not value.flags.c_contiguous)
    shape = struct.pack(f"<{value.ndim}Q", *value.shape)
    return _array_head.pack(ARRAY_MAGIC, value.ndim, start, fortran, len(dtype)) + shape + dtype


def lendable_array(value) -> bool:
    """A plain array that owns its one contiguous buffer (what _lend can adopt)."""
    return type(value) is np.ndarray and value.flags.owndata and _plain_array(value)


def _rebuild_array(data: memoryview) -> np.ndarray:
    _, ndim, start, fortran, dtype_len = _array_head.unpack_from(data, 0)
    shape = struct.unpack_from(f"<{ndim}Q", data, _array_head.size)
    position = _array_head.size + 8 * ndim
    code = bytes(data[position : position + dtype_len])
    dtype = _dtypes.get(code)
    if dtype is None:
        dtype = _dtypes[code] = np.dtype(code.decode())
    flat = np.frombuffer(data[start:], dtype=dtype) if dtype.itemsize else \
        np.empty(0, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C")
