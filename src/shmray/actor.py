"""``shmray.actor``: as ``ray.actor`` — exit_actor() and the handle and class types.

Runs in: every process (exit_actor() in actors).
"""

from ._actor import (
    ActorClass,
    ActorClassInheritanceException,
    ActorHandle,
    ActorMethod,
    exit_actor,
)

__all__ = ["ActorClass", "ActorClassInheritanceException", "ActorHandle", "ActorMethod",
           "exit_actor"]
