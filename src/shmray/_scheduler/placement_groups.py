"""Placement groups: reservations of bundles of resources, and what runs in them.

Runs in: the scheduler.

A group arrives PENDING (``on_create``).  Each turn, before actors and tasks are placed
(``place``), pending groups take their bundles' resources from the free pool, all of
them at once or none (Ray's gang scheduling), and are CREATED; while one waits, leased
CPUs in its way are recalled (``waiting`` tells ``leases`` too).  A created group's
bundles are a ``Resources`` each (with the GPU ids it took): the tasks and actors placed in
a bundle take from it, never from the free pool (``dispatch_placed``, wired into
``dispatch``; ``bundle_for``, wired into ``actors``), and give back to it.  ``ready()``
objects (``on_ready``) are made ready with the group's handle once it is created.

Removing a group (``on_remove``; or, for a group that is not detached, the end for good of
the actor that created it, ``creator_died``: as in Ray, one created by the driver or a task
lives as long as the session) gives its reservation back at once, kills its actors
(their calls raise ActorDiedError) and the workers of its running tasks, and fails what
was to run in it with TaskPlacementGroupRemoved.  The record stays, REMOVED, for
``placement_group_table``.  What a killed task or actor held goes back to its dead
bundle, never to the free pool: the group's whole reservation went back already.
"""

from __future__ import annotations

import collections
import time
from typing import Dict, Iterable, List, Optional

from .. import _protocol as P, exceptions
from .._scheduling_strategies import NODE_ID
from .actors import Actors, died_error
from .clients import Client, Clients, kill_quietly
from .leases import Leases
from .objects import Directory, serialized
from .records import Actor
from .resources import Resources
from .tasks import Tasks

PENDING, CREATED, REMOVED = "PENDING", "CREATED", "REMOVED"


class Group:
    """The scheduler's record of one placement group."""

    __slots__ = ("pg_id", "bundles", "total", "strategy", "name", "namespace", "detached",
                 "creator", "state", "pools", "gpu_ids", "waiters", "asked_at",
                 "created_at", "attempts")

    def __init__(self, pg_id: bytes, bundles: List[dict], strategy: str, name: str,
                 namespace: str, detached: bool, creator: Optional[bytes]):
        self.pg_id = pg_id
        self.bundles = bundles
        self.total: Dict[str, float] = {}
        for bundle in bundles:
            for key, amount in bundle.items():
                self.total[key] = self.total.get(key, 0.0) + amount
        self.strategy = strategy
        self.name = name
        self.namespace = namespace
        self.detached = detached
        self.creator = creator  # the id of the actor that created it, or None
        self.state = PENDING
        self.pools: List[Resources] = []  # one per bundle, once created
        self.gpu_ids: List[tuple] = []    # ...and the GPU ids each bundle holds
        self.waiters: list = []           # (object id, value) of ready() refs
        self.asked_at = time.monotonic()
        self.created_at: Optional[float] = None
        self.attempts = 0


