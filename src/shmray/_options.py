"""Ray's task and actor options: names, defaults, and a clear error for anything else.

Runs in: the driver (and any process that submits tasks).

Checked where the user wrote them, at decoration or ``.options()`` time, so a typo is an
exception on the line that has it, not a hang later.  Options that only mean something on a
cluster (accelerator types, label selectors) are accepted and ignored, so programs written
for Ray keep running here; placement groups and scheduling strategies are honoured
(``_placement_group`` works out where each task or actor runs).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from . import _pickling, _protocol as P
from ._scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

TASK_DEFAULTS: Dict[str, Any] = {
    "num_returns": 1,
    "max_retries": 3,          # Ray's default for tasks
    "retry_exceptions": False,
    "num_cpus": 1,
    "num_gpus": 0,
    "resources": None,
    "name": None,
    "memory": None,
    "max_calls": 0,
    "runtime_env": None,
    "scheduling_strategy": None,
    "accelerator_type": None,
    "placement_group": None,
    "placement_group_bundle_index": -1,
    "placement_group_capture_child_tasks": None,
    "label_selector": None,
    "enable_task_events": True,
    "_metadata": None,
    "_generator_backpressure_num_objects": None,
}

ACTOR_DEFAULTS: Dict[str, Any] = {
    "num_cpus": None,          # 1 CPU to place, 0 held (Ray's default)
    "num_gpus": 0,
    "resources": None,
    "max_concurrency": None,   # 1 for sync actors, 1000 for async ones (Ray's defaults)
    "name": None,
    "namespace": None,
    "lifetime": None,
    "get_if_exists": False,
    "max_restarts": 0,
    "max_task_retries": 0,
    "max_pending_calls": -1,
    "memory": None,
    "runtime_env": None,
    "scheduling_strategy": None,
    "accelerator_type": None,
    "placement_group": None,
    "placement_group_bundle_index": -1,
    "placement_group_capture_child_tasks": None,
    "concurrency_groups": None,
    "label_selector": None,
    "enable_task_events": True,
    "object_store_memory": None,  # accepted, as Ray (which deprecates it): reserves nothing
    "_metadata": None,
}


def check(options: Dict[str, Any], defaults: Dict[str, Any], what: str,
          in_options: bool = False) -> Dict[str, Any]:
    """``options`` checked against ``defaults`` and Ray's rules for each: a wrong type is
    Ray's TypeError, a wrong value Ray's ValueError (their texts, which programs match on).
    ``in_options``: they were given to ``.options()``, which refuses a few."""
    for key, value in options.items():
        if key not in defaults:
            raise ValueError(
                f"Invalid option keyword {key} for {what}. Valid ones are "
                f"{[k for k in defaults if not k.startswith('_')]}.")
        rule = _RULES.get(key)
        if rule is None:
            continue
        types, value_error = rule
        if types is not None and not isinstance(value, types):
            raise TypeError(f"The type of keyword '{key}' must be {_kinds(types)}, but "
                            f"received type {type(value)}")
        message = value_error(value) if value_error is not None else None
        if message:
            raise ValueError(message)
    if in_options:
        for key in ("max_calls", "concurrency_groups"):
            if key in options:
                raise ValueError(f"Setting '{key}' is not supported in '.options()'.")
    if options.get("get_if_exists") and not options.get("name"):
        raise ValueError("The actor name must be specified to use `get_if_exists`.")
    if "num_returns" in options and options["num_returns"] is None:  # Ray's "the default"
        options = {k: v for k, v in options.items() if k != "num_returns"}
    return options


_NONE = type(None)


def _kinds(types) -> str:
    """A type constraint as Ray's TypeError prints it."""
    return str(types[0]) if len(types) == 1 else str(types)


