"""Resources: what the session has, what tasks and actors ask for, and requests that can
never be met, whatever route they take (a lease, the scheduler, inside a task or actor)."""

import threading
import time

import pytest

import shmray
from shmray import exceptions
from conftest import one_cpu

DEADLOCK = 60


@pytest.fixture
def ray0():
    """A session with no CPU at all."""
    with shmray.init(num_cpus=0, object_store_memory=100 << 20):
        yield shmray


@pytest.fixture
def ray2():
    with shmray.init(num_cpus=2, object_store_memory=100 << 20):
        yield shmray


def test_a_task_that_can_never_run_raises_at_once_on_every_route(ray0):
    """With num_cpus=0 a 1-CPU task with plain arguments hung (the driver's leased route
    skipped the check); the same task with a ref argument raised."""
    @ray0.remote
    def one_cpu(x=None):
        return x

    with pytest.raises(exceptions.TaskUnschedulableError, match="CPU=1.*CPU=0"):
        one_cpu.remote()
    with pytest.raises(exceptions.TaskUnschedulableError):
        one_cpu.remote(ray0.put(1))
    with pytest.raises(exceptions.TaskUnschedulableError):
        one_cpu.options(num_cpus=0.5).remote()

    @ray0.remote(num_cpus=0)
    def no_cpu():
        return "ran"

    assert ray0.get(no_cpu.remote(), timeout=DEADLOCK) == "ran"


def test_a_task_submitted_from_an_actor_that_can_never_run_raises_there(ray0):
    @ray0.remote
    def one_cpu():
        return 1

    @ray0.remote(num_cpus=0)
    class Submitter:
        def submit(self):
            return one_cpu.remote()

    submitter = Submitter.remote()
    with pytest.raises(exceptions.TaskUnschedulableError):
        ray0.get(submitter.submit.remote(), timeout=DEADLOCK)


@pytest.mark.parametrize("options", [{"num_cpus": 8}, {"num_gpus": 1},
                                     {"resources": {"accelerator": 1}}])
def test_an_actor_that_can_never_be_placed_raises_at_once(ray2, options):
    """An actor asking for more CPUs, GPUs or custom resources than the machine has waited
    forever with no message."""
    @ray2.remote
    class Big:
        def f(self):
            return 1

    with pytest.raises(exceptions.ActorUnschedulableError, match="never run"):
        Big.options(**options).remote()
    with pytest.raises(exceptions.ActorUnschedulableError):
        ray2.remote(**options)(type("AlsoBig", (), {"f": lambda self: 1})).remote()


def test_a_default_actor_needs_a_cpu_to_be_placed(ray0):
    """Ray places an actor on a CPU and holds none while it runs: with no CPU at all, only
    an actor that asks for num_cpus=0 can start."""
    @ray0.remote
    class Default:
        def f(self):
            return 1

    with pytest.raises(exceptions.ActorUnschedulableError, match="CPU=1"):
        Default.remote()
    assert ray0.get(Default.options(num_cpus=0).remote().f.remote(), timeout=DEADLOCK) == 1


def test_memory_is_a_resource_the_machine_has(ray2):
    """The session had memory=0, so any task or actor with memory= could never run."""
    assert ray2.cluster_resources()["memory"] > 0

    @ray2.remote(memory=100 << 20)
    def frugal():
        return "ran"

    assert ray2.get(frugal.remote(), timeout=DEADLOCK) == "ran"
    with pytest.raises(exceptions.TaskUnschedulableError, match="memory"):
        frugal.options(memory=1 << 60).remote()


def test_cpu_is_taken_back_when_a_get_returns():
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        def quick():
            return 1

        @shmray.remote
        def a():
            shmray.get(quick.remote())
            start = time.time()
            while time.time() - start < 1.5:
                pass
            return start, time.time()

        @shmray.remote
        def b():
            return time.time()

        ra = a.remote()
        time.sleep(0.5)
        (start, end), b_started = shmray.get([ra, b.remote()], timeout=DEADLOCK)
        assert b_started >= end - 0.05  # b waited for the CPU a took back
    finally:
        shmray.shutdown()


