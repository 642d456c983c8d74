"""This process's link to the scheduler: sending, the one reader, waiting, the flusher.

Runs in: the driver, every worker and every actor.

- ``send`` queues a message; ``flush`` writes every queued one in one frame.  A lone
  submission goes out at once; a burst goes out in frames of many (``flush_soon``), which
  saves a system call and a wake-up of the scheduler per message (~14 us each here).  The
  flusher thread sends what is left within ``_FLUSH_DELAY`` if the program stops calling
  shmray, and looks after leases while the program is busy elsewhere (``tend``).
- The thread that waits reads for itself (a hand-off between threads costs more than the
  hop: DESIGN.md), polling every descriptor at once: the scheduler's connection, direct
  channels, an actor's listening socket and callers (``readers``).  When several threads
  wait, one reads and the others sleep on a condition (leader/followers), and a wake-up
  pipe makes the reader look again when another thread opens a channel.  With a peer on a
  direct channel, a wait spins briefly first (``_direct.Spinner``).
- Every message this process gets from the scheduler, and the work a direct channel brings
  a worker or actor, is handled through one table (``handlers``: opcode -> handler of the
  message's fields), filled by the parts of the runtime and by the worker or actor.

Everything here runs with ``lock`` held, but for the moment a reader waits in poll().
"""

from __future__ import annotations

import functools
import os
import select
import threading
import time
from typing import Callable, Dict, Optional

from .. import _direct, _protocol as P, exceptions
from .._connection import Connection, ConnectionClosed
from .._context import cancel_point

_RELEASES_ALONE = 64  # queued release messages worth a frame of their own
_BATCH_WINDOW = 200e-6  # a submission this soon after a flush waits for the next frame
FLUSH_DELAY = 0.001     # ...but no longer than this
# Messages that may wait for the next frame: nobody is waiting on them.
_DEFERRABLE = frozenset((P.RELEASE, P.ESCAPED, P.DIRECT_CALL, P.DIRECT_DONE,
                         P.DIRECT_SUBMIT, P.CALLER_DONE))


def _nothing(*args):
    return None


@cancel_point
def _block(poller, timeout: Optional[float]):
    return poller.poll(None if timeout is None else min(timeout, 3600) * 1000)


