"""The scheduler's side of direct actor calls (``_scheduler.direct_calls``), driven directly:
no processes, fake actor processes (socket pairs).  A caller registers a call only when it
must; when the actor's process dies, what the caller saw decides the call's fate.

The end-to-end versions of these, through real processes, are in tests/test_direct.py; here
each interleaving is forced, which there only happens by chance.
"""

import mmap

import pytest

from shmray import _protocol as P, _slot, exceptions
from shmray._connection import connection_pair
from shmray._ids import new_task_id, object_id_for_put, object_id_for_return
from shmray._object_store import ObjectStore
from shmray._resources import session_totals
from shmray._scheduler import Scheduler
from shmray._serialization import deserialize_inline, serialize
from shmray._task_spec import actor_spec, task_spec

NO_SUCH_PID = 5_000_000  # above Linux's pid_max: signals to it can never hit a process
CLASS_ID = b"c" * 16


class FakeProcesses:
    """Hands out connected socket pairs instead of forking workers and actors."""

    def __init__(self):
        self.peers = []
        self.next_pid = NO_SUCH_PID

    def worker(self, scheduler, cancel_slot):
        return self._pair("worker")

    def actor(self, scheduler, class_name):
        return (*self._pair(class_name), mmap.mmap(-1, _slot.SLOT_SIZE))

    def _pair(self, name):
        ours, theirs = connection_pair("scheduler", name)
        self.peers.append(theirs)
        self.next_pid += 1
        return ours, self.next_pid


@pytest.fixture
def sched(tmp_path):
    store = ObjectStore(64 << 20)
    driver_end, scheduler_end = connection_pair("driver", "scheduler")
    fakes = FakeProcesses()
    options = {"num_cpus": 2, "resources": {}, "socket_dir": str(tmp_path)}
    options["total"] = session_totals(options, store.capacity)
    scheduler = Scheduler(scheduler_end, NO_SUCH_PID, store, str(tmp_path), options,
                          fakes.worker, fakes.actor)
    yield scheduler
    scheduler.clients.selector.close()
    store.close()
    driver_end.close()
    for peer in fakes.peers:
        peer.close()


def deliver(sched, client, opcode, *fields):
    sched.handlers[opcode](client, *fields)


def sent(client, opcode):
    return [m for m in client.conn.pending if m[0] == opcode]


def start_actor(sched, max_restarts=1, max_task_retries=0):
    options = {"is_async": False, "max_concurrency": 1, "max_restarts": max_restarts,
               "max_task_retries": max_task_retries, "max_pending_calls": -1,
               "place": {"CPU": 1.0}, "hold": {"CPU": 0.0}, "name": None,
               "namespace": "default", "detached": False, "get_if_exists": False,
               "methods": {}, "class_name": "Log", "shutdown_hook": False, "env_vars": None,
               "concurrency_groups": {}, "ordered": True, "placement": None}
    deliver(sched, sched.driver, P.REGISTER_FUNCTION, CLASS_ID, b"class", "Log")
    actor_id = object_id_for_put()
    spec = actor_spec(actor_id, CLASS_ID, "Log", serialize(((), {})).to_bytes(), [], [],
                      options)
    deliver(sched, sched.driver, P.CREATE_ACTOR, None, spec)
    return actor_id, process_of(sched, actor_id)


def process_of(sched, actor_id):
    """The actor's current process, started (as the scheduler's loop would)."""
    sched.dispatch()
    client = sched.actors.table[actor_id].client
    deliver(sched, client, P.ACTOR_STARTED, None)
    return client


def call(retries=0):
    task_id = new_task_id()
    return task_spec(task_id, "add", "Log.add", serialize(((1,), {})).to_bytes(), [], [], 1,
                     {}, retries, False, None)


def calls_received(client):
    return [m[1] for m in sent(client, P.CALL)]


def result_of(sched, spec):
    entry = sched.objects.get(object_id_for_return(spec[P.SPEC_TASK_ID], 0))
    return deserialize_inline(entry.data)


def delivered(spec, value):
    return [(object_id_for_return(spec[P.SPEC_TASK_ID], 0), serialize(value).to_bytes(), b"")]


