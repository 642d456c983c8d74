"""The object store's paths against multiprocessing.shared_memory + pickle and np.copyto.

Run: python -m pytest bench/bench_store.py --benchmark-enable --benchmark-only

Groups (compare within a group):
- put-<size>: shmray put (arena pages reused: the steady state), the same bytes through a
  fresh multiprocessing.shared_memory block + pickle, and np.copyto into warm memory (the
  floor: one memcpy).
- get-100MiB: shmray get of a sealed array (a lookup and a view) against attaching a
  SharedMemory block and unpickling over it.
- roundtrip-1KiB: put + get of a 1 KiB array.
"""

import pickle
from multiprocessing import shared_memory

import numpy as np
import pytest

import shmray

MiB = 1 << 20
SIZES = {"1KiB": 1024, "1MiB": MiB, "100MiB": 100 * MiB}


@pytest.fixture(scope="module")
def ray():
    shmray.init(num_cpus=2, object_store_memory=1024 * MiB)
    yield shmray
    shmray.shutdown()


def _array(nbytes):
    return np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)


def _mp_put(array):
    buffers = []
    stream = pickle.dumps(array, protocol=5, buffer_callback=buffers.append)
    raw = buffers[0].raw()
    shm = shared_memory.SharedMemory(create=True, size=len(stream) + raw.nbytes)
    shm.buf[: len(stream)] = stream
    shm.buf[len(stream) : len(stream) + raw.nbytes] = raw
    return shm, len(stream)


def _mp_free(shm):
    shm.close()
    shm.unlink()


@pytest.mark.parametrize("size", list(SIZES))
def test_put_shmray(benchmark, ray, size):
    benchmark.group = f"put-{size}"
    array = _array(SIZES[size])
    runtime = shmray._context.runtime

    def put_and_drop():
        ray.put(array)
        runtime.flush()  # the release, so the next put finds the room

    benchmark(put_and_drop)


@pytest.mark.parametrize("size", list(SIZES))
def test_put_mp_shared_memory(benchmark, size):
    benchmark.group = f"put-{size}"
    array = _array(SIZES[size])
    benchmark(lambda: _mp_free(_mp_put(array)[0]))


@pytest.mark.parametrize("size", list(SIZES))
def test_put_np_copyto_warm(benchmark, size):
    benchmark.group = f"put-{size}"
    array = _array(SIZES[size])
    target = np.empty_like(array)
    np.copyto(target, array)  # fault the pages in first: this is the warm-memory floor
    benchmark(np.copyto, target, array)


def test_get_shmray(benchmark, ray):
    benchmark.group = "get-100MiB"
    ref = ray.put(_array(100 * MiB))
    result = benchmark(ray.get, ref)
    assert result.nbytes == 100 * MiB


def test_get_mp_shared_memory(benchmark):
    benchmark.group = "get-100MiB"
    shm, stream_len = _mp_put(_array(100 * MiB))

    def attach_and_load():
        other = shared_memory.SharedMemory(name=shm.name)
        value = pickle.loads(other.buf[:stream_len],
                             buffers=[other.buf[stream_len : stream_len + 100 * MiB]])
        del value
        other.close()

    try:
        benchmark(attach_and_load)
    finally:
        _mp_free(shm)


def test_roundtrip_1kib_shmray(benchmark, ray):
    benchmark.group = "roundtrip-1KiB"
    array = _array(1024)
    benchmark(lambda: ray.get(ray.put(array)))


def test_roundtrip_1kib_mp_shared_memory(benchmark):
    benchmark.group = "roundtrip-1KiB"
    array = _array(1024)

    def roundtrip():
        shm, stream_len = _mp_put(array)
        value = pickle.loads(bytes(shm.buf[:stream_len]),
                             buffers=[bytes(shm.buf[stream_len : stream_len + 1024])])
        _mp_free(shm)
        return value

    benchmark(roundtrip)

