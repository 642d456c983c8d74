"""Listing the object table (``ObjectStore.list``): what ``shmray memory`` and the spiller read.

The table is sized for the arena (a million slots for 8 GiB), and a memfd's pages are
given memory when first read: a listing that read every slot made a session's shared memory
grow by the whole table (80 MiB here) the first time anyone looked.
"""

import os

from shmray._object_store import ObjectStore
from shmray._store_cffi import ffi

GiB = 1 << 30


def _allocated(store: ObjectStore) -> int:
    """Bytes of the arena's memory this process has mapped (Rss of its mapping): reading
    a never-written page of a memfd gives it a page."""
    with open("/proc/self/smaps") as smaps:
        lines = smaps.read().splitlines()
    for at, line in enumerate(lines):
        if "shmray-arena" in line and line.split()[0].startswith(
                f"{int(ffi.cast('uintptr_t', store._arena.base)):x}-"):
            rss = next(entry for entry in lines[at + 1:] if entry.startswith("Rss:"))
            return int(rss.split()[1]) * 1024
    raise AssertionError("the arena is not mapped")


def test_listing_reads_only_the_parts_of_the_table_ever_used():
    store = ObjectStore(8 * GiB)  # sparse: only what is written takes memory
    try:
        ids = [bytes([n]) * 28 for n in range(1, 40)]
        for object_id in ids:
            store.create(object_id, 64)
            store.seal(object_id)
        before = _allocated(store)
        listed = store.list()
        assert sorted(info.object_id for info in listed) == sorted(ids)
        assert store.statistics().table_slots >= 1 << 20  # a table far larger than its use
        assert _allocated(store) - before < 4 << 20, "the listing touched the whole table"
    finally:
        store.close()


def test_a_listing_sees_objects_in_every_part_of_a_large_table():
    store = ObjectStore(GiB)
    try:
        ids = [os.urandom(28) for _ in range(3000)]  # hashed all over the table
        for object_id in ids:
            store.create(object_id, 0)
            store.seal(object_id)
        for object_id in ids[::2]:
            store.delete(object_id)
        assert sorted(info.object_id for info in store.list()) == sorted(ids[1::2])
    finally:
        store.close()
