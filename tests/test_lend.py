"""A worker's large numpy buffers are lent from the arena (_lend.py, _lend.c): an array a
task hands back becomes its object where it lies; anything else is copied as before."""

import os
import signal
import sys
import time

import numpy as np
import pytest

import shmray
from shmray import exceptions
from conftest import runtime, settle, wait_for

N = 1 << 18  # 2 MiB of float64: over _lend.THRESHOLD


@shmray.remote
def twos(n):
    return np.ones(n) * 2  # a fresh buffer (that of np.ones is freed by the product)


def adopted(ref, nbytes: int) -> bool:
    """Whether the object has the lent layout: its data starts a page, a page or more in."""
    shmray.wait([ref])
    info = runtime().store.info(ref.binary())
    prefix = info.data_size - nbytes
    return prefix >= 4096 and (info.offset + prefix) % 4096 == 0


def lent_buffers() -> int:
    return runtime().store.statistics().num_created


def _session(num_cpus: int, store_mib: int):
    shmray.init(num_cpus=num_cpus, object_store_memory=store_mib << 20)
    yield shmray
    shmray.shutdown()


@pytest.fixture
def one_cpu():
    """One worker, so consecutive tasks share its memory."""
    yield from _session(1, 150)


def test_a_returned_array_becomes_its_object_uncopied(ray):
    @ray.remote
    def make(n):
        return np.full(n, 3.0) * 2  # a fresh buffer (np.full's own is freed by the product)

    ref = make.remote(N)
    value = ray.get(ref)
    assert value.shape == (N,) and (value == 6.0).all()
    assert not value.flags.writeable
    assert adopted(ref, value.nbytes)  # the lent layout: nothing was copied
    del value, ref
    settle()
    assert runtime().store.statistics().num_objects == 0


def test_shapes_orders_and_dtypes_survive_adoption(ray):
    @ray.remote
    def make(shape, dtype, order):
        out = np.empty(shape, dtype=dtype, order=order)
        out.reshape(-1, order="A")[:] = np.arange(out.size) % 7
        return out

    for shape, dtype, order in [((512, 512), np.float64, "C"), ((512, 512), np.float64, "F"),
                                ((64, 64, 64), np.int32, "C"), ((1 << 20,), np.uint8, "C")]:
        ref = make.remote(shape, dtype, order)
        value = ray.get(ref)
        expected = np.empty(shape, dtype=dtype, order=order)
        expected.reshape(-1, order="A")[:] = np.arange(expected.size) % 7
        assert value.dtype == dtype and value.shape == shape
        assert value.flags.f_contiguous == expected.flags.f_contiguous
        assert value.flags.c_contiguous == expected.flags.c_contiguous
        assert np.array_equal(value, expected)
        assert adopted(ref, value.nbytes)


def test_an_array_the_task_keeps_is_copied_and_later_changes_dont_show(one_cpu):
    ray = one_cpu

    @ray.remote
    def keep(n):
        sys.shmray_test_kept = np.ones(n)
        return sys.shmray_test_kept

    @ray.remote
    def change():
        sys.shmray_test_kept[:] = -1.0
        return float(sys.shmray_test_kept.sum())

    ref = keep.remote(N)
    assert not adopted(ref, 8 * N)  # copied
    assert ray.get(change.remote()) == -N
    assert (ray.get(ref) == 1.0).all()


def test_a_view_or_a_part_is_copied(ray):
    @ray.remote
    def part(n):
        return (np.ones(n) * 2)[1:]

    ref = part.remote(N)
    value = ray.get(ref)
    assert value.shape == (N - 1,) and (value == 2.0).all()
    assert not adopted(ref, value.nbytes)


def test_a_small_array_is_not_lent(ray):
    @ray.remote
    def small():
        return np.ones(1000) * 2

    assert (ray.get(small.remote()) == 2.0).all()


def test_temporaries_give_their_buffers_back(ray):
    @ray.remote
    def churn(n):
        total = 0.0
        for i in range(20):
            a = np.ones(n) * i
            b = a + a
            total += float(b[-1])
        return total

    settle()
    before = runtime().store.statistics().bytes_in_use
    assert ray.get([churn.remote(N) for _ in range(4)]) == [float(2 * sum(range(20)))] * 4
    settle()
    assert lent_buffers() == 0
    assert runtime().store.statistics().bytes_in_use == before


def test_resize_moves_a_lent_buffer(ray):
    @ray.remote
    def grow(n):
        a = np.arange(n, dtype=np.float64)
        a.resize(2 * n, refcheck=False)  # numpy reallocs the buffer
        return a

    value = ray.get(grow.remote(N))
    assert np.array_equal(value[:N], np.arange(N, dtype=np.float64))
    assert (value[N:] == 0).all()
    settle()
    assert lent_buffers() == 0


