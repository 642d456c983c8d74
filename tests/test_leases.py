"""Leases: the driver sends plain tasks straight to workers the scheduler lent it, and owns
them: the scheduler hears of one only when it must (``_runtime.leases``).  Everything a
task does must behave as through the scheduler."""

import gc
import os
import signal
import time

import numpy as np
import pytest

from conftest import alive, learn_short, runtime, settle, wait_for

DEADLOCK = 60


@pytest.fixture(autouse=True)
def patient_leases(monkeypatch):
    """Leases idle 0.5 s before they go back, not 2 ms: on a loaded machine 2 ms can pass
    between two lines of a test, and the lease it set up would be gone."""
    from shmray._runtime import leases

    monkeypatch.setattr(leases, "IDLE_SECONDS", 0.5)


def direct_tasks():
    """Tasks this driver sent to a lease (counted here: a query would wait, and a driver
    that waits on something else gives its idle lease back)."""
    return runtime().leases.tasks_sent


def warm_lease(ray):
    """A round trip, so the driver holds a lease (it keeps it while not idle for long:
    ``patient_leases``)."""
    @ray.remote
    def noop():
        return None

    before = runtime().leases.tasks_sent
    ray.get(noop.remote())
    assert runtime().leases.held and runtime().leases.tasks_sent > before


def test_lone_round_trips_take_the_lease(ray):
    @ray.remote
    def square(x):
        return x * x

    warm_lease(ray)
    before = direct_tasks()
    assert [ray.get(square.remote(i)) for i in range(50)] == [i * i for i in range(50)]
    assert direct_tasks() - before >= 45


def test_errors_from_leased_tasks_are_task_errors(ray):
    class Oops(ValueError):
        pass

    @ray.remote
    def fails():
        raise Oops("no")

    warm_lease(ray)
    before = direct_tasks()
    with pytest.raises(Oops) as info:
        ray.get(fails.remote())
    assert isinstance(info.value, ray.exceptions.RayTaskError)
    assert "fails" in str(info.value)
    assert direct_tasks() > before


def test_retry_exceptions_on_a_leased_task(ray, tmp_path):
    marker = tmp_path / "tries"

    @ray.remote(retry_exceptions=True, max_retries=2)
    def flaky():
        tries = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(tries + 1))
        if tries < 2:
            raise RuntimeError("not yet")
        return tries

    warm_lease(ray)
    assert ray.get(flaky.remote(), timeout=30) == 2


@pytest.mark.parametrize("max_retries, outcome", [(1, "ok"), (0, "crash")])
def test_a_leased_worker_dying_mid_task(ray, tmp_path, max_retries, outcome):
    marker = tmp_path / "died"

    @ray.remote(max_retries=max_retries)
    def dies_once():
        if not marker.exists():
            marker.write_text("x")
            os._exit(1)
        return "ok"

    warm_lease(ray)
    ref = dies_once.remote()
    if outcome == "ok":
        assert ray.get(ref, timeout=30) == "ok"
    else:
        with pytest.raises(ray.exceptions.WorkerCrashedError):
            ray.get(ref, timeout=30)
    wait_for(lambda: len(runtime().query("workers")) >= 2)  # the pool is refilled
    assert ray.get(dies_once.remote(), timeout=30) == "ok"


@pytest.mark.parametrize("force", [False, True])
def test_cancel_a_running_leased_task(ray, force):
    @ray.remote
    def spin():
        while True:
            time.sleep(0.01)

    warm_lease(ray)
    before = direct_tasks()
    ref = spin.remote()
    time.sleep(0.3)
    assert direct_tasks() > before
    ray.cancel(ref, force=force)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(ref, timeout=30)


def test_a_leased_task_waiting_on_a_nested_one_lends_its_cpu():
    import shmray

    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        def child(x):
            return x + 1

        @shmray.remote
        def parent(x):
            return shmray.get(child.remote(x))

        warm_lease(shmray)
        before = direct_tasks()
        assert shmray.get(parent.remote(1), timeout=30) == 2  # one CPU, held by the lease
        assert direct_tasks() > before
    finally:
        shmray.shutdown()


def test_an_idle_lease_goes_back(ray):
    warm_lease(ray)
    wait_for(lambda: not runtime().leases.held, timeout=5)
    wait_for(lambda: ray.available_resources().get("CPU") == 2.0, timeout=5)