def test_a_registered_call_a_dead_process_owed_waits_for_its_callers_word(sched):
    """The caller may have had the result: the call is neither failed nor run again until
    it says; its call through the scheduler waits behind it, on the next process too."""
    actor_id, process = start_actor(sched)
    driver = sched.driver
    direct, routed = call(), call()
    deliver(sched, driver, P.DIRECT_CALL, actor_id, process.pid, direct)
    deliver(sched, driver, P.ACTOR_CALL, actor_id, routed)
    assert calls_received(process) == []  # behind the direct call
    sched.on_disconnect(process)
    restarted = process_of(sched, actor_id)
    assert calls_received(restarted) == [] and not sched.tasks.get(direct[0]).finished
    deliver(sched, driver, P.CALLER_DONE, direct[0], delivered(direct, 41), actor_id)
    assert result_of(sched, direct) == 41
    assert calls_received(restarted) == [routed[0]]


@pytest.mark.parametrize("word_first", [False, True], ids=["death-first", "word-first"])
def test_calls_the_caller_never_had_answered_run_again_first_in_its_line(sched, word_first):
    actor_id, process = start_actor(sched, max_task_retries=1)
    driver = sched.driver
    direct, routed = call(retries=1), call(retries=1)
    deliver(sched, driver, P.DIRECT_CALL, actor_id, process.pid, direct)
    deliver(sched, driver, P.ACTOR_CALL, actor_id, routed)
    if word_first:  # its channel ended before we saw the process die
        deliver(sched, driver, P.CALLS_LOST, actor_id, process.pid, [direct[0]])
    sched.on_disconnect(process)
    if not word_first:
        deliver(sched, driver, P.CALLS_LOST, actor_id, process.pid, [direct[0]])
    restarted = process_of(sched, actor_id)
    assert calls_received(restarted) == [direct[0], routed[0]]


def test_without_retries_a_call_the_caller_never_had_answered_fails(sched):
    actor_id, process = start_actor(sched, max_restarts=0)
    direct = call()
    deliver(sched, sched.driver, P.DIRECT_CALL, actor_id, process.pid, direct)
    sched.on_disconnect(process)
    assert not sched.tasks.get(direct[0]).finished
    deliver(sched, sched.driver, P.CALLS_LOST, actor_id, process.pid, [direct[0]])
    with pytest.raises(exceptions.ActorDiedError):
        raise result_of(sched, direct)


def test_a_second_death_keeps_the_calls_still_waiting_for_their_callers_word(sched):
    actor_id, process = start_actor(sched, max_restarts=2, max_task_retries=1)
    driver = sched.driver
    direct, routed = call(retries=1), call(retries=1)
    deliver(sched, driver, P.DIRECT_CALL, actor_id, process.pid, direct)
    deliver(sched, driver, P.ACTOR_CALL, actor_id, routed)
    sched.on_disconnect(process)
    second = process_of(sched, actor_id)
    sched.on_disconnect(second)  # before the caller had its say
    third = process_of(sched, actor_id)
    assert calls_received(third) == []
    deliver(sched, driver, P.CALLS_LOST, actor_id, process.pid, [direct[0]])
    assert calls_received(third) == [direct[0], routed[0]]


def test_a_reply_the_dead_process_parked_finishes_its_call(sched):
    actor_id, process = start_actor(sched, max_task_retries=1)
    direct = call(retries=1)
    deliver(sched, sched.driver, P.DIRECT_CALL, actor_id, process.pid, direct)
    pickler = _slot.parking_pickler(process.park_slot)
    _slot.park_report(process.park_slot, pickler, _slot.PARKED_START,
                  P.result(direct[0], delivered(direct, 7), [], 0.0, False))
    sched.on_disconnect(process)
    assert result_of(sched, direct) == 7  # not run again: it ran


def test_the_result_of_a_call_cancelled_while_it_waited_still_frees_the_line(sched):
    actor_id, process = start_actor(sched)
    driver = sched.driver
    direct, routed = call(), call()
    deliver(sched, driver, P.DIRECT_CALL, actor_id, process.pid, direct)
    deliver(sched, driver, P.ACTOR_CALL, actor_id, routed)
    sched.on_disconnect(process)
    deliver(sched, driver, P.CANCEL, direct[0], False, False)
    restarted = process_of(sched, actor_id)
    deliver(sched, driver, P.CALLER_DONE, direct[0], delivered(direct, 1), actor_id)
    assert calls_received(restarted) == [routed[0]]


def test_a_caller_that_dies_owing_a_registered_result_leaves_owner_died(sched):
    actor_id, process = start_actor(sched)
    worker = sched.pool.start_worker()
    direct = call()
    deliver(sched, worker, P.DIRECT_CALL, actor_id, process.pid, direct)
    result_id = object_id_for_return(direct[0], 0)
    deliver(sched, sched.driver, P.HOLD, [result_id])  # a ref the worker passed on
    sched.on_disconnect(worker)
    with pytest.raises(exceptions.OwnerDiedError):
        raise result_of(sched, direct)