def test_a_blocked_task_keeps_its_gpu():
    shmray.init(num_cpus=2, num_gpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        def slow():
            time.sleep(0.8)
            return 1

        @shmray.remote(num_gpus=1)
        def gpu_waits():
            start = time.time()
            shmray.get(slow.remote())
            return start, time.time()

        @shmray.remote(num_gpus=1)
        def gpu_quick():
            return time.time()

        first = gpu_waits.remote()
        time.sleep(0.2)
        (start, end), second = shmray.get([first, gpu_quick.remote()], timeout=DEADLOCK)
        assert second >= end - 0.05
    finally:
        shmray.shutdown()


def test_a_task_waiting_for_a_resource_an_actor_holds_does_not_stop_plain_tasks():
    """While it waited in the scheduler's queue, no lease was granted: plain tasks, which
    run on leases, never ran though both CPUs were free."""
    shmray.init(num_cpus=2, resources={"R": 1}, object_store_memory=100 << 20)
    try:
        @shmray.remote(num_cpus=0, resources={"R": 1})
        class Holder:
            def ping(self):
                return "held"

        @shmray.remote(resources={"R": 1})
        def needs_r():
            return "got R"

        @shmray.remote
        def plain(i):
            return i

        holder = Holder.remote()
        assert shmray.get(holder.ping.remote(), timeout=DEADLOCK) == "held"
        waiting = needs_r.remote()  # until the actor goes
        time.sleep(0.2)
        assert sum(shmray.get([plain.remote(i) for i in range(10)], timeout=DEADLOCK)) == 45
        shmray.kill(holder)
        assert shmray.get(waiting, timeout=DEADLOCK) == "got R"
    finally:
        shmray.shutdown()


def test_a_leased_task_waiting_in_get_lends_its_cpu_to_the_drivers_tasks():
    """One CPU: the leased task waits for a flag the driver sets once its plain tasks are
    done; the driver asked for no other worker, and both waited for ever."""
    one_cpu()
    try:
        @shmray.remote(num_cpus=0)
        class Flag:
            def __init__(self):
                self.value = False

            def set(self):
                self.value = True

            def get(self):
                return self.value

        @shmray.remote
        def waiter():
            flag = shmray.get_actor("flag")
            while not shmray.get(flag.get.remote()):
                time.sleep(0.01)
            return "flag seen"

        @shmray.remote
        def plain(i):
            return i

        flag = Flag.options(name="flag").remote()
        shmray.get(flag.get.remote(), timeout=DEADLOCK)
        w = waiter.remote()
        time.sleep(0.3)
        assert sum(shmray.get([plain.remote(i) for i in range(10)], timeout=DEADLOCK)) == 45
        flag.set.remote()
        assert shmray.get(w, timeout=DEADLOCK) == "flag seen"
    finally:
        shmray.shutdown()


def test_a_blocked_leased_tasks_lent_cpu_is_not_counted_twice():
    """A task needing both CPUs (one held by an actor) looked placeable if the leases came
    back, counting the CPU a waiting leased task had lent already: no lease was granted,
    and plain tasks never ran though a CPU was free."""
    shmray.init(num_cpus=2, object_store_memory=100 << 20)
    try:
        @shmray.remote(num_cpus=1)
        class Holder:
            def ping(self):
                return "held"

        @shmray.remote(num_cpus=0, max_concurrency=2)
        class Flag:
            def __init__(self):
                self.event = threading.Event()

            def set(self):
                self.event.set()

            def wait(self):
                return self.event.wait(DEADLOCK)

        @shmray.remote
        def waiter():
            assert shmray.get(shmray.get_actor("flag").wait.remote())
            return "flag seen"

        @shmray.remote(num_cpus=2)
        def big():
            return "big"

        @shmray.remote
        def plain(i):
            return i

        holder = Holder.remote()
        shmray.get(holder.ping.remote(), timeout=DEADLOCK)
        flag = Flag.options(name="flag").remote()
        w = waiter.remote()
        time.sleep(0.3)
        b = big.remote()  # waits for the holder to go
        time.sleep(0.3)
        assert sum(shmray.get([plain.remote(i) for i in range(10)], timeout=DEADLOCK)) == 45
        flag.set.remote()
        assert shmray.get(w, timeout=DEADLOCK) == "flag seen"
        shmray.kill(holder)
        assert shmray.get(b, timeout=DEADLOCK) == "big"
    finally:
        shmray.shutdown()
