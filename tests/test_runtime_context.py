"""get_runtime_context(): where the asking code runs, as Ray's says."""

import asyncio
import time

import pytest

import shmray
from conftest import in_both_modes

# Each test runs with shmray's processes and in local mode (``in_both_modes``).
ray = in_both_modes(2)

DEADLOCK = 60


def test_in_the_driver(ray):
    context = ray.get_runtime_context()
    assert context.get_task_id() is None and context.get_task_name() is None
    assert context.get_actor_id() is None
    assert set(context.get()) == {"job_id", "node_id", "namespace"}  # no task_id here
    assert context.node_id == context.get_node_id()
    assert context.namespace == "default"


def test_in_a_task(ray):
    @ray.remote(num_cpus=0.5)
    def where():
        context = shmray.get_runtime_context()
        return (context.get_task_id(), context.get_task_name(),
                context.get_task_function_name(), context.get_assigned_resources(),
                context.is_canceled(), context.get()["task_id"])

    ref = where.remote()
    task_id, name, function, resources, canceled, in_dict = ray.get(ref, timeout=DEADLOCK)
    assert task_id == ref.task_id().hex() == in_dict
    assert name == "where"
    assert function == f"{__name__}.test_in_a_task.<locals>.where"
    assert resources == {"CPU": 0.5}
    assert canceled is False
    named = where.options(name="custom", num_cpus=1).remote()
    assert ray.get(named, timeout=DEADLOCK)[1:4:2] == ("custom", {"CPU": 1.0})


class Where:
    def __init__(self):
        self.context = shmray.get_runtime_context()

    def ids(self):
        return (self.context.get_actor_id(), self.context.get_task_id(),
                self.context.get_task_name(), self.context.get_task_function_name())

    def me(self):
        return self.context.current_actor

    def restarted(self):
        return self.context.was_current_actor_reconstructed

    def wait_for_cancel(self):
        deadline = time.monotonic() + DEADLOCK
        while time.monotonic() < deadline:
            if self.context.is_canceled():
                return "noticed"
            time.sleep(0.01)
        return "never noticed"


def test_in_an_actor(ray):
    actor = ray.remote(max_restarts=1)(Where).remote()
    ref = actor.ids.remote()
    actor_id, task_id, name, function = ray.get(ref, timeout=DEADLOCK)
    assert actor_id == actor._actor_id.hex()
    assert task_id == ref.task_id().hex()
    assert name == "Where.ids" and function == f"{__name__}.Where.ids"
    assert ray.get(actor.me.remote(), timeout=DEADLOCK) == actor  # current_actor
    assert ray.get(actor.restarted.remote(), timeout=DEADLOCK) is False
    ray.kill(actor, no_restart=False)
    restarted = actor.restarted.options(max_task_retries=1).remote()
    assert ray.get(restarted, timeout=DEADLOCK) is True


@pytest.mark.processes_only("a call has ended when .remote() returns: there is nothing to cancel")
def test_a_running_sync_call_can_see_it_was_cancelled(ray):
    actor = ray.remote(Where).remote()
    ray.get(actor.ids.remote(), timeout=DEADLOCK)
    waiting = actor.wait_for_cancel.remote()
    time.sleep(0.2)
    ray.cancel(waiting)
    assert ray.get(waiting, timeout=DEADLOCK) == "noticed"


def test_async_calls_each_see_their_own_task(ray):
    @ray.remote
    class Async:
        async def mine(self, pause):
            await asyncio.sleep(pause)
            return shmray.get_runtime_context().get_task_id()

    actor = Async.remote()
    refs = [actor.mine.remote(pause) for pause in (0.3, 0.1, 0.2)]
    assert ray.get(refs, timeout=DEADLOCK) == [ref.task_id().hex() for ref in refs]


def test_is_canceled_outside_a_call_says_so(ray):
    with pytest.raises(RuntimeError, match="inside a task"):
        ray.get_runtime_context().is_canceled()
    with pytest.raises(RuntimeError, match="inside an actor"):
        ray.get_runtime_context().current_actor
