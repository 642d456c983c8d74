"""Actors: creating, placing and restarting their processes; each caller's calls, in order.

Runs in: the scheduler.

An actor has a record here (``Actor``): its process, per-caller queues of the calls that go
through the scheduler (those with refs among their arguments), the calls sent to its process
and not done yet, and its fate.  Calls are forwarded in each caller's order as their
arguments become ready.  Calls without refs go straight from caller to actor; their callers
own them and tell us of them only when we must (``direct_calls``).  A handle is a reference
to the actor's pseudo-object in the directory: once nothing holds it the actor ends, after
the calls made before (``out_of_scope``).  When the process dies the actor restarts while
``max_restarts`` allows, else it is dead and every call owed or made later fails with its
death; direct calls it owed wait for their callers' word first (``direct_calls``).
"""

from __future__ import annotations

import collections
from typing import Callable, Dict, Iterable, Optional

from .. import _protocol as P, _resources, exceptions
from .._serialization import META_ERROR
from .clients import Client, Clients, how, kill_quietly
from .direct_calls import DirectCalls, died_error, no_such_actor, retry_allowed
from .leases import Leases
from .objects import Directory, ObjectEntry, serialized
from .records import Actor
from .resources import Resources
from .tasks import Tasks


class Actors(DirectCalls):
    def __init__(self, clients: Clients, objects: Directory, resources: Resources,
                 tasks: Tasks, leases: Leases, spawn: Optional[Callable]):
        self.clients = clients
        self.objects = objects
        self.resources = resources
        self.tasks = tasks
        self.leases = leases
        self._spawn = spawn  # (class name) -> (Connection, pid, slot); None: never placed
        self.table: Dict[bytes, Actor] = {}
        self.named: Dict[tuple, bytes] = {}    # (namespace, name) -> actor id
        self.unplaced: list = []               # actors waiting for arguments or resources
        self.direct_call_count = 0
        # Read what a process has sent so far (``loop`` wires it): a caller that heard from
        # a restarted actor directly may reach us before that actor's ACTOR_STARTED does.
        self.catch_up: Callable[[Client], None] = lambda client: None
        self.bundle_for: Callable[[Actor], Optional[Resources]] = lambda actor: None

    # -- creation and placement -----------------------------------------------------------

    def on_create_actor(self, client: Client, request_id, spec: tuple) -> None:
        options = spec[P.ACTOR_OPTIONS]
        actor_id = spec[P.ACTOR_ID]
        name = options["name"]
        key = (options["namespace"], name)
        if name is not None and key in self.named:
            existing = self.table[self.named[key]]
            if options["get_if_exists"]:
                self._hold_actor(client, existing.actor_id)
                self.clients.send(client, P.reply(request_id,
                                                  (existing.actor_id, existing.options)))
            else:
                self.clients.send(client, P.reply(request_id, ValueError(
                    f"The name {name!r} (namespace={options['namespace']!r}) is already taken "
                    "by a live actor; pick another name, or pass get_if_exists=True")))
            return
        actor = Actor(spec)
        self.table[actor_id] = actor
        if name is not None:
            self.named[key] = actor_id
        entry = self.objects.entry(actor_id)
        entry.actor = True
        entry.ready = True
        self._hold_actor(client, actor_id)
        if options["detached"]:
            entry.container_holds += 1  # a detached actor outlives its handles
        actor.creation_holds, unknown = self.objects.hold_arguments(actor.creation_holds)
        if request_id is not None:
            self.clients.send(client, P.reply(request_id, (actor_id, actor.options)))
        if unknown:
            self._dead(actor, *self.objects.lost(unknown[0]))
            return
        for object_id in spec[P.ACTOR_ARG_IDS]:
            arg = self.objects.get(object_id)
            if not arg.ready:
                actor.waiting_on += 1
                arg.dependents.append((actor, self._argument_ready))
            elif arg.failed:
                self._dead(actor, arg.data, arg.metadata)
                return
        self.unplaced.append(actor)

    def _argument_ready(self, actor: Actor, entry: ObjectEntry) -> None:
        if actor.state == "dead":
            return
        if entry.failed:
            self._dead(actor, entry.data, entry.metadata)
        else:
            actor.waiting_on -= 1

    def _hold_actor(self, client: Client, actor_id: bytes) -> None:
        self.objects.get(actor_id).holders.add(client)
        client.holds.add(actor_id)

    def place(self) -> None:
        """Start the actors whose arguments are ready, as resources allow."""
        if not self.unplaced:
            return
        still = []
        total = self.resources.total
        for actor in self.unplaced:
            if actor.state == "dead":
                continue
            place = actor.options["place"]
            missing = _resources.shortfall(place, total)
            if missing:  # its creator checked (``_resources``): this is a backstop
                self._dead(actor, *serialized(exceptions.ActorUnschedulableError(
                    _resources.unschedulable_message(f"actor {actor.class_name}", place,
                                                     total, missing))))
                continue
            pool = self.bundle_for(actor) if actor.options.get("placement") else self.resources
            if actor.waiting_on or pool is None or not pool.fits(place) or self._spawn is None:
                if not actor.waiting_on and self._spawn is not None and pool is self.resources:
                    self.leases.recall_if_in_the_way(place)  # it may wait for a leased CPU
                still.append(actor)
                continue
            self._start(actor, pool)
        self.unplaced = still

    def _start(self, actor: Actor, pool: Resources) -> None:
        hold = actor.options["hold"]
        actor.pool, actor.gpu_ids = pool, pool.take(hold)
        actor.held = dict(hold)
        conn, pid, slot = self._spawn(actor.class_name)
        client = self.clients.add(conn, pid, "actor")
        client.actor, client.park_slot = actor, slot
        actor.client = client
        actor.state = "alive"
        spec = actor.spec
        values = self.objects.inline_values(
            [i for i in spec[P.ACTOR_ARG_IDS] if i in self.objects])
        pickled = self.tasks.dispatcher.functions[spec[P.ACTOR_CLASS_ID]][0]
        self.clients.send(client, P.start_actor(spec, pickled, values, actor.restarting,
                                                actor.gpu_ids))
        self.forward(actor)
        if actor.out_of_scope:
            self._exit_when_done(actor)

    def on_actor_started(self, client: Client, error) -> None:
        actor = client.actor
        if actor is None:
            return
        actor.restarting = False  # as in Ray: back once its constructor has run
        if actor.restarts_left == 0:  # no restart can need the constructor's arguments again
            self._release_creation_holds(actor)
        if error is not None:
            actor.death = (error, META_ERROR)
            actor.no_restart = True  # Ray does not restart an actor whose __init__ raised

    def on_actor_exiting(self, client: Client) -> None:
        if client.actor is not None:
            self.clients.send(client, P.exit_())  # wakes its reader (a threaded actor's)
            client.actor.no_restart = True
            if client.actor.death is None:
                client.actor.death = died_error(
                    client.actor, "it exited intentionally (exit_actor() or __ray_terminate__)")

    # -- calls -----------------------------------------------------------------------------

    def on_actor_call(self, client: Client, actor_id, spec: tuple) -> None:
        task = self.tasks.admit(spec, client)
        actor = task.actor = self.table.get(actor_id)
        if task.finished:
            return
        if actor is None:
            self.tasks.fail(task, *no_such_actor(actor_id))
            return
        if actor.state == "dead":
            self.tasks.fail(task, *actor.death)
            return
        if actor.restarting and not retry_allowed(task) and self._still_restarting(actor, client):
            self.tasks.fail(task, *unavailable(actor))
            return
        self.tasks.count_dependencies(task)
        if task.finished:
            return
        actor.line_up(task)
        self.forward(actor)

    def call_ready(self, task) -> None:
        """A call's arguments are all ready."""
        task.actor.unpark(task)
        self.forward(task.actor)

    def forward(self, actor: Actor) -> None:
        """Send each caller's calls on, in order, as far as their arguments are ready (a
        threaded or async actor's queues hold only calls that are: ``Actor.parked``)."""
        client = actor.client
        if client is None or actor.state != "alive":
            return
        for caller, queue in list(actor.queues.items()):
            if actor.ordered and actor.direct_open.get(caller):
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
                values = self.objects.inline_values(spec[P.SPEC_ARG_IDS])
                self.clients.send(client, P.call(spec, values))
            if not queue:
                del actor.queues[caller]
        if actor.out_of_scope:
            self._exit_when_done(actor)

    def on_call_done(self, client: Client, task_id, results, retryable) -> None:
        """TASK_DONE from an actor process: a call forwarded through here."""
        task = client.actor.inflight.pop(task_id, None)
        if task is None or task.finished:
            return
        if retryable and retry_allowed(task):
            self._retry_call(client.actor, task)
            return
        self.tasks.finish(task, results)
        if client.actor.out_of_scope:
            self._exit_when_done(client.actor)

    def _still_restarting(self, actor: Actor, caller: Client) -> bool:
        """Whether the actor has not run its constructor again, once we have read what its
        new process sent (ACTOR_STARTED may be waiting there)."""
        if actor.restarting and actor.client is not None and actor.client is not caller:
            self.catch_up(actor.client)
        return actor.restarting

    def _retry_call(self, actor: Actor, task) -> None:
        """A call that raised an exception its retry_exceptions covers: again, first in
        its caller's line, through here."""
        task.worker = None
        task.direct = False
        actor.queues.setdefault(task.owner, collections.deque()).appendleft(task)
        self.forward(actor)

    # -- endings ---------------------------------------------------------------------------

    def on_kill_actor(self, client: Client, request_id, actor_id, no_restart) -> None:
        """Kill the actor; answer once its death is dealt with (``process_died``: all it
        sent before it died read first), so that no call made after kill() returns can
        reach the old process."""
        actor = self.table.get(actor_id)
        if actor is not None and actor.state != "dead":
            if no_restart:
                self.end(actor, died_error(actor, "it was killed by kill()"))
            elif actor.client is not None:
                kill_quietly(actor.client.pid)
            if actor.client is not None:
                actor.client.killers.append((client, request_id))
                return
        self.clients.send(client, P.reply(request_id, None))

    def end(self, actor: Actor, death: tuple) -> None:
        """End it for good: what it owes fails with ``death`` (once its process is dead)."""
        actor.no_restart, actor.death = True, death
        if actor.client is not None:
            kill_quietly(actor.client.pid)
        elif actor.state != "dead":
            self._dead(actor, *death)

    def out_of_scope(self, actor_id: bytes) -> None:
        """No handle to the actor is left anywhere (``Directory.on_actor_unheld``)."""
        actor = self.table.get(actor_id)
        if actor is None or actor.state == "dead":
            return
        actor.out_of_scope = True
        actor.no_restart = True
        actor.death = died_error(actor, "every handle to it went out of scope")
        if actor.client is not None:
            self._exit_when_done(actor)
        elif not actor.queues and not actor.parked:
            self._dead(actor, *actor.death)
        # else: calls made before the last handle went are still owed; _start sends EXIT
        # after forwarding them, as Ray ends such an actor once they are done

    def _exit_when_done(self, actor: Actor) -> None:
        """EXIT goes once every call made before is done: calls sent straight to the actor
        travel another way (all are registered by now: a caller registers its calls before
        it releases its last handle), and a call may come back to be retried."""
        if (not actor.exit_sent and not actor.direct_open and not actor.inflight
                and not actor.queues and not actor.parked and actor.client is not None):
            actor.exit_sent = True
            self.clients.send(actor.client, P.exit_())

    def process_died(self, client: Client, status: Optional[int], finished: dict) -> None:
        """The actor's process is gone: restart it, or fail what it owed; then answer the
        kill()s that waited for this.  ``finished``: task id -> results of the calls whose
        replies it parked (``Worker.report``)."""
        self._died(client.actor, status, finished)
        for killer, request_id in client.killers:
            self.clients.send(killer, P.reply(request_id, None))

    def _died(self, actor: Actor, status: Optional[int], finished: dict) -> None:
        (actor.pool or self.resources).give(actor.held, actor.gpu_ids)
        actor.held = {}
        actor.gpu_ids = ()
        actor.client = None
        actor.exit_sent = False
        # Calls still waiting for their callers' word since an earlier death hold their
        # callers' later calls back, as do those this death adds.
        direct_open = actor.direct_open = {}
        for task in actor.awaiting.values():
            direct_open[task.owner] = direct_open.get(task.owner, 0) + 1
        actor.keep_finished(finished)
        owed = []
        for task in actor.inflight.values():
            task.worker = None
            if task.task_id in actor.finished:
                self.tasks.finish(task, [(object_id, data, metadata, ()) for object_id, data,
                                         metadata in actor.finished.pop(task.task_id)])
            elif (task.direct and task.owner.alive
                    and task.task_id not in actor.given_up):
                actor.awaiting[task.task_id] = task  # its caller may have seen the result
                actor.direct_open[task.owner] = actor.direct_open.get(task.owner, 0) + 1
            else:
                owed.append(task)
        actor.inflight.clear()
        actor.given_up.clear()
        if not actor.no_restart and actor.restarts_left != 0:
            if actor.restarts_left > 0:
                actor.restarts_left -= 1
            actor.state = "pending"
            actor.restarting = True
            for task in reversed(owed):
                if retry_allowed(task):
                    task.direct = False
                    actor.queues.setdefault(task.owner, collections.deque()).appendleft(task)
                else:
                    self.tasks.fail(task, *died_error(
                        actor, f"its process died of {how(status)} while running this call; "
                        "it is being restarted (max_task_retries would retry the call)"))
            self.unplaced.append(actor)
            return
        death = actor.death or died_error(
            actor, f"its process died of {how(status)} (killed, crashed or out of memory)")
        for task in owed:
            self.tasks.fail(task, *death)
        self._dead(actor, *death)

    def _dead(self, actor: Actor, data: bytes, metadata: bytes) -> None:
        actor.state = "dead"
        actor.death = (data, metadata)
        for queue in (*actor.queues.values(), list(actor.parked)):
            for task in queue:
                if not task.finished:
                    self.tasks.fail(task, data, metadata)
        actor.queues.clear()
        actor.parked.clear()
        options = actor.options
        key = (options["namespace"], options["name"])
        if self.named.get(key) == actor.actor_id:
            del self.named[key]
        self._release_creation_holds(actor)
        actor.spec = None  # its code and arguments are not needed any more

    def _release_creation_holds(self, actor: Actor) -> None:
        held, actor.creation_holds = actor.creation_holds, []
        self.objects.release_arguments(held)


def placements_waiting(actors: Actors) -> Iterable[dict]:
    """What the actors waiting only for free resources ask (``Leases``): not those in a
    placement group, whose bundle holds theirs already."""
    return (actor.options["place"] for actor in actors.unplaced
            if not actor.waiting_on and actor.options.get("placement") is None)


def unavailable(actor: Actor) -> tuple:
    return serialized(exceptions.ActorUnavailableError(
        f"The actor {actor.class_name} (id {actor.actor_id.hex()}) is restarting after its "
        "process died, and this call has no retries left (max_task_retries): call again "
        "once it is back, or give the call retries to have it wait"))
