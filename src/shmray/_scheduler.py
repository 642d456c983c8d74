"""The scheduler: one single-threaded event loop that never runs user code.

Runs in: the scheduler process (forked by the driver at ``init``).

Data flow for one task (each arrow one message, batched with whatever else is queued)::

    driver/worker                 scheduler                         worker
    ─────────────                 ─────────                         ──────
    SUBMIT(spec) ───────────────▶ task table, dependency counts
                                  ready queue ── resources fit ──▶ EXECUTE(spec, inline args)
                                                                    run; big results sealed
                                                                    straight into the arena
                                  object directory ◀───────────── TASK_DONE(results)
    READY(id, data|None) ◀─────── owner (the submitter) and
                                  subscribers; dependents wake

- Object directory: for each object, where it is (inline bytes kept here, or the arena), who
  holds it (processes with a live ObjectRef; pending tasks that use it as an argument; stored
  objects that contain it).  An object is freed when nothing holds it; freeing an arena object
  that is still viewed only marks it, and the store frees it at the last unpin.
- Dependencies: a task waits for its top-level ref arguments; a failed one fails the task with
  the same error, without running it.
- Resources: a task takes its ``num_cpus``/``num_gpus``/custom resources while it runs; a worker
  blocked in ``get``/``wait`` lends its CPUs back, and more workers are forked when every worker
  is busy, so nested tasks can't deadlock a small pool.
- Leases: the driver runs its plain tasks on workers lent to it (``_runtime``, "leases"):
  it asks for as many as its backlog could use (LEASE_REQUEST, a standing request met as
  workers become free, unless work queued here needs the CPU: ``_grant_leases``), sends
  them tasks itself, two hops instead of four (``_direct``), and gives a lease back when
  idle for 2 ms, or once its tasks are done when recalled here.  Those tasks are the
  driver's: this process hears of one only when it must (DIRECT_SUBMIT; SUBMIT for one
  not sent yet), and then of its results (LEASED_DONE); the worker reports only results it
  can't hand over (refs inside, a failure to retry: DIRECT_DONE, before it answers).  So the
  driver is the one witness of what it has seen: when a leased worker dies, the driver
  reads all it sent, registers the tasks left unanswered and says in which order it sent
  them (LEASE_LOST, LEASE_RETURN, LEASE_VERDICT).  The one the worker's slot names as
  started is retried or failed like any other; the rest run again without using a retry
  (``_settle_lost_lease``).  A result the driver has seen is never retried or failed.
- Short tasks are sent ahead: when every CPU is taken, a busy worker running a function known
  to be short and never to block gets the next task of the same shape in advance, and starts
  it without a round trip; functions that never took over 2 ms get up to 16 (``_prefetch``).
- A worker that dies mid-task: its task is retried up to ``max_retries`` on a fresh worker,
  then fails with ``WorkerCrashedError``; tasks sent ahead to it run elsewhere; the pool is
  refilled.
- Actors: each has a record (``Actor``) with per-caller queues; calls are forwarded in order
  as their arguments become ready; restarts and deaths are decided here.  Calls without refs
  among their arguments go straight from caller to actor (``_direct``); both ends report them
  here (DIRECT_CALL, DIRECT_DONE, in either order), so they are owed, failed and retried like
  forwarded ones, and a caller's forwarded calls wait until its direct ones are done.
- The driver's connection closing (exit, crash or SIGKILL) ends the session: workers are
  killed, the session folder is removed, and the scheduler exits.

Each loop turn: wait for readable sockets, handle every message that arrived (one dispatch
table), answer subscriptions to ids that were unknown when read (``_settle_doubtful``), start
what became ready, lend workers to drivers asking (``_grant_leases``), write every queued
message in one frame per peer: at once to workers and actors, and to the driver once the
loop has nothing left to read (``_flush_dirty``).
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import selectors
import shutil
import signal
import sys
import time
import traceback
from typing import Dict, List, Optional

from . import _direct, _protocol as P, _resources, exceptions
from ._connection import Connection, ConnectionClosed
from ._object_store import ObjectNotFoundError, ObjectStore
from ._process import describe_exit
from ._run_times import SHORT_BUDGET, SLOWEST_DECAY
from ._serialization import META_ERROR, serialize

_PREFETCH_MAX_SECONDS = 0.02  # tasks sent ahead to a busy worker: only of functions that
                              # take less than this, so a task waits behind another for
                              # 20 ms at most; more than one only of functions that never
_PREFETCH_BUDGET = SHORT_BUDGET  # took longer than this, while their typical run times add up
_PREFETCH_MAX_DEPTH = 16      # to no more than it, and never more than this many
_NONE = serialize(None).to_bytes()  # the value of a return a task did not report
_HOLD_BACK_MESSAGES = 256   # messages to the driver are held back at most this many...
_HOLD_BACK_SECONDS = 0.001  # ...or this long, while the loop has other messages to handle


class Client:
    """A process connected to the scheduler: the driver, a worker or an actor."""

    __slots__ = ("conn", "pid", "kind", "holds", "functions", "task", "blocked", "alive",
                 "lent", "actor", "held_since", "queued", "cancel_slot", "calls", "leases",
                 "leased_to", "direct", "recalled", "orphans", "blocked_unknown",
                 "verdict_given", "lease_wanted", "unanswered", "killed_for", "killers",
                 "escaped")

    def __init__(self, conn: Connection, pid: int, kind: str):
        self.conn = conn
        self.pid = pid
        self.kind = kind
        self.holds: set = set()          # object ids it has a live ObjectRef to
        self.functions: set = set()      # function ids whose code it has
        self.task: Optional["Task"] = None
        self.blocked = False
        self.alive = True
        self.lent: Dict[str, float] = {}  # resources lent back while blocked
        self.actor: Optional["Actor"] = None  # the actor this process is, if any
        self.held_since = 0.0                 # when its queued messages were last written
        self.queued: collections.deque = collections.deque()  # tasks sent ahead (prefetch)
        self.cancel_slot = None               # a worker's shared slot (``_protocol``): the
                                              # task SIGINT is for, the one it started...
        self.calls: Dict[bytes, int] = {}     # fn id -> tasks run (max_calls)
        self.leases: set = set()              # workers lent to this client
        self.leased_to: Optional["Client"] = None  # a worker: the client it is lent to
        self.direct: Dict[bytes, "Task"] = {}      # a leased worker: tasks sent to it
        self.recalled = False                 # a leased worker: asked back
        # A leased worker's task may submit children, or wait in get(), before its driver's
        # registration of it arrives: kept here until it does.
        self.orphans: List[tuple] = []     # (parent id, task)
        self.blocked_unknown: set = set()  # ids of those of its tasks that waited in get()
        self.verdict_given = False  # a leased worker: its driver has said what it got
        self.unanswered: list = []  # ...and which tasks it sent that it got no answer to
        self.lease_wanted = 0       # a driver: how many more workers it asks to lease
        self.killed_for: Optional[bytes] = None  # a worker: the task a forced cancel was for
        self.killers: list = []     # an actor: (client, request id) of kill()s to answer
        self.escaped: set = set()   # ids it pickled itself: held until it exits

    def __repr__(self) -> str:
        return f"<{self.kind} pid={self.pid}>"


class ObjectEntry:
    __slots__ = ("ready", "data", "metadata", "holders", "arg_holds", "container_holds",
                 "contained", "subscribers", "dependents", "actor")

    def __init__(self):
        self.ready = False
        self.data: Optional[bytes] = None   # inline bytes; None while pending or in the arena
        self.metadata = b""
        self.holders: set = set()           # Clients with a live ref
        self.arg_holds = 0                  # pending tasks that take it as an argument
        self.container_holds = 0            # stored objects that contain a ref to it
        self.contained: List[bytes] = []    # refs this object's value contains
        self.subscribers: List[Client] = []
        self.dependents: List["Task"] = []
        self.actor = False                  # the pseudo-object that actor handles hold

    @property
    def in_arena(self) -> bool:
        return self.ready and self.data is None and not self.actor

    @property
    def failed(self) -> bool:
        return self.metadata == META_ERROR

    @property
    def unheld(self) -> bool:
        return not self.holders and not self.arg_holds and not self.container_holds


class Task:
    __slots__ = ("spec", "task_id", "name", "owner", "return_ids", "resources", "shape",
                 "waiting_on",
                 "retries_left", "worker", "finished", "held_ids", "actor", "children",
                 "cancelled", "started_at", "direct")

    def __init__(self, spec: tuple, owner: Client):
        self.spec = spec
        self.task_id = spec[P.SPEC_TASK_ID]
        self.name = spec[P.SPEC_NAME]
        self.owner = owner
        num_returns = spec[P.SPEC_NUM_RETURNS]
        self.return_ids = [self.task_id + (i + 1).to_bytes(4, "little")
                           for i in range(max(num_returns, 1))]
        self.resources: Dict[str, float] = spec[P.SPEC_RESOURCES]
        self.shape = tuple(sorted(self.resources.items()))
        self.waiting_on = 0
        self.retries_left = spec[P.SPEC_MAX_RETRIES]
        self.worker: Optional[Client] = None
        self.finished = False
        # every id the task holds until it finishes: top-level args and refs nested in args
        self.held_ids = list(spec[P.SPEC_ARG_IDS]) + list(spec[P.SPEC_CONTAINED])
        self.actor: Optional["Actor"] = None  # set for actor method calls
        self.children: List["Task"] = []      # tasks it submitted while running (cancel)
        self.cancelled = False
        self.started_at = 0.0
        self.direct = False  # sent straight to its actor or leased worker by its caller


class Actor:
    """The scheduler's record of one actor: its process, its mailbox order, its fate."""

    __slots__ = ("actor_id", "spec", "options", "class_name", "client", "state", "queues",
                 "inflight", "restarts_left", "death", "no_restart", "held", "waiting_on",
                 "creation_holds", "out_of_scope", "direct_open", "exit_sent")

    def __init__(self, spec: tuple):
        self.actor_id = spec[P.ACTOR_ID]
        self.spec = spec
        self.options = spec[P.ACTOR_OPTIONS]
        self.class_name = spec[P.ACTOR_CLASS_NAME]
        self.client: Optional[Client] = None
        self.state = "pending"                # pending -> alive -> (pending again) -> dead
        self.queues: Dict[Client, collections.deque] = {}   # per caller, in call order
        self.inflight: Dict[bytes, Task] = {}               # sent to the process, not done
        self.direct_open: Dict[Client, int] = {}  # per caller: direct calls not done yet
        self.exit_sent = False
        self.restarts_left = self.options["max_restarts"]
        self.death: Optional[tuple] = None    # (data, metadata) of the error calls get
        self.no_restart = False
        self.held: Dict[str, float] = {}
        self.waiting_on = 0                   # constructor arguments not ready yet
        self.creation_holds = list(spec[P.ACTOR_ARG_IDS]) + list(spec[P.ACTOR_CONTAINED])
        self.out_of_scope = False


