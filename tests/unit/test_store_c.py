"""The C object store (src/shmray/_store.c), driven through the raw cffi module.

Everything runs on real shared memory: each test formats a fresh memfd arena, and the
fixture's teardown runs shm_check over it, so every test also ends with a full walk of the
heap and the table.  Tests that fork make their children leave through os._exit, so a
child never returns into pytest.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import struct
import time

import pytest

from shmray._store_cffi import ffi, lib

MiB = 1 << 20
ALIGN = lib.SHM_ALIGN
BLOCK_HEADER = 64


# -- helpers -------------------------------------------------------------------------------


def oid(n: int, prefix: int = 0x5A) -> bytes:
    """An ObjectID shaped like shmray's: a 20-byte prefix and a counter."""
    return bytes([prefix]) * 20 + struct.pack("<Q", n)


def block_size(nbytes: int) -> int:
    return max(-(-nbytes // ALIGN) * ALIGN, ALIGN) + BLOCK_HEADER


class Info:
    """A copy of an shm_object_info, outliving the cffi array it came from."""

    def __init__(self, c):
        self.id = bytes(ffi.buffer(c.id, lib.SHM_ID_SIZE))
        for field in ("state", "flags", "pin_count", "creator_pid", "offset", "data_size",
                      "metadata_size", "last_access"):
            setattr(self, field, getattr(c, field))


def pattern(object_id: bytes, n: int) -> bytes:
    """Bytes that name their object, so a block handed to the wrong object shows."""
    seed = object_id * (n // len(object_id) + 1)
    return seed[:n]


class Arena:
    """A formatted arena and a handle on it, with thin wrappers returning (status, outputs)."""

    def __init__(self, size: int):
        self.size = size
        fd = ffi.new("int *")
        assert lib.shm_arena_create(size, fd) == lib.SHM_OK
        self.fd = fd[0]
        base = ffi.new("void **")
        assert lib.shm_arena_map(self.fd, size, base) == lib.SHM_OK
        self.base_ptr = base[0]
        self.base = ffi.cast("uint8_t *", base[0])
        assert lib.shm_store_format(self.base_ptr, size) == lib.SHM_OK
        handle = ffi.new("shm_store **")
        assert lib.shm_store_open(self.base_ptr, size, handle) == lib.SHM_OK
        self.store = handle[0]

    def close(self) -> None:
        lib.shm_store_close(self.store)
        assert lib.shm_arena_unmap(self.base_ptr, self.size) == lib.SHM_OK
        os.close(self.fd)

    # -- calls ---------------------------------------------------------------------------

    def check(self) -> None:
        msg = ffi.new("char[512]")
        status = lib.shm_check(self.store, msg, 512)
        assert status == lib.SHM_OK, ffi.string(msg).decode()

    def create(self, object_id: bytes, data: int, meta: int = 0):
        off = ffi.new("uint64_t *")
        status = lib.shm_create(self.store, object_id, data, meta, off)
        return status, off[0]

    def put(self, object_id: bytes, data: int, meta: int = 0) -> int:
        """Create, fill with the object's pattern, seal; returns the payload offset."""
        status, off = self.create(object_id, data, meta)
        assert status == lib.SHM_OK, status
        self.write(off, pattern(object_id, data + meta))
        assert lib.shm_seal(self.store, object_id) == lib.SHM_OK
        return off

    def get(self, object_id: bytes):
        out = ffi.new("uint64_t[3]")
        status = lib.shm_get(self.store, object_id, out, out + 1, out + 2)
        return status, out[0], out[1], out[2]

    def release(self, object_id: bytes):
        freed = ffi.new("int *")
        status = lib.shm_release(self.store, object_id, freed)
        return status, freed[0]

    def delete(self, object_id: bytes):
        outcome = ffi.new("int *")
        status = lib.shm_delete(self.store, object_id, outcome)
        return status, outcome[0]

    def contains(self, object_id: bytes):
        state = ffi.new("uint32_t *")
        status = lib.shm_contains(self.store, object_id, state)
        return status, state[0]

    def info(self, object_id: bytes):
        out = ffi.new("shm_object_info *")
        status = lib.shm_info(self.store, object_id, out)
        return status, out

    def stats(self):
        out = ffi.new("shm_stats *")
        assert lib.shm_statistics(self.store, out) == lib.SHM_OK
        return out

    def list(self, max_count: int):
        out = ffi.new("shm_object_info[]", max(max_count, 1))
        count, total = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        assert lib.shm_list(self.store, out, max_count, count, total) == lib.SHM_OK
        return [Info(out[i]) for i in range(count[0])], total[0]

    def spill_begin(self, object_id: bytes):
        out = ffi.new("uint64_t[3]")
        status = lib.shm_spill_begin(self.store, object_id, out, out + 1, out + 2)
        return status, out[0]

    def restore_begin(self, object_id: bytes):
        off = ffi.new("uint64_t *")
        status = lib.shm_restore_begin(self.store, object_id, off)
        return status, off[0]

    def reap(self, pid: int) -> int:
        count = ffi.new("uint64_t *")
        assert lib.shm_reap(self.store, pid, count) == lib.SHM_OK
        return count[0]

    # -- bytes ---------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        ffi.memmove(self.base + offset, data, len(data))

    def read(self, offset: int, n: int) -> bytes:
        return bytes(ffi.buffer(self.base + offset, n))

    def verify(self, object_id: bytes) -> None:
        """The object is sealed and holds its pattern."""
        status, off, data, meta = self.get(object_id)
        assert status == lib.SHM_OK, status
        try:
            assert self.read(off, data + meta) == pattern(object_id, data + meta), object_id
        finally:
            assert self.release(object_id)[0] == lib.SHM_OK

    def empty_out(self) -> None:
        """Delete every object; the heap must be one free block again."""
        infos, total = self.list(100_000)
        for info in infos:
            assert self.delete(info.id)[0] == lib.SHM_OK
        st = self.stats()
        assert (st.num_objects, st.bytes_in_use, st.free_blocks) == (0, 0, 1)
        assert st.largest_free == st.heap_size - BLOCK_HEADER


def open_arena(size: int):
    arena = Arena(size)
    try:
        yield arena
        arena.check()
    finally:
        arena.close()


@pytest.fixture
def arena():
    yield from open_arena(128 * MiB)


@pytest.fixture
def small_arena():
    yield from open_arena(16 * MiB)


def wait_child(pid: int, timeout: float = 30.0) -> int:
    """The child's wait status; kills it if it outlives the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"child {pid} hung")


def fork_child(body) -> int:
    """Run body() in a forked child that exits 0 if it returns, 1 if it raises."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        except BaseException:  # noqa: BLE001 - report anything, never return into pytest
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def assert_killed(status: int) -> None:
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


# -- arena and format ------------------------------------------------------------------------


def test_fresh_store_is_one_free_block(arena):
    st = arena.stats()
    assert st.capacity == arena.size
    assert st.table_slots == 128 * MiB // 8192
    assert st.heap_size % ALIGN == 0 and st.heap_size < arena.size
    assert (st.bytes_in_use, st.bytes_free, st.free_blocks) == (0, st.heap_size, 1)
    assert st.largest_free == st.heap_size - BLOCK_HEADER
    assert (st.num_objects, st.num_pinned, st.repairs) == (0, 0, 0)


def test_open_rejects_unformatted_memory_and_format_rejects_tiny():
    fd = ffi.new("int *")
    size = 4 * MiB
    assert lib.shm_arena_create(size, fd) == lib.SHM_OK
    base = ffi.new("void **")
    assert lib.shm_arena_map(fd[0], size, base) == lib.SHM_OK
    try:
        handle = ffi.new("shm_store **")
        assert lib.shm_store_open(base[0], size, handle) == lib.SHM_ERR_CORRUPT
        assert lib.shm_store_format(base[0], lib.shm_min_capacity() - 1) == lib.SHM_ERR_INVALID
        assert lib.shm_store_format(base[0], lib.shm_min_capacity()) == lib.SHM_OK
        assert lib.shm_store_open(base[0], size, handle) == lib.SHM_OK
        lib.shm_store_close(handle[0])
        # A size that is not a multiple of SHM_ALIGN: the store uses the aligned part.
        assert lib.shm_store_format(base[0], size - 100) == lib.SHM_OK
        assert lib.shm_store_open(base[0], size - 100, handle) == lib.SHM_OK
        stats = ffi.new("shm_stats *")
        assert lib.shm_statistics(handle[0], stats) == lib.SHM_OK
        assert stats.capacity == (size - 100) // ALIGN * ALIGN
        msg = ffi.new("char[256]")
        assert lib.shm_check(handle[0], msg, 256) == lib.SHM_OK, ffi.string(msg)
        lib.shm_store_close(handle[0])
    finally:
        lib.shm_arena_unmap(base[0], size)
        os.close(fd[0])


# -- allocator ----------------------------------------------------------------------------------


def test_allocator_against_a_model(small_arena):
    """Random create/seal/abort/delete/get against a dict; check() after every step."""
    a = small_arena
    rng = random.Random(20240601)
    heap = a.stats().heap_size
    model: dict[bytes, tuple[int, int, int, bool]] = {}  # id -> (offset, data, meta, sealed)
    counter = itertools.count(1)
    saw_full = 0

    def random_size():
        r = rng.random()
        if r < 0.15:
            return 0
        if r < 0.6:
            return rng.randrange(1, 300)
        if r < 0.9:
            return rng.randrange(300, 64 * 1024)
        return rng.randrange(64 * 1024, 3 * MiB)

    for _ in range(2500):
        op = rng.random()
        if op < 0.45 or not model:
            object_id = oid(next(counter))
            data, meta = random_size(), rng.choice([0, 0, 7, 64, 100])
            before = a.stats()
            status, off = a.create(object_id, data, meta)
            if status == lib.SHM_ERR_FULL:
                assert block_size(data + meta) > before.largest_free + BLOCK_HEADER
                saw_full += 1
            else:
                assert status == lib.SHM_OK, status
                assert block_size(data + meta) <= before.largest_free + BLOCK_HEADER
                assert off % ALIGN == 0
                a.write(off, pattern(object_id, data + meta))
                model[object_id] = (off, data, meta, False)
        else:
            object_id = rng.choice(list(model))
            off, data, meta, sealed = model[object_id]
            if op < 0.6 and not sealed:
                assert lib.shm_seal(a.store, object_id) == lib.SHM_OK
                model[object_id] = (off, data, meta, True)
            elif op < 0.7:
                status = lib.shm_abort(a.store, object_id)
                assert status == (lib.SHM_ERR_SEALED if sealed else lib.SHM_OK)
                if not sealed:
                    del model[object_id]
            elif op < 0.85:
                status, got_off, got_data, got_meta = a.get(object_id)
                if not sealed:
                    assert status == lib.SHM_ERR_NOT_SEALED
                else:
                    assert (status, got_off, got_data, got_meta) == (lib.SHM_OK, off, data, meta)
                    assert a.read(off, data + meta) == pattern(object_id, data + meta)
                    assert a.release(object_id) == (lib.SHM_OK, 0)
            else:
                assert a.delete(object_id) == (lib.SHM_OK, lib.SHM_DELETED_NOW)
                del model[object_id]
        a.check()
        st = a.stats()
        assert st.num_objects == len(model)
        assert st.num_sealed == sum(1 for v in model.values() if v[3])
        # A block holds its request, plus at most one alignment unit too small to split off.
        need = sum(block_size(d + m) for _, d, m, _ in model.values())
        assert need <= st.bytes_in_use <= need + ALIGN * len(model)
        assert st.bytes_free == heap - st.bytes_in_use

    assert saw_full > 0, "the model test never filled the heap; make objects larger"
    spans = sorted((off, block_size(d + m) - BLOCK_HEADER) for off, d, m, _ in model.values())
    for (o1, n1), (o2, _) in zip(spans, spans[1:]):
        assert o1 + n1 <= o2, "payloads overlap"
    for object_id, (off, data, meta, _) in model.items():
        assert a.read(off, data + meta) == pattern(object_id, data + meta)
    a.empty_out()


@pytest.mark.parametrize("order", list(itertools.permutations("abc")))
def test_freed_neighbours_coalesce_in_any_order(arena, order):
    ids = {name: oid(i) for i, name in enumerate("abcd")}
    offsets = {name: arena.put(ids[name], 10_000) for name in "abcd"}
    assert arena.stats().free_blocks == 1  # only the tail
    for name in order:
        assert arena.delete(ids[name]) == (lib.SHM_OK, lib.SHM_DELETED_NOW)
        arena.check()
    st = arena.stats()
    assert st.free_blocks == 2, "a, b and c should be one free block, the tail another"
    # First fit puts an object of exactly the merged payload where a was.
    merged = oid(10)
    assert arena.put(merged, 3 * block_size(10_000) - BLOCK_HEADER) == offsets["a"]
    assert arena.stats().free_blocks == 1
    arena.verify(ids["d"])
    assert arena.delete(merged)[0] == lib.SHM_OK
    assert arena.delete(ids["d"])[0] == lib.SHM_OK
    st = arena.stats()
    assert (st.free_blocks, st.bytes_in_use, st.largest_free) == (1, 0, st.heap_size - BLOCK_HEADER)


def test_middle_block_merges_with_both_neighbours(arena):
    ids = [oid(i) for i in range(4)]
    for i in ids:
        arena.put(i, 5000)
    arena.delete(ids[0])
    arena.delete(ids[2])
    assert arena.stats().free_blocks == 3
    arena.delete(ids[1])  # between two free blocks
    assert arena.stats().free_blocks == 2
    arena.check()


def test_exact_fill_then_full(arena):
    st = arena.stats()
    big = oid(1)
    status, off = arena.create(big, st.largest_free)
    assert status == lib.SHM_OK
    st = arena.stats()
    assert (st.free_blocks, st.largest_free, st.bytes_free) == (0, 0, 0)
    assert arena.create(oid(2), 0)[0] == lib.SHM_ERR_FULL
    assert lib.shm_abort(arena.store, big) == lib.SHM_OK

    arena.put(oid(3), MiB)
    largest = arena.stats().largest_free
    assert arena.create(oid(4), largest + 1)[0] == lib.SHM_ERR_FULL
    assert arena.create(oid(4), largest - 10, 10)[0] == lib.SHM_OK
    assert arena.create(oid(5), 0)[0] == lib.SHM_ERR_FULL
    # Larger than the whole heap is TOO_LARGE, not FULL: no amount of freeing helps.
    heap = arena.stats().heap_size
    assert arena.create(oid(6), heap)[0] == lib.SHM_ERR_TOO_LARGE
    assert arena.create(oid(6), heap - BLOCK_HEADER, 1)[0] == lib.SHM_ERR_TOO_LARGE
    assert arena.create(oid(6), 2**63, 2**63)[0] == lib.SHM_ERR_TOO_LARGE
    assert arena.stats().num_objects == 2


def test_payloads_aligned_and_intact_across_reuse(arena):
    rng = random.Random(7)
    live = {}
    for round_ in range(6):
        for k in range(150):
            object_id = oid(round_ * 1000 + k)
            size = rng.choice([0, 1, 63, 64, 65, rng.randrange(1, 200_000)])
            off = arena.put(object_id, size)
            assert off % ALIGN == 0
            live[object_id] = size
        for object_id in rng.sample(sorted(live), len(live) // 2):
            arena.delete(object_id)
            del live[object_id]
        arena.check()
    for object_id in live:
        arena.verify(object_id)


def test_zero_size_objects_each_own_a_block(arena):
    offsets = {arena.put(oid(i), 0) for i in range(10)}
    assert len(offsets) == 10
    assert arena.stats().bytes_in_use == 10 * (BLOCK_HEADER + ALIGN)


# -- semantics ------------------------------------------------------------------------------------


def test_status_codes(arena):
    a, b, unknown = oid(1), oid(2), oid(99)
    assert len(a) == lib.SHM_ID_SIZE
    assert arena.create(a, 100, 10)[0] == lib.SHM_OK
    assert arena.create(a, 5)[0] == lib.SHM_ERR_EXISTS
    assert arena.get(a)[0] == lib.SHM_ERR_NOT_SEALED
    assert lib.shm_seal(arena.store, a) == lib.SHM_OK
    assert lib.shm_seal(arena.store, a) == lib.SHM_ERR_SEALED
    assert lib.shm_abort(arena.store, a) == lib.SHM_ERR_SEALED
    assert arena.create(a, 5)[0] == lib.SHM_ERR_EXISTS
    assert arena.release(a)[0] == lib.SHM_ERR_INVALID
    for call in (lambda: arena.get(unknown)[0], lambda: lib.shm_seal(arena.store, unknown),
                 lambda: lib.shm_abort(arena.store, unknown), lambda: arena.release(unknown)[0],
                 lambda: arena.delete(unknown)[0], lambda: arena.contains(unknown)[0],
                 lambda: arena.info(unknown)[0], lambda: lib.shm_spill_finish(arena.store, unknown),
                 lambda: arena.restore_begin(unknown)[0]):
        assert call() == lib.SHM_ERR_NOT_FOUND
    assert arena.create(b, 0)[0] == lib.SHM_OK
    assert lib.shm_abort(arena.store, b) == lib.SHM_OK
    assert arena.contains(b)[0] == lib.SHM_ERR_NOT_FOUND
    assert lib.shm_create(arena.store, ffi.NULL, 1, 1, ffi.NULL) == lib.SHM_ERR_INVALID


def test_pins_and_deferred_delete(arena):
    a = oid(1)
    arena.put(a, 1000, 24)
    assert arena.get(a)[0] == lib.SHM_OK
    assert arena.get(a)[0] == lib.SHM_OK
    assert arena.info(a)[1].pin_count == 2
    assert arena.stats().num_pinned == 1
    used = arena.stats().bytes_in_use
    assert arena.delete(a) == (lib.SHM_OK, lib.SHM_DELETE_DEFERRED)
    status, info = arena.info(a)
    assert status == lib.SHM_OK and info.flags & lib.SHM_FLAG_DELETE_PENDING
    # Deleted for everyone but its pin holders.
    assert arena.get(a)[0] == lib.SHM_ERR_NOT_FOUND
    assert arena.contains(a)[0] == lib.SHM_ERR_NOT_FOUND
    assert arena.create(a, 1)[0] == lib.SHM_ERR_EXISTS
    assert arena.release(a) == (lib.SHM_OK, 0)
    assert arena.stats().bytes_in_use == used
    assert arena.release(a) == (lib.SHM_OK, 1)
    assert arena.info(a)[0] == lib.SHM_ERR_NOT_FOUND
    st = arena.stats()
    assert (st.bytes_in_use, st.num_objects, st.num_pinned) == (0, 0, 0)


def test_info_list_and_statistics(arena):
    ids = [oid(i) for i in range(5)]
    for i, object_id in enumerate(ids):
        status, off = arena.create(object_id, 1000 * i, i)
        assert status == lib.SHM_OK
        if i % 2 == 0:
            assert lib.shm_seal(arena.store, object_id) == lib.SHM_OK
    status, info = arena.info(ids[3])
    assert status == lib.SHM_OK
    assert bytes(ffi.buffer(info.id, 28)) == ids[3]
    assert (info.state, info.flags, info.pin_count) == (lib.SHM_STATE_CREATED, 0, 0)
    assert (info.creator_pid, info.data_size, info.metadata_size) == (os.getpid(), 3000, 3)
    assert info.offset % ALIGN == 0
    clock_before = arena.info(ids[0])[1].last_access
    arena.get(ids[0])
    assert arena.info(ids[0])[1].last_access > max(arena.info(i)[1].last_access for i in ids[1:])
    assert arena.info(ids[0])[1].last_access > clock_before
    assert arena.contains(ids[0]) == (lib.SHM_OK, lib.SHM_STATE_SEALED)
    assert arena.contains(ids[1]) == (lib.SHM_OK, lib.SHM_STATE_CREATED)

    infos, total = arena.list(3)
    assert (len(infos), total) == (3, 5)
    infos, total = arena.list(10)
    assert sorted(i.id for i in infos) == sorted(ids)
    assert arena.list(0) == ([], 5)

    st = arena.stats()
    assert (st.num_objects, st.num_sealed, st.num_created, st.num_spilled, st.num_pinned) == (5, 3, 2, 0, 1)
    assert st.bytes_in_use == sum(block_size(1000 * i + i) for i in range(5))
    assert st.bytes_free == st.heap_size - st.bytes_in_use
    assert st.free_blocks == 1
    assert st.largest_free == st.bytes_free - BLOCK_HEADER
    arena.release(ids[0])


def test_table_full_and_backward_shift_deletion():
    """On the smallest table (1024 slots) the load limit is 768; deletes keep every entry findable."""
    for a in open_arena(2 * MiB):
        assert a.stats().table_slots == 1024
        ids = [oid(i) for i in range(768)]
        for object_id in ids:
            assert a.create(object_id, 0)[0] == lib.SHM_OK
        assert a.create(oid(10_000), 0)[0] == lib.SHM_ERR_TABLE_FULL
        a.check()
        rng = random.Random(3)
        rng.shuffle(ids)
        for k, object_id in enumerate(ids):
            assert lib.shm_abort(a.store, object_id) == lib.SHM_OK
            if k == 0:
                assert a.create(oid(10_000), 0)[0] == lib.SHM_OK  # room again
                assert lib.shm_abort(a.store, oid(10_000)) == lib.SHM_OK
            if k % 16 == 0:
                a.check()
                for other in ids[k + 1 : k + 40]:
                    assert a.contains(other) == (lib.SHM_OK, lib.SHM_STATE_CREATED)
        assert a.stats().num_objects == 0


def _longest_occupied_run(arena: Arena) -> int:
    """Longest cyclic run of non-EMPTY slots (table at 4096, 80-byte entries, state at +28)."""
    slots = arena.stats().table_slots
    table = arena.read(4096, slots * 80)
    occupied = [table[i * 80 + 28] != 0 for i in range(slots)]
    longest = run = 0
    for used in occupied + occupied:
        run = run + 1 if used else 0
        longest = max(longest, min(run, slots))
    return longest


def test_ids_differing_only_in_counter_spread_over_the_table():
    """700 ids that differ only in their counter bytes must not pile up in one cluster: a hash
    that ignored the counter, or passed it through unmixed, would make one run of 700."""
    for a in open_arena(2 * MiB):
        for i in range(700):
            assert a.create(oid(i), 0)[0] == lib.SHM_OK
        assert _longest_occupied_run(a) < 200
        a.empty_out()


# -- spilling ----------------------------------------------------------------------------------------


def test_spill_and_restore_round_trip(arena):
    a = oid(1)
    arena.put(a, 50_000, 100)
    saved = arena.read(arena.info(a)[1].offset, 50_100)
    status, off = arena.spill_begin(a)
    assert status == lib.SHM_OK and off == arena.info(a)[1].offset
    status, info = arena.info(a)
    assert (info.pin_count, info.flags) == (1, lib.SHM_FLAG_SPILLING)
    assert arena.spill_begin(a)[0] == lib.SHM_ERR_PINNED
    assert lib.shm_spill_finish(arena.store, a) == lib.SHM_OK
    st = arena.stats()
    assert (st.num_spilled, st.num_sealed, st.bytes_in_use, st.num_pinned) == (1, 0, 0, 0)
    status, info = arena.info(a)
    assert (info.state, info.offset, info.pin_count, info.flags) == (
        lib.SHM_STATE_SPILLED, 0, 0, lib.SHM_FLAG_HAS_FILE)
    assert arena.get(a)[0] == lib.SHM_ERR_SPILLED
    assert arena.contains(a) == (lib.SHM_OK, lib.SHM_STATE_SPILLED)
    assert arena.spill_begin(a)[0] == lib.SHM_ERR_SPILLED
    assert lib.shm_seal(arena.store, a) == lib.SHM_ERR_SEALED
    assert lib.shm_abort(arena.store, a) == lib.SHM_ERR_SEALED

    status, off = arena.restore_begin(a)
    assert status == lib.SHM_OK
    status, info = arena.info(a)
    assert (info.state, info.flags, info.creator_pid) == (
        lib.SHM_STATE_CREATED, lib.SHM_FLAG_RESTORING | lib.SHM_FLAG_HAS_FILE, os.getpid())
    assert (info.data_size, info.metadata_size) == (50_000, 100)
    assert arena.get(a)[0] == lib.SHM_ERR_NOT_SEALED
    assert arena.restore_begin(a)[0] == lib.SHM_ERR_NOT_SEALED
    arena.write(off, saved)
    assert lib.shm_seal(arena.store, a) == lib.SHM_OK
    assert arena.info(a)[1].flags == lib.SHM_FLAG_HAS_FILE  # its file stays while it lives
    assert arena.restore_begin(a)[0] == lib.SHM_ERR_INVALID
    arena.verify(a)
    assert arena.delete(a) == (lib.SHM_OK, lib.SHM_DELETED_NOW | lib.SHM_DELETED_SPILLED)


def test_a_spill_is_finished_or_cancelled_only_by_its_spiller(arena):
    """After a repair cancelled one process's spill and another began one, the first
    process's spill_finish completed the second's (and both wrote the same file)."""
    a = oid(1)
    arena.put(a, 1000)
    assert arena.spill_begin(a)[0] == lib.SHM_OK  # ours; then a repair cancels it:

    def die_holding_the_lock():
        assert lib.shm_debug_lock(arena.store) == lib.SHM_OK
        os.kill(os.getpid(), signal.SIGKILL)

    assert_killed(wait_child(fork_child(die_holding_the_lock)))
    assert arena.stats().repairs == 1 and arena.info(a)[1].flags == 0
    read, write = os.pipe()

    def spill_it_and_wait():  # another process spills it now
        assert arena.spill_begin(a)[0] == lib.SHM_OK
        os.read(read, 1)
        assert lib.shm_spill_finish(arena.store, a) == lib.SHM_OK

    pid = fork_child(spill_it_and_wait)
    while not arena.info(a)[1].flags & lib.SHM_FLAG_SPILLING:
        time.sleep(0.001)
    assert lib.shm_spill_finish(arena.store, a) == lib.SHM_ERR_PINNED  # not ours
    assert lib.shm_spill_cancel(arena.store, a) == lib.SHM_OK  # nothing of ours to undo
    assert arena.info(a)[1].flags & lib.SHM_FLAG_SPILLING  # theirs goes on
    os.write(write, b"x")
    assert wait_child(pid) == 0
    assert arena.info(a)[1].state == lib.SHM_STATE_SPILLED
    os.close(read)
    os.close(write)


def test_spill_races(arena):
    a, b, c, d, e = (oid(i) for i in range(5))
    for object_id in (a, b, c, d, e):
        arena.put(object_id, 4096)
    # pinned: no spill
    arena.get(a)
    assert arena.spill_begin(a)[0] == lib.SHM_ERR_PINNED
    arena.release(a)
    # created: no spill
    arena.create(oid(50), 10)
    assert arena.spill_begin(oid(50))[0] == lib.SHM_ERR_NOT_SEALED
    # pinned during the spill: finish undoes it (the file it wrote stays, flagged)
    assert arena.spill_begin(b)[0] == lib.SHM_OK
    assert arena.get(b)[0] == lib.SHM_OK
    assert lib.shm_spill_finish(arena.store, b) == lib.SHM_ERR_PINNED
    status, info = arena.info(b)
    assert (info.state, info.pin_count, info.flags) == (lib.SHM_STATE_SEALED, 1,
                                                        lib.SHM_FLAG_HAS_FILE)
    assert arena.release(b) == (lib.SHM_OK, 0)
    # deleted during the spill: finish frees it
    used = arena.stats().bytes_in_use
    assert arena.spill_begin(c)[0] == lib.SHM_OK
    assert arena.delete(c) == (lib.SHM_OK, lib.SHM_DELETE_DEFERRED)
    assert lib.shm_spill_finish(arena.store, c) == lib.SHM_ERR_NOT_FOUND
    assert arena.info(c)[0] == lib.SHM_ERR_NOT_FOUND
    assert arena.stats().bytes_in_use == used - block_size(4096)
    # the spill's pin is not a reader's to release
    assert arena.spill_begin(d)[0] == lib.SHM_OK
    assert arena.release(d)[0] == lib.SHM_ERR_INVALID
    # cancel: back to an ordinary sealed object
    assert lib.shm_spill_cancel(arena.store, d) == lib.SHM_OK
    status, info = arena.info(d)
    assert (info.state, info.pin_count, info.flags) == (lib.SHM_STATE_SEALED, 0, 0)
    assert lib.shm_spill_finish(arena.store, d) == lib.SHM_ERR_PINNED  # no spill under way
    arena.verify(d)
    # deleted while spilled: the file is the caller's
    assert arena.spill_begin(e)[0] == lib.SHM_OK
    assert lib.shm_spill_finish(arena.store, e) == lib.SHM_OK
    assert lib.shm_spill_finish(arena.store, e) == lib.SHM_ERR_INVALID
    assert arena.delete(e) == (lib.SHM_OK, lib.SHM_DELETED_NOW | lib.SHM_DELETED_SPILLED)
    arena.check()


def test_abort_or_delete_during_restore(arena):
    a, b = oid(1), oid(2)
    for object_id in (a, b):
        arena.put(object_id, 3000)
        arena.spill_begin(object_id)
        assert lib.shm_spill_finish(arena.store, object_id) == lib.SHM_OK
        assert arena.restore_begin(object_id)[0] == lib.SHM_OK
    assert lib.shm_abort(arena.store, a) == lib.SHM_OK  # a failed restore: back to its file
    assert arena.info(a)[1].state == lib.SHM_STATE_SPILLED
    assert arena.delete(b) == (lib.SHM_OK, lib.SHM_DELETED_NOW | lib.SHM_DELETED_SPILLED)
    assert arena.stats().bytes_in_use == 0


def test_restore_fails_full_when_no_block_fits(small_arena):
    a = small_arena
    a.put(oid(1), 4 * MiB)
    a.spill_begin(oid(1))
    assert lib.shm_spill_finish(a.store, oid(1)) == lib.SHM_OK
    assert a.create(oid(2), a.stats().largest_free)[0] == lib.SHM_OK
    assert a.restore_begin(oid(1))[0] == lib.SHM_ERR_FULL
    assert a.info(oid(1))[1].state == lib.SHM_STATE_SPILLED


def test_reap_undoes_a_dead_process_half_made_objects(arena):
    arena.put(oid(1), 100)
    arena.spill_begin(oid(1))
    lib.shm_spill_finish(arena.store, oid(1))
    arena.create(oid(2), 100)  # the parent's own, unsealed: not the dead child's

    def child():
        assert arena.create(oid(10), 5000)[0] == lib.SHM_OK
        assert arena.create(oid(11), 0)[0] == lib.SHM_OK
        arena.put(oid(12), 700)  # sealed: survives
        assert arena.restore_begin(oid(1))[0] == lib.SHM_OK

    pid = fork_child(child)
    assert wait_child(pid) == 0
    assert arena.stats().num_created == 4
    assert arena.reap(pid) == 3
    assert arena.reap(pid) == 0
    assert arena.contains(oid(10))[0] == lib.SHM_ERR_NOT_FOUND
    assert arena.contains(oid(11))[0] == lib.SHM_ERR_NOT_FOUND
    assert arena.contains(oid(1)) == (lib.SHM_OK, lib.SHM_STATE_SPILLED)
    assert arena.contains(oid(2)) == (lib.SHM_OK, lib.SHM_STATE_CREATED)
    arena.verify(oid(12))
    st = arena.stats()
    assert st.bytes_in_use == block_size(100) + block_size(700)


# -- pins: each process's are its own, and go with it ----------------------------------------


def test_reap_gives_back_exactly_a_dead_process_pins(arena):
    """Pins held by a process that died were freed only at shutdown: a long session whose
    workers crash or retire leaked store memory."""
    a, b = oid(1), oid(2)
    arena.put(a, 1000)
    arena.put(b, 2000)
    assert arena.get(a)[0] == lib.SHM_OK  # the parent's own pin on a

    def child():
        for object_id in (a, a, b):
            assert arena.get(object_id)[0] == lib.SHM_OK  # never released

    pid = fork_child(child)
    assert wait_child(pid) == 0
    assert arena.info(a)[1].pin_count == 3 and arena.info(b)[1].pin_count == 1
    assert arena.stats().num_pin_holders == 3
    assert arena.delete(b) == (lib.SHM_OK, lib.SHM_DELETE_DEFERRED)
    arena.check()
    assert arena.reap(pid) == 2  # its two holdings
    assert arena.info(a)[1].pin_count == 1  # the parent's stays
    assert arena.contains(b)[0] == lib.SHM_ERR_NOT_FOUND  # deleted, its last pin gone
    assert arena.stats().num_pin_holders == 1
    assert arena.release(a) == (lib.SHM_OK, 0)
    assert arena.stats().bytes_in_use == block_size(1000)


def test_a_process_cannot_release_a_pin_it_does_not_hold(arena):
    """A forked child that dropped the views it inherited gave back its parent's pins."""
    a = oid(1)
    arena.put(a, 1000)
    assert arena.get(a)[0] == lib.SHM_OK

    def child():
        assert arena.release(a)[0] == lib.SHM_ERR_INVALID

    assert wait_child(fork_child(child)) == 0
    assert arena.info(a)[1].pin_count == 1
    assert arena.release(a) == (lib.SHM_OK, 0)
    assert arena.release(a)[0] == lib.SHM_ERR_INVALID


def test_reap_cancels_the_spill_a_dead_process_began(arena):
    """A spiller that died between spill_begin and spill_finish left its object pinned
    and flagged SPILLING for the rest of the session."""
    a = oid(1)
    arena.put(a, 1000)

    def child():
        assert arena.spill_begin(a)[0] == lib.SHM_OK  # and dies before finishing

    pid = fork_child(child)
    assert wait_child(pid) == 0
    info = arena.info(a)[1]
    assert info.flags == lib.SHM_FLAG_SPILLING and info.pin_count == 1
    assert arena.reap(pid) == 1
    info = arena.info(a)[1]
    assert info.flags == 0 and info.pin_count == 0
    assert arena.spill_begin(a)[0] == lib.SHM_OK  # spillable again, by anyone
    assert lib.shm_spill_finish(arena.store, a) == lib.SHM_OK


def test_pins_beyond_a_full_pin_table_stay_counted_and_consistent(small_arena):
    a = small_arena
    slots = a.stats().table_slots
    limit = slots - slots // 4
    ids = [oid(i) for i in range(limit // 2 + 50)]
    for object_id in ids:
        a.put(object_id, 0)

    def pin_all():
        for object_id in ids:
            assert a.get(object_id)[0] == lib.SHM_OK

    first, second = fork_child(pin_all), None
    assert wait_child(first) == 0
    second = fork_child(pin_all)
    assert wait_child(second) == 0
    st = a.stats()
    assert st.num_pin_holders == limit and st.untracked_pins == 2 * len(ids) - limit
    a.check()
    assert a.reap(first) == len(ids)
    a.check()
    assert a.stats().num_pin_holders == limit - len(ids)
    assert a.reap(second) == limit - len(ids)  # its others are nobody's: kept
    a.check()
    assert a.stats().untracked_pins == 2 * len(ids) - limit


@pytest.mark.parametrize("point", [lib.SHM_CRASH_PIN_UNRECORDED, lib.SHM_CRASH_IN_PIN_SHIFT],
                         ids=["pin_unrecorded", "in_pin_shift"])
def test_crash_while_recording_pins_is_repaired(small_arena, point):
    a = small_arena
    ids = [oid(i) for i in range(700)]  # 1,400 pin slots of 2,048: a crowded table
    for object_id in ids:
        a.put(object_id, 0)
        assert a.get(object_id)[0] == lib.SHM_OK  # the parent's

    def child():
        for object_id in ids:
            assert a.get(object_id)[0] == lib.SHM_OK
        lib.shm_debug_crash_at(point)
        if point == lib.SHM_CRASH_PIN_UNRECORDED:
            a.get(ids[0])
        else:
            for object_id in ids:  # releases until one shifts a slot up
                a.release(object_id)
        raise AssertionError("the crash point was not reached")

    pid = fork_child(child)
    assert_killed(wait_child(pid))
    assert a.stats().repairs == 1
    a.check()
    a.reap(pid)
    a.check()
    for object_id in ids:  # the parent's pins are intact, and its own to give back
        assert a.release(object_id)[0] == lib.SHM_OK
    st = a.stats()
    assert st.num_pin_holders == 0
    # The pin the child was taking or giving back when it died: counted, nobody's.
    assert st.untracked_pins == 1


# -- lending: create within a budget, adopt under another id ---------------------------------


def test_create_within_keeps_the_asked_bytes_free(small_arena):
    a = small_arena
    heap = a.stats().heap_size
    off = ffi.new("uint64_t *")
    status = lib.shm_create_within(a.store, oid(1), heap // 2, 0, heap // 2, off)
    assert status == lib.SHM_ERR_FULL
    assert a.stats().num_objects == 0
    assert lib.shm_create_within(a.store, oid(1), heap // 4, 0, heap // 2, off) == lib.SHM_OK
    assert a.contains(oid(1)) == (lib.SHM_OK, lib.SHM_STATE_CREATED)
    assert lib.shm_create_within(a.store, oid(1), 10, 0, 0, off) == lib.SHM_ERR_EXISTS
    assert lib.shm_create_within(a.store, oid(2), heap + 1, 0, 0, off) == lib.SHM_ERR_TOO_LARGE


def test_adopt_turns_a_created_block_into_a_sealed_pinned_object(arena):
    status, off = arena.create(oid(1), 5000, 64)
    assert status == lib.SHM_OK
    arena.write(off, pattern(oid(2), 4990 + 10))
    before = arena.stats()
    assert lib.shm_adopt(arena.store, oid(1), oid(2), 4990, 10) == lib.SHM_OK
    assert arena.contains(oid(1))[0] == lib.SHM_ERR_NOT_FOUND
    status, info = arena.info(oid(2))
    assert status == lib.SHM_OK
    assert (info.state, info.flags, info.pin_count, info.offset, info.data_size,
            info.metadata_size) == (lib.SHM_STATE_SEALED, lib.SHM_FLAG_LENT, 1, off, 4990, 10)
    after = arena.stats()
    assert (after.bytes_in_use, after.num_objects) == (before.bytes_in_use, before.num_objects)
    assert (after.num_created, after.num_sealed, after.num_pinned) == (0, 1, 1)
    arena.verify(oid(2))
    # The buffer's pin: a reader's release can't take it, a delete waits for it, and its
    # own release frees the block.
    assert arena.get(oid(2))[0] == lib.SHM_OK
    assert arena.release(oid(2)) == (lib.SHM_OK, 0)
    assert arena.release(oid(2))[0] == lib.SHM_ERR_INVALID
    assert arena.delete(oid(2)) == (lib.SHM_OK, lib.SHM_DELETE_DEFERRED)
    assert lib.shm_lent_return(arena.store, oid(2), off + 64) == lib.SHM_ERR_INVALID  # elsewhere
    assert lib.shm_lent_return(arena.store, oid(2), off) == lib.SHM_OK
    assert arena.contains(oid(2))[0] == lib.SHM_ERR_NOT_FOUND
    assert lib.shm_lent_return(arena.store, oid(2), off) == lib.SHM_ERR_INVALID
    assert arena.stats().bytes_in_use == 0


def test_reap_drops_a_dead_process_lent_pins(arena):
    def child():
        for n in (1, 2):
            assert arena.create(oid(n), 1000)[0] == lib.SHM_OK
            assert lib.shm_adopt(arena.store, oid(n), oid(10 + n), 900, 0) == lib.SHM_OK

    assert wait_child(fork_child(child)) == 0
    assert arena.delete(oid(11)) == (lib.SHM_OK, lib.SHM_DELETE_DEFERRED)
    assert arena.reap(os.getpid()) == 0  # not ours: untouched
    infos, _ = arena.list(10)
    pid = infos[0].creator_pid
    assert arena.reap(pid) == 2
    assert arena.contains(oid(11))[0] == lib.SHM_ERR_NOT_FOUND  # deleted: freed with its pin
    status, info = arena.info(oid(12))
    assert (status, info.flags, info.pin_count) == (lib.SHM_OK, 0, 0)
    assert arena.reap(pid) == 0


def test_adopt_refuses_what_is_not_its_own_unsealed_block(arena):
    arena.create(oid(1), 1000)
    arena.put(oid(2), 100)
    for source, target, size in [
        (oid(9), oid(3), 10),      # no such object
        (oid(2), oid(3), 10),      # sealed already
        (oid(1), oid(3), 100_000),  # larger than its block
    ]:
        assert lib.shm_adopt(arena.store, source, target, size, 0) == lib.SHM_ERR_INVALID
    assert lib.shm_adopt(arena.store, oid(1), oid(2), 10, 0) == lib.SHM_ERR_EXISTS

    def child():  # another process's unsealed object is not its to adopt
        assert lib.shm_adopt(arena.store, oid(1), oid(4), 10, 0) == lib.SHM_ERR_INVALID

    assert wait_child(fork_child(child)) == 0
    assert arena.contains(oid(1)) == (lib.SHM_OK, lib.SHM_STATE_CREATED)
    assert arena.contains(oid(4))[0] == lib.SHM_ERR_NOT_FOUND


# -- concurrency ----------------------------------------------------------------------------------------


CHILDREN = 4
CHILD_SECONDS = 2.5


def _worker(arena: Arena, me: int, seed: int) -> None:
    rng = random.Random(seed)
    mine: list[bytes] = []
    made = 0
    deadline = time.monotonic() + CHILD_SECONDS
    while time.monotonic() < deadline:
        op = rng.random()
        if op < 0.35 or not mine:
            made += 1
            object_id = oid(made, prefix=me)
            size = rng.choice([0, 10, 5000, rng.randrange(1, 400_000)])
            status, off = arena.create(object_id, size)
            if status in (lib.SHM_ERR_FULL, lib.SHM_ERR_TABLE_FULL):
                if mine:  # make room, as the spiller would
                    assert arena.delete(mine.pop(0))[0] == lib.SHM_OK
                continue
            assert status == lib.SHM_OK, status
            arena.write(off, pattern(object_id, size))
            if rng.random() < 0.1:
                assert lib.shm_abort(arena.store, object_id) == lib.SHM_OK
                continue
            assert lib.shm_seal(arena.store, object_id) == lib.SHM_OK
            mine.append(object_id)
        elif op < 0.8:
            # Read anyone's object: it is gone, or it holds its pattern.  Children create
            # at about the same pace, so recent counters are likely to be alive.
            owner = rng.randrange(CHILDREN)
            object_id = oid(rng.randrange(max(1, made - 100), made + 10), prefix=owner)
            status, off, data, meta = arena.get(object_id)
            if status == lib.SHM_OK:
                assert arena.read(off, data + meta) == pattern(object_id, data + meta), object_id.hex()
                assert arena.release(object_id)[0] == lib.SHM_OK
            else:
                assert status in (lib.SHM_ERR_NOT_FOUND, lib.SHM_ERR_NOT_SEALED), status
        else:
            object_id = mine.pop(rng.randrange(len(mine)))
            status, outcome = arena.delete(object_id)
            assert status == lib.SHM_OK
            assert outcome in (lib.SHM_DELETED_NOW, lib.SHM_DELETE_DEFERRED)


def test_forked_processes_share_the_store(small_arena):
    a = small_arena
    pids = [fork_child(lambda me=me: _worker(a, me, seed=me)) for me in range(CHILDREN)]
    statuses = [wait_child(pid) for pid in pids]
    assert statuses == [0] * CHILDREN
    a.check()
    st = a.stats()
    assert (st.num_created, st.num_pinned, st.repairs) == (0, 0, 0)
    infos, total = a.list(100_000)
    assert total == st.num_objects > 0
    for info in infos:
        assert not info.flags & lib.SHM_FLAG_DELETE_PENDING
        a.verify(info.id)
    a.empty_out()


# -- robustness: processes killed while holding the lock -----------------------------------------------


def _seed_objects(arena: Arena, n: int = 6) -> list[bytes]:
    ids = [oid(1000 + i) for i in range(n)]
    for i, object_id in enumerate(ids):
        arena.put(object_id, 3000 * (i + 1), 16)
    return ids


def _after_repair(arena: Arena, survivors: list[bytes]) -> None:
    """The store works, holds what it held, and can give back every byte."""
    arena.check()
    for object_id in survivors:
        arena.verify(object_id)
    fresh = oid(555_555)
    arena.put(fresh, 12_345)
    arena.verify(fresh)
    arena.check()
    arena.empty_out()


def test_dead_lock_holder_is_recovered_from(arena):
    survivors = _seed_objects(arena)

    def child():
        assert lib.shm_debug_lock(arena.store) == lib.SHM_OK
        os.kill(os.getpid(), signal.SIGKILL)

    assert_killed(wait_child(fork_child(child)))
    assert arena.create(oid(1), 10)[0] == lib.SHM_OK  # would hang if the lock were lost
    assert arena.stats().repairs == 1
    assert lib.shm_abort(arena.store, oid(1)) == lib.SHM_OK
    _after_repair(arena, survivors)
    assert arena.stats().repairs == 1


@pytest.mark.parametrize(
    "point", [lib.SHM_CRASH_AFTER_SPLIT, lib.SHM_CRASH_AFTER_ENTRY, lib.SHM_CRASH_IN_COALESCE],
    ids=["after_split", "after_entry", "in_coalesce"],
)
def test_crash_inside_allocator_is_repaired(arena, point):
    survivors = _seed_objects(arena)
    # Free neighbours on both sides of the victim, so its delete coalesces.
    left, victim, right, guard = (oid(i) for i in range(4))
    for object_id in (left, victim, right, guard):
        arena.put(object_id, 40_000)
    arena.delete(left)
    arena.delete(right)
    survivors.append(guard)
    if point != lib.SHM_CRASH_IN_COALESCE:
        survivors.append(victim)
    used_before = arena.stats().bytes_in_use
    half_done = oid(777)

    def child():
        lib.shm_debug_crash_at(point)
        if point == lib.SHM_CRASH_IN_COALESCE:
            arena.delete(victim)
        else:
            arena.create(half_done, 2 * MiB)
        raise AssertionError("the crash point was not reached")

    pid = fork_child(child)
    assert_killed(wait_child(pid))
    st = arena.stats()  # takes the lock: repairs
    assert st.repairs == 1
    arena.check()
    if point == lib.SHM_CRASH_IN_COALESCE:
        assert arena.contains(victim)[0] == lib.SHM_ERR_NOT_FOUND
        assert st.bytes_in_use == used_before - block_size(40_000)
        assert st.free_blocks == 2  # left+victim+right, and the tail
    elif point == lib.SHM_CRASH_AFTER_SPLIT:
        assert arena.contains(half_done)[0] == lib.SHM_ERR_NOT_FOUND
        assert st.bytes_in_use == used_before
    else:
        assert arena.contains(half_done) == (lib.SHM_OK, lib.SHM_STATE_CREATED)
        assert st.bytes_in_use == used_before + block_size(2 * MiB)
        assert arena.reap(pid) == 1
    _after_repair(arena, survivors)


def _entry_slot(arena: Arena, object_id: bytes) -> int:
    """Byte offset of object_id's table entry (layout in _store.c: table at 4096, 80-byte entries)."""
    slots = arena.stats().table_slots
    table = arena.read(4096, slots * 80)
    for i in range(slots):
        if table[i * 80 : i * 80 + 28] == object_id and table[i * 80 + 28] != 0:
            return 4096 + i * 80
    raise KeyError(object_id)


def test_repair_rebuilds_derived_state(arena):
    """A holder that scribbled over every derived field, then died, is survived."""
    survivors = _seed_objects(arena)
    pending, spilling = oid(1), oid(2)
    arena.put(pending, 1000)
    arena.put(spilling, 2000)
    free_me = oid(3)
    arena.put(free_me, 100)
    arena.delete(free_me)  # leaves a hole: a second free block
    dup_from = _entry_slot(arena, survivors[0])
    pending_slot = _entry_slot(arena, pending)
    spilling_slot = _entry_slot(arena, spilling)
    empty_slot = next(
        4096 + i * 80 for i in range(arena.stats().table_slots) if arena.read(4096 + i * 80 + 28, 1) == b"\0"
    )

    def child():
        assert lib.shm_debug_lock(arena.store) == lib.SHM_OK
        arena.write(56, struct.pack("<Q", 12345))  # free_head
        arena.write(80, struct.pack("<7Q", *[99] * 7))  # bytes_in_use ... num_pinned
        # An entry caught in the middle of a backward shift: in two slots.
        arena.write(empty_slot, arena.read(dup_from, 80))
        # Its last pin gone, DELETE_PENDING, not yet freed.
        arena.write(pending_slot + 32, struct.pack("<II", lib.SHM_FLAG_DELETE_PENDING, 0))
        # A spill under way by this very process.
        arena.write(spilling_slot + 32, struct.pack("<II", lib.SHM_FLAG_SPILLING, 1))
        os.kill(os.getpid(), signal.SIGKILL)

    assert_killed(wait_child(fork_child(child)))
    st = arena.stats()
    assert st.repairs == 1
    arena.check()
    assert arena.contains(pending)[0] == lib.SHM_ERR_NOT_FOUND
    assert arena.info(spilling)[1].flags == 0 and arena.info(spilling)[1].pin_count == 0
    assert lib.shm_spill_finish(arena.store, spilling) == lib.SHM_ERR_PINNED  # cancelled
    _after_repair(arena, survivors + [spilling])


def test_check_reports_corruption(arena):
    a = oid(1)
    off = arena.put(a, 1000)
    block = off - BLOCK_HEADER
    good = arena.read(block, 8)
    arena.write(block, struct.pack("<Q", 100))
    msg = ffi.new("char[256]")
    assert lib.shm_check(arena.store, msg, 256) == lib.SHM_ERR_CORRUPT
    assert ffi.string(msg).decode() == f"block at offset {block}: size 100 not a multiple of 64"
    arena.write(block, good)
    arena.check()
    slot = _entry_slot(arena, a)
    arena.write(slot + 32, struct.pack("<II", lib.SHM_FLAG_DELETE_PENDING, 0))
    assert lib.shm_check(arena.store, msg, 256) == lib.SHM_ERR_CORRUPT
    assert "DELETE_PENDING with pin_count 0" in ffi.string(msg).decode()
    arena.write(slot + 32, struct.pack("<II", 0, 0))
    arena.write(slot + 48, struct.pack("<Q", off + 64))  # points inside its block
    assert lib.shm_check(arena.store, msg, 256) == lib.SHM_ERR_CORRUPT
    arena.write(slot + 48, struct.pack("<Q", off))
    arena.write(88, struct.pack("<Q", 5))  # free_blocks
    assert lib.shm_check(arena.store, msg, 256) == lib.SHM_ERR_CORRUPT
    assert "free_blocks" in ffi.string(msg).decode()
    arena.write(88, struct.pack("<Q", 1))
    arena.check()
    # A free block right after another free block should have been merged with it.
    b_off = arena.put(oid(2), 1000)
    arena.put(oid(3), 1000)
    arena.delete(a)
    arena.write(b_off - BLOCK_HEADER + 16, struct.pack("<Q", 1))  # b's is_free
    assert lib.shm_check(arena.store, msg, 256) == lib.SHM_ERR_CORRUPT
    assert ffi.string(msg).decode() == f"block at offset {b_off - BLOCK_HEADER}: free, and so is the block before it"
    arena.write(b_off - BLOCK_HEADER + 16, struct.pack("<Q", 0))


# -- shm_copy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_copy(threads):
    threshold = 8 * MiB
    src = bytearray(os.urandom(1024)) * (threshold // 1024 * 2 + 8)
    for i in range(0, len(src), 4099):
        src[i] = i & 0xFF  # no period that a misplaced chunk could match
    dst = bytearray(len(src) + 64)
    src_buf, dst_buf = ffi.from_buffer(src), ffi.from_buffer(dst)
    for n in (0, 1, 4095, 4097, threshold - 1, threshold, threshold + 1, threshold + 4097 * 3 + 5, 2 * threshold + 7):
        for skew in (0, 3):
            dst[:] = b"\xEE" * len(dst)
            lib.shm_copy(dst_buf + skew, src_buf, n, threads)
            assert dst[skew : skew + n] == src[:n], (n, skew)
            assert dst[:skew] == b"\xEE" * skew and dst[skew + n :] == b"\xEE" * (len(dst) - skew - n)
