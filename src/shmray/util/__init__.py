"""``shmray.util``: as ``ray.util`` — the helpers that make sense on one machine.

Runs in: the driver, workers and actors.
"""

from .._actor import list_named_actors
from .._actor_pool import ActorPool
from .._pickling import deregister_serializer, register_serializer
from .check_serialize import inspect_serializability
from .helpers import as_completed, map_unordered


def get_node_ip_address() -> str:
    """The address of the one node: this machine, on loopback."""
    return "127.0.0.1"


__all__ = ["ActorPool", "as_completed", "deregister_serializer", "get_node_ip_address",
           "inspect_serializability", "list_named_actors", "map_unordered",
           "register_serializer"]
