"""``shmray.util.state.common``: as ``ray.util.state.common``, what a row of each state
listing holds: its columns, which of them a listing shows without ``detail``, which a filter
may name, and the row classes (``TaskState``, ``ActorState``, ...) the listings return.

Runs in: any process that asks about a session.

Ray's rows are dataclasses that also answer ``row["state"]``; programs use both spellings,
and print or ``json.dumps`` the rows.  A row here is a dict whose columns are also its
attributes: ``task.state`` and ``task["state"]`` read the same value, and the row is JSON as
it is.  Columns follow Ray's names and order; shmray's own additions (``waiting_for`` on
tasks, ``where`` and ``spilled`` on objects, ``state``/``task_id``/``actor_id`` on workers)
come last and only with ``detail=True``, so a listing without it has Ray's columns exactly.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Set

# Ray's default page size and the most one listing returns (RAY_MAX_LIMIT_FROM_API_SERVER).
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
DEFAULT_RPC_TIMEOUT = 30


class Column(NamedTuple):
    name: str
    detail: bool = False       # shown only with detail=True (and by the get_* functions)
    filterable: bool = True
    kind: Optional[type] = None  # int or bool: a filter's string value is converted to it


def _c(name, detail=False, filterable=True, kind=None) -> Column:
    return Column(name, detail, filterable, kind)


class StateSchema(dict):
    """A row of a state listing: a dict whose columns are also attributes."""

    __slots__ = ()
    COLUMNS: tuple = ()
    ID_COLUMN = ""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"{type(self).__name__} has no column {name!r}; its columns: "
                f"{', '.join(self)}") from None

    def asdict(self) -> dict:
        return dict(self)

    @classmethod
    def list_columns(cls, detail: bool = True) -> List[str]:
        return [c.name for c in cls.COLUMNS if detail or not c.detail]

    @classmethod
    def columns(cls) -> Set[str]:
        return set(cls.list_columns())

    @classmethod
    def base_columns(cls) -> Set[str]:
        return set(cls.list_columns(detail=False))

    @classmethod
    def detail_columns(cls) -> Set[str]:
        return set(cls.list_columns(detail=True))

    @classmethod
    def filterable_columns(cls) -> Set[str]:
        return {c.name for c in cls.COLUMNS if c.filterable}

    @classmethod
    def from_answer(cls, answer: dict, detail: bool) -> "StateSchema":
        """The row for one of the scheduler's answers: the listing's columns, in order, a
        column the answer lacks as None (as Ray fills a column its source lacks)."""
        return cls((name, answer.get(name)) for name in cls.list_columns(detail))


class TaskState(StateSchema):
    """One attempt of a task, an actor call or an actor's creation."""

    __slots__ = ()
    ID_COLUMN = "task_id"
    COLUMNS = (
        _c("task_id"), _c("attempt_number", kind=int), _c("name"), _c("state"), _c("job_id"),
        _c("actor_id"), _c("type"), _c("func_or_class_name"), _c("parent_task_id"),
        _c("node_id"), _c("worker_id"), _c("worker_pid", kind=int), _c("error_type"),
        _c("language", detail=True), _c("required_resources", True, False),
        _c("placement_group_id", detail=True), _c("creation_time_ms", True, False),
        _c("start_time_ms", True, False), _c("end_time_ms", True, False),
        _c("error_message", True, False),
        # shmray's: what a pending task waits for, in words
        _c("waiting_for", True, False),
    )


class ActorState(StateSchema):
    """An actor, alive, pending, restarting or dead."""

    __slots__ = ()
    ID_COLUMN = "actor_id"
    COLUMNS = (
        _c("actor_id"), _c("class_name"), _c("state"), _c("job_id"), _c("name"),
        _c("node_id"), _c("pid", kind=int), _c("ray_namespace"),
        _c("required_resources", True, False), _c("death_cause", True, False),
        _c("is_detached", True, False, bool), _c("placement_group_id", detail=True),
        _c("repr_name", detail=True), _c("num_restarts", True, False, int),
    )


class ObjectState(StateSchema):
    """One process's reference to an object (an object held by three processes is three
    rows, as in Ray)."""

    __slots__ = ()
    ID_COLUMN = "object_id"
    COLUMNS = (
        _c("object_id"), _c("object_size", kind=int), _c("task_status"),
        _c("reference_type"), _c("call_site"), _c("type"), _c("pid", kind=int), _c("ip"),
        # shmray's: the node, and where the bytes are ("inline", "arena", "spilled")
        _c("node_id", detail=True), _c("where", detail=True),
        _c("spilled", detail=True, kind=bool),
    )


class WorkerState(StateSchema):
    """A process of the session: the driver, a worker, an actor, the scheduler."""

    __slots__ = ()
    ID_COLUMN = "worker_id"
    COLUMNS = (
        _c("worker_id"), _c("is_alive", kind=bool), _c("worker_type"), _c("exit_type"),
        _c("node_id"), _c("ip"), _c("pid", kind=int), _c("exit_detail", True, False),
        _c("start_time_ms", True, False),
        # shmray's: IDLE, BUSY, LEASED or BLOCKED, and what it runs
        _c("state", detail=True), _c("task_id", detail=True), _c("actor_id", detail=True),
    )


class NodeState(StateSchema):
    """The one node: this machine."""

    __slots__ = ()
    ID_COLUMN = "node_id"
    COLUMNS = (
        _c("node_id"), _c("node_ip"), _c("is_head_node", kind=bool), _c("state"),
        _c("state_message", filterable=False), _c("node_name"),
        _c("resources_total", filterable=False), _c("labels", filterable=False),
        _c("start_time_ms", True, False), _c("end_time_ms", True, False),
    )


# What each listing is called in a request to the scheduler, and its row class.
SCHEMAS: Dict[str, type] = {
    "tasks": TaskState,
    "actors": ActorState,
    "objects": ObjectState,
    "workers": WorkerState,
    "nodes": NodeState,
}

# The states a task or actor may be in, as Ray names them (for summaries and the CLI).
TASK_STATES = (
    "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER",
    "PENDING_ACTOR_TASK_ORDERING_OR_CONCURRENCY", "RUNNING", "FINISHED", "FAILED")
ACTOR_STATES = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "ALIVE", "RESTARTING", "DEAD")

__all__ = ["ActorState", "NodeState", "ObjectState", "StateSchema", "TaskState",
           "WorkerState"]
