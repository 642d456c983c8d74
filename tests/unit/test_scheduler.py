"""The scheduler's decisions, driven directly: no processes, a fake worker pool.

The handlers are called as the loop would call them; what the scheduler decided shows in the
messages it queued for each peer.  The store is real (a small arena), since freeing objects
is part of what is decided.
"""

import pickle

import pytest

from shmray import _protocol as P, _slot, exceptions
from shmray._connection import connection_pair
from shmray._ids import new_task_id, object_id_for_put, object_id_for_return
from shmray._object_store import ObjectStore
from shmray._resources import session_totals
from shmray._scheduler import Scheduler
from shmray._scheduler.workers import started
from shmray._serialization import META_ERROR, deserialize, serialize
from shmray._worker import ParkedReports

NO_SUCH_PID = 5_000_000  # above Linux's pid_max: signals to it can never hit a process


class FakePool:
    """Hands out connected socket pairs instead of forking workers."""

    def __init__(self):
        self.peers = []  # the worker-side ends, in spawn order
        self.next_pid = NO_SUCH_PID

    def spawn(self, scheduler, cancel_slot):
        ours, theirs = connection_pair("scheduler", "worker")
        self.peers.append(theirs)
        self.next_pid += 1
        return ours, self.next_pid


@pytest.fixture
def setup(tmp_path):
    store = ObjectStore(100 << 20)
    driver_end, scheduler_end = connection_pair("driver", "scheduler")
    pool = FakePool()
    options = {"num_cpus": 2, "resources": {"slot": 1}, "socket_dir": str(tmp_path)}
    options["total"] = session_totals(options, store.capacity)
    sched = Scheduler(scheduler_end, NO_SUCH_PID, store, str(tmp_path), options, pool.spawn)
    for _ in range(sched.pool.min_workers):
        sched.pool.start_worker()
    yield sched, sched.driver, pool
    sched.clients.selector.close()
    store.check()
    store.close()
    driver_end.close()
    for peer in pool.peers:
        peer.close()


def deliver(sched, client, opcode, *fields):
    """Hand the scheduler a message as its loop does: through its dispatch table."""
    sched.handlers[opcode](client, *fields)


def spec(fn_id=b"f" * 16, arg_ids=(), contained=(), num_returns=1, resources=None,
         max_retries=3, args=((), {})):
    return (new_task_id(), fn_id, "f", serialize(args).to_bytes(), list(arg_ids),
            list(contained), num_returns, resources or {"CPU": 1.0}, max_retries, False, None)


def sent(client, opcode):
    return [m for m in client.conn.pending if m[0] == opcode]


def executes(sched):
    return [(w, m) for w in sched.clients.workers() for m in sent(w, P.EXECUTE)]


def cancels_received(pool, sched, worker):
    """The CANCEL_CALLs the worker's end has received (the scheduler writes them at once)."""
    peer = pool.peers[sched.clients.workers().index(worker)]
    peer.sock.setblocking(False)
    peer.fill_nonblocking()
    return [m[1] for m in peer.recv_messages(block=False) if m[0] == P.CANCEL_CALL]


def take(client):
    messages, client.conn.pending = client.conn.pending, []
    return messages


def finish(sched, worker, task_id, value=1, metadata=b""):
    data = serialize(value, metadata).to_bytes()
    deliver(sched, worker, P.TASK_DONE, task_id, [(object_id_for_return(task_id, 0), data, metadata, [])],
                       False)


def test_ready_task_goes_to_an_idle_worker_and_result_to_its_owner(setup):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    s = spec()
    deliver(sched, driver, P.SUBMIT, s)
    sched.dispatch()
    ((worker, message),) = executes(sched)
    assert message[1] == s[0] and message[3] == b"code"  # the code travels with the first task
    assert sched.resources.available["CPU"] == 1.0
    take(worker)
    finish(sched, worker, s[0], value=42)
    (ready,) = sent(driver, P.READY)
    assert deserialize(memoryview(ready[2])) == 42
    assert sched.resources.available["CPU"] == 2.0 and worker in sched.pool.idle


