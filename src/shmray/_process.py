"""Forking shmray's processes and giving them names.

Runs in: the driver (forks the scheduler) and the scheduler (forks workers and actors).

- ``fork_child(name, main)`` forks; the child names itself (``shmray::worker`` in ``ps``),
  asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), so no child outlives
  a SIGKILLed parent, runs ``main()`` and leaves with ``os._exit``: it never returns into
  the parent's code, never runs its atexit handlers, never flushes its stdio buffers twice.
- Only the scheduler forks workers, and it has no threads, so forking is safe there.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import traceback
from typing import Callable

import setproctitle

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

# True in every process fork_child made: such a process serves a session, never starts one.
in_child = False


def set_name(name: str) -> None:
    setproctitle.setproctitle(name)


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Get ``sig`` when the parent exits; exit now if it already has."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def fork_child(name: str, main: Callable[[], None], death_signal: int = signal.SIGKILL) -> int:
    """Fork a child that runs ``main`` under ``name``; returns its pid in the parent.

    ``death_signal`` is what the child gets when its parent dies: SIGKILL for workers and
    actors, SIGTERM for the scheduler, which then ends its children and removes the session
    folder on its way out.
    """
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # else the child would print the parent's pending output again
        except Exception:
            pass
    pid = os.fork()
    if pid:
        return pid
    # The child's collector leaves what it inherits alone: a collection that walked those
    # objects would write to their pages and copy them (Python's advice for fork without
    # exec).  Frozen here, not in the parent before the fork and thawed after: the parent's
    # thaw would also thaw what it inherited itself, and the scheduler (which forks every
    # worker and actor) would walk the driver's ~26k objects again: its first full
    # collection took 13 ms and copied 6 MiB (1 ms and 0.5 MiB with them frozen).  Freezing
    # moves the collector's lists whole: no object is touched.
    gc.freeze()
    global in_child
    in_child = True
    code = 0
    try:
        die_with_parent(parent, death_signal)
        set_name(name)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return 0  # unreachable


def describe_exit(status: int) -> str:
    """'exit code 3' or 'signal SIGKILL' from a waitpid status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"signal {name}"
    return f"exit code {os.WEXITSTATUS(status)}"
