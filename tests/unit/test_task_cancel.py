"""The worker's side of cancel (``_task_cancel``), without processes."""

import mmap
import signal

from shmray import _slot
from shmray._task_cancel import TaskCancel


def test_a_worker_waits_only_for_cancels_counted_and_not_yet_read():
    """The scheduler writes a CANCEL_CALL, then counts it in the worker's slot.  A leased
    worker that read the message before it was counted waited for input that never came:
    its next task sat queued until some other message arrived (21 in 80,000 cancels)."""
    slot = mmap.mmap(-1, _slot.SLOT_SIZE)
    handler = signal.getsignal(signal.SIGINT)
    try:
        cancel = TaskCancel(None, slot)
    finally:
        signal.signal(signal.SIGINT, handler)
    cancel.on_cancel_call(b"t" * 24)  # read before it is counted
    assert not cancel.unread()
    _slot.count_cancel(slot)
    assert not cancel.unread()
    _slot.count_cancel(slot)  # counted, not read yet: on its way
    assert cancel.unread()
    cancel.on_cancel_call(b"u" * 24)
    assert not cancel.unread()
