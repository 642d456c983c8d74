"""``shmray.util.scheduling_strategies``: as ``ray.util.scheduling_strategies``.

Runs in: the driver, workers and actors.
"""

from .._scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

__all__ = ["NodeAffinitySchedulingStrategy", "PlacementGroupSchedulingStrategy"]
