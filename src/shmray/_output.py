"""What tasks and actors print reaches the driver's terminal, a line at a time, prefixed.

Runs in: workers and actors.

Every process of a session inherits the driver's stdout and stderr descriptors, so a worker
writes its lines straight to them: no hop through the scheduler.  Each complete line goes out
in one ``write`` with Ray's prefix, ``(name pid=N) text``, where ``name`` is the function or
actor class running now; a write of a line under PIPE_BUF bytes is atomic, so lines from
different workers never interleave.  With ``log_to_driver=False`` the descriptors point at
files in the session's ``logs`` folder instead and lines are written without a prefix.
"""

from __future__ import annotations

import io
import os
import sys
import threading


class PrefixedLineWriter(io.TextIOBase):
    """A text stream that writes whole lines to ``fd``, each prefixed with the current name."""

    def __init__(self, fd: int, prefix: bool):
        self._fd = fd
        self._prefix = prefix
        self._partial = ""
        self._lock = threading.Lock()
        self.name = "shmray::worker"  # the function or class whose prints these are now

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    @property
    def encoding(self) -> str:
        return "utf-8"

    def write(self, text: str) -> int:
        with self._lock:
            text = self._partial + text
            lines = text.split("\n")
            self._partial = lines.pop()
            if lines:
                self._emit(lines)
        return len(text)

    def flush(self) -> None:
        if not self._partial:  # after every task and call: the common case takes no lock
            return
        with self._lock:
            if self._partial:
                line, self._partial = self._partial, ""
                self._emit([line])

    def _emit(self, lines) -> None:
        if self._prefix:
            head = f"({self.name} pid={os.getpid()}) "
            payload = "".join(f"{head}{line}\n" for line in lines)
        else:
            payload = "".join(f"{line}\n" for line in lines)
        data = payload.encode("utf-8", errors="replace")
        while data:
            try:
                written = os.write(self._fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # the terminal is gone; output is not worth dying for
            data = data[written:]


def redirect(log_to_driver: bool, logs_dir: str, role: str) -> None:
    """Point this process's stdout/stderr at the driver's terminal or at its log files."""
    if not log_to_driver:
        os.makedirs(logs_dir, exist_ok=True)
        for fd, suffix in ((1, "out"), (2, "err")):
            path = os.path.join(logs_dir, f"{role}-{os.getpid()}.{suffix}")
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(target, fd)
            os.close(target)
    sys.stdout = PrefixedLineWriter(1, prefix=log_to_driver)
    sys.stderr = PrefixedLineWriter(2, prefix=log_to_driver)


def set_name(name: str) -> None:
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, PrefixedLineWriter) and stream.name != name:
            stream.flush()  # a line begun under the old name ends under it
            stream.name = name