class Scheduler:
    def __init__(self, driver_conn: Connection, driver_pid: int, store: ObjectStore,
                 session_dir: str, options: dict, spawn_worker, spawn_actor=None):
        self.store = store
        self.session_dir = session_dir
        self.options = options
        self._spawn_worker = spawn_worker  # (scheduler) -> (Connection, pid)
        self._spawn_actor = spawn_actor    # (scheduler, class name) -> (Connection, pid)
        self.selector = selectors.DefaultSelector()
        self.clients: Dict[int, Client] = {}
        self.driver = self._add_client(driver_conn, driver_pid, "driver")
        self.objects: Dict[bytes, ObjectEntry] = {}
        self.tasks: Dict[bytes, Task] = {}
        self.ready_by_shape: Dict[tuple, collections.deque] = {}
        self.idle: List[Client] = []
        self.num_workers = 0
        self.busy: set = set()                 # workers running a task
        self.blocking_functions: set = set()   # fn ids whose tasks have waited in get()
        self.durations: Dict[bytes, float] = {}  # fn id -> typical run time (EWMA), seconds
        self.slowest: Dict[bytes, float] = {}    # fn id -> longest run time lately, seconds
        self.functions: Dict[bytes, tuple] = {}
        self.actors: Dict[bytes, Actor] = {}
        self.named: Dict[tuple, bytes] = {}    # (namespace, name) -> actor id
        self.unplaced: List[Actor] = []        # actors waiting for arguments or resources
        # Direct calls whose results came before their caller's registration:
        # task id -> (results, caller pid, retryable).
        self.early_done: Dict[bytes, tuple] = {}
        self.direct_call_count = 0
        self.leased: set = set()  # workers lent to a driver
        self.lease_wanters: set = set()  # drivers with a lease request standing
        # (client, id, subscribe) holds and subscriptions of ids unknown when read
        self.doubtful: list = []
        # Leased tasks whose worker died before their results were reported, until their
        # driver's LEASE_VERDICT: task id -> (task, worker pid, exit status).
        self.awaiting_verdict: Dict[bytes, tuple] = {}
        # Leased workers that died, until their driver's verdict: pid -> (exit status, the
        # last task id the worker named as started in its slot).
        self.lease_deaths: Dict[int, tuple] = {}
        self.function_waiters: Dict[bytes, list] = {}  # fn id -> [(client, request id)]
        num_cpus = float(options["num_cpus"])
        self.total: Dict[str, float] = dict(options["total"])  # _resources.session_totals
        self.available = dict(self.total)
        self.min_workers = max(1, int(num_cpus))
        # Workers beyond the CPUs exist only for tasks blocked in get(); each costs a fork and
        # its memory, so there is a bound, and a warning when it is reached.
        self.max_workers = self.min_workers + 256
        self.warned_cap = False
        self.running = True
        self.internal_errors = 0
        self.dirty: set = set()
        self.handlers = {
            P.REGISTER_FUNCTION: self.on_register_function,
            P.SUBMIT: self.on_submit,
            P.PUT: self.on_put,
            P.HOLD: self.on_hold,
            P.RELEASE: self.on_release,
            P.ESCAPED: self.on_escaped,
            P.SUBSCRIBE: self.on_subscribe,
            P.BLOCKED: self.on_blocked,
            P.HANDED_BACK: self.on_handed_back,
            P.UNBLOCKED: self.on_unblocked,
            P.TASK_DONE: self.on_task_done,
            P.QUERY: self.on_query,
            P.CREATE_ACTOR: self.on_create_actor,
            P.ACTOR_CALL: self.on_actor_call,
            P.KILL_ACTOR: self.on_kill_actor,
            P.ACTOR_STARTED: self.on_actor_started,
            P.ACTOR_EXITING: self.on_actor_exiting,
            P.CANCEL: self.on_cancel,
            P.DIRECT_CALL: self.on_direct_call,
            P.DIRECT_DONE: self.on_direct_done,
            P.LEASE_REQUEST: self.on_lease_request,
            P.LEASE_RETURN: self.on_lease_return,
            P.DIRECT_SUBMIT: self.on_direct_submit,
            P.LEASED_DONE: self.on_leased_done,
            P.LEASE_VERDICT: self.on_lease_verdict,
            P.LEASE_HANDED_BACK: self.on_lease_handed_back,
        }

    # -- clients ---------------------------------------------------------------------------

    def _add_client(self, conn: Connection, pid: int, kind: str) -> Client:
        conn.sock.setblocking(False)
        client = Client(conn, pid, kind)
        self.clients[conn.fd] = client
        self.selector.register(conn.fd, selectors.EVENT_READ, client)
        return client

    def workers(self) -> List[Client]:
        return [c for c in self.clients.values() if c.kind == "worker"]

    def start_worker(self) -> Client:
        # Shared with the worker before it is forked: SIGINT cancels the task named in the
        # first 24 bytes and no other, whatever the worker has moved on to meanwhile; the
        # worker names the last task it started in the next 24 (``_started``).
        slot = mmap.mmap(-1, P.SLOT_SIZE)
        conn, pid = self._spawn_worker(self, slot)
        worker = self._add_client(conn, pid, "worker")
        worker.cancel_slot = slot
        self.num_workers += 1
        self.idle.append(worker)
        return worker

    def send(self, client: Client, message: tuple) -> None:
        if client.alive:
            client.conn.send(message)
            self.dirty.add(client)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        # SIGTERM (sent by the kernel when the driver dies) ends the loop like EOF does.
        signal.signal(signal.SIGTERM, _terminate)
        try:
            self._serve()
        finally:
            self.stop()

    def _serve(self) -> None:
        for _ in range(self.min_workers):
            self.start_worker()
        timeout = 1.0
        while self.running:
            events = self.selector.select(timeout)
            if not events and self.dirty:  # nothing more to read: send what was held back
                self._flush_dirty(everyone=True)
                timeout = 1.0
                continue
            self._handle_events(events)
            if self.doubtful:
                self._settle_doubtful()
            try:
                self.dispatch()
                if self.lease_wanters:
                    self._grant_leases()
            except Exception:  # e.g. fork failing for lack of memory: retried next turn
                self.internal_errors += 1
                traceback.print_exc()
            self._flush_dirty(everyone=False)
            timeout = 0 if self.dirty or self.doubtful else 1.0

    def _handle_events(self, events) -> None:
        for key, mask in events:
            client: Client = key.data
            if mask & selectors.EVENT_WRITE and client.alive:
                self._write(client)
            if mask & selectors.EVENT_READ and client.alive:
                self._read(client)

    def _settle_doubtful(self) -> None:
        """Holds of and subscriptions to ids unknown when read: first read everything every
        process had sent by now.  A ref leaves its process only after the message that makes
        its object known was written (``Runtime.exported``), so that message is among those
        bytes; an id still unknown after them is one nobody will ever make known."""
        doubtful, self.doubtful = self.doubtful, []
        for client in list(self.clients.values()):
            if client.alive:
                self._read(client, everything=True)
        for client, object_id, subscribe in doubtful:
            if not client.alive:
                continue
            if subscribe:
                self._subscribe(client, object_id)
            elif object_id in self.objects:  # else it is gone, and its get says so
                self.on_hold(client, (object_id,))

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
                _kill_quietly(client.pid)
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
                self.selector.modify(client.conn.fd, selectors.EVENT_READ, client)
        except (ConnectionClosed, OSError):
            self.on_disconnect(client)

    def _flush_dirty(self, everyone: bool) -> None:
        """Write queued messages: to workers and actors at once (they have work to start),
        to the driver only once the loop runs out of messages to handle, or a backlog or a
        millisecond has built up.  A lone round trip is answered just as fast (the loop goes
        idle right after), while a burst of results costs the driver one wake-up, not one
        per task: each wake-up across CPUs costs ~30 us here (DESIGN.md)."""
        dirty, self.dirty = self.dirty, set()
        now = time.monotonic()
        for client in dirty:
            if not client.alive:
                continue
            if not everyone and client.kind == "driver":
                if client.conn.pending and len(client.conn.pending) < _HOLD_BACK_MESSAGES \
                        and now - client.held_since < _HOLD_BACK_SECONDS:
                    self.dirty.add(client)
                    continue
            client.held_since = now
            try:
                if not client.conn.flush_nonblocking():
                    self.selector.modify(client.conn.fd,
                                         selectors.EVENT_READ | selectors.EVENT_WRITE, client)
            except ConnectionClosed:
                self.on_disconnect(client)

    # -- objects ---------------------------------------------------------------------------

    def _entry(self, object_id: bytes) -> ObjectEntry:
        entry = self.objects.get(object_id)
        if entry is None:
            entry = self.objects[object_id] = ObjectEntry()
        return entry

    def on_put(self, client: Client, object_id, data, metadata, contained) -> None:
        entry = self._entry(object_id)
        entry.holders.add(client)
        client.holds.add(object_id)
        self._make_ready(object_id, entry, data, metadata, contained)

    def on_hold(self, client: Client, ids) -> None:
        for object_id in ids:
            entry = self.objects.get(object_id)
            if entry is not None:
                entry.holders.add(client)
                client.holds.add(object_id)
            else:  # a ref that came by a way of the user's own, faster: ``_settle_doubtful``
                self.doubtful.append((client, object_id, False))

    def on_escaped(self, client: Client, ids) -> None:
        """Refs the client pickled itself (for a queue or a file of its own): we can't see
        where they go, so it holds their objects until it exits (as Ray does)."""
        for object_id in ids:
            entry = self.objects.get(object_id)
            if entry is not None:
                entry.holders.add(client)
                client.holds.add(object_id)
                client.escaped.add(object_id)

    def on_release(self, client: Client, ids) -> None:
        for object_id in ids:
            if object_id in client.escaped:
                continue
            client.holds.discard(object_id)
            entry = self.objects.get(object_id)
            if entry is not None:
                entry.holders.discard(client)
                self._maybe_free(object_id, entry)

    def on_subscribe(self, client: Client, ids) -> None:
        for object_id in ids:
            if object_id in self.objects:
                self._subscribe(client, object_id)
            else:
                # Perhaps named in a message another process sent first that is not read
                # yet (a driver registers a task's result before a ref to it leaves by a
                # way of its own): answered once all that has arrived is read.
                self.doubtful.append((client, object_id, True))

    def _subscribe(self, client: Client, object_id: bytes) -> None:
        entry = self.objects.get(object_id)
        if entry is None:
            self.send(client, (P.READY, object_id, *self._lost(object_id)))
        elif entry.ready:
            self.send(client, (P.READY, object_id, entry.data, entry.metadata))
        else:
            entry.subscribers.append(client)

    def _lost(self, object_id: bytes):
        error = exceptions.ObjectLostError(
            f"object {object_id.hex()} is unknown to this session: it was freed (no ref was "
            "left to it) or it belongs to another session"
        )
        return self._serialized(error)

    def _make_ready(self, object_id, entry: ObjectEntry, data, metadata, contained) -> None:
        entry.ready = True
        entry.data = data
        entry.metadata = metadata
        entry.contained = list(contained)
        for inner in entry.contained:
            inner_entry = self.objects.get(inner)
            if inner_entry is not None:
                inner_entry.container_holds += 1
        for subscriber in entry.subscribers:
            self.send(subscriber, (P.READY, object_id, data, metadata))
        entry.subscribers = []
        dependents, entry.dependents = entry.dependents, []
        for task in dependents:
            if task.finished:
                continue
            if isinstance(task, _ActorCreation):
                if entry.failed:
                    self._actor_dead(task.actor, data, metadata)
                else:
                    task.actor.waiting_on -= 1
                continue
            if entry.failed:
                self._fail(task, data, metadata)
            else:
                task.waiting_on -= 1
                if task.waiting_on == 0:
                    self._task_ready(task)
        self._maybe_free(object_id, entry)

    def _maybe_free(self, object_id: bytes, entry: ObjectEntry) -> None:
        # Freeing cascades (a failed dependent releases its arguments, a freed object its
        # contained refs), so an entry may already be gone when its caller gets here.
        if not entry.ready or not entry.unheld or self.objects.get(object_id) is not entry:
            return
        del self.objects[object_id]
        if entry.actor:
            self._actor_out_of_scope(object_id)
        elif entry.in_arena:
            try:
                outcome = self.store.delete(object_id)
            except ObjectNotFoundError:
                outcome = 0
            if outcome & 4:  # SHM_DELETED_SPILLED: the spill file is ours to remove
                _unlink_quietly(os.path.join(self.session_dir, "spill", object_id.hex()))
        for inner in entry.contained:
            inner_entry = self.objects.get(inner)
            if inner_entry is not None:
                inner_entry.container_holds -= 1
                self._maybe_free(inner, inner_entry)

    # -- tasks -----------------------------------------------------------------------------

    def on_register_function(self, client: Client, fn_id, pickled, name) -> None:
        self.functions[fn_id] = (pickled, name)
        for waiter, request_id in self.function_waiters.pop(fn_id, ()):
            self.send(waiter, (P.REPLY, request_id, pickled))

    def _register(self, task: Task, client: Client, parent_id: Optional[bytes] = None) -> None:
        """Record a task; one submitted by a running task is its child, for cancel.  A
        leased worker names the task it runs (``parent_id``): its registration comes from
        the driver, maybe later than this."""
        self.tasks[task.task_id] = task
        if parent_id is None:
            parent = client.task
        else:
            parent = self.tasks.get(parent_id)
            if parent is None:
                client.orphans.append((parent_id, task))  # until it is (on_direct_submit)
        if parent is not None:
            parent.children.append(task)

    def on_submit(self, client: Client, spec: tuple, parent_id=None) -> None:
        task = self._admit(spec, client, parent_id)
        if task.finished:
            return
        missing = _resources.shortfall(task.resources, self.total)
        if missing:  # its submitter checked (``_resources``): this is a backstop
            self._fail(task, *self._serialized(exceptions.TaskUnschedulableError(
                _resources.unschedulable_message(f"task {task.name}()", task.resources,
                                                 self.total, missing))))
            return
        self._count_dependencies(task)
        if task.waiting_on == 0 and not task.finished:
            self._task_ready(task)

    def _admit(self, spec: tuple, client: Client, parent_id: Optional[bytes] = None) -> Task:
        """Record a submitted task or actor call: its results (held by and announced to the
        submitter) and the refs it holds while pending.  An unknown argument fails it."""
        task = Task(spec, client)
        self._register(task, client, parent_id)
        for object_id in task.return_ids:
            entry = self._entry(object_id)
            entry.holders.add(client)
            entry.subscribers.append(client)  # the owner hears of its results unasked
            client.holds.add(object_id)
        unknown = [i for i in task.held_ids if i not in self.objects]
        task.held_ids = [i for i in task.held_ids if i in self.objects]
        for object_id in task.held_ids:
            self.objects[object_id].arg_holds += 1
        if unknown:
            self._fail(task, *self._lost(unknown[0]))
        return task

    def _count_dependencies(self, task: Task) -> None:
        """Wait for the arguments not ready yet; fail at once with a failed one's error."""
        for object_id in task.spec[P.SPEC_ARG_IDS]:
            entry = self.objects[object_id]
            if not entry.ready:
                task.waiting_on += 1
                entry.dependents.append(task)
            elif entry.failed:
                self._fail(task, entry.data, entry.metadata)
                return

    def _task_ready(self, task: Task) -> None:
        if task.actor is not None:
            self._forward(task.actor)
        else:
            self.enqueue(task)

    def dispatch(self) -> None:
        """Start ready tasks while resources and workers allow, FIFO within each shape.

        Ready tasks wait in one queue per resource shape ({"CPU": 1.0} for most), so when
        the CPUs are all taken a turn costs one check per shape, not one per waiting task.
        """
        if self.unplaced:
            self._place_actors()
        for shape, queue in list(self.ready_by_shape.items()):
            demand = queue[0].resources if queue else None
            while queue and self._fits(demand):
                task = queue.popleft()
                if task.finished:
                    continue
                worker = self._idle_worker()
                if worker is None:
                    queue.appendleft(task)
                    self._warn_worker_cap()
                    return
                self._start(task, worker)
            if queue:
                self._prefetch(shape, queue)
                if queue and self._leases_in_the_way(demand):
                    self._recall_leases()
            if not queue:
                del self.ready_by_shape[shape]

    def _idle_worker(self) -> Optional[Client]:
        """A worker with nothing to do, forked if none is (the others wait in get(), their
        CPUs lent), or None at the cap on workers."""
        if self.idle:
            return self.idle.pop()
        if self.num_workers >= self.max_workers:
            return None
        self.start_worker()
        return self.idle.pop()

    def _prefetch(self, shape: tuple, queue: collections.deque) -> None:
        """Send short tasks ahead to busy workers of the same shape.

        A worker that finishes a task then starts the next without waiting for the
        scheduler: no round trip, and no wake-up, which are most of a short task's cost; a
        worker with several queued reports them in one message (``Worker.report``).  Only
        functions seen to run under _PREFETCH_MAX_SECONDS qualify, so a task never waits
        long behind another while some other worker could have taken it; and only behind a
        running task of such a function that has never blocked in get(): a task queued behind
        one that waits for it, directly or not, would wait forever (and should one wait
        after all, the worker hands back what it has queued: HANDED_BACK).  Never behind a
        task with max_calls or env_vars: its worker may retire after it.  Workers get one
        task each in turn, so a burst is spread evenly.
        """
        takers = [worker for worker in self.busy
                  if not worker.blocked and worker.task is not None
                  and worker.task.shape == shape and not worker.task.spec[P.SPEC_EXTRA]
                  and self._safe_to_queue_behind(worker.task)]
        while queue and takers:
            for worker in list(takers):
                if not queue:
                    return
                task = queue[0]
                if task.finished:
                    queue.popleft()
                    continue
                fn_id = task.spec[P.SPEC_FN_ID]
                took = self.durations.get(fn_id, 1.0)
                if took >= _PREFETCH_MAX_SECONDS or task.spec[P.SPEC_EXTRA]:
                    return  # env_vars/max_calls: one at a time
                ahead = len(worker.queued)
                if ahead and (ahead >= _PREFETCH_MAX_DEPTH
                              or not self._safe_to_queue_behind(worker.queued[-1])
                              or (ahead + 1) * took > _PREFETCH_BUDGET
                              or self.slowest.get(fn_id, 1.0) > _PREFETCH_BUDGET):
                    takers.remove(worker)
                    continue
                queue.popleft()
                worker.queued.append(task)
                self._send_execute(task, worker)

    def _leases_in_the_way(self, demand) -> bool:
        """Would ``demand`` fit if the CPUs lent to drivers were free?  Only then is a lease
        worth recalling, or not granting, for it: a task waiting for a resource an actor
        holds, or for more CPUs than are free and leased, waits either way."""
        leased = sum(not worker.blocked for worker in self.leased)  # the others' are lent
        available = self.available
        return all(amount <= available.get(name, 0.0) + (leased if name == "CPU" else 0.0)
                   for name, amount in demand.items())

    def _work_waits_for_cpus(self) -> bool:
        """Queued work that leases keep from running: it goes before new leases."""
        return (any(queue and self._leases_in_the_way(queue[0].resources)
                    for queue in self.ready_by_shape.values())
                or any(not actor.waiting_on and self._leases_in_the_way(actor.options["place"])
                       for actor in self.unplaced))

    def _recall_leases(self) -> None:
        """Work waits for a CPU: ask lease holders to give theirs back."""
        for worker in self.leased:
            if not worker.recalled:
                worker.recalled = True
                self.send(worker.leased_to, (P.LEASE_RECALL, worker.pid))

    # -- leases ----------------------------------------------------------------------------

    def on_lease_request(self, client: Client, count: int) -> None:
        """A driver asks for ``count`` more workers, as they become free (0: none)."""
        client.lease_wanted = count if client.kind == "driver" else 0
        if client.lease_wanted:
            self.lease_wanters.add(client)
            self._grant_leases()
        else:
            self.lease_wanters.discard(client)

    def _grant_leases(self) -> None:
        """Lend workers to the drivers asking, while no work of ours waits for a CPU (the
        work queued here goes first: it may be what a leased task waits for)."""
        if self._work_waits_for_cpus():
            return
        for client in list(self.lease_wanters):
            while client.lease_wanted > 0:
                if not client.alive or not self._fits(P.LEASE_SHAPE):
                    return
                worker = self._idle_worker()
                if worker is None:
                    return
                _clear_started(worker)
                worker.leased_to = client
                worker.recalled = False
                worker.verdict_given = False
                worker.unanswered = []
                client.leases.add(worker)
                self.leased.add(worker)
                self.available["CPU"] -= 1.0
                client.lease_wanted -= 1
                self.send(client, (P.LEASE_GRANTED, worker.pid))
            self.lease_wanters.discard(client)

    def on_lease_return(self, client: Client, worker_pid, unanswered) -> None:
        """Done with a lease; ``unanswered``: the tasks sent on it whose results never came
        (its channel ended), which the driver has registered just before; None: the driver
        could not reach the worker, which is replaced."""
        if unanswered:  # the driver has reported all that came back on it
            self._settle_verdict(client, worker_pid, unanswered)
        for worker in client.leases:
            if worker.pid == worker_pid:
                self._end_lease(worker)
                if unanswered is None:
                    _kill_quietly(worker.pid)  # its death refills the pool
                elif unanswered and worker.direct:
                    # Tasks on it whose results can no longer reach their driver: lost
                    # once it is gone (the driver has had its say).
                    worker.verdict_given = True
                    worker.unanswered = unanswered
                    _kill_quietly(worker.pid)
                elif worker.alive and worker.task is None:
                    self.idle.append(worker)
                return

    def on_lease_handed_back(self, client: Client, worker_pid, task_ids) -> None:
        """Tasks a driver had sent to its leased worker, which gave them back unstarted
        (its running task waits in get()): they run here."""
        worker = next((w for w in client.leases if w.pid == worker_pid), None)
        for task_id in reversed(task_ids):  # each to the front: they keep their order
            task = self.tasks.get(task_id)
            if task is None or task.finished:
                continue
            if worker is not None:
                worker.direct.pop(task_id, None)
            task.worker = None
            if task.cancelled:  # its cancel was on its way to the worker
                self._fail(task, *self._cancelled_error(task))
            else:
                self._requeue_front(task)

    def _end_lease(self, worker: Client) -> None:
        worker.leased_to.leases.discard(worker)
        worker.leased_to = None
        self.leased.discard(worker)
        if worker.blocked:  # its CPU was lent back while a task waited in get()
            worker.blocked = False
        else:
            self.available["CPU"] += 1.0

    def on_direct_submit(self, client: Client, worker_pid, spec: tuple) -> None:
        """A task its submitter sent straight to the worker ``worker_pid`` it leases."""
        task = self._admit(spec, client)
        task.direct = True
        early = self.early_done.pop(task.task_id, None)
        if early is not None:
            for worker in client.leases:  # it is over: children it left are nobody's now
                if worker.pid == worker_pid:
                    self._adopt(worker, task)
                    task.children = []
            self._leased_task_done(task, early[0], early[2])
            self._unprotect(early[0])
            return
        if task.finished:
            return
        for worker in client.leases:
            if worker.pid == worker_pid and worker.alive:
                worker.direct[task.task_id] = task
                task.worker = worker
                self._adopt(worker, task)
                return
        # It died before this registration came: its driver may have seen the result.
        self._await_verdict(task, worker_pid, None)

    def _adopt(self, worker: Client, task: Task) -> None:
        """What a leased worker said of ``task`` before its registration came: its children,
        and that it waited in get()."""
        if worker.orphans:
            task.children.extend(t for p, t in worker.orphans if p == task.task_id)
            worker.orphans = [(p, t) for p, t in worker.orphans if p != task.task_id]
        if task.task_id in worker.blocked_unknown:
            worker.blocked_unknown.discard(task.task_id)
            self.blocking_functions.add(task.spec[P.SPEC_FN_ID])

    def on_leased_done(self, client: Client, task_id, delivered) -> None:
        """Results a leased worker sent straight to ``client``, reported by it."""
        task = self.tasks.get(task_id)
        if task is None or task.finished:
            return
        if task.worker is not None:
            task.worker.direct.pop(task_id, None)
        self.awaiting_verdict.pop(task_id, None)
        self._finish_direct(task, [(object_id, data, metadata, ())
                                   for object_id, data, metadata in delivered], False)

    def _await_verdict(self, task: Task, pid: int, status: Optional[int]) -> None:
        """A leased worker died with ``task`` unreported: only its driver knows whether it
        saw the results; ask it (once it has read everything the worker sent)."""
        if task.finished:
            return
        task.worker = None
        asked = pid in self.lease_deaths or any(
            p == pid for _, p, _ in self.awaiting_verdict.values())
        self.awaiting_verdict[task.task_id] = (task, pid, status)
        if not asked:
            self.send(task.owner, (P.LEASE_LOST, pid))

    def on_lease_verdict(self, client: Client, worker_pid) -> None:
        """The driver has reported every result the dead worker sent it, and registered
        the tasks it left unanswered (LEASE_RETURN, which settled them)."""
        self._settle_verdict(client, worker_pid, ())

    def _settle_verdict(self, client: Client, worker_pid: int, unanswered) -> None:
        """The tasks of ``client`` a dead leased worker left unreported never finished (the
        driver has reported all it got): the one the worker died in, and any the driver
        does not list in ``unanswered``, are charged (``_settle_lost_lease``)."""
        status, started_id = self.lease_deaths.pop(worker_pid, (None, None))
        lost = []
        for task_id, (task, pid, died_of) in list(self.awaiting_verdict.items()):
            if pid == worker_pid and task.owner is client:
                del self.awaiting_verdict[task_id]
                lost.append(task)
                status = died_of if died_of is not None else status
        self._settle_lost_lease(lost, unanswered, started_id, worker_pid, status)

    def _settle_lost_lease(self, tasks, unanswered, started_id, pid: int, status) -> None:
        """Tasks a dead leased worker never answered.  It names each in its slot as it
        starts it (``started_id``): that one is lost (retried while retries are left:
        ``_task_lost``).  The others in ``unanswered`` did not kill it: those sent after it
        never started, those before it finished but their results, held back for the next
        frame, died with it; they run again without using a retry."""
        unanswered = set(unanswered)
        for task in tasks:
            if task.finished:
                continue
            task.worker = None
            if (task.task_id == started_id or task.cancelled
                    or task.task_id not in unanswered):
                self._task_lost(task, pid, status)
            else:
                self._delete_partial_returns(task)  # a finished one's, sealed unreported
                self.enqueue(task)

    def _leased_task_done(self, task: Task, results, retryable: bool) -> None:
        if task.finished:
            return
        if retryable and task.retries_left != 0:
            self._retry(task)  # through the scheduler this time; its caller hears of it
        elif retryable:
            self._finish(task, results)  # it was told to wait for this
        else:
            self._finish_direct(task, results, False)

    def _task_lost(self, task: Task, pid: int, status: Optional[int]) -> None:
        """The worker running ``task`` died: a cancelled task is cancelled, others are
        retried while retries are left, then fail with WorkerCrashedError."""
        if task.cancelled:
            self._delete_partial_returns(task)
            self._fail(task, *self._cancelled_error(task))
        elif task.retries_left != 0:
            self._retry(task)
        else:
            self._delete_partial_returns(task)
            self._fail(task, *self._serialized(exceptions.WorkerCrashedError(
                f"the worker (pid {pid}) running {task.name}() died of {_how(status)}. It "
                f"was retried {task.spec[P.SPEC_MAX_RETRIES]} time(s) (max_retries). Likely "
                "causes: the process ran out of memory, a C extension crashed, or it called "
                "os._exit(); set max_retries to try more often.")))

    def _warn_worker_cap(self) -> None:
        if not self.warned_cap:
            self.warned_cap = True
            print(f"shmray: {self.num_workers} workers are running or blocked in get(), the "
                  "most shmray starts; tasks wait until one is free. Deeply nested get() calls "
                  "can deadlock this way: have tasks return refs instead of waiting on them.",
                  file=sys.stderr, flush=True)

    def _safe_to_queue_behind(self, task: Task) -> bool:
        fn_id = task.spec[P.SPEC_FN_ID]
        return (self.durations.get(fn_id, 1.0) < _PREFETCH_MAX_SECONDS
                and fn_id not in self.blocking_functions)

    def _requeue_front(self, task: Task) -> None:
        self.enqueue(task)
        self.ready_by_shape[task.shape].rotate(1)  # back at the head, where it was

    def enqueue(self, task: Task) -> None:
        shape = task.shape
        queue = self.ready_by_shape.get(shape)
        if queue is None:
            queue = self.ready_by_shape[shape] = collections.deque()
        queue.append(task)

    def _fits(self, demand: Dict[str, float]) -> bool:
        available = self.available
        return all(available.get(name, 0.0) >= amount for name, amount in demand.items())

    def _start(self, task: Task, worker: Client) -> None:
        _clear_started(worker)
        self._make_running(task, worker)
        self._send_execute(task, worker)

    def _make_running(self, task: Task, worker: Client) -> None:
        for name, amount in task.resources.items():
            self.available[name] -= amount
        worker.task = task
        task.started_at = time.monotonic()
        self.busy.add(worker)

    def _send_execute(self, task: Task, worker: Client) -> None:
        task.worker = worker
        spec = task.spec
        fn_id = spec[P.SPEC_FN_ID]
        pickled = None
        if fn_id not in worker.functions:
            pickled = self.functions[fn_id][0]
            worker.functions.add(fn_id)
        values = {}
        for object_id in spec[P.SPEC_ARG_IDS]:
            entry = self.objects[object_id]
            if entry.data is not None:
                values[object_id] = (entry.data, entry.metadata)
        self.send(worker, (P.EXECUTE, task.task_id, fn_id, pickled, task.name, spec[P.SPEC_ARGS],
                           spec[P.SPEC_ARG_IDS], spec[P.SPEC_NUM_RETURNS], values,
                           spec[P.SPEC_RETRY_EXCEPTIONS], spec[P.SPEC_EXTRA]))

    def on_task_done(self, worker: Client, task_id, results, retryable,
                     took: Optional[float] = None) -> None:
        if worker.actor is not None:
            task = worker.actor.inflight.pop(task_id, None)
            if task is not None and not task.finished:
                self._finish(task, results)
            return
        task = worker.task
        self._give_back(task, worker)
        if task is not None:
            fn_id = task.spec[P.SPEC_FN_ID]
            if took is None or task.task_id != task_id:
                took = time.monotonic() - task.started_at
            previous = self.durations.get(fn_id)
            self.durations[fn_id] = took if previous is None else 0.8 * previous + 0.2 * took
            # The longest lately: one hiccup (a page fault storm, a preemption) must not
            # keep a function off deep prefetch for good; 20 calls later it is half.
            self.slowest[fn_id] = max(took, SLOWEST_DECAY * self.slowest.get(fn_id, 0.0))
        if task is not None and self._used_up(worker, task):
            worker.task = None
            self.busy.discard(worker)
            self.send(worker, (P.EXIT,))  # after what was sent ahead; EOF then refills the pool
        elif worker.queued:  # it has started the next one already
            self._make_running(worker.queued.popleft(), worker)
        else:
            worker.task = None
            self.busy.discard(worker)
            if worker.alive:
                self.idle.append(worker)
        if task is None or task.task_id != task_id or task.finished:
            self._drop_unclaimed(results)  # e.g. cancelled meanwhile: nobody wants these
            return
        if retryable and task.retries_left != 0:
            self._retry(task)
            return
        self._finish(task, results)

    def _used_up(self, worker: Client, task: Task) -> bool:
        """max_calls: a worker retires after that many calls of the function (Ray's rule,
        e.g. to give back memory a library won't free)."""
        extra = task.spec[P.SPEC_EXTRA]
        if not extra or not extra.get("max_calls"):
            return False
        fn_id = task.spec[P.SPEC_FN_ID]
        worker.calls[fn_id] = worker.calls.get(fn_id, 0) + 1
        return worker.calls[fn_id] >= extra["max_calls"]

    def _give_back(self, task: Optional[Task], worker: Client) -> None:
        if task is not None:
            for name, amount in task.resources.items():
                if name != "CPU" or not worker.blocked:  # a blocked task's CPU was lent already
                    self.available[name] += amount
        worker.blocked = False

    def _retry(self, task: Task) -> None:
        if task.retries_left > 0:
            task.retries_left -= 1
        task.worker = None
        self._delete_partial_returns(task)
        self.enqueue(task)

    def _delete_partial_returns(self, task: Task) -> None:
        """A crashed attempt may have sealed some of its returns already."""
        for object_id in task.return_ids:
            _delete_quietly(self.store, object_id)

    def _finish(self, task: Task, results) -> None:
        task.finished = True
        task.children = []
        self.tasks.pop(task.task_id, None)
        if task.actor is not None and task.worker is None:
            # it never reached the actor: the calls queued behind it may go now
            self._forward(task.actor)
        reported = set()
        for object_id, data, metadata, contained in results:
            reported.add(object_id)
            entry = self.objects.get(object_id)
            if entry is None:  # nobody holds it any more: drop what the worker stored
                if data is None:
                    _delete_quietly(self.store, object_id)
                continue
            self._make_ready(object_id, entry, data, metadata, contained)
        for object_id in task.return_ids:  # e.g. the hidden return of num_returns=0
            entry = self.objects.get(object_id)
            if object_id not in reported and entry is not None and not entry.ready:
                self._make_ready(object_id, entry, _NONE, b"", [])
        self._release_task_holds(task)

    def _fail(self, task: Task, data: bytes, metadata: bytes) -> None:
        self._finish(task, [(object_id, data, metadata, []) for object_id in task.return_ids])

    def _release_task_holds(self, task: Task) -> None:
        held, task.held_ids = task.held_ids, []
        self._release_arg_holds(held)

    def _release_arg_holds(self, ids) -> None:
        """Drop the holds a pending task or actor constructor had on its arguments."""
        for object_id in ids:
            entry = self.objects.get(object_id)
            if entry is not None:
                entry.arg_holds -= 1
                self._maybe_free(object_id, entry)

    def on_blocked(self, worker: Client, task_id=None) -> None:
        task = worker.task
        if worker.leased_to is not None and task is None and not worker.blocked:
            worker.blocked = True  # a leased task waits in get(): lend the lease's CPU
            self.available["CPU"] += 1.0
            leased = self.tasks.get(task_id)
            if leased is not None:  # never send tasks ahead behind this function
                self.blocking_functions.add(leased.spec[P.SPEC_FN_ID])
            elif task_id is not None:
                worker.blocked_unknown.add(task_id)  # noted once its task is registered
            return
        if task is None or worker.blocked:
            return
        self.blocking_functions.add(task.spec[P.SPEC_FN_ID])
        worker.blocked = True
        self.available["CPU"] += task.resources.get("CPU", 0.0)

    def on_handed_back(self, worker: Client, task_ids) -> None:
        """Tasks sent ahead to ``worker`` that it will not run: they go back to the front of
        the queue (a cancelled one was failed already)."""
        returned = set(task_ids)
        kept = collections.deque()
        handed = []
        for task in worker.queued:
            (handed if task.task_id in returned else kept).append(task)
        worker.queued = kept
        for task in reversed(handed):
            if not task.finished:
                task.worker = None
                self._requeue_front(task)

    def on_unblocked(self, worker: Client) -> None:
        task = worker.task
        if worker.leased_to is not None and task is None and worker.blocked:
            worker.blocked = False
            self.available["CPU"] -= 1.0  # may go below zero for a while
            return
        if task is None or not worker.blocked:
            return
        worker.blocked = False
        self.available["CPU"] -= task.resources.get("CPU", 0.0)  # may go below zero for a while

    # -- queries ---------------------------------------------------------------------------

    def on_query(self, client: Client, request_id, what) -> None:
        if what == "resources":
            value = dict(self.total)
        elif what == "available":
            value = {k: max(v, 0.0) for k, v in self.available.items() if v > 0}
        elif what == "ping":  # a round trip: everything sent before it has been handled
            value = None
        elif what == "workers":
            value = [w.pid for w in self.workers()]
        elif what == "objects":  # the directory's size, for tests and leak hunting
            value = len(self.objects)
        elif what == "direct_calls":  # how many actor calls took the direct route
            value = self.direct_call_count
        elif what == "named_actors":
            value = sorted(self.named)
        elif isinstance(what, tuple) and what[0] == "function":  # a leased worker lacks it
            fn_id = what[1]
            client.functions.add(fn_id)
            if fn_id not in self.functions:
                # Its driver registered it before sending the task, but on another socket,
                # which may be read after this one: answer once it is in.
                self.function_waiters.setdefault(fn_id, []).append((client, request_id))
                return
            value = self.functions[fn_id][0]
        elif isinstance(what, tuple) and what[0] == "actor":
            actor_id = self.named.get((what[2], what[1]))
            actor = self.actors.get(actor_id) if actor_id is not None else None
            value = (actor_id, actor.options) if actor is not None else None
        else:
            value = None
        self.send(client, (P.REPLY, request_id, value))

    # -- cancel ----------------------------------------------------------------------------

    def on_cancel(self, client: Client, task_id, force, recursive) -> None:
        task = self.tasks.get(task_id)
        if task is not None:
            self._cancel(task, force, recursive)

    def _cancel(self, task: Task, force: bool, recursive: bool) -> None:
        if task.finished or task.cancelled:
            return
        task.cancelled = True
        task.retries_left = 0  # a cancelled task is never retried
        if recursive:
            for child in list(task.children):
                self._cancel(child, force, recursive)
        actor = task.actor
        if actor is not None:
            if task.task_id in actor.inflight and actor.client is not None:
                # The actor drops it if not started, cancels it if async; a running sync
                # call finishes (as in Ray).
                self.send(actor.client, (P.CANCEL_CALL, task.task_id))
            else:
                self._fail(task, *self._cancelled_error(task))
            return
        if task.task_id in self.awaiting_verdict:
            return  # its worker is dead; its driver may have its result: LEASE_VERDICT says
        worker = task.worker
        if worker is None:  # queued, or waiting for its arguments
            self._fail(task, *self._cancelled_error(task))
            return
        # On a worker: the cancel is counted first, then the slot read for the task it
        # started last.  The worker names each task there before it reads the count, so
        # one of us sees the other (``Worker.run``): a task the slot does not name yet is
        # skipped by the worker, which reports it cancelled.
        self._send_cancel_call(worker, task.task_id)
        slot = worker.cancel_slot
        if slot is None or bytes(slot[P.SLOT_STARTED]) == task.task_id:
            self._interrupt(worker, task, force)  # it runs (or has just finished)
        elif not task.direct and task not in _started(worker):
            self._fail(task, *self._cancelled_error(task))  # sent ahead, not started
        # Else: a leased task not started (skipped) or finished (its result comes), or the
        # task the scheduler sent first, not named yet: the worker skips it.

    def _interrupt(self, worker: Client, task: Task, force: bool) -> None:
        """Stop the task ``worker`` runs: kill the worker if forced (its death fails the
        task), else a KeyboardInterrupt in the task, which only that task takes (the slot
        names it as the target)."""
        if force:
            # The one to charge for its death: it may have moved on to a task nobody
            # cancelled by the time the signal lands.
            worker.killed_for = task.task_id
            _kill_quietly(worker.pid)
            return
        if worker.cancel_slot is not None:
            worker.cancel_slot[P.SLOT_TARGET] = task.task_id
        _signal_quietly(worker.pid, signal.SIGINT)

    def _send_cancel_call(self, worker: Client, task_id: bytes) -> None:
        """Skip that task if it has not started: the worker looks for this message before
        each task while its slot counts more than it has read, so it is written first (the
        loop's turn may be long: a recursive cancel of many tasks)."""
        self.send(worker, (P.CANCEL_CALL, task_id))
        try:
            worker.conn.flush_nonblocking()  # what doesn't fit goes when the socket has room
        except ConnectionClosed:
            return  # its death is read next
        if worker.cancel_slot is not None:
            P.count_cancel(worker.cancel_slot)

    def _cancelled_error(self, task: Task) -> tuple:
        return self._serialized(exceptions.TaskCancelledError(task.task_id.hex()))

    # -- actors ----------------------------------------------------------------------------

    def on_create_actor(self, client: Client, request_id, spec: tuple) -> None:
        options = spec[P.ACTOR_OPTIONS]
        actor_id = spec[P.ACTOR_ID]
        name = options["name"]
        key = (options["namespace"], name)
        if name is not None and key in self.named:
            existing = self.actors[self.named[key]]
            if options["get_if_exists"]:
                self._hold_actor(client, existing.actor_id)
                self.send(client, (P.REPLY, request_id, (existing.actor_id, existing.options)))
            else:
                self.send(client, (P.REPLY, request_id, ValueError(
                    f"The name {name!r} (namespace={options['namespace']!r}) is already taken "
                    "by a live actor; pick another name, or pass get_if_exists=True")))
            return
        actor = Actor(spec)
        self.actors[actor_id] = actor
        if name is not None:
            self.named[key] = actor_id
        entry = self._entry(actor_id)
        entry.actor = True
        entry.ready = True
        self._hold_actor(client, actor_id)
        if options["detached"]:
            entry.container_holds += 1  # a detached actor outlives its handles
        unknown = [i for i in actor.creation_holds if i not in self.objects]
        actor.creation_holds = [i for i in actor.creation_holds if i in self.objects]
        for object_id in actor.creation_holds:
            self.objects[object_id].arg_holds += 1
        if request_id is not None:
            self.send(client, (P.REPLY, request_id, (actor_id, actor.options)))
        if unknown:
            self._actor_dead(actor, *self._lost(unknown[0]))
            return
        for object_id in spec[P.ACTOR_ARG_IDS]:
            arg = self.objects[object_id]
            if not arg.ready:
                actor.waiting_on += 1
                arg.dependents.append(_ActorCreation(actor))
            elif arg.failed:
                self._actor_dead(actor, arg.data, arg.metadata)
                return
        self.unplaced.append(actor)

    def _hold_actor(self, client: Client, actor_id: bytes) -> None:
        self.objects[actor_id].holders.add(client)
        client.holds.add(actor_id)

    def _place_actors(self) -> None:
        still = []
        for actor in self.unplaced:
            if actor.state == "dead":
                continue
            place = actor.options["place"]
            missing = _resources.shortfall(place, self.total)
            if missing:  # its creator checked (``_resources``): this is a backstop
                self._actor_dead(actor, *self._serialized(exceptions.ActorUnschedulableError(
                    _resources.unschedulable_message(f"actor {actor.class_name}", place,
                                                     self.total, missing))))
                continue
            if actor.waiting_on or not self._fits(place) or self._spawn_actor is None:
                if (not actor.waiting_on and self._spawn_actor is not None
                        and self._leases_in_the_way(place)):
                    self._recall_leases()  # it waits for a CPU a lease holds
                still.append(actor)
                continue
            self._start_actor(actor)
        self.unplaced = still

    def _start_actor(self, actor: Actor) -> None:
        hold = actor.options["hold"]
        for name, amount in hold.items():
            self.available[name] -= amount
        actor.held = dict(hold)
        conn, pid = self._spawn_actor(self, actor.class_name)
        client = self._add_client(conn, pid, "actor")
        client.actor = actor
        actor.client = client
        actor.state = "alive"
        spec = actor.spec
        values = {i: (self.objects[i].data, self.objects[i].metadata)
                  for i in spec[P.ACTOR_ARG_IDS]
                  if i in self.objects and self.objects[i].data is not None}
        pickled = self.functions[spec[P.ACTOR_CLASS_ID]][0]
        self.send(client, (P.START_ACTOR, spec, pickled, values))
        self._forward(actor)
        if actor.out_of_scope:
            self._exit_when_done(actor)

    def on_actor_started(self, client: Client, error) -> None:
        actor = client.actor
        if actor is None:
            return
        if actor.restarts_left == 0:  # no restart can need the constructor's arguments again
            self._release_creation_holds(actor)
        if error is not None:
            actor.death = (error, META_ERROR)
            actor.no_restart = True  # Ray does not restart an actor whose __init__ raised

    def on_actor_exiting(self, client: Client) -> None:
        if client.actor is not None:
            self.send(client, (P.EXIT,))  # wakes its reader (a threaded actor's main thread)
            client.actor.no_restart = True
            if client.actor.death is None:
                client.actor.death = self._died_error(
                    client.actor, "it exited intentionally (exit_actor() or __ray_terminate__)")

    def on_actor_call(self, client: Client, actor_id, spec: tuple) -> None:
        task = self._admit(spec, client)
        actor = task.actor = self.actors.get(actor_id)
        if task.finished:
            return
        if actor is None:
            self._fail(task, *self._serialized(exceptions.ActorDiedError(
                f"no actor with id {actor_id.hex()} exists in this session")))
            return
        if actor.state == "dead":
            self._fail(task, *actor.death)
            return
        self._count_dependencies(task)
        if task.finished:
            return
        queue = actor.queues.get(client)
        if queue is None:
            queue = actor.queues[client] = collections.deque()
        queue.append(task)
        self._forward(actor)

    def _forward(self, actor: Actor) -> None:
        """Send each caller's calls on, in order, as far as their arguments are ready."""
        client = actor.client
        if client is None or actor.state != "alive":
            return
        for caller, queue in list(actor.queues.items()):
            if actor.direct_open.get(caller):
                continue  # the caller's direct calls, made earlier, run first
            while queue:
                task = queue[0]
                if task.finished:
                    queue.popleft()
                    continue
                if task.waiting_on:
                    break
                queue.popleft()
                actor.inflight[task.task_id] = task
                task.worker = client
                spec = task.spec
                values = {}
                for object_id in spec[P.SPEC_ARG_IDS]:
                    entry = self.objects[object_id]
                    if entry.data is not None:
                        values[object_id] = (entry.data, entry.metadata)
                self.send(client, (P.CALL, task.task_id, spec[P.SPEC_FN_ID], task.name,
                                   spec[P.SPEC_ARGS], spec[P.SPEC_ARG_IDS],
                                   spec[P.SPEC_NUM_RETURNS], values))
            if not queue:
                del actor.queues[caller]

    def on_direct_call(self, client: Client, actor_id, actor_pid, spec: tuple) -> None:
        """A call its caller sent straight to the actor process ``actor_pid``."""
        self.direct_call_count += 1
        task = self._admit(spec, client)
        task.direct = True
        actor = task.actor = self.actors.get(actor_id)
        early = self.early_done.pop(task.task_id, None)
        if early is not None:
            self._finish_direct(task, early[0], early[2])
            self._unprotect(early[0])
            return
        if task.finished:
            return
        if actor is None:
            self._fail(task, *self._serialized(exceptions.ActorDiedError(
                f"no actor with id {actor_id.hex()} exists in this session")))
        elif (actor.state == "alive" and actor.client is not None
              and actor.client.pid == actor_pid):
            actor.inflight[task.task_id] = task
            task.worker = actor.client
            actor.direct_open[client] = actor.direct_open.get(client, 0) + 1
        elif actor.state == "dead":
            self._fail(task, *actor.death)
        elif task.retries_left != 0:  # the process it went to died: retry on the next one
            if task.retries_left > 0:
                task.retries_left -= 1
            actor.queues.setdefault(client, collections.deque()).append(task)
            self._forward(actor)
        else:
            self._fail(task, *self._died_error(
                actor, "its process died while this call was on its way to it or running "
                "(max_task_retries would retry the call)"))

    def on_direct_done(self, client: Client, task_id, results, caller_pid, retryable) -> None:
        actor = client.actor
        if actor is None:  # a leased worker's task
            task = client.direct.pop(task_id, None)
            if task is not None:
                self._leased_task_done(task, results, retryable)
            elif task_id not in self.tasks:
                self._keep_early(task_id, results, caller_pid, retryable)
            return
        task = actor.inflight.pop(task_id, None)
        if task is None:
            if task_id in self.tasks:
                return  # finished meanwhile (e.g. its actor was declared dead)
            self._keep_early(task_id, results, caller_pid, retryable)
            return
        open_calls = actor.direct_open.get(task.owner, 0) - 1
        if open_calls > 0:
            actor.direct_open[task.owner] = open_calls
        else:
            actor.direct_open.pop(task.owner, None)
        if not task.finished:
            self._finish_direct(task, results, retryable)
        if open_calls <= 0:
            if task.owner in actor.queues:
                self._forward(actor)
            if actor.out_of_scope:
                self._exit_when_done(actor)

    def _finish_direct(self, task: Task, results, retryable: bool) -> None:
        """Results the actor has already given the caller itself, except those with refs
        inside and a failure meant for a retry (``Worker.report``): only those are announced
        to it."""
        for object_id, _, _, contained in results:
            entry = self.objects.get(object_id)
            if (not contained and not retryable and entry is not None
                    and task.owner in entry.subscribers):
                entry.subscribers.remove(task.owner)
        self._finish(task, results)

    def _forget_direct_calls_of(self, caller: Client) -> None:
        """A caller died: its direct calls may never reach their actor (still in its
        buffers), and nobody will read their results.  They are finished here; if one ran
        after all, its report finds it finished and its results are dropped."""
        for actor in self.actors.values():
            if actor.direct_open.pop(caller, None) is None:
                continue
            for task_id, task in list(actor.inflight.items()):
                if task.owner is caller and task.direct:
                    del actor.inflight[task_id]
                    self._fail(task, *self._died_error(
                        actor, "the caller of this call died before it was done"))
            self._forward(actor)  # its calls queued here were held behind those
            if actor.out_of_scope:
                self._exit_when_done(actor)

    def _keep_early(self, task_id: bytes, results, caller_pid: int, retryable: bool) -> None:
        """Results that overtook their call's registration: kept, and the refs inside them
        held, until it arrives; dropped if the caller is gone (it never will)."""
        if not any(c.pid == caller_pid for c in self.clients.values()):
            self._drop_results(results)
            return
        for _, _, _, contained in results:
            for inner in contained:
                entry = self.objects.get(inner)
                if entry is not None:
                    entry.container_holds += 1
        self.early_done[task_id] = (results, caller_pid, retryable)

    def _unprotect(self, results) -> None:
        for _, _, _, contained in results:
            for inner in contained:
                entry = self.objects.get(inner)
                if entry is not None:
                    entry.container_holds -= 1
                    self._maybe_free(inner, entry)

    def _drop_unclaimed(self, results) -> None:
        """Arena results of a report that is ignored, unless the object is one the
        directory knows is in the arena (then it is that very object)."""
        for object_id, data, _, _ in results:
            entry = self.objects.get(object_id)
            if data is None and (entry is None or not entry.in_arena):
                _delete_quietly(self.store, object_id)

    def _drop_results(self, results) -> None:
        for object_id, data, _, _ in results:
            if data is None:
                _delete_quietly(self.store, object_id)

    def on_kill_actor(self, client: Client, request_id, actor_id, no_restart) -> None:
        """Kill the actor; answer once its death is dealt with (``on_disconnect``: all it
        sent before it died read first), so that no call made after kill() returns can
        reach the old process."""
        actor = self.actors.get(actor_id)
        if actor is not None and actor.state != "dead":
            if no_restart:
                actor.no_restart = True
                actor.death = self._died_error(actor, "it was killed by kill()")
            if actor.client is not None:
                actor.client.killers.append((client, request_id))
                _kill_quietly(actor.client.pid)
                return
            if no_restart:
                self._actor_dead(actor, *actor.death)
        self.send(client, (P.REPLY, request_id, None))

    def _actor_out_of_scope(self, actor_id: bytes) -> None:
        actor = self.actors.get(actor_id)
        if actor is None or actor.state == "dead":
            return
        actor.out_of_scope = True
        actor.no_restart = True
        actor.death = self._died_error(actor, "every handle to it went out of scope")
        if actor.client is not None:
            self._exit_when_done(actor)
        elif not actor.queues:
            self._actor_dead(actor, *actor.death)
        # else: calls made before the last handle went are still owed; _start_actor sends
        # EXIT after forwarding them, as Ray ends such an actor once they are done

    def _exit_when_done(self, actor: Actor) -> None:
        """EXIT goes after the calls sent through here; calls sent straight to the actor
        travel another way, so it waits until they are done (all are registered by now: a
        caller registers its calls before it releases its last handle)."""
        if not actor.exit_sent and not actor.direct_open and actor.client is not None:
            actor.exit_sent = True
            self.send(actor.client, (P.EXIT,))

    def _actor_died(self, actor: Actor, status: Optional[int]) -> None:
        """The actor's process is gone: restart it, or fail what it owed."""
        for name, amount in actor.held.items():
            self.available[name] += amount
        actor.held = {}
        actor.client = None
        actor.exit_sent = False
        inflight = list(actor.inflight.values())
        actor.inflight.clear()
        actor.direct_open.clear()
        if not actor.no_restart and actor.restarts_left != 0:
            if actor.restarts_left > 0:
                actor.restarts_left -= 1
            actor.state = "pending"
            for task in reversed(inflight):
                if task.retries_left != 0:
                    if task.retries_left > 0:
                        task.retries_left -= 1
                    actor.queues.setdefault(task.owner, collections.deque()).appendleft(task)
                else:
                    self._fail(task, *self._died_error(
                        actor, f"its process died of {_how(status)} while running this call; it "
                        "is being restarted (max_task_retries would retry the call)"))
            self.unplaced.append(actor)
            return
        death = actor.death or self._died_error(
            actor, f"its process died of {_how(status)} (killed, crashed or out of memory)")
        for task in inflight:
            self._fail(task, *death)
        self._actor_dead(actor, *death)

    def _actor_dead(self, actor: Actor, data: bytes, metadata: bytes) -> None:
        actor.state = "dead"
        actor.death = (data, metadata)
        for queue in actor.queues.values():
            for task in queue:
                if not task.finished:
                    self._fail(task, data, metadata)
        actor.queues.clear()
        options = actor.options
        key = (options["namespace"], options["name"])
        if self.named.get(key) == actor.actor_id:
            del self.named[key]
        self._release_creation_holds(actor)
        actor.spec = None  # its code and arguments are not needed any more
        actor.queues.clear()

    def _release_creation_holds(self, actor: Actor) -> None:
        held, actor.creation_holds = actor.creation_holds, []
        self._release_arg_holds(held)

    def _died_error(self, actor: Actor, why: str) -> tuple:
        return self._serialized(exceptions.ActorDiedError(
            f"The actor {actor.class_name} (id {actor.actor_id.hex()}) is dead: {why}. "
            "Calls to it raise this error."))

    @staticmethod
    def _serialized(error: BaseException) -> tuple:
        return serialize(error, META_ERROR).to_bytes(), META_ERROR

    # -- failures and the end --------------------------------------------------------------

    def on_disconnect(self, client: Client) -> None:
        if not client.alive:
            return
        client.alive = False
        self.dirty.discard(client)
        try:
            self.selector.unregister(client.conn.fd)
        except (KeyError, ValueError):
            pass
        self.clients.pop(client.conn.fd, None)
        client.conn.close()
        if client.kind == "driver":
            self.running = False
            return
        self._forget_direct_calls_of(client)
        for task_id, (results, caller_pid, _) in list(self.early_done.items()):
            if caller_pid == client.pid:  # its registration will never come
                del self.early_done[task_id]
                self._drop_results(results)
                self._unprotect(results)
        status = _reap(client.pid)
        self.store.reap(client.pid)
        socket_dir = self.options["socket_dir"]
        _direct.unlink_quietly(_direct.address(socket_dir, client.actor.actor_id)
                               if client.actor is not None
                               else _direct.worker_address(socket_dir, client.pid))
        if client.actor is not None:
            self._release_holds_of(client)
            self._actor_died(client.actor, status)
            for killer, request_id in client.killers:  # kill() returns now
                self.send(killer, (P.REPLY, request_id, None))
            return
        self.num_workers -= 1
        if client in self.idle:
            self.idle.remove(client)
        holder = client.leased_to
        if holder is not None:
            self._end_lease(client)
        slot = client.cancel_slot
        started_id = client.killed_for or (bytes(slot[P.SLOT_STARTED]) if slot is not None
                                           else None)
        if client.verdict_given:
            self._settle_lost_lease(list(client.direct.values()), client.unanswered,
                                    started_id, client.pid, status)
        else:
            if holder is not None and holder.alive:
                # Its driver may hold tasks the scheduler never heard of, and results of
                # those it did: it reports, registers the rest and answers (LEASE_VERDICT).
                self.lease_deaths[client.pid] = (status, started_id)
                self.send(holder, (P.LEASE_LOST, client.pid))
            for task in list(client.direct.values()):
                self._await_verdict(task, client.pid, status)
        client.direct.clear()
        for message in P.parked_reports(client.cancel_slot):
            # Reports it held back (a few short tasks', ``Worker.report``): as if sent.
            if client.task is not None and message[1] == client.task.task_id:
                self.on_task_done(client, *message[1:])
        started = _started(client)
        while len(client.queued) > max(len(started) - 1, 0):  # sent ahead, never started:
            queued = client.queued.pop()                     # run elsewhere, no retry used
            if not queued.finished:
                queued.worker = None
                self._requeue_front(queued)
        task = client.task
        if task is not None:  # what it held (replaying reports may have moved it on)
            self._give_back(task, client)
        client.task = None
        self.busy.discard(client)
        # The one it ran when it died (or, should a report have been too big to park, one it
        # finished before: its result died with it).
        for lost in started:
            if not lost.finished:
                lost.worker = None
                if client.killed_for in (None, lost.task_id):
                    self._task_lost(lost, client.pid, status)
                else:  # killed for another (cancelled) task: this one did nothing wrong
                    self._delete_partial_returns(lost)
                    self._requeue_front(lost)
        client.queued.clear()
        self._release_holds_of(client)
        while self.num_workers < self.min_workers and self.running:
            self.start_worker()

    def _release_holds_of(self, client: Client) -> None:
        """A process is gone: so are its refs."""
        for object_id in list(client.holds):
            entry = self.objects.get(object_id)
            if entry is not None:
                entry.holders.discard(client)
                self._maybe_free(object_id, entry)
        client.holds.clear()
        client.escaped.clear()

    def stop(self) -> None:
        """End every worker, reap them, remove the session folder."""
        # The driver's death arrives twice (EOF and the parent-death SIGTERM); the second
        # must not cut this cleanup short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children = [c for c in self.clients.values() if c.kind != "driver"]
        for child in children:
            _kill_quietly(child.pid)
        for child in children:
            _reap(child.pid, timeout=5.0)
            child.conn.close()
        self.selector.close()
        shutil.rmtree(self.session_dir, ignore_errors=True)
        _direct.remove_socket_folder(self.options["socket_dir"])


