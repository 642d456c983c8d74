"""Tasks whose arguments are results of tasks still running: the scheduler sends them ahead
to the worker making those results, which runs them right after with the values it made.
Every way such a task can come back (its producer failed, was retried, crashed its worker,
blocked in get(), was cancelled; the task itself cancelled) keeps the semantics it has on
the usual route.

Each test makes the first task of a chain slow once (its function known short), so the
rest of the chain is submitted, and sent ahead, while it runs.  Every wait has a timeout
that only a deadlock reaches.
"""

import os
import time

import numpy as np
import pytest

import shmray
from shmray import exceptions
from conftest import runtime, settle, wait_for

DEADLOCK = 60
NAP = 0.3  # how long the head of a chain runs: the rest is sent ahead meanwhile


def sent_ahead():
    """(tasks sent ahead, of those how many came back unrun for lack of an argument)."""
    return tuple(runtime().query("sent_ahead"))


@shmray.remote
def step(x, nap=0.0):
    time.sleep(nap)
    return x + 1


@shmray.remote
def record(x, path):
    """A dependent whose running leaves a trace."""
    with open(path, "a") as f:
        f.write("ran\n")
    return x


@shmray.remote(retry_exceptions=True, max_retries=1)
def flaky(x, path, nap=0.0):
    """Raises the first time (no file at ``path`` yet): retried for that exception."""
    time.sleep(nap)
    if not os.path.exists(path):
        open(path, "w").close()
        raise ValueError("first attempt")
    return x + 100


@shmray.remote
def crashy(x, path, nap=0.0):
    """Kills its worker the first time (no file at ``path`` yet)."""
    time.sleep(nap)
    if not os.path.exists(path):
        open(path, "w").close()
        os._exit(1)
    return x + 100


def assert_failed_for_their_argument(*refs):
    for ref in refs:
        with pytest.raises(exceptions.RayTaskError,
                           match="At least one of the input arguments for this task could "
                                 "not be computed") as info:
            shmray.get(ref, timeout=DEADLOCK)
        assert isinstance(info.value, ValueError)


def assert_cancelled(*refs):
    for ref in refs:
        with pytest.raises(exceptions.TaskCancelledError):
            shmray.get(ref, timeout=DEADLOCK)


def learn_short(fn, *args):
    """Run ``fn`` through the scheduler (a ref argument) until it knows it is short."""
    for _ in range(3):
        shmray.get([fn.remote(shmray.put(0), *args) for _ in range(20)], timeout=DEADLOCK)


def chain_on(head, links):
    ref = head
    for _ in range(links):
        ref = step.remote(ref)
    return ref


def test_a_chain_runs_ahead_on_the_worker_making_each_link(ray):
    learn_short(step)
    before = sent_ahead()
    head = step.remote(ray.put(0), NAP)
    refs = [head]
    for _ in range(100):
        refs.append(step.remote(refs[-1]))
    assert ray.get(refs, timeout=DEADLOCK) == list(range(1, 102))
    sent, back = sent_ahead()
    assert sent - before[0] >= 10
    assert back == before[1]


def test_large_results_are_read_from_the_arena_by_the_task_sent_ahead(ray):
    @ray.remote
    def grow(x, nap=0.0):
        time.sleep(nap)
        return np.asarray(x) + 1.0  # 2 MiB: sealed in the arena, not kept inline

    learn_short(grow)
    before = sent_ahead()
    ref = grow.remote(ray.put(np.zeros(1 << 18)), NAP)
    for _ in range(10):
        ref = grow.remote(ref)
    value = ray.get(ref, timeout=DEADLOCK)
    assert value.shape == (1 << 18,) and (value == 11.0).all()
    assert sent_ahead()[0] > before[0]
    del value, ref
    wait_for(lambda: (settle(), runtime().store.statistics().bytes_in_use)[1] == 0)


def test_a_failed_producer_fails_its_dependents_sent_ahead_unrun(ray, tmp_path):
    @ray.remote
    def boom(x, nap=0.0):
        time.sleep(nap)
        if nap:
            raise ValueError("the head failed")
        return x

    learn_short(boom)
    learn_short(record, str(tmp_path / "warm"))
    trace = tmp_path / "trace"
    before = sent_ahead()
    head = boom.remote(ray.put(0), NAP)
    first = record.remote(head, str(trace))
    last = record.remote(first, str(trace))
    with pytest.raises(exceptions.RayTaskError, match="the head failed"):
        ray.get(head, timeout=DEADLOCK)
    assert_failed_for_their_argument(first, last)
    assert not trace.exists()  # neither ran
    assert sent_ahead()[0] - before[0] == 2


