"""The state API's answers in local mode (``init(local_mode=True)``).

Runs in: the driver of a local-mode session, the only process it has.

Every call runs in the driver, so its own task log (``_events``) holds all there is; the
rows have the shapes a session's scheduler gives (``_scheduler.state``), with one process:
the driver, which is every task's worker.
"""

from __future__ import annotations

import os
import time

from . import _events, _task_history
from ._task_history import NODE_ID, worker_id


def answer(runtime, request) -> object:
    """``runtime.query(("state", request))`` of a ``_local_mode.LocalRuntime``."""
    if not isinstance(request, dict) or not isinstance(request.get("what"), str):
        return {"error": "a request is a dict with a string 'what'"}
    pid = os.getpid()
    history = _history(runtime)
    what = request["what"]
    job_id = f"{runtime.options.get('job_id', 1):08x}"
    if what == "tasks":
        rows = history.rows(pid, job_id=job_id)
        if request.get("with_transfers"):
            rows += history.transfer_rows()
        return rows
    if what == "actors":
        return [_actor_row(actor, job_id) for actor in runtime.actors.table.values()]
    if what == "objects":
        return [{"object_id": object_id.hex(), "object_size": len(data) + len(metadata),
                 "task_status": "FINISHED", "call_site": "disabled", "ip": "127.0.0.1",
                 "node_id": NODE_ID, "where": "inline", "spilled": False,
                 "reference_type": "LOCAL_REFERENCE", "type": "DRIVER", "pid": pid}
                for object_id, (data, metadata, _) in list(runtime.objects.items())]
    if what == "workers":
        return [{"worker_id": worker_id(pid), "is_alive": True, "worker_type": "DRIVER",
                 "exit_type": None, "exit_detail": None, "node_id": NODE_ID,
                 "ip": "127.0.0.1", "pid": pid, "start_time_ms": None, "state": "BUSY",
                 "task_id": None, "actor_id": None}]
    if what == "nodes":
        return [{"node_id": NODE_ID, "node_ip": "127.0.0.1", "is_head_node": True,
                 "state": "ALIVE", "node_name": "127.0.0.1",
                 "resources_total": dict(runtime.total), "labels": {},
                 "start_time_ms": None}]
    if what == "session":
        return _session(runtime, pid)
    if what == "status":
        return _status(runtime, pid, history)
    return {"error": f"unknown request {what!r}: ask for one of tasks, actors, objects, "
                     "workers, nodes, status, session"}


def _history(runtime) -> _task_history.History:
    """The runtime's task history, up to date with its log (kept on the runtime)."""
    kept = getattr(runtime, "task_history", None)
    if kept is None:
        log = _events.log
        reader = _events.Reader(log.buf, log.capacity) if log is not None else None
        kept = runtime.task_history = (
            reader, _task_history.History(_events.history_limit(runtime.options)))
    reader, history = kept
    if reader is not None:
        history.take([(os.getpid(), True, reader.new())])
    return history


def _actor_row(actor, job_id: str) -> dict:
    options = actor.options
    return {"actor_id": actor.actor_id.hex(), "class_name": actor.class_name,
            "state": "DEAD" if actor.death is not None else "ALIVE", "job_id": job_id,
            "name": options.get("name") or "", "ray_namespace": options.get("namespace"),
            "pid": os.getpid(), "node_id": NODE_ID,
            "required_resources": dict(options.get("resources") or {}),
            "death_cause": None if actor.death is None else "the actor died",
            "is_detached": options.get("lifetime") == "detached", "num_restarts": 0,
            "repr_name": "", "placement_group_id": None, "pending_calls": 0}


def _session(runtime, pid: int) -> dict:
    return {"session_name": os.path.basename(runtime.session_dir),
            "session_dir": runtime.session_dir, "driver_pid": pid, "scheduler_pid": None,
            "start_time_ms": None, "num_cpus": runtime.options.get("num_cpus")}


def _status(runtime, pid: int, history: _task_history.History) -> dict:
    available = runtime.query("available")
    states = history.states(history.open_states())
    sizes = [len(data) + len(metadata) for data, metadata, _ in list(runtime.objects.values())]
    actors: dict = {}
    for actor in runtime.actors.table.values():
        state = "DEAD" if actor.death is not None else "ALIVE"
        actors[state] = actors.get(state, 0) + 1
    return {"session": _session(runtime, pid),
            "resources": {"total": dict(runtime.total),
                          "used": {name: amount - max(available.get(name, 0.0), 0.0)
                                   for name, amount in runtime.total.items()}},
            "workers": {"total": 0, "busy": 0, "idle": 0, "leased": 0, "blocked": 0},
            "actors": actors,
            "store": {"capacity": 0, "used": sum(sizes), "num_objects": len(sizes),
                      "object_bytes": sum(sizes), "spilled_objects": 0, "spilled_bytes": 0},
            "tasks": states, "pending": [], "stuck": [], "time_ms": int(time.time() * 1000)}
