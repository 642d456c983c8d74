"""shmray.util.state against rows built by hand: Ray's columns, filters, limit, detail, get
and summaries; where the rows come from (this process's session, or attaching to one); and
the timeline's trace events."""

import json

import pytest
from state_rows import (
    ACTOR_PID,
    BIG,
    T0,
    W1,
    W2,
    FakeRuntime,
    FakeTransport,
    outside_a_session,
)

import shmray
from shmray.util import state
from shmray.util.state import _source
from shmray.util.state._timeline import chrome_trace
from shmray.util.state.common import ActorState, ObjectState, TaskState, WorkerState
from shmray.util.state.exception import InvalidStateQuery, RayStateApiException


@pytest.fixture
def session(monkeypatch):
    return outside_a_session(monkeypatch)


# -- listings -------------------------------------------------------------------------------


def test_a_listing_has_rays_default_columns_sorted_by_id(session):
    tasks = state.list_tasks()
    assert [list(t) for t in tasks] == [TaskState.list_columns(detail=False)] * len(tasks)
    assert "waiting_for" not in tasks[0] and "start_time_ms" not in tasks[0]
    assert [t["task_id"] for t in tasks] == sorted(t["task_id"] for t in tasks)
    assert len(tasks) == 9 and isinstance(tasks[0], TaskState)
    actors = state.list_actors()
    assert list(actors[0]) == ActorState.list_columns(detail=False)
    assert [a.actor_id for a in actors] == ["a" * 32, "b" * 32, "c" * 32]


def test_detail_adds_every_column_and_shmrays_own(session):
    tasks = state.list_tasks(detail=True)
    assert list(tasks[0]) == TaskState.list_columns(detail=True)
    pending = [t for t in tasks if t.state == "PENDING_NODE_ASSIGNMENT"]
    assert pending[0].waiting_for.startswith("needs {'GPU': 1.0}")
    workers = state.list_workers(detail=True)
    assert list(workers[0]) == WorkerState.list_columns(detail=True)
    assert {w.pid: w.state for w in workers}[W2] == "IDLE"
    objects = state.list_objects(detail=True)
    assert {o.object_id: o.where for o in objects}[BIG] == "arena"


def test_a_row_reads_as_a_dict_and_by_attribute_and_is_json(session):
    task = state.list_tasks(filters=[("name", "=", "needs_gpu")])[0]
    assert task.state == task["state"] == "PENDING_NODE_ASSIGNMENT"
    assert task.get("worker_pid") is None and task.asdict() == dict(task)
    assert json.loads(json.dumps(task))["name"] == "needs_gpu"
    with pytest.raises(AttributeError, match="no column 'events'.*task_id"):
        task.events


def test_filters_match_strings_case_insensitively(session):
    running = state.list_tasks(filters=[("state", "=", "running")])
    assert sorted(t.name for t in running) == ["Counter.incr", "square"]
    not_finished = state.list_tasks(filters=[("STATE", "!=", "Finished")])
    assert {t.state for t in not_finished} == {"RUNNING", "FAILED", "PENDING_NODE_ASSIGNMENT"}
    both = state.list_tasks(filters=[("state", "=", "RUNNING"), ("type", "=", "actor_task")])
    assert [t.name for t in both] == ["Counter.incr"]


def test_filter_values_are_converted_to_their_columns_type(session):
    assert {t.worker_pid for t in state.list_tasks(filters=[("worker_pid", "=", str(W2))])} \
        == {W2}
    assert len(state.list_tasks(filters=[("worker_pid", "=", ACTOR_PID)])) == 3
    assert [a.state for a in state.list_actors(filters=[("pid", "!=", str(ACTOR_PID))])] == [
        "PENDING_CREATION", "DEAD"]
    assert len(state.list_workers(filters=[("is_alive", "=", "true")])) == 4
    assert state.list_workers(filters=[("is_alive", "=", "0")]) == []
    assert len(state.list_objects(filters=[("spilled", "=", "True")])) == 1
    assert len(state.list_tasks(filters=[("attempt_number", "=", "1")])) == 1


@pytest.mark.parametrize("filters, message", [
    ([("colour", "=", "red")], "filter column 'colour' is not supported.*state.*task_id"),
    ([("waiting_for", "=", "x")], "filter column 'waiting_for' is not supported"),
    ([("state", "~", "RUNNING")], "Unsupported filter predicate '~'.*=, !="),
    ([("state", "RUNNING")], "incorrect input type.*\\(key, predicate, value\\)"),
    (["state=RUNNING"], "incorrect input type"),
    ("state=RUNNING", "must be a list of \\(key, predicate, value\\)"),
    ([("worker_pid", "=", "many")], "worker_pid many.*int type column"),
])
def test_a_bad_filter_is_an_error_naming_it(session, filters, message):
    with pytest.raises(InvalidStateQuery, match=message) as raised:
        state.list_tasks(filters=filters)
    assert isinstance(raised.value, ValueError)  # as Ray raises for some, and
    assert isinstance(raised.value, RayStateApiException)  # as it raises for the others
    assert session.asked == []  # checked before asking the session


