"""Placement groups on one node, and scheduling strategies: a group reserves its bundles'
resources, tasks and actors run in a bundle, removal frees the reservation and kills what
runs in it; NodeAffinity to this node runs, to any other fails clearly unless soft."""

import os
import time

import pytest

import shmray
from shmray import exceptions
from shmray.util import (
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from shmray.util.placement_group import PlacementGroup
from shmray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)
from conftest import wait_for

DEADLOCK = 60


def in_group(pg, index=-1, capture=None):
    return PlacementGroupSchedulingStrategy(pg, index, capture)


@shmray.remote
def current_group():
    pg = get_current_placement_group()
    return (pg.id.hex() if pg is not None else None,
            shmray.get_runtime_context().get_placement_group_id())


# -- reserving -----------------------------------------------------------------------------

def test_resources_list_groups_under_rays_names(ray, tmp_path):
    pg = placement_group([{"CPU": 1}, {"CPU": 0.5}])
    assert pg.wait(DEADLOCK)
    group = pg.id.hex()
    total = ray.cluster_resources()
    assert total[f"CPU_group_{group}"] == 1.5
    assert total[f"CPU_group_0_{group}"] == 1.0 and total[f"CPU_group_1_{group}"] == 0.5
    assert total[f"bundle_group_{group}"] == 2000.0
    assert total["CPU"] == 2.0

    @ray.remote(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0))
    def hold(path):
        import os
        import time

        deadline = time.monotonic() + DEADLOCK
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)

    gate = str(tmp_path / "open")
    running = hold.remote(gate)
    wait_for(lambda: f"CPU_group_0_{group}" not in ray.available_resources())
    assert ray.available_resources()[f"CPU_group_{group}"] == 0.5
    open(gate, "w").close()
    ray.get(running, timeout=DEADLOCK)
    remove_placement_group(pg)
    assert not any(group in name for name in ray.available_resources())


def test_a_group_reserves_its_bundles(ray):
    assert ray.available_resources()["CPU"] == 2.0
    pg = placement_group([{"CPU": 1}], strategy="STRICT_PACK")
    assert ray.get(pg.ready(), timeout=DEADLOCK) == pg
    assert pg.wait(timeout_seconds=DEADLOCK)
    assert ray.available_resources()["CPU"] == 1.0
    assert ray.cluster_resources()["CPU"] == 2.0
    assert pg.bundle_specs == [{"CPU": 1.0}] and pg.bundle_count == 1
    remove_placement_group(pg)
    assert ray.available_resources()["CPU"] == 2.0


def test_a_group_waits_until_its_resources_are_free(ray):
    first = placement_group([{"CPU": 1}, {"CPU": 1}])
    assert first.wait(DEADLOCK)
    second = placement_group([{"CPU": 1}], name="second")
    assert not second.wait(0.3)
    assert placement_group_table(second)["state"] == "PENDING"
    ready = second.ready()
    assert ray.wait([ready], timeout=0.1)[0] == []
    remove_placement_group(first)
    assert ray.get(ready, timeout=DEADLOCK) == second
    assert placement_group_table(second)["state"] == "CREATED"
    assert ray.available_resources()["CPU"] == 1.0


def test_a_group_waits_for_an_actor_to_give_its_cpus_back(ray):
    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote(), timeout=DEADLOCK)
    pg = placement_group([{"CPU": 1}])
    assert not pg.wait(0.3)
    ray.kill(hog)
    assert pg.wait(DEADLOCK)


def test_a_group_this_machine_can_never_hold_raises_at_once(ray):
    with pytest.raises(ValueError, match="CPU=3.*more than this machine has"):
        placement_group([{"CPU": 3}])
    with pytest.raises(ValueError, match="in all"):
        placement_group([{"CPU": 1}, {"CPU": 1}, {"CPU": 1}])
    with pytest.raises(ValueError, match="STRICT_SPREAD.*one node"):
        placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    with pytest.raises(ValueError, match="GPU"):
        placement_group([{"GPU": 1}])
    assert placement_group([{"CPU": 1}], strategy="STRICT_SPREAD").wait(DEADLOCK)


