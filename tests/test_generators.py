"""Generator tasks and methods: items stream to the caller as they are yielded
(``num_returns="streaming"``, Ray's default for a generator), or come as one list of refs
(``num_returns="dynamic"``)."""

import asyncio
import os
import pickle
import time

import numpy as np
import pytest

import shmray
from shmray import exceptions

from conftest import MiB, in_both_modes, runtime, settle, wait_for

# Each test runs with shmray's processes and in local mode (``in_both_modes``).
ray = in_both_modes(2)

DEADLOCK = 60


@shmray.remote
def count_to(n):
    for i in range(n):
        yield i


def test_items_stream_in_order_and_the_end_stops_the_iteration(ray):
    gen = count_to.remote(5)
    assert isinstance(gen, shmray.ObjectRefGenerator)
    assert [ray.get(ref, timeout=DEADLOCK) for ref in gen] == [0, 1, 2, 3, 4]
    with pytest.raises(StopIteration):
        next(gen)
    assert ray.get(gen.completed(), timeout=DEADLOCK) == 5  # how many it yielded
    assert gen.is_finished()


@pytest.mark.processes_only("a generator runs to its end at .remote() in local mode")
def test_an_item_arrives_while_the_task_still_runs(ray, tmp_path):
    """The task waits for the caller to have seen its first item before it yields the
    second: without streaming it would wait forever."""
    seen = tmp_path / "seen"

    @ray.remote
    def waits_for_the_caller():
        yield "first"
        deadline = time.monotonic() + DEADLOCK
        while not seen.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        yield "second" if seen.exists() else "the caller never saw the first"

    gen = waits_for_the_caller.remote()
    assert ray.get(next(gen), timeout=DEADLOCK) == "first"
    seen.write_text("yes")
    assert ray.get(next(gen), timeout=DEADLOCK) == "second"


def test_an_error_arrives_after_the_items_before_it(ray):
    @ray.remote
    def fails_third():
        yield 1
        yield 2
        raise ValueError("the third")

    gen = fails_third.remote()
    assert ray.get(next(gen), timeout=DEADLOCK) == 1
    assert ray.get(next(gen), timeout=DEADLOCK) == 2
    failed = next(gen)
    with pytest.raises(ValueError, match="the third"):
        ray.get(failed, timeout=DEADLOCK)
    with pytest.raises(StopIteration):
        next(gen)
    with pytest.raises(exceptions.RayTaskError):
        ray.get(gen.completed(), timeout=DEADLOCK)


def test_actor_generators_on_every_kind_of_actor(ray):
    @ray.remote
    class Sync:
        def items(self, n):
            for i in range(n):
                yield i * 10

    @ray.remote(max_concurrency=2)
    class Threaded:
        def items(self, n):
            for i in range(n):
                yield i * 10

    @ray.remote
    class Async:
        async def items(self, n):
            for i in range(n):
                await asyncio.sleep(0)
                yield i * 10

    for cls in (Sync, Threaded, Async):
        actor = cls.remote()
        gen = actor.items.remote(4)
        assert isinstance(gen, shmray.ObjectRefGenerator)
        assert ray.get(list(gen), timeout=DEADLOCK) == [0, 10, 20, 30], cls


def test_method_and_option_num_returns(ray):
    @ray.remote
    class A:
        @shmray.method(num_returns="streaming")
        def marked(self):
            yield "marked"

        def three(self):
            yield from (1, 2, 3)

    a = A.remote()
    assert ray.get(list(a.marked.remote()), timeout=DEADLOCK) == ["marked"]
    refs = a.three.options(num_returns=3).remote()  # a count: plain returns, as in Ray
    assert ray.get(refs, timeout=DEADLOCK) == [1, 2, 3]
    dynamic = ray.get(a.three.options(num_returns="dynamic").remote(), timeout=DEADLOCK)
    assert ray.get(list(dynamic), timeout=DEADLOCK) == [1, 2, 3]


def test_dynamic_returns_one_ref_to_the_refs(ray):
    ref = count_to.options(num_returns="dynamic").remote(4)
    assert isinstance(ref, shmray.ObjectRef)
    dynamic = ray.get(ref, timeout=DEADLOCK)
    assert isinstance(dynamic, shmray.DynamicObjectRefGenerator)
    assert len(dynamic) == 4
    assert ray.get(list(dynamic), timeout=DEADLOCK) == [0, 1, 2, 3]


def test_a_generator_function_with_a_count_returns_that_many_refs(ray):
    refs = count_to.options(num_returns=3).remote(3)
    assert ray.get(refs, timeout=DEADLOCK) == [0, 1, 2]


def test_async_for_and_wait(ray):
    async def consume():
        return [await ref async for ref in count_to.remote(4)]

    assert asyncio.run(consume()) == [0, 1, 2, 3]

    gen = count_to.remote(2)
    plain = ray.put("plain")
    ready, not_ready = ray.wait([gen, plain], num_returns=2, timeout=DEADLOCK)
    assert ready == [gen, plain] and not_ready == []
    assert gen.next_ready()
    assert ray.get(next(gen), timeout=DEADLOCK) == 0


