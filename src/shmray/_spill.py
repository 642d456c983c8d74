"""Spilling: when the arena is full, move sealed, unpinned objects to files; bring them back on get.

Runs in: whichever process needs room or reads a spilled object (driver, worker, actor).

The object table in shared memory is the directory of spilled objects (state SPILLED), and a
spilled object's file is named after its id in the session's spill folder, so any process can
restore any object without asking another.  The C store makes each step race-free
(``spill_begin`` pins the object while its bytes are copied out; ``spill_finish`` frees the
block only if nobody pinned it meanwhile; ``restore_begin`` lets one process refill it).

A spill file is written whole under a name of the spiller's own and renamed into place, and
it stays for as long as its object does (the store flags it HAS_FILE; the scheduler removes
it with the object): an object's bytes never change, so a restored object spilled again
needs no write, and no process ever removes a file another may rely on (a restorer that
removed the file after sealing could take away the file of a spill begun meanwhile).

Victims are chosen least recently used first, and only until the request fits: spilling
costs a disk write now and a read later.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Callable

from . import _events, exceptions
from ._object_store import (
    ObjectNotFoundError,
    ObjectNotSealedError,
    ObjectPinnedError,
    ObjectSpilledError,
    ObjectStore,
)

_RESTORE_WAIT_S = 60.0
# How long room is waited for that only other processes' lent numpy buffers (_lend.py) take:
# they come back when their tasks end, as plasma's full creates are retried in Ray.
_LENT_WAIT_S = 10.0
_LENT_POLL_S = (0.001, 0.05)  # first and longest pause between looks


class Spiller:
    """Makes room in ``store`` by spilling to files under ``directory()`` (made on first use)."""

    def __init__(self, store: ObjectStore, directory: Callable[[], str]):
        self._store = store
        self._directory = directory
        self.spilled_bytes = 0
        self.restored_bytes = 0

    def path(self, object_id: bytes) -> str:
        return os.path.join(self._directory(), object_id.hex())

    def make_room(self, nbytes: int) -> bool:
        """Spill until a block of ``nbytes`` fits; False if nothing more can be spilled and
        no other process's lent buffer comes back within _LENT_WAIT_S."""
        deadline, pause = None, _LENT_POLL_S[0]
        while True:
            if self._store.statistics().largest_free >= nbytes:
                return True
            objects = self._store.list()
            victims = sorted(
                (info for info in objects
                 if info.state == "sealed" and info.pin_count == 0
                 and not info.delete_pending and not info.spilling),
                key=lambda info: info.last_access,
            )
            for info in victims:
                self.spill(info.object_id)
                if self._store.statistics().largest_free >= nbytes:
                    return True
            if not self._lent_room_may_come(objects, nbytes):
                return False
            if deadline is None:
                deadline = time.monotonic() + _LENT_WAIT_S
            elif time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(2 * pause, _LENT_POLL_S[1])

    def _lent_room_may_come(self, objects, nbytes: int) -> bool:
        """Whether lent buffers that will come back could make room for ``nbytes``: other
        processes' (this one's can't come back while it waits), not kept past their task."""
        me = os.getpid()
        coming = sum(o.data_size + o.metadata_size for o in objects
                     if o.lent and o.creator_pid != me and not self._store.lent_kept(o))
        return coming > 0 and self._store.statistics().bytes_free + coming >= nbytes

    def spill(self, object_id: bytes) -> bool:
        """Move one object to its file; False if it was in use or gone by then (or another
        process is spilling or restoring it)."""
        try:
            view = self._store.spill_begin(object_id)
        except (ObjectPinnedError, ObjectNotFoundError, ObjectSpilledError,
                ObjectNotSealedError):
            return False
        path = self.path(object_id)
        size = view.nbytes
        began = time.time()
        if not self._store.info(object_id).has_file:  # else its file is there already
            draft = f"{path}.{os.getpid()}"
            try:
                with open(draft, "wb") as f:
                    f.write(view)
                os.rename(draft, path)
            except OSError as exc:
                view.release()
                _discard(draft)
                self._store.spill_cancel(object_id)
                if exc.errno == errno.ENOSPC:
                    raise exceptions.OutOfDiskError(
                        f"spilling object {object_id.hex()} ({size} bytes) to {path} failed: "
                        "the disk is full. Free disk space or give shmray a larger "
                        "object_store_memory."
                    ) from exc
                raise
        view.release()
        try:
            self._store.spill_finish(object_id)
        except ObjectNotFoundError:  # deleted meanwhile: nobody needs its file
            _discard(path)
            return False
        except ObjectPinnedError:  # in use again: its file stays, for the next spill
            return False
        self.spilled_bytes += size
        _events.transfer(_events.SPILLED, object_id, size, began)
        return True

    def restore(self, object_id: bytes, size: int) -> None:
        """Bring a spilled object back into the arena (or wait while another process does)."""
        deadline = time.monotonic() + _RESTORE_WAIT_S
        while True:
            try:
                offset = self._store.restore_begin(object_id)
                break
            except exceptions.ObjectStoreFullError as exc:
                if not self.make_room(size):
                    raise store_full_error(self._store, size,
                                           f"restore spilled object {object_id.hex()}") from exc
            except (ObjectNotSealedError, ValueError):
                # Someone else is restoring it, or already did: the caller's get retries.
                return
            if time.monotonic() > deadline:
                raise exceptions.ObjectStoreFullError(
                    f"could not make room to restore spilled object {object_id.hex()}"
                )
        path = self.path(object_id)
        began = time.time()
        try:
            with open(path, "rb") as f:
                view = self._store.writable(offset, size)
                got = f.readinto(view)
                view.release()
            if got != size:
                raise exceptions.ObjectLostError(
                    f"spill file {path} of object {object_id.hex()} holds {got} of {size} bytes"
                )
        except BaseException as exc:
            self._store.abort(object_id)  # back to SPILLED: a later get may try again
            if isinstance(exc, OSError):
                raise exceptions.ObjectLostError(
                    f"object {object_id.hex()} was spilled to {path}, which can't be read back "
                    f"({exc}); the session folder may have been removed or the disk failed"
                ) from exc
            raise
        self._store.seal(object_id)  # the file stays with the object (see the docstring)
        self.restored_bytes += size
        _events.transfer(_events.RESTORED, object_id, size, began)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def too_large_error(store: ObjectStore, needed: int) -> exceptions.ObjectStoreFullError:
    capacity = store.capacity
    return exceptions.ObjectStoreFullError(
        f"cannot store an object of {_mib(needed)}: it is larger than the whole object "
        f"store ({_mib(capacity)}). Start shmray with a larger store, e.g. "
        f"shmray.init(object_store_memory={max(needed * 2, capacity)})."
    )


