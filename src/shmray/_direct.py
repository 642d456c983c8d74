"""Direct channels: an actor call, or a plain task, in two hops instead of four.

Runs in: actors and workers (the listening side), every process that calls actors, and the
driver (which leases workers).

An actor, and a worker a driver may lease, listens on a Unix socket in the session's socket
folder (``socket_folder``: made 0700, so no other user can connect to a socket there, nor
bind a name a process of ours is about to take; an abstract socket's name, which any user can
read in /proc/net/unix and bind first, let another user stop every task of a session).  What
arrives is still checked: only processes of our user are served, and a message of the wrong
shape closes its connection.  A calling process connects once per actor
and keeps the connection; a call whose arguments hold no ObjectRef (nothing to wait for,
nothing whose lifetime the scheduler must track on the way) is written straight to the
actor, which writes the result straight back::

    caller ── CALL, CALL, ... ───────────▶ actor          (the critical path: 2 hops)
       ◀───── RESULT, RESULT, ... ─────────┘
       └── only if it must: DIRECT_CALL, CALLER_DONE, CALLS_LOST ──▶ scheduler

The caller owns such a call, and the scheduler hears of it only when it must
(``_runtime.channels``: a ref to its result leaves the caller, a call through the scheduler
follows it, the caller's last handle to the actor goes, its results hold refs, live in the
arena or will be retried, its channel broke); then the caller registers it (DIRECT_CALL)
and reports what came back (CALLER_DONE), and the actor reports first only the results
the caller can't use at once, and those in the arena (DIRECT_DONE).  The caller is the
witness of what it saw: if the actor dies, the scheduler keeps the registered calls it owed
waiting until the caller has read all the actor sent and named the calls that never came
back (CALLS_LOST); those are retried or failed as calls it forwarded itself would be.

A lease carries tasks the same way: the driver owns its plain tasks and sends them to
workers the scheduler lends it, several at a time to a worker for short functions; the
lease holds the worker's CPU until it is given back::

    driver ── EXECUTE, EXECUTE, ... ─────▶ leased worker
       ◀───── RESULT, RESULT, ... ─────────┘
       └── only if it must: DIRECT_SUBMIT, CALLER_DONE ──▶ scheduler

The scheduler hears of such a task only when it must (``_runtime.leases``: a ref to it
leaves the driver, it is cancelled, it waited in get() or submitted tasks, its results
hold refs or live in the arena, it will be retried); then the driver registers it and
reports what came back, and the worker reports first only the results the driver can't
use at once (DIRECT_DONE).  The driver is the witness of what it saw: if the worker dies,
it reads all the worker sent, registers what was left unanswered (LEASE_RETURN) and
answers the scheduler's question (LEASE_LOST, LEASE_VERDICT) before anything is retried
or failed.

Per-caller order holds across both routes: a caller sends directly only while none of its
calls to that actor that went through the scheduler is unfinished, and the scheduler forwards
a caller's call only once the caller's direct calls to the actor registered before it are
done (the caller registers those it has not had answers to first).  An actor whose last
handle is gone is told to exit only once its direct calls are done (the caller registers
those it has not had answers to before it lets go of the handle).

Waiting on a channel spins briefly before sleeping (``Spinner``): on this 2-CPU VM a wake-up
across CPUs costs ~30 us, a third of a round trip.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import shutil
import socket
import struct
import tempfile
import time
from typing import Callable, Optional, Tuple

from ._connection import Connection
from ._context import cancel_point

_BACKLOG = 128
SPIN_SECONDS = 100e-6 if (os.cpu_count() or 1) > 1 else 0.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


_SUN_PATH_MAX = 107   # bytes of a socket's path (sun_path, less its NUL)
_LONGEST_NAME = 26    # "/a" + 24 hex digits


def socket_folder(session_dir: str) -> str:
    """A new 0700 folder for the session's sockets: ``session_dir/s``, or, should socket
    paths there be too long for the kernel (a deep TMPDIR), one of its own in /tmp, which
    ``remove_socket_folder`` removes."""
    path = os.path.join(session_dir, "s")
    if len(path.encode()) + _LONGEST_NAME <= _SUN_PATH_MAX:
        os.mkdir(path, 0o700)
        return path
    return tempfile.mkdtemp(prefix="shmray-s-", dir="/tmp")  # 0700, like every mkdtemp


def remove_socket_folder(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def address(folder: str, actor_id: bytes) -> str:
    """The socket an actor listens on: unique to it within the session, short enough for
    any folder ``socket_folder`` makes."""
    return os.path.join(folder, "a" + hashlib.blake2b(actor_id, digest_size=12).hexdigest())


def worker_address(folder: str, pid: int) -> str:
    """The socket a worker listens on, for the driver that leases it."""
    return os.path.join(folder, "w%d" % pid)


def listen(path: str) -> Optional[socket.socket]:
    """A listening socket at ``path``, or None if it can't be made (every call then goes
    through the scheduler, which is slower but complete).  A file left there by a process
    that died (its pid reused, an actor restarting) is replaced: the folder is ours alone."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        unlink_quietly(path)
        sock.bind(path)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def accept(listener: socket.socket) -> Optional[Tuple[Connection, int]]:
    """A caller's connection (non-blocking) and the caller's pid, or None if none waits.
    Only processes of our own user are served (they could ptrace us anyway); others, should
    the folder's permissions ever be changed, are hung up on."""
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        except OSError:  # out of descriptors: the caller waits in the backlog meanwhile
            return None
        pid, uid = peer_credentials(sock)
        if uid == os.getuid():
            sock.setblocking(False)
            return Connection(sock, peer="caller"), pid
        sock.close()


