"""``shmray.actor``: as ``ray.actor`` — exit_actor() and the handle and class types."""

from ._actor import ActorClass, ActorHandle, ActorMethod, exit_actor

__all__ = ["ActorClass", "ActorHandle", "ActorMethod", "exit_actor"]
