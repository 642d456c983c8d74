"""Forking workers and actors: the mechanics the scheduler's decisions rely on.

Runs in: the scheduler.

A worker is forked from the scheduler, not from the user's driver: the scheduler stays small,
so a fork costs about a millisecond, and the worker still inherits every module the driver had
imported before ``init`` (numpy warm, nothing re-imported).  The child closes every descriptor
of the scheduler's it inherited, so a peer's death is seen as EOF by exactly the process it
concerns.  The session's first worker is forked as soon as the scheduler starts, before it
builds anything (``spawn_first_worker``): the first task waits for that worker, whose start
then overlaps the scheduler's.  Actors are forked by the actor forker (``_spawner``), which
the scheduler forks with the first actor: the scheduler grows with every actor it keeps,
and forking from it cost more per actor the more there were.
"""

from __future__ import annotations

import os

from . import _direct, _events, _slot, _threads
from ._connection import close_fd_quietly, connection_pair
from ._process import fork_child
from ._spawner import Spawner
from ._worker import worker_main

_UNNAMED = "w-forking"  # a worker's socket until its pid, which names it, is known


def spawn_worker(scheduler, cancel_slot):
    """Fork one worker; returns (the scheduler's end of its connection, its pid).

    Its listening socket (for a driver that leases it) is made here, before the fork, and
    named after the worker's pid as soon as that is known: it exists before the worker can
    be lent to anyone, so a driver never finds it missing (and mistakes the worker for one
    it can't reach) because the worker has not got round to listening yet."""
    return _spawn_worker(lambda: _close_scheduler_descriptors(scheduler), scheduler.store,
                         scheduler.session_dir, scheduler.options, cancel_slot)


def spawn_first_worker(driver_conn, store, session_dir: str, options: dict):
    """The session's first worker, forked by the scheduler before it builds anything else
    (``Scheduler(first_worker=...)`` takes it in): (connection, pid, slot).

    The first task waits for this worker, and a fork and a worker's start cost milliseconds
    here (its pages are copied as it touches them): they overlap the scheduler's own
    start instead of following it.  The scheduler has no descriptor yet but the driver's
    connection, which the worker closes."""
    slot = _slot.new_slot(_events.log_bytes(options["task_events"]))
    conn, pid = _spawn_worker(driver_conn.close, store, session_dir, options, slot)
    return conn, pid, slot


def spawn_actor(scheduler, class_name: str):
    """Have one actor process forked (named shmray::ClassName), by the scheduler's actor
    forker (``_spawner``, started with the first actor); returns (connection, pid, slot).

    The slot (``_protocol``) is shared with the scheduler: the actor parks there the
    reports of calls whose replies it holds back (``Worker.report``), which the scheduler
    reads if it dies."""
    for attempt in range(2):
        if scheduler.spawner is None:
            scheduler.spawner = Spawner(lambda: _close_scheduler_descriptors(scheduler),
                                        scheduler.store, scheduler.session_dir,
                                        scheduler.options)
        try:
            return scheduler.spawner.spawn(class_name)
        except OSError:  # it died (killed, out of memory), and its actors with it: anew
            scheduler.spawner.close()
            scheduler.spawner = None
            if attempt:
                raise


def _spawn_worker(close_inherited, store, session_dir: str, options: dict, cancel_slot):
    folder = options["socket_dir"]
    listener = _direct.listen(os.path.join(folder, _UNNAMED))
    try:
        conn, pid = _spawn("shmray::worker", worker_main, close_inherited, store, session_dir,
                           options, cancel_slot, listener)
        if listener is not None:
            os.rename(os.path.join(folder, _UNNAMED), _direct.worker_address(folder, pid))
    finally:
        if listener is not None:
            listener.close()  # the worker's now
    return conn, pid


def _close_scheduler_descriptors(scheduler) -> None:
    # By number: closing each connection object would touch (and copy) its pages, 1.6 ms
    # with 1,000 actors alive; the child never uses those objects, nor lets them go.
    for fd in scheduler.clients.by_fd:
        close_fd_quietly(fd)
    if scheduler.inspect is not None:  # its peers must see EOF when the scheduler hangs up
        for fd in scheduler.inspect.descriptors():
            close_fd_quietly(fd)
    scheduler.clients.selector.close()


def _spawn(name: str, child_main, close_inherited, store, session_dir: str, options: dict,
           *extra):
    """Fork ``child_main``; ``close_inherited`` closes, in the child, the scheduler's
    descriptors it inherits (a peer's death must be seen as EOF by the scheduler alone)."""
    _threads.before_fork()  # the child inherits its BLAS pools sized for the usual task
    scheduler_end, child_end = connection_pair("scheduler", name)

    def main():
        close_inherited()
        scheduler_end.close()
        child_main(child_end, store, session_dir, options, *extra)

    pid = fork_child(name, main)
    child_end.close()
    return scheduler_end, pid
