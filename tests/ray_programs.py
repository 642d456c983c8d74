"""Programs written for Ray, unchanged, that ``test_ray_cluster.py`` runs in a driver process
of their own: on a session of this machine, and on a Ray cluster through
``shmray.init(address=...)``.  Each checks what it gets with ``assert``; a failure ends the
process with its traceback, which the test shows.

Run: python ray_programs.py CASE ADDRESS   (ADDRESS "local" for a session on this machine)

A driver of its own, not the test process: a Ray driver leaves threads, sockets and a
SIGTERM handler behind in its process after ``ray.shutdown()``, which the rest of the suite
must not inherit.  This module is also what Ray's workers import to rebuild the functions
and classes defined here (the head is started with this folder on its path).
"""

import asyncio
import os
import sys
import time

import numpy as np

import shmray as ray

DEADLOCK = 60


@ray.remote
def interval(seconds):
    """When it ran: (start, end), to tell that tasks ran at the same time."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def overlapped(intervals) -> bool:
    return max(start for start, _ in intervals) < min(end for _, end in intervals)


@ray.remote
def create_matrix(size):
    return np.random.normal(size=size)


@ray.remote
def multiply_matrices(x, y):
    return np.dot(x, y)


@ray.remote
def add(x, y):
    return x + y


@ray.remote
class Counter:
    def __init__(self):
        self.value = 0

    def increment(self):
        self.value += 1
        return self.value

    @ray.method(num_returns=2)
    def pair(self):
        return self.value, -self.value


@ray.remote
class AsyncActor:
    async def run_concurrent(self, i):
        start = time.time()
        await asyncio.sleep(0.3)
        return start, time.time()


@ray.remote(max_concurrency=4)
class ThreadedActor:
    def where(self, i):
        start = time.time()
        time.sleep(0.3)
        return start, time.time()


@ray.remote(max_retries=0)
def fails():
    raise ValueError("on purpose")


def parallel_tasks(on_ray: bool):
    assert overlapped(ray.get([interval.remote(0.5) for _ in range(2)], timeout=DEADLOCK))


def refs_as_futures(on_ray: bool):
    z = multiply_matrices.remote(create_matrix.remote([100, 100]),
                                 create_matrix.remote([100, 100]))
    assert ray.get(z, timeout=DEADLOCK).shape == (100, 100)
    total = ray.put(0)
    for value in range(1, 9):
        total = add.remote(total, value)
    assert ray.get(total, timeout=DEADLOCK) == 36
    ready, not_ready = ray.wait([interval.remote(1.0), add.remote(1, 1)], num_returns=1,
                                timeout=DEADLOCK)
    assert ray.get(ready[0]) == 2 and len(not_ready) == 1


def actors(on_ray: bool):
    counter = Counter.remote()
    assert ray.get([counter.increment.remote() for _ in range(3)], timeout=DEADLOCK) == [1, 2, 3]
    first, second = counter.pair.remote()  # @method's num_returns
    assert ray.get([first, second], timeout=DEADLOCK) == [3, -3]
    asynchronous = AsyncActor.remote()
    assert overlapped(ray.get([asynchronous.run_concurrent.remote(i) for i in range(4)],
                              timeout=DEADLOCK))
    threaded = ThreadedActor.remote()
    assert overlapped(ray.get([threaded.where.remote(i) for i in range(4)], timeout=DEADLOCK))


def names_options_and_kill(on_ray: bool):
    named = Counter.options(name="the-counter").remote()
    assert ray.get(named.increment.remote(), timeout=DEADLOCK) == 1
    same = ray.get_actor("the-counter")
    assert ray.get(same.increment.remote(), timeout=DEADLOCK) == 2
    assert ray.get(add.options(num_cpus=1).remote(3, 4), timeout=DEADLOCK) == 7
    ray.kill(named)
    deadline = time.monotonic() + DEADLOCK
    while True:  # on Ray, calls made just after kill() may still reach the actor
        try:
            ray.get(same.increment.remote(), timeout=DEADLOCK)
        except ray.exceptions.RayActorError:
            break
        assert on_ray and time.monotonic() < deadline, "calls to a killed actor still run"
        time.sleep(0.05)


def errors(on_ray: bool):
    try:
        ray.get(fails.remote(), timeout=DEADLOCK)
    except ValueError as exc:  # the user's class...
        assert "on purpose" in str(exc)
        assert isinstance(exc, ray.exceptions.RayTaskError)  # ...and shmray's
        if on_ray:
            import ray as real_ray
            assert isinstance(exc, real_ray.exceptions.RayTaskError)  # ...and Ray's
    else:
        raise AssertionError("the task's error was not raised")
    try:
        ray.get(interval.remote(5), timeout=0.01)
    except ray.exceptions.GetTimeoutError:
        pass
    else:
        raise AssertionError("get did not time out")


def the_session(on_ray: bool):
    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 2
    (node,) = ray.nodes()
    assert node["NodeManagerAddress"] == "127.0.0.1"
    assert ray.get_runtime_context().get_node_id() == node["NodeID"]
    refs = [add.remote(1, 2)]
    if on_ray:
        import ray as real_ray
        assert isinstance(refs[0], real_ray.ObjectRef)
        assert "ray" in sys.modules
    else:
        assert isinstance(refs[0], ray.ObjectRef) and "ray" not in sys.modules


CASES = {case.__name__: case for case in (parallel_tasks, refs_as_futures, actors,
                                          names_options_and_kill, errors, the_session)}


if __name__ == "__main__":
    case, address = sys.argv[1], sys.argv[2]
    on_ray = address != "local"
    if on_ray:
        ray.init(address=address)
    else:
        ray.init(num_cpus=2, object_store_memory=150 << 20)
    try:
        CASES[case](on_ray)
    finally:
        ray.shutdown()
    print("ok", os.getpid())
