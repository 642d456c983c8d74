"""How long each function's tasks run, as their workers measure it: what decides how many
tasks may wait behind one another on one worker.

Runs in: the scheduler (tasks it sends ahead to busy workers, ``_prefetch``) and the driver
(tasks it queues on the workers it leases, ``RunTimes``).

Tasks queued behind a running one wait for it even when another worker is free, and wait
for ever if it waits in get() for one of them.  So only short functions' tasks queue, and
only behind tasks of short functions that have never waited in get() or submitted tasks;
as many as would run within ``SHORT_BUDGET`` in all.  A function's longest run time decays
(``SLOWEST_DECAY`` per task), so one slow call does not rule it out for good.
"""

from __future__ import annotations

from typing import Dict

SHORT_BUDGET = 0.002   # tasks queued on one worker: no more than run this long in all
SLOWEST_DECAY = 0.966  # per task, of the longest run time a function is known for
_TYPICAL_WEIGHT = 0.25  # of each new run time in a function's typical one (moving average)
_RECOMPUTE_EVERY = 16   # tasks between two looks at a function's depth (unless one was slow)


class _Known:
    __slots__ = ("typical", "slowest", "may_block", "seen")

    def __init__(self, took: float, may_block: bool):
        self.typical = took
        self.slowest = took
        self.may_block = may_block
        self.seen = 0


class RunTimes:
    """The driver's record of its functions' run times: ``depth`` is how many tasks of one
    may be in flight on one leased worker (1 for a function not known to be short)."""

    __slots__ = ("_known", "_depths", "_max_depth")

    def __init__(self, max_depth: int):
        self._known: Dict[bytes, _Known] = {}
        self._depths: Dict[bytes, int] = {}
        self._max_depth = max_depth

    def note(self, fn_id: bytes, took: float, may_block: bool) -> None:
        """A task of ``fn_id`` ran for ``took`` seconds; ``may_block``: it waited in get()
        or submitted tasks."""
        known = self._known.get(fn_id)
        if known is None:
            known = self._known[fn_id] = _Known(took, may_block)
        else:
            known.typical += _TYPICAL_WEIGHT * (took - known.typical)
            slowest = known.slowest * SLOWEST_DECAY
            known.slowest = took if took > slowest else slowest
            known.may_block = known.may_block or may_block
        known.seen += 1
        if known.seen % _RECOMPUTE_EVERY == 1 or took > SHORT_BUDGET or may_block:
            self._depths[fn_id] = self._depth(known)

    def note_blocking(self, fn_id: bytes) -> None:
        known = self._known.setdefault(fn_id, _Known(1.0, True))
        known.may_block = True
        self._depths[fn_id] = 1

    def depth(self, fn_id: bytes) -> int:
        return self._depths.get(fn_id, 1)

    def _depth(self, known: _Known) -> int:
        if known.may_block or known.slowest > SHORT_BUDGET:
            return 1
        return max(1, min(self._max_depth, int(SHORT_BUDGET / max(known.typical, 1e-6))))
