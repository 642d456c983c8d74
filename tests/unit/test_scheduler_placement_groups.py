"""The scheduler's placement groups, driven directly: no processes, a fake worker pool.

Reservations are all or nothing, bundles hold resources (and GPU ids) of their own, tasks
in a group take from their bundle, and removal gives everything back.
"""

import os

import pytest

from shmray import _protocol as P
from shmray._connection import connection_pair
from shmray._ids import new_task_id, object_id_for_put
from shmray._object_store import ObjectStore
from shmray._resources import session_totals
from shmray._scheduler import Scheduler
from shmray._serialization import serialize

NO_SUCH_PID = 5_000_000  # above Linux's pid_max: signals to it can never hit a process


@pytest.fixture
def sched(tmp_path):
    store = ObjectStore(100 << 20)
    driver_end, scheduler_end = connection_pair("driver", "scheduler")
    peers = []

    def spawn(scheduler, cancel_slot):
        ours, theirs = connection_pair("scheduler", "worker")
        peers.append(theirs)
        return ours, NO_SUCH_PID + len(peers)

    options = {"num_cpus": 2, "num_gpus": 2, "socket_dir": str(tmp_path),
               "gpu_ids": ("0", "1")}
    options["total"] = session_totals(options, store.capacity)
    scheduler = Scheduler(scheduler_end, NO_SUCH_PID, store, str(tmp_path), options, spawn)
    yield scheduler
    scheduler.clients.selector.close()
    store.close()
    driver_end.close()
    for peer in peers:
        peer.close()


def create(sched, bundles):
    pg_id = os.urandom(18)
    sched.handlers[P.CREATE_PLACEMENT_GROUP](sched.driver, pg_id, bundles, "PACK", "",
                                             "default", False)
    sched.dispatch()
    return pg_id


def remove(sched, pg_id):
    sched.handlers[P.REMOVE_PLACEMENT_GROUP](sched.driver, 1, pg_id)
    sched.dispatch()


def state(sched, pg_id):
    return sched.placement_groups.table[pg_id].state


def in_group(pg_id, index=-1, resources=None):
    return (new_task_id(), b"f" * 16, "f", serialize(((), {})).to_bytes(), [], [], 1,
            resources or {"CPU": 1.0}, 3, False, {"placement": (pg_id, index, False)})


def test_a_group_is_reserved_whole_or_waits(sched):
    first = create(sched, [{"CPU": 1.0}, {"CPU": 1.0}])
    assert state(sched, first) == "CREATED"
    assert sched.resources.available["CPU"] == 0.0
    second = create(sched, [{"CPU": 1.0}])
    assert state(sched, second) == "PENDING"
    remove(sched, first)
    assert state(sched, first) == "REMOVED" and state(sched, second) == "CREATED"
    assert sched.resources.available["CPU"] == 1.0


def test_each_bundle_gets_gpu_ids_of_its_own_and_gives_them_back(sched):
    pg_id = create(sched, [{"GPU": 1.0}, {"GPU": 1.0}])
    pools = sched.placement_groups.table[pg_id].pools
    assert [pool.gpus.free for pool in pools] == [{"0": 10_000}, {"1": 10_000}]
    assert not sched.resources.gpus.fits(1.0)
    remove(sched, pg_id)
    assert sched.resources.gpus.fits(2.0)


def test_tasks_take_from_their_bundle_not_the_free_pool(sched):
    pg_id = create(sched, [{"CPU": 1.0}])
    sched.handlers[P.REGISTER_FUNCTION](sched.driver, b"f" * 16, b"code", "f")
    for _ in range(2):
        sched.handlers[P.SUBMIT](sched.driver, in_group(pg_id))
    sched.dispatch()
    running = [w.task for w in sched.clients.workers() if w.task is not None]
    assert len(running) == 1  # the bundle has room for one
    assert running[0].pool is sched.placement_groups.table[pg_id].pools[0]
    assert sched.resources.available["CPU"] == 1.0  # what the group left free


def test_ready_asked_before_the_group_arrived_resolves_when_it_is_created(sched):
    pg_id, object_id = os.urandom(18), object_id_for_put()
    sched.handlers[P.PLACEMENT_GROUP_READY](sched.driver, pg_id, object_id, b"handle")
    sched.handlers[P.CREATE_PLACEMENT_GROUP](sched.driver, pg_id, [{"CPU": 1.0}], "PACK", "",
                                             "default", False)
    assert not [m for m in sched.driver.conn.pending if m[0] == P.READY]
    sched.dispatch()
    assert [m[1:] for m in sched.driver.conn.pending if m[0] == P.READY] == [
        (object_id, b"handle", b"")]