def test_a_producer_retried_for_an_exception_feeds_its_dependents_its_retried_value(
        ray, tmp_path):
    warm = tmp_path / "warm"
    warm.touch()
    learn_short(flaky, str(warm))
    learn_short(step)
    before = sent_ahead()
    head = flaky.remote(ray.put(0), str(tmp_path / "attempted"), NAP)
    assert ray.get(chain_on(head, 5), timeout=DEADLOCK) == 105
    sent, back = sent_ahead()
    assert sent > before[0] and back > before[1]


@pytest.mark.parametrize("retries", [0, 1])
def test_a_producer_that_crashes_its_worker(ray, tmp_path, retries):
    """Retried: its dependents sent ahead to the dead worker wait for the new attempt.  Not
    retried: they fail with its WorkerCrashedError."""
    warm = tmp_path / "warm"
    warm.touch()
    learn_short(crashy, str(warm))
    learn_short(step)
    before = sent_ahead()
    head = crashy.options(max_retries=retries).remote(ray.put(0), str(tmp_path / "attempted"),
                                                      NAP)
    last = chain_on(head, 5)
    if retries:
        assert ray.get(last, timeout=DEADLOCK) == 105
    else:
        with pytest.raises(exceptions.WorkerCrashedError):
            ray.get(last, timeout=DEADLOCK)
    assert sent_ahead()[0] > before[0]


def test_dependents_of_a_producer_that_blocks_in_get_wait_and_then_run(ray):
    @ray.remote
    def waits(x, boxed, nap=0.0):
        time.sleep(nap)
        return x + shmray.get(boxed[0], timeout=DEADLOCK)

    learn_short(step)
    for _ in range(3):  # known short, never blocking yet: its argument is always ready
        ready = ray.put(1)
        shmray.get([waits.remote(ray.put(0), [ready]) for _ in range(20)],
                   timeout=DEADLOCK)
    slow = step.remote(ray.put(0), 2 * NAP)
    head = waits.remote(ray.put(0), [slow], NAP)
    assert ray.get(chain_on(head, 5), timeout=DEADLOCK) == 6


def test_cancel_of_a_task_sent_ahead_spares_its_producer(ray):
    learn_short(step)
    before = sent_ahead()
    head = step.remote(ray.put(0), NAP)
    dependent = step.remote(head)
    after = step.remote(dependent)
    wait_for(lambda: sent_ahead()[0] - before[0] == 2)
    ray.cancel(dependent)
    assert_cancelled(dependent, after)
    assert ray.get(head, timeout=DEADLOCK) == 1


def test_cancel_of_a_producer_fails_its_dependents_sent_ahead(ray, tmp_path):
    learn_short(step)
    learn_short(record, str(tmp_path / "warm"))
    trace = tmp_path / "trace"
    before = sent_ahead()
    head = step.remote(ray.put(0), 10 * NAP)
    dependent = record.remote(head, str(trace))
    wait_for(lambda: sent_ahead()[0] - before[0] == 1)
    ray.cancel(head)
    assert_cancelled(head, dependent)
    assert ray.get(step.remote(ray.put(1)), timeout=DEADLOCK) == 2  # the worker serves on
    assert not trace.exists()


# -- a driver's chains, on the workers it leases ----------------------------------------------
#
# A task whose one ref argument is the result of the task the driver last sent a lease goes
# right behind it there (``Leases.submit_behind``); the scheduler hears of neither.

def leased_tasks():
    return runtime().leases.tasks_sent


def test_a_chain_from_a_fresh_session_runs_on_a_lease(ray):
    """The first tasks wait in the backlog for a lease: the chain waits there with them."""
    before, ahead = leased_tasks(), sent_ahead()
    ref = step.remote(0)
    for _ in range(300):
        ref = step.remote(ref)
    assert ray.get(ref, timeout=DEADLOCK) == 301
    assert leased_tasks() - before == 301
    assert sent_ahead() == ahead  # none went through the scheduler


def test_a_result_passed_on_while_its_chain_waits_in_the_backlog(ray):
    @ray.remote
    def unbox(boxed):
        return ray.get(boxed[0], timeout=DEADLOCK)

    first = step.remote(0)
    second = step.remote(first)
    assert ray.get(unbox.remote([second]), timeout=DEADLOCK) == 2
    assert ray.get([first, second], timeout=DEADLOCK) == [1, 2]
    first_id = first.binary()
    del first, second
    settle()
    assert first_id not in runtime().objects.counts  # the hold second had on it is gone