def test_a_burst_after_round_trips_gets_every_cpu(ray):
    @ray.remote
    def sleepy():
        time.sleep(1.0)
        return os.getpid()

    warm_lease(ray)
    started = time.monotonic()
    pids = ray.get([sleepy.remote() for _ in range(2)], timeout=30)
    assert time.monotonic() - started < 1.8  # both ran at once, on two leases
    assert len(set(pids)) == 2


def test_results_of_leased_tasks_feed_other_tasks_and_are_freed(ray):
    import numpy as np

    @ray.remote
    def make(i):
        return np.full(100_000, i)  # in the arena

    @ray.remote
    def total(a):
        return int(a.sum())

    warm_lease(ray)
    settle()
    objects = runtime().query("objects")
    for i in range(10):
        ref = make.remote(i)
        assert ray.get(total.remote(ref)) == 100_000 * i
        del ref
    gc.collect()
    settle()
    wait_for(lambda: (settle(), runtime().query("objects"))[1] <= objects, timeout=10)
    wait_for(lambda: runtime().store.statistics().bytes_in_use == 0, timeout=10)


def test_a_leased_worker_killed_between_tasks(ray):
    @ray.remote
    def pid():
        return os.getpid()

    warm_lease(ray)
    worker = ray.get(pid.remote())
    os.kill(worker, signal.SIGKILL)
    time.sleep(0.2)
    for _ in range(5):
        assert ray.get(pid.remote(), timeout=30) != worker


# -- regressions from review (each failed before its fix) ------------------------------


def test_an_actor_is_placed_while_the_driver_holds_a_lease():
    import shmray

    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        class A:
            def m(self):
                return "m"

        warm_lease(shmray)  # the one CPU is lent to us
        a = A.remote()
        assert shmray.get(a.m.remote(), timeout=30) == "m"
    finally:
        shmray.shutdown()


def test_waiting_with_a_lease_costs_no_cpu(ray):
    @ray.remote
    class Slow:
        def m(self):
            time.sleep(2.0)
            return "m"

    slow = Slow.remote()
    ray.get(slow.__ray_ready__.remote())
    warm_lease(ray)
    started = time.process_time()
    assert ray.get(slow.m.remote(), timeout=30) == "m"
    assert time.process_time() - started < 0.015  # was ~30 ms: a wake-up every 2 ms
    assert not runtime().leases.held  # and the idle lease went back


@pytest.mark.parametrize("computes", [0.0, 0.05])
def test_recursive_cancel_reaches_the_children_of_a_leased_task(ray, tmp_path, computes):
    """With the driver computing right after submitting, the leased task's children reach
    the scheduler before the driver's registration of the task does."""
    marker = tmp_path / "child"

    @ray.remote
    def child():
        time.sleep(2)
        marker.write_text("ran to the end")

    @ray.remote
    def parent():
        return ray.get(child.remote())

    warm_lease(ray)
    before = direct_tasks()
    ref = parent.remote()
    assert direct_tasks() > before
    busy_until = time.monotonic() + computes
    while time.monotonic() < busy_until:  # the flusher waits for the GIL meanwhile
        pass
    time.sleep(0.3)
    ray.cancel(ref, recursive=True)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=30)
    wait_for(lambda: ray.available_resources().get("CPU") == 2.0, timeout=5)
    time.sleep(2.2)
    assert not marker.exists()


def test_results_holding_refs_do_not_keep_tasks_off_leases(ray):
    @ray.remote
    def holder(i):
        inner = ray.put(i)
        time.sleep(0.003)
        return [inner]

    @ray.remote
    def square(x):
        return x * x

    kept = []
    for i in range(30):
        warm_lease(ray)
        ref = holder.remote(i)
        ray.get(ref)
        kept.append(ref)
    before = direct_tasks()
    assert [ray.get(square.remote(i)) for i in range(50)] == [i * i for i in range(50)]
    assert direct_tasks() - before >= 40


def test_available_resources_right_after_lone_tasks(ray):
    warm_lease(ray)
    assert ray.available_resources()["CPU"] == 2.0