class PlacementGroups:
    def __init__(self, clients: Clients, objects: Directory, resources: Resources,
                 tasks: Tasks, actors: Actors, leases: Leases):
        self.clients = clients
        self.objects = objects
        self.resources = resources
        self.tasks = tasks
        self.actors = actors
        self.leases = leases
        self.table: Dict[bytes, Group] = {}
        self.named: Dict[tuple, bytes] = {}  # (namespace, name) -> the latest group's id
        self.pending: List[Group] = []

    # -- creation ----------------------------------------------------------------------------

    def on_create(self, client: Client, pg_id, bundles, strategy, name, namespace,
                  detached) -> None:
        creator = client.actor.actor_id if client.actor is not None else None
        group = Group(pg_id, bundles, strategy, name, namespace, detached, creator)
        earlier = self.table.get(pg_id)
        if earlier is not None:  # ready() was asked before this arrived
            group.waiters = earlier.waiters
        self.table[pg_id] = group
        if name:
            self.named[(namespace, name)] = pg_id
        self.pending.append(group)

    def place(self) -> None:
        """Reserve what pending groups ask for, as it becomes free, in the order asked."""
        if not self.pending:
            return
        still = []
        for group in self.pending:
            group.attempts += 1
            if not self._reserve(group):
                self.leases.recall_if_in_the_way(group.total)
                still.append(group)
        self.pending = still

    def _reserve(self, group: Group) -> bool:
        """Take every bundle from the free pool, each with GPU ids of its own, or none."""
        if not self.resources.fits(group.total):
            return False
        taken = []
        for bundle in group.bundles:
            if not self.resources.fits(bundle):  # GPU ids can't be shared out that way
                for earlier, gpu_ids in taken:
                    self.resources.give(earlier, gpu_ids)
                return False
            taken.append((bundle, self.resources.take(bundle)))
        group.pools = [Resources(bundle, gpu_ids) for bundle, gpu_ids in taken]
        group.gpu_ids = [gpu_ids for _, gpu_ids in taken]
        self._create(group)
        return True

    def _create(self, group: Group) -> None:
        group.state = CREATED
        group.created_at = time.monotonic()
        waiters, group.waiters = group.waiters, []
        for object_id, value in waiters:
            self._resolve(object_id, value, b"")

    def waiting(self) -> Iterable[dict]:
        """What the pending groups ask for (``leases``: work that waits)."""
        return (group.total for group in self.pending)

    def on_ready(self, client: Client, pg_id, object_id, value) -> None:
        """A ready() ref, held by ``client``: ready with ``value`` (the group's handle) once
        the group is created."""
        entry = self.objects.entry(object_id)
        entry.holders.add(client)
        client.holds.add(object_id)
        entry.subscribers.append(client)
        group = self.table.get(pg_id)
        if group is not None and group.state == CREATED:
            self._resolve(object_id, value, b"")
        elif group is not None and group.state == REMOVED:
            self._resolve(object_id, *_removed(group, "before it was created"))
        else:  # pending, or not heard of yet (its creator's message is on its way)
            if group is None:
                group = self.table[pg_id] = _Unknown(pg_id)
            group.waiters.append((object_id, value))

    def _resolve(self, object_id: bytes, data: bytes, metadata: bytes) -> None:
        entry = self.objects.get(object_id)
        if entry is not None and not entry.ready:
            self.objects.make_ready(object_id, entry, data, metadata, [])

    # -- what runs in a group ---------------------------------------------------------------

    def dispatch_placed(self, queue: collections.deque) -> None:
        """Start what fits of ``queue``: tasks of one group's bundle (or any of its
        bundles), in order, each taking from the bundle it runs in."""
        placement = queue[0].placement
        group = self.table.get(placement[0])
        if group is not None and group.state == REMOVED:
            error = _removed(group, "before the task could run in it")
            while queue:
                task = queue.popleft()
                if not task.finished:
                    self.tasks.fail(task, *error)
            return
        if group is None or group.state != CREATED:
            return
        dispatcher = self.tasks.dispatcher
        while queue:
            task = queue[0]
            if task.finished:
                queue.popleft()
                continue
            pool = _room_for(group, placement[1], task.resources)
            if pool is None:
                return
            worker = self.tasks.pool.idle_worker()
            if worker is None:
                self.tasks.pool.warn_cap()
                return
            queue.popleft()
            task.pool = pool
            dispatcher.start(task, worker)

    def bundle_for(self, actor: Actor) -> Optional[Resources]:
        """The bundle an actor starts in, or None while none has room (or the group is
        pending).  An actor whose group was removed dies of it."""
        placement = actor.options["placement"]
        group = self.table.get(placement[0])
        if group is None or group.state == PENDING:
            return None
        if group.state == REMOVED:
            self.actors.end(actor, died_error(
                actor, "its placement group was removed before it could start"))
            return None
        return _room_for(group, placement[1], actor.options["place"])

    # -- removal -----------------------------------------------------------------------------

    def on_remove(self, client: Client, request_id, pg_id) -> None:
        group = self.table.get(pg_id)
        if isinstance(group, Group) and group.state != REMOVED:
            self._remove(group)
        self.clients.send(client, P.reply(request_id, None))

    def creator_died(self, actor_id: bytes) -> None:
        """Groups that are not detached go with the actor that created them, once it is
        dead for good (not while it restarts)."""
        for group in list(self.table.values()):
            if (isinstance(group, Group) and group.creator == actor_id and not group.detached
                    and group.state != REMOVED):
                self._remove(group)

    def _remove(self, group: Group) -> None:
        if group.state == CREATED:
            for bundle, gpu_ids in zip(group.bundles, group.gpu_ids):
                self.resources.give(bundle, gpu_ids)
        elif group in self.pending:
            self.pending.remove(group)
        group.state = REMOVED
        waiters, group.waiters = group.waiters, []
        for object_id, _ in waiters:
            self._resolve(object_id, *_removed(group, "before it was created"))
        for actor in list(self.actors.table.values()):
            placement = actor.options.get("placement")
            if placement and placement[0] == group.pg_id and actor.state != "dead":
                self.actors.end(actor, died_error(
                    actor, "its placement group was removed (remove_placement_group)"))
        for worker in list(self.tasks.pool.busy):
            task = worker.task
            if (task is not None and task.placement is not None
                    and task.placement[0] == group.pg_id and not task.finished):
                self.tasks.fail(task, *_removed(group, "while the task ran in it"))
                kill_quietly(worker.pid)  # its death is seen as usual; the task is over

    # -- queries -----------------------------------------------------------------------------

    def resource_names(self, available: bool) -> Dict[str, float]:
        """Ray's names for what created groups hold, as cluster_resources() and
        available_resources() list them: ``CPU_group_<id>`` (the group), ``CPU_group_<i>_
        <id>`` (bundle i), ... and ``bundle_group_...`` (1000 per bundle)."""
        names: Dict[str, float] = {}
        for group in self.table.values():
            if not isinstance(group, Group) or group.state != CREATED:
                continue
            hex_id = group.pg_id.hex()
            for index, pool in enumerate(group.pools):
                amounts = {**(pool.available if available else pool.total), "bundle": 1000.0}
                for name, amount in amounts.items():
                    if amount <= 0:  # as free_now: only what there is of it
                        continue
                    names[f"{name}_group_{index}_{hex_id}"] = amount
                    whole = f"{name}_group_{hex_id}"
                    names[whole] = names.get(whole, 0.0) + amount
        return names

    def query(self, what):
        """The answers to QUERY "placement_groups", ("placement_group", id) (its bundles)
        and ("placement_group_named", name, namespace) (its id and bundles)."""
        if what == "placement_groups":
            return {group.pg_id.hex(): _info(group) for group in self.table.values()
                    if isinstance(group, Group)}
        if what[0] == "placement_group":
            group = self.table.get(what[1])
            return group.bundles if isinstance(group, Group) else None
        pg_id = self.named.get((what[2], what[1]))
        group = self.table.get(pg_id) if pg_id is not None else None
        if group is None or group.state == REMOVED:
            return None
        return (group.pg_id, group.bundles)