def _terminate(signum, frame):
    raise SystemExit(0)


class _ActorCreation:
    """Stands in an object's dependents for an actor waiting for a constructor argument."""

    __slots__ = ("actor",)

    def __init__(self, actor: Actor):
        self.actor = actor

    @property
    def finished(self) -> bool:
        return self.actor.state == "dead"


def _clear_started(worker: Client) -> None:
    """Before an idle worker (so not writing its slot) is given work: nothing started yet."""
    if worker.cancel_slot is not None:
        worker.cancel_slot[P.SLOT_STARTED] = bytes(24)


def _started(worker: Client) -> List[Task]:
    """The tasks ``worker`` has started of those it was sent, in order: the running one, and
    any sent ahead behind it up to the last it named as started in its slot (it may have
    finished some whose reports it has not sent yet)."""
    if worker.task is None:
        return []
    started = [worker.task]
    slot = worker.cancel_slot
    if slot is None or not worker.queued:
        return started
    last = slot[P.SLOT_STARTED]
    if last == worker.task.task_id:
        return started
    for task in worker.queued:
        started.append(task)
        if task.task_id == last:
            return started
    return started[:1]  # it names none of them: it is still on the first


def _how(status: Optional[int]) -> str:
    return describe_exit(status) if status is not None else "an unknown cause"


def _reap(pid: int, timeout: float = 1.0) -> Optional[int]:
    """The exit status of a child that is ending (None if it doesn't end in time)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() > deadline:
            _kill_quietly(pid)
            try:
                return os.waitpid(pid, 0)[1]
            except ChildProcessError:
                return None
        time.sleep(0.001)


def _kill_quietly(pid: int) -> None:
    _signal_quietly(pid, signal.SIGKILL)


def _signal_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _delete_quietly(store: ObjectStore, object_id: bytes) -> None:
    try:
        store.delete(object_id)
    except ObjectNotFoundError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
