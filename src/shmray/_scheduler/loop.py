"""The scheduler's loop: one thread, one selector, one dispatch table; never user code.

Runs in: the scheduler process (forked by the driver at ``init``).

Data flow for one task that goes through the scheduler (each arrow one message, batched
with whatever else is queued; a driver's plain tasks go to workers it leases instead:
``leases``)::

    driver/worker                 scheduler                         worker
    ─────────────                 ─────────                         ──────
    SUBMIT(spec) ───────────────▶ tasks: table, dependency counts
                                  ready queue ── resources fit ──▶ EXECUTE(spec, inline args)
                                                                    run; big results sealed
                                                                    straight into the arena
                                  objects: directory ◀─────────── TASK_DONE(results)
    READY(id, data|None) ◀─────── owner (the submitter) and
                                  subscribers; dependents wake

The parts, each a module that imports only those below it:

- ``placement_groups``: reservations of bundles, and what runs in them;
- ``cancel``: cancel() of tasks and actor calls;
- ``actors``: actor processes, each caller's calls in order, restarts and deaths;
- ``leases``: workers lent to drivers, and what became of their tasks when one dies;
- ``tasks``: admission, dependencies, what workers report, retries;
- ``dispatch``: the ready queues, dispatch to workers, sending short tasks ahead;
- ``objects`` (the directory), ``resources`` (GPUs per id: ``gpu_ids``), ``workers``
  (the pool);
- ``clients``: the connected processes, and what is queued to each;
- ``inspect_server``: the socket the ``shmray`` command line asks its questions on.

Lower parts tell higher ones of events through hooks wired here (an actor call's progress,
work that needs leased CPUs, an actor handle nobody holds, actors waiting to be placed).
Every message is handled through one table (``handlers``); a process's death is fanned out
to each part (``on_disconnect``).

Each turn: wait for readable sockets, handle every message that arrived, answer holds and
subscriptions of ids that were unknown when read (``_settle_doubtful``), start what became
ready, lend workers to drivers asking, and write every queued message in one frame per
peer: at once to workers and actors, to the driver once the loop has nothing left to read
(``_flush_dirty``).  The driver's connection closing (exit, crash or SIGKILL) ends the
session: workers are killed, the session folder is removed, and the scheduler exits.
"""

from __future__ import annotations

import itertools
import selectors
import shutil
import signal
import sys
import time
import traceback
from typing import Callable, Optional

from .. import _direct, _events, _protocol as P, _slot
from .._connection import Connection, ConnectionClosed
from .._object_store import ObjectStore
from . import inspect_server
from .actors import Actors, placements_waiting
from .cancel import Cancel
from .clients import Client, Clients, kill_quietly, reap
from .dispatch import Dispatcher
from .leases import Leases
from .objects import Directory
from .placement_groups import PlacementGroups
from .resources import Resources
from .state import State
from .tasks import Tasks
from .workers import WorkerPool

_STOP_GRACE = 5.0  # at most this long for actors' __ray_shutdown__ when the session ends

_HOLD_BACK_MESSAGES = 256   # messages to the driver are held back at most this many...
_HOLD_BACK_SECONDS = 0.001  # ...or this long, while the loop has other messages to handle
_FILL_AFTER_IDLE = 0.005    # the pool's next worker is forked once the loop idles this long


