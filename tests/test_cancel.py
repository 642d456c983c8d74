"""cancel(): queued tasks dropped, running ones interrupted (or their worker killed with
force), actor calls dropped or cancelled, on every route a task takes (through the
scheduler, sent ahead to a busy worker, on a lease).

Every wait has a timeout that only a deadlock reaches.
"""

import os
import time

import pytest

import shmray
from shmray import exceptions
from conftest import (learn_short, one_cpu, one_cpu_without_leases, runtime, settle, wait_for,
                      worker_pids)

DEADLOCK = 60


def test_cancel_before_user_code_starts_is_kept(ray):
    def slow_load():
        time.sleep(0.3)
        return "arg"

    class SlowToLoad:
        def __reduce__(self):
            return (slow_load, ())

    @ray.remote
    def long(x):
        time.sleep(2)
        return "finished"

    ray.get(ray.remote(lambda: 0).remote(), timeout=DEADLOCK)
    ref = long.remote(SlowToLoad())
    time.sleep(0.1)
    ray.cancel(ref)
    with pytest.raises(exceptions.TaskCancelledError):
        ray.get(ref, timeout=DEADLOCK)


def test_cancel_of_a_task_the_scheduler_thinks_is_still_queued_leaks_nothing():
    """Reports of the short tasks before it are held back while a C loop holds the GIL, so
    the scheduler may take the running task for one still sent ahead: its cancel must not
    leave the result it stores when it ends behind (a report nobody wants is dropped)."""
    one_cpu_without_leases()
    try:
        @shmray.remote
        def nap(t):
            time.sleep(t)

        @shmray.remote
        def crunch(n):  # one C loop: holds the GIL while it runs
            sum(range(n))
            return b"x" * (1 << 20)

        for _ in range(5):  # both known short
            shmray.get([nap.remote(0.001), crunch.remote(10)])
        head, short, long = nap.remote(0.015), nap.remote(0.001), crunch.remote(20_000_000)
        time.sleep(0.1)  # `head` and `short` are done, their reports held; `long` runs
        shmray.cancel(long)
        with pytest.raises(exceptions.TaskCancelledError):
            shmray.get(long, timeout=DEADLOCK)
        assert shmray.get([head, short], timeout=DEADLOCK) == [None, None]
        del head, short, long
        wait_for(lambda: (settle(), runtime().store.statistics().bytes_in_use)[1] == 0,
                 timeout=10)
    finally:
        shmray.shutdown()