def test_code_is_sent_once_per_worker(setup):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    code_sent = 0
    for _ in range(3):
        s = spec()
        deliver(sched, driver, P.SUBMIT, s)
        sched.dispatch()
        ((worker, message),) = executes(sched)
        code_sent += message[3] is not None
        take(worker)
        finish(sched, worker, s[0])
    assert code_sent == 1  # the same idle worker ran all three


def test_dependencies_wait_and_failures_propagate(setup):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    first = spec()
    deliver(sched, driver, P.SUBMIT, first)
    first_ref = object_id_for_return(first[0], 0)
    second = spec(arg_ids=[first_ref])
    third = spec(arg_ids=[object_id_for_return(second[0], 0)])
    deliver(sched, driver, P.SUBMIT, second)
    deliver(sched, driver, P.SUBMIT, third)
    sched.dispatch()
    ((worker, _),) = executes(sched)  # only the first can run
    take(worker)
    error = exceptions.RayTaskError("f", "tb", ValueError("root"))
    finish(sched, worker, first[0], value=error, metadata=META_ERROR)
    sched.dispatch()
    assert executes(sched) == []  # neither dependent ran...
    ready = {m[1]: m for m in sent(driver, P.READY)}
    for task in (second, third):  # ...both failed with the root error inside theirs
        message = ready[object_id_for_return(task[0], 0)]
        assert message[3] == META_ERROR
        error = deserialize(memoryview(message[2]))
        assert "At least one of the input arguments" in str(error)
        while isinstance(error, exceptions.RayTaskError):
            error = error.cause
        assert error.args == ("root",)


def test_objects_are_freed_when_the_last_holder_lets_go(setup):
    sched, driver, _ = setup
    inner = object_id_for_put()
    outer = object_id_for_put()
    deliver(sched, driver, P.PUT, inner, b"inner", b"", [])
    deliver(sched, driver, P.PUT, outer, b"outer", b"", [inner])  # outer contains a ref to inner
    deliver(sched, driver, P.RELEASE, [inner])
    assert inner in sched.objects  # still held by outer
    deliver(sched, driver, P.RELEASE, [outer])
    assert len(sched.objects) == 0


def test_arena_objects_are_deleted_from_the_store(setup):
    sched, driver, _ = setup
    object_id = object_id_for_put()
    sched.store.write_serialized(object_id, serialize(b"x" * 200_000))
    deliver(sched, driver, P.PUT, object_id, None, b"", [])
    deliver(sched, driver, P.RELEASE, [object_id])
    assert sched.store.contains(object_id) is None


def test_resources_limit_what_runs(setup):
    sched, driver, pool = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    tasks = [spec(resources={"CPU": 1.0, "slot": 1.0}) for _ in range(3)]
    for t in tasks:
        deliver(sched, driver, P.SUBMIT, t)
    sched.dispatch()
    assert len(executes(sched)) == 1  # one slot
    infeasible = spec(resources={"CPU": 3.0})
    deliver(sched, driver, P.SUBMIT, infeasible)
    (ready,) = [m for m in sent(driver, P.READY)
                if m[1] == object_id_for_return(infeasible[0], 0)]
    assert isinstance(deserialize(memoryview(ready[2])), exceptions.TaskUnschedulableError)


def test_a_blocked_worker_lends_its_cpu(setup):
    sched, driver, pool = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    for _ in range(3):
        deliver(sched, driver, P.SUBMIT, spec())
    sched.dispatch()
    running = [w for w, _ in executes(sched)]
    assert len(running) == 2 and sched.resources.available["CPU"] == 0
    deliver(sched, running[0], P.BLOCKED)
    sched.dispatch()
    assert len(executes(sched)) == 3  # a third worker was forked for the third task
    assert len(pool.peers) == 3
    deliver(sched, running[0], P.UNBLOCKED)
    assert sched.resources.available["CPU"] == -1.0  # oversubscribed until a task ends


