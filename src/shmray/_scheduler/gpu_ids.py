"""Which GPU each running task and actor holds: one capacity of 1 per GPU id.

Runs in: the scheduler.

``Resources`` counts how much GPU is free in all; this counts it per id, since a task is
given ids, not an amount.  A request of less than one GPU must fit in what is left of one
id (several such share it: Ray's fractional GPUs), and goes where it fits most tightly, so
whole GPUs stay free for those who need them.  A request of one GPU or more (a whole number:
``_options`` checks) takes that many ids no one holds any of.  Capacities are counted in
ten-thousandths of a GPU (Ray's resolution), not floats: ten tasks of 0.1 given back leave
exactly one GPU, never 0.9999999.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

_WHOLE = 10_000  # one GPU, in the units counted here


def _units(amount: float) -> int:
    return round(amount * _WHOLE)


class GpuIds:
    def __init__(self, ids: Sequence[str]):
        self.free = {gpu_id: _WHOLE for gpu_id in ids}  # id -> what is left of it, in order

    def fits(self, amount: float) -> bool:
        return self._choose(amount) is not None

    def take(self, amount: float) -> Tuple[str, ...]:
        """The ids that ``amount`` of GPU gets (caller checked that it ``fits``)."""
        chosen = self._choose(amount)
        assert chosen is not None, "a GPU demand was started without fitting"
        units = _units(amount) if amount < 1 else _WHOLE
        for gpu_id in chosen:
            self.free[gpu_id] -= units
        return chosen

    def give(self, gpu_ids: Sequence[str], amount: float) -> None:
        units = _units(amount) if amount < 1 else _WHOLE
        for gpu_id in gpu_ids:
            self.free[gpu_id] += units

    def _choose(self, amount: float) -> Optional[Tuple[str, ...]]:
        if amount < 1:
            units = _units(amount)
            best = None
            for gpu_id, left in self.free.items():
                if left >= units and (best is None or left < self.free[best]):
                    best = gpu_id
            return None if best is None else (best,)
        # More than one and not whole only if a check was missed: hold more, never less.
        count = math.ceil(amount - 1e-9)
        whole = [gpu_id for gpu_id, left in self.free.items() if left == _WHOLE]
        return tuple(whole[:count]) if len(whole) >= count else None
