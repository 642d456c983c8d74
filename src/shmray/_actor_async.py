"""An async actor's event loops: where its calls run, concurrency groups included.

Runs in: the processes of actors with ``async def`` methods.

The main loop reads the actor's connection and its callers' channels itself (its runtime
is told so: ``external_reader``), starts calls and writes replies.  A call runs as a task on
the loop of its concurrency group (``@method(concurrency_group=...)``, or the call's
``.options``): the default group's loop is the main one, with at most ``max_concurrency``
calls at once (1000 unless set, as in Ray); each named group has a loop of its own, in a
thread of its own, so a group whose calls block (a sync sleep in an async method) never
holds up another.  Calls wait in order until their group has room, in the actor's queue and
then in their group's, where a cancel can still drop them.

A call's end starts the next one on the next turn of the loop, after what the end already
woke: a call waiting on an event set by a finishing call resumes before a new call can see
the state it left (seed 003's batches).
"""

from __future__ import annotations

import collections
import threading
from typing import Dict, Optional

from . import _direct, exceptions


class Group:
    """A concurrency group: its loop, how many calls it may run at once, and those waiting."""

    __slots__ = ("limit", "active", "waiting", "loop", "thread")

    def __init__(self, limit: int, loop, thread: Optional[threading.Thread] = None):
        self.limit = limit
        self.active = 0
        self.waiting: collections.deque = collections.deque()
        self.loop = loop
        self.thread = thread


def run(actor) -> None:
    """Serve ``actor`` on event loops until it ends."""
    # asyncio is imported only where an async actor runs: ~10 ms that every driver would
    # otherwise pay to import shmray, which imports this module.
    import asyncio

    loop = asyncio.SelectorEventLoop(_direct.SpinningSelector())
    asyncio.set_event_loop(loop)
    groups: Dict[Optional[str], Group] = {None: Group(actor.max_concurrency, loop)}
    for name, limit in actor.concurrency_groups.items():
        group_loop = asyncio.new_event_loop()
        thread = threading.Thread(target=group_loop.run_forever, daemon=True,
                                  name=f"shmray-{actor.class_name}-{name}")
        thread.start()
        groups[name] = Group(limit, group_loop, thread)
    actor.groups = groups
    try:
        loop.run_until_complete(_serve(actor, loop, groups))
    finally:
        for group in groups.values():
            if group.thread is not None:
                group.loop.call_soon_threadsafe(group.loop.stop)
                group.thread.join(timeout=5.0)
        loop.close()


async def _serve(actor, loop, groups: Dict[Optional[str], Group]) -> None:
    import asyncio  # see run

    if not actor.construct():
        return
    runtime = actor.runtime
    runtime.link.external_reader = True
    finished = asyncio.Event()
    running = set()
    main_thread = threading.get_ident()

    def on_main_loop(callback) -> None:
        if threading.get_ident() == main_thread:
            loop.call_soon(callback)
        else:
            loop.call_soon_threadsafe(callback)

    def ended(group: Group) -> None:
        group.active -= 1
        start_queued()

    async def serve(message, group: Group):
        try:
            results, retryable = await actor.call_async(message)
        finally:
            on_main_loop(lambda: ended(group))
        try:
            actor.report(message[1], results, retryable)
        except exceptions.RaySystemError:
            on_main_loop(finished.set)
        if actor.exit_requested:
            on_main_loop(finished.set)

    def start_queued() -> None:
        # None starts once the actor is exiting: those that arrive meanwhile fail with its
        # death, as in Ray.
        if actor.exit_requested:
            return
        while actor.queue:
            message = actor.queue.popleft()
            groups.get(group_of(message), groups[None]).waiting.append(message)
        for group in groups.values():
            while group.waiting and group.active < group.limit:
                start(group, group.waiting.popleft())

    def start(group: Group, message) -> None:
        group.active += 1
        if group.loop is loop:
            task = loop.create_task(serve(message, group))
        else:
            task = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(serve(message, group), group.loop), loop=loop)
        running.add(task)
        actor.running_calls[message[1]] = task
        task.add_done_callback(running.discard)
        task.add_done_callback(lambda _t, task_id=message[1]:
                               actor.running_calls.pop(task_id, None))

    def on_readable() -> None:
        if not runtime.link.serve_arrived():
            finished.set()
            return
        start_queued()
        if actor.exiting:
            finished.set()

    def watch(fd, callback) -> None:
        def on_ready():
            with runtime.link.lock:
                callback()
            runtime.link.wake_waiters()
            start_queued()
        loop.add_reader(fd, on_ready)

    def on_unflushed(conn) -> None:
        def on_writable():
            with runtime.link.lock:
                runtime.link.write_some(conn)
                if conn not in runtime.link.unflushed:
                    loop.remove_writer(conn.fd)

        def watch_writable():
            if conn in runtime.link.unflushed:  # not written meanwhile, nor closed
                loop.add_writer(conn.fd, on_writable)

        # Through the loop: the flusher thread writes held replies too (``before_wait``).
        loop.call_soon_threadsafe(watch_writable)

    def unwatch(fd) -> None:
        loop.remove_reader(fd)
        loop.remove_writer(fd)

    actor.wake = lambda: on_main_loop(start_queued)
    actor.watch, actor.unwatch, actor.on_unflushed = watch, unwatch, on_unflushed
    for fd, callback in list(runtime.link.readers.items()):  # the listener, registered early
        runtime.link.readers.pop(fd)
        watch(fd, callback)
    runtime.link.conn.sock.setblocking(False)
    loop.add_reader(runtime.link.conn.fd, on_readable)
    start_queued()
    on_readable()
    await finished.wait()
    loop.remove_reader(runtime.link.conn.fd)
    if actor.exiting:  # EXIT comes after the calls sent before it: finish them all
        while running or not actor.exit_requested and (
                actor.queue or any(group.waiting for group in groups.values())):
            start_queued()
            await asyncio.gather(*running, return_exceptions=True)


def group_of(message: tuple) -> Optional[str]:
    """The concurrency group a CALL names (None: the default group)."""
    extra = message[8]
    return extra.get("group") if extra else None
