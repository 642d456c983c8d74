"""The actor forker: actors are forked by a small process of their own, not by the scheduler.

Runs in: the scheduler (``Spawner``), and the process it forks to fork actors (``serve``).

A fork copies the parent's page tables, and afterwards the parent copies each page it writes
to until the child exits.  The scheduler grows with every actor it keeps (records,
connections), so forking actors from it cost more per actor the more there were: ``os.fork``
took 3.4 ms at 100 actors and 7.0 ms at 1,000, and the scheduler's own work right after
each fork three to four times longer.  So the scheduler forks, once (when the first actor is
created), a process that does nothing but fork actors: it stays as small as the scheduler
was then, and the scheduler never forks again for an actor.  (Workers are still forked by
the scheduler: a few, at start, and one now and then to replace one that died.)

What an actor needs from the scheduler crosses a SEQPACKET socket pair, descriptors
included (SCM_RIGHTS): a request carries the class name and the actor's slot, a memfd the
scheduler has mapped (``_protocol``); the answer, the actor's pid and the scheduler's end of
its connection.  The actor's parent is this process, which reaps it and reports its exit
status; the scheduler waits for that report when the actor's connection ends (``status``).
This process ends with the scheduler (its parent-death signal), and its actors with it.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import time
from typing import Callable, Dict, Optional, Tuple

from . import _events, _slot, _threads
from ._actor_process import actor_main
from ._connection import Connection, connection_pair, wait_readable
from ._process import fork_child

_MESSAGE_MAX = 4096           # a request or report, pickled
_SPAWN_WAIT = 30.0            # a fork answers well within this
_STATUS_WAIT = 1.0            # an actor's exit is reported well within this after its end
_EXITED = "exited"


class Spawner:
    """The scheduler's side: asks for actors, and hears how they ended."""

    def __init__(self, close_inherited: Callable[[], None], store, session_dir: str,
                 options: dict):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.events_size = _events.log_bytes(options["task_events"])

        def main():
            close_inherited()
            ours.close()
            serve(theirs, store, session_dir, options)

        self.pid = fork_child("shmray::spawner", main)
        theirs.close()
        self.sock = ours
        self.children: set = set()            # pids of the actors it forked, not reported
        self.statuses: Dict[int, Optional[int]] = {}  # reported, not asked for yet

    def spawn(self, class_name: str) -> Tuple[Connection, int, _slot.Slot]:
        """Fork an actor process (named shmray::ClassName): (connection, pid, slot)."""
        slot_fd = os.memfd_create("shmray-slot", os.MFD_CLOEXEC)
        try:
            os.ftruncate(slot_fd, _slot.SLOT_SIZE + self.events_size)
            slot = _slot.map_slot(slot_fd, self.events_size)
            socket.send_fds(self.sock, [pickle.dumps(class_name)], [slot_fd])
        finally:
            os.close(slot_fd)
        deadline = time.monotonic() + _SPAWN_WAIT
        while True:
            message, fds = self._receive(deadline)
            if message[0] != _EXITED:
                break
        _, pid = message
        conn = Connection(socket.socket(fileno=fds[0]), f"shmray::{class_name}")
        self.children.add(pid)
        return conn, pid, slot

    def owns(self, pid: int) -> bool:
        return pid in self.children

    def status(self, pid: int, timeout: float = _STATUS_WAIT) -> Optional[int]:
        """The exit status of an actor it forked, once reported (None if not in time)."""
        deadline = time.monotonic() + timeout
        while pid not in self.statuses:
            try:
                self._receive(deadline)
            except (TimeoutError, ConnectionError):
                return None
        self.children.discard(pid)
        return self.statuses.pop(pid)

    def _receive(self, deadline: float):
        """The next message; exit reports are kept in ``statuses`` as they come."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not wait_readable(self.sock.fileno(), remaining):
            raise TimeoutError("the actor forker did not answer in time")
        data, fds, _, _ = socket.recv_fds(self.sock, _MESSAGE_MAX, 1)
        if not data:
            raise ConnectionError("the actor forker is gone")
        message = pickle.loads(data)
        if message[0] == _EXITED:
            self.statuses[message[1]] = message[2]
        return message, fds

    def close(self) -> None:
        """End it (its actors are ended already: ``Scheduler.stop``), and reap it."""
        self.sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def serve(sock: socket.socket, store, session_dir: str, options: dict) -> None:
    """The forker's loop: fork what is asked for, report each child's end, and end when the
    scheduler's end of the socket closes."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the poll below
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                os.read(wake_r, 4096)
                _report_exits(sock)
                continue
            data, fds, _, _ = socket.recv_fds(sock, _MESSAGE_MAX, 1)
            if not data:
                return
            class_name = pickle.loads(data)
            scheduler_end, pid = _fork_actor(class_name, fds[0], sock, (wake_r, wake_w),
                                             store, session_dir, options)
            os.close(fds[0])
            socket.send_fds(sock, [pickle.dumps(("forked", pid))], [scheduler_end.fd])
            scheduler_end.close()


def _report_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        sock.send(pickle.dumps((_EXITED, pid, status)))


def _fork_actor(class_name: str, slot_fd: int, sock: socket.socket, wake: tuple, store,
                session_dir: str, options: dict):
    _threads.before_fork()  # the child inherits its BLAS pools sized for the usual task
    scheduler_end, child_end = connection_pair("scheduler", f"shmray::{class_name}")

    def main():
        sock.close()
        scheduler_end.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wake:
            os.close(fd)
        slot = _slot.map_slot(slot_fd, _events.log_bytes(options["task_events"]))
        os.close(slot_fd)
        actor_main(child_end, store, session_dir, options, slot)

    pid = fork_child(f"shmray::{class_name}", main)
    child_end.close()
    return scheduler_end, pid