def test_a_crashed_worker_is_replaced_and_its_task_retried(setup):
    sched, driver, pool = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    s = spec(max_retries=1)
    deliver(sched, driver, P.SUBMIT, s)
    sched.dispatch()
    ((worker, _),) = executes(sched)
    take(worker)
    sched.on_disconnect(worker)
    assert len(sched.clients.workers()) == 2  # refilled
    sched.dispatch()
    ((retry_worker, message),) = executes(sched)
    assert message[1] == s[0] and retry_worker is not worker
    take(retry_worker)
    sched.on_disconnect(retry_worker)  # no retries left now
    (ready,) = sent(driver, P.READY)
    error = deserialize(memoryview(ready[2]))
    assert isinstance(error, exceptions.WorkerCrashedError) and "f()" in str(error)


def test_cancel_of_a_queued_task(setup):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    blockers = [spec(), spec()]
    queued = spec()
    for t in blockers + [queued]:
        deliver(sched, driver, P.SUBMIT, t)
    sched.dispatch()
    deliver(sched, driver, P.CANCEL, queued[0], False, True)
    (ready,) = sent(driver, P.READY)
    assert isinstance(deserialize(memoryview(ready[2])), exceptions.TaskCancelledError)
    for worker, _ in executes(sched):
        take(worker)
    sched.dispatch()
    assert executes(sched) == []  # the cancelled task never runs


def test_unknown_argument_fails_the_task_without_crashing(setup):
    sched, driver, _ = setup
    s = spec(arg_ids=[object_id_for_put()])
    deliver(sched, driver, P.SUBMIT, s)
    (ready,) = sent(driver, P.READY)
    assert isinstance(deserialize(memoryview(ready[2])), exceptions.ObjectLostError)
    assert pickle.loads(pickle.dumps(sched.resources.available))  # still consistent


def _run_to_completion(sched, driver, fn_id, seconds):
    """Make the scheduler learn that fn_id takes ``seconds``."""
    s = spec(fn_id=fn_id)
    deliver(sched, driver, P.SUBMIT, s)
    sched.dispatch()
    ((worker, _),) = executes(sched)
    take(worker)
    worker.task.started_at -= seconds
    finish(sched, worker, s[0])


def test_short_tasks_are_sent_ahead_to_busy_workers(setup):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    _run_to_completion(sched, driver, b"f" * 16, 0.001)
    tasks = [spec() for _ in range(5)]
    for t in tasks:
        deliver(sched, driver, P.SUBMIT, t)
    sched.dispatch()
    assert len(executes(sched)) == 4  # two running, one sent ahead to each worker
    assert sorted(len(w.queued) for w in sched.clients.workers()) == [1, 1]
    assert sched.resources.available["CPU"] == 0  # tasks sent ahead hold nothing yet
    worker = sched.clients.workers()[0]
    head, ahead = worker.task, worker.queued[0]
    take(worker)
    finish(sched, worker, head.task_id)
    assert worker.task is ahead and sched.resources.available["CPU"] == 0  # it took over the CPU


@pytest.mark.parametrize("slowest, runs, depth", [(0.0001, 20, 15), (0.01, 20, 1),
                                                  (0.01, 60, 15)])
def test_very_short_tasks_are_sent_ahead_many_at_a_time_and_evenly(setup, slowest, runs,
                                                                   depth):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    _run_to_completion(sched, driver, b"f" * 16, slowest)
    for _ in range(runs):  # typically it takes 0.1 ms (one slow run keeps the depth at 1,
        _run_to_completion(sched, driver, b"f" * 16, 0.0001)  # until it is long past)
    for _ in range(32):
        deliver(sched, driver, P.SUBMIT, spec())
    sched.dispatch()
    assert [len(w.queued) for w in sched.clients.workers()] == [depth, depth]
    worker = sched.clients.workers()[0]
    (done,) = [m for m in take(worker) if m[0] == P.EXECUTE][:1]
    deliver(sched, worker, P.TASK_DONE, done[1], [], False, 0.0001)
    assert len(worker.queued) == depth - 1  # the next one it had runs now


