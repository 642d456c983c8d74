"""Reaching a running session from another process: find the user's sessions, and ask one a
question (the transport of the ``shmray`` command line and of ``shmray.util.state`` outside
a session).

Runs in: any process of the session's user, usually the command line in another terminal.
It imports nothing of the runtime (no numpy, no arena, no session), so the command line
starts fast; the scheduler imports the layout from here (``_scheduler.inspect_server``).

Where a session is found (the scheduler writes it as it starts and removes it as it ends,
however it ends; ``Scheduler.stop``, ``_session.shutdown``)::

    $TMPDIR/shmray-session-XXXX/   0700  the session folder; its name names the session
        session.json               0600  the card: name, socket, pids, start time
        s/inspect                  0600  the socket the scheduler answers on (``s`` is the
                                         session's socket folder, ``_direct.socket_folder``:
                                         /tmp/shmray-s-XXXX when $TMPDIR is too deep)

Sessions are found in this process's temp dir (``tempfile.gettempdir()``: $TMPDIR, else
/tmp), where ``init`` makes them; one started elsewhere (``_temp_dir``, another $TMPDIR) is
reached by its folder.  A card whose scheduler is gone (killed with the driver) is stale and
skipped; the scheduler is known by its pid and that process's start time, so a reused pid
is not mistaken for it.

The protocol is newline-delimited JSON: one request object a line, e.g.
``{"what": "status"}``, answered by one line, ``{"value": ...}`` or ``{"error": "text"}``.
Never pickle: unpickling runs code, and what listens on a socket must assume a hostile
peer.  Trust goes both ways: the folder and the socket must be ours, owner-only, before we
connect, and the process that accepted must be of our uid (SO_PEERCRED) before we send; the
scheduler hangs up at once on any other uid.  A session of another user is, to us, no
session: "no shmray session of yours".
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import tempfile
import time
from typing import Any, List, Optional

SESSION_PREFIX = "shmray-session-"  # ``_session.init`` makes the folder with mkdtemp
SESSION_FILE = "session.json"
SOCKET_NAME = "inspect"
MAX_REQUEST = 64 << 10   # bytes of one request line; a longer one closes its connection
MAX_REPLY = 64 << 20     # bytes of one reply line; the scheduler answers an error instead
_MAX_CARD = 64 << 10
_READ_SIZE = 1 << 16
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class InspectError(ConnectionError):
    """Base of the errors reaching a session; never raised itself."""


class NoSessionError(InspectError):
    """No running session of this user matches: none runs, the name or folder given is no
    session (any more), or it is another user's."""


class SeveralSessionsError(InspectError):
    """No session was named and several run; ``sessions`` lists their cards."""

    def __init__(self, message: str, sessions: List[dict]):
        super().__init__(message)
        self.sessions = sessions


class SessionEndedError(InspectError):
    """The session ended before or while it answered."""


class SessionTimeoutError(InspectError):
    """The session did not answer in time (its scheduler stopped or is stuck)."""


class RequestError(InspectError):
    """The session answered with an error: the request was malformed, or answering failed."""


# -- the layout, as both sides see it --------------------------------------------------------

def session_name(session_dir: str) -> str:
    """A session's name: its folder's, e.g. ``shmray-session-k2x9_abc``."""
    return os.path.basename(os.path.normpath(session_dir))