@pytest.mark.processes_only(
    "a generator runs to its end at .remote() in local mode: nothing is left to cancel")
def test_cancel_stops_a_generator(ray, tmp_path):
    @ray.remote
    def forever():
        i = 0
        while True:
            yield i
            i += 1
            time.sleep(0.01)

    gen = forever.remote()
    assert ray.get(next(gen), timeout=DEADLOCK) == 0
    ray.cancel(gen)
    last = None
    for ref in gen:  # ends: the items yielded before the cancel, then its error
        last = ref
    with pytest.raises(exceptions.TaskCancelledError):
        ray.get(last, timeout=DEADLOCK)


@pytest.mark.processes_only(
    "a generator runs to its end at .remote() in local mode: nothing to pause")
def test_backpressure_pauses_the_producer(ray, tmp_path):
    progress = tmp_path / "yielded"

    @ray.remote(_generator_backpressure_num_objects=2)
    def producer():
        for i in range(10):
            progress.write_text(str(i + 1))
            yield i

    gen = producer.remote()
    wait_for(lambda: progress.exists() and progress.read_text() == "2", timeout=DEADLOCK)
    time.sleep(0.5)  # it would have yielded all ten by now without backpressure
    assert progress.read_text() == "2"
    assert ray.get(next(gen), timeout=DEADLOCK) == 0  # one taken: room for one more
    wait_for(lambda: progress.read_text() == "3", timeout=DEADLOCK)
    assert ray.get(list(gen), timeout=DEADLOCK) == list(range(1, 10))


def test_large_items_through_a_small_store_when_each_is_dropped_after_use():
    shmray.init(num_cpus=2, object_store_memory=256 * MiB)
    try:
        @shmray.remote
        def arrays():
            for i in range(32):
                yield np.full(16 * MiB // 8, i, dtype=np.float64)

        total = 0
        for ref in arrays.remote():
            total += float(shmray.get(ref, timeout=DEADLOCK)[0])
            del ref
        assert total == sum(range(32))
    finally:
        shmray.shutdown()


@pytest.mark.processes_only("counts the arena's objects; local mode has no arena")
def test_dropping_a_generator_frees_what_it_did_not_hand_out(ray):
    store = runtime().store
    settle()
    before = store.statistics().num_objects
    gen = count_to.remote(20)
    ray.get(gen.completed(), timeout=DEADLOCK)
    first = next(gen)
    del gen
    settle()
    wait_for(lambda: (settle(), store.statistics().num_objects)[1] <= before + 1, timeout=10)
    assert ray.get(first, timeout=DEADLOCK) == 0  # the one handed out lives on


def test_a_generator_cannot_be_sent_or_got(ray):
    gen = count_to.remote(1)
    with pytest.raises(TypeError, match="can't be sent"):
        pickle.dumps(gen)

    @ray.remote
    def takes(x):
        return x

    with pytest.raises(TypeError, match="can't be sent"):
        takes.remote(gen)
    with pytest.raises(TypeError, match="ObjectRefGenerator"):
        ray.get(gen)


@pytest.mark.processes_only("a worker's process dies; in local mode that would be the driver")
def test_a_worker_dying_mid_stream(ray, tmp_path):
    marker = tmp_path / "died once"

    @ray.remote(max_retries=0)
    def dies_after_two():
        yield 1
        yield 2
        os._exit(1)

    gen = dies_after_two.remote()
    refs = list(gen)
    assert ray.get(refs[:2], timeout=DEADLOCK) == [1, 2]
    with pytest.raises(exceptions.WorkerCrashedError):
        ray.get(refs[2], timeout=DEADLOCK)

    @ray.remote(max_retries=1)
    def dies_once():
        yield "a"
        yield "b"
        if not marker.exists():
            marker.write_text("x")
            os._exit(1)
        yield "c"

    assert ray.get(list(dies_once.remote()), timeout=DEADLOCK) == ["a", "b", "c"]


@pytest.mark.processes_only(
    "a generator runs to its end at .remote() in local mode: nothing to pause")
def test_backpressure_in_sync_and_async_actors(ray, tmp_path):
    @ray.remote
    class Sync:
        def items(self, path):
            for i in range(6):
                with open(path, "w") as f:
                    f.write(str(i + 1))
                yield i

    @ray.remote
    class Async:
        async def items(self, path):
            for i in range(6):
                with open(path, "w") as f:
                    f.write(str(i + 1))
                yield i

    for cls in (Sync, Async):
        progress = tmp_path / cls.__name__
        actor = cls.remote()
        gen = actor.items.options(_generator_backpressure_num_objects=1).remote(str(progress))
        wait_for(lambda: progress.exists() and progress.read_text() == "1", timeout=DEADLOCK)
        time.sleep(0.3)
        assert progress.read_text() == "1", cls  # paused until the caller takes one
        assert ray.get(list(gen), timeout=DEADLOCK) == list(range(6))