def test_a_failed_producer_on_a_lease_fails_the_task_behind_it_unrun(ray, tmp_path):
    @ray.remote
    def boom(x, nap=0.0):
        time.sleep(nap)
        raise ValueError("the head failed")

    trace = tmp_path / "trace"
    ray.get(step.remote(0), timeout=DEADLOCK)  # a lease is held
    before = leased_tasks()
    head = boom.remote(0, NAP)
    first = record.remote(head, str(trace))
    last = record.remote(first, str(trace))
    assert_failed_for_their_argument(first, last)
    assert not trace.exists()
    assert leased_tasks() - before >= 2  # head and first at least went to the lease


def test_a_leased_producer_retried_for_an_exception_feeds_the_task_behind_it(ray, tmp_path):
    ray.get(step.remote(0), timeout=DEADLOCK)
    head = flaky.remote(0, str(tmp_path / "attempted"), NAP)
    assert ray.get(chain_on(head, 5), timeout=DEADLOCK) == 105


@pytest.mark.parametrize("retries", [0, 1])
def test_a_leased_producer_that_crashes_its_worker(ray, tmp_path, retries):
    ray.get(step.remote(0), timeout=DEADLOCK)
    head = crashy.options(max_retries=retries).remote(0, str(tmp_path / "attempted"), NAP)
    last = chain_on(head, 5)
    if retries:
        assert ray.get(last, timeout=DEADLOCK) == 105
    else:
        with pytest.raises(exceptions.WorkerCrashedError):
            ray.get(last, timeout=DEADLOCK)


def test_tasks_behind_a_leased_producer_that_blocks_in_get(ray):
    @ray.remote
    def waits(x, boxed, nap=0.0):
        time.sleep(nap)
        return x + shmray.get(boxed[0], timeout=DEADLOCK)

    slow = step.remote(ray.put(0), 2 * NAP)  # through the scheduler, elsewhere
    head = waits.remote(0, [slow], NAP)
    assert ray.get(chain_on(head, 5), timeout=DEADLOCK) == 6


def test_cancel_of_a_task_behind_a_leased_producer(ray):
    ray.get(step.remote(0), timeout=DEADLOCK)
    head = step.remote(0, NAP)
    dependent = step.remote(head)
    after = step.remote(dependent)
    ray.cancel(dependent)
    assert_cancelled(dependent, after)
    assert ray.get(head, timeout=DEADLOCK) == 1


def test_cancel_of_a_leased_producer_fails_the_task_behind_it(ray, tmp_path):
    trace = tmp_path / "trace"
    ray.get(step.remote(0), timeout=DEADLOCK)
    head = step.remote(0, 10 * NAP)
    dependent = record.remote(head, str(trace))
    time.sleep(NAP)
    ray.cancel(head)
    assert_cancelled(head, dependent)
    assert ray.get(step.remote(1), timeout=DEADLOCK) == 2
    assert not trace.exists()


def test_a_tree_reduce_of_numbers_the_driver_has_runs_on_leases(ray):
    """Refs to numbers only the driver has go as their values: a level whose arguments are
    back is plain tasks; the others go through the scheduler, with the same sums."""
    @ray.remote
    def add(a, b):
        return a + b

    refs = [step.remote(i) for i in range(256)]
    ray.get(refs, timeout=DEADLOCK)
    before = leased_tasks()
    while len(refs) > 1:
        refs = [add.remote(refs[i], refs[i + 1]) for i in range(0, len(refs), 2)]
    assert ray.get(refs[0], timeout=DEADLOCK) == sum(range(1, 257))
    # The first level at least goes to leases, though those still in the backlog when
    # the next level names them go to the scheduler with it (``Leases.publish``).
    assert leased_tasks() > before


def test_links_of_a_leased_chain_finished_before_a_crash_keep_their_values(ray, tmp_path):
    """A chain behind itself on a lease, whose middle link kills the worker: the links that
    finished before return their values and ran once (their replies were parked), the one
    that crashed fails, and the links after it fail with its error without running."""
    runs = tmp_path / "runs"

    @ray.remote(max_retries=0)
    def link(x, crash_at):
        with open(runs, "a") as f:
            f.write(f"{x}\n")
        if x == crash_at:
            os._exit(1)
        return x + 1

    ray.get(link.remote(-10, None), timeout=DEADLOCK)  # a lease, and the function known short
    runs.unlink()
    refs = [link.remote(0, 5)]
    for _ in range(8):
        refs.append(link.remote(refs[-1], 5))
    assert ray.get(refs[:5], timeout=DEADLOCK) == [1, 2, 3, 4, 5]
    for failed in refs[5:]:
        with pytest.raises(exceptions.WorkerCrashedError):
            ray.get(failed, timeout=DEADLOCK)
    assert sorted(int(x) for x in runs.read_text().split()) == [0, 1, 2, 3, 4, 5]

