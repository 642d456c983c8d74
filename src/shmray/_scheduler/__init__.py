"""The scheduler: one single-threaded event loop that never runs user code.

Runs in: the scheduler process (forked by the driver at ``init``).

A package of parts, each holding one concept: ``loop`` (the loop, its dispatch table, the
data-flow picture, and ``Scheduler``, which wires the parts together),
``placement_groups``, ``cancel``, ``actors``, ``leases``, ``tasks``, ``dispatch``,
``objects``, ``resources`` (and ``gpu_ids``), ``workers`` and ``clients``.
"""

from .loop import Scheduler

__all__ = ["Scheduler"]
