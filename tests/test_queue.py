"""shmray.util.queue.Queue end to end: the items are in a ring in shared memory (large ones
in the store, overflow in the keeper actor); tasks, actors and the driver share it.  The
single-process semantics are checked against the standard library's queue.Queue, the
reference it mirrors, and JoinableQueue against multiprocessing's."""

import asyncio
import gc
import multiprocessing
import os
import queue as stdlib_queue
import signal

import numpy as np
import pytest

from conftest import in_both_modes, runtime, settle, wait_for

from shmray.util.queue import RING_BYTES, Empty, Full, JoinableQueue, Queue

DEADLOCK = 60
both = in_both_modes()


def _script(q):
    """The same operations on any queue with the standard interface: what each gives."""
    outcomes = []

    def attempt(operation):
        try:
            outcomes.append(("ok", operation()))
        except stdlib_queue.Empty:
            outcomes.append(("empty", None))
        except stdlib_queue.Full:
            outcomes.append(("full", None))

    attempt(lambda: q.get_nowait())
    attempt(lambda: q.empty())
    for item in ("a", "b", "c"):
        attempt(lambda: q.put_nowait(item))
    attempt(lambda: q.full())
    attempt(lambda: q.qsize())
    attempt(lambda: q.put("d", timeout=0.05))
    attempt(lambda: q.get())
    attempt(lambda: q.put("d", block=False))
    attempt(lambda: [q.get(timeout=1) for _ in range(3)])
    attempt(lambda: q.get(timeout=0.05))
    attempt(lambda: q.get(block=False))
    return outcomes


def test_semantics_match_the_standard_librarys_queue(both):
    reference = _script(stdlib_queue.Queue(maxsize=3))
    shared = Queue(maxsize=3)
    try:
        assert _script(shared) == reference
    finally:
        shared.shutdown()
    assert ("full", None) in reference and ("empty", None) in reference  # both paths ran


def test_empty_and_full_are_the_standard_librarys_too(both):
    q = Queue(maxsize=1)
    q.put(1)
    with pytest.raises(stdlib_queue.Full):
        q.put_nowait(2)
    assert q.get() == 1
    with pytest.raises(Empty):
        q.get_nowait()
    q.shutdown()


def test_tasks_and_actors_share_one_queue_in_order(ray):
    q = Queue()

    @ray.remote
    def produce(q, n):
        for i in range(n):
            q.put(i)
        return n

    @ray.remote
    class Consumer:
        def take(self, q, n):
            return [q.get(timeout=DEADLOCK) for _ in range(n)]

    consumer = Consumer.remote()
    taken = consumer.take.remote(q, 200)  # waits in get() before anything is put
    assert ray.get(produce.remote(q, 200), timeout=DEADLOCK) == 200
    assert ray.get(taken, timeout=DEADLOCK) == list(range(200))
    assert q.empty()
    q.shutdown()


def test_a_blocked_put_goes_through_when_another_process_makes_room(ray):
    q = Queue(maxsize=1)
    q.put("first")

    @ray.remote
    def put_second(q):
        q.put("second", timeout=DEADLOCK)  # blocks until the driver takes "first"
        return "put"

    done = put_second.remote(q)
    assert ray.wait([done], timeout=0.2)[0] == []
    assert q.get(timeout=DEADLOCK) == "first"
    assert ray.get(done, timeout=DEADLOCK) == "put"
    assert q.get(timeout=DEADLOCK) == "second"
    q.shutdown()


def test_batches_go_all_or_nothing(both):
    q = Queue(maxsize=3)
    q.put_nowait_batch([1, 2])
    with pytest.raises(Full, match="Cannot add 2 items to queue of size 2 and maxsize 3"):
        q.put_nowait_batch([3, 4])
    assert q.qsize() == 2
    with pytest.raises(Empty, match="Cannot get 3 items from queue of size 2"):
        q.get_nowait_batch(3)
    assert q.get_nowait_batch(2) == [1, 2]
    with pytest.raises(TypeError, match="must be an Iterable"):
        q.put_nowait_batch(5)
    with pytest.raises(TypeError, match="'num_items' must be an int"):
        q.get_nowait_batch("2")
    with pytest.raises(ValueError, match="'num_items' must be nonnegative"):
        q.get_nowait_batch(-1)
    with pytest.raises(ValueError, match="'timeout' must be a non-negative number"):
        q.get(timeout=-1)
    q.shutdown()


def test_async_put_and_get(both):
    q = Queue()

    async def roundtrip():
        await q.put_async("x")
        got = await q.get_async(timeout=DEADLOCK)
        with pytest.raises(Empty):
            await q.get_async(block=False)
        return got

    assert asyncio.run(roundtrip()) == "x"
    q.shutdown()