def _counting(name: str, infinite: bool):
    """A count: None, 0, a positive int, and -1 (no limit) where ``infinite``."""
    low = -1 if infinite else 0
    message = (f"The keyword '{name}' only accepts None, 0, -1 or a positive integer, where -1 "
               "represents infinity." if infinite else
               f"The keyword '{name}' only accepts None, 0 or a positive integer.")
    return (int, _NONE), lambda value: None if value is None or value >= low else message


def _quantity_error(name: str, value) -> Optional[str]:
    if value < 0:
        return f"The quantity of resource {name} cannot be negative"
    if isinstance(value, float) and value != 0 and int(value * 10_000) == 0:
        return (f"The precision of the fractional quantity of resource {name} cannot go "
                "beyond 0.0001")
    return None


def _quantity(name: str):
    """A resource amount: a number >= 0, to Ray's precision of 0.0001."""
    return (float, int, _NONE), lambda value: None if value is None else _quantity_error(
        name, value)


def _resources_error(resources) -> Optional[str]:
    if resources is None:
        return None
    if "CPU" in resources or "GPU" in resources:
        return ("Use the 'num_cpus' and 'num_gpus' keyword instead of 'CPU' and 'GPU' in "
                "'resources' keyword")
    for name, amount in resources.items():
        if not isinstance(amount, (int, float)):
            return f"The quantity of resource {name} must be a number, got {amount!r}"
        message = _quantity_error(name, amount)
        if message:
            return message
    return None


def _num_returns_error(value) -> Optional[str]:
    if value is None or value in ("streaming", "dynamic") or (
            isinstance(value, int) and value >= 0):
        return None
    return ("The keyword 'num_returns' only accepts None, a non-negative integer, "
            "\"streaming\" (for generators), or \"dynamic\"")


def _retry_exceptions_error(value) -> Optional[str]:
    if isinstance(value, bool) or all(
            isinstance(kind, type) and issubclass(kind, Exception) for kind in value):
        return None
    return "retry_exceptions must be either a boolean or a list of exceptions"


def _runtime_env_error(runtime_env) -> Optional[str]:
    unsupported = sorted(set(runtime_env or ()) - {"env_vars"})
    if unsupported:
        return (f"runtime_env keys {unsupported} are not supported on one machine; shmray "
                "applies env_vars only (install packages into the environment you run from)")
    return None


def _max_concurrency_error(value) -> Optional[str]:
    if value is not None and value < 1:
        return f"max_concurrency must be >= 1, got {value}"
    return None


def _concurrency_groups_error(groups) -> Optional[str]:
    if groups is None or isinstance(groups, dict) and all(
            isinstance(name, str) and isinstance(limit, int) and not isinstance(limit, bool)
            and limit >= 1 for name, limit in groups.items()):
        return None
    return ("concurrency_groups must be a dict of group name -> max concurrency (an int >= 1), "
            f"got {groups!r}")


def _lifetime_error(value) -> Optional[str]:
    if value in (None, "detached", "non_detached"):
        return None
    return "actor `lifetime` argument must be one of 'detached', 'non_detached' and 'None'."


# Each option's (accepted types, value check -> error message or None): Ray's, for the
# options Ray has.  None: checked elsewhere (a placement group, whose class lives above this
# module: ``_placement_group.resolve`` checks it where the options are worked out).
_RULES: Dict[str, tuple] = {
    "accelerator_type": ((str, _NONE), None),
    "memory": _quantity("memory"),
    "name": ((str, _NONE), None),
    "num_cpus": _quantity("num_cpus"),
    "num_gpus": _quantity("num_gpus"),
    "object_store_memory": _counting("object_store_memory", False),
    "placement_group": None,
    "placement_group_bundle_index": ((int,), None),
    "placement_group_capture_child_tasks": ((bool, _NONE), None),
    "resources": ((dict, _NONE), _resources_error),
    "runtime_env": ((dict, _NONE), _runtime_env_error),
    "scheduling_strategy": ((_NONE, str, PlacementGroupSchedulingStrategy,
                             NodeAffinitySchedulingStrategy), None),
    "label_selector": ((dict, _NONE), None),
    "enable_task_events": ((bool,), None),
    "_metadata": ((dict, _NONE), None),
    # tasks
    "max_calls": _counting("max_calls", False),
    "max_retries": _counting("max_retries", True),
    "num_returns": ((int, str, _NONE), _num_returns_error),
    "retry_exceptions": ((bool, list, tuple), _retry_exceptions_error),
    "_generator_backpressure_num_objects": ((int, _NONE), None),
    # actors
    "concurrency_groups": ((list, dict, _NONE), _concurrency_groups_error),
    "lifetime": ((str, _NONE), _lifetime_error),
    "max_concurrency": ((int, _NONE), _max_concurrency_error),
    "max_restarts": _counting("max_restarts", True),
    "max_task_retries": _counting("max_task_retries", True),
    "max_pending_calls": _counting("max_pending_calls", True),
    "namespace": ((str, _NONE), None),
    "get_if_exists": ((bool,), None),
    "concurrency_group": ((str, _NONE), None),
}