class _Unknown:
    """A group a ready() names before its creation arrived (another process's socket was
    read first): it collects the waiters until ``on_create`` replaces it."""

    __slots__ = ("pg_id", "state", "waiters")

    def __init__(self, pg_id: bytes):
        self.pg_id = pg_id
        self.state = PENDING
        self.waiters: list = []


def _room_for(group: Group, index: int, demand: Dict[str, float]) -> Optional[Resources]:
    if index >= 0:
        pool = group.pools[index]
        return pool if pool.fits(demand) else None
    for pool in group.pools:
        if pool.fits(demand):
            return pool
    return None


def _removed(group: Group, when: str) -> tuple:
    return serialized(exceptions.TaskPlacementGroupRemoved(
        f"The placement group {group.pg_id.hex()}"
        f"{f' ({group.name!r})' if group.name else ''} was removed {when} "
        "(remove_placement_group, or the process that created it ended)"))


def _info(group: Group) -> dict:
    """One group as placement_group_table() shows it (Ray's keys)."""
    created = group.created_at is not None
    return {
        "placement_group_id": group.pg_id.hex(),
        "name": group.name,
        "bundles": {i: dict(bundle) for i, bundle in enumerate(group.bundles)},
        "bundles_to_node_id": ({i: NODE_ID for i in range(len(group.bundles))}
                               if group.state == CREATED else {}),
        "strategy": group.strategy,
        "state": group.state,
        "stats": {
            "end_to_end_creation_latency_ms":
                (group.created_at - group.asked_at) * 1000 if created else 0.0,
            "scheduling_latency_ms":
                (group.created_at - group.asked_at) * 1000 if created else 0.0,
            "scheduling_attempt": group.attempts,
            "highest_retry_delay_ms": 0.0,
            "scheduling_state": {PENDING: "QUEUED", CREATED: "FINISHED",
                                 REMOVED: "REMOVED"}[group.state],
        },
    }