@pytest.mark.parametrize("bundles, strategy, lifetime, match", [
    ([], "PACK", None, "empty list"),
    ({"CPU": 1}, "PACK", None, "must be list"),
    ([{}], "PACK", None, "only 0 values"),
    ([{"CPU": 0}], "PACK", None, "only 0 values"),
    ([{"CPU": -1}], "PACK", None, ">= 0"),
    (["CPU"], "PACK", None, "dict"),
    ([{"CPU": 1}], "TIGHT", None, "Invalid placement group strategy"),
    ([{"CPU": 1}], "PACK", "forever", "lifetime"),
])
def test_bad_arguments_raise_value_error(ray, bundles, strategy, lifetime, match):
    with pytest.raises(ValueError, match=match):
        placement_group(bundles, strategy=strategy, lifetime=lifetime)


# -- tasks and actors in a group -----------------------------------------------------------

def test_tasks_run_in_a_bundle_and_see_their_group(ray):
    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    assert pg.wait(DEADLOCK)
    for index in (-1, 0, 1):
        hexed = ray.get(current_group.options(scheduling_strategy=in_group(pg, index))
                        .remote(), timeout=DEADLOCK)
        assert hexed == (pg.id.hex(), pg.id.hex())
    old_style = current_group.options(placement_group=pg, placement_group_bundle_index=1)
    assert ray.get(old_style.remote(), timeout=DEADLOCK)[0] == pg.id.hex()
    remove_placement_group(pg)  # the group holds every CPU
    assert ray.get(current_group.remote(), timeout=DEADLOCK) == (None, None)
    assert get_current_placement_group() is None  # the driver is in no group


def test_tasks_in_a_bundle_share_its_resources_only(ray, tmp_path):
    """Two 1-CPU tasks in a 1-CPU bundle run one after the other, though a CPU is free
    outside the group."""
    pg = placement_group([{"CPU": 1}])
    assert pg.wait(DEADLOCK)

    @ray.remote
    def spell(i):
        start = time.monotonic()
        time.sleep(0.3)
        return start, time.monotonic()

    spells = sorted(ray.get([spell.options(scheduling_strategy=in_group(pg)).remote(i)
                             for i in range(2)], timeout=DEADLOCK))
    assert spells[0][1] <= spells[1][0]
    assert ray.available_resources()["CPU"] == 1.0  # what the group does not hold


def test_a_task_asking_more_than_its_bundle_raises_at_remote(ray):
    pg = placement_group([{"CPU": 1}, {"CPU": 0.5}])
    with pytest.raises(exceptions.TaskUnschedulableError, match="bundle 1"):
        current_group.options(scheduling_strategy=in_group(pg, 1)).remote()
    with pytest.raises(exceptions.TaskUnschedulableError, match="any bundle"):
        current_group.options(num_cpus=2, scheduling_strategy=in_group(pg)).remote()
    with pytest.raises(exceptions.TaskUnschedulableError, match="memory"):
        current_group.options(memory=1 << 20, scheduling_strategy=in_group(pg)).remote()
    with pytest.raises(ValueError, match="bundle index 2 is invalid"):
        current_group.options(scheduling_strategy=in_group(pg, 2)).remote()
    with pytest.raises(ValueError, match="bundle index must be -1"):
        current_group.options(placement_group_bundle_index=0).remote()
    with pytest.raises(ValueError, match="cannot be set at the same time"):
        current_group.options(placement_group=pg, scheduling_strategy="DEFAULT").remote()
    half = current_group.options(num_cpus=0.5, scheduling_strategy=in_group(pg, 1))
    assert ray.get(half.remote(), timeout=DEADLOCK)[0] == pg.id.hex()