def test_a_cancelled_async_get_or_put_takes_or_adds_nothing(both):
    """asyncio.wait_for cancels a get_async that waits: the item put afterwards is still
    there for the next get, and a cancelled put_async into a full queue adds nothing."""
    q = Queue(maxsize=1)

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(q.get_async(), 0.1)
        q.put("kept")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(q.put_async("dropped"), 0.1)
        await asyncio.sleep(0.6)  # longer than a waiting thread's slice
        return q.get_nowait(), q.qsize()

    assert asyncio.run(scenario()) == ("kept", 0)
    q.shutdown()


@pytest.mark.parametrize("force", [False, True])
def test_shutdown_ends_the_queues_actor(ray, force):
    q = Queue()
    q.put(1)
    actor = q.actor
    q.shutdown(force=force)
    with pytest.raises(RuntimeError, match="shut down"):
        q.get()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.qsize.remote(), timeout=DEADLOCK)
    q.shutdown()  # again: nothing left to do


def test_a_large_array_crosses_as_the_putters_one_shared_copy(ray):
    """The putter's process puts it into the store; the queue's actor passes on only its ref,
    so what get() returns is a read-only view of the putter's object, not a copy the actor
    made."""
    q = Queue()

    @ray.remote
    def produce(q):
        q.put(np.full(1 << 20, 3.0))  # 8 MiB
        return os.getpid()

    putter = ray.get(produce.remote(q), timeout=DEADLOCK)
    got = q.get(timeout=DEADLOCK)
    assert float(got.sum()) == 3.0 * (1 << 20) and not got.flags.writeable
    store = runtime().store
    address = got.__array_interface__["data"][0]
    owners = [o.creator_pid for o in store.list()
              if store.address(o.offset) <= address < store.address(o.offset) + o.data_size]
    assert owners == [putter]
    q.shutdown()


class _CountsPickles:
    """An item too large for the ring that counts how often it is pickled."""

    pickled = 0

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        _CountsPickles.pickled += 1
        return _CountsPickles, (self.data,)


def test_a_large_item_is_pickled_once_by_its_put(both):
    """put() pickles an item to tell whether it fits the ring; one that does not goes to the
    store as that pickle, not pickled again (a list of 100k tuples took 170 ms a pickle)."""
    q = Queue()
    try:
        _CountsPickles.pickled = 0
        q.put(_CountsPickles(os.urandom(RING_BYTES)))
        assert _CountsPickles.pickled == 1
        got = q.get(timeout=DEADLOCK)
        assert isinstance(got, _CountsPickles) and len(got.data) == RING_BYTES
    finally:
        q.shutdown()


def test_four_producers_and_four_consumers_lose_nothing(ray):
    """Two producer tasks and two producer actors put into a small queue (so puts block too);
    two consumer tasks and two consumer actors take until they get a stop mark.  Every item
    arrives exactly once, and each consumer sees each producer's items in the order put."""
    n = 200
    q = Queue(maxsize=8)

    def item(p, i):
        if i % 50 == 0:  # now and then a large one, which travels through the store
            return (p, i, np.full(20_000, p * 1000 + i))
        return (p, i)

    def produce(q, p):
        for i in range(n):
            q.put(item(p, i), timeout=DEADLOCK)
        return p

    def consume(q):
        taken = []
        while True:
            got = q.get(timeout=DEADLOCK)
            if got is None:
                return taken
            if len(got) == 3:
                assert (got[2] == got[0] * 1000 + got[1]).all()
            taken.append(got[:2])

    class Worker:
        def produce(self, q, p):
            return produce(q, p)

        def consume(self, q):
            return consume(q)

    producer_task = ray.remote(num_cpus=0)(produce)
    consumer_task = ray.remote(num_cpus=0)(consume)
    workers = [ray.remote(Worker).options(num_cpus=0).remote() for _ in range(4)]
    consumers = [consumer_task.remote(q), consumer_task.remote(q),
                 workers[0].consume.remote(q), workers[1].consume.remote(q)]
    producers = [producer_task.remote(q, 0), producer_task.remote(q, 1),
                 workers[2].produce.remote(q, 2), workers[3].produce.remote(q, 3)]
    assert sorted(ray.get(producers, timeout=DEADLOCK)) == [0, 1, 2, 3]
    for _ in consumers:
        q.put(None, timeout=DEADLOCK)
    taken = ray.get(consumers, timeout=DEADLOCK)
    everything = [t for some in taken for t in some]
    assert sorted(everything) == [(p, i) for p in range(4) for i in range(n)]
    for some in taken:
        for p in range(4):
            mine = [i for q_, i in some if q_ == p]
            assert mine == sorted(mine)
    assert q.empty()
    q.shutdown()


def test_an_unbounded_queue_takes_more_items_than_its_ring_holds(both):
    """Items past the ring's room go to the keeper; they still come out in order, and once
    they are taken the ring is used again."""
    item = "x" * 1000
    n = 3 * RING_BYTES // len(item)
    q = Queue()
    for i in range(n):
        q.put_nowait((i, item))
    q.put_nowait_batch([(n, item), (n + 1, item)])
    assert q.qsize() == n + 2
    assert [q.get_nowait()[0] for _ in range(n + 2)] == list(range(n + 2))
    with pytest.raises(Empty):
        q.get_nowait()
    q.put("again")
    assert q.get_nowait() == "again" and q.empty()
    q.shutdown()


