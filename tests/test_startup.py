"""Start-up: the first worker is forked before the scheduler builds its parts, and the pool's
others only once the scheduler idles (``_scheduler.loop``), so they never hold up the first
task; work that needs them sooner must not wait for that (``WorkerPool.idle_worker``)."""

import os
import time

import pytest

import shmray
from conftest import runtime, socket_inodes, wait_for

DEADLOCK = 60


@pytest.mark.parametrize("num_cpus", [2, 3])
def test_tasks_submitted_right_after_init_run_on_every_cpu(num_cpus, tmp_path):
    """The pool's workers beyond the first are forked when work needs them, not only once
    the scheduler has been idle a while: a burst submitted at once gets them all."""
    @shmray.remote
    def meet(folder, count):  # returns once ``count`` tasks run at the same time
        open(os.path.join(folder, str(os.getpid())), "w").close()
        deadline = time.monotonic() + DEADLOCK
        while len(os.listdir(folder)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(os.listdir(folder))} of {count} tasks met")
            time.sleep(0.001)
        return os.getpid()

    shmray.init(num_cpus=num_cpus, object_store_memory=100 << 20)
    try:
        refs = [meet.remote(str(tmp_path), num_cpus) for _ in range(num_cpus)]
        assert len(set(shmray.get(refs, timeout=2 * DEADLOCK))) == num_cpus
    finally:
        shmray.shutdown()


def test_the_pool_fills_while_the_session_idles():
    """One worker at the start; the others are forked once the scheduler has nothing to do,
    so the next burst finds them waiting."""
    shmray.init(num_cpus=3, object_store_memory=100 << 20)
    try:
        assert shmray.get(_one.remote(), timeout=DEADLOCK) == 1
        wait_for(lambda: len(runtime().query("workers")) == 3)
    finally:
        shmray.shutdown()


def test_the_first_worker_shares_no_socket_with_the_scheduler():
    """The first worker is forked before the scheduler has built anything: it must still
    close the scheduler's end of the driver's connection, which it inherits (and the
    scheduler the worker's ends), else the driver would not see the scheduler's death as
    the end of that connection while the worker lives."""
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        assert shmray.get(_one.remote(), timeout=DEADLOCK) == 1  # the worker is up
        (worker,) = runtime().query("workers")
        scheduler = _scheduler_pid()
        assert socket_inodes(scheduler) and socket_inodes(worker)
        assert not socket_inodes(scheduler) & socket_inodes(worker)
    finally:
        shmray.shutdown()


@shmray.remote
def _one():
    return 1


def _scheduler_pid() -> int:
    from shmray import _session

    return _session._scheduler_pid
