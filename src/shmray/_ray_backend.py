"""Scale-out: a session handed to Ray, when ``init(address=...)`` names a Ray cluster.

Runs in: the driver.

shmray runs a Ray program on one machine; where a program outgrows the machine, the same
program runs on Ray itself, the engine built for clusters: shmray never builds a cluster of
its own.  ``init`` with a cluster's address (``"ray://host:port"`` through Ray Client,
``"host:port"`` of a head, ``"auto"`` or ``RAY_ADDRESS`` for the one running) calls
``ray.init`` with the same keywords, and from then on this module answers shmray's public
calls with Ray's: ``@shmray.remote`` functions and classes, decorated before ``init`` as
programs do at import, become Ray's at their first ``.remote()`` here (once each);
``get``/``put``/``wait``/``cancel``/``kill``/``get_actor`` take and return Ray's objects.

An error Ray raises in ``get`` or ``wait`` reaches the user as an instance of Ray's class
and of shmray's of the same name (and, for a task's error, of the user's own class, as
Ray's already is), so ``except shmray.exceptions.RayTaskError``, ``except
ray.exceptions.RayTaskError`` and ``except ValueError`` all catch it.

Ray is imported here only, and only when a cluster is asked for: a local session never
imports it.  Without Ray installed, asking for a cluster says which extra to install.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Dict, Optional

from . import exceptions

ray = None  # the ray module while this process's session is Ray's (``connect``)

_functions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # shmray's -> Ray's
_duals: Dict[tuple, type] = {}  # (Ray's error class, shmray's) -> a class of both


def cluster_address(address) -> Optional[str]:
    """The Ray cluster ``init(address=...)`` names, or None for a session on this machine
    (``None`` or ``"local"``; ``None`` with ``RAY_ADDRESS`` set names that cluster, as in
    Ray)."""
    if address is None:
        return os.environ.get("RAY_ADDRESS") or None
    if not isinstance(address, str) or not address.strip():
        raise ValueError(
            f"address must be None or 'local' (a session on this machine), or a Ray "
            f"cluster's: 'auto', 'host:port' or 'ray://host:port'; got {address!r}")
    return None if address == "local" else address


def connect(address: str, kwargs: dict):
    """Hand this process's session to the Ray cluster at ``address``: ``ray.init``'s
    context."""
    global ray
    try:
        import ray as ray_module
    except ImportError:
        raise ImportError(
            f"init(address={address!r}) runs the program on a Ray cluster, which needs Ray: "
            "pip install \"shmray[ray]\" (or leave address out to run on this machine)"
        ) from None
    ray_kwargs = {key: value for key, value in kwargs.items() if key != "address"}
    unsupported = sorted(set(ray_kwargs) & {"job_config", "logging_config", "local_mode"})
    if unsupported:
        raise ValueError(
            f"init({', '.join(unsupported)}=...) with a Ray cluster: pass Ray's own objects "
            "to ray.init() instead (shmray's are for sessions on this machine)")
    context = ray_module.init(address=address, **ray_kwargs)
    ray = ray_module
    return context


def disconnect() -> None:
    global ray
    ray_module, ray = ray, None
    _functions.clear()
    if ray_module is not None:
        ray_module.shutdown()


# -- remote functions and actor classes ---------------------------------------------------

def remote_function(function, user_options: Dict[str, Any]):
    """Ray's remote function for a shmray one (made once per session)."""
    return _rayified(function, lambda: _ray_remote(function._function, user_options))


def actor_class(actor_class_, user_options: Dict[str, Any]):
    """Ray's actor class for a shmray one; ``@shmray.method`` options become Ray's."""
    def make():
        cls = actor_class_._cls
        for name in dir(cls):
            member = getattr(cls, name, None)
            function = getattr(member, "__func__", member)
            options = getattr(function, "__shmray_method_options__", None)
            if options:
                ray.method(**options)(function)
        return _ray_remote(cls, user_options)

    return _rayified(actor_class_, make)


def _ray_remote(target, options: Dict[str, Any]):
    # Without options, Ray's decorator is used bare: ray.remote() with none is an error.
    return ray.remote(**options)(target) if options else ray.remote(target)


def _rayified(key, make):
    made = _functions.get(key)
    if made is None:
        made = _functions[key] = make()
    return made


def call(target, options: Dict[str, Any], args, kwargs):
    """``target.options(**options).remote(*args, **kwargs)`` on Ray, errors made shmray's."""
    try:
        return (target.options(**options) if options else target).remote(*args, **kwargs)
    except Exception as exc:
        raise converted(exc) from None


# -- the rest of the API ------------------------------------------------------------------

def get(object_refs, timeout):
    try:
        return ray.get(object_refs, timeout=timeout)
    except Exception as exc:
        raise converted(exc) from None


def wait(object_refs, num_returns, timeout, fetch_local):
    try:
        return ray.wait(object_refs, num_returns=num_returns, timeout=timeout,
                        fetch_local=fetch_local)
    except Exception as exc:
        raise converted(exc) from None


def converted(error: BaseException) -> BaseException:
    """Ray's ``error`` as an instance of its class and of shmray's of the same name too
    (itself, if it is not Ray's, if shmray has no such class, or if the two can't be
    combined)."""
    if not type(error).__module__.startswith("ray."):
        return error  # the user's, or Python's (a bad argument): as it is
    # The nearest of its classes shmray has too (a task's error is Ray's class made for
    # the user's: "RayTaskError(ValueError)", whose base is RayTaskError).
    ours = next((getattr(exceptions, base.__name__) for base in type(error).__mro__
                 if isinstance(getattr(exceptions, base.__name__, None), type)
                 and issubclass(getattr(exceptions, base.__name__), BaseException)), None)
    if ours is None or isinstance(error, ours):
        return error
    key = (type(error), ours)
    dual = _duals.get(key)
    if dual is None:
        try:
            dual = _duals[key] = type(type(error).__name__, key, {
                "__module__": type(error).__module__, "__qualname__": type(error).__qualname__})
        except TypeError:  # layouts or MROs that can't be combined
            return error
    try:
        both = dual.__new__(dual, *error.args)  # (OSError's own __new__ for a TimeoutError)
    except TypeError:
        return error
    both.__dict__.update(error.__dict__)
    both.__traceback__ = error.__traceback__
    both.__cause__ = error.__cause__
    return both