def test_long_tasks_are_not_sent_ahead(setup):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    _run_to_completion(sched, driver, b"f" * 16, 1.0)
    for _ in range(4):
        deliver(sched, driver, P.SUBMIT, spec())
    sched.dispatch()
    assert len(executes(sched)) == 2  # only the two that run


def test_a_task_sent_ahead_can_be_cancelled_or_rerun(setup):
    sched, driver, pool = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    _run_to_completion(sched, driver, b"f" * 16, 0.001)
    tasks = [spec(max_retries=0) for _ in range(4)]
    for t in tasks:
        deliver(sched, driver, P.SUBMIT, t)
    sched.dispatch()
    first, second = sched.clients.workers()
    cancelled, rerun = first.queued[0], second.queued[0]
    take(driver)
    deliver(sched, driver, P.CANCEL, cancelled.task_id, False, True)
    # the worker will skip it
    assert cancels_received(pool, sched, first) == [cancelled.task_id]
    (ready,) = sent(driver, P.READY)
    assert isinstance(deserialize(memoryview(ready[2])), exceptions.TaskCancelledError)
    for w in (first, second):
        take(w)
    sched.on_disconnect(second)  # its running task fails (no retries); the one ahead reruns
    sched.dispatch()
    assert any(m[1] == rerun.task_id for _, m in executes(sched))
    assert not rerun.finished and rerun.retries_left == 0


def test_a_leased_workers_question_for_code_not_yet_registered_waits_for_it(setup):
    """The driver registers a function before it sends a task to its leased worker, but on
    another socket: the worker's question may be read first."""
    sched, driver, _ = setup
    worker = sched.clients.workers()[0]
    deliver(sched, worker, P.QUERY, 7, ("function", b"g" * 16))
    assert sent(worker, P.REPLY) == []
    deliver(sched, driver, P.REGISTER_FUNCTION, b"g" * 16, b"code", "g")
    assert sent(worker, P.REPLY) == [(P.REPLY, 7, b"code")]


def test_a_lease_request_stands_until_work_that_needs_the_cpu_has_run(setup):
    sched, driver, _ = setup
    deliver(sched, driver, P.LEASE_REQUEST, 1)
    [(_, granted)] = sent(driver, P.LEASE_GRANTED)
    assert sched.resources.available["CPU"] == 1.0
    take(driver)
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    task = spec(resources={"CPU": 2.0})  # needs the CPU the lease holds
    deliver(sched, driver, P.SUBMIT, task)
    sched.dispatch()
    assert sent(driver, P.LEASE_RECALL) == [(P.LEASE_RECALL, granted)]
    deliver(sched, driver, P.LEASE_REQUEST, 1)
    assert sent(driver, P.LEASE_GRANTED) == []  # it stands: the queued task goes first
    deliver(sched, driver, P.LEASE_RETURN, granted, [])
    sched.dispatch()
    sched.leases.grant()
    [(worker, execute)] = executes(sched)
    assert sched.resources.available["CPU"] == 0.0 and sent(driver, P.LEASE_GRANTED) == []
    deliver(sched, worker, P.TASK_DONE, execute[1], [(object_id_for_return(task[0], 0), b"x", b"", [])],
                       False, 0.001)
    sched.dispatch()
    sched.leases.grant()  # the request was still standing: met now
    assert len(sent(driver, P.LEASE_GRANTED)) == 1 and sched.resources.available["CPU"] == 1.0


def test_a_lease_is_lent_though_a_task_waits_for_what_leases_cannot_give(setup):
    """A task waiting for a resource no lease holds does not stop the driver's tasks."""
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    sched.resources.available["slot"] = 0.0  # as if an actor held it
    deliver(sched, driver, P.SUBMIT, spec(resources={"CPU": 1.0, "slot": 1.0}))
    sched.dispatch()
    deliver(sched, driver, P.LEASE_REQUEST, 2)
    assert len(sent(driver, P.LEASE_GRANTED)) == 2 and not sent(driver, P.LEASE_RECALL)