def test_an_array_over_a_sixteenth_of_the_store_is_not_lent(ray):
    n = (10 << 20) // 8  # 10 MiB of a 150 MiB store
    ref = twos.remote(n)
    assert not adopted(ref, 8 * n)
    assert float(ray.get(ref)[-1]) == 2.0


def test_a_worker_that_dies_holding_lent_buffers_leaves_none(ray):
    @ray.remote(max_retries=0)
    def hoard_and_die(n):
        kept = [np.ones(n) * i for i in range(5)]  # noqa: F841 - held as it dies
        os.kill(os.getpid(), signal.SIGKILL)

    settle()
    before = runtime().store.statistics().bytes_in_use
    with pytest.raises(exceptions.WorkerCrashedError):
        ray.get(hoard_and_die.remote(N))
    wait_for(lambda: lent_buffers() == 0)  # the scheduler reaps the dead worker's objects
    assert runtime().store.statistics().bytes_in_use == before


def test_a_forked_child_writes_to_its_own_copies(one_cpu):
    """A lent buffer lies in shared memory, where fork shares rather than copies: the
    child must get private copies, as of any memory, or it writes into the worker's
    arrays, and into an object the worker's array became."""
    ray = one_cpu

    @ray.remote
    def fork_and_return(n):
        a = np.empty(n)
        a[:] = 5.0
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # writes to its a once the parent has returned b
            os.close(write)
            os.read(read, 1)
            a[:] = -1.0
            os._exit(0)
        os.close(read)
        sys.shmray_test_child = pid, write
        del a
        b = np.empty(n)  # a's block again
        b[:] = 7.0
        return b

    @ray.remote
    def release_child():
        pid, write = sys.shmray_test_child
        os.write(write, b"x")
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    ref = fork_and_return.remote(N)
    value = ray.get(ref)
    assert adopted(ref, value.nbytes) and (value == 7.0).all()
    assert ray.get(release_child.remote()) == 0
    assert (value == 7.0).all()  # the child wrote to its own copy


def test_every_fork_waits_for_the_childs_copies():
    """A fork while no buffer was lent must leave nothing behind that lets a later fork's
    parent run on (and write) before its child has copied."""
    shmray.init(num_cpus=1, object_store_memory=512 << 20)
    try:
        @shmray.remote
        def fork_twice(n, count):
            pid = os.fork()  # nothing lent yet: a Pool started early, say
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            arrays = [np.empty(n) for _ in range(count)]
            for a in arrays:
                a[:] = 1.0
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # looks at its copies once the parent has changed its own
                os.close(write)
                os.read(read, 1)
                os._exit(0 if all((a == 1.0).all() for a in arrays) else 1)
            os.close(read)
            for a in arrays:
                a[:] = 2.0
            os.write(write, b"x")
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)

        assert shmray.get(fork_twice.remote((16 << 20) // 8, 3)) == 0
    finally:
        shmray.shutdown()


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's shadow memory can't live under RLIMIT_AS")
def test_a_child_that_cant_copy_faults_rather_than_share(one_cpu):
    """A child whose copy fails (no memory for it here) must not keep the shared pages:
    touching them kills it, and the worker's array stays as it was."""
    ray = one_cpu

    @ray.remote
    def fork_under_a_memory_limit(n):
        import resource

        a = np.empty(n)
        a[:] = 5.0
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status
                        if line.startswith("VmSize:"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 20), hard))  # no room for a copy
        try:
            pid = os.fork()
            if pid == 0:
                import faulthandler

                faulthandler.disable()  # the fault is expected: no report of it
                a[:] = -1.0
                os._exit(0)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        _, status = os.waitpid(pid, 0)
        return os.WIFSIGNALED(status) and os.WTERMSIG(status), float(a[0])

    assert ray.get(fork_under_a_memory_limit.remote(N)) == (signal.SIGSEGV, 5.0)


def test_a_worker_that_keeps_a_lent_array_lends_no_more(one_cpu):
    ray = one_cpu

    @ray.remote
    def make(n, keep):
        value = np.empty(n)
        value[:] = 3.0
        if keep:
            sys.shmray_test_kept_lent = value
            return 0
        return value

    first = make.remote(N, False)
    assert adopted(first, 8 * N)
    ray.get(make.remote(N, True))
    later = make.remote(N, False)
    assert not adopted(later, 8 * N)  # copied: the kept buffer stays, no more are lent
    assert (ray.get(later) == 3.0).all()


def test_a_forked_child_of_a_task_neither_lends_nor_gives_back(ray):
    @ray.remote
    def fork_and_use(n):
        kept = np.ones(n) * 5  # lent to this worker
        pid = os.fork()
        if pid == 0:  # the child frees its copy of the array and makes its own
            code = 1
            try:
                del kept
                mine = np.ones(n) * 7
                code = 0 if float(mine.sum()) == 7.0 * n else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        other = np.ones(n) * 9  # would take kept's block, had the child given it back
        return os.waitstatus_to_exitcode(status), float(kept.sum()), float(other[0])

    assert ray.get(fork_and_use.remote(N)) == (0, 5.0 * N, 9.0)
    settle()
    assert lent_buffers() == 0


