"""The Python face of the C object store (``_store.c``): one arena, mapped in this process.

Runs in: every process of a session (the driver creates the arena before anything forks;
children inherit the mapping and this handle).

- C returns status codes; ``_raise_for`` is the one place that turns them into exceptions.
- ``pinned_view`` returns a read-only memoryview whose root is a cffi ``ffi.gc`` handle: the
  object stays pinned (it can't be freed or spilled) until the last Python object built on
  those bytes, typically a numpy array, is garbage-collected.
- The mapping belongs to ``_Arena``; views keep it alive, so arrays a user still holds stay
  valid after ``shutdown``, and the memory goes back to the kernel when the last one dies.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, List, Optional

from . import exceptions
from ._store_cffi import ffi, lib

ID_SIZE = lib.SHM_ID_SIZE
MIN_OBJECT_STORE_MEMORY = 75 * 1024 * 1024  # Ray's minimum
LENT_MARK = b"\xff" * 8  # how the ids of buffers lent to numpy begin (_lend.c)
_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
_LIST_ROOM = 4096  # objects read per call of shm_list_batch

STATE_NAMES = {
    lib.SHM_STATE_CREATED: "created",
    lib.SHM_STATE_SEALED: "sealed",
    lib.SHM_STATE_SPILLED: "spilled",
}


class StoreError(exceptions.RaySystemError):
    """Base of the store's own errors (misuse of the low-level API, corruption)."""


class ObjectExistsError(StoreError, ValueError):
    """create() of an id already in the store."""


class ObjectNotFoundError(StoreError, KeyError):
    """No object with this id is in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ObjectNotSealedError(StoreError):
    """The object is still being written."""


class ObjectSealedError(StoreError):
    """seal() or abort() of an object already sealed."""


class ObjectPinnedError(StoreError):
    """The object is in use and can't be spilled."""


class ObjectSpilledError(StoreError):
    """The object lives in a spill file; restore it first."""


class StoreCorruptError(StoreError):
    """The arena failed a consistency check."""


class StoreClosedError(StoreError):
    """The store was closed (shmray was shut down)."""


_ERRORS = {
    lib.SHM_ERR_EXISTS: (ObjectExistsError, "object {id} already exists in the object store"),
    lib.SHM_ERR_NOT_FOUND: (ObjectNotFoundError, "object {id} is not in the object store"),
    lib.SHM_ERR_FULL: (exceptions.ObjectStoreFullError, "no free block fits object {id}"),
    lib.SHM_ERR_TABLE_FULL: (exceptions.ObjectStoreFullError,
                             "the object table is full: too many objects ({id} refused)"),
    lib.SHM_ERR_NOT_SEALED: (ObjectNotSealedError, "object {id} is not sealed yet"),
    lib.SHM_ERR_SEALED: (ObjectSealedError, "object {id} is already sealed"),
    lib.SHM_ERR_PINNED: (ObjectPinnedError, "object {id} is pinned (in use)"),
    lib.SHM_ERR_INVALID: (ValueError, "invalid request for object {id}"),
    lib.SHM_ERR_TOO_LARGE: (exceptions.ObjectStoreFullError,
                            "object {id} is larger than the whole object store"),
    lib.SHM_ERR_CORRUPT: (StoreCorruptError, "the object store is corrupt"),
    lib.SHM_ERR_SPILLED: (ObjectSpilledError, "object {id} is spilled to disk"),
}


def _raise_for(status: int, object_id: Optional[bytes] = None, detail: str = "") -> None:
    """Turn a C status code into the matching exception (the only place that does)."""
    if status == lib.SHM_OK:
        return
    shown = object_id.hex() if object_id is not None else "-"
    if status == lib.SHM_ERR_SYSTEM:
        code = ffi.errno
        raise OSError(code, f"{os.strerror(code)} ({detail or 'object store'})")
    cls, template = _ERRORS.get(status, (StoreError, f"unknown store status {status}"))
    message = template.format(id=shown)
    raise cls(f"{message}: {detail}" if detail else message)


def _checked_id(object_id) -> bytes:
    if not isinstance(object_id, bytes) or len(object_id) != ID_SIZE:
        got = f"{len(object_id)} bytes" if isinstance(object_id, bytes) else type(object_id).__name__
        raise ValueError(f"an object id is {ID_SIZE} bytes, got {got}")
    return object_id


