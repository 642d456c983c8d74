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


def spawn_worker(scheduler):
    """Fork one worker; returns (the scheduler's end of its connection, its pid)."""
    scheduler_end, worker_end = connection_pair("scheduler", "worker")

    def main():
        for client in list(scheduler.clients.values()):
            client.conn.close()
        scheduler.selector.close()
        scheduler_end.close()
        from ._worker import worker_main

        worker_main(worker_end, scheduler.store, scheduler.session_dir, scheduler.options)

    pid = fork_child("shmray::worker", main)
    worker_end.close()
    return scheduler_end, pid


def spawn_actor(scheduler, class_name: str):
    """Fork one actor process (named shmray::ClassName); returns (connection, pid)."""
    scheduler_end, actor_end = connection_pair("scheduler", class_name)

    def main():
        for client in list(scheduler.clients.values()):
            client.conn.close()
        scheduler.selector.close()
        scheduler_end.close()
        from ._actor_process import actor_main

        actor_main(actor_end, scheduler.store, scheduler.session_dir, scheduler.options)

    pid = fork_child(f"shmray::{class_name}", main)
    actor_end.close()
    return scheduler_end, pid
