"""``python -m shmray.demo``: shmray doing its main job on Ray's own examples, with timings.

Runs in: the driver (a user's terminal).

Each section is one of the seed programs shmray was made from, run unchanged through
``import shmray as ray``, with what it printed and how long it took; then the object store's
zero-copy path on a 100 MiB array against a pickle round trip (what a copying pool pays).
"""

from __future__ import annotations

import pickle
import time

import numpy as np

import shmray as ray

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


def main() -> None:
    start = time.perf_counter()
    ray.init(num_cpus=4, object_store_memory=512 * MiB)
    print(f"shmray.init(num_cpus=4): {(time.perf_counter() - start) * 1e3:.1f} ms")
    try:
        parallel_tasks()
        matrix_dag()
        aggregation()
        object_store()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