def _lease(sched, driver):
    """The worker the scheduler lends the driver."""
    deliver(sched, driver, P.LEASE_REQUEST, 1)
    [(_, pid)] = sent(driver, P.LEASE_GRANTED)
    take(driver)
    return next(w for w in sched.clients.workers() if w.pid == pid)


def _leased(sched, driver, **spec_options):
    """A task the driver sent straight to a worker it leases: (worker, task id)."""
    worker = _lease(sched, driver)
    task_spec = spec(**spec_options)
    deliver(sched, driver, P.DIRECT_SUBMIT, worker.pid, task_spec)
    return worker, task_spec[0]


@pytest.mark.parametrize("retries", [1, 0])
def test_a_dead_leased_workers_unreported_task_waits_for_its_drivers_word(setup, retries):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    worker, task_id = _leased(sched, driver, max_retries=retries)
    sched.on_disconnect(worker)
    assert sent(driver, P.LEASE_LOST) == [(P.LEASE_LOST, worker.pid)]
    deliver(sched, driver, P.CANCEL, task_id, False, False)  # must not decide for the driver either
    sched.dispatch()
    assert not executes(sched) and not sent(driver, P.READY)
    deliver(sched, driver, P.LEASE_VERDICT, worker.pid)  # nothing came back from it
    sched.dispatch()
    (ready,) = sent(driver, P.READY)
    assert isinstance(deserialize(memoryview(ready[2])), exceptions.TaskCancelledError)
    assert not executes(sched)


@pytest.mark.parametrize("retries", [1, 0])
def test_a_dead_leased_workers_task_is_retried_or_failed_on_its_drivers_word(setup, retries):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    worker, task_id = _leased(sched, driver, max_retries=retries)
    sched.on_disconnect(worker)
    deliver(sched, driver, P.LEASE_VERDICT, worker.pid)
    sched.dispatch()
    if retries:
        assert [m[1] for _, m in executes(sched)] == [task_id]
    else:
        (ready,) = sent(driver, P.READY)
        assert isinstance(deserialize(memoryview(ready[2])), exceptions.WorkerCrashedError)


@pytest.mark.parametrize("registered_first", [True, False])
def test_a_result_the_driver_saw_is_kept_though_its_worker_died(setup, registered_first):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    worker = _lease(sched, driver)
    pid = worker.pid
    task_spec = spec(max_retries=0)
    task_id = task_spec[0]
    if registered_first:
        deliver(sched, driver, P.DIRECT_SUBMIT, pid, task_spec)
    sched.on_disconnect(worker)
    if not registered_first:  # registration and report were still on their way
        deliver(sched, driver, P.DIRECT_SUBMIT, pid, task_spec)
    assert sent(driver, P.LEASE_LOST) == [(P.LEASE_LOST, pid)]
    data = serialize(42).to_bytes()
    result_id = object_id_for_return(task_id, 0)
    deliver(sched, driver, P.CALLER_DONE, task_id, [(result_id, data, b"")], None)
    deliver(sched, driver, P.LEASE_VERDICT, pid)
    sched.dispatch()
    assert sched.objects.get(result_id).data == data
    assert not sent(driver, P.READY) and not executes(sched)  # it has the value already
    assert not sched.leases.awaiting_verdict