def store_full_error(store: ObjectStore, needed: int,
                     doing: str = "store an object") -> exceptions.ObjectStoreFullError:
    """The store is full of objects in use: say what holds the memory and what to do."""
    stats = store.statistics()
    objects = store.list()
    pinned = [o for o in objects if o.pin_count]
    lent = [o for o in objects if o.lent and o.state == "created"]
    writing = [o for o in objects if o.state == "created" and not o.lent]
    biggest = sorted(objects, key=lambda o: o.data_size, reverse=True)[:5]
    listing = "; ".join(
        f"{'numpy buffer' if o.lent and o.state == 'created' else o.object_id.hex()} "
        f"{_mib(o.data_size)} ({o.state}, made by pid {o.creator_pid}"
        f"{', pinned x%d' % o.pin_count if o.pin_count else ''})" for o in biggest
    )
    return exceptions.ObjectStoreFullError(
        f"cannot {doing} of {_mib(needed)}: the object store ({_mib(stats.capacity)}) has "
        f"{_mib(stats.bytes_in_use)} in use by {stats.num_objects - len(lent)} objects, "
        f"{len(pinned)} of them pinned by live values (e.g. numpy arrays from get) and "
        f"{len(writing)} being written, and by {len(lent)} large numpy arrays of tasks "
        f"({_mib(sum(o.data_size for o in lent))}), and none of them could be spilled; "
        f"largest free block "
        f"{_mib(stats.largest_free)}. Largest objects: {listing or 'none'}. Drop values and "
        "refs you no longer need, or start shmray with a larger object_store_memory."
    )


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
