"""One process's part of a running session: its objects, its refs, its talk with the scheduler.

Runs in: the driver, every worker and every actor (one Runtime per process).

- ``put`` serializes once.  A value under ``INLINE_THRESHOLD`` travels as bytes inside
  messages (Ray keeps objects under 100 KiB out of plasma the same way); a larger one is written
  straight into its arena block by this process: one copy of each buffer.
- ``get`` of an arena object is a table lookup and a mapping: a read-only, zero-copy view,
  pinned for as long as anything built on it lives.  A result this process is waiting for is
  announced by a READY message from the scheduler, or comes straight back on a direct channel
  (RESULT) from an actor or a leased worker (``_direct``).  The thread that waits reads it
  itself (a hand-off between threads costs more than the hop: DESIGN.md), polling every
  descriptor at once; when several threads wait, one reads and the others sleep on a
  condition (leader/followers), and a wake-up pipe makes the reader look again when another
  thread opens a channel.  With a peer on a direct channel, a wait spins briefly first.
- Actor calls without refs among their arguments go straight to the actor.  A driver owns
  its plain tasks (no ref among the arguments, one CPU): they go straight to workers the
  scheduler lends it (leases), several at a time to a worker for short functions, and the
  scheduler hears of one only when it must (see "leases" below: Ray's ownership).  DESIGN.md
  sends every task through the scheduler; for a burst of short tasks that made the
  scheduler the bottleneck (~14 us of its CPU a task, and two more wake-ups), so the
  driver now schedules its own.  The flusher thread sends what may wait (releases,
  registrations) within a millisecond, and looks after leases while the program is busy
  elsewhere.
- Refs are counted locally; the scheduler hears only of first holds and last releases,
  queued and sent with the next message.  ObjectRef.__del__ only appends to a deque.
- When the arena is full: a garbage collection first (refs caught in reference cycles), then
  spilling (``_spill.Spiller``), then ``ObjectStoreFullError`` saying what holds the memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import os
import select
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import _direct, _protocol as P, _resources, exceptions
from ._connection import Connection, ConnectionClosed, wait_readable
from ._ids import object_id_for_put
from ._object_ref import ObjectRef
from ._object_store import (
    ObjectNotFoundError,
    ObjectNotSealedError,
    ObjectSpilledError,
    ObjectStore,
)
from ._run_times import RunTimes
from ._pickling import in_own_pickle
from ._serialization import META_ERROR, deserialize, serialize
from ._spill import Spiller, store_full_error, too_large_error

INLINE_THRESHOLD = 100 * 1024
_RELEASES_ALONE = 64  # queued release messages worth a frame of their own
_BATCH_WINDOW = 200e-6  # a submission this soon after a flush waits for the next frame
_FLUSH_DELAY = 0.001    # ...but no longer than this
_RESTORE_WAIT = 120.0   # how long a get waits for another process to restore an object
IN_ARENA = None  # location of an object whose bytes are sealed in the arena
# Messages that may wait for the next frame: nobody is waiting on them.
_DEFERRABLE = frozenset((P.RELEASE, P.ESCAPED, P.DIRECT_CALL, P.DIRECT_DONE,
                         P.DIRECT_SUBMIT, P.LEASED_DONE))
_LEASE_IDLE_SECONDS = 0.002   # a lease unused this long goes back to the scheduler
_LEASE_BUSY_TICK = 0.01       # how often the flusher looks at a lease whose task runs
_PIPELINE_MAX_DEPTH = 256     # tasks in flight on one leased worker, at most (``_run_times``)
_BACKLOG_POLL_EVERY = 16      # while submitting into a backlog, look for results this often
_WRITE_ATTEMPTS = 10          # writes of an object into a full arena, spilling between
_LOOK_IN_ARENA = 8            # a get/wait of more ids than this doesn't look in the arena
                              # for results of our own tasks (their READY is coming)
_LOST_CHANNEL_WAIT = 1.0      # a dead worker's channel is at its end well within this
_UNREACHABLE_LEASES_MAX = 3   # leases in a row we can't connect to before we stop leasing


class Runtime:
    """The session as this process sees it."""

    def __init__(self, store: ObjectStore, conn: Connection, session_dir: str, options: dict,
                 on_message: Optional[Callable[[tuple], None]] = None, leasing: bool = False):
        self.store = store
        self.conn = conn
        self.session_dir = session_dir
        self.socket_dir = options["socket_dir"]  # where actors and workers listen (_direct)
        self.options = options
        self.total = options["total"]  # the session's resources (``_resources``)
        self._feasible: Dict[int, dict] = {}  # resource demands found feasible, by identity
        self.pid = os.getpid()
        self.spiller = Spiller(store, self._spill_dir)
        self.on_message = on_message  # messages other than READY (a worker's EXECUTE, EXIT)
        # id -> (data, metadata) for objects this process knows are ready; data is None
        # for objects in the arena.
        self._locations: Dict[bytes, Tuple[Optional[bytes], bytes]] = {}
        self._counts: Dict[bytes, int] = {}
        self._subscribed: set = set()       # ids we asked to hear of
        self._waiters: Dict[bytes, list] = {}  # id -> _Waiters counting it down
        self._owned_pending: set = set()    # our tasks' results: READY comes unasked
        self.actor_calls: set = set()       # task ids of our actor calls (cancel's force rule)
        self._releases: collections.deque = collections.deque()
        self._futures: Dict[bytes, List[concurrent.futures.Future]] = {}
        self._registered_functions: set = set()
        self._lock = threading.RLock()          # counts, locations, the send queue
        self._cv = threading.Condition(self._lock)
        self._reading = False                   # a thread is reading the connection
        self._pump_thread: Optional[threading.Thread] = None
        self._replies: Dict[int, object] = {}
        self._next_request = 0
        self.inline_threshold = INLINE_THRESHOLD
        self._last_flush = 0.0
        self._flusher: Optional[threading.Thread] = None
        self._flush_wanted = threading.Event()
        self.closed = False
        self.forked_from: Optional[int] = None  # in a forked child: the session's process
        self.blocked_hook: Optional[Callable[[bool], None]] = None  # workers lend their CPU
        self.before_wait: Optional[Callable[[], None]] = None  # an actor's held-back replies
        self.after_flush: Optional[Callable[[], None]] = None  # a worker's parked reports
        # A leased worker: the task it runs, named in what it submits (the scheduler may
        # hear of that task from the driver only later).
        self.running_leased: Optional[bytes] = None
        self.external_reader = False  # an event loop reads the connection (async actors)
        # An async actor's event loop reads only its own descriptors: it calls actors
        # through the scheduler.
        self.calls_actors_directly = True
        # Direct channels to actors (_direct): actor id -> channel.
        self._channels: Dict[bytes, _Channel] = {}
        self._direct_pending: Dict[bytes, _Channel] = {}  # result id -> its channel
        self._routed: Dict[bytes, set] = {}     # actor id -> first result ids of calls that
        self._routed_ids: Dict[bytes, bytes] = {}  # went through the scheduler, unfinished
        # Descriptors read besides the scheduler's: fd -> callback (with the lock held);
        # channels, and an actor's listening socket and callers.
        self.readers: Dict[int, Callable[[], None]] = {}
        self.listeners: set = set()  # those of them that only accept connections
        # Non-blocking connections with messages or bytes still to write; the reader writes
        # them when it waits, the flusher within a millisecond.
        self.unflushed: set = set()
        self._spinner = _direct.Spinner()
        # Leases (drivers): workers lent by the scheduler, to which plain tasks go straight
        # (``_direct``), owned here (see "leases" below).
        self.leasing = leasing
        self._leases: List[_Channel] = []
        self._backlog: collections.deque = collections.deque()  # _Leased, waiting for room
        self._backlog_submits = 0     # tasks submitted into the backlog (polls among them)
        # When the program last submitted a task for a lease: while it does, it writes as
        # it goes, and the flusher keeps off the lock (two threads taking turns at it cost
        # more than they save).
        self._submitted_at = 0.0
        self._lease_wanted = 0        # more leases asked for, as the scheduler knows it
        self._max_leases = max(int(options.get("num_cpus") or 1), 1)
        self._run_times = RunTimes(_PIPELINE_MAX_DEPTH)
        self._unregistered: Dict[bytes, _Leased] = {}  # results of tasks only we know of
        self._owner_only: set = set()   # results only we have (published if a ref leaves)
        # A leased worker: its task submitted tasks or waited in get(), under its id, so its
        # driver must register it (RESULT).
        self.leased_must_register = False
        self.pending_interrupt = False  # a worker: its task was cancelled inside shmray
        self.leased_tasks = 0  # how many went to a lease (for tests and curiosity)
        self._unreachable_leases = 0  # workers lent to us in a row that we couldn't reach
        # Written to when a descriptor is added while another thread waits without it.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _spill_dir(self) -> str:
        path = os.path.join(self.session_dir, "spill")
        os.makedirs(path, exist_ok=True)
        return path

    # -- sending -------------------------------------------------------------------------

    def send(self, message: tuple) -> None:
        # Releases queued until now go after the message: a release sent late only frees
        # memory later, one sent early can free an object the message refers to (a task's
        # result that contains a ref the task has since dropped).
        with self._lock:
            self.conn.send(message)
            self._drain_releases()

    def flush(self) -> None:
        with self._lock:
            self._drain_releases()
            try:
                self.conn.flush()
            except ConnectionClosed as exc:
                raise self._scheduler_gone() from exc
            self._last_flush = time.monotonic()
            if self.after_flush is not None:
                self.after_flush()

    def flush_soon(self) -> None:
        """Send now, unless we sent very recently: then the message waits for the next frame.

        A lone submission goes out at once; a burst of them goes out in frames of many,
        which saves a system call and a wake-up of the scheduler per message (~14 us each
        here).  The flusher thread sends what is left within ``_FLUSH_DELAY`` if the program
        stops calling shmray; get() and wait() flush before they block.
        """
        if time.monotonic() - self._last_flush > _BATCH_WINDOW:
            self.flush()
            return
        self.flush_later()

    def flush_later(self) -> None:
        """Send within ``_FLUSH_DELAY`` (or with the next message that can't wait): for
        reports nobody is waiting on, such as the registration of a direct actor call."""
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flusher_loop, name="shmray-flusher",
                                             daemon=True)
            self._flusher.start()
        if not self._flush_wanted.is_set():
            self._flush_wanted.set()

    def _flusher_loop(self) -> None:
        wanted = self._flush_wanted
        while not self.closed:
            if not wanted.wait(self._tend_interval()):
                self._tend_leases()
                continue
            time.sleep(_FLUSH_DELAY)
            if time.monotonic() - self._submitted_at < _FLUSH_DELAY:
                continue  # the program is submitting, and writes as it goes: come back
            if self._leases or self._lease_wanted:
                self._tend_leases()
            with self._lock:
                wanted.clear()
                if self.closed:
                    return
                try:
                    if self.before_wait is not None:
                        self.before_wait()  # replies an actor held back while calls ran
                    self.flush()
                except exceptions.RaySystemError:
                    return
                for conn in list(self.unflushed):
                    self.write_some(conn)
                if self.unflushed:
                    wanted.set()  # a channel still full: try again in a millisecond

    def _tend_interval(self) -> Optional[float]:
        """How soon the flusher should look after the leases: every millisecond while a
        backlog waits for them (their workers must not run dry while the program is busy
        elsewhere), soon while one idles (it goes back after 2 ms) or one is asked for, now
        and then while tasks run whose results nobody reads yet, never without leases."""
        if self._backlog and self._leases:
            return _FLUSH_DELAY
        if self._lease_wanted or any(not lease.sent for lease in self._leases):
            return _LEASE_IDLE_SECONDS
        return _LEASE_BUSY_TICK if self._leases else None

    def _tend_leases(self) -> None:
        """The flusher's round while leases are held: give back those left idle, answer
        recalls, and keep the leases fed while the program is busy elsewhere."""
        with self._lock:
            if self.closed or self._reading or not (self._leases or self._lease_wanted):
                return
            try:
                self.poll()
                self._return_idle_leases(_LEASE_IDLE_SECONDS)
                self.flush()
            except exceptions.RaySystemError:
                pass

    def _scheduler_gone(self) -> exceptions.RaySystemError:
        if self.closed:
            return exceptions.RaySystemError(
                "shmray was shut down while this call was waiting; its result is gone"
            )
        return exceptions.RaySystemError(
            "the shmray scheduler process is gone (killed or crashed); this session can't "
            "run anything more. Call shmray.shutdown() and shmray.init() to start again."
        )

    # -- reference counting --------------------------------------------------------------

    def add_local_ref(self, object_id: bytes, announce: bool = True) -> None:
        with self._lock:
            count = self._counts.get(object_id, 0)
            self._counts[object_id] = count + 1
            if count == 0 and announce:
                self.conn.send((P.HOLD, [object_id]))

    def add_owned_ref(self, object_id: bytes) -> ObjectRef:
        """A ref the scheduler already counts for us (a put or a task return we submitted)."""
        with self._lock:
            self._counts[object_id] = self._counts.get(object_id, 0) + 1
        return ObjectRef.counted(object_id, self)

    def release_later(self, object_id: bytes) -> None:
        self._releases.append(object_id)

    def _drain_releases(self) -> None:
        """Apply the releases queued by ObjectRef.__del__ (caller holds the lock)."""
        releases = self._releases
        if not releases:
            return
        released = []
        while releases:
            object_id = releases.popleft()
            count = self._counts[object_id] - 1
            if count:
                self._counts[object_id] = count
                continue
            del self._counts[object_id]
            self._locations.pop(object_id, None)
            if object_id in self._owner_only or object_id in self._unregistered:
                self._owner_only.discard(object_id)  # the scheduler never knew it (or
                continue                             # hears of it with its registration)
            self._subscribed.discard(object_id)
            self._owned_pending.discard(object_id)
            self._direct_pending.pop(object_id, None)
            self.actor_calls.discard(object_id[:24])
            released.append(object_id)
        if released and not self.closed:
            self.conn.send((P.RELEASE, released))

    def flush_releases(self) -> None:
        if self._releases:
            self.flush()

    def num_local_refs(self) -> int:
        with self._lock:
            self._drain_releases()
            return len(self._counts)

    # -- put -----------------------------------------------------------------------------

    def put(self, value) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError(
                "calling put() on an ObjectRef is not allowed (as in Ray): pass the ref itself "
                "where it is needed, or wrap it in a list, put([ref]), to store a reference to it"
            )
        serialized = serialize(value)
        object_id = object_id_for_put()
        data = self.store_object(object_id, serialized)
        with self._lock:
            self._locations[object_id] = (data, serialized.metadata)
            self.conn.send((P.PUT, object_id, data, serialized.metadata,
                            serialized.contained_refs))
            ref = self.add_owned_ref(object_id)
        # No hurry: whatever uses the object reaches the scheduler after this message.
        self.flush_soon()
        self.take_interrupt()
        return ref

    def store_object(self, object_id: bytes, serialized, force_inline: bool = False):
        """Inline bytes for a small value (returned), or None once it is sealed in the arena."""
        if force_inline or serialized.total_size < INLINE_THRESHOLD:
            return serialized.to_bytes()
        self._write_with_room(object_id, serialized)
        return IN_ARENA

    def _write_with_room(self, object_id: bytes, serialized) -> None:
        needed = serialized.total_size
        # Room made by spilling may be taken by another process writing at the same time:
        # try again while spilling still finds room, a few times over.
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                self.store.write_serialized(object_id, serialized)
                return
            except exceptions.ObjectStoreFullError as exc:
                if needed > self.store.statistics().heap_size:
                    raise too_large_error(self.store, needed) from exc
                if attempt == 0:
                    gc.collect()  # refs in reference cycles release their objects
                    self.flush_releases()
                    self._settle()
                elif not self.spiller.make_room(needed):
                    break
        raise store_full_error(self.store, needed)

    def _settle(self) -> None:
        """Return once the scheduler has processed our releases (and freed what they let go)."""
        self.query("ping")

    # -- readiness -----------------------------------------------------------------------

    def _is_ready(self, object_id: bytes, batch: bool = False) -> bool:
        """Known ready, or sealed in the arena already (then no message is needed at all).
        In a batch, our own tasks' results are left to their READY, already on its way: a
        look in the arena takes the store's lock, ~1 us an id."""
        if object_id in self._locations:
            return True
        if (object_id in self._direct_pending or object_id in self._unregistered
                or (batch and object_id in self._owned_pending)):
            return False  # its RESULT or READY will say
        if self.store.contains(object_id) in ("sealed", "spilled"):
            self._locations[object_id] = (IN_ARENA, b"")
            return True
        return False

    def _not_ready(self, ids: Sequence[bytes]) -> List[bytes]:
        """The ids not ready yet; asks to hear of those no READY is already coming for."""
        batch = len(ids) > _LOOK_IN_ARENA
        missing = [i for i in ids if not self._is_ready(i, batch)]
        unannounced = [i for i in missing
                       if i not in self._owned_pending and i not in self._subscribed
                       and i not in self._direct_pending and i not in self._unregistered]
        if unannounced:
            self._subscribed.update(unannounced)
            self.conn.send((P.SUBSCRIBE, unannounced))
        return missing

    def _wait_until(self, predicate: Callable[[], bool], deadline: Optional[float]) -> bool:
        """Read messages until predicate() holds; False on timeout.  Caller holds the lock."""
        blocked = False
        polled = False
        try:
            while not predicate():
                self.take_interrupt()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    if not polled:  # timeout=0: still look at what has arrived
                        polled = True
                        self._flush_before_waiting()
                        self.poll()
                        continue
                    return False
                if not blocked and self.blocked_hook is not None:
                    blocked = True
                    self.blocked_hook(True)
                self._flush_before_waiting()
                if self._reading:  # another thread reads for us
                    self._cv.wait(remaining)
                    continue
                if self._leases:  # one granted or freed while we wait: we give it back
                    self._return_idle_leases(_LEASE_IDLE_SECONDS)
                    if any(not lease.sent for lease in self._leases):
                        remaining = _LEASE_IDLE_SECONDS if remaining is None else min(
                            remaining, _LEASE_IDLE_SECONDS)
                self._read_once(remaining)
            return True
        finally:
            if blocked:
                self.blocked_hook(False)

    def take_interrupt(self) -> None:
        """A cancel that came while the task was inside shmray (``Worker._on_sigint``) is
        raised here, where nothing is half done."""
        if self.pending_interrupt:
            self.pending_interrupt = False
            raise KeyboardInterrupt("task cancelled")

    def _flush_before_waiting(self) -> None:
        """Send what we wait on; releases and direct calls' reports alone wait for the next
        message (or until many, or the flusher's millisecond).

        A frame of nothing but those would wake the scheduler for no one's benefit: every
        wake-up across CPUs costs ~30 us here, a third of a task's round trip.
        """
        if self.before_wait is not None:
            self.before_wait()
        self._drain_releases()
        for conn in list(self.unflushed):
            self.write_some(conn)
        pending = self.conn.pending
        if pending and (len(pending) >= _RELEASES_ALONE
                        or any(message[0] not in _DEFERRABLE for message in pending)):
            try:
                self.conn.flush()
            except ConnectionClosed as exc:
                raise self._scheduler_gone() from exc
            if self.after_flush is not None:
                self.after_flush()

    def _read_once(self, timeout: Optional[float]) -> None:
        """Become the reader: wait for messages without the lock, handle them with it."""
        self._reading = True
        poller = self._poller()
        self._lock.release()
        try:
            ready = self._wait_ready(poller, timeout)
            messages = []
            if any(fd == self.conn.fd for fd, _ in ready):
                messages = self.conn.recv_messages(block=True)
        except (ConnectionClosed, OSError) as exc:  # OSError: closed under us by shutdown
            raise self._scheduler_gone() from exc
        finally:
            self._lock.acquire()
            self._reading = False
            self._cv.notify_all()  # a follower may now read, or see the error for itself
        try:
            for message in messages:
                self.handle(message)
            self._serve_descriptors(ready)
        finally:
            self._cv.notify_all()

    def _poller(self) -> "select.poll":
        """A poll object over every descriptor we read (caller holds the lock).  poll(), not
        select(): a process may have descriptors numbered past select()'s 1024."""
        poller = select.poll()
        poller.register(self.conn.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        for fd in self.readers:
            poller.register(fd, select.POLLIN)
        for conn in self.unflushed:
            if conn.out:  # a write that stopped for lack of room (others go before waiting)
                poller.register(conn.fd, select.POLLOUT | (select.POLLIN
                                                           if conn.fd in self.readers else 0))
        return poller

    def _wait_ready(self, poller, timeout: Optional[float]):
        """poll(); with direct channels, after a short spin (``_direct.Spinner``)."""
        def block(timeout):
            return poller.poll(None if timeout is None else min(timeout, 3600) * 1000)

        if len(self.readers) <= len(self.listeners):  # no peer of ours on a direct channel
            return block(timeout)
        return self._spinner.wait(lambda: poller.poll(0), block, timeout)

    def wake_reader(self) -> None:
        """A descriptor was added while another thread waits: make it look again (caller
        holds the lock)."""
        if self._reading:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # it has plenty of wake-ups waiting already

    def _serve_descriptors(self, ready) -> None:
        """Read the channels and other descriptors that are ready (caller holds the lock)."""
        for fd, events in ready:
            if fd == self.conn.fd:
                continue
            if fd == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            if events & ~select.POLLOUT:
                callback = self.readers.get(fd)
                if callback is not None:
                    callback()
            if events & select.POLLOUT:
                for conn in list(self.unflushed):
                    if conn.fd == fd:
                        self.write_some(conn)

    def write_some(self, conn: Connection) -> bool:
        """Write what a non-blocking connection takes now; the rest when it has room.
        False if the peer is gone (its reader sees the EOF and deals with it)."""
        try:
            if conn.flush_nonblocking():
                self.unflushed.discard(conn)
            else:
                self.unflushed.add(conn)
            return True
        except (ConnectionClosed, OSError):
            self.unflushed.discard(conn)
            return False

    def poll(self) -> None:
        """Handle whatever has arrived, without waiting (caller holds the lock)."""
        if self._reading:
            return
        ready = self._poller().poll(0)
        if any(fd == self.conn.fd for fd, _ in ready):
            try:
                self.conn.fill()
            except ConnectionClosed as exc:
                raise self._scheduler_gone() from exc
            for message in self.conn.recv_messages(block=False):
                self.handle(message)
        self._serve_descriptors(ready)

    def handle(self, message: tuple) -> None:
        """A message from the scheduler (caller holds the lock)."""
        if message[0] == P.READY:
            _, object_id, data, metadata = message
            self._owned_pending.discard(object_id)
            if self._routed_ids:
                actor_id = self._routed_ids.pop(object_id, None)
                if actor_id is not None:
                    routed = self._routed[actor_id]
                    routed.discard(object_id)
                    if not routed:  # one entry per actor ever called would pile up
                        del self._routed[actor_id]
            if object_id in self._counts:
                self._subscribed.discard(object_id)
                self._arrived(object_id, (data, metadata))
        elif message[0] == P.REPLY:
            self._replies[message[1]] = message[2]
        elif message[0] == P.LEASE_GRANTED:
            self._lease_granted(message[1])
        elif message[0] == P.LEASE_RECALL:
            self._lease_recalled(message[1])
        elif message[0] == P.LEASE_LOST:
            self._lease_lost(message[1])

        elif self.on_message is not None:
            self.on_message(message)

    def _arrived(self, object_id: bytes, location) -> None:
        """An object we hold is ready: where it is, and who waits for it (caller holds the
        lock)."""
        self._locations[object_id] = location
        if self._waiters:
            for waiter in self._waiters.pop(object_id, ()):
                waiter.remaining -= 1
        if self._futures:
            futures = self._futures.pop(object_id, None)
            if futures:
                self._resolve_futures(object_id, futures)

    # -- get / wait ----------------------------------------------------------------------

    def _waiter(self, missing: Sequence[bytes]) -> "_Waiter":
        """Counts down as READY messages for ``missing`` arrive (caller holds the lock).

        A predicate that re-scanned every id after each batch of messages would make a get
        of n refs cost O(n^2); the countdown costs O(1) per message.
        """
        waiter = _Waiter(len(missing))
        for object_id in missing:
            self._waiters.setdefault(object_id, []).append(waiter)
        return waiter

    def _forget_waiter(self, waiter: "_Waiter", missing: Sequence[bytes]) -> None:
        for object_id in missing:
            waiters = self._waiters.get(object_id)
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[object_id]

    def get_values(self, refs: Sequence[ObjectRef], timeout: Optional[float]) -> list:
        ids = [ref.binary() for ref in refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            missing = self._not_ready(ids)
            if missing:
                self._free_leases_for(missing)
                waiter = self._waiter(missing)
                try:
                    done = self._wait_until(lambda: waiter.remaining <= 0, deadline)
                finally:
                    self._forget_waiter(waiter, missing)
                if not done:
                    raise exceptions.GetTimeoutError(
                        f"get() timed out after {timeout} s: {waiter.remaining} of {len(ids)} "
                        "objects were not ready"
                    )
            locations = [self._locations.get(i, (IN_ARENA, b"")) for i in ids]
        return [self.value_at(i, location) for i, location in zip(ids, locations)]

    def wait(self, refs: Sequence[ObjectRef], num_returns: int, timeout: Optional[float]):
        ids = [ref.binary() for ref in refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            missing = self._not_ready(ids)
            needed = num_returns - (len(ids) - len(missing))
            if needed > 0:
                self._free_leases_for(missing)
                waiter = self._waiter(missing)
                enough = len(missing) - needed  # stop when this many are still missing
                try:
                    self._wait_until(lambda: waiter.remaining <= enough, deadline)
                finally:
                    self._forget_waiter(waiter, missing)
            ready, not_ready = [], []
            for ref, object_id in zip(refs, ids):
                if len(ready) < num_returns and object_id in self._locations:
                    ready.append(ref)
                else:
                    not_ready.append(ref)
        return ready, not_ready

    def value_at(self, object_id: bytes, location) -> object:
        data, metadata = location
        if data is not None:
            return _unwrap(deserialize(memoryview(data)), metadata)
        view, metadata = self._pinned_view(object_id)
        return _unwrap(deserialize(view), metadata)

    def _pinned_view(self, object_id: bytes):
        deadline = time.monotonic() + _RESTORE_WAIT
        while True:
            try:
                return self.store.pinned_view(object_id)
            except ObjectSpilledError:
                info = self.store.info(object_id)
                self.spiller.restore(object_id, info.data_size + info.metadata_size)
            except ObjectNotSealedError:
                if time.monotonic() > deadline:
                    info = self.store.info(object_id)
                    raise exceptions.ObjectFetchTimedOutError(
                        f"object {object_id.hex()} has been being restored from disk by process "
                        f"{info.creator_pid} for over {_RESTORE_WAIT:.0f} s"
                    ) from None
                time.sleep(0.0005)  # another process is restoring it
            except ObjectNotFoundError:
                raise exceptions.ObjectLostError(
                    f"object {object_id.hex()} is not in the object store any more"
                ) from None

    # -- futures -------------------------------------------------------------------------

    def future_of(self, ref: ObjectRef) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        object_id = ref.binary()
        with self._lock:
            if self._is_ready(object_id):
                self._resolve_futures(object_id, [future])
                return future
            # The future holds the ref, so the object lives until it resolves.
            future._shmray_ref = ref  # type: ignore[attr-defined]
            self._futures.setdefault(object_id, []).append(future)
            self._not_ready([object_id])
            self._start_pump()
        self.flush()
        return future

    def _resolve_futures(self, object_id: bytes, futures) -> None:
        location = self._locations.get(object_id, (IN_ARENA, b""))
        try:
            value = self.value_at(object_id, location)
        except BaseException as exc:  # the task's own error, or a lost object
            for future in futures:
                if future.set_running_or_notify_cancel():
                    future.set_exception(exc)
            return
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_result(value)

    def _start_pump(self) -> None:
        """A reader thread while futures are pending; it ends when none are left."""
        if self.external_reader or self._pump_thread is not None:
            return
        self._pump_thread = threading.Thread(target=self._pump, name="shmray-futures",
                                             daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        with self._lock:
            try:
                while self._futures and not self.closed:
                    self._wait_until(lambda: not self._futures or self.closed,
                                     time.monotonic() + 0.5)
            except exceptions.RaySystemError as exc:
                for futures in self._futures.values():
                    for future in futures:
                        if future.set_running_or_notify_cancel():
                            future.set_exception(exc)
                self._futures.clear()
            finally:
                # Under the lock: a future_of() after this point starts a new pump.
                self._pump_thread = None

    async def await_ref(self, ref: ObjectRef):
        import asyncio

        return await asyncio.wrap_future(self.future_of(ref))

    # -- tasks and queries -------------------------------------------------------------

    def submit(self, spec: tuple, return_ids: Sequence[bytes]) -> List[ObjectRef]:
        """Send a task: a plain one to a worker we lease, owned here (see "leases" below),
        others through the scheduler.  One that can never run raises here, whatever its
        route."""
        resources = spec[P.SPEC_RESOURCES]
        if self._feasible.get(id(resources)) is not resources:
            self.check_feasible(resources, f"task {spec[P.SPEC_NAME]}()")
        if spec[P.SPEC_ARG_IDS] and (self._owner_only or self._unregistered):
            self.publish(spec[P.SPEC_ARG_IDS])
        if self.leasing and _leasable(spec):
            with self._lock:
                return self._submit_leasable(spec, return_ids)
        if self.running_leased is not None:
            self.leased_must_register = True
            return self._send_owning((P.SUBMIT, spec, self.running_leased), return_ids)
        return self._send_owning((P.SUBMIT, spec), return_ids)

    def check_feasible(self, demand: dict, what: str, actor: bool = False) -> None:
        """Raise if ``demand`` can never be met here (``_resources``).  A demand found
        feasible is remembered by identity: a remote function's is the same dict every call."""
        _resources.check_feasible(demand, self.total, what, actor)
        if len(self._feasible) > 1024:
            self._feasible.clear()
        self._feasible[id(demand)] = demand

    def _send_owning(self, message: tuple, return_ids: Sequence[bytes]) -> List[ObjectRef]:
        """Send a task or call; we own its results, whose READY will come unasked."""
        with self._lock:
            self.conn.send(message)
            self._owned_pending.update(return_ids)
            refs = [self.add_owned_ref(object_id) for object_id in return_ids]
        self.flush_soon()
        self.take_interrupt()
        return refs

    def create_actor(self, spec: tuple, wait: bool):
        """(handle ref, actor options); waits for the scheduler's answer if ``wait``."""
        self.publish(spec[P.ACTOR_ARG_IDS])
        with self._lock:
            if not wait:
                self.conn.send((P.CREATE_ACTOR, None, spec))
                ref = self.add_owned_ref(spec[P.ACTOR_ID])
                options = spec[P.ACTOR_OPTIONS]
            else:
                reply = self.request(P.CREATE_ACTOR, spec)
                if isinstance(reply, BaseException):
                    raise reply
                actor_id, options = reply
                ref = self.add_owned_ref(actor_id)
        self.flush()
        return ref, options

    def call_actor(self, actor_id: bytes, spec: tuple, return_ids,
                   direct_ok: bool) -> List[ObjectRef]:
        """Send an actor call: straight to the actor when ``direct_ok`` (no ref among its
        arguments) and order allows (``_direct``), else through the scheduler."""
        self.publish(spec[P.SPEC_ARG_IDS])
        with self._lock:
            self.actor_calls.add(spec[P.SPEC_TASK_ID])
            channel = self._channel(actor_id) if direct_ok else None
            if channel is None:
                first = return_ids[0]
                self._routed.setdefault(actor_id, set()).add(first)
                self._routed_ids[first] = actor_id
                return self._send_owning((P.ACTOR_CALL, actor_id, spec), return_ids)
            channel.conn.send((P.CALL, spec[P.SPEC_TASK_ID], spec[P.SPEC_FN_ID],
                               spec[P.SPEC_NAME], spec[P.SPEC_ARGS], (),
                               spec[P.SPEC_NUM_RETURNS], {}))
            if not self._write_soon(channel):  # it died: the scheduler knows what became of it
                self._channel_lost(channel)
                return self.call_actor(actor_id, spec, return_ids, direct_ok=False)
            self.send((P.DIRECT_CALL, actor_id, channel.peer_pid, spec))
            for object_id in return_ids:
                self._direct_pending[object_id] = channel
            refs = [self.add_owned_ref(object_id) for object_id in return_ids]
        self.flush_later()
        return refs

    def _channel(self, actor_id: bytes) -> Optional["_Channel"]:
        """The direct channel to use for this call, or None (caller holds the lock)."""
        if self._routed.get(actor_id) or not self.calls_actors_directly:
            return None  # calls of ours still in the scheduler would be overtaken
        channel = self._channels.get(actor_id)
        if channel is not None:
            return channel
        connected = _direct.connect(_direct.address(self.socket_dir, actor_id))
        if connected is None:  # not listening yet: try again once the routed calls are done
            return None
        channel = self._channels[actor_id] = _Channel(actor_id, *connected)
        self.readers[channel.conn.fd] = lambda: self._read_channel(channel)
        self.wake_reader()
        return channel

    def _read_channel(self, channel: "_Channel") -> None:
        """Results an actor or a leased worker sent straight back (caller holds the lock)."""
        messages, lost = channel.conn.read_available()
        self._take_results(channel, messages)
        if lost:
            self._channel_lost(channel)

    def _take_results(self, channel: "_Channel", messages) -> None:
        lease = channel.actor_id is None
        for message in messages:
            if message[0] == P.HANDED_BACK:
                self._handed_back(channel, message[1])
                continue
            _, task_id, delivered, undelivered, took, must_register = message
            record = self._leased_result(channel, task_id, delivered, undelivered, took,
                                         must_register) if lease else None
            if record is not None and not record.registered:
                self._keep_unregistered(record, delivered)
                continue
            for object_id, data, metadata in delivered:
                if self._direct_pending.pop(object_id, None) is not None:
                    self.handle((P.READY, object_id, data, metadata))
            for object_id in undelivered:  # they hold refs, or will be retried: the
                if (self._direct_pending.pop(object_id, None) is not None  # scheduler says
                        and object_id not in self._locations):  # (if it has not yet)
                    self._owned_pending.add(object_id)
        if lease and channel in self._leases:
            self._feed(channel)

    def _keep_unregistered(self, record: "_Leased", delivered) -> None:
        """Results of a task the scheduler never heard of (all small, no refs inside): ours
        alone from now on, published if a ref to one leaves us.  Marked so before a
        future's callback runs (``_arrived``): it may pass the ref on."""
        for object_id, _, _ in delivered:
            del self._unregistered[object_id]
            self._direct_pending.pop(object_id, None)
            if object_id in self._counts:
                self._owner_only.add(object_id)
        for object_id, data, metadata in delivered:
            if object_id in self._counts:
                self._arrived(object_id, (data, metadata))

    def _close_channel(self, channel: "_Channel") -> None:
        self.readers.pop(channel.conn.fd, None)
        self.unflushed.discard(channel.conn)
        channel.conn.close()

    def _channel_lost(self, channel: "_Channel") -> None:
        """The actor or worker died (or restarted): the scheduler tells what it still owes
        us (it retries or fails the work as it would its own)."""
        if channel.actor_id is None:
            if channel in self._leases:
                self._leases.remove(channel)
                self._read_to_the_end(channel)
                # Tasks of ours on it never answered: the scheduler learns of them now (all
                # but the one it died in run again without using a retry), and settles
                # them at once (ending the worker if it lives).
                unanswered = list(channel.sent)
                for record in channel.sent.values():
                    if not record.registered:
                        self._register(record, channel)
                self.conn.send((P.LEASE_RETURN, channel.peer_pid, unanswered))
                channel.sent.clear()
                self.flush_later()
                self._want_leases()
        self._close_channel(channel)
        # Connect afresh (to its next incarnation, if it restarts) once the calls made
        # meanwhile, which go through the scheduler, are done.
        if channel.actor_id is not None and self._channels.get(channel.actor_id) is channel:
            del self._channels[channel.actor_id]
        owed = [i for i, c in self._direct_pending.items() if c is channel]
        for object_id in owed:
            del self._direct_pending[object_id]
        owed = [i for i in owed if i in self._counts]
        if owed:
            self._subscribed.update(owed)
            self.conn.send((P.SUBSCRIBE, owed))

    # -- leases: plain tasks straight to workers, owned here ----------------------------------
    #
    # A task with no ref among its arguments that asks for one CPU is ours to run: it waits
    # in our backlog until a worker the scheduler lends us (a lease) has room, goes to it,
    # and its result comes straight back.  The scheduler hears of it only when it must
    # (``_register``): a ref to it leaves this process, it is cancelled, its result holds
    # refs or lives in the arena, it will be retried, it submitted tasks or waited in get()
    # (its worker says so), or its worker died.  Otherwise its result lives here alone
    # (``_owner_only``) and is published (PUT) if a ref to it is ever sent anywhere.  This
    # is Ray's ownership: for a burst of short tasks the scheduler does nothing per task.

    def _submit_leasable(self, spec: tuple, return_ids) -> List[ObjectRef]:
        """Own a plain task: into the backlog, from which the roomiest lease takes it at
        once if nothing waits before it; else ask for leases (caller holds the lock)."""
        now = self._submitted_at = time.monotonic()
        if now - self._last_flush > _FLUSH_DELAY:
            self._flush_for_the_flusher()
        record = _Leased(spec, return_ids)
        unregistered, counts = self._unregistered, self._counts
        refs = []
        for object_id in return_ids:
            unregistered[object_id] = record
            counts[object_id] = counts.get(object_id, 0) + 1
            refs.append(ObjectRef.counted(object_id, self))
        backlog = self._backlog
        backlog.append(record)
        if len(backlog) == 1:
            lease = self._roomiest_lease()
            if lease is not None:
                self._feed(lease)
        if backlog:
            self._want_leases()
            self._backlog_submits += 1
            if self._backlog_submits % _BACKLOG_POLL_EVERY == 0:
                self.poll()  # results in: their workers have room again
        return refs

    def _flush_for_the_flusher(self) -> None:
        """What the flusher thread would send; it keeps off while the program submits."""
        if self.conn.pending or self.unflushed:
            self.flush()
            for conn in list(self.unflushed):
                self.write_some(conn)

    def _roomiest_lease(self) -> Optional["_Channel"]:
        best = None
        for lease in self._leases:
            if not (lease.recalled or lease.stalled) and (
                    best is None or len(lease.sent) < len(best.sent)):
                best = lease
        return best

    def _feed(self, lease: "_Channel") -> None:
        """Send the lease what it has room for from the backlog (caller holds the lock): as
        many tasks of short functions as run within ``_run_times.SHORT_BUDGET``, one of
        any other.  A recalled lease gets nothing and goes back once its tasks are done."""
        if lease.recalled:
            if not lease.sent:
                self._return_lease(lease)
            return
        backlog = self._backlog
        sent = 0
        while backlog and not lease.stalled:
            record = backlog[0]
            if not self._has_room(lease, record.spec[P.SPEC_FN_ID]):
                break
            backlog.popleft()
            sent += 1
            if not self._send_leased(lease, record):
                return
        if sent:
            lease.last_used = time.monotonic()
            if lease.conn in self.unflushed:
                self.flush_later()
            if backlog:
                other = self._roomiest_lease()  # spread a burst over every lease
                if other is not None and other is not lease and not other.sent:
                    self._feed(other)

    def _has_room(self, lease: "_Channel", fn_id: bytes) -> bool:
        """Whether a task of ``fn_id`` may queue on the lease: behind tasks of short
        functions only, as many as the shortest allowance among them all."""
        sent = len(lease.sent)
        return not sent or sent < min(lease.depth_limit, self._run_times.depth(fn_id))

    def _send_leased(self, lease: "_Channel", record: "_Leased") -> bool:
        # No code: a worker that lacks the function's asks the scheduler for it, once.
        spec = record.spec
        task_id = spec[P.SPEC_TASK_ID]
        depth = self._run_times.depth(spec[P.SPEC_FN_ID])
        lease.depth_limit = min(lease.depth_limit, depth) if lease.sent else depth
        lease.conn.send((P.EXECUTE, task_id, spec[P.SPEC_FN_ID], None, spec[P.SPEC_NAME],
                         spec[P.SPEC_ARGS], (), spec[P.SPEC_NUM_RETURNS], {},
                         spec[P.SPEC_RETRY_EXCEPTIONS], None))
        lease.sent[task_id] = record
        for object_id in record.return_ids:
            self._direct_pending[object_id] = lease
        self.leased_tasks += 1
        if not self._write_soon(lease):  # it died: the scheduler runs its tasks instead
            self._channel_lost(lease)
            return False
        return True

    def _leased_result(self, lease: "_Channel", task_id, delivered, undelivered, took,
                       must_register):
        """A leased task is done: the record it was sent as, or None."""
        record = lease.sent.pop(task_id, None)
        if record is None:
            return None
        lease.stalled = False
        self._run_times.note(record.spec[P.SPEC_FN_ID], took, must_register)
        if not record.registered:
            if undelivered or must_register:
                self._register(record, lease)
            else:
                for result in delivered:
                    if result[1] is IN_ARENA:  # the scheduler frees arena objects
                        self._register(record, lease)
                        break
        if record.registered and not undelivered:
            # We are the scheduler's only source for these (``Worker.report``), whether or
            # not we still hold them.
            self.conn.send((P.LEASED_DONE, task_id, delivered))
        return record

    def _handed_back(self, lease: "_Channel", task_ids) -> None:
        """The lease's running task waits in get(), maybe for a task queued behind it: those
        come back, and go to other workers.  It gets no more until its task is done."""
        lease.stalled = True
        if lease.sent:
            head = next(iter(lease.sent.values()))
            self._run_times.note_blocking(head.spec[P.SPEC_FN_ID])
        to_scheduler, to_backlog = [], []
        for task_id in task_ids:
            record = lease.sent.pop(task_id, None)
            if record is None:
                continue
            for object_id in record.return_ids:
                self._direct_pending.pop(object_id, None)
            if record.registered:  # the scheduler runs it
                to_scheduler.append(task_id)
                self._owned_pending.update(i for i in record.return_ids if i in self._counts)
            else:
                to_backlog.append(record)
        self._backlog.extendleft(reversed(to_backlog))  # first, in the order they were sent
        if to_scheduler:
            self.conn.send((P.LEASE_HANDED_BACK, lease.peer_pid, to_scheduler))
            self.flush_later()
        other = self._roomiest_lease()
        if other is not None:
            self._feed(other)
        self._want_leases()

    def _register(self, record: "_Leased", lease: Optional["_Channel"]) -> None:
        """Tell the scheduler of a task of ours: one sent to ``lease``, or (None) one still
        in the backlog, which the scheduler then runs itself (caller holds the lock)."""
        spec = record.spec
        if lease is None:
            self._backlog.remove(record)
            self.conn.send((P.SUBMIT, spec))
            self._owned_pending.update(i for i in record.return_ids if i in self._counts)
        else:
            self.conn.send((P.DIRECT_SUBMIT, lease.peer_pid, spec))
        record.registered = True
        gone = []
        for object_id in record.return_ids:
            del self._unregistered[object_id]
            if object_id not in self._counts:
                gone.append(object_id)  # dropped before the scheduler knew: drop it there
        if gone:
            self.conn.send((P.RELEASE, gone))
        self.flush_later()

    def publish(self, ids) -> None:
        """Refs about to leave this process: the scheduler must know their objects first
        (a PUT for a result only we had, the registration of a task only we knew of)."""
        if self.closed or not (self._owner_only or self._unregistered):
            return
        with self._lock:
            for object_id in ids:
                if object_id in self._owner_only:
                    self._owner_only.discard(object_id)
                    data, metadata = self._locations[object_id]
                    self.conn.send((P.PUT, object_id, data, metadata, ()))
                    continue
                record = self._unregistered.get(object_id)
                if record is not None:
                    self._register(record, self._direct_pending.get(object_id))

    def exported(self, object_id: bytes) -> None:
        """A ref was pickled (ObjectRef.__reduce__): publish its object.  A pickle of the
        user's own (a multiprocessing queue, a file; not one of our messages, which follow
        the object's registration on the same connection) may reach another process by a
        faster way than ours: what makes the object known is written before this returns,
        and the object is held for as long as this process lives (as in Ray), since we
        can't see when that copy of the ref goes."""
        if self.closed:
            return
        if object_id in self._owner_only or object_id in self._unregistered:
            self.publish((object_id,))
        if in_own_pickle():
            return
        with self._lock:
            unsent = bool(self.conn.pending or self.conn.out)
            self.conn.send((P.ESCAPED, [object_id]))  # before any later RELEASE of it
            if unsent:
                self.flush()

    def _want_leases(self) -> None:
        """Ask for as many more workers as the backlog could use (caller holds the lock);
        the request stands until granted or replaced."""
        want = 0
        if self._backlog:
            usable = stalled = 0
            demand = len(self._backlog)
            for lease in self._leases:
                demand += len(lease.sent)
                usable += not (lease.recalled or lease.stalled)
                stalled += lease.stalled  # its task waits in get(): its CPU is lent back
            want = max(min(demand, self._max_leases + stalled) - usable, 0)
        if want != self._lease_wanted:
            first = self._lease_wanted == 0
            self._lease_wanted = want
            self.conn.send((P.LEASE_REQUEST, want))
            if first and want:
                self.flush()  # the backlog waits on the answer...
            self.flush_later()  # ...which the flusher reads if the program is busy elsewhere

    def _lease_granted(self, worker_pid: int) -> None:
        self._lease_wanted = max(self._lease_wanted - 1, 0)
        if not self.leasing:  # granted before our request for no more arrived
            self.conn.send((P.LEASE_RETURN, worker_pid, []))
            return
        connected = _direct.connect(_direct.worker_address(self.socket_dir, worker_pid))
        if connected is None:
            self._lease_unreachable(worker_pid)
            return
        self._unreachable_leases = 0
        # Named by the grant: the kernel's idea of the peer is whoever made the listening
        # socket, which for a worker is the scheduler (``_worker_pool.spawn_worker``).
        lease = _Channel(None, connected[0], worker_pid)
        lease.last_used = time.monotonic()
        self._leases.append(lease)
        self.readers[lease.conn.fd] = lambda: self._read_channel(lease)
        self.wake_reader()
        self._feed(lease)
        self._want_leases()
        self.flush_later()  # the flusher gives leases left idle back

    def _lease_unreachable(self, worker_pid: int) -> None:
        """The worker lent to us can't be reached (it died meanwhile, or one of us is out of
        descriptors): the scheduler replaces it.  Should that keep happening, our tasks go
        through the scheduler from now on, rather than asking for workers in a loop."""
        self.conn.send((P.LEASE_RETURN, worker_pid, None))
        self._unreachable_leases += 1
        if self._unreachable_leases < _UNREACHABLE_LEASES_MAX:
            self._want_leases()
            return
        print(f"shmray: {self._unreachable_leases} workers lent to this process in a row could "
              "not be reached; its tasks go through the scheduler from now on",
              file=sys.stderr, flush=True)
        self.leasing = False
        while self._backlog:
            self._register(self._backlog[0], None)
        self._want_leases()

    def _lease_recalled(self, worker_pid: int) -> None:
        """The scheduler has queued work that needs the CPU a lease holds."""
        for lease in self._leases:
            if lease.peer_pid == worker_pid:
                lease.recalled = True
                if not lease.sent:
                    self._return_lease(lease)
                self._want_leases()
                return

    def _lease_lost(self, worker_pid: int) -> None:
        """A leased worker died: report all it sent us (``_channel_lost`` reads to the
        end), then say we are done."""
        for lease in list(self._leases):
            if lease.peer_pid == worker_pid:
                self._channel_lost(lease)
        self.conn.send((P.LEASE_VERDICT, worker_pid))
        self.flush_later()

    def _read_to_the_end(self, lease: "_Channel") -> None:
        """Take every result a lost lease's worker sent (when it died, the end of its stream
        is there; a worker alive but cut off gets a moment)."""
        while lease.sent:
            if not wait_readable(lease.conn.fd, _LOST_CHANNEL_WAIT):
                return
            messages, lost = lease.conn.read_available()
            self._take_results(lease, messages)
            if lost:
                return

    def _free_leases_for(self, missing) -> None:
        """About to wait on work that goes through the scheduler: idle leases go back now,
        their CPUs may be what it waits for (caller holds the lock).  Waiting on a task of
        ours keeps them: the next will want one (the wait gives them back if it lasts:
        ``_wait_until``)."""
        if self._leases and any(i not in self._direct_pending and i not in self._unregistered
                                for i in missing):
            self._return_idle_leases(0.0)

    def return_idle_leases(self) -> None:
        """Give back every lease with no task running (before asking what is available)."""
        with self._lock:
            self._return_idle_leases(0.0)

    def _return_idle_leases(self, idle_for: float) -> None:
        now = time.monotonic()
        for lease in list(self._leases):
            if not lease.sent and now - lease.last_used >= idle_for:
                self._return_lease(lease)

    def _return_lease(self, lease: "_Channel") -> None:
        self._leases.remove(lease)
        self._close_channel(lease)
        self.conn.send((P.LEASE_RETURN, lease.peer_pid, []))
        self.flush_later()
        if self._backlog:
            self._want_leases()

    def _write_soon(self, channel: "_Channel") -> bool:
        """Write now, or with the next frame if we wrote to this channel very recently (a
        burst of calls goes out in frames of many; get/wait write it before waiting).
        False if the peer is found gone."""
        now = time.monotonic()
        if now - channel.last_write > _BATCH_WINDOW:
            channel.last_write = now
            return self.write_some(channel.conn)
        self.unflushed.add(channel.conn)
        return True

    def still_pending(self, ids) -> set:
        """Those of ``ids`` we hold and have not seen ready (READYs waiting are read first)."""
        with self._lock:
            self.poll()
            return {i for i in ids if i in self._counts and i not in self._locations}

    def query(self, what):
        """Ask the scheduler (resources, workers, actors); waits for the answer."""
        return self.request(P.QUERY, what)

    def request(self, opcode: int, *fields):
        """Send ``(opcode, request_id, *fields)`` and wait for the scheduler's REPLY."""
        with self._lock:
            self._next_request += 1
            request_id = self._next_request
            self.conn.send((opcode, request_id, *fields))
            self._wait_until(lambda: request_id in self._replies, None)
            return self._replies.pop(request_id)

    def kill_actor(self, actor_id: bytes, no_restart: bool) -> None:
        """Kill an actor; return once it is dead and the scheduler has dealt with its death
        (its calls failed, or it is restarting), so no call made after this reaches it."""
        self.request(P.KILL_ACTOR, actor_id, no_restart)
        with self._lock:
            channel = self._channels.get(actor_id)
            if channel is not None:  # to a dead process: the scheduler says what it owed
                self._channel_lost(channel)

    # -- functions -------------------------------------------------------------------------

    def ensure_function(self, fn_id: bytes, pickled_fn: Callable[[], bytes], name: str) -> None:
        if fn_id not in self._registered_functions:
            with self._lock:
                if fn_id not in self._registered_functions:
                    self.conn.send((P.REGISTER_FUNCTION, fn_id, pickled_fn(), name))
                    self._registered_functions.add(fn_id)
                    if self.leasing:  # a leased worker may ask the scheduler for it at once
                        self.flush()

    def forget_after_fork(self, parent_pid: int) -> None:
        """In a child the user (or a library) forked from this process: the session is the
        parent's, and the child must never touch it.  No message, no socket shut down (each
        is shared with the parent), no pin released in the arena (the parent's views hold
        them; unpinning is a no-op once the store is abandoned here), no lock taken (a thread
        of the parent may have held one at the fork).  The child's copies of the session's
        descriptors now point at /dev/null: a child that outlives this process can't keep
        its sockets open, which would hide its death from the scheduler."""
        self.closed = True
        self.forked_from = parent_pid
        self.store.abandon()
        fds = {self.conn.fd, self._wake_r, self._wake_w, *self.readers}
        fds.update(channel.conn.fd for channel in [*self._channels.values(), *self._leases])
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
        self.closed = True
        self._flush_wanted.set()  # lets the flusher see `closed` and end
        with self._lock:
            self._releases.clear()
            self._counts.clear()
            self._locations.clear()
            for futures in self._futures.values():
                for future in futures:
                    future.cancel()
            self._futures.clear()
            for channel in [*self._channels.values(), *self._leases]:
                channel.conn.close()
            self._channels.clear()
            self._leases.clear()
            self._backlog.clear()
            self._unregistered.clear()
            self._owner_only.clear()
            self.readers.clear()
            self.unflushed.clear()
        self.store.close()
        self.conn.close(hang_up=True)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class _Channel:
    """This process's direct connection to an actor, or to a worker it leases (``_direct``)."""

    __slots__ = ("actor_id", "conn", "peer_pid", "last_write", "sent", "last_used",
                 "recalled", "stalled", "depth_limit")

    def __init__(self, actor_id: Optional[bytes], conn: Connection, peer_pid: int):
        self.actor_id = actor_id  # None for a leased worker
        self.conn = conn
        self.peer_pid = peer_pid  # which process got our work, for the scheduler
        self.last_write = 0.0
        self.sent: Dict[bytes, _Leased] = {}  # a lease: tasks sent, not answered, in order
        self.last_used = 0.0
        self.recalled = False         # a lease: the scheduler wants it back
        self.stalled = False          # a lease: its task waits in get(); send nothing more
        self.depth_limit = 1          # a lease: how many tasks it may have (``_has_room``)


class _Leased:
    """A task of ours for a leased worker: in the backlog, or sent and not answered."""

    __slots__ = ("spec", "return_ids", "registered")

    def __init__(self, spec: tuple, return_ids):
        self.spec = spec
        self.return_ids = return_ids
        self.registered = False  # the scheduler knows of it (``_register``)


def _leasable(spec: tuple) -> bool:
    """A task a leased worker may run: nothing to wait for or hold, one CPU, no per-task
    environment; the rest go through the scheduler."""
    return (not spec[P.SPEC_ARG_IDS] and not spec[P.SPEC_CONTAINED]
            and spec[P.SPEC_RESOURCES] == P.LEASE_SHAPE and not spec[P.SPEC_EXTRA])


class _Waiter:
    __slots__ = ("remaining",)

    def __init__(self, remaining: int):
        self.remaining = remaining


def _unwrap(value, metadata: bytes):
    if metadata == META_ERROR:
        if isinstance(value, exceptions.RayTaskError):
            raise value.as_instanceof_cause()
        raise value
    return value
