"""shmray.util.ActorPool end to end, as Ray's: map/map_unordered submit when called, results
of earlier submissions nobody fetched are dropped (not waited for), num_returns=2 methods."""

import os
import threading

import pytest

import shmray
from shmray.util.queue import Queue

DEADLOCK = 60


@pytest.fixture
def worker_class(ray):
    @ray.remote
    class Worker:
        def __init__(self):
            self.seen = []

        def double(self, v):
            self.seen.append(v)
            return 2 * v

        def seen_values(self):
            return self.seen

        def wait_for(self, q):
            return q.get(timeout=DEADLOCK * 2)

        @ray.method(num_returns=2)
        def pair(self, v):
            return v, -v

    return Worker


def test_map_submits_when_called_not_when_iterated(ray, worker_class):
    actors = [worker_class.remote() for _ in range(2)]
    pool = shmray.util.ActorPool(actors)
    results = pool.map(lambda a, v: a.double.remote(v), range(6))
    unordered = shmray.util.ActorPool([worker_class.remote()]).map_unordered(
        lambda a, v: a.double.remote(v), [10])
    # Calls from one caller to one actor run in order, so these see what map() submitted.
    seen = ray.get([a.seen_values.remote() for a in actors], timeout=DEADLOCK)
    assert sorted(seen[0] + seen[1]) == [0, 1]  # one job per actor; the rest wait for them
    assert list(results) == [0, 2, 4, 6, 8, 10]
    assert list(unordered) == [20]


def test_results_nobody_fetched_are_dropped_not_waited_for(ray, worker_class):
    pool = shmray.util.ActorPool([worker_class.remote() for _ in range(2)])
    release = Queue()
    pool.submit(lambda a, q: a.wait_for.remote(q), release)  # blocks one actor until released
    released = threading.Event()

    def unblock():
        released.set()
        release.put("go")

    timer = threading.Timer(DEADLOCK, unblock)  # only a hang guard: the test passes long before
    timer.start()
    try:
        results = pool.map_unordered(lambda a, v: a.double.remote(v), range(4))
        # The free actor runs three of the four jobs while the blocked call still blocks; a
        # pool that waited for the unfetched result would get nothing until it was released.
        first = [next(results) for _ in range(3)]
        assert not released.is_set()
        unblock()
        assert sorted(first + list(results)) == [0, 2, 4, 6]
    finally:
        timer.cancel()
        release.shutdown()
    assert not pool.has_next()


def test_methods_with_two_returns(ray, worker_class):
    pool = shmray.util.ActorPool([worker_class.remote() for _ in range(2)])
    assert list(pool.map(lambda a, v: a.pair.remote(v), range(5))) == \
        [[v, -v] for v in range(5)]
    assert sorted(pool.map_unordered(lambda a, v: a.pair.remote(v), range(5))) == \
        [[v, -v] for v in range(5)]
    pool.submit(lambda a, v: a.pair.remote(v), 3)
    assert pool.get_next(timeout=DEADLOCK) == [3, -3]


def test_fn_that_returns_no_ref_says_so(ray, worker_class):
    pool = shmray.util.ActorPool([worker_class.remote()])
    with pytest.raises(TypeError, match="must return an ObjectRef"):
        pool.submit(lambda a, v: v, 1)
    assert pool.has_free()


def test_get_next_timeout_and_ignore(ray, worker_class):
    pool = shmray.util.ActorPool([worker_class.remote()])
    release = Queue()
    try:
        pool.submit(lambda a, q: a.wait_for.remote(q), release)
        with pytest.raises(TimeoutError):
            pool.get_next(timeout=0.05)
        assert pool.has_next()
        with pytest.raises(TimeoutError, match="ignored"):
            pool.get_next_unordered(timeout=0.05, ignore_if_timedout=True)
        assert not pool.has_next() and pool.has_free()
        release.put("go")
        pool.submit(lambda a, v: a.double.remote(v), 4)  # queued behind the ignored call
        assert pool.get_next(timeout=DEADLOCK) == 8
    finally:
        release.shutdown()


def test_an_actor_that_died_leaves_the_pool(ray):
    @ray.remote(max_restarts=0)
    class Fragile:
        def work(self, v):
            if v < 0:
                os._exit(1)
            return v

    pool = shmray.util.ActorPool([Fragile.remote() for _ in range(2)])
    pool.submit(lambda a, v: a.work.remote(v), -1)
    with pytest.raises(shmray.exceptions.ActorDiedError):
        pool.get_next(timeout=DEADLOCK)
    # Every later job goes to the survivor instead of failing on the dead one.
    assert list(pool.map(lambda a, v: a.work.remote(v), range(6))) == list(range(6))