def test_nothing_is_lent_while_the_store_is_over_half_full(ray):
    filler = [ray.put(np.ones((40 << 20) // 8)) for _ in range(2)]  # 80 MiB of 150
    ref = twos.remote(N)
    assert not adopted(ref, 8 * N)
    del filler
    settle()
    ref = twos.remote(N)
    assert adopted(ref, 8 * N)


def test_a_worker_keeping_lent_arrays_stops_borrowing(one_cpu):
    ray = one_cpu

    @ray.remote
    def hoard(n, count):
        sys.shmray_test_hoard = [np.ones(n) for _ in range(count)]
        return np.ones(n) * 2

    # 150 MiB store: at most an eighth (~18 MiB) lent to one worker, 2 MiB each.
    ref = hoard.remote(N, 12)
    assert not adopted(ref, 8 * N)  # the worker holds its share already
    assert lent_buffers() <= 9
    assert float(ray.get(ref)[0]) == 2.0


def test_a_buffer_kept_across_tasks_does_not_split_the_store(one_cpu):
    """Lent buffers can't move: they are taken from the top of the heap, so one kept by a
    worker leaves the bottom, where objects go, in one piece."""
    ray = one_cpu

    @ray.remote
    def keep(n):
        sys.shmray_test_cache = np.ones(n)
        return 0

    low = ray.put(np.ones((60 << 20) // 8))  # the bottom of the heap
    ray.get(keep.remote((4 << 20) // 8))
    del low
    settle()
    big = ray.put(np.ones((100 << 20) // 8))  # of a 150 MiB store
    assert float(ray.get(big)[-1]) == 1.0


@pytest.fixture
def store_of_100mib():
    yield from _session(2, 100)


def test_a_put_waits_for_the_buffers_running_tasks_use(store_of_100mib):
    """Lent buffers can't be spilled: a put that needs their room waits for their tasks."""
    ray = store_of_100mib

    @ray.remote
    def compute(seconds):
        n = (6 << 20) // 8
        a = np.empty(n)
        a[:] = 1.0
        b = np.empty(n)
        b[:] = 2.0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            c = a + b  # noqa: F841 - more temporaries
        return float(b[0])

    refs = [compute.remote(1.5) for _ in range(2)]
    wait_for(lambda: lent_buffers() >= 4)
    big = ray.put(np.ones((80 << 20) // 8))  # fits only once the tasks are done
    assert ray.get(refs) == [2.0, 2.0]
    assert float(ray.get(big)[-1]) == 1.0


def test_garbage_holding_lent_buffers_is_collected_after_the_task(store_of_100mib):
    """Arrays in reference cycles die only in a collection, which an idle worker never
    runs: after each task the worker collects, so the buffers come back and it lends on."""
    ray = store_of_100mib

    @ray.remote
    def leave_cycles(n):
        class Node:
            pass

        for i in range(2):
            node = Node()
            node.data = np.empty(n)
            node.data[:] = i
            node.itself = node
        return 0

    assert ray.get([leave_cycles.remote(N) for _ in range(2)]) == [0, 0]
    assert lent_buffers() == 0
    assert all(adopted(twos.remote(N), 8 * N) for _ in range(2))


def test_a_kept_buffer_is_not_waited_for(store_of_100mib):
    """A put short of room waits for lent buffers that will come back, not for one a
    worker keeps: the store-full error comes at once."""
    ray = store_of_100mib

    @ray.remote
    def keep(n):
        sys.shmray_test_kept_for_good = np.ones(n)
        return 0

    ray.get(keep.remote((5 << 20) // 8))
    held = [ray.put(np.ones((35 << 20) // 8)) for _ in range(2)]
    views = ray.get(held)  # pinned: nothing can be spilled
    started = time.monotonic()
    with pytest.raises(exceptions.ObjectStoreFullError):
        ray.put(np.ones((27 << 20) // 8))  # would fit, were the kept buffer to go
    assert time.monotonic() - started < 5  # not the 10 s a returning buffer is waited for
    del views, held


def test_a_worker_that_lends_no_more_collects_no_more(one_cpu):
    """Collecting garbage after each task is for deciding to stop lending, once."""
    ray = one_cpu

    @ray.remote
    def keep_and_count(n):
        import gc

        sys.shmray_test_kept_once = np.ones(n)
        sys.shmray_test_collections = []
        gc.callbacks.append(lambda phase, info: sys.shmray_test_collections.append(phase))
        return 0

    @ray.remote
    def collections():
        return len(sys.shmray_test_collections)

    ray.get(keep_and_count.remote(N))
    seen = ray.get(collections.remote())
    assert seen > 0  # the collection that decided to stop lending
    for _ in range(5):
        ray.get(ray.remote(lambda: 0).remote())
    assert ray.get(collections.remote()) == seen