def test_a_bad_boolean_filter_says_what_would_do(session):
    with pytest.raises(ValueError, match="is_alive maybe.*True\\|true\\|1"):
        state.list_workers(filters=[("is_alive", "=", "maybe")])


def test_limit_cuts_the_sorted_listing(session):
    tasks = state.list_tasks()
    assert state.list_tasks(limit=3) == tasks[:3]
    assert state.list_tasks(limit=0) == []
    for bad in (-1, 1.5, "3", True, 10_001):
        with pytest.raises(InvalidStateQuery, match="limit"):
            state.list_tasks(limit=bad)
    with pytest.raises(InvalidStateQuery, match="timeout"):
        state.list_tasks(timeout=0)


def test_the_default_limit_is_rays_100(monkeypatch):
    many = [{"task_id": f"{n:048x}", "state": "FINISHED"} for n in range(150)]
    monkeypatch.setattr(shmray._context, "runtime", FakeRuntime(lambda request: many))
    assert len(state.list_tasks()) == 100
    assert len(state.list_tasks(limit=1000)) == 150


def test_explain_warns_when_the_limit_cut_rows(session):
    with pytest.warns(UserWarning, match="Limit last 2 entries \\(Total 9\\)"):
        state.list_tasks(limit=2, _explain=True)


# -- get ------------------------------------------------------------------------------------


def test_get_task_by_hex_id_or_ref(session):
    task = state.get_task(f"{3:048X}")  # ids match whatever their case
    assert isinstance(task, TaskState) and task.name == "square"
    assert task.start_time_ms == T0 + 10 and "error_message" in task  # every column

    class Ref:
        def task_id(self):
            return bytes.fromhex(f"{7:048x}")

    assert state.get_task(Ref()).name == "Counter.incr"
    assert state.get_task("f" * 48) is None
    with pytest.raises(InvalidStateQuery, match="task_id must be a hex string"):
        state.get_task(12)


def test_get_task_of_a_retried_task_is_its_attempts(session):
    attempts = state.get_task(f"{4:048x}")
    assert [(a.attempt_number, a.state) for a in attempts] == [(0, "FAILED"), (1, "FINISHED")]
    assert attempts[0].error_type == "TASK_EXECUTION_EXCEPTION"


def test_get_one_of_the_others(session):
    assert state.get_actor("b" * 32).death_cause == "killed by ray.kill"
    assert state.get_actor("9" * 32) is None
    assert state.get_worker(f"{W1:056x}").state == "BUSY"
    assert state.get_node("ab" * 28).resources_total == {"CPU": 2.0}
    held = state.get_objects(BIG)
    assert sorted(o.reference_type for o in held) == ["LOCAL_REFERENCE", "PINNED_IN_MEMORY"]
    assert isinstance(held[0], ObjectState) and held[0].where == "arena"
    assert state.get_objects("0" * 56) == []


# -- summaries ------------------------------------------------------------------------------


def test_summarize_tasks_in_rays_shape(session):
    assert state.summarize_tasks() == {"cluster": {
        "summary": {
            "square": {"func_or_class_name": "square", "type": "NORMAL_TASK",
                       "state_counts": {"FINISHED": 2, "RUNNING": 1}},
            "flaky": {"func_or_class_name": "flaky", "type": "NORMAL_TASK",
                      "state_counts": {"FAILED": 1, "FINISHED": 1}},
            "needs_gpu": {"func_or_class_name": "needs_gpu", "type": "NORMAL_TASK",
                          "state_counts": {"PENDING_NODE_ASSIGNMENT": 1}},
            "Counter.__init__": {"func_or_class_name": "Counter.__init__",
                                 "type": "ACTOR_CREATION_TASK",
                                 "state_counts": {"FINISHED": 1}},
            "Counter.incr": {"func_or_class_name": "Counter.incr", "type": "ACTOR_TASK",
                             "state_counts": {"FINISHED": 1, "RUNNING": 1}},
        },
        "total_tasks": 6, "total_actor_tasks": 2, "total_actor_scheduled": 1,
        "summary_by": "func_name"}}


def test_summarize_actors_in_rays_shape(session):
    assert state.summarize_actors() == {"cluster": {
        "summary": {
            "Counter": {"class_name": "Counter", "state_counts": {"ALIVE": 1, "DEAD": 1}},
            "Sink": {"class_name": "Sink", "state_counts": {"PENDING_CREATION": 1}}},
        "total_actors": 3, "summary_by": "class"}}


