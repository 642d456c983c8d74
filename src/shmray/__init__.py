"""shmray: Ray Core's API on one machine, with a shared-memory object store.

Write ``import shmray as ray`` and a Ray Core program runs unchanged on this machine.  The
public names are re-exported here from private modules; nothing else is public.

Runs in: every process (the user's driver, and workers and actors, whose tasks may call it).
"""

from . import actor, cloudpickle, dag, exceptions, job_config, util
from ._actor import get_actor, kill, method
from ._api import (
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_gpu_ids,
    get_runtime_context,
    nodes,
    put,
    remote,
    wait,
)
from ._id_types import (
    ActorClassID,
    ActorID,
    FunctionID,
    JobID,
    NodeID,
    PlacementGroupID,
    TaskID,
    UniqueID,
    WorkerID,
)
from ._logging_config import LoggingConfig
from ._object_ref import ObjectRef
from ._object_ref_generator import DynamicObjectRefGenerator, ObjectRefGenerator
from ._session import init, is_initialized, shutdown
from ._unsupported import (
    LOCAL_MODE,
    SCRIPT_MODE,
    WORKER_MODE,
    Language,
    client,
    cpp_function,
    java_actor_class,
    java_function,
    show_in_dashboard,
)
from .util.state._timeline import timeline

ObjectID = ObjectRef  # Ray's older name for a ref

__version__ = "0.1.0"

__all__ = [
    "ActorClassID",
    "ActorID",
    "DynamicObjectRefGenerator",
    "FunctionID",
    "JobID",
    "LOCAL_MODE",
    "Language",
    "LoggingConfig",
    "NodeID",
    "ObjectID",
    "ObjectRef",
    "ObjectRefGenerator",
    "PlacementGroupID",
    "SCRIPT_MODE",
    "TaskID",
    "UniqueID",
    "WORKER_MODE",
    "WorkerID",
    "actor",
    "available_resources",
    "cancel",
    "client",
    "cloudpickle",
    "cluster_resources",
    "cpp_function",
    "dag",
    "exceptions",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "is_initialized",
    "java_actor_class",
    "java_function",
    "job_config",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "show_in_dashboard",
    "shutdown",
    "timeline",
    "util",
    "wait",
]
