"""shmray.util.queue.Queue against multiprocessing.Queue, in the same run.

Run: python -m pytest bench/bench_queue.py --benchmark-enable --benchmark-only

In both, a long-lived producer in another process (a shmray actor; a multiprocessing
Process) is told once per round to put N items, and the driver gets them: one round is N
put+get pairs between two processes.  The producer makes its payload once (outside the
timing), so the rounds time the queue, not the making of items.  The driver reads one element
of each array it gets, nothing more: with shmray it gets a view of shared memory, with
multiprocessing a fresh copy, either way ready to use.

Groups (compare within a group):
- queue-small-500: 500 small items (a tuple of an int and a short string).
- queue-16MiB-4: 4 numpy arrays of 16 MiB each.
"""

import multiprocessing

import numpy as np
import pytest

import shmray
from shmray.util.queue import Queue
from benchstats import record_rate

MiB = 1 << 20
N_SMALL = 500
N_LARGE = 4


def _payload(large: bool):
    return np.full(16 * MiB // 8, 7.0) if large else (1, "a small item")


class Producer:
    def __init__(self):
        self.payloads = {False: _payload(False), True: _payload(True)}

    def produce(self, q, n, large):
        item = self.payloads[large]
        for _ in range(n):
            q.put(item)
        return n


def _mp_producer(orders, items):
    payloads = {False: _payload(False), True: _payload(True)}
    while True:
        order = orders.get()
        if order is None:
            break
        n, large = order
        for _ in range(n):
            items.put(payloads[large])


@pytest.fixture(scope="module")
def ray():
    shmray.init(num_cpus=2, object_store_memory=512 * MiB)
    yield shmray
    shmray.shutdown()


@pytest.fixture(scope="module")
def shmray_side(ray):
    q = Queue()
    producer = ray.remote(Producer).remote()
    assert ray.get(producer.produce.remote(q, 1, False)) == 1
    assert q.get() == (1, "a small item")
    yield q, producer
    q.shutdown()


@pytest.fixture(scope="module")
def mp_side():
    orders, items = multiprocessing.Queue(), multiprocessing.Queue()
    process = multiprocessing.Process(target=_mp_producer, args=(orders, items), daemon=True)
    process.start()
    orders.put((1, False))
    assert items.get(timeout=60) == (1, "a small item")
    yield orders, items
    orders.put(None)
    process.join(timeout=10)
    if process.is_alive():
        process.terminate()
        process.join()


def _shmray_round(side, n, large):
    q, producer = side
    done = producer.produce.remote(q, n, large)
    for _ in range(n):
        item = q.get(timeout=60)
        if large:
            assert item[-1] == 7.0
    assert shmray.get(done, timeout=60) == n


def _mp_round(side, n, large):
    orders, items = side
    orders.put((n, large))
    for _ in range(n):
        item = items.get(timeout=60)
        if large:
            assert item[-1] == 7.0


def _rate(benchmark, items):
    record_rate(benchmark, "items_per_s", items)


def test_small_items_shmray(benchmark, shmray_side):
    benchmark.group = "queue-small-500"
    benchmark.pedantic(_shmray_round, args=(shmray_side, N_SMALL, False), rounds=10)
    _rate(benchmark, N_SMALL)


def test_small_items_mp_queue(benchmark, mp_side):
    benchmark.group = "queue-small-500"
    benchmark.pedantic(_mp_round, args=(mp_side, N_SMALL, False), rounds=10)
    _rate(benchmark, N_SMALL)


def test_16mib_arrays_shmray(benchmark, shmray_side):
    benchmark.group = "queue-16MiB-4"
    benchmark.pedantic(_shmray_round, args=(shmray_side, N_LARGE, True), rounds=10)
    _rate(benchmark, N_LARGE)


def test_16mib_arrays_mp_queue(benchmark, mp_side):
    benchmark.group = "queue-16MiB-4"
    benchmark.pedantic(_mp_round, args=(mp_side, N_LARGE, True), rounds=10)
    _rate(benchmark, N_LARGE)