def test_summarize_objects_in_rays_shape(session):
    cluster = state.summarize_objects()["cluster"]
    assert cluster["summary_by"] == "callsite" and cluster["callsite_enabled"] is False
    assert cluster["total_objects"] == 5  # one per holder, as Ray counts
    assert cluster["total_size_mb"] == pytest.approx(8 + 8 + 1 + 4 + 100 / 2**20)
    group = cluster["summary"]["disabled"]
    assert group["total_num_workers"] == 2 and group["total_num_nodes"] == 1
    assert group["ref_type_counts"] == {"LOCAL_REFERENCE": 3, "PINNED_IN_MEMORY": 1,
                                        "USED_BY_PENDING_TASK": 1}
    assert group["task_state_counts"] == {"NIL": 2, "FINISHED": 3}


# -- where the rows come from ---------------------------------------------------------------


def test_in_a_session_the_runtime_answers(monkeypatch):
    runtime = FakeRuntime()
    monkeypatch.setattr(shmray._context, "runtime", runtime)
    monkeypatch.setattr(_source, "transport", None)
    assert len(state.list_actors(address="auto")) == 3
    assert runtime.asked == [("state", {"what": "actors"})]


def test_outside_a_session_the_transport_attaches_to_the_named_one(session):
    state.list_nodes()
    state.summarize_tasks(address="session_other")
    assert session.asked == [({"what": "nodes"}, None), ({"what": "tasks"}, "session_other")]


def test_a_named_session_is_asked_through_the_transport_even_from_inside_one(monkeypatch):
    transport = outside_a_session(monkeypatch)
    monkeypatch.setattr(shmray._context, "runtime", FakeRuntime())
    state.list_nodes(address="session_other")
    assert transport.asked == [({"what": "nodes"}, "session_other")]


def test_a_session_without_answers_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shmray._context, "runtime", FakeRuntime(lambda request: None))
    with pytest.raises(RayStateApiException, match="does not answer state queries"):
        state.list_tasks()
    monkeypatch.setattr(shmray._context, "runtime",
                        FakeRuntime(lambda request: {"error": "unknown request 'tasks'"}))
    with pytest.raises(RayStateApiException, match="could not answer: unknown request"):
        state.summarize_tasks()


def test_the_transports_errors_reach_the_caller(monkeypatch):
    outside_a_session(monkeypatch, FakeTransport(error=ConnectionError("session ended")))
    with pytest.raises(ConnectionError, match="session ended"):
        state.list_workers()


# -- timeline -------------------------------------------------------------------------------


def _trace():
    from state_rows import tasks, transfers
    return chrome_trace(tasks() + transfers(), now_ms=T0 + 100)


def test_the_trace_names_one_lane_per_process():
    names = {e.get("tid"): e["args"]["name"] for e in _trace() if e["ph"] == "M"}
    assert names == {None: "Node 127.0.0.1", 0: "spill / restore", W1: f"worker {W1}",
                     W2: f"worker {W2}", ACTOR_PID: f"actor Counter {ACTOR_PID}"}
    assert _trace()[0]["name"] == "process_name"


def test_one_event_per_task_that_ran_in_microseconds():
    events = [e for e in _trace() if e["ph"] == "X"]
    assert len(events) == 9  # 8 task attempts started, 1 spill; the pending task is not
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    square = next(e for e in events if e["args"].get("task_id") == f"{3:048x}")
    assert square == {"cat": "task", "name": "square", "pid": 0, "tid": W1,
                      "ts": (T0 + 10) * 1000, "dur": 10_000, "ph": "X",
                      "cname": "rail_response",
                      "args": {"task_id": f"{3:048x}", "attempt_number": 0,
                               "func_or_class_name": "square", "state": "FINISHED",
                               "worker_pid": W1}}
    running = next(e for e in events if e["args"].get("task_id") == f"{8:048x}")
    assert running["cat"] == "actor_task" and running["dur"] == 60_000  # until now
    failed = next(e for e in events if e["args"].get("state") == "FAILED")
    assert failed["cname"] == "terrible" and failed["args"]["error_type"]
    spill = next(e for e in events if e["cat"] == "spill")
    assert spill["tid"] == 0 and spill["dur"] == 3000
    assert spill["args"] == {"object_id": "d" * 56, "object_size": 4 << 20,
                             "state": "FINISHED"}


def test_timeline_needs_a_session():
    with pytest.raises(RuntimeError, match="call shmray.init\\(\\) first"):
        shmray.timeline()


def test_timeline_returns_or_writes_the_events(monkeypatch, tmp_path):
    runtime = FakeRuntime()
    monkeypatch.setattr(shmray._context, "runtime", runtime)
    events = shmray.timeline()
    assert runtime.asked[-1] == ("state", {"what": "tasks", "with_transfers": True})
    assert sum(e["ph"] == "X" for e in events) == 9
    path = tmp_path / "trace.json"
    assert shmray.timeline(str(path)) is None
    written = json.loads(path.read_text())
    assert [e["name"] for e in written] == [e["name"] for e in events]