def test_actors_run_in_a_bundle(ray):
    pg = placement_group([{"CPU": 1, "memory": 1 << 20}])
    assert pg.wait(DEADLOCK)

    @ray.remote(num_cpus=1)
    class Member:
        def group(self):
            pg = get_current_placement_group()
            return pg.id.hex(), pg.bundle_specs

    member = Member.options(scheduling_strategy=in_group(pg, 0)).remote()
    assert ray.get(member.group.remote(), timeout=DEADLOCK) == (
        pg.id.hex(), [{"CPU": 1.0, "memory": float(1 << 20)}])
    assert ray.available_resources()["CPU"] == 1.0  # its CPU is the bundle's
    with pytest.raises(exceptions.ActorUnschedulableError, match="bundle 0"):
        Member.options(num_cpus=2, scheduling_strategy=in_group(pg, 0)).remote()


def test_an_actor_waits_for_its_group_and_its_bundle(ray):
    hog = placement_group([{"CPU": 2}])
    assert hog.wait(DEADLOCK)
    pg = placement_group([{"CPU": 1}])

    @ray.remote(num_cpus=1)
    class Member:
        def pid(self):
            return os.getpid()

    first = Member.options(scheduling_strategy=in_group(pg)).remote()
    second = Member.options(scheduling_strategy=in_group(pg)).remote()
    assert ray.wait([first.pid.remote()], timeout=0.3)[0] == []
    remove_placement_group(hog)
    ray.get(first.pid.remote(), timeout=DEADLOCK)
    later = second.pid.remote()
    assert ray.wait([later], timeout=0.3)[0] == []  # the bundle's CPU is the first's
    ray.kill(first)
    ray.get(later, timeout=DEADLOCK)


def test_children_go_into_the_group_only_when_captured(ray):
    """A captured child runs in the bundle its parent lends its CPU back to while it
    waits in get(); one not captured takes the CPU the group left free."""
    pg = placement_group([{"CPU": 1}])
    assert pg.wait(DEADLOCK)

    @ray.remote
    def parent():
        return ray.get(current_group.remote(), timeout=DEADLOCK)[0]

    captured = parent.options(scheduling_strategy=in_group(pg, 0, True)).remote()
    assert ray.get(captured, timeout=DEADLOCK) == pg.id.hex()
    free = parent.options(scheduling_strategy=in_group(pg, 0)).remote()
    assert ray.get(free, timeout=DEADLOCK) is None


def test_a_handle_travels_to_tasks(ray):
    pg = placement_group([{"CPU": 1}], name="travels")

    @ray.remote
    def inside(pg):
        ref = current_group.options(scheduling_strategy=in_group(pg)).remote()
        return ray.get(ref, timeout=DEADLOCK)[0], pg.bundle_specs, pg.wait(DEADLOCK)

    assert ray.get(inside.remote(pg), timeout=DEADLOCK) == (pg.id.hex(), [{"CPU": 1.0}],
                                                            True)
    found = get_placement_group("travels")
    assert found == pg and isinstance(found, PlacementGroup)
    with pytest.raises(ValueError, match="Failed to look up placement group"):
        get_placement_group("nobody")


# -- removal -------------------------------------------------------------------------------

def test_removal_kills_an_actor_in_it_and_frees_its_resources(ray):
    pg = placement_group([{"CPU": 2}])
    assert pg.wait(DEADLOCK)

    @ray.remote(num_cpus=1)
    class Member:
        def pid(self):
            return os.getpid()

    member = Member.options(scheduling_strategy=in_group(pg)).remote()
    pid = ray.get(member.pid.remote(), timeout=DEADLOCK)
    assert ray.available_resources().get("CPU", 0.0) == 0.0
    remove_placement_group(pg)
    with pytest.raises(exceptions.ActorDiedError, match="placement group was removed"):
        ray.get(member.pid.remote(), timeout=DEADLOCK)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"))
    wait_for(lambda: ray.available_resources()["CPU"] == 2.0)
    assert placement_group_table(pg)["state"] == "REMOVED"
    with pytest.raises(exceptions.TaskPlacementGroupRemoved):
        ray.get(pg.ready(), timeout=DEADLOCK)
    late = Member.options(scheduling_strategy=in_group(pg)).remote()
    with pytest.raises(exceptions.ActorDiedError, match="placement group was removed"):
        ray.get(late.pid.remote(), timeout=DEADLOCK)


