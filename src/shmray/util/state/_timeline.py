"""``shmray.timeline()``: where the time went, as Chrome trace events (Ray's format; opens in
Perfetto and chrome://tracing).

Runs in: the driver, tasks and actors (``timeline``); the ``shmray timeline`` command
(``session_trace``, attaching to a running session).

Built from the scheduler's task rows, asked with their object transfers
({"what": "tasks", "with_transfers": True}).  The layout is Ray's: the node is one trace
process ("Node 127.0.0.1"), each worker or actor process one lane (thread) in it, named by
metadata events ("ph": "M"), so the lanes read "worker 4242" and "actor Counter 4243".  Each
task, actor call or actor creation that started is one complete event ("ph": "X": ``ts`` and
``dur`` in microseconds) named by the task, with its id in ``args``; one still running lasts
until now.  Spills and restores (rows of type SPILL and RESTORE) get their own lane, since
their cost is the store's, not a task's.
"""

from __future__ import annotations

import json
import time
from typing import List, Optional

from ... import _context
from ._source import fetch

REQUEST = {"what": "tasks", "with_transfers": True}
NODE_PID = 0
TRANSFER_TID = 0  # no process has pid 0: the spill/restore lane's own
TRANSFERS = ("SPILL", "RESTORE")
_CATEGORY = {"NORMAL_TASK": "task", "ACTOR_TASK": "actor_task",
             "ACTOR_CREATION_TASK": "actor_creation_task", "SPILL": "spill",
             "RESTORE": "restore"}
# Names from Chrome's trace viewer colour scheme, as Ray's timeline uses them.
_COLOR = {"task": "rail_response", "actor_task": "rail_load",
          "actor_creation_task": "startup", "spill": "bad", "restore": "good"}
_ARGS = ("task_id", "attempt_number", "func_or_class_name", "actor_id", "state",
         "error_type", "object_id", "object_size", "worker_pid")


def _lane_name(row: dict) -> str:
    pid = row["worker_pid"]
    if row.get("type") in ("ACTOR_TASK", "ACTOR_CREATION_TASK"):
        class_name = str(row.get("func_or_class_name") or "").split(".")[0]
        return f"actor {class_name} {pid}" if class_name else f"actor {pid}"
    return f"worker {pid}"


def chrome_trace(rows: List[dict], now_ms: Optional[float] = None) -> List[dict]:
    """Trace events for the task rows: lane names first, then one event per row that
    started, in time order."""
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    lanes = {}
    events = []
    for row in rows:
        start = row.get("start_time_ms")
        kind = row.get("type")
        transfer = kind in TRANSFERS
        if start is None or (row.get("worker_pid") is None and not transfer):
            continue  # never ran: no time to show
        if transfer:
            tid = TRANSFER_TID
            lanes.setdefault(tid, "spill / restore")
        else:
            tid = row["worker_pid"]
            lanes.setdefault(tid, _lane_name(row))
        end = row.get("end_time_ms")
        category = _CATEGORY.get(kind, "task")
        color = _COLOR[category]
        if end is None:
            end, color = max(now_ms, start), "thread_state_running"
        elif row.get("state") == "FAILED":
            color = "terrible"
        events.append({
            "cat": category,
            "name": row.get("name") or row.get("func_or_class_name") or category,
            "pid": NODE_PID,
            "tid": tid,
            "ts": int(start * 1000),
            "dur": max(0, int((end - start) * 1000)),
            "ph": "X",
            "cname": color,
            "args": {key: row[key] for key in _ARGS if row.get(key) is not None},
        })
    events.sort(key=lambda event: (event["ts"], event["tid"]))
    names = [{"name": "process_name", "ph": "M", "pid": NODE_PID,
              "args": {"name": "Node 127.0.0.1"}}]
    names += [{"name": "thread_name", "ph": "M", "pid": NODE_PID, "tid": tid,
               "args": {"name": name}} for tid, name in sorted(lanes.items())]
    return names + events


def session_trace(address: Optional[str] = None) -> List[dict]:
    """The trace of a session: this process's, or the one ``address`` names."""
    return chrome_trace(fetch(REQUEST, address))


def timeline(filename: Optional[str] = None) -> Optional[List[dict]]:
    """The session's tasks and actor calls as Chrome trace events: returned as a list, or
    written to ``filename`` as JSON (then None is returned), as ``ray.timeline``.  Load the
    file in https://ui.perfetto.dev or chrome://tracing."""
    if _context.runtime is None:
        raise RuntimeError(
            "shmray.timeline() shows this process's session, and it is in none: call "
            "shmray.init() first (from another terminal, `shmray timeline -o FILE` takes "
            "the trace of a running session)")
    events = session_trace()
    if filename is None:
        return events
    with open(filename, "w") as out:
        json.dump(events, out)
    return None
