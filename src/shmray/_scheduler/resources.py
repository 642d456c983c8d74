"""What the machine has, and what running work holds: CPUs, GPUs, custom resources, memory.

Runs in: the scheduler.

``total`` never changes (one machine: ``_resources.session_totals``); ``available`` is what
running tasks, actors and leases don't hold.  A worker blocked in get() lends its CPU back,
so ``available`` may go below zero for a while when it resumes.  GPUs are also counted per
id (``gpu_ids``): a demand for GPUs fits only where ids can be given it, and taking it gives
them.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

from .gpu_ids import GpuIds


class Resources:
    def __init__(self, total: Dict[str, float], gpu_ids: Sequence[str] = ()):
        self.total: Dict[str, float] = dict(total)
        self.available: Dict[str, float] = dict(total)
        self.gpus = GpuIds(gpu_ids)

    def fits(self, demand: Dict[str, float]) -> bool:
        available = self.available
        return (all(available.get(name, 0.0) >= amount for name, amount in demand.items())
                and ("GPU" not in demand or self.gpus.fits(demand["GPU"])))

    def take(self, demand: Dict[str, float]) -> Tuple[str, ...]:
        """Hold ``demand``; returns the GPU ids it gets (none: an empty tuple)."""
        for name, amount in demand.items():
            self.available[name] -= amount
        gpus = demand.get("GPU")
        return self.gpus.take(gpus) if gpus else ()

    def give(self, demand: Dict[str, float], gpu_ids: Sequence[str] = (),
             cpu_lent: bool = False) -> None:
        """Take back what ``demand`` held (and its GPU ids); ``cpu_lent``: its CPU came back
        already, lent while its task waited in get()."""
        for name, amount in demand.items():
            if name != "CPU" or not cpu_lent:
                self.available[name] += amount
        if gpu_ids:
            self.gpus.give(gpu_ids, demand["GPU"])

    def free_now(self) -> Dict[str, float]:
        """What is available, for a query: only what there is of it."""
        return {name: max(amount, 0.0) for name, amount in self.available.items() if amount > 0}
