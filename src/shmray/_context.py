"""This process's place in a session: its runtime, and the task or actor call it runs now.

Runs in: every process.

The lowest of shmray's modules: it imports none of the others, so any module can ask
"which runtime is this process's?" or "which task runs here?" without importing the modules
that make runtimes and run tasks.  ``runtime`` is set when the process joins a session (the
driver at ``init``, a worker or actor when it starts) and cleared when it leaves it; every
ObjectRef made in the process counts itself on it.  This module also keeps the marks of
the places where a cancelled task may be interrupted at once (``cancel_point``).
"""

from __future__ import annotations

import contextvars
import os
from typing import Callable, Optional

runtime = None  # this process's Runtime (``_runtime``), or None outside a session


def install(new_runtime) -> None:
    """Make ``new_runtime`` this process's (None: the process has left its session)."""
    global runtime
    runtime = new_runtime


class TaskContext:
    """What this process is: the task a worker runs now (a cancel's signal is for it; its
    name, function and resources, as a ``Call`` has them: a worker runs one task at a
    time), the actor it is, whether ``exit_actor()`` was called, and the GPU ids it may
    use now (its task's, or the actor's for its life)."""

    def __init__(self):
        self.task_id: Optional[bytes] = None
        self.name: Optional[str] = None
        self.function = None
        self.resources: Optional[dict] = None
        # The placement group the task or actor runs in: (pg id, bundle index, whether it
        # captures the tasks it starts), or None (``_placement_group``)
        self.placement: Optional[tuple] = None
        self.actor_id: Optional[bytes] = None
        self.actor_options: Optional[dict] = None
        self.actor_class: Optional[type] = None
        self.restarted = False         # this actor process replaces one that died
        self.in_asyncio_actor = False
        self.exit_requested = False  # exit_actor() was called, whether or not it was caught
        self.gpu_ids: tuple = ()


current_task = TaskContext()


class Call:
    """The task or actor call that runs in this thread, or this asyncio task, as
    ``get_runtime_context()`` sees it (``current_call``): threaded and async actors run
    several calls at once."""

    __slots__ = ("task_id", "name", "function", "resources")

    def __init__(self, task_id: bytes, name: str, function, resources: dict):
        self.task_id = task_id
        self.name = name
        self.function = function    # what runs: the function, or the actor's method
        self.resources = resources  # what the call holds, as get_assigned_resources() says


current_call: contextvars.ContextVar = contextvars.ContextVar("shmray_call", default=None)


def running_call():
    """The call that runs here (an actor's, in this thread or asyncio task), or the task
    this worker runs, or None in the driver: something with ``task_id``, ``name``,
    ``function`` and ``resources``."""
    call = current_call.get()
    if call is None and current_task.task_id is not None:
        return current_task
    return call


# Whether a call was cancelled (``RuntimeContext.is_canceled``): the worker or actor sets it.
is_canceled: Callable[[bytes], bool] = lambda task_id: False


# Where a cancelled task may be interrupted at once: shmray's functions marked with
# ``cancel_point``.  Anywhere else in shmray (a put half written, a message half read), the
# interrupt waits until shmray is done (``Link.take_interrupt``).
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_cancel_points: set = set()


def cancel_point(function):
    """Mark ``function`` as a place where a cancel may interrupt a task at once: it runs the
    task's own code, or waits in poll(2) with nothing half done."""
    _cancel_points.add(function.__code__)
    return function


def at_cancel_point(frame) -> bool:
    """Whether a signal that landed in ``frame`` may interrupt the task now: the first of
    shmray's frames out from it is a cancel point (or none is: not shmray's code at all)."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(_PACKAGE):
            return code in _cancel_points
        frame = frame.f_back
    return True
