"""One process's part of a running session: the ``Runtime``, made of five parts.

Runs in: the driver, every worker and every actor (one Runtime per process).

The parts, each in its module, import one way (a lower one tells a higher one of events
through a hook the higher one sets)::

    link      the connection to the scheduler: sending, the one reader, waiting, the flusher,
      ^       and the one table through which every message from the scheduler is handled
    objects   refs, put, get/wait, where each object is
      ^
    futures   refs as concurrent futures and awaitables
    streams   the items of streaming generator tasks, as they arrive
    channels  actor calls straight to the actor (``_direct``)
      ^
    leases    the driver's plain tasks, straight to workers it leases, owned here

``Runtime`` is the face the rest of shmray sees: the API (``_api``, ``_actor``,
``_remote_function``) calls its methods; a worker or actor process (``_worker``,
``_actor_process``) also uses its ``link`` (the lock, waiting, its descriptors, its hooks).

DESIGN.md sends every task through the scheduler.  For a burst of short tasks that made
the scheduler the bottleneck (~14 us of its CPU a task, and two more wake-ups), so a driver
now runs its plain tasks on workers it leases (``leases``) and the scheduler hears of one
only when it must: Ray's ownership.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Sequence

from .. import _events, _protocol as P, _resources
from .._connection import Connection
from .._object_ref import ObjectRef
from .._object_ref_generator import ObjectRefGenerator
from .._object_store import ObjectStore
from .._pickling import in_own_pickle
from .._spill import Spiller
from .behind import behind_one
from .channels import Channels
from .futures import Futures
from .leases import Leases, leasable
from .link import Link
from .objects import IN_ARENA, INLINE_THRESHOLD, Objects
from .streams import Streams

__all__ = ["IN_ARENA", "INLINE_THRESHOLD", "Runtime"]


_LOOK_EVERY = 50e-6  # results come back from leases: looked for at most this often while
                     # submitting tasks that take refs to them


class Runtime:
    """The session as this process sees it."""

    def __init__(self, store: ObjectStore, conn: Connection, session_dir: str, options: dict,
                 leasing: bool = False):
        self.store = store
        self.session_dir = session_dir
        self.socket_dir = options["socket_dir"]  # where actors and workers listen (_direct)
        self.options = options
        self.total = options["total"]  # the session's resources (``_resources``)
        self.inline_threshold = INLINE_THRESHOLD
        self.forked_from: Optional[int] = None  # in a forked child: the session's process
        self.spiller = Spiller(store, self._spill_dir)
        self.link = link = Link(conn)
        self.objects = objects = Objects(link, store, self.spiller, tracker=self)
        self.futures = Futures(link, objects)
        self.streams = Streams(link, objects)
        self.channels = Channels(link, objects, self.socket_dir)
        self.leases = Leases(link, objects, self.socket_dir,
                             max(int(options.get("num_cpus") or 1), 1), leasing)
        self.leases.register_call = self.channels.register
        link.tend, link.tend_interval = self._tend, self._tend_interval
        if leasing:  # a driver: its flusher also sends what it drops while idle (``poke``)
            link.start_flusher()
        self._feasible: Dict[int, dict] = {}  # resource demands found feasible, by identity
        self._looked_at = 0.0  # when ``take_arrived`` last read what had come back
        self._registered_functions: set = set()
        # A leased worker: the task it runs, named in what it submits (the scheduler may
        # hear of that task from the driver only later); and whether that task submitted
        # tasks or waited in get(), so its driver must register it (RESULT).
        self.running_leased: Optional[bytes] = None
        self.leased_must_register = False
        # The hottest calls, straight to the part that does them (ObjectRef's, get's).
        self.add_local_ref = objects.add_local_ref
        self.add_owned_ref = objects.add_owned_ref
        self.release_later = objects.release_later
        self.get_values = objects.get_values
        self.wait = objects.wait
        self.value_at = objects.value_at
        self.store_object = objects.store_object
        self.still_pending = objects.still_pending
        self.num_local_refs = objects.num_local_refs
        self.settle = objects.settle
        self.wait_streams = self.streams.wait
        self.future_of = self.futures.future_of
        self.await_ref = self.futures.await_ref
        self.send = link.send
        self.flush = link.flush
        self.flush_later = link.flush_later
        self.poke = link.poke

    def _tend_interval(self) -> Optional[float]:
        """How soon the flusher should next look after the leases and channels."""
        intervals = [interval for interval in (self.leases.tend_interval(),
                                               self.channels.tend_interval())
                     if interval is not None]
        return min(intervals) if intervals else None

    def _tend(self) -> None:
        """The flusher's round (``Link``): the program may be busy elsewhere."""
        self.leases.tend()
        self.channels.tend()

    def _spill_dir(self) -> str:
        path = os.path.join(self.session_dir, "spill")
        os.makedirs(path, exist_ok=True)
        return path

    # -- objects ---------------------------------------------------------------------------

    def put(self, value) -> ObjectRef:
        return self.objects.put(value)

    def exported(self, object_id: bytes) -> None:
        """A ref was pickled (ObjectRef.__reduce__): publish its object.  A pickle of the
        user's own (a multiprocessing queue, a file; not one of our messages, which follow
        the object's registration on the same connection) may reach another process by a
        faster way than ours: what makes the object known is written before this returns,
        and the object is held for as long as this process lives (as in Ray), since we
        can't see when that copy of the ref goes."""
        link = self.link
        if link.closed:
            return
        self.leases.publish((object_id,))
        if in_own_pickle():
            return
        with link.lock:
            unsent = bool(link.conn.pending or link.conn.out)
            link.conn.send(P.escaped([object_id]))  # before any later RELEASE of it
            if unsent:
                link.flush()

    # -- tasks and actors ------------------------------------------------------------------

    def submit(self, spec: tuple, return_ids: Sequence[bytes]) -> List[ObjectRef]:
        """Send a task: a plain one to a worker we lease (``leases``), others through the
        scheduler.  One that can never run raises here, whatever its route.  It is logged
        (``_events``) once sent, not before: the log takes nothing from its round trip."""
        resources = spec[P.SPEC_RESOURCES]
        if self._feasible.get(id(resources)) is not resources:
            self.check_feasible(resources, f"task {spec[P.SPEC_NAME]}()")
        now = time.time()
        refs = self._submit(spec, return_ids)
        arg_ids = spec[P.SPEC_ARG_IDS]  # the first names what it may wait for (state API)
        _events.submitted(spec[P.SPEC_TASK_ID], spec[P.SPEC_NAME], _events.NORMAL_TASK,
                          arg_ids[0] if arg_ids else _events.NO_ID, now)
        return refs

    def _submit(self, spec: tuple, return_ids: Sequence[bytes]) -> List[ObjectRef]:
        if spec[P.SPEC_ARG_IDS]:
            if self.leases.enabled and behind_one(spec):
                with self.link.lock:
                    refs = self.leases.submit_behind(spec, return_ids)
                if refs is not None:
                    return refs
            self.leases.publish(spec[P.SPEC_ARG_IDS])
        if spec[P.SPEC_NUM_RETURNS] == P.STREAMING:
            self._open_stream(spec)
        if self.leases.enabled and leasable(spec):
            with self.link.lock:
                return self.leases.submit(spec, return_ids)
        if self.running_leased is not None:
            self.leased_must_register = True
            return self.objects.send_owning(P.submit(spec, self.running_leased), return_ids)
        return self.objects.send_owning(P.submit(spec), return_ids)

    def take_arrived(self, argument: bytes) -> None:
        """Read the results come back from our leases, without waiting: ``argument``, the
        result of a task of ours on one, may be among them and go as its value
        (``_task_spec``).  Not if a task taking it can go right behind that task anyway
        (``behind``); at most once per ``_LOOK_EVERY``: while a burst is submitted, not
        once a task."""
        with self.link.lock:  # the reader thread changes what was sent to the leases
            if self.leases.can_follow(argument):
                return
            now = time.monotonic()
            if now - self._looked_at < _LOOK_EVERY:
                return
            self._looked_at = now
            self.link.poll()

    def check_feasible(self, demand: dict, what: str, actor: bool = False) -> None:
        """Raise if ``demand`` can never be met here (``_resources``).  A demand found
        feasible is remembered by identity: a remote function's is the same dict every call."""
        _resources.check_feasible(demand, self.total, what, actor)
        if len(self._feasible) > 1024:
            self._feasible.clear()
        self._feasible[id(demand)] = demand

    def ensure_function(self, fn_id: bytes, pickled_fn: Callable[[], bytes], name: str) -> None:
        if fn_id not in self._registered_functions:
            with self.link.lock:
                if fn_id not in self._registered_functions:
                    self.link.conn.send(P.register_function(fn_id, pickled_fn(), name))
                    self._registered_functions.add(fn_id)
                    if self.leases.enabled:  # a leased worker may ask for it at once
                        self.link.flush()

    def create_actor(self, spec: tuple, wait: bool):
        """(handle ref, actor options); waits for the scheduler's answer if ``wait``."""
        actor_id = spec[P.ACTOR_ID]
        _events.submitted(actor_id[:24], f"{spec[P.ACTOR_CLASS_NAME]}.__init__",
                          _events.ACTOR_CREATION_TASK, actor_id)
        self.leases.publish(spec[P.ACTOR_ARG_IDS])
        with self.link.lock:
            if not wait:
                self.link.conn.send(P.create_actor(None, spec))
                ref = self.objects.add_owned_ref(spec[P.ACTOR_ID])
                options = spec[P.ACTOR_OPTIONS]
            else:
                reply = self.link.request(P.create_actor, spec)
                if isinstance(reply, BaseException):
                    raise reply
                actor_id, options = reply
                ref = self.objects.add_owned_ref(actor_id)
        self.link.flush()
        return ref, options

    def call_actor(self, actor_id: bytes, spec: tuple, return_ids, direct_ok: bool,
                   ordered: bool = True) -> List[ObjectRef]:
        """Send an actor call: straight to the actor when ``direct_ok`` (no ref among its
        arguments) and order allows (``channels``), else through the scheduler."""
        now = time.time()
        self.leases.publish(spec[P.SPEC_ARG_IDS])
        if spec[P.SPEC_NUM_RETURNS] == P.STREAMING:
            self._open_stream(spec)
        with self.link.lock:
            refs = self.channels.call(actor_id, spec, return_ids, direct_ok, ordered)
        _events.submitted(spec[P.SPEC_TASK_ID], spec[P.SPEC_NAME], _events.ACTOR_TASK,
                          actor_id, now)
        return refs

    def generator(self, completion: ObjectRef, task_id: bytes) -> ObjectRefGenerator:
        """What a streaming call's ``.remote()`` returns: its items' refs as they come."""
        return ObjectRefGenerator(completion, self, self.streams.table[task_id])

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        """Ask the scheduler to stop the task that makes ``ref`` (``_api.cancel``)."""
        task_id = ref.task_id()
        if force and task_id in self.objects.actor_calls:
            raise ValueError(
                "force=True is not supported for actor calls (as in Ray): use kill() on the actor"
            )
        self.leases.publish([ref.binary()])  # a task only we knew of: the scheduler's now
        self.send(P.cancel(task_id, force, recursive))
        self.flush()

    def _open_stream(self, spec: tuple) -> None:
        extra = spec[P.SPEC_EXTRA] or {}
        self.streams.open(spec[P.SPEC_TASK_ID], extra.get("backpressure", -1))

    def kill_actor(self, actor_id: bytes, no_restart: bool) -> None:
        """Kill an actor; return once it is dead and the scheduler has dealt with its death
        (its calls failed, or it is restarting), so no call made after this reaches it."""
        self.link.request(P.kill_actor, actor_id, no_restart)
        self.channels.killed(actor_id)

    def publish(self, ids) -> None:
        self.leases.publish(ids)

    def return_idle_leases(self) -> None:
        """Give back every lease with no task running (before asking what is available)."""
        with self.link.lock:
            self.leases.return_idle(0.0)

    def query(self, what):
        """Ask the scheduler (resources, workers, actors); waits for the answer."""
        return self.link.request(P.query, what)

    def request(self, make_message: Callable, *fields):
        """Send the scheduler ``make_message(request id, *fields)``; wait for its answer."""
        return self.link.request(make_message, *fields)

    def send_owning(self, message: tuple, return_ids) -> List[ObjectRef]:
        """Send a message that makes ``return_ids``: our refs to them."""
        return self.objects.send_owning(message, return_ids)

    # -- the end ---------------------------------------------------------------------------

    def forget_after_fork(self, parent_pid: int) -> None:
        """In a child the user (or a library) forked from this process: the session is the
        parent's, and the child must never touch it.  No message, no socket shut down (each
        is shared with the parent), no pin released in the arena (the parent's views hold
        them; unpinning is a no-op once the store is abandoned here), no lock taken (a thread
        of the parent may have held one at the fork).  The child's copies of the session's
        descriptors now point at /dev/null: a child that outlives this process can't keep
        its sockets open, which would hide its death from the scheduler."""
        self.link.closed = True
        self.forked_from = parent_pid
        self.store.abandon()
        fds = self.link.descriptors()
        fds.update(channel.conn.fd
                   for channel in [*self.channels.by_actor.values(), *self.leases.held])
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            for fd in fds:
                try:
                    os.dup2(null, fd, inheritable=False)
                except OSError:
                    pass
        finally:
            os.close(null)

    def close(self) -> None:
        link = self.link
        link.stop()
        with link.lock:
            self.objects.clear()
            self.futures.cancel_all()
            self.channels.close()
            self.leases.close()
        self.store.close()
        link.close()
