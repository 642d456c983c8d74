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

import os
from typing import Optional

runtime = None  # this process's Runtime (``_runtime``), or None outside a session


def install(new_runtime) -> None:
    """Make ``new_runtime`` this process's (None: the process has left its session)."""
    global runtime
    runtime = new_runtime


class TaskContext:
    """The task or actor call this process runs now, as ``get_runtime_context()`` and
    ``exit_actor()`` see it."""

    def __init__(self):
        self.task_id: Optional[bytes] = None
        self.name: Optional[str] = None
        self.actor_id: Optional[bytes] = None
        self.in_asyncio_actor = False
        self.exit_requested = False  # exit_actor() was called, whether or not it was caught


current_task = TaskContext()


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
