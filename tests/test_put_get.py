"""put/get end to end through the real arena: zero copy, lifetime, spilling, bad input."""

import copy
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shmray
from shmray import exceptions
from conftest import MiB, arena_fds, arena_mappings, dev_shm_files, runtime, settle, wait_for


def test_small_values_round_trip(ray):
    for value in [1, "x", None, [1, 2], {"k": (1, 2)}, b"\x01" * 100]:
        assert ray.get(ray.put(value)) == value
    assert ray.get([ray.put(i) for i in range(10)]) == list(range(10))


def test_small_values_stay_out_of_the_arena(ray):
    before = runtime().store.statistics().num_objects
    ref = ray.put(np.zeros(1000))
    assert runtime().store.statistics().num_objects == before
    np.testing.assert_array_equal(ray.get(ref), np.zeros(1000))


def test_get_of_large_array_is_a_read_only_view_of_the_arena(ray):
    a = np.random.default_rng(0).random(2_000_000)
    ref = ray.put(a)
    b = ray.get(ref)
    np.testing.assert_array_equal(a, b)
    store = runtime().store
    address = b.__array_interface__["data"][0]
    assert store.address(0) <= address < store.address(store.capacity)
    assert address % 64 == 0
    assert not b.flags.writeable
    with pytest.raises(ValueError):
        b[0] = 1.0
    c = ray.get(ref)
    assert c.__array_interface__["data"][0] == address  # the same shared bytes, no copy


def test_view_pins_its_object_until_collected(ray):
    ref = ray.put(np.ones(1_000_000))
    object_id = ref.binary()
    view = ray.get(ref)
    store = runtime().store
    assert store.info(object_id).pin_count == 1
    del ref
    settle()
    info = store.info(object_id)
    assert info.delete_pending and info.state == "sealed"
    assert view.sum() == 1_000_000  # still readable
    del view
    gc.collect()
    assert store.contains(object_id) is None


def test_nested_values_and_many_buffers(ray):
    value = {
        "a": np.arange(100_000, dtype=np.int32),
        "f": np.asfortranarray(np.ones((300, 400))),
        "s": np.arange(1_000_000.0)[::2],
        "nested": [np.full(50_000, 7, dtype=np.uint8), ("t", b"b" * 200_000)],
    }
    back = ray.get(ray.put(value))
    np.testing.assert_array_equal(back["a"], value["a"])
    assert back["f"].flags.f_contiguous
    np.testing.assert_array_equal(back["f"], value["f"])
    np.testing.assert_array_equal(back["s"], value["s"])
    np.testing.assert_array_equal(back["nested"][0], value["nested"][0])
    assert back["nested"][1] == ("t", b"b" * 200_000)


