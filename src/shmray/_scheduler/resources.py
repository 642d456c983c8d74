"""What the machine has, and what running work holds: CPUs, GPUs, custom resources, memory.

Runs in: the scheduler.

``total`` never changes (one machine: ``_resources.session_totals``); ``available`` is what
running tasks, actors and leases don't hold.  A worker blocked in get() lends its CPU back,
so ``available`` may go below zero for a while when it resumes.
"""

from __future__ import annotations

from typing import Dict


class Resources:
    def __init__(self, total: Dict[str, float]):
        self.total: Dict[str, float] = dict(total)
        self.available: Dict[str, float] = dict(total)

    def fits(self, demand: Dict[str, float]) -> bool:
        available = self.available
        return all(available.get(name, 0.0) >= amount for name, amount in demand.items())

    def take(self, demand: Dict[str, float]) -> None:
        for name, amount in demand.items():
            self.available[name] -= amount

    def give(self, demand: Dict[str, float]) -> None:
        for name, amount in demand.items():
            self.available[name] += amount

    def free_now(self) -> Dict[str, float]:
        """What is available, for a query: only what there is of it."""
        return {name: max(amount, 0.0) for name, amount in self.available.items() if amount > 0}