def test_a_burst_runs_on_leases_and_the_scheduler_hears_of_none_of_it(ray):
    @ray.remote
    def square(x):
        return x * x

    settle()
    objects = runtime().query("objects")
    before = direct_tasks()
    refs = [square.remote(i) for i in range(500)]
    assert ray.get(refs, timeout=30) == [i * i for i in range(500)]
    assert direct_tasks() - before == 500
    assert runtime().query("objects") == objects  # ours alone
    del refs
    gc.collect()
    settle()  # applies the releases queued by the refs' __del__
    assert not runtime().objects.owner_only and not runtime().objects.unregistered


def test_refs_to_results_only_the_driver_had_resolve_wherever_they_go(ray):
    """Once a ref leaves the driver, the scheduler knows its object: as an argument, inside
    a put, pickled by hand, inside an argument; and it is freed once they are gone (but
    for the one pickled by hand: held while the driver lives, as in Ray)."""
    @ray.remote
    def square(x):
        return x * x

    settle()
    objects = runtime().query("objects")
    refs = [square.remote(i) for i in range(10)]
    ray.get(refs, timeout=30)
    assert ray.get(square.remote(refs[3])) == 81
    assert ray.get(ray.get(ray.put([refs[4]]))[0]) == 16

    @ray.remote
    def unpickle_and_get(blob):
        import pickle
        return ray.get(pickle.loads(blob))

    import pickle
    assert ray.get(unpickle_and_get.remote(pickle.dumps(refs[5]))) == 25

    @ray.remote
    def get_inside(holder):
        return ray.get(holder[0])

    assert ray.get(get_inside.remote([refs[6]])) == 36
    del refs
    gc.collect()
    wait_for(lambda: (settle(), runtime().query("objects"))[1] == objects + 1, timeout=10)
    assert not runtime().objects.owner_only and not runtime().objects.unregistered


def test_refs_of_tasks_still_running_or_waiting_for_a_worker_can_be_passed_on(ray):
    @ray.remote
    def slow(x):
        time.sleep(0.3)
        return x

    @ray.remote
    def add(a, b):
        return a + b

    refs = [slow.remote(i) for i in range(6)]  # two run, four wait in the driver's backlog
    assert runtime().leases.backlog
    total = add.remote(refs[0], refs[5])  # one running, one not sent yet
    assert ray.get(total, timeout=30) == 5
    assert ray.get(refs, timeout=30) == list(range(6))


def test_a_burst_spreads_over_every_cpu(ray):
    @ray.remote
    def sleepy(i):
        time.sleep(0.5)
        return os.getpid()

    started = time.monotonic()
    pids = ray.get([sleepy.remote(i) for i in range(4)], timeout=30)
    assert time.monotonic() - started < 1.8  # two at a time: two rounds, not four
    assert len(set(pids)) == 2


def test_a_worker_dying_in_a_pipelined_burst_costs_only_its_task(ray, tmp_path):
    """Tasks queued behind the one that crashed its worker never started: they run again
    elsewhere without using a retry (max_retries=0 here), and only that one fails."""
    marker = tmp_path / "died"

    @ray.remote(max_retries=0)
    def short(i, crash):
        if crash and not marker.exists():
            marker.write_text("x")
            os._exit(1)
        return i

    learn_short(short, 0, False)
    refs = [short.remote(i, i == 100) for i in range(400)]
    outcomes = []
    for i, ref in enumerate(refs):
        try:
            outcomes.append(ray.get(ref, timeout=30))
        except ray.exceptions.WorkerCrashedError:
            outcomes.append("crashed")
    assert outcomes == [("crashed" if i == 100 else i) for i in range(400)]


def _runs(folder) -> dict:
    """How often each task ran: each run leaves a file named after its index."""
    counts = {}
    for name in os.listdir(folder):
        index = int(name.split("-")[0])
        counts[index] = counts.get(index, 0) + 1
    return counts


