"""``shmray.util.state.api``: as ``ray.util.state.api``, the state API's functions: list,
get and summarize the session's tasks, actors, objects, workers and nodes.

Runs in: the driver, tasks and actors (asking their own session), and any other process of
the same user (attaching to a running session: ``address`` names it, else the only one).

Each function asks the scheduler once (``_source.fetch``) and shapes the answer here:
filters, columns, order and limit as Ray's state server applies them (``_query``), summaries
in Ray's shapes (``_summary``).  The scheduler keeps a bounded history of finished tasks, so
a long session lists its newest tasks, not all it ever ran.

``timeout`` and ``raise_on_missing_output`` are Ray's parameters, accepted and checked: the
answer comes from this machine's scheduler, not from many nodes that may fail to reply.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Union

from ._query import check_filters, check_limit, check_timeout, select
from ._source import fetch
from ._summary import summarize_actor_rows, summarize_object_rows, summarize_task_rows
from .common import (
    DEFAULT_LIMIT,
    DEFAULT_RPC_TIMEOUT,
    SCHEMAS,
    ActorState,
    NodeState,
    ObjectState,
    TaskState,
    WorkerState,
)
from .exception import InvalidStateQuery, RayStateApiException


def _list(what: str, address, filters, limit, timeout, detail, _explain) -> list:
    schema = SCHEMAS[what]
    filters = check_filters(filters, schema)
    limit = check_limit(limit)
    check_timeout(timeout)
    answers = _rows(what, address)
    rows, matched = select(answers, schema, filters, bool(detail), limit)
    if _explain and matched > len(rows):
        warnings.warn(
            f"Limit last {len(rows)} entries (Total {matched}). Use `--filter` to reduce the "
            "amount of data to return or setting a higher limit with `--limit` to see all "
            "data.", stacklevel=3)
    return rows


def _rows(what: str, address) -> list:
    answers = fetch({"what": what}, address)
    if not isinstance(answers, list):
        raise RayStateApiException(
            f"the session answered {what!r} with a {type(answers).__name__}, not a list")
    return answers


def _get(what: str, id_column: str, id, address, timeout) -> list:
    check_timeout(timeout)
    if not isinstance(id, str):
        raise InvalidStateQuery(f"{id_column} must be a hex string, got {id!r}")
    schema = SCHEMAS[what]
    rows, _ = select(_rows(what, address), schema, [(id_column, "=", id)], True, None)
    return rows


def list_tasks(address: Optional[str] = None, filters: Optional[Sequence] = None,
               limit: int = DEFAULT_LIMIT, timeout: int = DEFAULT_RPC_TIMEOUT,
               detail: bool = False, raise_on_missing_output: bool = True,
               _explain: bool = False) -> List[TaskState]:
    """The session's tasks, actor calls and actor creations, one row per attempt
    (``TaskState``): ``filters`` [(column, "=" or "!=", value)], at most ``limit`` rows,
    all columns with ``detail``."""
    return _list("tasks", address, filters, limit, timeout, detail, _explain)


def list_actors(address: Optional[str] = None, filters: Optional[Sequence] = None,
                limit: int = DEFAULT_LIMIT, timeout: int = DEFAULT_RPC_TIMEOUT,
                detail: bool = False, raise_on_missing_output: bool = True,
                _explain: bool = False) -> List[ActorState]:
    """The session's actors, alive and dead (``ActorState``)."""
    return _list("actors", address, filters, limit, timeout, detail, _explain)


def list_objects(address: Optional[str] = None, filters: Optional[Sequence] = None,
                 limit: int = DEFAULT_LIMIT, timeout: int = DEFAULT_RPC_TIMEOUT,
                 detail: bool = False, raise_on_missing_output: bool = True,
                 _explain: bool = False) -> List[ObjectState]:
    """The objects processes hold, one row per (object, holding process)
    (``ObjectState``)."""
    return _list("objects", address, filters, limit, timeout, detail, _explain)


def list_workers(address: Optional[str] = None, filters: Optional[Sequence] = None,
                 limit: int = DEFAULT_LIMIT, timeout: int = DEFAULT_RPC_TIMEOUT,
                 detail: bool = False, raise_on_missing_output: bool = True,
                 _explain: bool = False) -> List[WorkerState]:
    """The session's processes: driver, workers, actors, scheduler (``WorkerState``)."""
    return _list("workers", address, filters, limit, timeout, detail, _explain)


def list_nodes(address: Optional[str] = None, filters: Optional[Sequence] = None,
               limit: int = DEFAULT_LIMIT, timeout: int = DEFAULT_RPC_TIMEOUT,
               detail: bool = False, raise_on_missing_output: bool = True,
               _explain: bool = False) -> List[NodeState]:
    """The one node, this machine (``NodeState``)."""
    return _list("nodes", address, filters, limit, timeout, detail, _explain)


def get_task(id, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
             _explain: bool = False) -> Union[None, TaskState, List[TaskState]]:
    """The task ``id`` (its hex id, or an ObjectRef it returned) with every column: None if
    the session does not know it, its row if it ran once, a list of rows (one per attempt)
    if it was retried."""
    if not isinstance(id, str) and hasattr(id, "task_id"):
        id = id.task_id().hex()  # an ObjectRef: the task that returned it
    rows = _get("tasks", "task_id", id, address, timeout)
    if not rows:
        return None
    rows.sort(key=lambda row: row.get("attempt_number") or 0)
    return rows[0] if len(rows) == 1 else rows


def get_actor(id: str, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
              _explain: bool = False) -> Optional[ActorState]:
    """The actor ``id`` (hex) with every column, or None."""
    rows = _get("actors", "actor_id", id, address, timeout)
    return rows[0] if rows else None


def get_objects(id: str, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
                _explain: bool = False) -> List[ObjectState]:
    """The rows of object ``id`` (hex), one per process that holds it; [] if none does."""
    return _get("objects", "object_id", id, address, timeout)


def get_worker(id: str, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
               _explain: bool = False) -> Optional[WorkerState]:
    """The worker ``id`` (hex) with every column, or None."""
    rows = _get("workers", "worker_id", id, address, timeout)
    return rows[0] if rows else None


def get_node(id: str, address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
             _explain: bool = False) -> Optional[NodeState]:
    """The node ``id`` (hex) with every column, or None."""
    rows = _get("nodes", "node_id", id, address, timeout)
    return rows[0] if rows else None


def summarize_tasks(address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
                    raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Tasks counted by function (or actor method) and state, as Ray's TaskSummaries under
    the key "cluster"."""
    check_timeout(timeout)
    return summarize_task_rows(_rows("tasks", address))


def summarize_actors(address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
                     raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Actors counted by class and state, as Ray's ActorSummaries under "cluster"."""
    check_timeout(timeout)
    return summarize_actor_rows(_rows("actors", address))


def summarize_objects(address: Optional[str] = None, timeout: int = DEFAULT_RPC_TIMEOUT,
                      raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Object references counted by call site, as Ray's ObjectSummaries under "cluster"."""
    check_timeout(timeout)
    return summarize_object_rows(_rows("objects", address))
