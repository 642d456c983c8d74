"""Forking workers and actors: the mechanics the scheduler's decisions rely on.

Runs in: the scheduler.

A worker is forked from the scheduler, not from the user's driver: the scheduler stays small,
so a fork costs about a millisecond, and the worker still inherits every module the driver had
imported before ``init`` (numpy warm, nothing re-imported).  The child closes every descriptor
of the scheduler's it inherited, so a peer's death is seen as EOF by exactly the process it
concerns.
"""

from __future__ import annotations

from ._connection import connection_pair
from ._process import fork_child


def spawn_worker(scheduler, cancel_slot):
    """Fork one worker; returns (the scheduler's end of its connection, its pid)."""
    from ._worker import worker_main

    return _spawn(scheduler, "shmray::worker", worker_main, cancel_slot)


def spawn_actor(scheduler, class_name: str):
    """Fork one actor process (named shmray::ClassName); returns (connection, pid)."""
    from ._actor_process import actor_main

    return _spawn(scheduler, f"shmray::{class_name}", actor_main)


def _spawn(scheduler, name: str, child_main, *extra):
    scheduler_end, child_end = connection_pair("scheduler", name)

    def main():
        for client in list(scheduler.clients.values()):
            client.conn.close()
        scheduler.selector.close()
        scheduler_end.close()
        child_main(child_end, scheduler.store, scheduler.session_dir, scheduler.options, *extra)

    pid = fork_child(name, main)
    child_end.close()
    return scheduler_end, pid
