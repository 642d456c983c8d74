"""``shmray.util``: as ``ray.util`` — the helpers that make sense on one machine.

Runs in: the driver, workers and actors.
"""

from .._actor import list_named_actors
from .._actor_pool import ActorPool
from .._pickling import deregister_serializer, register_serializer
from . import scheduling_strategies
from ._executor import ProcessPoolExecutor
from .check_serialize import inspect_serializability
from .helpers import as_completed, map_unordered
from .placement_group import (
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from .progress_bar import progress


def get_node_ip_address() -> str:
    """The address of the one node: this machine, on loopback."""
    return "127.0.0.1"


__all__ = ["ActorPool", "as_completed", "deregister_serializer",
           "get_current_placement_group", "get_node_ip_address", "get_placement_group",
           "inspect_serializability", "list_named_actors", "map_unordered",
           "placement_group", "placement_group_table", "ProcessPoolExecutor", "progress",
           "register_serializer", "remove_placement_group", "scheduling_strategies"]
