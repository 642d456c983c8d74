"""Placement groups as the program sees them: the handle, the calls that create, find,
describe and remove groups, and where a task's or actor's options say it runs.

Runs in: the driver, workers and actors (anything that creates groups or submits work).

On one node a placement group is a reservation.  Creating one asks the scheduler to take
its bundles' resources from what is free, at once if they are, else as soon as they are;
``ready()`` resolves then (``_scheduler.placement_groups``).  A group this machine could
never hold raises ValueError at ``placement_group()``: a bundle bigger than the machine,
bundles adding up to more than it has (every bundle lands on this node, whatever the
strategy), or STRICT_SPREAD with more than one bundle (it needs a node per bundle).  Ray
would leave such a group pending forever.

Tasks and actors in a bundle take from that bundle's reservation, never from the free
pool.  Where each goes is worked out once per ``options()`` (``resolve``): a task or actor
asking for more than its bundle has (more than any bundle has, for index -1) raises
TaskUnschedulableError / ActorUnschedulableError at ``.remote()``; Ray would leave it
pending.  With ``placement_group_capture_child_tasks``, what a task or actor in the group
starts without a strategy of its own goes into the group too (any bundle): the worker
notes the running task's placement (``_context.TaskContext.placement``) and
``_remote_function`` / ``_actor`` ask ``captured`` only when it is set.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from . import _context, _protocol as P, _resources, exceptions
from ._id_types import PlacementGroupID
from ._ids import object_id_for_put
from ._scheduling_strategies import (
    NODE_ID,
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)
from ._serialization import serialize
from ._session import current

VALID_PLACEMENT_GROUP_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_ID_SIZE = 18  # Ray's placement group ids are 18 bytes
_NIL = b"\xff" * _ID_SIZE

# pg id -> (the runtime of the session it is in, its bundles): bundles never change, so
# they are asked for once per group; a group of a session that ended is not looked up here.
_bundles_by_id: Dict[bytes, tuple] = {}


class PlacementGroup:
    """A handle to a placement group (Ray's ``ray.util.placement_group.PlacementGroup``)."""

    def __init__(self, id: PlacementGroupID, bundle_cache: Optional[List[dict]] = None):
        self.id = id
        self.bundle_cache = bundle_cache

    @staticmethod
    def empty() -> "PlacementGroup":
        return PlacementGroup(PlacementGroupID(_NIL))

    @property
    def is_empty(self) -> bool:
        return self.id.is_nil()

    def ready(self):
        """An ObjectRef that resolves to this group once its bundles are reserved; its
        get() raises TaskPlacementGroupRemoved if the group is removed first."""
        runtime = current()
        cached = _bundles_by_id.get(self.id.binary())
        if cached is not None and cached[0] is not runtime:  # made here, in a session gone
            raise _unknown(self.id.binary())
        object_id = object_id_for_put()
        message = P.placement_group_ready(self.id.binary(), object_id,
                                          serialize(self).to_bytes())
        return runtime.send_owning(message, [object_id])[0]

    def wait(self, timeout_seconds: float = 30) -> bool:
        """Whether the group is reserved within ``timeout_seconds``."""
        ready, _ = current().wait([self.ready()], 1, timeout_seconds)
        return bool(ready)

    @property
    def bundle_specs(self) -> List[dict]:
        """The group's bundles: a list of resource dicts, by index."""
        if self.bundle_cache is None:
            self.bundle_cache = _bundles_of(self.id.binary())
        return [dict(bundle) for bundle in self.bundle_cache]

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def __eq__(self, other) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __reduce__(self):
        return PlacementGroup, (self.id, self.bundle_cache)

    def __repr__(self) -> str:
        return f"PlacementGroup(id={self.id.hex()})"


def placement_group(bundles: List[Dict[str, float]], strategy: str = "PACK", name: str = "",
                    lifetime: Optional[str] = None, _soft_target_node_id: Optional[str] = None,
                    bundle_label_selector=None) -> PlacementGroup:
    """Reserve ``bundles`` (a list of resource dicts) as one group; returns at once, with
    a handle whose ``ready()`` resolves once the resources are reserved."""
    runtime = current()
    bundles = _checked_bundles(bundles)
    if strategy not in VALID_PLACEMENT_GROUP_STRATEGIES:
        raise ValueError(f"Invalid placement group strategy {strategy!r}. Supported "
                         f"strategies are: {', '.join(VALID_PLACEMENT_GROUP_STRATEGIES)}.")
    if lifetime not in (None, "detached"):
        raise ValueError("Placement group `lifetime` argument must be either `None` or "
                         f"'detached'. Got {lifetime!r}.")
    if not isinstance(name, str):
        raise TypeError(f"a placement group's name must be a str, got {name!r}")
    _check_reservable(bundles, strategy, runtime.total)
    pg_id = os.urandom(_ID_SIZE)
    _bundles_by_id[pg_id] = (runtime, bundles)
    runtime.send(P.create_placement_group(pg_id, bundles, strategy, name,
                                          runtime.options.get("namespace", "default"),
                                          lifetime == "detached"))
    runtime.flush()
    return PlacementGroup(PlacementGroupID(pg_id), [dict(b) for b in bundles])


def _checked_bundles(bundles) -> List[dict]:
    if not isinstance(bundles, (list, tuple)):
        raise ValueError(f"The type of bundles must be list, got {bundles!r}")
    if not bundles:
        raise ValueError("The placement group `bundles` argument cannot contain an empty list")
    checked = []
    for bundle in bundles:
        if not isinstance(bundle, dict):
            raise ValueError(f"Each bundle must be a dict of resource name -> amount, got "
                             f"{bundle!r} in {bundles!r}")
        for key, amount in bundle.items():
            if (not isinstance(key, str) or not isinstance(amount, (int, float))
                    or isinstance(amount, bool) or amount < 0):
                raise ValueError(f"Bundle resources must be name -> a number >= 0, got "
                                 f"{key!r}: {amount!r} in {bundle!r}")
        if not any(bundle.values()):
            raise ValueError("Bundles cannot be an empty dictionary or resources with only 0 "
                             f"values. Bundles: {bundles!r}")
        checked.append({key: float(amount) for key, amount in bundle.items() if amount})
    return checked


def _check_reservable(bundles: List[dict], strategy: str, total: dict) -> None:
    """ValueError if this machine can never hold the group (Ray: pending forever)."""
    if strategy == "STRICT_SPREAD" and len(bundles) > 1:
        raise ValueError(
            f"A STRICT_SPREAD placement group puts each of its {len(bundles)} bundles on a "
            "node of its own, and shmray runs on one node, so it could never be created. Use "
            "PACK, SPREAD or STRICT_PACK (all bundles on this node), or a single bundle.")
    summed: Dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            summed[key] = summed.get(key, 0.0) + amount
    missing = _resources.shortfall(summed, total)
    if missing:
        raise ValueError(
            f"The placement group's bundles {bundles} ask for "
            f"{_resources.shown(summed)} in all, more than this machine has "
            f"({_resources.shown(missing)}), so it could never be created (every bundle goes "
            "on this one node). Ask for less, or start shmray with more: "
            "shmray.init(num_cpus=..., num_gpus=..., resources={...}).")


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Remove the group: its reservation is freed, and the tasks and actors running in it
    are killed (their results raise TaskPlacementGroupRemoved / ActorDiedError)."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError("remove_placement_group() takes a PlacementGroup, got "
                        f"{type(placement_group).__name__}")
    current().request(P.remove_placement_group, placement_group.id.binary())
    _bundles_by_id.pop(placement_group.id.binary(), None)


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The live placement group of that name (in this namespace); ValueError if none."""
    if not isinstance(placement_group_name, str) or not placement_group_name:
        raise ValueError("Please supply a non-empty value to get_placement_group")
    runtime = current()
    found = runtime.query(("placement_group_named", placement_group_name,
                           runtime.options.get("namespace", "default")))
    if found is None:
        raise ValueError(f"Failed to look up placement group with name: {placement_group_name}")
    pg_id, bundles = found
    _bundles_by_id[pg_id] = (current(), bundles)
    return PlacementGroup(PlacementGroupID(pg_id), [dict(b) for b in bundles])


def placement_group_table(placement_group: Optional[PlacementGroup] = None) -> dict:
    """The state of one group (a dict), or of every group (placement group id hex -> dict)."""
    table = current().query("placement_groups")
    if placement_group is None:
        return table
    return table.get(placement_group.id.hex(), {})


def get_current_placement_group() -> Optional[PlacementGroup]:
    """The group the running task or actor is in; None in the driver, or outside a group."""
    placement = _context.current_task.placement
    if placement is None:
        return None
    return PlacementGroup(PlacementGroupID(placement[0]))


def current_placement_group_id() -> Optional[str]:
    placement = _context.current_task.placement
    return placement[0].hex() if placement is not None else None


def _bundles_of(pg_id: bytes) -> List[dict]:
    runtime = current()
    cached = _bundles_by_id.get(pg_id)
    if cached is not None and cached[0] is runtime:
        return cached[1]
    bundles = runtime.query(("placement_group", pg_id))
    if bundles is None:
        raise _unknown(pg_id)
    _bundles_by_id[pg_id] = (runtime, bundles)
    return bundles


def _unknown(pg_id: bytes) -> ValueError:
    return ValueError(f"no placement group with id {pg_id.hex()} exists in this session (one "
                      "made before shmray.shutdown() ended with its session)")


# -- where a task or actor runs ------------------------------------------------------------

def resolve(options: dict, demand: Dict[str, float], what: str, actor: bool = False):
    """(placement, capturable) from a task's or actor's options: ``placement`` is
    ``(pg_id, bundle_index, capture_child_tasks)`` or None; ``capturable``: nothing was
    said, so a parent that captures its children may place it (``captured``)."""
    strategy = options.get("scheduling_strategy")
    group = options.get("placement_group")
    index = options.get("placement_group_bundle_index", -1)
    capture = options.get("placement_group_capture_child_tasks")
    if strategy is None:
        if group is None or group == "default":
            if index != -1:
                raise ValueError("If placement group is not set, the value of bundle index "
                                 "must be -1.")
            return None, True
    elif group not in (None, "default"):
        raise ValueError(
            "Placing options `placement_group` and `scheduling_strategy` cannot be set at the "
            "same time. Setting `placement_group` is deprecated, use "
            "`scheduling_strategy=PlacementGroupSchedulingStrategy(...)` instead.")
    elif isinstance(strategy, PlacementGroupSchedulingStrategy):
        group = strategy.placement_group
        index = strategy.placement_group_bundle_index
        capture = strategy.placement_group_capture_child_tasks
        if group is None:
            return None, False
    elif isinstance(strategy, NodeAffinitySchedulingStrategy):
        if strategy.node_id != NODE_ID and not strategy.soft:
            error = (exceptions.ActorUnschedulableError if actor
                     else exceptions.TaskUnschedulableError)
            raise error(
                f"{what} has NodeAffinitySchedulingStrategy(node_id={strategy.node_id!r}, "
                f"soft=False), and no node has that id: shmray runs on one node, whose id is "
                f"{NODE_ID!r} (get_runtime_context().get_node_id()). Use that id, or "
                "soft=True to run wherever it can.")
        return None, False
    elif strategy in ("DEFAULT", "SPREAD"):
        return None, False  # one node: spreading has nowhere else to go
    else:
        raise ValueError(
            f"Invalid scheduling_strategy value {strategy!r}. Valid values are None, "
            "'DEFAULT', 'SPREAD', PlacementGroupSchedulingStrategy(...) and "
            "NodeAffinitySchedulingStrategy(...).")
    if not isinstance(group, PlacementGroup):
        raise TypeError(f"placement_group must be a PlacementGroup (from "
                        f"shmray.util.placement_group()), got {group!r}")
    if group.is_empty:
        return None, False
    count = group.bundle_count
    if not isinstance(index, int) or isinstance(index, bool) or not -1 <= index < count:
        raise ValueError(f"placement group bundle index {index!r} is invalid. Valid placement "
                         f"group indexes: 0-{count - 1}, or -1 for any bundle.")
    placement = (group.id.binary(), index, bool(capture))
    check_fits(placement, demand, what, actor)
    return placement, False


def captured(placement, demand: Dict[str, float], what: str, actor: bool = False):
    """Where a child goes when its parent, in ``placement``, captures its children."""
    child = (placement[0], -1, True)
    check_fits(child, demand, what, actor)
    return child


def check_fits(placement, demand: Dict[str, float], what: str, actor: bool = False) -> None:
    """Raise if ``demand`` can never fit the bundle ``placement`` names (any one of them,
    for index -1): it would wait forever."""
    bundles = _bundles_of(placement[0])
    index = placement[1]
    candidates = bundles if index == -1 else [bundles[index]]
    if any(not _resources.shortfall(demand, bundle) for bundle in candidates):
        return
    where = "any bundle of its placement group" if index == -1 else f"bundle {index}"
    error = exceptions.ActorUnschedulableError if actor else exceptions.TaskUnschedulableError
    raise error(
        f"{what} asks for {_resources.shown(demand)}, more than {where} has "
        f"({'; '.join(_resources.shown(b) for b in candidates)}), so it could never run "
        "there. Ask for less (num_cpus=, num_gpus=, resources=, memory=), or make the "
        "bundle bigger.")
