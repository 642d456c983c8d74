"""Ray's task and actor options: names, defaults, and a clear error for anything else.

Runs in: the driver (and any process that submits tasks).

Checked where the user wrote them, at decoration or ``.options()`` time, so a typo is an
exception on the line that has it, not a hang later.  Options that only mean something on a
cluster (placement groups, scheduling strategies, accelerators) are accepted and ignored, so
programs written for Ray keep running here.
"""

from __future__ import annotations

from typing import Any, Dict

from . import _pickling, _protocol as P

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
    "_metadata": None,
}


def check(options: Dict[str, Any], defaults: Dict[str, Any], what: str) -> Dict[str, Any]:
    """``options`` validated against ``defaults``; raises ValueError naming the bad one."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"invalid option keyword(s) {', '.join(map(repr, unknown))} for {what}; valid "
            f"ones are {', '.join(sorted(k for k in defaults if not k.startswith('_')))}"
        )
    for key in ("num_cpus", "num_gpus", "memory"):
        value = options.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or value < 0):
            raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    resources = options.get("resources")
    if resources is not None:
        if not isinstance(resources, dict):
            raise ValueError(f"resources must be a dict of name -> amount, got {resources!r}")
        for name, amount in resources.items():
            if name in ("CPU", "GPU"):
                raise ValueError(
                    f"use the num_cpus and num_gpus options instead of {name!r} in resources"
                )
            if not isinstance(amount, (int, float)) or amount < 0:
                raise ValueError(f"resource {name!r} must be a number >= 0, got {amount!r}")
    if "num_returns" in options:
        n = options["num_returns"]
        if n not in ("streaming", "dynamic") and (
                not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(
                f"num_returns must be an int >= 0, 'streaming' or 'dynamic', got {n!r}")
    backpressure = options.get("_generator_backpressure_num_objects")
    if backpressure is not None and (not isinstance(backpressure, int)
                                     or isinstance(backpressure, bool)):
        raise ValueError("_generator_backpressure_num_objects must be an int (-1: none), "
                         f"got {backpressure!r}")
    if "max_retries" in options:
        n = options["max_retries"]
        if not isinstance(n, int) or isinstance(n, bool) or n < -1:
            raise ValueError(f"max_retries must be an int >= -1 (-1: retry forever), got {n!r}")
    if "retry_exceptions" in options:
        r = options["retry_exceptions"]
        ok = isinstance(r, bool) or (
            isinstance(r, (list, tuple))
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in r))
        if not ok:
            raise ValueError(
                f"retry_exceptions must be True, False or a list of exception classes, got {r!r}"
            )
    if "max_concurrency" in options and options["max_concurrency"] is not None:
        n = options["max_concurrency"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_concurrency must be an int >= 1, got {n!r}")
    runtime_env = options.get("runtime_env")
    if runtime_env is not None:
        if not isinstance(runtime_env, dict):
            raise ValueError(f"runtime_env must be a dict, got {runtime_env!r}")
        unsupported = sorted(set(runtime_env) - {"env_vars"})
        if unsupported:
            raise ValueError(
                f"runtime_env keys {unsupported} are not supported on one machine; shmray "
                "applies env_vars only (install packages into the environment you run from)"
            )
    max_calls = options.get("max_calls")
    if max_calls is not None and (not isinstance(max_calls, int) or max_calls < 0):
        raise ValueError(f"max_calls must be an int >= 0 (0: no limit), got {max_calls!r}")
    groups = options.get("concurrency_groups")
    if groups is not None and (not isinstance(groups, dict) or any(
            not isinstance(name, str) or not isinstance(limit, int) or isinstance(limit, bool)
            or limit < 1 for name, limit in groups.items())):
        raise ValueError("concurrency_groups must be a dict of group name -> max concurrency "
                         f"(an int >= 1), got {groups!r}")
    if options.get("lifetime") not in (None, "detached", "non_detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {options['lifetime']!r}")
    return options


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
    for name, amount in (options.get("resources") or {}).items():
        demand[name] = float(amount)
    if options.get("memory"):
        demand["memory"] = float(options["memory"])
    return {k: v for k, v in demand.items() if v}