def process_start(pid: int) -> Optional[int]:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None if
    no such process: with the pid, it names a process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _ours(path: str, kind: int, private: bool) -> bool:
    """Whether ``path`` (not followed if a link) is a ``kind`` (stat.S_IFDIR...) of our
    uid; ``private``: that nobody else may use it."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if stat.S_IFMT(info.st_mode) != kind or info.st_uid != os.getuid():
        return False
    return not private or info.st_mode & 0o077 == 0


def _process_of_ours(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


# -- finding sessions ------------------------------------------------------------------------

def list_sessions(root: Optional[str] = None) -> List[dict]:
    """The cards of this user's running sessions in ``root`` (default: the temp dir),
    oldest first.  A card: session_name, session_dir, socket, driver_pid, scheduler_pid,
    start_time_ms."""
    root = root or tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = []
    for name in names:
        if name.startswith(SESSION_PREFIX):
            card = read_card(os.path.join(root, name))
            if card is not None:
                found.append(card)
    found.sort(key=lambda card: (card["start_time_ms"], card["session_name"]))
    return found


def read_card(session_dir: str) -> Optional[dict]:
    """The card of the live session in ``session_dir``, or None: not a folder of ours and
    owner-only, no readable card of ours in it, or its scheduler is gone."""
    if not _ours(session_dir, stat.S_IFDIR, private=True):
        return None
    try:
        fd = os.open(os.path.join(session_dir, SESSION_FILE),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() \
                or info.st_mode & 0o022 or info.st_size > _MAX_CARD:
            return None
        card = json.loads(os.read(fd, _MAX_CARD))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    if not _valid_card(card):
        return None
    pid = card["scheduler_pid"]
    if process_start(pid) != card["scheduler_start"] or not _process_of_ours(pid):
        return None  # stale: its scheduler was killed, or the pid is another process's now
    card["session_dir"] = session_dir  # where we found it, whatever it says
    card["session_name"] = session_name(session_dir)
    return card


_CARD_FIELDS = {"socket": str, "driver_pid": int, "scheduler_pid": int,
                "scheduler_start": int, "start_time_ms": int}


def _valid_card(card: Any) -> bool:
    return isinstance(card, dict) and all(
        isinstance(card.get(key), kind) for key, kind in _CARD_FIELDS.items())


def find_session(session: Optional[str] = None) -> dict:
    """The card of the session meant by ``session``: a session's name (with or without
    its ``shmray-session-`` prefix), its folder, or its socket's path; None: the only one
    running.  Raises NoSessionError or SeveralSessionsError, saying what to do."""
    if session is None:
        sessions = list_sessions()
        if not sessions:
            raise NoSessionError(
                f"no shmray session of yours is running (looked in {tempfile.gettempdir()}; "
                "a session started with another temp dir is named by its folder: "
                "--session FOLDER)")
        if len(sessions) > 1:
            listed = "\n".join(f"  {card['session_name']}  (driver pid {card['driver_pid']}, "
                               f"{card['session_dir']})" for card in sessions)
            raise SeveralSessionsError(
                f"{len(sessions)} shmray sessions of yours are running; choose one with "
                f"--session NAME:\n{listed}", sessions)
        return sessions[0]
    if not isinstance(session, str) or not session:
        raise TypeError(f"session must be a session's name, folder or socket path, "
                        f"got {session!r}")
    if os.sep in session:
        path = os.path.abspath(session)
        if _ours(path, stat.S_IFSOCK, private=False):
            return {"session_name": path, "socket": path, "session_dir": None}
        card = read_card(path)
        if card is None:
            raise NoSessionError(f"no shmray session of yours at {session} (it ended, or it "
                                 "is not a session folder of your user)")
        return card
    name = session if session.startswith(SESSION_PREFIX) else SESSION_PREFIX + session
    sessions = list_sessions()
    for card in sessions:
        if card["session_name"] == name:
            return card
    running = ", ".join(card["session_name"] for card in sessions) or "none"
    raise NoSessionError(f"no shmray session of yours is named {session!r} (running: "
                         f"{running})")


# -- asking ----------------------------------------------------------------------------------

class Attached:
    """A connection to one session's scheduler: ``ask`` a request, get its value.  Every
    step is bounded by ``timeout`` seconds (per request), so a session that stops
    answering gives an error, never a hang."""

    def __init__(self, card: dict, timeout: float = 10.0):
        self.name = card["session_name"]
        self.timeout = timeout
        path = card["socket"]
        folder = os.path.dirname(path)
        if not (_ours(folder, stat.S_IFDIR, private=True)
                and _ours(path, stat.S_IFSOCK, private=False)):
            if os.path.lexists(path):
                raise NoSessionError(f"no shmray session of yours at {path} (the socket or "
                                     "its folder is not yours alone)")
            raise SessionEndedError(f"shmray session {self.name} has ended")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._in = bytearray()
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            _, uid, _ = _PEERCRED.unpack(self.sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError as exc:
            self.sock.close()
            if isinstance(exc, socket.timeout):
                raise SessionTimeoutError(f"shmray session {self.name} did not accept a "
                                          f"connection within {timeout} s") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise NoSessionError(f"no shmray session of yours at {path}") from None
            raise SessionEndedError(f"shmray session {self.name} has ended "
                                    f"({exc.strerror})") from None
        if uid != os.getuid():  # never read what another user's process sends
            self.sock.close()
            raise NoSessionError(f"no shmray session of yours at {path} (it is served by "
                                 f"uid {uid})")

    def ask(self, request: dict) -> Any:
        """Send ``request`` (a JSON-able dict), return the value answered."""
        line = json.dumps(request).encode() + b"\n"
        if len(line) > MAX_REQUEST:
            raise ValueError(f"request too large ({len(line)} bytes; at most {MAX_REQUEST})")
        deadline = time.monotonic() + self.timeout
        try:
            self.sock.settimeout(self.timeout)
            try:
                self.sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                pass  # hung up on: why, if it said, is still there to read
            reply = self._read_line(deadline)
        except InspectError:
            raise
        except socket.timeout:
            raise SessionTimeoutError(f"shmray session {self.name} did not answer within "
                                      f"{self.timeout} s (its scheduler is stopped or "
                                      "stuck)") from None
        except OSError as exc:
            raise SessionEndedError(f"shmray session {self.name} ended while answering "
                                    f"({exc.strerror or exc})") from None
        try:
            reply = json.loads(reply)
        except ValueError:
            raise RequestError(f"shmray session {self.name} answered something that is not "
                               "JSON") from None
        if isinstance(reply, dict) and "value" in reply:
            return reply["value"]
        if isinstance(reply, dict) and isinstance(reply.get("error"), str):
            raise RequestError(reply["error"])
        raise RequestError(f"shmray session {self.name} answered a reply of the wrong shape")

    def _read_line(self, deadline: float) -> bytes:
        while True:
            end = self._in.find(b"\n")
            if end >= 0:
                line = bytes(self._in[:end])
                del self._in[:end + 1]
                return line
            if len(self._in) > 2 * MAX_REPLY:
                raise RequestError(f"shmray session {self.name} answered more than "
                                   f"{2 * MAX_REPLY} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self.sock.settimeout(left)
            chunk = self.sock.recv(_READ_SIZE)
            if not chunk:
                raise SessionEndedError(f"shmray session {self.name} ended while answering")
            self._in += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Attached":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def fetch(request: dict, session: Optional[str] = None, timeout: float = 10.0) -> Any:
    """Ask a running session of this user ``request`` (e.g. ``{"what": "status"}``) and
    return its answer.  ``session``: its name, folder or socket path; None: the only one
    running.  Raises an ``InspectError`` (a ConnectionError) saying what went wrong."""
    if not isinstance(request, dict):
        raise TypeError(f"a request is a dict, e.g. {{'what': 'status'}}, got {request!r}")
    with Attached(find_session(session), timeout) as attached:
        return attached.ask(request)