class Scheduler:
    def __init__(self, driver_conn: Connection, driver_pid: int, store: ObjectStore,
                 session_dir: str, options: dict, spawn_worker: Callable,
                 spawn_actor: Optional[Callable] = None, first_worker: Optional[tuple] = None,
                 driver_events=None):
        self.store = store
        self.session_dir = session_dir
        self.options = options
        options.setdefault("task_events", _events.capacity_of(options))
        self.clients = Clients()
        self.driver = self.clients.add(driver_conn, driver_pid, "driver")
        self.resources = Resources(options["total"], options.get("gpu_ids", ()))
        self.objects = Directory(store, self.clients, session_dir)
        self.spawner = None  # forks the actors, from the first (``_worker_pool``)
        self.pool = WorkerPool(self.clients, lambda slot: spawn_worker(self, slot),
                               float(options["num_cpus"]),
                               _events.log_bytes(options["task_events"]))
        if first_worker is not None:  # forked before all this (``_serve``)
            self.pool.adopt(*first_worker)
        self.dispatcher = Dispatcher(self.clients, self.objects, self.resources, self.pool)
        self.tasks = Tasks(self.clients, self.objects, self.resources, self.pool,
                           self.dispatcher)
        self.leases = Leases(self.clients, self.objects, self.resources, self.pool, self.tasks)
        self.actors = Actors(self.clients, self.objects, self.resources, self.tasks,
                             self.leases,
                             None if spawn_actor is None
                             else lambda class_name: spawn_actor(self, class_name))
        self.cancel = Cancel(self.clients, self.tasks, self.leases)
        self.placement_groups = groups = PlacementGroups(
            self.clients, self.objects, self.resources, self.tasks, self.actors, self.leases)
        self.dispatcher.dispatch_placed = groups.dispatch_placed
        self.actors.bundle_for = groups.bundle_for  # where an actor in a group starts
        self.objects.on_actor_unheld = self.actors.out_of_scope
        self.tasks.forward_actor = self.actors.forward
        self.tasks.actor_call_ready = self.actors.call_ready
        self.actors.catch_up = lambda client: self._read(client, everything=True)
        self.dispatcher.cpu_wanted = self.leases.recall_if_in_the_way
        self.dispatcher.task_sent = self.tasks.extend_ahead
        self.leases.placements_waiting = lambda: itertools.chain(
            placements_waiting(self.actors), groups.waiting())
        self.state = State(self.clients, self.tasks, self.actors, self.objects,
                           self.resources, self.leases, store, options, session_dir,
                           driver_pid, driver_events)
        self.running = True
        self.internal_errors = 0
        self.inspect: Optional[inspect_server.InspectServer] = None  # served once running
        objects, tasks, leases, actors = self.objects, self.tasks, self.leases, self.actors
        self.handlers = {
            P.REGISTER_FUNCTION: self.dispatcher.on_register_function,
            P.SUBMIT: tasks.on_submit,
            P.PUT: objects.on_put,
            P.HOLD: objects.on_hold,
            P.RELEASE: objects.on_release,
            P.ESCAPED: objects.on_escaped,
            P.SUBSCRIBE: objects.on_subscribe,
            P.BLOCKED: tasks.on_blocked,
            P.HANDED_BACK: tasks.on_handed_back,
            P.UNBLOCKED: tasks.on_unblocked,
            P.TASK_DONE: self._on_task_done,
            P.QUERY: self.on_query,
            P.CREATE_ACTOR: actors.on_create_actor,
            P.ACTOR_CALL: actors.on_actor_call,
            P.KILL_ACTOR: actors.on_kill_actor,
            P.ACTOR_STARTED: actors.on_actor_started,
            P.ACTOR_EXITING: actors.on_actor_exiting,
            P.CANCEL: self.cancel.on_cancel,
            P.GENERATED: tasks.on_generated,
            P.CONSUMED: tasks.on_consumed,
            P.DIRECT_CALL: actors.on_direct_call,
            P.DIRECT_DONE: self._on_direct_done,
            P.LEASE_REQUEST: leases.on_lease_request,
            P.LEASE_RETURN: leases.on_lease_return,
            P.DIRECT_SUBMIT: leases.on_direct_submit,
            P.CALLER_DONE: self._on_caller_done,
            P.CALLS_LOST: actors.on_calls_lost,
            P.LEASE_VERDICT: leases.on_lease_verdict,
            P.LEASE_HANDED_BACK: leases.on_lease_handed_back,
            P.CREATE_PLACEMENT_GROUP: groups.on_create,
            P.PLACEMENT_GROUP_READY: groups.on_ready,
            P.REMOVE_PLACEMENT_GROUP: groups.on_remove,
        }

    def _on_task_done(self, client: Client, task_id, results, retryable, took=None) -> None:
        if client.actor is not None:
            self.actors.on_call_done(client, task_id, results, retryable)
        else:
            self.tasks.on_task_done(client, task_id, results, retryable, took)

    def _on_direct_done(self, client: Client, task_id, results, caller_pid, retryable) -> None:
        if client.actor is not None:
            self.actors.on_direct_done(client, task_id, results, caller_pid, retryable)
        else:
            self.leases.on_direct_done(client, task_id, results, caller_pid, retryable)

    def _on_caller_done(self, client: Client, task_id, delivered, actor_id) -> None:
        if actor_id is not None:
            self.actors.on_caller_done(client, actor_id, task_id, delivered)
        else:
            self.leases.on_leased_done(client, task_id, delivered)

    def dispatch(self) -> None:
        """Start what is ready: placement groups, actors whose arguments are, then
        tasks."""
        self.placement_groups.place()
        self.actors.place()
        self.dispatcher.dispatch()

    # -- the loop --------------------------------------------------------------------------

    @staticmethod
    def catch_sigterm() -> None:
        """SIGTERM (sent by the kernel when the driver dies) ends the loop like EOF does.
        Workers forked from here inherit the handler, the first one too (forked before
        ``run``: ``_session``)."""
        signal.signal(signal.SIGTERM, _terminate)

    def run(self) -> None:
        self.catch_sigterm()
        try:
            self.inspect = inspect_server.start(self.session_dir, self.options["socket_dir"],
                                                self.driver.pid, self.clients.selector,
                                                self.answer_inspect)
            self._serve()
        finally:
            self.stop()

    def _serve(self) -> None:
        # One worker now, for the first task (forked before the scheduler was built, when
        # the session starts: ``_worker_pool.spawn_first_worker``); the pool's others one
        # at a time, each once the loop has been idle for _FILL_AFTER_IDLE.  A fork costs
        # milliseconds: forking them all first kept the first task waiting for the last of
        # them, and forking the next as soon as the loop had nothing to read took a CPU
        # from the first worker as it started, and the scheduler from the first task,
        # which waits for its lease meanwhile.  Work that needs a worker before then forks
        # one at once (``WorkerPool.idle_worker``).
        if not self.pool.num_workers:
            self.pool.start_worker()
        timeout = 0
        while self.running:
            events = self.clients.selector.select(timeout)
            if not events and self.clients.dirty:  # nothing more to read: send what waits
                self._flush_dirty(everyone=True)
                timeout = self._idle_timeout()
                continue
            if not events and timeout == _FILL_AFTER_IDLE and self.pool.short():
                self.pool.start_worker()
            self._handle_events(events)
            if self.objects.doubtful:
                self._settle_doubtful()
            try:
                self.dispatch()
                if self.leases.wanters:
                    self.leases.grant()
            except Exception:  # e.g. fork failing for lack of memory: retried next turn
                self.internal_errors += 1
                traceback.print_exc()
            self._flush_dirty(everyone=False)
            more_to_do = self.clients.dirty or self.objects.doubtful
            timeout = 0 if more_to_do else self._idle_timeout()

    def _idle_timeout(self) -> float:
        """How long the loop may wait for a message with nothing else to do."""
        return _FILL_AFTER_IDLE if self.pool.short() else 1.0

    def _handle_events(self, events) -> None:
        for key, mask in events:
            client: Client = key.data
            if client.__class__ is not Client:  # the inspect socket or one of its peers
                client(mask)
                continue
            if mask & selectors.EVENT_WRITE and client.alive:
                self._write(client)
            if mask & selectors.EVENT_READ and client.alive:
                self._read(client)

    def _settle_doubtful(self) -> None:
        """Holds of and subscriptions to ids unknown when read: first read everything every
        process had sent by now.  A ref leaves its process only after the message that makes
        its object known was written (``Runtime.exported``), so that message is among those
        bytes; an id still unknown after them is one nobody will ever make known."""
        doubtful, self.objects.doubtful = self.objects.doubtful, []
        for client in self.clients.all():
            if client.alive:
                self._read(client, everything=True)
        self.objects.settle_doubtful(doubtful)

    def _read(self, client: Client, everything: bool = False) -> None:
        """Handle what ``client`` sent: what one read brings, or ``everything`` it had
        sent by now."""
        try:
            if everything:
                client.conn.fill_arrived()
            else:
                client.conn.fill_nonblocking()
        except (ConnectionClosed, ConnectionResetError):
            self.on_disconnect(client)
            return
        try:
            messages = client.conn.recv_messages(block=False)
        except Exception:  # a corrupt frame: that process is beyond trust, the session is not
            traceback.print_exc()
            print(f"shmray scheduler: unreadable message from {client!r}; dropping it",
                  file=sys.stderr, flush=True)
            if client.kind != "driver":
                kill_quietly(client.pid)
            self.on_disconnect(client)
            return
        handlers = self.handlers
        for message in messages:
            if not client.alive:  # its death was dealt with meanwhile: the rest is moot
                break
            try:
                handlers[message[0]](client, *message[1:])
            except Exception:  # a bug here must not take every task of the session down
                self.internal_errors += 1
                traceback.print_exc()
                print(f"shmray scheduler: internal error handling message {message[0]} from "
                      f"{client!r}; continuing", file=sys.stderr, flush=True)

    def _write(self, client: Client) -> None:
        try:
            if client.conn.flush_nonblocking():
                self.clients.selector.modify(client.conn.fd, selectors.EVENT_READ, client)
        except (ConnectionClosed, OSError):
            self.on_disconnect(client)

    def _flush_dirty(self, everyone: bool) -> None:
        """Write queued messages: to workers and actors at once (they have work to start),
        to the driver only once the loop runs out of messages to handle, or a backlog or a
        millisecond has built up.  A lone round trip is answered just as fast (the loop goes
        idle right after), while a burst of results costs the driver one wake-up, not one
        per task: each wake-up across CPUs costs ~30 us here (DESIGN.md)."""
        clients = self.clients
        dirty, clients.dirty = clients.dirty, set()
        now = time.monotonic()
        for client in dirty:
            if not client.alive:
                continue
            if not everyone and client.kind == "driver":
                if client.conn.pending and len(client.conn.pending) < _HOLD_BACK_MESSAGES \
                        and now - client.held_since < _HOLD_BACK_SECONDS:
                    clients.dirty.add(client)
                    continue
            client.held_since = now
            try:
                if not client.conn.flush_nonblocking():
                    clients.selector.modify(client.conn.fd,
                                            selectors.EVENT_READ | selectors.EVENT_WRITE,
                                            client)
            except ConnectionClosed:
                self.on_disconnect(client)

    # -- queries ---------------------------------------------------------------------------

    def on_query(self, client: Client, request_id, what) -> None:
        if what == "resources":
            value = {**self.resources.total, **self.placement_groups.resource_names(False)}
        elif what == "available":
            value = {**self.resources.free_now(), **self.placement_groups.resource_names(True)}
        elif what == "ping":  # a round trip: everything sent before it has been handled
            value = None
        elif what == "workers":
            value = [w.pid for w in self.clients.workers()]
        elif what == "objects":  # the directory's size, for tests and leak hunting
            value = len(self.objects)
        elif what == "registered_calls":  # direct actor calls their callers registered
            value = self.actors.direct_call_count
        elif what == "sent_ahead":  # tasks sent before their arguments were ready, and of
            value = (self.dispatcher.sent_ahead, self.tasks.not_run)  # those, sent back
        elif what == "named_actors":
            value = sorted(self.actors.named)
        elif isinstance(what, tuple) and what[0] == "state":  # the state API's
            value = self.state.answer(what[1])
        elif isinstance(what, tuple) and what[0] == "function":  # a leased worker lacks it
            self.dispatcher.send_function(client, request_id, what[1])
            return
        elif what == "placement_groups" or (isinstance(what, tuple) and what[0] in (
                "placement_group", "placement_group_named")):
            value = self.placement_groups.query(what)
        elif isinstance(what, tuple) and what[0] == "actor":
            actor_id = self.actors.named.get((what[2], what[1]))
            actor = self.actors.table.get(actor_id) if actor_id is not None else None
            value = (actor_id, actor.options) if actor is not None else None
        else:
            value = None
        self.clients.send(client, P.reply(request_id, value))

    def answer_inspect(self, request: dict):
        """The answer to a request on the inspect socket (``inspect_server``)."""
        if request.get("what") == "ping":
            return {"pong": True}
        state = getattr(self, "state", None)
        if state is None:
            return {"error": f"this session can't answer {request.get('what')!r} yet"}
        return state.answer(request)

    # -- deaths and the end ----------------------------------------------------------------

    def on_disconnect(self, client: Client) -> None:
        """A process is gone (all it sent before has been handled): each part deals with
        what it had of it."""
        if not self.clients.remove(client):
            return
        if client.kind == "driver":
            self.running = False
            return
        self.state.process_gone(client)
        self.actors.caller_died(client)
        self.objects.drop_early_of(client.pid)
        status = self._exit_status(client)
        self.store.reap(client.pid)
        socket_dir = self.options["socket_dir"]
        _direct.unlink_quietly(_direct.address(socket_dir, client.actor.actor_id)
                               if client.actor is not None
                               else _direct.worker_address(socket_dir, client.pid))
        if client.actor is not None:
            # Calls it finished, replies held back as it ran the next (``Worker.report``):
            # done, as if it had sent them; before its holds go, which keep what they name.
            finished = {}
            for message in _slot.parked_reports(client.park_slot):
                if message[0] == P.RESULT:  # a reply to the caller alone
                    finished[message[1]] = message[2]
                else:
                    self.actors.on_direct_done(client, *message[1:])
            self.objects.release_holds_of(client)
            self.actors.process_died(client, status, finished)
            if client.actor.state == "dead":
                self.placement_groups.creator_died(client.actor.actor_id)
            return
        self.pool.gone(client)
        self.leases.worker_died(client, status)
        self.tasks.worker_died(client, status)
        self.objects.release_holds_of(client)
        if self.running:
            self.pool.refill()

    def _exit_status(self, client: Client, timeout: float = 1.0) -> Optional[int]:
        """How a child process ended; one that does not end in time is killed.  An actor is
        the child of the actor forker (``_spawner``), which reports."""
        spawner = self.spawner
        if spawner is None or not spawner.owns(client.pid):
            return reap(client.pid, timeout)
        status = spawner.status(client.pid, timeout)
        if status is None and spawner.owns(client.pid):
            kill_quietly(client.pid)
            status = spawner.status(client.pid)
        return status

    def stop(self) -> None:
        """End every worker, reap them, remove the session folder."""
        # The driver's death arrives twice (EOF and the parent-death SIGTERM); the second
        # must not cut this cleanup short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.inspect is not None:  # from now on a question is refused, not left waiting
            self.inspect.close()
            self.inspect = None
        children = [c for c in self.clients.all() if c.kind != "driver"]
        # Actors with a __ray_shutdown__ end gracefully (it runs, then their atexit
        # handlers), within a grace period; everything else is killed at once.
        graceful = [c for c in children if c.alive and c.actor is not None
                    and c.actor.options.get("shutdown_hook")]
        for child in graceful:
            self.clients.send(child, P.exit_())
        self._flush_dirty(everyone=True)
        for child in children:
            if child not in graceful:
                kill_quietly(child.pid)
        deadline = time.monotonic() + min(self.options.get("graceful_shutdown_s", 30.0),
                                          _STOP_GRACE)
        for child in children:
            self._exit_status(child, max(deadline - time.monotonic(), 0.0)
                              if child in graceful else 5.0)
            child.conn.close()
        if self.spawner is not None:
            self.spawner.close()
        self.clients.selector.close()
        shutil.rmtree(self.session_dir, ignore_errors=True)
        _direct.remove_socket_folder(self.options["socket_dir"])


def _terminate(signum, frame):
    raise SystemExit(0)
