"""Rows built by hand, shaped as the scheduler's ``State.answer`` gives them, and a fake
session that answers with them: what the state API and command line tests run against."""

import copy

import shmray
from shmray.util.state import _source

T0 = 1_700_000_000_000  # ms since the epoch
DRIVER, W1, W2, ACTOR_PID = 1000, 1001, 1002, 1003


def _task(n, name, state, *, type="NORMAL_TASK", pid=W1, start=None, end=None, attempt=0,
          actor_id=None, error_type=None, waiting_for=None):
    return {
        "task_id": f"{n:048x}", "attempt_number": attempt, "name": name, "state": state,
        "job_id": "01000000", "actor_id": actor_id, "type": type,
        "func_or_class_name": name, "parent_task_id": None, "node_id": "ab" * 28,
        "worker_id": None if start is None else f"{pid:056x}",
        "worker_pid": None if start is None else pid,
        "error_type": error_type, "error_message": "boom" if error_type else None,
        "required_resources": {"CPU": 1.0}, "creation_time_ms": T0 + n,
        "start_time_ms": start, "end_time_ms": end, "placement_group_id": None,
        "language": "PYTHON", "waiting_for": waiting_for,
    }


def tasks():
    actor = "c" * 32
    return [
        _task(3, "square", "FINISHED", start=T0 + 10, end=T0 + 20),
        _task(1, "square", "FINISHED", pid=W2, start=T0 + 12, end=T0 + 30),
        _task(2, "square", "RUNNING", start=T0 + 25),
        _task(4, "flaky", "FAILED", start=T0 + 5, end=T0 + 6,
              error_type="TASK_EXECUTION_EXCEPTION"),
        _task(4, "flaky", "FINISHED", start=T0 + 7, end=T0 + 9, attempt=1),
        _task(5, "needs_gpu", "PENDING_NODE_ASSIGNMENT",
              waiting_for="needs {'GPU': 1.0} but the session has {'GPU': 0.0}: " + "x" * 60),
        _task(6, "Counter.__init__", "FINISHED", type="ACTOR_CREATION_TASK", pid=ACTOR_PID,
              start=T0 + 1, end=T0 + 2, actor_id=actor),
        _task(7, "Counter.incr", "FINISHED", type="ACTOR_TASK", pid=ACTOR_PID,
              start=T0 + 3, end=T0 + 4, actor_id=actor),
        _task(8, "Counter.incr", "RUNNING", type="ACTOR_TASK", pid=ACTOR_PID, start=T0 + 40,
              actor_id=actor),
    ]


def transfers():
    return [{"task_id": None, "name": "spill", "type": "SPILL", "state": "FINISHED",
             "object_id": "d" * 56, "object_size": 4 << 20, "worker_pid": None,
             "start_time_ms": T0 + 50, "end_time_ms": T0 + 53}]


def actors():
    base = {"job_id": "01000000", "node_id": "ab" * 28, "ray_namespace": "anon",
            "required_resources": {}, "is_detached": False, "placement_group_id": None}
    return [
        {**base, "actor_id": "c" * 32, "class_name": "Counter", "state": "ALIVE", "name": "",
         "pid": ACTOR_PID, "death_cause": None, "num_restarts": 0, "repr_name": ""},
        {**base, "actor_id": "b" * 32, "class_name": "Counter", "state": "DEAD",
         "name": "gone", "pid": None, "death_cause": "killed by ray.kill", "num_restarts": 1,
         "repr_name": ""},
        {**base, "actor_id": "a" * 32, "class_name": "Sink", "state": "PENDING_CREATION",
         "name": "", "pid": None, "death_cause": None, "num_restarts": 0, "repr_name": ""},
    ]


def _object(oid, size, where, pid, kind, ref, status="FINISHED"):
    return {"object_id": oid, "object_size": size, "task_status": status,
            "reference_type": ref, "call_site": "disabled", "type": kind, "pid": pid,
            "ip": "127.0.0.1", "node_id": "ab" * 28, "where": where,
            "spilled": where == "spilled"}


BIG, MID, SMALL, SPILLED = "1" * 56, "2" * 56, "3" * 56, "4" * 56


