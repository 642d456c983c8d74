"""What every runtime of an actor does with the user's instance, the same way: find a
method, run ``__ray_shutdown__``, say why an actor whose ``__init__`` raised is dead.

Runs in: actor processes (``_actor_process``), and the driver in local mode
(``_local_actors``), which must behave alike.
"""

from __future__ import annotations

import inspect
import sys
import traceback
from typing import Dict

from . import exceptions
from ._task_results import flush_output, task_error


def bound_method(instance, name: str, cache: Dict[str, object]):
    """The instance's method ``name``, looked up on its class first: an instance attribute
    of the same name must not hide it.  Bound once, then kept in ``cache``."""
    method = cache.get(name)
    if method is None:
        cls = type(instance)
        found = inspect.getattr_static(cls, name, None)
        if found is None or not hasattr(found, "__get__"):
            return getattr(instance, name)  # made by __getattr__, or the like
        method = cache[name] = found.__get__(instance, cls)
    return method


def run_shutdown_hook(instance, class_name: str, passes: tuple = ()) -> None:
    """A graceful end: the instance's ``__ray_shutdown__``, if it has one.  What it raises
    is printed, not raised (nobody waits for it), except the kinds in ``passes``."""
    hook = getattr(instance, "__ray_shutdown__", None)
    if hook is None:
        return
    try:
        hook()
    except passes:
        raise
    except BaseException:
        print(f"shmray: {class_name}.__ray_shutdown__() raised:", file=sys.stderr)
        traceback.print_exc()
    finally:
        flush_output()


def init_failed(class_name: str, exc: BaseException) -> exceptions.ActorDiedError:
    """The error every call to an actor whose ``__init__`` raised ``exc`` gets."""
    cause = task_error(f"{class_name}.__init__", exc)
    died = exceptions.ActorDiedError(
        f"The actor {class_name} died because its __init__ raised an error, so none of its "
        f"methods can run:\n{cause}")
    died.cause = cause
    return died