def test_force_cancel_of_a_queued_leased_task_spares_the_one_running():
    """The scheduler killed the worker, and the task running ahead of the cancelled one died
    with it (WorkerCrashedError with max_retries=0)."""
    one_cpu()
    try:
        @shmray.remote(max_retries=0)
        def work(i, secs):
            time.sleep(secs)
            return i

        learn_short(work, 0, 0)
        running = work.remote("innocent", 1.0)
        queued = [work.remote(i, 0) for i in range(5)]
        time.sleep(0.2)
        shmray.cancel(queued[2], force=True)
        assert shmray.get(running, timeout=DEADLOCK) == "innocent"
        with pytest.raises(exceptions.TaskCancelledError):
            shmray.get(queued[2], timeout=DEADLOCK)
        assert [shmray.get(queued[i], timeout=DEADLOCK) for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    finally:
        shmray.shutdown()


def test_a_cancelled_task_handed_back_by_its_worker_does_not_run(tmp_path):
    """Handed back before the worker read the cancel, it was queued again and ran."""
    ran = tmp_path / "ran"
    one_cpu()
    try:
        @shmray.remote
        def child():
            return "child"

        @shmray.remote
        def blocker():
            time.sleep(0.5)
            return shmray.get(child.remote())  # waits in get(): hands back what is queued

        @shmray.remote
        def victim(i, mark):
            if mark:
                ran.write_text("x")
            return i

        learn_short(victim, -1, False)
        b = blocker.remote()
        v = victim.remote(7, True)  # queued behind blocker on the one leased worker
        time.sleep(0.1)
        shmray.cancel(v)
        assert shmray.get(b, timeout=DEADLOCK) == "child"
        with pytest.raises(exceptions.TaskCancelledError):
            shmray.get(v, timeout=DEADLOCK)
        assert not ran.exists()
    finally:
        shmray.shutdown()


def test_a_force_cancel_as_a_leased_task_starts_still_stops_it():
    """The scheduler saw the slot not yet naming the task, did not kill, and its SIGINT
    came before the worker named the task: the task ran to the end."""
    import random

    one_cpu()
    try:
        @shmray.remote(max_retries=0)
        def long_one(i):
            time.sleep(1.0)
            return "ran to the end"

        for i in range(150):  # the window is narrow: it was hit about once in 150
            ref = long_one.remote(i)
            end = time.perf_counter() + random.uniform(0, 150e-6)
            while time.perf_counter() < end:
                pass
            shmray.cancel(ref, force=True)
            with pytest.raises((exceptions.TaskCancelledError, exceptions.WorkerCrashedError)):
                shmray.get(ref, timeout=DEADLOCK)
    finally:
        shmray.shutdown()


@pytest.mark.parametrize("num_cpus", [0.5, 1.0])
def test_a_cancel_right_after_submit_stops_the_task(ray, num_cpus):
    """Through the scheduler (num_cpus=0.5) the task was taken for started before its worker
    had named it: the SIGINT came too early, was ignored, and the task ran to the end."""
    import random

    @ray.remote(num_cpus=num_cpus, max_retries=0)
    def long_one(i):
        time.sleep(0.3)
        return "ran to the end"

    ray.get([long_one.remote(-1), long_one.remote(-2)], timeout=DEADLOCK)
    for i in range(60):
        ref = long_one.remote(i)
        end = time.perf_counter() + random.uniform(0, 400e-6)
        while time.perf_counter() < end:
            pass
        ray.cancel(ref)
        with pytest.raises(exceptions.TaskCancelledError):
            ray.get(ref, timeout=DEADLOCK)


def test_cancelling_a_running_leased_task_then_those_queued_behind_it(ray):
    """Each cancel named its task as the SIGINT's target; the later ones (queued tasks)
    overwrote the first before the worker read it, and the running task ran to the end."""
    for trial in range(3):
        @ray.remote(max_retries=0)
        def work(seconds, trial=trial):  # a new function each trial
            time.sleep(seconds)
            return "ran to the end"

        learn_short(work, 0)
        running = work.remote(1.0)
        queued = [work.remote(0.0005) for _ in range(30)]
        time.sleep(0.05)
        ray.cancel(running)
        for ref in queued:
            ray.cancel(ref)
        with pytest.raises(exceptions.TaskCancelledError):
            ray.get(running, timeout=DEADLOCK)
        for ref in queued:
            try:
                ray.get(ref, timeout=DEADLOCK)
            except exceptions.TaskCancelledError:
                pass


def test_a_cancel_that_lands_while_a_task_is_inside_shmray_waits_until_it_is_out():
    """The KeyboardInterrupt came in the middle of writing a message to the scheduler: the
    frame was cut, the scheduler found it unreadable and killed the worker."""
    shmray.init(num_cpus=2, resources={"R": 1}, object_store_memory=100 << 20)
    try:
        @shmray.remote(num_cpus=0, resources={"R": 1})
        class Holder:
            def ping(self):
                return 1

        @shmray.remote(resources={"R": 1})
        def child(i, pad):
            return i

        @shmray.remote(max_retries=0)
        def parent():
            pad = b"x" * 90_000  # each submission a 90 KB message: mostly inside send()
            refs = []
            while True:
                refs.append(child.remote(len(refs), pad))

        holder = Holder.remote()
        shmray.get(holder.ping.remote(), timeout=DEADLOCK)
        wait_for(lambda: len(runtime().query("workers")) >= 2)  # the pool fills as it idles
        workers = set(runtime().query("workers"))
        for _ in range(3):
            p = parent.remote()
            time.sleep(0.4)
            shmray.cancel(p, recursive=True)
            with pytest.raises(exceptions.TaskCancelledError):
                shmray.get(p, timeout=DEADLOCK)
        assert set(runtime().query("workers")) == workers  # none killed (and replaced)
    finally:
        shmray.shutdown()


def test_cancel_queued_task(ray):
    @ray.remote(num_cpus=2)
    def hog():
        time.sleep(2)
        return 1

    running = hog.remote()
    queued = hog.remote()
    time.sleep(0.2)
    ray.cancel(queued)
    with pytest.raises(exceptions.TaskCancelledError):
        ray.get(queued, timeout=DEADLOCK)
    assert ray.get(running, timeout=DEADLOCK) == 1


def test_cancel_running_task_interrupts_it(ray):
    @ray.remote
    def sleeper():
        time.sleep(30)

    ref = sleeper.remote()
    time.sleep(0.5)
    start = time.monotonic()
    ray.cancel(ref)
    with pytest.raises(exceptions.TaskCancelledError):
        ray.get(ref, timeout=DEADLOCK)
    assert time.monotonic() - start < 10
    before = set(worker_pids())

    @ray.remote
    def after():
        return os.getpid()

    assert ray.get(after.remote(), timeout=DEADLOCK) in before  # the worker lived on


def test_force_cancel_kills_and_replaces_the_worker(ray):
    @ray.remote
    def stubborn():
        while True:
            try:
                time.sleep(10)
            except KeyboardInterrupt:
                pass  # ignores a polite cancel

    ref = stubborn.remote()
    time.sleep(0.5)
    ray.cancel(ref, force=True)
    with pytest.raises(exceptions.TaskCancelledError):
        ray.get(ref, timeout=DEADLOCK)
    wait_for(lambda: len(worker_pids()) >= 2)


def test_cancel_is_recursive(ray):
    @ray.remote
    def child():
        time.sleep(30)
        return "child"

    @ray.remote
    def parent():
        ref = child.remote()
        shmray.get(ref)

    ref = parent.remote()
    time.sleep(1.0)
    ray.cancel(ref)
    with pytest.raises(exceptions.TaskCancelledError):
        ray.get(ref, timeout=DEADLOCK)
    # the child was cancelled too: both CPUs are free again soon
    wait_for(lambda: shmray.available_resources().get("CPU", 0) == 2, timeout=DEADLOCK)


def test_cancel_actor_calls(ray):
    import asyncio

    @ray.remote
    class Async:
        async def long(self):
            await asyncio.sleep(30)

        async def quick(self):
            return "quick"

    a = Async.remote()
    ref = a.long.remote()
    time.sleep(0.3)
    with pytest.raises(ValueError, match="force"):
        ray.cancel(ref, force=True)
    ray.cancel(ref)
    with pytest.raises(exceptions.TaskCancelledError):
        ray.get(ref, timeout=DEADLOCK)
    assert ray.get(a.quick.remote(), timeout=DEADLOCK) == "quick"

    @ray.remote
    class Sync:
        def block(self):
            time.sleep(1)
            return "done"

    s = Sync.remote()
    first = s.block.remote()
    second = s.block.remote()
    ray.cancel(second)
    assert ray.get(first, timeout=DEADLOCK) == "done"
    with pytest.raises(exceptions.TaskCancelledError):
        ray.get(second, timeout=DEADLOCK)


def test_cancel_of_a_non_ref_is_a_type_error(ray):
    with pytest.raises(TypeError, match="ObjectRef"):
        ray.cancel("nope")