def connect(path: str) -> Optional[Tuple[Connection, int]]:
    """Connect to the socket at ``path``; (connection, pid of the process that made the
    listening socket: an actor, or the scheduler for a worker's), or None if nobody of ours
    listens there (not started yet, gone, its backlog full, or we are out of descriptors):
    the work then goes through the scheduler."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return None
    sock.setblocking(False)
    try:
        sock.connect(path)
        pid, uid = peer_credentials(sock)
    except OSError:
        sock.close()
        return None
    if uid != os.getuid():  # never unpickle what another user sends
        sock.close()
        return None
    return Connection(sock, peer="actor"), pid


def peer_credentials(sock: socket.socket) -> Tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel saw it connect."""
    pid, uid, _ = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


class Spinner:
    """Wait for a peer's answer by polling for a moment before sleeping, while answers have
    been coming back fast.

    A process asleep in select() is woken ~30 us after its peer on the other CPU writes
    (this VM's wake-up); one that polls sees the bytes at once, so a round trip on a direct
    channel then costs no wake-up on either side.  Between polls the CPU is offered to
    whoever else wants it (the peer may be waiting for this very CPU).  Waits that outlast
    the spin turn it off, so an idle or long-waiting process never burns a CPU.
    """

    __slots__ = ("recent",)

    def __init__(self):
        self.recent = 1.0  # how long waits took lately, seconds (moving average)

    @cancel_point  # between polls and in block(): nothing half done
    def wait(self, poll: Callable[[], object], block: Callable[[Optional[float]], object],
             timeout: Optional[float]):
        """poll() or block(timeout)'s result: whatever arrived first."""
        started = time.perf_counter()
        found = None
        if self.recent < SPIN_SECONDS:
            deadline = started + SPIN_SECONDS
            while True:
                found = poll()
                if found or time.perf_counter() > deadline:
                    break
                os.sched_yield()
            if not found and timeout is not None:
                timeout = max(timeout - SPIN_SECONDS, 0.0)
        if not found:
            found = block(timeout)
        self.recent = 0.5 * (self.recent + time.perf_counter() - started)
        return found


class SpinningSelector(selectors.EpollSelector):
    """The event loop's selector for an async actor: spins like ``Spinner`` before it sleeps."""

    def __init__(self):
        super().__init__()
        self._spinner = Spinner()

    def select(self, timeout=None):
        if timeout is not None and timeout <= 0:
            return super().select(0)
        return self._spinner.wait(lambda: super(SpinningSelector, self).select(0),
                                  super().select, timeout)
