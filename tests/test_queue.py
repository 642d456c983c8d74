"""shmray.util.queue.Queue end to end: an async actor holds the items; tasks, actors and the
driver share it.  The single-process semantics are checked against the standard library's
queue.Queue, the reference it mirrors."""

import asyncio
import os
import queue as stdlib_queue

import numpy as np
import pytest

from conftest import runtime

from shmray.util.queue import Empty, Full, Queue

DEADLOCK = 60


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


def test_semantics_match_the_standard_librarys_queue(ray):
    reference = _script(stdlib_queue.Queue(maxsize=3))
    shared = Queue(maxsize=3)
    try:
        assert _script(shared) == reference
    finally:
        shared.shutdown()
    assert ("full", None) in reference and ("empty", None) in reference  # both paths ran


def test_empty_and_full_are_the_standard_librarys_too(ray):
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


def test_batches_go_all_or_nothing(ray):
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


def test_async_put_and_get(ray):
    q = Queue()

    async def roundtrip():
        await q.put_async("x")
        got = await q.get_async(timeout=DEADLOCK)
        with pytest.raises(Empty):
            await q.get_async(block=False)
        return got

    assert asyncio.run(roundtrip()) == "x"
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
