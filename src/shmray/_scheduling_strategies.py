"""Ray's scheduling strategies, as the ``scheduling_strategy=`` option takes them.

Runs in: the driver, workers and actors (whoever sets options).

Plain records, checked where they are made; what they mean is worked out per
``options()`` by ``_placement_group.resolve``.  On one machine a strategy can only say
"in this placement group's bundle" or "on this node", and this node is the only one:
``NODE_ID`` is what ``get_runtime_context().get_node_id()`` and ``nodes()`` report.
"""

from __future__ import annotations

NODE_ID = "0" * 56  # the one node's id, hex (Ray's node ids are 28 bytes)


class PlacementGroupSchedulingStrategy:
    """Run a task or actor in a bundle of ``placement_group`` (index -1: any bundle with
    room); ``placement_group_capture_child_tasks``: the tasks and actors it starts without
    a strategy of their own go into the same group."""

    def __init__(self, placement_group, placement_group_bundle_index: int = -1,
                 placement_group_capture_child_tasks=None):
        self.placement_group = placement_group
        self.placement_group_bundle_index = placement_group_bundle_index
        self.placement_group_capture_child_tasks = placement_group_capture_child_tasks

    def __repr__(self) -> str:
        return (f"PlacementGroupSchedulingStrategy({self.placement_group!r}, "
                f"{self.placement_group_bundle_index}, "
                f"{self.placement_group_capture_child_tasks})")


class NodeAffinitySchedulingStrategy:
    """Run a task or actor on the node ``node_id`` (hex); ``soft=True``: elsewhere if that
    node can't take it.  There is one node here, so any other id is a node that does not
    exist: with ``soft=False`` the call raises TaskUnschedulableError (an actor,
    ActorUnschedulableError), as Ray fails such a task."""

    def __init__(self, node_id: str, soft: bool, _spill_on_unavailable: bool = False,
                 _fail_on_unavailable: bool = False):
        if not isinstance(node_id, str):
            raise TypeError(f"node_id must be a node's id as a hex str, got {node_id!r}")
        self.node_id = node_id
        self.soft = soft
        self._spill_on_unavailable = _spill_on_unavailable
        self._fail_on_unavailable = _fail_on_unavailable

    def __repr__(self) -> str:
        return f"NodeAffinitySchedulingStrategy({self.node_id!r}, soft={self.soft})"