class Link:
    """The connection to the scheduler, and every descriptor this process waits on."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.lock = threading.RLock()        # everything the runtime keeps, and the queue
        self.cv = threading.Condition(self.lock)
        self.reading = False                 # a thread is reading
        self.closed = False
        self.handlers: Dict[int, Callable] = {P.REPLY: self._on_reply}
        self._replies: Dict[int, object] = {}
        self._next_request = 0
        self.last_flush = 0.0
        self._flusher: Optional[threading.Thread] = None
        self._flush_wanted = False
        # The flusher waits on a pipe, not an Event: a write(2) to it wakes the flusher from
        # anywhere, even from a __del__ that runs inside a lock (``poke``).
        self._poke_r, self._poke_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Descriptors read besides the scheduler's: fd -> callback (with the lock held);
        # channels, and an actor's listening socket and callers.
        self.readers: Dict[int, Callable[[], None]] = {}
        self.listeners: set = set()  # those of them that only accept connections
        # Non-blocking connections with messages or bytes still to write; the reader writes
        # them when it waits, the flusher within a millisecond.
        self.unflushed: set = set()
        self.external_reader = False  # an event loop reads the connection (async actors)
        self.pending_interrupt = False  # a worker: its task was cancelled inside shmray
        self._spinner = _direct.Spinner()
        # Written to when a descriptor is added while another thread waits without it.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Hooks.  The worker's or actor's: its CPU lent while it waits, held-back replies to
        # write before waiting, parked reports once flushed.
        self.blocked_hook: Optional[Callable[[bool], None]] = None
        self.before_wait: Callable[[], None] = _nothing
        self.after_flush: Callable[[], None] = _nothing
        # The runtime's parts' (``Runtime`` wires them): releases to send with the next
        # message; leases to look after (the flusher's round, how soon, whether the program
        # is submitting right now, and idle ones to give back before a wait).
        self.drain: Callable[[], None] = _nothing
        self.tend: Callable[[], None] = _nothing
        self.tend_interval: Callable[[], Optional[float]] = _nothing
        self.submitting: Callable[[], bool] = lambda: False
        self.before_reading: Callable[[Optional[float]], Optional[float]] = \
            lambda remaining: remaining

    # -- sending -------------------------------------------------------------------------

    def send(self, message: tuple) -> None:
        # Releases queued until now go after the message: a release sent late only frees
        # memory later, one sent early can free an object the message refers to (a task's
        # result that contains a ref the task has since dropped).
        with self.lock:
            self.conn.send(message)
            self.drain()

    def flush(self) -> None:
        with self.lock:
            self.drain()
            try:
                self.conn.flush()
            except ConnectionClosed as exc:
                raise self.scheduler_gone() from exc
            self.last_flush = time.monotonic()
            self.after_flush()

    def flush_soon(self) -> None:
        """Send now, unless we sent very recently: then the message waits for the next frame
        (get() and wait() flush before they block; the flusher within a millisecond)."""
        if time.monotonic() - self.last_flush > _BATCH_WINDOW:
            self.flush()
            return
        self.flush_later()

    def flush_later(self) -> None:
        """Send within ``FLUSH_DELAY`` (or with the next message that can't wait): for
        reports nobody is waiting on, such as the registration of a direct actor call."""
        if self._flusher is None:
            self.start_flusher()
        if not self._flush_wanted:
            self._flush_wanted = True
            self.poke()

    def start_flusher(self) -> None:
        self._flusher = threading.Thread(target=self._flusher_loop, name="shmray-flusher",
                                         daemon=True)
        self._flusher.start()

    def poke(self) -> None:
        """Have the flusher flush (what is queued, releases too) within a millisecond.  Safe
        anywhere, even in a __del__ inside a lock: one non-blocking write(2)."""
        if not self.closed:
            try:
                os.write(self._poke_w, b"x")
            except OSError:
                pass  # full: it has plenty of wake-ups waiting already

    def send_all(self) -> None:
        """What the flusher would send, sent now: the program is submitting, and the
        flusher keeps off the lock meanwhile (``submitting``).  Callers look at
        ``last_flush`` first: this runs once a millisecond, not once a task."""
        if self.conn.pending or self.unflushed:
            self.flush()
            for conn in list(self.unflushed):
                self.write_some(conn)

    def _flusher_loop(self) -> None:
        poked = select.poll()
        poked.register(self._poke_r, select.POLLIN)
        while not self.closed:
            interval = self.tend_interval()
            if not poked.poll(None if interval is None else interval * 1000):
                self.tend()
                continue
            try:
                os.read(self._poke_r, 4096)
            except OSError:
                pass
            time.sleep(FLUSH_DELAY)
            if self.submitting():
                self.poke()  # the program writes as it goes: come back
                continue
            self.tend()
            with self.lock:
                self._flush_wanted = False
                if self.closed:
                    return
                try:
                    self.before_wait()  # replies an actor held back while calls ran
                    self.flush()
                except exceptions.RaySystemError:
                    return
                for conn in list(self.unflushed):
                    self.write_some(conn)
                if self.unflushed:
                    self.flush_later()  # a channel still full: try again in a millisecond

    def scheduler_gone(self) -> exceptions.RaySystemError:
        if self.closed:
            return exceptions.RaySystemError(
                "shmray was shut down while this call was waiting; its result is gone"
            )
        return exceptions.RaySystemError(
            "the shmray scheduler process is gone (killed or crashed); this session can't "
            "run anything more. Call shmray.shutdown() and shmray.init() to start again."
        )

    # -- requests ------------------------------------------------------------------------

    def request(self, build: Callable[..., tuple], *fields):
        """Send ``build(request_id, *fields)`` (a constructor of ``_protocol``) and wait for
        the scheduler's REPLY."""
        with self.lock:
            self._next_request += 1
            request_id = self._next_request
            self.conn.send(build(request_id, *fields))
            self.wait_until(lambda: request_id in self._replies, None)
            return self._replies.pop(request_id)

    def _on_reply(self, request_id, value) -> None:
        self._replies[request_id] = value

    # -- waiting -------------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], bool], deadline: Optional[float]) -> bool:
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
                if self.reading:  # another thread reads for us
                    self.cv.wait(remaining)
                    continue
                self._read_once(self.before_reading(remaining))
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
        self.before_wait()
        self.drain()
        for conn in list(self.unflushed):
            self.write_some(conn)
        pending = self.conn.pending
        if pending and (len(pending) >= _RELEASES_ALONE
                        or any(message[0] not in _DEFERRABLE for message in pending)):
            try:
                self.conn.flush()
            except ConnectionClosed as exc:
                raise self.scheduler_gone() from exc
            self.after_flush()

    def _read_once(self, timeout: Optional[float]) -> None:
        """Become the reader: wait for messages without the lock, handle them with it."""
        self.reading = True
        poller = self._poller()
        self.lock.release()
        try:
            ready = self._wait_ready(poller, timeout)
            messages = []
            if any(fd == self.conn.fd for fd, _ in ready):
                messages = self.conn.recv_messages(block=True)
        except (ConnectionClosed, OSError) as exc:  # OSError: closed under us by shutdown
            raise self.scheduler_gone() from exc
        finally:
            self.lock.acquire()
            self.reading = False
            self.cv.notify_all()  # a follower may now read, or see the error for itself
        try:
            for message in messages:
                self.handle(message)
            self._serve_descriptors(ready)
        finally:
            self.cv.notify_all()

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
        if len(self.readers) <= len(self.listeners):  # no peer of ours on a direct channel
            return _block(poller, timeout)
        return self._spinner.wait(lambda: poller.poll(0), functools.partial(_block, poller),
                                  timeout)

    def wake_reader(self) -> None:
        """A descriptor was added while another thread waits: make it look again (caller
        holds the lock)."""
        if self.reading:
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

    def write_soon(self, channel) -> bool:
        """Write a channel's queue now, or with the next frame if we wrote to it very
        recently (a burst of calls goes out in frames of many; get/wait write it before
        waiting).  False if the peer is found gone."""
        now = time.monotonic()
        if now - channel.last_write > _BATCH_WINDOW:
            channel.last_write = now
            return self.write_some(channel.conn)
        self.unflushed.add(channel.conn)
        return True

    def drop(self, conn: Connection) -> None:
        """Stop reading and writing a connection, and close it."""
        self.readers.pop(conn.fd, None)
        self.unflushed.discard(conn)
        conn.close()

    def poll(self) -> None:
        """Handle whatever has arrived, without waiting (caller holds the lock)."""
        if self.reading:
            return
        ready = self._poller().poll(0)
        if any(fd == self.conn.fd for fd, _ in ready):
            try:
                self.conn.fill()
            except ConnectionClosed as exc:
                raise self.scheduler_gone() from exc
            for message in self.conn.recv_messages(block=False):
                self.handle(message)
        self._serve_descriptors(ready)

    def serve_arrived(self) -> bool:
        """Handle what has arrived from the scheduler, for an event loop that reads the
        connection itself (an async actor's); False once the scheduler is gone."""
        with self.lock:
            try:
                self.conn.fill_nonblocking()
                messages = self.conn.recv_messages(block=False)
            except ConnectionClosed:
                return False
            for message in messages:
                self.handle(message)
            self.cv.notify_all()
        return True

    def wake_waiters(self) -> None:
        """Threads waiting in ``wait_until`` look at their predicates again."""
        with self.lock:
            self.cv.notify_all()

    def handle(self, message: tuple) -> None:
        """A message from the scheduler (caller holds the lock): through the one table."""
        handler = self.handlers.get(message[0])
        if handler is None:  # a message for a part this process does not have: a bug
            raise exceptions.RaySystemError(
                f"shmray: process {os.getpid()} got a message it has no use for: "
                f"opcode {message[0]}")
        handler(*message[1:])

    # -- the end ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Nothing more is sent; the flusher ends."""
        self.poke()  # lets the flusher see `closed` and end
        self.closed = True

    def close(self) -> None:
        self.stop()
        with self.lock:
            self.readers.clear()
            self.unflushed.clear()
        self.conn.close(hang_up=True)
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=1.0)  # before its pipe goes: the number may be reused
        for fd in (self._wake_r, self._wake_w, self._poke_r, self._poke_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def descriptors(self) -> set:
        """Every descriptor of the session this process holds (for a forked child)."""
        return {self.conn.fd, self._wake_r, self._wake_w, self._poke_r, self._poke_w,
                *self.readers}
