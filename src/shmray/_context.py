"""This process's place in a session: its runtime, and the task or actor call it runs now.

Runs in: every process.

The lowest of shmray's modules: it imports none of the others, so any module can ask
"which runtime is this process's?" or "which task runs here?" without importing the modules
that make runtimes and run tasks.  ``runtime`` is set when the process joins a session (the
driver at ``init``, a worker or actor when it starts) and cleared when it leaves it; every
ObjectRef made in the process counts itself on it.
"""

from __future__ import annotations

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
        self.exit_requested = False  # exit_actor() was called, whether or not it was caught


current_task = TaskContext()