def test_a_retry_sent_ahead_behind_a_new_task_is_not_taken_for_started(setup):
    """The slot still named the task's first attempt on that worker: cancel took the retry
    for a running task (and a crash would have charged it)."""
    sched, driver, pool = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    deliver(sched, driver, P.REGISTER_FUNCTION, b"L" * 16, b"code", "L")
    _run_to_completion(sched, driver, b"f" * 16, 0.001)
    deliver(sched, driver, P.SUBMIT, spec(fn_id=b"L" * 16))  # a long task holds the other CPU
    sched.dispatch()
    first = spec(max_retries=1)
    deliver(sched, driver, P.SUBMIT, first)
    sched.dispatch()
    (worker,) = [w for w in sched.clients.workers() if w.task and w.task.task_id == first[0]]
    worker.cancel_slot[_slot.SLOT_STARTED] = first[0]  # it ran the first attempt, then went idle
    other = spec()
    deliver(sched, driver, P.SUBMIT, other)  # read before the report: it goes first
    deliver(sched, worker, P.TASK_DONE, first[0], [], True, 0.001)  # a retryable failure
    for w in sched.clients.workers():
        take(w)
    sched.dispatch()
    assert worker.task.task_id == other[0] and [t.task_id for t in worker.queued] == [first[0]]
    assert [t.task_id for t in started(worker)] == [other[0]]
    deliver(sched, driver, P.CANCEL, first[0], False, False)
    assert cancels_received(pool, sched, worker) == [first[0]]  # not started: skipped
    assert worker.cancel_slot[_slot.SLOT_TARGET] != first[0]  # ...not interrupted


def test_replaying_parked_reports_of_a_dead_worker_gives_back_every_cpu(setup):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    _run_to_completion(sched, driver, b"f" * 16, 0.001)
    for _ in range(6):
        deliver(sched, driver, P.SUBMIT, spec(max_retries=0))
    sched.dispatch()
    worker = sched.clients.workers()[0]
    head, ahead = worker.task, worker.queued[0]
    deliver(sched, driver, P.CANCEL, ahead.task_id, False, False)  # not started: failed at once
    assert ahead.finished
    # It finished `head` (report parked), took `ahead` before the cancel came, and died.
    ParkedReports(worker.cancel_slot, frozenset()).park(
        (P.TASK_DONE, head.task_id, [], False, 0.001), [])
    worker.cancel_slot[24:48] = ahead.task_id
    sched.on_disconnect(worker)
    assert worker not in sched.pool.busy
    for _ in range(20):
        for w in sched.clients.workers():
            if w.task is not None:
                finish(sched, w, w.task.task_id)
        sched.dispatch()
    assert sched.resources.available["CPU"] == 2.0


def test_a_leased_tasks_child_and_wait_are_its_own_though_its_registration_comes_late(setup):
    """The driver's report of the previous task and registration of this one may arrive
    after this one, already running, has submitted a child and waited in get()."""
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    deliver(sched, driver, P.REGISTER_FUNCTION, b"p" * 16, b"code", "parent")
    worker, first = _leased(sched, driver)
    second = spec(fn_id=b"p" * 16)
    child = spec()
    deliver(sched, worker, P.SUBMIT, child, second[0])  # the worker names the task it runs
    deliver(sched, worker, P.BLOCKED, second[0])
    deliver(sched, driver, P.CALLER_DONE, first, [(object_id_for_return(first, 0),
                                          serialize(1).to_bytes(), b"")], None)
    deliver(sched, driver, P.DIRECT_SUBMIT, worker.pid, second)
    assert [c.task_id for c in sched.tasks.table[second[0]].children] == [child[0]]
    assert b"p" * 16 in sched.dispatcher.blocking_functions and b"f" * 16 not in sched.dispatcher.blocking_functions
    assert not worker.orphans and not worker.blocked_unknown


def test_of_a_dead_leased_workers_unanswered_tasks_only_the_one_it_started_is_charged(setup):
    """Those sent after it never started, those before it finished but their results died
    with it (none parked: too big to): they run again, without using a retry (max_retries=0
    here)."""
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    worker = _lease(sched, driver)
    specs = [spec(max_retries=0) for _ in range(3)]
    for task_spec in specs:
        deliver(sched, driver, P.DIRECT_SUBMIT, worker.pid, task_spec)
    worker.cancel_slot[_slot.SLOT_STARTED] = specs[1][0]  # it died in the second
    sched.on_disconnect(worker)
    assert sent(driver, P.LEASE_LOST) == [(P.LEASE_LOST, worker.pid)]
    deliver(sched, driver, P.LEASE_RETURN, worker.pid, [s[0] for s in specs])
    sched.dispatch()
    (ready,) = sent(driver, P.READY)
    assert ready[1] == object_id_for_return(specs[1][0], 0)
    assert isinstance(deserialize(memoryview(ready[2])), exceptions.WorkerCrashedError)
    assert sorted(m[1] for _, m in executes(sched)) == sorted([specs[0][0], specs[2][0]])


