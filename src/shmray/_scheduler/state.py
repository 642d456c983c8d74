"""What is going on in the session, for whoever asks: the state API, ``shmray status``.

Runs in: the scheduler.  Asked through QUERY ("state", request) by the session's own
processes and through the inspection socket by the ``shmray`` command line, both answered
by ``State.answer``; answers are plain JSON-able data (ids as hex).

Nothing is kept up to date for this while nobody asks: an answer is put together when
asked, from the records the scheduler keeps anyway (its tables of tasks, actors, objects
and workers; the store's object table) and from the task events every process writes into
its own log in shared memory (``_events``).  Each answer reads only what the logs gained
since the last into the task history (``_task_history.History``, bounded), and a process's
log is read one last time when it ends, so what a worker did before ``max_calls`` ended it
or an actor before it died stays listed.  What nobody asked for in time is overwritten in
its log: each keeps its process's latest events.

Pending work is explained in words a user can act on (``Why``): what an argument waits for,
which resources a task needs and who holds them, an actor still starting; work that cannot
go on without the user's help is listed as stuck.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Dict, List, Optional

import psutil

from .. import _events, _protocol as P, _slot, _task_history
from .._task_history import NODE_ID, worker_id
from .actors import Actors
from .clients import Client, Clients
from .leases import Leases
from .objects import Directory, kind_of
from .records import Actor, Task
from .resources import Resources
from .tasks import Tasks

_ACTOR_STATES = {"pending": "PENDING_CREATION", "alive": "ALIVE", "dead": "DEAD"}
_PENDING = ("PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER",
            "PENDING_ACTOR_TASK_ORDERING_OR_CONCURRENCY")


class State:
    def __init__(self, clients: Clients, tasks: Tasks, actors: Actors, objects: Directory,
                 resources: Resources, leases: Leases, store,
                 options: dict, session_dir: str, driver_pid: int, driver_events=None):
        self.clients = clients
        self.leases = leases
        self.tasks = tasks
        self.actors = actors
        self.objects = objects
        self.resources = resources
        self.store = store
        self.options = options
        self.session_dir = session_dir
        self.driver_pid = driver_pid
        self.started = time.time()
        capacity = options["task_events"]
        # The logs, each read from where the last answer left it: the driver's (mapped
        # before our fork), ours, and each worker's and actor's (``_reader``).
        own = _events.start(_events.new_log(capacity), capacity)
        self.readers: Dict[int, _events.Reader] = {}
        if driver_events is not None:
            self.readers[driver_pid] = _events.Reader(driver_events, capacity)
        if own is not None:
            self.readers[os.getpid()] = _events.Reader(own.buf, capacity)
        self.unowned_logs = [reader.buf for reader in self.readers.values()]  # no client's
        self.history = _task_history.History(_events.history_limit(options))
        self.gone_counts = (0, 0, 0)  # ``_events.counts`` of the processes gone
        self.job_id = f"{options.get('job_id', 1):08x}"

    # -- the logs ----------------------------------------------------------------------------

    def process_gone(self, client: Client) -> None:
        """Read what a process that ended recorded last (its log goes with it)."""
        reader = self.readers.pop(client.pid, None) or self._reader(client)
        if reader is not None:
            self.gone_counts = _sum_counts(self.gone_counts, _events.counts(reader.buf))
            slot = _slot_of(client)
            self.history.take([(client.pid, False, reader.new())],
                              {client.pid: _slot.running(slot)} if slot is not None else None)
            self.history.process_ended(client.pid)

    def _reader(self, client: Client) -> Optional[_events.Reader]:
        log = _log_of(client)
        return _events.Reader(log, self.options["task_events"]) if log is not None else None

    def read_logs(self) -> None:
        """Take in what every process recorded since the last answer, and what the slots
        of those that log say they run now (read first: a task that ended after this
        read has its end in the log read after it)."""
        if not self.readers:
            return  # the session records nothing
        running = {}
        for client in self.clients.all():
            if not client.alive or client.kind == "driver":
                continue
            if client.pid not in self.readers:
                reader = self._reader(client)
                if reader is None:
                    continue
                self.readers[client.pid] = reader
            running[client.pid] = _slot.running(_slot_of(client))
        self.history.take([(pid, True, reader.new()) for pid, reader in self.readers.items()],
                          running)

    def leases_wanted_by(self, pid: Optional[int]) -> Optional[Client]:
        """The driver with ``pid`` if it asks for workers and holds none: its tasks wait."""
        for client in self.leases.wanters:
            if client.pid == pid and not client.leases:
                return client
        return None

    # -- answers -----------------------------------------------------------------------------

    def answer(self, request) -> object:
        """The answer to one request (a dict: {"what": ...}); see the module docstring."""
        if not isinstance(request, dict) or not isinstance(request.get("what"), str):
            return {"error": "a request is a dict with a string 'what'"}
        what = request["what"]
        if what == "tasks":
            self.read_logs()
            rows = self.task_rows()
            if request.get("with_transfers"):
                rows += self.history.transfer_rows()
            return rows
        handler = {"actors": self.actor_rows, "objects": self.object_rows,
                   "workers": self.worker_rows, "nodes": self.node_rows,
                   "status": self.status, "session": self.session}.get(what)
        if handler is None:
            return {"error": f"unknown request {what!r}: ask for one of tasks, actors, "
                             "objects, workers, nodes, status, session"}
        return handler()

    def session(self) -> dict:
        return {"session_name": os.path.basename(self.session_dir),
                "session_dir": self.session_dir, "driver_pid": self.driver_pid,
                "scheduler_pid": os.getpid(), "start_time_ms": _task_history.ms(self.started),
                "num_cpus": self.options.get("num_cpus")}

    def task_rows(self) -> List[dict]:
        return self.history.rows(self.driver_pid, Why(self).pending, self.job_id)

    def actor_rows(self) -> List[dict]:
        rows = []
        for actor in self.actors.table.values():
            options = actor.options
            state = _actor_state(actor)
            death = None
            if actor.death is not None:
                death = kind_of(actor.death[0], 0)[1] or "the actor died"
            rows.append({
                "actor_id": actor.actor_id.hex(), "class_name": actor.class_name,
                "state": state, "job_id": self.job_id, "name": options.get("name") or "",
                "ray_namespace": options.get("namespace"),
                "pid": actor.client.pid if actor.client is not None and actor.client.alive
                else None,
                "node_id": NODE_ID, "required_resources": dict(options.get("resources") or {}),
                "death_cause": death, "is_detached": options.get("lifetime") == "detached",
                "num_restarts": max(options.get("max_restarts", 0) - actor.restarts_left, 0)
                if options.get("max_restarts", 0) >= 0 else 0,
                "repr_name": "", "placement_group_id": None,
                "pending_calls": sum(len(q) for q in actor.queues.values()),
            })
        return rows

    def object_rows(self) -> List[dict]:
        """One row per (object, holder): the directory's objects, and those of the arena it
        does not know (results whose owner alone holds them: a leased task's, a call's)."""
        arena = {info.object_id: info for info in self.store.list()}
        rows = []
        for object_id, entry in self.objects.entries.items():
            info = arena.pop(object_id, None)
            size = _size(entry, info)
            where = _where(entry, info)
            common = {"object_id": object_id.hex(), "object_size": size,
                      "task_status": self._producer_state(object_id), "call_site": "disabled",
                      "ip": "127.0.0.1", "node_id": NODE_ID, "where": where,
                      "spilled": where == "spilled"}
            kind = "ACTOR_HANDLE" if entry.actor else "LOCAL_REFERENCE"
            for holder in entry.holders:
                rows.append(dict(common, reference_type=kind, type=_holder_type(holder),
                                 pid=holder.pid))
            if entry.arg_holds:
                rows.append(dict(common, reference_type="USED_BY_PENDING_TASK", type="WORKER",
                                 pid=None))
            if entry.container_holds:
                rows.append(dict(common, reference_type="CAPTURED_IN_OBJECT", type="WORKER",
                                 pid=None))
            if not entry.holders and not entry.arg_holds and not entry.container_holds:
                rows.append(dict(common, reference_type="PINNED_IN_MEMORY", type="DRIVER",
                                 pid=self.driver_pid))
        for object_id, info in arena.items():
            if info.state == "created" or info.lent:
                continue  # being written, or a worker's numpy buffer: not an object yet
            where = "spilled" if info.state == "spilled" else "arena"
            rows.append({"object_id": object_id.hex(),
                         "object_size": info.data_size + info.metadata_size,
                         "task_status": self._producer_state(object_id),
                         "call_site": "disabled", "ip": "127.0.0.1", "node_id": NODE_ID,
                         "where": where, "spilled": where == "spilled",
                         "reference_type": "PINNED_IN_MEMORY", "type": "DRIVER",
                         "pid": self.driver_pid})
        return rows

    def _producer_state(self, object_id: bytes) -> str:
        task = self.tasks.table.get(object_id[:24])
        if task is None:
            return "NIL" if object_id[:24] not in self.actors.table else "FINISHED"
        return "RUNNING" if task.worker is not None else "PENDING_NODE_ASSIGNMENT"

    def worker_rows(self) -> List[dict]:
        rows = [self._process_row(self.driver_pid, "DRIVER", "BUSY", None, None),
                self._process_row(os.getpid(), "SCHEDULER", "BUSY", None, None)]
        for client in self.clients.all():
            if client.kind == "driver":
                continue
            if client.actor is not None:
                rows.append(self._process_row(client.pid, "ACTOR", "BUSY", None,
                                              client.actor.actor_id.hex()))
                continue
            task = client.task.task_id.hex() if client.task is not None else None
            rows.append(self._process_row(client.pid, "WORKER", _worker_state(client), task,
                                          None))
        return rows

    def _process_row(self, pid: int, kind: str, state: str, task: Optional[str],
                     actor: Optional[str]) -> dict:
        return {"worker_id": worker_id(pid), "is_alive": True, "worker_type": kind,
                "exit_type": None, "exit_detail": None, "node_id": NODE_ID,
                "ip": "127.0.0.1", "pid": pid, "start_time_ms": _started_ms(pid),
                "state": state, "task_id": task, "actor_id": actor}

    def node_rows(self) -> List[dict]:
        return [{"node_id": NODE_ID, "node_ip": "127.0.0.1", "is_head_node": True,
                 "state": "ALIVE", "node_name": "127.0.0.1",
                 "resources_total": dict(self.resources.total), "labels": {},
                 "start_time_ms": _task_history.ms(self.started)}]

    def status(self) -> dict:
        total = self.resources.total
        free = self.resources.available
        used = {name: round(amount - max(free.get(name, 0.0), 0.0), 6)
                for name, amount in total.items()}
        workers = collections.Counter(map(_worker_state, self.clients.workers()))
        actors = collections.Counter(map(_actor_state, self.actors.table.values()))
        why = Why(self)
        tasks = self.task_counts(why)
        stats = self.store.statistics()
        # The object table is sized for the arena: listing it is read only for what the
        # counts don't tell (the bytes spilled).
        spilled = [i for i in self.store.list() if i.state == "spilled"] \
            if stats.num_spilled else []
        return {
            "session": self.session(),
            "resources": {"total": dict(total), "used": used},
            "workers": {"total": sum(workers.values()), "busy": workers["BUSY"],
                        "idle": workers["IDLE"], "leased": workers["LEASED"],
                        "blocked": workers["BLOCKED"]},
            "actors": dict(actors),
            "store": {"capacity": stats.capacity, "used": stats.bytes_in_use,
                      "num_objects": stats.num_sealed + stats.num_spilled,
                      "spilled_objects": stats.num_spilled,
                      "spilled_bytes": sum(i.data_size + i.metadata_size for i in spilled)},
            "tasks": {state: count for state, count in tasks.items() if count},
            "pending": why.pending_summary(),
            "stuck": why.stuck(),
        }

    def task_counts(self, why: "Why") -> Dict[str, int]:
        """Tasks by state, for a status: from the counts each log keeps and what the slots
        and the scheduler's table say, at no cost per task (a history read costs one per
        event: ``read_logs``).  Ended attempts are counted, so a retried task's failed
        attempts are FAILED, and it is pending meanwhile only if the scheduler holds it."""
        counts, running = self.gone_counts, 0
        for log in self.unowned_logs:
            counts = _sum_counts(counts, _events.counts(log))
        for client in self.clients.all():
            log = _log_of(client) if client.alive and client.kind != "driver" else None
            if log is not None:
                counts = _sum_counts(counts, _events.counts(log))
                running += _slot.running(_slot_of(client)) is not None
        submitted, ended, failed = counts
        for task in self.tasks.table.values():
            if task.worker is None:  # held here, not started
                why.seen[why.pending(task.task_id, task.owner.pid, task.name)] += 1
        elsewhere = max(submitted - ended - running - sum(why.seen.values()), 0)
        if elsewhere:  # the driver's, queued at a worker it leases or for a lease; calls
            why.seen[why.pending(None, self.driver_pid,
                                 f"{elsewhere} task(s) of the driver")] += elsewhere
        states: Dict[str, int] = collections.Counter()
        for (state, _), count in why.seen.items():
            states[state] += count
        states.update(FINISHED=ended - failed, FAILED=failed, RUNNING=running)
        return states


class Why:
    """What pending work waits for, in words (one answer's worth: built per request)."""

    def __init__(self, state: State):
        self.state = state
        self.stuck_list: List[dict] = []
        self.seen: Dict[tuple, int] = collections.Counter()  # (state, text): tasks

    def pending(self, task_id: Optional[bytes], submitter: Optional[int], name: str):
        """(Ray's state of a task never started, what it waits for)."""
        task = self.state.tasks.table.get(task_id) if task_id is not None else None
        if task is None:  # the driver's, to a worker it leases, or a call sent to its actor
            driver = self.state.leases_wanted_by(submitter)
            if driver is not None:  # (or queued at a lease it holds: it can't tell which)
                return "PENDING_NODE_ASSIGNMENT", self._demand(task_id, P.LEASE_SHAPE, name)
            return "SUBMITTED_TO_WORKER", "queued at the process that will run it"
        if task.waiting_on:
            return "PENDING_ARGS_AVAIL", self._arguments(task)
        if task.actor is not None:
            return "PENDING_ACTOR_TASK_ORDERING_OR_CONCURRENCY", self._actor(task.actor)
        if task.worker is not None:
            return "SUBMITTED_TO_WORKER", "sent to a worker, behind the task it runs"
        return "PENDING_NODE_ASSIGNMENT", self._resources(task)

    def _arguments(self, task: Task) -> str:
        waiting = [i for i in task.spec[P.SPEC_ARG_IDS]
                   if not (self.state.objects.get(i) and self.state.objects.get(i).ready)]
        names = []
        for object_id in waiting[:3]:
            producer = self.state.tasks.table.get(object_id[:24])
            names.append(f"{producer.name}()" if producer is not None
                         else f"task {object_id[:24].hex()[:12]}")
        more = f" and {len(waiting) - 3} more" if len(waiting) > 3 else ""
        return f"waits for {len(waiting)} argument(s): the result of {', '.join(names)}{more}"

    def _actor(self, actor: Actor) -> str:
        if actor.state == "pending":
            what = "restart" if actor.restarting else "start"
            return f"waits for actor {actor.class_name} to {what}"
        return f"queued behind earlier calls to actor {actor.class_name}"

    def _resources(self, task: Task) -> str:
        if task.placement is not None:
            return f"waits for room in its placement group's bundle {task.placement[1]}"
        return self._demand(task.task_id, task.resources, task.name)

    def _demand(self, task_id: bytes, demand: Dict[str, float], name: str) -> str:
        """What a task needing ``demand`` waits for; a task that will wait until an actor
        ends is stuck."""
        state = self.state
        held_by_actors: Dict[str, float] = collections.defaultdict(float)
        for actor in state.actors.table.values():
            if actor.state != "dead":
                for key, amount in actor.held.items():
                    held_by_actors[key] += amount
        total = state.resources.total
        short = {key: amount for key, amount in demand.items()
                 if total.get(key, 0.0) - held_by_actors.get(key, 0.0) < amount}
        if short:
            held = {key: held_by_actors.get(key, 0.0) for key in demand}
            text = (f"needs {_fmt(demand)} but actors hold {_fmt(held)} of the session's "
                    f"{_fmt({key: total.get(key, 0.0) for key in demand})}: it can start "
                    "only once an actor ends (kill one, or give the session more)")
            self.stuck_list.append({"task_id": task_id.hex() if task_id else None,
                                    "name": name,
                                    "reason": "infeasible", "text": text})
            return text
        return (f"needs {_fmt(demand)}; free now: "
                f"{_fmt(state.resources.free_now()) or 'nothing'}")

    def pending_summary(self) -> List[dict]:
        """Tasks not started, by what they wait for (those ``pending`` was asked of)."""
        return [{"reason": state, "count": count, "text": text or state}
                for (state, text), count in self.seen.most_common() if state in _PENDING]

    def stuck(self) -> List[dict]:
        """Work that will not go on by itself (``pending`` found some as it went)."""
        stuck = list(self.stuck_list)
        history = self.state.history
        for task in self.state.tasks.table.values():
            if not task.waiting_on:
                continue
            for object_id in task.spec[P.SPEC_ARG_IDS]:
                error = history.failed(object_id[:24])
                entry = self.state.objects.get(object_id)
                if error is not None and entry is not None and not entry.ready:
                    producer = history.tasks[object_id[:24]].name or "?"
                    stuck.append({"task_id": task.task_id.hex(), "name": task.name,
                                  "reason": "producer_failed",
                                  "text": f"waits for the result of {producer}(), which "
                                          f"failed ({error}) and was not retried"})
        for actor in self.state.actors.table.values():
            if actor.state == "dead" and any(actor.queues.values()):
                stuck.append({"task_id": None, "name": actor.class_name,
                              "reason": "dead_actor",
                              "text": f"calls wait for actor {actor.class_name}, which is "
                                      "dead"})
        return stuck


def _actor_state(actor: Actor) -> str:
    """Ray's name for where an actor is in its life."""
    if actor.state == "pending":
        return ("DEPENDENCIES_UNREADY" if actor.waiting_on else
                "RESTARTING" if actor.restarting else "PENDING_CREATION")
    return _ACTOR_STATES.get(actor.state, actor.state.upper())


def _worker_state(client: Client) -> str:
    if client.leased_to is not None:
        return "LEASED"
    if client.blocked:
        return "BLOCKED"
    return "BUSY" if client.task is not None else "IDLE"


def _sum_counts(counts: tuple, more: tuple) -> tuple:
    return tuple(a + b for a, b in zip(counts, more))


def _slot_of(client: Client):
    return client.park_slot if client.actor is not None else client.cancel_slot


def _log_of(client: Client):
    return getattr(_slot_of(client), "events", None)


def _holder_type(client: Client) -> str:
    if client.kind == "driver":
        return "DRIVER"
    return "ACTOR" if client.actor is not None else "WORKER"


def _size(entry, info) -> Optional[int]:
    if entry.data is not None:
        return len(entry.data) + len(entry.metadata)
    if info is not None:
        return info.data_size + info.metadata_size
    return None


def _where(entry, info) -> str:
    if entry.actor:
        return "actor"  # a handle's pseudo-object: the actor lives in its process
    if entry.data is not None:
        return "inline"
    if info is not None and info.state == "spilled":
        return "spilled"
    return "arena" if entry.ready else "pending"


def _fmt(amounts: Dict[str, float]) -> str:
    return ", ".join(f"{name}: {amount:g}" for name, amount in sorted(amounts.items())
                     if amount) or "{}"


def _started_ms(pid: int) -> Optional[int]:
    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except psutil.Error:
        return None
