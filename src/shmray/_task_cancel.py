"""How a task running in a worker is cancelled: a SIGINT from the scheduler, acted on only
where nothing is half done.

Runs in: worker processes.  (An actor's calls are cancelled by message: ``_actor_process``.)

The scheduler cancels a running task with SIGINT, after naming it in the worker's slot
(``_protocol``: a signal that comes as a task ends can't hit the next one), and a queued
one with CANCEL_CALL, which it counts in the slot after writing it.  The signal raises
``KeyboardInterrupt`` at once only while the task's own code runs, or while shmray waits
for it in poll(2): the marked cancel points (``_context.cancel_point``).  Inside shmray (a
put, a message half written) the interrupt waits until shmray is done
(``Link.take_interrupt``), or comes again a moment later, should the task have left shmray
by then.  One that comes while the function or its arguments load stops the task before it
runs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, Optional

from . import _slot
from ._context import at_cancel_point, current_task

_SKIPS_KEPT = 1024  # cancels of tasks not started yet kept (most are used within a task)
_REDELIVER_SECONDS = 0.001


class TaskCancel:
    """The worker's side of cancel: the SIGINT handler, and the cancels of queued tasks."""

    def __init__(self, runtime, slot):
        self.runtime = runtime
        self.slot = slot  # shared with the scheduler (``_slot``)
        self.started_at = 0.0  # when the task it started last started
        # Ids of tasks cancelled before they started (in order: a cancel of a task already
        # done stays unused, and only the latest _SKIPS_KEPT are kept).
        self.skip: Dict[bytes, None] = {}
        self.read = 0                     # CANCEL_CALLs read (the slot counts those sent)
        self.in_user_code = False         # the task's own code runs (set around it)
        self.cancelled = False            # the running task was cancelled
        self.pending: Optional[bytes] = None  # a task SIGINT came for before it ran
        signal.signal(signal.SIGINT, self._on_sigint)

    def on_cancel_call(self, task_id: bytes) -> None:
        """CANCEL_CALL: a task sent here is not to run."""
        self.skip[task_id] = None
        if len(self.skip) > _SKIPS_KEPT:
            del self.skip[next(iter(self.skip))]
        self.read += 1

    def unread(self) -> bool:
        """A cancel the slot counts is still on its way.  We may have read more than the
        slot says yet (the scheduler writes, then counts): never wait for more than it says."""
        return self.slot is not None and _slot.cancels_sent(self.slot) > self.read

    def read_cancels(self) -> None:
        """Read the CANCEL_CALLs the slot counts (caller holds the runtime's lock)."""
        if self.unread():
            self.runtime.link.wait_until(lambda: not self.unread(), None)

    def starting(self, task_id: bytes) -> None:
        """The worker is about to start ``task_id``: it names it in the slot, and reads the
        cancels counted so far, so that a cancel and the start can't miss each other."""
        self.cancelled = False
        self.started_at = time.time()
        link = self.runtime.link
        link.pending_interrupt = False
        if self.slot is None:
            return
        # The scheduler reads the slot if we die: this one may have crashed us, those sent
        # after it never started.  It also reads it to cancel: it counts a cancel, then
        # looks here; we write here, then look at the count (after a lock's fence), so one
        # of us sees the other.
        _slot.mark_started(self.slot, task_id, self.started_at)
        with link.lock:
            if self.unread():
                link.wait_until(lambda: not self.unread(), None)

    def stop_before_running(self) -> None:
        """A cancel came for the task while it loaded (``pending``): it never runs."""
        self.cancelled = True
        raise KeyboardInterrupt("task cancelled")

    def _on_sigint(self, signum, frame) -> None:
        slot = self.slot
        if slot is not None and slot[_slot.SLOT_TARGET] != current_task.task_id:
            if current_task.task_id is None and slot[_slot.SLOT_TARGET] == slot[_slot.SLOT_STARTED]:
                self.pending = bytes(slot[_slot.SLOT_TARGET])  # named as started, not begun yet
            return  # else meant for a task this worker has finished already
        if current_task.task_id is not None and not self.in_user_code:
            self.pending = current_task.task_id  # loading: stop before it runs
            return
        if self.in_user_code:
            self.cancelled = True
            if not at_cancel_point(frame):  # inside shmray: later (see above)
                self.runtime.link.pending_interrupt = True
                threading.Timer(_REDELIVER_SECONDS, _signal_self).start()
                return
            raise KeyboardInterrupt("task cancelled")


def _signal_self() -> None:
    try:
        os.kill(os.getpid(), signal.SIGINT)
    except OSError:
        pass