def test_removal_fails_running_and_queued_tasks(ray, tmp_path):
    pg = placement_group([{"CPU": 1}])
    assert pg.wait(DEADLOCK)
    started = tmp_path / "started"

    @ray.remote
    def long(path):
        open(path, "w").close()
        time.sleep(DEADLOCK)

    running = long.options(scheduling_strategy=in_group(pg)).remote(str(started))
    queued = current_group.options(scheduling_strategy=in_group(pg)).remote()
    wait_for(started.exists)
    remove_placement_group(pg)
    for ref in (running, queued):
        with pytest.raises(exceptions.TaskPlacementGroupRemoved):
            ray.get(ref, timeout=DEADLOCK)
    with pytest.raises(exceptions.TaskPlacementGroupRemoved):
        ray.get(current_group.options(scheduling_strategy=in_group(pg)).remote(),
                timeout=DEADLOCK)
    wait_for(lambda: ray.available_resources()["CPU"] == 2.0)
    assert ray.get(current_group.remote(), timeout=DEADLOCK) == (None, None)


def test_a_pending_group_removed_fails_its_ready(ray):
    pg = placement_group([{"CPU": 2}])
    waiting = placement_group([{"CPU": 2}])
    ready = waiting.ready()
    remove_placement_group(waiting)
    with pytest.raises(exceptions.TaskPlacementGroupRemoved):
        ray.get(ready, timeout=DEADLOCK)
    assert pg.wait(DEADLOCK)


