"""The inspect socket: the scheduler answers the ``shmray`` command line (another process,
maybe another terminal) from its own loop.

Runs in: the scheduler, inside its loop (``Scheduler.run``).  The loop is one thread with
one selector and runs every task of the session, so nothing here may ever wait on a peer::

    shmray (any process of our uid)           scheduler loop
    ───────────────────────────────           ──────────────
    connect ─────────────────────────────────▶ listener: accept; SO_PEERCRED uid not ours:
                                               hang up at once, nothing sent
    {"what": "status"}\\n ────────────────────▶ peer: read (non-blocking), cut lines
                                               answer(request)  (``Scheduler.answer_inspect``)
               ◀──────────── {"value": ...}\\n  queued, written as the peer makes room

Where the socket and the session's card live, and the protocol: ``_inspect_client`` (which
the command line imports; this side writes what it reads).  What a peer may send is
bounded, as any local process of our uid may be buggy or hostile, and none of it may take
the session down:

- JSON only, never pickle; a line that is not a JSON object is answered with an error;
- a request line longer than ``MAX_REQUEST`` closes the connection;
- a peer is answered at most ``_BATCH`` requests a turn of the loop, and is read from only
  once it has taken its answers (what it sent ahead waits in the kernel's buffer), so a
  peer that never reads holds one answer at most, and is hung up on after
  ``_STALL_SECONDS`` without taking a byte;
- an answer above ``MAX_REPLY`` bytes, or one that would queue more than ``_MAX_QUEUED``
  for all peers together, is replaced with an error;
- at most ``_MAX_PEERS`` connections at once; others are told so and hung up on.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

from .. import _direct
from .._inspect_client import (
    MAX_REPLY,
    MAX_REQUEST,
    SESSION_FILE,
    SOCKET_NAME,
    process_start,
    session_name,
)

_MAX_PEERS = 32
_BATCH = 16               # requests answered to one peer per turn of the loop
_ACCEPTS = 16             # connections accepted per turn
_MAX_QUEUED = 128 << 20   # answer bytes waiting for all peers to read them
_STALL_SECONDS = 30.0     # a peer that reads none of its answer this long is hung up on
_READ_SIZE = 1 << 16

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def start(session_dir: str, socket_dir: str, driver_pid: int, selector,
          answer: Callable[[dict], Any]) -> Optional["InspectServer"]:
    """Listen on the session's inspect socket and write its card; None (said on stderr)
    if the socket can't be made: the session runs, but can't be inspected."""
    path = os.path.join(socket_dir, SOCKET_NAME)
    listener = _direct.listen(path)  # in the 0700 socket folder: nobody else reaches it
    try:
        if listener is None:
            raise OSError(f"can't listen on {path}")
        os.chmod(path, 0o600)
        _write_card(session_dir, {
            "version": 1,
            "session_name": session_name(session_dir),
            "session_dir": session_dir,
            "socket": path,
            "driver_pid": driver_pid,
            "scheduler_pid": os.getpid(),
            "scheduler_start": process_start(os.getpid()),
            "start_time_ms": int(time.time() * 1000),
        })
    except OSError as exc:
        if listener is not None:
            listener.close()
            _direct.unlink_quietly(path)
        print(f"shmray scheduler: this session can't be inspected ({exc})", file=sys.stderr,
              flush=True)
        return None
    return InspectServer(listener, path, selector, answer)


def _write_card(session_dir: str, card: dict) -> None:
    """Write the card whole or not at all: a reader never sees half of it."""
    final = os.path.join(session_dir, SESSION_FILE)
    draft = final + ".draft"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(card).encode())
    finally:
        os.close(fd)
    os.replace(draft, final)


class InspectServer:
    """The listening socket and its peers, served from the loop's selector: each
    registered with a callable ``handle(mask)`` as its data (``Scheduler._handle_events``)."""

    def __init__(self, listener: socket.socket, path: str, selector,
                 answer: Callable[[dict], Any]):
        self.listener = listener
        self.path = path
        self.selector = selector
        self.answer = answer
        self.peers: Dict[int, _Peer] = {}
        self.queued = 0  # answer bytes not yet read by their peers
        self.listening = True
        selector.register(listener.fileno(), _READ, self._on_listener)

    def descriptors(self) -> List[int]:
        """Every descriptor it holds (a process forked from the scheduler closes them)."""
        return [self.listener.fileno(), *self.peers]

    def close(self) -> None:
        """Stop serving: connecting is refused from now on, peers see EOF."""
        for peer in list(self.peers.values()):
            peer.close()
        if self.listening:
            self.selector.unregister(self.listener.fileno())
        self.listener.close()
        _direct.unlink_quietly(self.path)

    def _on_listener(self, mask: int) -> None:
        self._hang_up_stalled()
        for _ in range(_ACCEPTS):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError:  # out of descriptors: stop listening until a peer leaves, or
                self._pause()  # the loop would spin on a listener always readable
                return
            sock.setblocking(False)
            try:
                uid = _direct.peer_credentials(sock)[1]
            except OSError:
                uid = -1
            if uid != os.getuid():
                sock.close()  # not one byte to another user
                continue
            if len(self.peers) >= _MAX_PEERS:
                try:
                    sock.send(_error(f"too many connections to this session (at most "
                                     f"{_MAX_PEERS}); try again"), socket.MSG_NOSIGNAL)
                except OSError:
                    pass
                sock.close()
                continue
            peer = _Peer(self, sock)
            self.peers[peer.fd] = peer
            self.selector.register(peer.fd, _READ, peer.on_event)

    def _pause(self) -> None:
        if self.listening:
            self.selector.unregister(self.listener.fileno())
            self.listening = False

    def forget(self, peer: "_Peer") -> None:
        del self.peers[peer.fd]
        if not self.listening:
            self.selector.register(self.listener.fileno(), _READ, self._on_listener)
            self.listening = True

    def _hang_up_stalled(self) -> None:
        now = time.monotonic()
        for peer in [p for p in self.peers.values()
                     if p.out and now - p.since > _STALL_SECONDS]:
            peer.close()

    def reply_to(self, line: bytes) -> bytes:
        """The answer line to one request line."""
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):  # bad UTF-8 is a ValueError too
            return _error("the request is not JSON; send one JSON object a line, e.g. "
                          '{"what": "status"}')
        if not isinstance(request, dict):
            return _error('a request is a JSON object, e.g. {"what": "status"}')
        try:
            value = self.answer(request)
        except Exception:  # a bug here must not take the session down
            traceback.print_exc()
            print(f"shmray scheduler: internal error answering {line[:200]!r}; continuing",
                  file=sys.stderr, flush=True)
            return _error("internal error answering the request (the session's output "
                          "shows it)")
        try:
            reply = json.dumps({"value": value}).encode() + b"\n"
        except (TypeError, ValueError, RecursionError) as exc:
            return _error(f"internal error: the answer is not JSON ({exc})")
        if len(reply) > MAX_REPLY:
            return _error(f"the answer is too large ({len(reply)} bytes, at most {MAX_REPLY}); "
                          "ask for fewer rows")
        if self.queued + len(reply) > _MAX_QUEUED:
            return _error("the session is busy sending other answers; try again")
        return reply


class _Peer:
    """One connection: the bytes it sent that are not answered yet, and the answers it has
    not read yet."""

    __slots__ = ("server", "sock", "fd", "received", "out", "since", "mask")

    def __init__(self, server: InspectServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.received = bytearray()
        self.out = bytearray()
        self.since = 0.0  # when ``out`` last had a byte taken, or became non-empty
        self.mask = _READ

    def on_event(self, mask: int) -> None:
        self.server._hang_up_stalled()
        if self.server.peers.get(self.fd) is not self:
            return  # hung up on earlier this turn (its number may be a new peer's now)
        try:
            if mask & _READ:
                try:
                    data = self.sock.recv(_READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    data = None  # a wake-up with nothing to read after all
                if data == b"":
                    self.close()
                    return
                self.received += data or b""
            self._send()
            if not self.out and not self._answer_some():
                self.close()  # a request too long: the rest of the stream can't be trusted
                return
        except OSError:  # reset, or gone mid-answer
            self.close()
            return
        # Read more only once everything sent so far is answered and taken.
        wanted = _WRITE if self.out or b"\n" in self.received else _READ
        if wanted != self.mask:
            self.server.selector.modify(self.fd, wanted, self.on_event)
            self.mask = wanted

    def _answer_some(self) -> bool:
        """Answer up to ``_BATCH`` whole lines, while the peer takes the answers; False if
        a line is too long."""
        for _ in range(_BATCH):
            end = self.received.find(b"\n", 0, MAX_REQUEST + 1)
            if end < 0:
                return len(self.received) <= MAX_REQUEST
            line = bytes(self.received[:end])
            del self.received[:end + 1]
            reply = self.server.reply_to(line)
            self.out += reply
            self.server.queued += len(reply)
            self.since = time.monotonic()
            self._send()
            if self.out:
                break
        return True

    def _send(self) -> None:
        if not self.out:
            return
        try:
            sent = self.sock.send(self.out, socket.MSG_NOSIGNAL)  # EPIPE, never SIGPIPE
        except (BlockingIOError, InterruptedError):
            return
        if sent:
            del self.out[:sent]
            self.server.queued -= sent
            self.since = time.monotonic()

    def close(self) -> None:
        server = self.server
        if server.peers.get(self.fd) is not self:
            return
        server.queued -= len(self.out)
        self.out = bytearray()
        server.selector.unregister(self.fd)
        self.sock.close()
        server.forget(self)


def _error(text: str) -> bytes:
    return json.dumps({"error": text}).encode() + b"\n"
