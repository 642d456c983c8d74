"""``python -m shmray.demo``: shmray doing its main job on Ray's own examples, with timings.

Runs in: the driver (a user's terminal).

Each section is one of the seed programs shmray was made from (parallel tasks, the matrix
DAG, linear and tree aggregation, Counter, MessageActor, async and threaded actors), run
unchanged through ``import shmray as ray``, with what it printed and how long it took; then
the object store's zero-copy path on a 100 MiB array against a pickle round trip (what a
copying pool pays); then the one-line switch from ``multiprocessing.Pool``: the same
``pool.map`` over numpy arrays, on multiprocessing's Pool and on shmray's.
"""

from __future__ import annotations

import multiprocessing
import pickle
import time

import numpy as np

import shmray as ray
from shmray.util.multiprocessing import Pool as ShmrayPool

MiB = 1 << 20


def _timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    print(f"  {label}: {elapsed:7.3f} s")
    return result, elapsed


def parallel_tasks() -> None:
    print("== parallel tasks: four f(x) that each sleep 1 s ==")

    @ray.remote
    def f(x):
        time.sleep(1)
        return x

    result_ids = []

    def run():
        for i in range(4):
            result_ids.append(f.remote(i))
        return ray.get(result_ids)

    results, _ = _timed("4 tasks in parallel (serially: 4 s)", run)
    print(f"  results: {results}")


def matrix_dag() -> None:
    print("== task dependencies: multiply_matrices(create_matrix(), create_matrix()) ==")

    @ray.remote
    def create_matrix(size):
        return np.random.normal(size=size)

    @ray.remote
    def multiply_matrices(x, y):
        return np.dot(x, y)

    def run():
        x_id = create_matrix.remote([1000, 1000])
        y_id = create_matrix.remote([1000, 1000])
        z_id = multiply_matrices.remote(x_id, y_id)
        return ray.get(z_id)

    z, _ = _timed("1000x1000 DAG", run)
    print(f"  z: shape {z.shape}, read-only zero-copy view: {not z.flags.writeable}")


def aggregation() -> None:
    print("== value aggregation: 8 values summed by add() tasks that sleep 1 s ==")

    @ray.remote
    def add(x, y):
        time.sleep(1)
        return x + y

    def linear():
        values = [1, 2, 3, 4, 5, 6, 7, 8]
        while len(values) > 1:
            values = [add.remote(values[0], values[1])] + values[2:]
        return ray.get(values[0])

    def tree():
        values = [1, 2, 3, 4, 5, 6, 7, 8]
        while len(values) > 1:
            values = values[2:] + [add.remote(values[0], values[1])]
        return ray.get(values[0])

    result, _ = _timed("linear chain, 7 steps (expect ~7 s)", linear)
    print(f"  result: {result}")
    result, _ = _timed("tree, log2(8) = 3 steps (expect ~3 s)", tree)
    print(f"  result: {result}")


