"""Forking workers and actors: the mechanics the scheduler's decisions rely on.

Runs in: the scheduler.

A worker is forked from the scheduler, not from the user's driver: the scheduler stays small,
so a fork costs about a millisecond, and the worker still inherits every module the driver had
imported before ``init`` (numpy warm, nothing re-imported).  The child closes every descriptor
of the scheduler's it inherited, so a peer's death is seen as EOF by exactly the process it
concerns.
"""

from __future__ import annotations

import mmap
import os

from . import _direct, _protocol as P, _threads
from ._actor_process import actor_main
from ._connection import connection_pair
from ._process import fork_child
from ._worker import worker_main

_UNNAMED = "w-forking"  # a worker's socket until its pid, which names it, is known


def spawn_worker(scheduler, cancel_slot):
    """Fork one worker; returns (the scheduler's end of its connection, its pid).

    Its listening socket (for a driver that leases it) is made here, before the fork, and
    named after the worker's pid as soon as that is known: it exists before the worker can
    be lent to anyone, so a driver never finds it missing (and mistakes the worker for one
    it can't reach) because the worker has not got round to listening yet."""
    folder = scheduler.options["socket_dir"]
    listener = _direct.listen(os.path.join(folder, _UNNAMED))
    try:
        conn, pid = _spawn(scheduler, "shmray::worker", worker_main, cancel_slot, listener)
        if listener is not None:
            os.rename(os.path.join(folder, _UNNAMED), _direct.worker_address(folder, pid))
    finally:
        if listener is not None:
            listener.close()  # the worker's now
    return conn, pid


def spawn_actor(scheduler, class_name: str):
    """Fork one actor process (named shmray::ClassName); returns (connection, pid, slot).

    The slot (``_protocol``) is shared before the fork: the actor parks there the reports
    of calls whose replies it holds back (``Worker.report``), which the scheduler reads
    if it dies."""
    slot = mmap.mmap(-1, P.SLOT_SIZE)
    return (*_spawn(scheduler, f"shmray::{class_name}", actor_main, slot), slot)


def _spawn(scheduler, name: str, child_main, *extra):
    _threads.before_fork()  # the child inherits its BLAS pools sized for the usual task
    scheduler_end, child_end = connection_pair("scheduler", name)

    def main():
        for client in scheduler.clients.all():
            client.conn.close()
        scheduler.clients.selector.close()
        scheduler_end.close()
        child_main(child_end, scheduler.store, scheduler.session_dir, scheduler.options, *extra)

    pid = fork_child(name, main)
    child_end.close()
    return scheduler_end, pid
