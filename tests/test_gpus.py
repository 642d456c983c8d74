"""GPUs: ids handed to tasks and actors that ask for them, seen in CUDA_VISIBLE_DEVICES,
get_gpu_ids() and get_accelerator_ids(), shared by fractional requests, given back when a
task ends or an actor dies.  This machine has no GPU: the session is told it has some."""

import asyncio
import collections
import os
import stat

import pytest

import shmray
from shmray import exceptions

DEADLOCK = 60


@pytest.fixture(autouse=True)
def no_gpus_in_the_environment(monkeypatch):
    """Each test says what the driver's environment holds."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", raising=False)


@pytest.fixture
def two_gpus():
    shmray.init(num_cpus=4, num_gpus=2, object_store_memory=100 << 20)
    try:
        yield shmray
    finally:
        shmray.shutdown()


@shmray.remote(num_cpus=0)
class Barrier:
    """Lets ``n`` tasks through once all of them have arrived: they run at once."""

    def __init__(self, n):
        self.n = n
        self.arrived = 0
        self.all_in = asyncio.Event()

    async def wait(self):
        self.arrived += 1
        if self.arrived >= self.n:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), DEADLOCK)


def what_it_sees():
    return (shmray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"),
            shmray.get_runtime_context().get_accelerator_ids(),
            shmray.get_runtime_context().get_assigned_resources())


@shmray.remote(num_gpus=1)
def together(barrier):
    shmray.get(barrier.wait.remote())  # waits holding its GPU (its CPU is lent meanwhile)
    return what_it_sees()


def test_tasks_running_at_once_get_distinct_ids(two_gpus):
    barrier = Barrier.remote(2)
    seen = two_gpus.get([together.remote(barrier) for _ in range(2)], timeout=DEADLOCK)
    assert sorted(ids for ids, _, _, _ in seen) == [[0], [1]]
    for ids, visible, accelerators, assigned in seen:
        assert visible == str(ids[0])
        assert accelerators == {"GPU": [str(ids[0])]}
        assert assigned == {"CPU": 1.0, "GPU": 1.0}
    assert two_gpus.get_gpu_ids() == []  # the driver holds none
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # ...and its environment is its own


def test_a_task_may_hold_several(two_gpus):
    @two_gpus.remote(num_gpus=2)
    def both():
        return what_it_sees()[:2]

    assert two_gpus.get(both.remote(), timeout=DEADLOCK) == ([0, 1], "0,1")


def test_fractional_requests_share_an_id_two_by_two(two_gpus):
    @two_gpus.remote(num_gpus=0.5)
    def half(barrier):
        shmray.get(barrier.wait.remote())
        return what_it_sees()

    barrier = Barrier.remote(4)
    seen = two_gpus.get([half.remote(barrier) for _ in range(4)], timeout=DEADLOCK)
    per_id = collections.Counter(visible for _, visible, _, _ in seen)
    assert per_id == {"0": 2, "1": 2}
    assert all(ids == [int(visible)] and assigned["GPU"] == 0.5
               for ids, visible, _, assigned in seen)
    assert two_gpus.available_resources()["GPU"] == 2.0


def test_a_task_that_asks_for_no_gpu_sees_none_even_after_one_that_did():
    """The worker that ran a GPU task runs the next: the old ids are gone."""
    shmray.init(num_cpus=1, num_gpus=2, object_store_memory=100 << 20)
    try:
        @shmray.remote(num_gpus=1)
        def gpu():
            return os.getpid(), what_it_sees()[:3]

        @shmray.remote
        def plain():
            return os.getpid(), what_it_sees()[:3]

        @shmray.remote(num_gpus=1, runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "7"}})
        def gpu_with_env():
            return os.getpid(), what_it_sees()[:3]

        first, (ids, visible, _) = shmray.get(gpu.remote(), timeout=DEADLOCK)
        assert ids == [0] and visible == "0"
        pids = set()
        for _ in range(3):  # whichever route it takes
            pid, seen = shmray.get(plain.remote(), timeout=DEADLOCK)
            assert seen == ([], "", {"GPU": []})
            pids.add(pid)
        assert first in pids  # the same worker, so the test shows what it means to
        # The ids it was given win over env_vars (Ray's order); the task after sees none.
        assert shmray.get(gpu_with_env.remote(), timeout=DEADLOCK)[1][:2] == ([0], "0")
        assert shmray.get(plain.remote(), timeout=DEADLOCK)[1][1] == ""
    finally:
        shmray.shutdown()


@shmray.remote(num_gpus=1)
class Holder:
    def ids(self):
        return what_it_sees()

    def change_it(self):
        os.environ["CUDA_VISIBLE_DEVICES"] = "mine"

    def visible(self):
        return os.environ["CUDA_VISIBLE_DEVICES"]

    def die(self):
        os._exit(1)


def test_an_actor_holds_its_id_until_it_is_killed(two_gpus):
    @two_gpus.remote(num_gpus=1)
    def one():
        return what_it_sees()[0]

    @two_gpus.remote(num_gpus=2)
    def both():
        return what_it_sees()[0]

    holder = Holder.remote()
    (held,), visible, accelerators, assigned = two_gpus.get(holder.ids.remote(),
                                                            timeout=DEADLOCK)
    assert visible == str(held) and accelerators == {"GPU": [str(held)]}
    assert assigned == {"GPU": 1.0}
    for _ in range(3):
        assert two_gpus.get(one.remote(), timeout=DEADLOCK) == [1 - held]
    # Set once, at its start: the actor may change it, and its next call sees the change.
    two_gpus.get(holder.change_it.remote(), timeout=DEADLOCK)
    assert two_gpus.get(holder.visible.remote(), timeout=DEADLOCK) == "mine"
    two_gpus.kill(holder)
    assert two_gpus.get(both.remote(), timeout=DEADLOCK) == [0, 1]
    assert two_gpus.available_resources()["GPU"] == 2.0


def test_a_restarted_actor_gets_ids_again(two_gpus):
    holder = Holder.options(max_restarts=1, max_task_retries=1).remote()
    first = two_gpus.get(holder.ids.remote(), timeout=DEADLOCK)[0]
    with pytest.raises(exceptions.RayActorError):
        two_gpus.get(holder.die.options(max_task_retries=0).remote(), timeout=DEADLOCK)
    again, visible, _, _ = two_gpus.get(holder.ids.remote(), timeout=DEADLOCK)
    assert len(again) == 1 and visible == str(again[0])
    assert first in ([0], [1])
    two_gpus.kill(holder)
    assert two_gpus.available_resources()["GPU"] == 2.0


def test_an_actor_that_asks_for_no_gpu_sees_none(two_gpus):
    @two_gpus.remote
    class Plain:
        def ids(self):
            return what_it_sees()[:3]

    assert two_gpus.get(Plain.remote().ids.remote(), timeout=DEADLOCK) == ([], "",
                                                                             {"GPU": []})


def test_more_gpus_than_the_session_has_can_never_run(two_gpus):
    @two_gpus.remote
    def f():
        return 1

    with pytest.raises(exceptions.TaskUnschedulableError, match="GPU=3"):
        f.options(num_gpus=3).remote()
    with pytest.raises(exceptions.ActorUnschedulableError, match="GPU=3"):
        Holder.options(num_gpus=3).remote()


def test_more_than_one_gpu_must_be_whole(two_gpus):
    """Ray's rule (ids are given whole); its ValueError, raised by .remote() at the latest."""
    with pytest.raises(ValueError, match="Resource quantities >1 must be whole numbers"):
        two_gpus.remote(num_gpus=1.5)(lambda: 1).remote()
    with pytest.raises(ValueError, match="Resource quantities >1 must be whole numbers"):
        Holder.options(num_gpus=1.5).remote()


