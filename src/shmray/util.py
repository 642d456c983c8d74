"""``shmray.util``: as ``ray.util`` — the helpers that make sense on one machine."""

from ._actor import list_named_actors

__all__ = ["list_named_actors"]
