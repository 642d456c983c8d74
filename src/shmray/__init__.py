"""shmray: Ray Core's API on one machine, with a shared-memory object store.

Write ``import shmray as ray`` and a Ray Core program runs unchanged on this machine.  The
public names are re-exported here from private modules; nothing else is public.

Runs in: every process (the user's driver, and workers and actors, whose tasks may call it).
"""

from . import actor, exceptions, util
from ._actor import get_actor, kill, method
from ._api import (
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_runtime_context,
    nodes,
    put,
    remote,
    wait,
)
from ._object_ref import ObjectRef
from ._object_ref_generator import DynamicObjectRefGenerator, ObjectRefGenerator
from ._session import init, is_initialized, shutdown

__version__ = "0.1.0"

__all__ = [
    "DynamicObjectRefGenerator",
    "ObjectRef",
    "ObjectRefGenerator",
    "actor",
    "available_resources",
    "cancel",
    "cluster_resources",
    "exceptions",
    "get",
    "get_actor",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "util",
    "wait",
]
