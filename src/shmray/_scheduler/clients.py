"""The scheduler's peers: a record per connected process, and the table that writes to them.

Runs in: the scheduler.

Every process of a session has one connection to the scheduler: the driver, each worker,
each actor.  ``Clients`` registers them with the loop's selector and queues what is sent to
each; the loop writes the queues once per turn (``Scheduler._flush_dirty``).  The helpers at
the end reap and signal the processes the scheduler forked.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import time
from typing import Dict, List, Optional

from .._connection import Connection
from .._process import describe_exit


class Client:
    """A process connected to the scheduler: the driver, a worker or an actor."""

    __slots__ = ("conn", "pid", "kind", "holds", "functions", "task", "blocked", "alive",
                 "actor", "held_since", "queued", "cancel_slot", "calls", "leases", "park_slot",
                 "leased_to", "direct", "recalled", "orphans", "blocked_unknown",
                 "verdict_given", "lease_wanted", "unanswered", "killed_for", "killers",
                 "escaped")

    def __init__(self, conn: Connection, pid: int, kind: str):
        self.conn = conn
        self.pid = pid
        self.kind = kind
        self.holds: set = set()          # object ids it has a live ObjectRef to
        self.escaped: set = set()        # ids it pickled itself: held until it exits
        self.functions: set = set()      # function ids whose code it has
        self.alive = True
        self.held_since = 0.0            # when its queued messages were last written
        # A worker: the task it runs, tasks sent ahead to it (prefetch), whether the one it
        # runs waits in get() (its CPU lent), its shared slot (``_protocol``: the task SIGINT
        # is for, the one it started...), calls per function (max_calls), and the task a
        # forced cancel killed it for.
        self.task = None
        self.queued: collections.deque = collections.deque()
        self.blocked = False
        self.cancel_slot = None
        self.calls: Dict[bytes, int] = {}
        self.killed_for: Optional[bytes] = None
        # A leased worker (``leases``): the driver it is lent to, tasks sent to it, whether
        # it was asked back; what it said of tasks before their registration came (children
        # it submitted, that they waited in get()); and, once its driver has said what it
        # got from it, the tasks it never answered.
        self.leased_to: Optional["Client"] = None
        self.direct: Dict[bytes, object] = {}
        self.recalled = False
        self.orphans: List[tuple] = []     # (parent id, task)
        self.blocked_unknown: set = set()
        self.verdict_given = False
        self.unanswered: list = []
        # A driver: the workers lent to it, and how many more it asks for.
        self.leases: set = set()
        self.lease_wanted = 0
        # An actor process: its actor, the kill()s to answer once it is dead, and its slot
        # (``_protocol``; only the reports it parks there).
        self.actor = None
        self.killers: list = []
        self.park_slot = None

    def __repr__(self) -> str:
        return f"<{self.kind} pid={self.pid}>"


class Clients:
    """Every connected process, by descriptor; what is queued to each is written by the loop."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.by_fd: Dict[int, Client] = {}
        self.dirty: set = set()  # clients with messages queued

    def add(self, conn: Connection, pid: int, kind: str) -> Client:
        conn.sock.setblocking(False)
        client = Client(conn, pid, kind)
        self.by_fd[conn.fd] = client
        self.selector.register(conn.fd, selectors.EVENT_READ, client)
        return client

    def send(self, client: Client, message: tuple) -> None:
        if client.alive:
            client.conn.send(message)
            self.dirty.add(client)

    def remove(self, client: Client) -> bool:
        """Forget a client that is gone; False if it was already."""
        if not client.alive:
            return False
        client.alive = False
        self.dirty.discard(client)
        try:
            self.selector.unregister(client.conn.fd)
        except (KeyError, ValueError):
            pass
        self.by_fd.pop(client.conn.fd, None)
        client.conn.close()
        return True

    def workers(self) -> List[Client]:
        return [c for c in self.by_fd.values() if c.kind == "worker"]

    def has_pid(self, pid: int) -> bool:
        return any(c.pid == pid for c in self.by_fd.values())

    def all(self) -> List[Client]:
        return list(self.by_fd.values())


def how(status: Optional[int]) -> str:
    return describe_exit(status) if status is not None else "an unknown cause"


def reap(pid: int, timeout: float = 1.0) -> Optional[int]:
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
            kill_quietly(pid)
            try:
                return os.waitpid(pid, 0)[1]
            except ChildProcessError:
                return None
        time.sleep(0.001)


def kill_quietly(pid: int) -> None:
    signal_quietly(pid, signal.SIGKILL)


def signal_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
