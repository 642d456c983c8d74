"""Resources: what the session has, what tasks and actors ask for, and requests that can
never be met, whatever route they take (a lease, the scheduler, inside a task or actor)."""

import pytest

import shmray
from shmray import exceptions

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