def actors() -> None:
    print("== actors: Counter, MessageActor, an async actor, a threaded actor ==")

    @ray.remote
    class Counter(object):
        def __init__(self):
            self.x = 0

        def inc(self):
            self.x += 1

        def get_value(self):
            return self.x

    c = Counter.remote()
    print(f"  Counter: {ray.get(c.get_value.remote())}", end="")
    c.inc.remote()
    c.inc.remote()
    print(f" -> after two inc(): {ray.get(c.get_value.remote())}")

    @ray.remote
    class MessageActor(object):
        def __init__(self):
            self.messages = []

        def add_message(self, message):
            self.messages.append(message)

        def get_and_clear_messages(self):
            messages = self.messages
            self.messages = []
            return messages

    @ray.remote
    def worker(message_actor, j):
        for i in range(3):
            time.sleep(0.1)
            message_actor.add_message.remote("Message {} from actor {}.".format(i, j))

    message_actor = MessageActor.remote()
    [worker.remote(message_actor, j) for j in range(3)]
    for _ in range(4):
        new_messages = ray.get(message_actor.get_and_clear_messages.remote())
        print("  New messages:", new_messages)
        time.sleep(0.1)

    import asyncio

    @ray.remote
    class AsyncActor:
        def __init__(self, expected_num_tasks: int):
            self._event = asyncio.Event()
            self._curr_num_tasks = 0
            self._expected_num_tasks = expected_num_tasks

        async def run_concurrent(self):
            self._curr_num_tasks += 1
            if self._curr_num_tasks == self._expected_num_tasks:
                print("All coroutines are executing concurrently, unblocking.")
                self._event.set()
            else:
                print("Waiting for other coroutines to start.")
                await self._event.wait()
            print("All coroutines ran concurrently.")

    actor = AsyncActor.remote(4)
    refs = [actor.run_concurrent.remote() for _ in range(4)]
    ray.get(refs)
    time.sleep(0.05)  # let the actor's lines reach the terminal before ours

    @ray.remote
    class ThreadedActor:
        def task_1(self): print("I'm running in a thread!")
        def task_2(self): print("I'm running in another thread!")

    a = ThreadedActor.options(max_concurrency=2).remote()
    ray.get([a.task_1.remote(), a.task_2.remote()])
    time.sleep(0.05)

    def calls():
        for _ in range(1000):
            ray.get(c.get_value.remote())

    _, elapsed = _timed("1,000 synchronous actor calls", calls)
    print(f"  -> {1000 / elapsed:,.0f} calls/s")


def object_store() -> None:
    print("== the object store: a 100 MiB array through shared memory ==")
    array = np.random.default_rng(0).random(100 * MiB // 8)
    ref = ray.put(array)
    view = ray.get(ref)
    print(f"  put + get: equal={np.array_equal(view, array)}, "
          f"read-only={not view.flags.writeable}, zero-copy={not view.flags.owndata}")
    del view

    def best_of(n, fn):
        best = float("inf")
        for _ in range(n):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    put_s = best_of(5, lambda: ray.put(array))
    get_s = best_of(20, lambda: ray.get(ref))
    pickle_s = best_of(3, lambda: pickle.loads(pickle.dumps(array, protocol=5)))
    print(f"  put 100 MiB (warm arena): {put_s * 1e3:8.3f} ms ({100 / 1024 / put_s:5.1f} GiB/s)")
    print(f"  get 100 MiB (zero-copy) : {get_s * 1e3:8.3f} ms")
    print(f"  pickle dumps+loads 100 MiB (a copying pool, per hop): {pickle_s * 1e3:8.3f} ms")
    print(f"  -> get is {pickle_s / get_s:,.0f}x faster than a pickle round trip")


def _scaled(array):
    return array * 2.0


def pool_switch() -> None:
    print("== from multiprocessing: Pool(2).map(f, eight 16 MiB arrays), f returning one ==")
    arrays = [np.full(16 * MiB // 8, float(i)) for i in range(8)]
    timings = {}
    for label, make_pool in (("multiprocessing.Pool", multiprocessing.get_context("fork").Pool),
                             ("shmray.util.multiprocessing.Pool", ShmrayPool)):
        with make_pool(2) as pool:
            pool.map(_scaled, arrays[:2])  # started and warm: time the map, not the start
            results, timings[label] = _timed(f"{label:33}", lambda: pool.map(_scaled, arrays))
        assert all(result[0] == 2.0 * i for i, result in enumerate(results))
        del results
    slow, fast = timings.values()
    print(f"  -> {slow / fast:.1f}x faster; the change is one import line")


def main() -> None:
    start = time.perf_counter()
    ray.init(num_cpus=4, object_store_memory=512 * MiB)
    print(f"shmray.init(num_cpus=4): {(time.perf_counter() - start) * 1e3:.1f} ms")
    try:
        parallel_tasks()
        matrix_dag()
        aggregation()
        actors()
        object_store()
        pool_switch()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