@pytest.mark.crash
@pytest.mark.parametrize("max_retries", [0, 2])
@pytest.mark.parametrize("how", ["exit", "sigkill"])
@pytest.mark.parametrize("kind", ["inline", "arena", "holding"])
def test_leased_tasks_finished_before_a_crash_return_their_results_and_run_once(
        ray, tmp_path, kind, how, max_retries):
    """A leased worker holds back the replies of finished tasks while it runs the next one
    sent ahead; a crash in that one lost them, and the finished tasks ran again (their side
    effects twice) without using a retry, even with max_retries=0."""
    shared = ray.put("shared")  # a ref the function holds: its results name it

    @ray.remote(max_retries=max_retries)
    def task(i, crash_at, folder, first):
        if folder is not None:
            with open(os.path.join(folder, f"{i}-{os.getpid()}-{os.urandom(4).hex()}"), "w"):
                pass
            if i == crash_at and not os.path.exists(first):
                open(first, "w").close()
                if how == "exit":
                    os._exit(1)
                os.kill(os.getpid(), signal.SIGKILL)
        if kind == "arena":
            return np.full((1 << 20) // 8 + 8, i, dtype=np.float64)
        if kind == "holding":
            return [i, shared]
        return i

    def read(value):
        if kind == "arena":
            return int(value[0])
        if kind == "holding":
            assert ray.get(value[1], timeout=DEADLOCK) == "shared"
            return value[0]
        return value

    learn_short(task, 0, -1, None, None)
    for attempt in range(3):  # how many replies are held back when it dies varies
        folder = tmp_path / str(attempt)
        folder.mkdir()
        first = str(tmp_path / f"crashed{attempt}")
        refs = [task.remote(i, 40, str(folder), first) for i in range(80)]
        outcomes = []
        for i, ref in enumerate(refs):
            try:
                outcomes.append(read(ray.get(ref, timeout=DEADLOCK)))
            except ray.exceptions.WorkerCrashedError:
                outcomes.append("crashed")
        crashed = "crashed" if max_retries == 0 else 40
        assert outcomes == [crashed if i == 40 else i for i in range(80)]
        runs = _runs(folder)
        assert runs == {i: 1 + (i == 40 and max_retries > 0) for i in range(80)}


def test_tasks_finished_before_their_worker_died_keep_their_arrays(ray, tmp_path):
    """Tasks that finished before their worker died, their arena results sealed but their
    replies held back: they ran again, and their old results had to be deleted first, or
    the re-run found its object already there.  Now the scheduler finds their replies
    parked and they keep their arrays; those that never started store theirs afresh."""
    @ray.remote(max_retries=0)
    def make(i, marker):
        if marker is not None and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return np.full((1 << 20) // 8 + 8, i, dtype=np.float64)  # into the arena

    learn_short(make, 0, None)
    for attempt in range(3):  # how many results are held back when it dies varies
        marker = str(tmp_path / f"died{attempt}")
        refs = [make.remote(i, marker if i == 30 else None) for i in range(60)]
        for i, ref in enumerate(refs):
            if i == 30:
                with pytest.raises(ray.exceptions.WorkerCrashedError):
                    ray.get(ref, timeout=30)
            else:
                assert ray.get(ref, timeout=30)[0] == i


def test_a_task_waiting_on_one_queued_behind_it_on_its_worker():
    """A leased task that waits in get() for a task sent to the same worker after it: the
    worker hands the queued tasks back, and they run elsewhere."""
    import shmray

    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        class Box:
            def __init__(self):
                self.refs = None

            def put(self, refs):
                self.refs = refs

            def get(self):
                return self.refs

        @shmray.remote
        def task(i, waits):
            if not waits:
                return i
            box = shmray.get_actor("box")
            while True:  # waits for the ref of the task queued behind it, then for it
                refs = shmray.get(box.get.remote())
                if refs is not None:
                    return shmray.get(refs[0]) + 1
                time.sleep(0.01)

        box = Box.options(name="box").remote()
        learn_short(task, 0, False)  # so tasks queue behind one another on the one worker
        before = direct_tasks()
        first = task.remote(0, True)
        second = task.remote(41, False)
        assert direct_tasks() - before == 2 and len(runtime().leases.held) == 1
        box.put.remote([second])
        assert shmray.get(first, timeout=30) == 42
        assert shmray.get(second, timeout=30) == 41
    finally:
        shmray.shutdown()


def test_alternating_tasks_and_actor_calls_keep_the_lease(ray):
    @ray.remote
    def square(x):
        return x * x

    @ray.remote
    class Echo:
        def echo(self, x):
            return x

    echo = Echo.remote()
    ray.get(echo.echo.remote(0))
    warm_lease(ray)
    before = direct_tasks()
    for i in range(100):
        assert ray.get(square.remote(i)) == i * i
        assert ray.get(echo.echo.remote(i)) == i
    assert direct_tasks() - before >= 90


@pytest.mark.parametrize("registered", [True, False])
def test_a_result_seen_stays_when_its_worker_dies_before_the_scheduler_hears(ray, registered):
    """The driver reports a leased task's results after it has read them; if the worker dies
    first, the scheduler must take the driver's word, not fail or rerun what was seen."""
    @ray.remote(max_retries=0)
    def pid():
        return os.getpid()

    @ray.remote
    def same(x):
        return x

    warm_lease(ray)
    before = direct_tasks()
    ref = pid.remote()
    assert direct_tasks() == before + 1
    rt = runtime()
    if registered:  # the scheduler knows of the task; else only we do
        rt.publish([ref.binary()])
        rt.flush()
    with rt.link.lock:  # held across get(): nothing more reaches the scheduler meanwhile
        worker = ray.get(ref, timeout=30)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not alive(worker))
        time.sleep(0.3)  # the scheduler sees the death before the report
    assert ray.get(ref, timeout=30) == worker
    assert ray.get(same.remote(ref), timeout=30) == worker  # the scheduler's copy too
    time.sleep(0.1)
    assert ray.get(ref, timeout=30) == worker


def test_a_dead_leased_workers_task_is_retried_while_the_driver_does_other_things(ray, tmp_path):
    """The retry waited for the driver's answer to the scheduler's question, which it read
    only on its next call into shmray: the driver says so itself once the channel ends."""
    marker, out = tmp_path / "crashed-once", tmp_path / "out"

    @ray.remote(max_retries=1)
    def dies_once():
        if not marker.exists():
            marker.write_text("x")
            time.sleep(0.2)
            os._exit(1)
        return 5

    @ray.remote
    def write(x):
        out.write_text(str(x))

    warm_lease(ray)
    before = direct_tasks()
    x = dies_once.remote()
    assert direct_tasks() == before + 1
    write.remote(x)  # through the scheduler: it waits for x
    wait_for(out.exists, timeout=20)  # no shmray call meanwhile: only time.sleep
    assert out.read_text() == "5"


def test_a_futures_callback_can_pass_the_ref_on(ray):
    """Callbacks run as the result comes in: the ref must already be publishable then."""
    import threading

    @ray.remote
    def double(x):
        return 2 * x

    for _ in range(10):
        ref = double.remote(3)
        chained, done = [], threading.Event()

        def then(future, ref=ref, chained=chained, done=done):
            chained.append(double.remote(ref))
            done.set()

        ref.future().add_done_callback(then)
        assert done.wait(30)
        assert ray.get(chained[0], timeout=30) == 12


def test_a_ref_pickled_by_hand_right_after_its_task_waited_in_get(ray):
    """Its registration (sent as its result came) must reach the scheduler before the
    ref reaches another process by a way of its own."""
    import pickle

    @ray.remote
    def inner():
        return 1

    @ray.remote
    def outer():
        return ray.get(inner.remote()) + 1

    @ray.remote
    def use(blob):
        return ray.get(pickle.loads(blob))

    for _ in range(20):
        ref = outer.remote()
        assert ray.get(ref, timeout=30) == 2
        assert ray.get(use.remote(pickle.dumps(ref)), timeout=30) == 2


def test_a_ref_kept_past_shutdown_still_pickles():
    import pickle

    import shmray

    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        def f():
            return 1

        done = f.remote()
        assert shmray.get(done) == 1
        running = f.remote()
    finally:
        shmray.shutdown()
    assert pickle.loads(pickle.dumps([done, running]))


def test_short_tasks_do_not_queue_behind_a_long_one(ray):
    """They were sent to the long task's worker (only their own function's run time was
    looked at) and waited for it, the other CPU idle."""
    @ray.remote
    def short(i):
        return i

    @ray.remote
    def long_one():
        time.sleep(3)
        return "long"

    assert ray.get(long_one.remote(), timeout=DEADLOCK) == "long"  # known to be long
    learn_short(short, 0)
    started = time.monotonic()
    slow = long_one.remote()
    assert ray.get([short.remote(i) for i in range(200)], timeout=DEADLOCK) == list(range(200))
    assert time.monotonic() - started < 2.0
    assert ray.get(slow, timeout=DEADLOCK) == "long"
