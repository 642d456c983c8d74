"""``shmray.util.state``: as ``ray.util.state``, what a running session holds, by Ray's
names: ``list_tasks``, ``get_task``, ``summarize_tasks`` and their kin for actors, objects,
workers and nodes.

Runs in: the driver, tasks and actors (asking their own session), and any other process of
the same user (attaching to a running session, as the ``shmray`` command line does).
"""

from .api import (
    get_actor,
    get_node,
    get_objects,
    get_task,
    get_worker,
    list_actors,
    list_nodes,
    list_objects,
    list_tasks,
    list_workers,
    summarize_actors,
    summarize_objects,
    summarize_tasks,
)

__all__ = [
    "get_actor",
    "get_node",
    "get_objects",
    "get_task",
    "get_worker",
    "list_actors",
    "list_nodes",
    "list_objects",
    "list_tasks",
    "list_workers",
    "summarize_actors",
    "summarize_objects",
    "summarize_tasks",
]