def check_namespace(namespace) -> None:
    """A namespace given to init() or get_actor(), checked as Ray checks it."""
    if namespace is None:
        return
    if not isinstance(namespace, str):
        raise TypeError("namespace must be None or a string.")
    if namespace == "":
        raise ValueError('"" is not a valid namespace. Pass None to not specify a namespace.')


def check_runtime_env(runtime_env) -> None:
    rule_types, rule_error = _RULES["runtime_env"]
    if not isinstance(runtime_env, rule_types):
        raise TypeError(f"runtime_env must be a dict, got {type(runtime_env)}")
    message = rule_error(runtime_env)
    if message:
        raise ValueError(message)


def env_vars(options: Dict[str, Any]) -> Dict[str, str]:
    variables = (options.get("runtime_env") or {}).get("env_vars") or {}
    return {name: str(value) for name, value in variables.items()}


def task_extra(options: Dict[str, Any]):
    """The spec's ``extra`` field: None for the usual task, so it costs nothing."""
    extra = {}
    variables = env_vars(options)
    if variables:
        extra["env_vars"] = variables
    if options.get("max_calls"):
        extra["max_calls"] = options["max_calls"]
    backpressure = options.get("_generator_backpressure_num_objects")
    if backpressure is not None and backpressure > 0:
        extra["backpressure"] = backpressure
    resources = task_resources(options)
    if resources != P.LEASE_SHAPE:  # what get_assigned_resources() says in the task
        extra["resources"] = resources
    return extra or None


def retry_exceptions_field(retry):
    """retry_exceptions as a spec carries it: True, False, or the classes it lists pickled
    by cloudpickle, so that only the process that runs the call unpickles them (a class
    defined in ``__main__`` after ``init`` exists only there and in the caller)."""
    if isinstance(retry, (list, tuple)):
        return _pickling.dumps(tuple(retry))
    return bool(retry)


def num_returns_code(num_returns) -> int:
    """num_returns as a spec carries it: a count, or STREAMING or DYNAMIC (``_protocol``)."""
    if num_returns == "streaming":
        return P.STREAMING
    if num_returns == "dynamic":
        return P.DYNAMIC
    return num_returns


def task_resources(options: Dict[str, Any]) -> Dict[str, float]:
    """The resources a task holds while it runs."""
    demand = {"CPU": float(options["num_cpus"])}
    if options.get("num_gpus"):
        demand["GPU"] = float(options["num_gpus"])
        if demand["GPU"] > 1 and not demand["GPU"].is_integer():  # GPUs are given by id
            raise ValueError(f"Resource quantities >1 must be whole numbers. The requested "
                             f"num_gpus={options['num_gpus']!r} is not: ask for less than "
                             "one GPU (shared) or a whole number of them.")
    for name, amount in (options.get("resources") or {}).items():
        demand[name] = float(amount)
    if options.get("memory"):
        demand["memory"] = float(options["memory"])
    return {k: v for k, v in demand.items() if v}