def test_dropping_the_last_ref_frees_the_object(ray):
    store = runtime().store
    start = store.statistics().bytes_in_use
    for _ in range(40):  # 40 x 100 MB through a 150 MiB store: only frees make this work
        ref = ray.put(np.ones(100 * 1000 * 1000 // 8))
        del ref
    settle()
    assert store.statistics().bytes_in_use == start
    assert runtime().spiller.spilled_bytes == 0


def test_refs_inside_objects_keep_their_objects(ray):
    inner = ray.put(np.arange(200_000))
    outer = ray.put([inner, "label"])
    inner_id = inner.binary()
    del inner
    settle()
    assert runtime().store.contains(inner_id) == "sealed"
    got_inner, label = ray.get(outer)
    np.testing.assert_array_equal(ray.get(got_inner), np.arange(200_000))
    del outer, got_inner
    gc.collect()
    settle()
    assert runtime().store.contains(inner_id) is None


def test_spills_when_full_and_restores_on_get(ray):
    arrays = [np.full(5 * MiB, i, dtype=np.float64) for i in range(5)]  # 5 x 40 MiB > 150 MiB
    refs = [ray.put(a) for a in arrays]
    spiller = runtime().spiller
    assert spiller.spilled_bytes > 0
    spill_dir = os.path.join(runtime().session_dir, "spill")
    assert os.listdir(spill_dir)
    for i in [0, 4, 1, 3, 2, 0]:
        value = ray.get(refs[i])
        assert value[0] == i and value[-1] == i
        del value
    assert spiller.restored_bytes > 0
    runtime().store.check()
    del refs
    settle()
    assert os.listdir(spill_dir) == []


def test_object_larger_than_the_store_is_refused_clearly(ray):
    with pytest.raises(exceptions.ObjectStoreFullError, match="larger than the whole object store"):
        ray.put(np.zeros(200 * MiB, dtype=np.uint8))
    runtime().store.check()


def test_full_of_pinned_objects_says_what_holds_the_memory(ray):
    refs = [ray.put(np.zeros(45 * MiB, dtype=np.uint8)) for _ in range(3)]
    views = [ray.get(r) for r in refs]
    with pytest.raises(exceptions.ObjectStoreFullError, match="pinned"):
        ray.put(np.zeros(45 * MiB, dtype=np.uint8))
    del views
    gc.collect()
    ray.put(np.zeros(45 * MiB, dtype=np.uint8))  # now it spills instead


def test_put_of_an_object_ref_is_a_type_error(ray):
    ref = ray.put(1)
    with pytest.raises(TypeError, match="ObjectRef"):
        ray.put(ref)
    assert ray.get(ray.put([ref]))[0] == ref


@pytest.mark.parametrize("bad", [1, "ref", None, [1, 2]])
def test_get_of_a_non_ref_is_a_type_error(ray, bad):
    with pytest.raises(TypeError, match="ObjectRef"):
        ray.get(bad)


def test_unpicklable_put_names_the_type(ray):
    import threading

    with pytest.raises(TypeError, match="lock"):
        ray.put(threading.Lock())


def test_object_ref_basics(ray):
    ref = ray.put(5)
    assert len(ref.hex()) == 56 and ref.hex() in repr(ref)
    import pickle

    same = pickle.loads(pickle.dumps(ref))
    assert same == ref and hash(same) == hash(ref) and {ref: 1}[same] == 1
    assert ray.get(same) == 5


def test_init_options_are_checked():
    with pytest.raises(TypeError, match="not_an_option"):
        shmray.init(not_an_option=1)
    with pytest.raises(ValueError, match="minimum"):
        shmray.init(object_store_memory=10 * MiB)
    with pytest.raises(ValueError, match="available"):
        shmray.init(object_store_memory=1 << 50)
    assert not shmray.is_initialized()


def test_second_init_raises_unless_ignored(ray):
    with pytest.raises(RuntimeError, match="ignore_reinit_error"):
        shmray.init()
    shmray.init(ignore_reinit_error=True)


def test_put_and_get_start_shmray_when_needed():
    assert not shmray.is_initialized()
    try:
        ref = shmray.put("auto")
        assert shmray.is_initialized()
        assert shmray.get(ref) == "auto"
    finally:
        shmray.shutdown()


def test_use_after_shutdown_is_a_clear_error():
    shmray.init(object_store_memory=100 * MiB)
    ref = shmray.put(np.ones(1_000_000))
    store = runtime().store
    shmray.shutdown()
    with pytest.raises(exceptions.RaySystemError, match="shut down"):
        store.statistics()
    with pytest.raises(exceptions.RaySystemError, match="shut down"):
        ref.future()
    try:
        shmray.init(object_store_memory=100 * MiB)
        with pytest.raises(exceptions.RaySystemError, match="shut down"):
            shmray.get(ref)
        with pytest.raises(exceptions.RaySystemError, match="shut down"):
            shmray.wait([ref])
    finally:
        shmray.shutdown()
    del ref


def test_shutdown_leaves_no_mapping_and_no_fd():
    shmray.init(object_store_memory=100 * MiB)
    ref = shmray.put(np.ones(1_000_000))
    view = shmray.get(ref)
    assert arena_mappings()
    shmray.shutdown()
    assert view.sum() == 1_000_000  # a live view keeps its pages readable after shutdown
    del view, ref
    gc.collect()
    assert arena_mappings() == []
    assert arena_fds() == []


@pytest.mark.crash
def test_sigkilled_driver_leaves_nothing():
    before = dev_shm_files()
    script = textwrap.dedent("""
        import numpy as np, shmray, sys
        shmray.init(object_store_memory=100 * 2**20)
        refs = [shmray.put(np.ones(2_000_000)) for _ in range(3)]
        print("ready", flush=True)
        sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert arena_mappings(child.pid)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    assert dev_shm_files() == before
    assert arena_mappings(child.pid) == []


# -- refs the user passes by ways of their own (a multiprocessing queue, a file) ----------


def test_a_ref_a_task_pickles_into_a_file_resolves_in_another_task(ray, tmp_path):
    """A worker sends its put or submission within a millisecond; a ref pickled by hand
    meanwhile reached another process first, whose get raised ObjectLostError (20 of 20)."""
    @ray.remote
    def produce(path, kind):
        if kind == "put":
            ray.put(b"a first put, so the next one waits for the flusher")
            ref = ray.put(b"the value")
        else:
            ray.put(b"warm")
            ref = echo.remote(b"the value")
        with open(path + ".tmp", "wb") as file:
            pickle.dump(ref, file)
        os.rename(path + ".tmp", path)
        return True  # the ref goes: its object lives on for the consumer (escaped)

    @ray.remote
    def echo(value):
        return value

    @ray.remote
    def consume(path):
        while not os.path.exists(path):
            time.sleep(0.0002)
        with open(path, "rb") as file:
            return ray.get(pickle.load(file), timeout=30)

    for i in range(20):
        for kind in ("put", "task"):
            path = str(tmp_path / f"{kind}-{i}")
            consumer = consume.remote(path)
            assert ray.get(produce.remote(path, kind), timeout=60)
            assert ray.get(consumer, timeout=60) == b"the value"


def test_an_object_whose_ref_was_pickled_by_hand_lives_while_the_pickler_does(ray):
    @ray.remote
    class Pickler:
        def pickled_put(self):
            return pickle.dumps(ray.put(np.arange(10)))  # the actor keeps no ref

    pickler = Pickler.remote()
    settle()
    before = runtime().query("objects")
    blob = ray.get(pickler.pickled_put.remote(), timeout=60)
    settle()
    assert runtime().query("objects") == before + 1
    assert list(ray.get(pickle.loads(blob), timeout=60)) == list(range(10))
    gc.collect()
    ray.kill(pickler)  # the pickler goes: so does the hold it had
    wait_for(lambda: (settle(), runtime().query("objects"))[1] == before)
    with pytest.raises(exceptions.ObjectLostError):
        ray.get(pickle.loads(blob), timeout=60)


def test_copies_of_refs_hold_nothing_after_they_are_gone(ray):
    settle()
    before = runtime().query("objects")
    ref = ray.put(np.ones(10))
    copies = [copy.copy(ref), copy.deepcopy({"ref": ref})["ref"]]
    assert all(ray.get(c)[0] == 1.0 for c in copies)
    del ref, copies
    gc.collect()
    wait_for(lambda: (settle(), runtime().query("objects"))[1] == before)


def test_wait_on_no_refs(ray):
    assert ray.wait([]) == ([], [])
    assert ray.wait([], timeout=0) == ([], [])


def test_wait_with_timeout_zero_sees_results_arrive(ray):
    """A polling loop of wait(timeout=0) must read what has arrived (it never did)."""
    @ray.remote
    def slow():
        time.sleep(0.2)
        return 1

    ref = slow.remote()
    deadline = time.monotonic() + 10
    while not ray.wait([ref], timeout=0)[0]:
        assert time.monotonic() < deadline, "wait(timeout=0) never saw the result"
        time.sleep(0.01)
    assert ray.get(ref) == 1


@pytest.mark.parametrize("nbytes", [4096, 60_000, 100_000, 4 * MiB])
def test_large_arrays_arrive_64_byte_aligned_on_every_path(ray, nbytes):
    """Inline values (under 100 KiB) came at the alignment of a bytes object's data."""
    array = np.arange(nbytes, dtype=np.uint8)

    @ray.remote
    def give():
        return np.arange(nbytes, dtype=np.uint8)

    @ray.remote
    def address_of(argument):
        return argument.ctypes.data % 64

    assert ray.get(ray.put(array), timeout=60).ctypes.data % 64 == 0
    assert ray.get(ray.put({"inside": array}), timeout=60)["inside"].ctypes.data % 64 == 0
    assert ray.get(give.remote(), timeout=60).ctypes.data % 64 == 0
    assert ray.get(address_of.remote(array), timeout=60) == 0


def test_get_of_a_list_raises_the_first_failure_without_waiting_for_the_rest(ray, tmp_path):
    release = tmp_path / "release"

    @ray.remote
    def slow():
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "slow"

    @ray.remote
    def fails():
        raise ValueError("failed first")

    waiting = slow.remote()
    failing = fails.remote()
    try:
        with pytest.raises(ValueError, match="failed first"):
            ray.get([waiting, failing], timeout=30)  # not a GetTimeoutError
    finally:
        release.write_text("go")
    assert ray.get(waiting, timeout=60) == "slow"


def test_as_future_is_an_asyncio_future(ray):
    import asyncio

    async def main():
        future = ray.put(42).as_future()
        assert isinstance(future, asyncio.Future)
        return await future

    assert asyncio.run(main()) == 42