@pytest.mark.processes_only("a task putting refs runs before the driver can drop its own")
def test_refs_and_handles_in_items_keep_what_they_refer_to_alive(both):
    """An item holding refs or an actor handle goes through the store, and the keeper holds
    it while it waits in the queue: its objects and actor outlive everyone else's refs."""
    ray = both

    @ray.remote
    def square(x):
        return np.full(50_000, x * x)

    @ray.remote
    class Counter:
        def value(self):
            return 7

    @ray.remote
    def produce(q):
        q.put([square.remote(3), ray.put(np.arange(20_000))])
        q.put(Counter.remote())
        q.put(square.remote(4))  # a bare ref, as Ray users queue them
        return "done"

    q = Queue()
    assert ray.get(produce.remote(q), timeout=DEADLOCK) == "done"
    gc.collect()
    settle()
    square_ref, put_ref = q.get(timeout=DEADLOCK)
    assert ray.get(square_ref, timeout=DEADLOCK)[0] == 9
    assert ray.get(put_ref, timeout=DEADLOCK).sum() == np.arange(20_000).sum()
    assert ray.get(q.get(timeout=DEADLOCK).value.remote(), timeout=DEADLOCK) == 7
    bare = q.get(timeout=DEADLOCK)
    assert isinstance(bare, ray.ObjectRef) and ray.get(bare, timeout=DEADLOCK)[0] == 16
    q.shutdown()


def _joinable_script(q):
    """The same operations on multiprocessing's JoinableQueue and shmray's."""
    for item in range(3):
        q.put(item)
    taken = [q.get(timeout=DEADLOCK) for _ in range(3)]
    for _ in taken:
        q.task_done()
    q.join()  # returns at once: everything put was done
    try:
        q.task_done()
    except ValueError as exc:
        error = str(exc)
    q.close()
    try:
        q.put("after close")
    except ValueError as exc:
        closed = "is closed" in str(exc)
    q.join_thread()
    return taken, error, closed


def test_joinable_queue_counts_as_multiprocessings(both):
    reference = multiprocessing.get_context("fork").JoinableQueue()
    expected = _joinable_script(reference)
    q = JoinableQueue()
    assert _joinable_script(q) == expected == ([0, 1, 2], "task_done() called too many times",
                                               True)
    q.shutdown()


@pytest.mark.processes_only("join() waits for tasks that run after it")
def test_join_waits_until_workers_mark_every_item_done(both):
    ray = both
    q = JoinableQueue()

    @ray.remote(num_cpus=0)
    def work(q, n):
        for _ in range(n):
            q.get(timeout=DEADLOCK)
            q.task_done()
        return n

    for i in range(40):
        q.put(i)
    assert not q.join(timeout=0.05) and q.unfinished() == 40
    workers = [work.remote(q, 20), work.remote(q, 20)]
    assert q.join(timeout=DEADLOCK)
    assert ray.get(workers, timeout=DEADLOCK) == [20, 20] and q.unfinished() == 0
    q.shutdown()


def test_shutdown_wakes_a_getter_blocked_in_another_process(ray):
    q = Queue()

    @ray.remote(num_cpus=0)
    def wait_for_an_item(q):
        try:
            q.get(timeout=DEADLOCK)
        except RuntimeError as exc:
            return str(exc)
        return "got one"

    blocked = wait_for_an_item.remote(q)
    assert ray.wait([blocked], timeout=0.3)[0] == []
    q.shutdown()
    assert "shut down" in ray.get(blocked, timeout=DEADLOCK)


def test_a_getter_killed_while_waiting_leaves_the_queue_working(ray):
    q = Queue(maxsize=2)

    @ray.remote
    class Taker:
        def pid(self):
            return os.getpid()

        def take(self, q):
            return q.get(timeout=DEADLOCK)

    taker = Taker.remote()
    pid = ray.get(taker.pid.remote(), timeout=DEADLOCK)
    waiting = taker.take.remote(q)
    assert ray.wait([waiting], timeout=0.3)[0] == []
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(waiting, timeout=DEADLOCK)
    q.put_nowait_batch([1, 2])
    assert q.full() and q.get_nowait_batch(2) == [1, 2]
    q.shutdown()


def test_the_ring_is_freed_with_the_last_queue(ray):
    store = runtime().store
    settle()
    before = store.statistics().num_objects

    @ray.remote
    def use(q):
        q.put("from a task")
        return True

    q = Queue()
    assert ray.get(use.remote(q), timeout=DEADLOCK) and q.get() == "from a task"
    assert store.statistics().num_objects > before
    del q
    gc.collect()

    def ring_freed():
        """the ring's arena object is freed"""
        settle()
        return store.statistics().num_objects == before

    wait_for(ring_freed, timeout=DEADLOCK)
