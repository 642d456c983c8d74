"""The queue ring (src/shmray/_ring.c through shmray._ring) on real shared memory.

Each test makes a ring in an anonymous shared mapping, which forked children share, as
the processes of a session share the arena.  Children leave through os._exit, so none
returns into pytest.
"""

from __future__ import annotations

import mmap
import os
import signal
import time

import numpy as np
import pytest

from shmray._ring import HEADER_SIZE, Ring, RingClosed, deadline_after
from shmray._store_cffi import lib

NOW = 0.0  # a deadline already past: don't wait


def make_ring(size: int = 4096, max_items: int = 0) -> Ring:
    memory = mmap.mmap(-1, size)
    address = np.frombuffer(memory, np.uint8).ctypes.data
    return Ring.format(memory, address, size, max_items)


def in_child(work) -> int:
    """Run work() in a forked child; its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    return pid


def reap(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def test_records_come_out_in_order_across_the_wrap():
    ring = make_ring(HEADER_SIZE + 256)
    sent = []
    for round_ in range(50):  # 50 x 3 records of up to 40 bytes wrap a 256-byte ring often
        batch = [bytes([round_ % 256]) * (round_ % 40) for _ in range(3)]
        assert ring.put(batch, NOW) is False
        sent += batch
        got, overflowed = ring.get(3, NOW)
        assert overflowed == 0 and got == batch
    assert ring.counts() == (0, 150)


def test_gets_and_batches_are_all_or_nothing():
    ring = make_ring(max_items=3)
    assert ring.put([b"a", b"b"], NOW) is False
    assert ring.put([b"c", b"d"], NOW) is None  # 4 > max_items: nothing went in
    assert ring.get(3, NOW) is None              # only 2 there: nothing taken
    assert ring.get(2, NOW) == ([b"a", b"b"], 0)


def test_a_full_ring_overflows_without_a_limit_and_blocks_with_one():
    unbounded = make_ring(HEADER_SIZE + 64)
    assert unbounded.put([b"x" * 40], NOW) is False
    assert unbounded.put([b"y" * 40], NOW) is True   # no room: the caller sends it on
    assert unbounded.put([b"z"], NOW) is True        # and what follows, to stay in order
    assert unbounded.counts()[0] == 1                # overflow counts once it has arrived
    assert unbounded.get(2, NOW) is None
    unbounded.arrived(2)
    assert unbounded.get(3, NOW) == ([b"x" * 40], 2)  # the ring's one, then 2 to fetch
    assert unbounded.put([b"w"], NOW) is False         # overflow drained: the ring again

    bounded = make_ring(max_items=1)
    assert bounded.put([b"1"], NOW) is False
    started = time.monotonic()
    assert bounded.put([b"2"], deadline_after(0.05)) is None
    assert time.monotonic() - started >= 0.05


def test_a_record_larger_than_the_scratch_buffer_comes_out_whole():
    ring = make_ring(1 << 20)
    big = os.urandom(300_000)
    ring.put([big], NOW)
    assert ring.get(1, NOW) == ([big], 0)


def test_a_blocked_get_wakes_when_another_process_puts():
    ring = make_ring()

    def put_later():
        time.sleep(0.1)
        ring.put([b"hello"], NOW)

    child = in_child(put_later)
    got, _ = ring.get(1, deadline_after(30))
    assert got == [b"hello"]
    assert reap(child) == 0


def test_close_wakes_every_waiter_and_refuses_what_follows():
    ring = make_ring()

    def close_later():
        time.sleep(0.1)
        ring.close()

    child = in_child(close_later)
    with pytest.raises(RingClosed):
        ring.get(1, None)  # would wait forever
    assert reap(child) == 0
    with pytest.raises(RingClosed):
        ring.put([b"late"], NOW)


def test_join_waits_for_task_done_in_another_process():
    ring = make_ring()
    ring.put([b"a", b"b"], NOW)
    assert ring.join(NOW) is False
    assert ring.task_done(3) is False  # more than were put

    def finish():
        ring.get(2, NOW)
        time.sleep(0.05)
        ring.task_done(2)

    child = in_child(finish)
    assert ring.join(deadline_after(30)) is True
    assert reap(child) == 0 and ring.counts() == (0, 0)


def test_a_holder_that_dies_is_recovered_from_and_its_count_mended():
    """A child takes the lock, leaves the item count wrong (as a put that died between
    writing its record and counting it would) and is killed: the next caller gets the
    lock, recounts the records, and the queue goes on."""
    ring = make_ring()
    ring.put([b"one", b"two"], NOW)

    def die_holding_the_lock():
        assert lib.shm_ring_debug_lock(ring._ring, 5) == lib.SHM_OK
        os.kill(os.getpid(), signal.SIGKILL)

    child = in_child(die_holding_the_lock)
    assert os.WTERMSIG(reap(child)) == signal.SIGKILL
    assert ring.counts() == (2, 2)
    assert ring.get(2, NOW) == ([b"one", b"two"], 0)
    ring.put([b"three"], NOW)
    assert ring.get(1, NOW) == ([b"three"], 0)


def test_memory_that_is_not_a_ring_is_refused():
    memory = mmap.mmap(-1, 4096)
    ring = Ring(memory, np.frombuffer(memory, np.uint8).ctypes.data)
    with pytest.raises(ValueError, match="not a ring"):
        ring.put([b"x"], NOW)