def test_a_session_has_a_whole_number_of_gpus():
    with pytest.raises(ValueError, match="whole"):
        shmray.init(num_gpus=1.5)
    assert not shmray.is_initialized()


def test_the_session_takes_the_gpus_cuda_visible_devices_lists(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    shmray.init(num_cpus=2, object_store_memory=100 << 20)
    try:
        assert shmray.cluster_resources()["GPU"] == 2.0
        barrier = Barrier.remote(2)
        seen = shmray.get([together.remote(barrier) for _ in range(2)], timeout=DEADLOCK)
        # Named by CUDA_VISIBLE_DEVICES: strings, as Ray's get_gpu_ids() gives them then.
        assert sorted(ids for ids, _, _, _ in seen) == [["3"], ["5"]]
        assert all(visible == ids[0] for ids, visible, _, _ in seen)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"  # the driver's, untouched
    finally:
        shmray.shutdown()


def test_num_gpus_takes_the_first_of_those_listed(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        shmray.init(num_gpus=3)
    shmray.init(num_cpus=2, num_gpus=1, object_store_memory=100 << 20)
    try:
        assert shmray.cluster_resources()["GPU"] == 1.0
        assert shmray.get(together.remote(Barrier.remote(1)), timeout=DEADLOCK)[:2] == (
            ["3"], "3")
    finally:
        shmray.shutdown()


def test_without_cuda_visible_devices_nvidia_smi_counts_them(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake A (UUID: GPU-a)'\n"
                    "echo 'GPU 1: Fake B (UUID: GPU-b)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    shmray.init(num_cpus=2, object_store_memory=100 << 20)
    try:
        assert shmray.cluster_resources()["GPU"] == 2.0
        @shmray.remote(num_gpus=1)
        def ids():
            return shmray.get_gpu_ids()

        assert shmray.get(ids.remote(), timeout=DEADLOCK) == [0]  # ints: nothing named them
    finally:
        shmray.shutdown()


def test_no_gpus_without_a_way_to_find_them(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        assert "GPU" not in shmray.cluster_resources()
    finally:
        shmray.shutdown()


def test_noset_leaves_cuda_visible_devices_alone(monkeypatch):
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    shmray.init(num_cpus=2, num_gpus=2, object_store_memory=100 << 20)
    try:
        @shmray.remote(num_gpus=1)
        def gpu():
            return what_it_sees()[:2]

        assert shmray.get(gpu.remote(), timeout=DEADLOCK) == ([0], None)
    finally:
        shmray.shutdown()


def test_override_on_zero_off_shows_what_the_driver_had(monkeypatch):
    """RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0: a task holding no GPU sees the driver's
    CUDA_VISIBLE_DEVICES, also after a task that held one ran in its worker."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote(num_gpus=1)
        def gpu():
            return what_it_sees()[:2]

        @shmray.remote
        def plain():
            return what_it_sees()[:2]

        assert shmray.get(plain.remote(), timeout=DEADLOCK) == ([], "3,5")
        assert shmray.get(gpu.remote(), timeout=DEADLOCK) == (["3"], "3")
        assert shmray.get(plain.remote(), timeout=DEADLOCK) == ([], "3,5")
    finally:
        shmray.shutdown()