@pytest.mark.parametrize("death_first", [True, False])
def test_a_dead_leased_workers_tasks_with_parked_replies_finish_with_their_results(
        setup, death_first):
    """Replies it held back as it ran the next task, parked in its slot (the driver's own,
    a RESULT, and one for us, a DIRECT_DONE, as for a result holding a ref): those tasks
    finished, whether its death or the driver's word comes first; only the one it died in
    is charged, and the one after it never started."""
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    worker = _lease(sched, driver)
    specs = [spec(max_retries=0) for _ in range(4)]
    inner = object_id_for_put()
    deliver(sched, worker, P.PUT, inner, serialize(7).to_bytes(), b"", ())  # held by it alone
    values = [serialize(i).to_bytes() for i in range(2)]
    returns = [object_id_for_return(s[0], 0) for s in specs]
    parking = ParkedReports(worker.cancel_slot, frozenset())
    assert parking.park(P.result(specs[0][0], [(returns[0], values[0], b"")], [], 0.001,
                                 False), [])
    assert parking.park(P.direct_done(specs[1][0], [(returns[1], values[1], b"", [inner])],
                                      driver.pid, False), [])
    worker.cancel_slot[_slot.SLOT_STARTED] = specs[2][0]  # it died in the third
    if not death_first:  # the driver saw its channel end first
        for task_spec in specs:
            deliver(sched, driver, P.DIRECT_SUBMIT, worker.pid, task_spec)
        deliver(sched, driver, P.LEASE_RETURN, worker.pid, [s[0] for s in specs])
    sched.on_disconnect(worker)
    if death_first:
        for task_spec in specs:
            deliver(sched, driver, P.DIRECT_SUBMIT, worker.pid, task_spec)
        deliver(sched, driver, P.LEASE_RETURN, worker.pid, [s[0] for s in specs])
    deliver(sched, driver, P.SUBSCRIBE, returns)
    sched.dispatch()
    ready = {m[1]: m for m in sent(driver, P.READY)}
    assert deserialize(memoryview(ready[returns[0]][2])) == 0
    assert deserialize(memoryview(ready[returns[1]][2])) == 1
    assert sched.objects.entries[inner].ready  # the ref inside outlived its holder
    assert isinstance(deserialize(memoryview(ready[returns[2]][2])),
                      exceptions.WorkerCrashedError)
    assert returns[3] not in ready
    assert [m[1] for _, m in executes(sched)] == [specs[3][0]]


def test_tasks_a_leased_worker_hands_back_run_here_unless_cancelled(setup):
    sched, driver, _ = setup
    deliver(sched, driver, P.REGISTER_FUNCTION, b"f" * 16, b"code", "f")
    worker = _lease(sched, driver)
    kept, cancelled = spec(), spec()
    for task_spec in (kept, cancelled):
        deliver(sched, driver, P.DIRECT_SUBMIT, worker.pid, task_spec)
    deliver(sched, driver, P.CANCEL, cancelled[0], False, False)  # on its way to the worker...
    deliver(sched, driver, P.LEASE_HANDED_BACK, worker.pid, [kept[0], cancelled[0]])  # ...too late
    sched.dispatch()
    assert [m[1] for w, m in executes(sched) if w is not worker] == [kept[0]]
    (ready,) = sent(driver, P.READY)
    assert ready[1] == object_id_for_return(cancelled[0], 0)
    assert isinstance(deserialize(memoryview(ready[2])), exceptions.TaskCancelledError)
    assert not worker.direct