@dataclasses.dataclass(frozen=True)
class StoreStats:
    """A snapshot of the store's usage (``ObjectStore.statistics()``)."""

    capacity: int
    heap_size: int
    bytes_in_use: int
    bytes_free: int
    largest_free: int
    num_objects: int
    num_created: int
    num_sealed: int
    num_spilled: int
    num_pinned: int
    num_pin_holders: int
    untracked_pins: int
    free_blocks: int
    table_slots: int
    repairs: int


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One object table entry (``ObjectStore.info()`` / ``list()``)."""

    object_id: bytes
    state: str
    pin_count: int
    creator_pid: int
    offset: int
    data_size: int
    metadata_size: int
    last_access: int
    delete_pending: bool
    spilling: bool
    lent: bool  # a worker's numpy buffer: not yet an object (state "created"), or one still
    #             pinned by the buffer it was adopted from (see _lend.py)
    has_file: bool  # its spill file exists (kept after a restore; see _spill.py)

    @classmethod
    def _from_c(cls, c) -> "ObjectInfo":
        return cls(
            object_id=bytes(ffi.buffer(c.id, ID_SIZE)),
            state=STATE_NAMES.get(c.state, str(c.state)),
            pin_count=c.pin_count,
            creator_pid=c.creator_pid,
            offset=c.offset,
            data_size=c.data_size,
            metadata_size=c.metadata_size,
            last_access=c.last_access,
            delete_pending=bool(c.flags & lib.SHM_FLAG_DELETE_PENDING),
            spilling=bool(c.flags & lib.SHM_FLAG_SPILLING),
            lent=(bool(c.flags & lib.SHM_FLAG_LENT)
                  or bytes(ffi.buffer(c.id, len(LENT_MARK))) == LENT_MARK),
            has_file=bool(c.flags & lib.SHM_FLAG_HAS_FILE),
        )


_abandoned: list = []  # arenas of a parent's session, mapped for good in a forked child


class _Arena:
    """The shared-memory file and this process's mapping of it."""

    def __init__(self, capacity: int):
        fd = ffi.new("int *")
        _raise_for(lib.shm_arena_create(capacity, fd), detail=f"creating a {capacity}-byte arena")
        self.fd = fd[0]
        self.capacity = capacity
        base = ffi.new("void **")
        status = lib.shm_arena_map(self.fd, capacity, base)
        if status != lib.SHM_OK:
            os.close(self.fd)
            _raise_for(status, detail="mapping the arena")
        # The mapping is released when the last holder of this cdata goes: the arena
        # itself, or a pinned view that outlived shutdown.
        self.base = ffi.gc(base[0], lambda p, n=capacity: lib.shm_arena_unmap(p, n))

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ObjectStore:
    """This process's handle on the session's arena."""

    def __init__(self, capacity: int):
        if capacity < lib.shm_min_capacity():
            raise ValueError(
                f"object store of {capacity} bytes is too small; the minimum is "
                f"{lib.shm_min_capacity()} bytes"
            )
        self._arena = _Arena(capacity)
        _raise_for(lib.shm_store_format(self._arena.base, capacity), detail="formatting the arena")
        handle = ffi.new("shm_store **")
        _raise_for(lib.shm_store_open(self._arena.base, capacity, handle), detail="opening the arena")
        self._s = handle[0]
        self._base = int(ffi.cast("uintptr_t", self._arena.base))
        self.capacity = capacity
        # Owned by the process that made the arena; a forked child must not close the
        # parent's handle memory twice, so close() checks the pid.
        self._owner_pid = os.getpid()
        # The mapping itself needs no descriptor: dropping it now means no fd can leak,
        # and children inherit the mapping through fork.
        self._arena.close_fd()

    # -- lifetime ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._s is None

    def _handle(self):
        if self._s is None:
            raise StoreClosedError(
                "the object store is closed: shmray was shut down; call shmray.init() to start a "
                "new session"
            )
        return self._s

    def abandon(self) -> None:
        """In a forked child, where this handle is the parent's session's: make it inert
        (views inherited release no pin, nothing is freed) and keep the mapping for the
        rest of this process's life, since arrays it inherited may lie in it (views, and
        a task's lent buffers, which hold no reference to it)."""
        if self._s is None:
            return
        handle, self._s = self._s, None
        lib.shm_store_close(handle)
        _abandoned.append(self._arena)

    def close(self) -> None:
        """Drop this handle; the mapping goes once no pinned view uses it."""
        if self._s is None:
            return
        handle, self._s = self._s, None
        lib.shm_store_close(handle)
        self._arena = None

    # -- writing -----------------------------------------------------------------------

    def create(self, object_id: bytes, data_size: int, metadata_size: int = 0) -> int:
        """Reserve space for a new object; returns its payload offset."""
        _checked_id(object_id)
        if data_size < 0 or metadata_size < 0:
            raise ValueError(f"object sizes must be >= 0, got {data_size} and {metadata_size}")
        offset = ffi.new("uint64_t *")
        _raise_for(lib.shm_create(self._handle(), object_id, data_size, metadata_size, offset),
                   object_id, f"{data_size + metadata_size} bytes requested")
        return offset[0]

    def seal(self, object_id: bytes) -> None:
        _raise_for(lib.shm_seal(self._handle(), _checked_id(object_id)), object_id)

    def abort(self, object_id: bytes) -> None:
        _raise_for(lib.shm_abort(self._handle(), _checked_id(object_id)), object_id)

    def _live_arena(self) -> "_Arena":
        arena = self._arena
        if arena is None:
            self._handle()  # raises StoreClosedError
        return arena

    def _view(self, offset: int, size: int, on_release: Optional[Callable] = None) -> memoryview:
        """A view of arena bytes that keeps the mapping alive for as long as it lives.

        Every view holds the arena: close() drops only the store's own reference, so a
        shutdown in another thread can never unmap memory a view or a copy still uses.
        """
        arena = self._live_arena()

        def released(_ptr, _arena=arena):
            if on_release is not None:
                on_release()

        root = ffi.gc(ffi.cast("char *", self._base + offset), released)
        return memoryview(ffi.buffer(root, size))

    def writable(self, offset: int, size: int) -> memoryview:
        """A writable view of arena bytes (for the creator of an unsealed object)."""
        return self._view(offset, size)

    def copy_in(self, offset: int, source) -> None:
        """Copy a buffer to an arena offset, threads sharing large copies, GIL released."""
        arena = self._live_arena()  # held through the copy: the mapping can't go meanwhile
        src = ffi.from_buffer(source)
        lib.shm_copy(ffi.cast("char *", self._base + offset), src, len(src), _COPY_THREADS)
        del arena

    def write_serialized(self, object_id: bytes, serialized) -> None:
        """create + copy + seal one serialized value; aborts the object if the copy fails."""
        offset = self.create(object_id, serialized.data_size, len(serialized.metadata))
        try:
            header = serialized.header
            self.writable(offset, len(header))[:] = header
            for buf_offset, buf in serialized.buffers:
                self.copy_in(offset + buf_offset, buf)
            if serialized.metadata:
                start = offset + serialized.data_size
                self.writable(start, len(serialized.metadata))[:] = serialized.metadata
        except BaseException:
            self.abort(object_id)
            raise
        self.seal(object_id)

    # -- reading -----------------------------------------------------------------------

    def pinned_view(self, object_id: bytes):
        """(read-only view of the data, metadata bytes) of a sealed object, pinned while viewed."""
        handle = self._handle()
        out = ffi.new("uint64_t[3]")
        _raise_for(lib.shm_get(handle, _checked_id(object_id), out, out + 1, out + 2), object_id)
        offset, data_size, metadata_size = out[0], out[1], out[2]
        metadata = bytes(self._view(offset + data_size, metadata_size)) if metadata_size else b""

        def unpin(store=self, object_id=object_id):
            if store._s is not None:
                store.release(object_id)

        return self._view(offset, data_size, unpin).toreadonly(), metadata

    def release(self, object_id: bytes) -> bool:
        """Unpin; True if that freed a deleted object."""
        freed = ffi.new("int *")
        _raise_for(lib.shm_release(self._handle(), _checked_id(object_id), freed), object_id)
        return bool(freed[0])

    def delete(self, object_id: bytes) -> int:
        """Delete in any state; returns the SHM_DELETED_* / SHM_DELETE_DEFERRED bits."""
        outcome = ffi.new("int *")
        _raise_for(lib.shm_delete(self._handle(), _checked_id(object_id), outcome), object_id)
        return outcome[0]

    def contains(self, object_id: bytes) -> Optional[str]:
        """The object's state name, or None if it is not in the store."""
        state = ffi.new("uint32_t *")
        status = lib.shm_contains(self._handle(), _checked_id(object_id), state)
        if status == lib.SHM_ERR_NOT_FOUND:
            return None
        _raise_for(status, object_id)
        return STATE_NAMES.get(state[0], str(state[0]))

    def info(self, object_id: bytes) -> ObjectInfo:
        out = ffi.new("shm_object_info *")
        _raise_for(lib.shm_info(self._handle(), _checked_id(object_id), out), object_id)
        return ObjectInfo._from_c(out)

    def list(self) -> List[ObjectInfo]:
        """Every object in the table, read a part at a time (``shm_list_batch``)."""
        handle = self._handle()
        cursor = ffi.new("uint64_t *")
        count = ffi.new("uint64_t *")
        out = ffi.new("shm_object_info[]", _LIST_ROOM)
        objects = []
        while True:
            _raise_for(lib.shm_list_batch(handle, cursor, out, _LIST_ROOM, count))
            objects.extend(ObjectInfo._from_c(out[i]) for i in range(count[0]))
            if not cursor[0]:
                return objects

    def statistics(self) -> StoreStats:
        out = ffi.new("shm_stats *")
        _raise_for(lib.shm_statistics(self._handle(), out))
        return StoreStats(**{f.name: getattr(out, f.name) for f in dataclasses.fields(StoreStats)})

    def check(self) -> None:
        """Walk the whole arena; StoreCorruptError says what is wrong, if anything."""
        message = ffi.new("char[]", 512)
        status = lib.shm_check(self._handle(), message, 512)
        if status != lib.SHM_OK:
            _raise_for(status, detail=ffi.string(message).decode(errors="replace"))

    # -- spilling primitives (policy: _spill.py) ----------------------------------------

    def spill_begin(self, object_id: bytes) -> memoryview:
        out = ffi.new("uint64_t[3]")
        _raise_for(lib.shm_spill_begin(self._handle(), _checked_id(object_id), out, out + 1, out + 2),
                   object_id)
        return self._view(out[0], out[1] + out[2])

    def spill_finish(self, object_id: bytes) -> None:
        _raise_for(lib.shm_spill_finish(self._handle(), _checked_id(object_id)), object_id)

    def spill_cancel(self, object_id: bytes) -> None:
        """Undo spill_begin (the file could not be written): the object stays in the arena."""
        _raise_for(lib.shm_spill_cancel(self._handle(), _checked_id(object_id)), object_id)

    def restore_begin(self, object_id: bytes) -> int:
        offset = ffi.new("uint64_t *")
        _raise_for(lib.shm_restore_begin(self._handle(), _checked_id(object_id), offset), object_id)
        return offset[0]

    def reap(self, pid: int) -> int:
        """Undo the half-made objects of a dead process; returns how many."""
        count = ffi.new("uint64_t *")
        _raise_for(lib.shm_reap(self._handle(), pid, count))
        return count[0]

    # -- lending (see _lend.py) ---------------------------------------------------------

    def numpy_handler(self, fallback: int, threshold: int, largest: int, most_lent: int,
                      keep_free: int) -> int:
        """The address of a numpy allocator lending from this arena (0 if it can't)."""
        handler = lib.shm_numpy_handler(self._handle(), ffi.cast("void *", fallback),
                                        threshold, largest, most_lent, keep_free)
        return int(ffi.cast("uintptr_t", handler))

    def lent_kept(self, info: "ObjectInfo") -> bool:
        """Whether a lent buffer is kept by its process past its task (see _lend.after_task)."""
        return info.state == "created" and bool(lib.shm_lent_kept(self._handle(), info.offset))

    def adopt_lent(self, object_id: bytes, address: int, size: int, header: bytes,
                   metadata: bytes) -> bool:
        """Seal the lent buffer at address as object_id, uncopied; False if it isn't one
        (or the object exists: a copy then fails the way any store would)."""
        status = lib.shm_lent_adopt(self._handle(), ffi.cast("void *", address), size,
                                    _checked_id(object_id), header, len(header),
                                    metadata, len(metadata))
        return status == lib.SHM_OK

    def address(self, offset: int) -> int:
        return self._base + offset
