"""The session's resources, and whether a request can ever be met on this machine.

Runs in: the driver (``init`` works out the totals once), the scheduler (which accounts for
them) and every process that submits tasks or creates actors (which checks requests
against them before anything is sent).

The totals never change during a session: one machine, no autoscaler.  So a task or actor
asking for more than the machine has can never run, and the call that asked for it raises
(Ray would leave it pending forever, with at most a warning).  Every route a request takes,
leased or through the scheduler, runs through ``check_feasible``.
"""

from __future__ import annotations

from typing import Dict

import psutil

from . import exceptions

_MEMORY_FRACTION = 0.7  # of the memory available at init, less the store (Ray's default)


def session_totals(options: dict, store_capacity: int) -> Dict[str, float]:
    """Every resource the session schedules with: CPU, GPU, custom ones, memory, and the
    object store's bytes."""
    total = {"CPU": float(options["num_cpus"])}
    if options.get("num_gpus"):
        total["GPU"] = float(options["num_gpus"])
    for name, amount in (options.get("resources") or {}).items():
        total[name] = float(amount)
    available = psutil.virtual_memory().available
    total["memory"] = float(max(int(available * _MEMORY_FRACTION) - store_capacity, 0))
    total["object_store_memory"] = float(store_capacity)
    return total


def shortfall(demand: Dict[str, float], total: Dict[str, float]) -> Dict[str, float]:
    """What of ``demand`` exceeds ``total``: name -> what the machine has of it."""
    return {name: total.get(name, 0.0) for name, amount in demand.items()
            if amount > total.get(name, 0.0)}


def unschedulable_message(what: str, demand: Dict[str, float], total: Dict[str, float],
                          missing: Dict[str, float]) -> str:
    return (f"{what} asks for {shown(demand)}, more than this machine has "
            f"({shown(missing)}), so it can never run. Ask for less (num_cpus=, num_gpus=, "
            f"resources=, memory=), or start shmray with more: shmray.init(num_cpus=..., "
            f"num_gpus=..., resources={{...}}). This session has {shown(total)}.")


def check_feasible(demand: Dict[str, float], total: Dict[str, float], what: str,
                   actor: bool = False) -> None:
    """Raise TaskUnschedulableError (ActorUnschedulableError for an actor) if ``demand``
    can never be met."""
    missing = shortfall(demand, total)
    if missing:
        error = exceptions.ActorUnschedulableError if actor else exceptions.TaskUnschedulableError
        raise error(unschedulable_message(what, demand, total, missing))


def shown(resources: Dict[str, float]) -> str:
    return ", ".join(f"{name}={_amount(name, value)}" for name, value in resources.items()) \
        or "nothing"


def _amount(name: str, value: float) -> str:
    if name in ("memory", "object_store_memory"):
        return f"{value / (1 << 30):.2f} GiB"
    return f"{value:g}"