def objects():
    return [
        _object(BIG, 8 << 20, "arena", DRIVER, "DRIVER", "LOCAL_REFERENCE", "NIL"),
        _object(BIG, 8 << 20, "arena", W1, "WORKER", "PINNED_IN_MEMORY", "NIL"),
        _object(MID, 1 << 20, "arena", DRIVER, "DRIVER", "USED_BY_PENDING_TASK"),
        _object(SMALL, 100, "inline", DRIVER, "DRIVER", "LOCAL_REFERENCE"),
        _object(SPILLED, 4 << 20, "spilled", DRIVER, "DRIVER", "LOCAL_REFERENCE"),
    ]


def workers():
    def one(pid, kind, state, task_id=None, alive=True):
        return {"worker_id": f"{pid:056x}", "is_alive": alive, "worker_type": kind,
                "exit_type": None, "exit_detail": None, "node_id": "ab" * 28,
                "ip": "127.0.0.1", "pid": pid, "start_time_ms": T0, "state": state,
                "task_id": task_id, "actor_id": None}
    return [one(DRIVER, "DRIVER", "BUSY"), one(W1, "WORKER", "BUSY", f"{2:048x}"),
            one(W2, "WORKER", "IDLE"), one(ACTOR_PID, "ACTOR", "BUSY", f"{8:048x}")]


def nodes():
    return [{"node_id": "ab" * 28, "node_ip": "127.0.0.1", "is_head_node": True,
             "state": "ALIVE", "node_name": "127.0.0.1", "resources_total": {"CPU": 2.0},
             "labels": {}, "start_time_ms": T0}]


def status():
    return {
        "session": {"session_name": "session_test", "session_dir": "/tmp/shmray/session_test",
                    "driver_pid": DRIVER, "scheduler_pid": 999, "start_time_ms": T0,
                    "num_cpus": 2},
        "resources": {"total": {"CPU": 2.0, "GPU": 0.0, "memory": 8 << 30},
                      "used": {"CPU": 1.5, "GPU": 0.0, "memory": 0}},
        "workers": {"total": 3, "busy": 2, "idle": 1, "leased": 0, "blocked": 0},
        "actors": {"ALIVE": 1, "PENDING_CREATION": 1, "DEAD": 1},
        "store": {"capacity": 150 << 20, "used": (9 << 20) + 4096, "num_objects": 2,
                  "spilled_bytes": 4 << 20, "spilled_objects": 1},
        "tasks": {"PENDING_NODE_ASSIGNMENT": 1, "RUNNING": 2, "FINISHED": 5, "FAILED": 1},
        "pending": [{"reason": "infeasible", "count": 1,
                     "text": "1 task needs a GPU and the session has none"}],
        "stuck": [{"task_id": f"{5:048x}", "name": "needs_gpu", "reason": "infeasible",
                   "text": "needs {'GPU': 1.0} but the session has {'CPU': 2.0, 'GPU': 0.0}: "
                           "start it with num_gpus=1 or ask for less"}],
    }


def session():
    return status()["session"]


ANSWERS = {"tasks": tasks, "actors": actors, "objects": objects, "workers": workers,
           "nodes": nodes, "status": status, "session": session}


def answer(request: dict):
    what = request.get("what")
    if what not in ANSWERS:
        return {"error": f"unknown request {what!r}"}
    rows = ANSWERS[what]()
    if what == "tasks" and request.get("with_transfers"):
        rows += transfers()
    return copy.deepcopy(rows)


class FakeTransport:
    """Stands in for ``shmray._inspect_client``: answers from the rows above, and records
    which session each request named."""

    def __init__(self, sessions=None, error=None):
        self.asked = []
        self.sessions = sessions if sessions is not None else [
            {"session_name": "session_test", "driver_pid": DRIVER}]
        self.error = error

    def fetch(self, request, session=None):
        self.asked.append((request, session))
        if self.error is not None:
            raise self.error
        return answer(request)

    def list_sessions(self):
        return self.sessions


class FakeRuntime:
    """Stands in for a session's runtime: answers ``query(("state", request))``."""

    def __init__(self, answers=answer):
        self.asked = []
        self.answers = answers

    def query(self, what):
        self.asked.append(what)
        assert what[0] == "state"
        return self.answers(what[1])


def outside_a_session(monkeypatch, transport=None):
    """This process in no session, attaching through ``transport`` (a FakeTransport)."""
    transport = transport or FakeTransport()
    monkeypatch.setattr(shmray._context, "runtime", None)
    monkeypatch.setattr(_source, "transport", transport)
    return transport