def test_the_table_lists_every_group(ray):
    pg = placement_group([{"CPU": 1}, {"CPU": 0.5}], strategy="SPREAD", name="listed")
    assert pg.wait(DEADLOCK)
    table = placement_group_table()
    info = table[pg.id.hex()]
    assert info == placement_group_table(pg)
    assert info["name"] == "listed" and info["strategy"] == "SPREAD"
    assert info["state"] == "CREATED"
    assert info["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 0.5}}
    node = ray.get_runtime_context().get_node_id()
    assert info["bundles_to_node_id"] == {0: node, 1: node}
    remove_placement_group(pg)
    assert placement_group_table()[pg.id.hex()]["state"] == "REMOVED"


def test_a_group_goes_with_the_actor_that_created_it(ray):
    """Once that actor is dead for good: not while it restarts.  A task's group lives on
    after the task (Ray's: it is the job's)."""
    @ray.remote(num_cpus=0, max_restarts=1)
    class Creator:
        def make(self, detached):
            pg = placement_group([{"CPU": 0.5}], lifetime="detached" if detached else None)
            pg.wait(DEADLOCK)
            return pg

    @ray.remote(num_cpus=0)
    def make():
        return placement_group([{"CPU": 0.5}])

    creator = Creator.remote()
    owned = ray.get(creator.make.remote(False), timeout=DEADLOCK)
    detached = ray.get(creator.make.remote(True), timeout=DEADLOCK)
    ray.kill(creator, no_restart=False)
    ray.get(creator.make.options(max_task_retries=-1).remote(True), timeout=DEADLOCK)
    assert placement_group_table(owned)["state"] == "CREATED"
    ray.kill(creator)
    wait_for(lambda: placement_group_table(owned)["state"] == "REMOVED")
    assert placement_group_table(detached)["state"] == "CREATED"
    by_task = ray.get(make.remote(), timeout=DEADLOCK)
    assert by_task.wait(DEADLOCK)


# -- scheduling strategies -----------------------------------------------------------------

def test_node_affinity_to_this_node_runs_and_to_another_fails_clearly(ray):
    node = ray.get_runtime_context().get_node_id()
    assert node == ray.nodes()[0]["NodeID"]
    here = NodeAffinitySchedulingStrategy(node, soft=False)
    assert ray.get(current_group.options(scheduling_strategy=here).remote(),
                   timeout=DEADLOCK) == (None, None)
    elsewhere = NodeAffinitySchedulingStrategy("ab" * 28, soft=False)
    with pytest.raises(exceptions.TaskUnschedulableError, match="no node has that id"):
        current_group.options(scheduling_strategy=elsewhere).remote()
    soft = NodeAffinitySchedulingStrategy("ab" * 28, soft=True)
    assert ray.get(current_group.options(scheduling_strategy=soft).remote(),
                   timeout=DEADLOCK) == (None, None)

    @ray.remote
    class Pinned:
        def ping(self):
            return "pong"

    assert ray.get(Pinned.options(scheduling_strategy=here).remote().ping.remote(),
                   timeout=DEADLOCK) == "pong"
    with pytest.raises(exceptions.ActorUnschedulableError, match="no node has that id"):
        Pinned.options(scheduling_strategy=elsewhere).remote()


def test_default_and_spread_run_and_others_raise(ray):
    for strategy in ("DEFAULT", "SPREAD", None):
        assert ray.get(current_group.options(scheduling_strategy=strategy).remote(),
                       timeout=DEADLOCK) == (None, None)
    with pytest.raises(ValueError, match="Invalid scheduling_strategy"):
        current_group.options(scheduling_strategy="PACKED").remote()


def test_each_bundle_holds_gpu_ids_of_its_own(monkeypatch):
    """Tasks in different bundles get different GPUs; removal gives the ids back."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    shmray.init(num_cpus=2, num_gpus=2, object_store_memory=100 << 20)
    try:
        pg = placement_group([{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}])
        assert pg.wait(DEADLOCK)

        @shmray.remote(num_gpus=1)
        def gpus():
            return shmray.get_gpu_ids()

        seen = [shmray.get(gpus.options(scheduling_strategy=in_group(pg, i)).remote(),
                           timeout=DEADLOCK) for i in (0, 1, 0)]
        assert seen[0] == seen[2] and sorted(seen[0] + seen[1]) == [0, 1]
        assert "GPU" not in shmray.available_resources()
        remove_placement_group(pg)
        assert shmray.available_resources()["GPU"] == 2.0
        assert len(shmray.get(gpus.remote(), timeout=DEADLOCK)) == 1
    finally:
        shmray.shutdown()


def test_a_group_from_an_ended_session_is_refused_not_waited_for():
    shmray.init(num_cpus=2)
    try:
        stale = placement_group([{"CPU": 1}])
        assert stale.wait(DEADLOCK)
    finally:
        shmray.shutdown()
    shmray.init(num_cpus=2)
    try:
        with pytest.raises(ValueError, match="no placement group with id"):
            @shmray.remote(scheduling_strategy=PlacementGroupSchedulingStrategy(stale))
            def f():
                return 1
        with pytest.raises(ValueError, match="no placement group with id"):
            stale.ready()
    finally:
        shmray.shutdown()


def test_group_ids_are_shmrays_id_class(ray):
    pg = placement_group([{"CPU": 1}])
    assert type(pg.id) is shmray.PlacementGroupID
    assert shmray.PlacementGroupID.from_hex(pg.id.hex()) == pg.id
    remove_placement_group(pg)


def test_local_mode_refuses_every_placement_group_call_saying_why():
    shmray.init(num_cpus=2, local_mode=True)
    try:
        empty = PlacementGroup.empty()
        for call in (lambda: placement_group([{"CPU": 1}]), lambda: empty.ready(),
                     lambda: remove_placement_group(empty)):
            with pytest.raises(NotImplementedError, match="not available in local mode"):
                call()
    finally:
        shmray.shutdown()
