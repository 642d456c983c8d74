"""Summaries of the task, actor and object rows, in Ray's shapes.

Runs in: any process that asks about a session.

Ray answers ``summarize_*`` with one summary per node under the key "cluster" (its summaries
are not per node); each is a dict of groups and totals:

    tasks:   {"summary": {func_or_class_name: {"func_or_class_name", "type",
                                               "state_counts": {state: n}}},
              "total_tasks", "total_actor_tasks", "total_actor_scheduled",
              "summary_by": "func_name"}
    actors:  {"summary": {class_name: {"class_name", "state_counts"}}, "total_actors",
              "summary_by": "class"}
    objects: {"summary": {call_site: {"total_objects", "total_size_mb", "total_num_workers",
                                      "total_num_nodes", "task_state_counts",
                                      "ref_type_counts"}},
              "total_objects", "total_size_mb", "callsite_enabled", "summary_by": "callsite"}

As in Ray, objects count one per row (per holding process), so an object two processes hold
counts twice; ``shmray memory`` counts each object once.
"""

from __future__ import annotations

from typing import Dict, List

_TOTALS = {"NORMAL_TASK": "total_tasks", "ACTOR_TASK": "total_actor_tasks",
           "ACTOR_CREATION_TASK": "total_actor_scheduled"}
MiB = 1024 ** 2


def _count(counts: Dict[str, int], key) -> None:
    counts[key] = counts.get(key, 0) + 1


def summarize_task_rows(tasks: List[dict]) -> dict:
    summary: Dict[str, dict] = {}
    totals = dict.fromkeys(_TOTALS.values(), 0)
    for task in tasks:
        key = task.get("func_or_class_name")
        group = summary.setdefault(key, {"func_or_class_name": key, "type": task.get("type"),
                                         "state_counts": {}})
        _count(group["state_counts"], task.get("state"))
        total = _TOTALS.get(task.get("type"))
        if total is not None:
            totals[total] += 1
    return {"cluster": {"summary": summary, **totals, "summary_by": "func_name"}}


def summarize_actor_rows(actors: List[dict]) -> dict:
    summary: Dict[str, dict] = {}
    for actor in actors:
        key = actor.get("class_name")
        group = summary.setdefault(key, {"class_name": key, "state_counts": {}})
        _count(group["state_counts"], actor.get("state"))
    return {"cluster": {"summary": summary, "total_actors": len(actors),
                        "summary_by": "class"}}


def summarize_object_rows(objects: List[dict]) -> dict:
    summary: Dict[str, dict] = {}
    holders: Dict[str, set] = {}
    nodes: Dict[str, set] = {}
    total_size_mb = 0.0
    callsite_enabled = True
    for row in objects:
        key = row.get("call_site")
        if key == "disabled":
            callsite_enabled = False
        group = summary.get(key)
        if group is None:
            group = summary[key] = {
                "total_objects": 0, "total_size_mb": 0.0, "total_num_workers": 0,
                "total_num_nodes": 0, "task_state_counts": {}, "ref_type_counts": {}}
            holders[key], nodes[key] = set(), set()
        group["total_objects"] += 1
        _count(group["task_state_counts"], row.get("task_status"))
        _count(group["ref_type_counts"], row.get("reference_type"))
        size = row.get("object_size")
        if size is not None and size >= 0:  # unknown until the object is made
            group["total_size_mb"] += size / MiB
            total_size_mb += size / MiB
        holders[key].add(row.get("pid"))
        nodes[key].add(row.get("ip"))
    for key, group in summary.items():
        group["total_num_workers"] = len(holders[key])
        group["total_num_nodes"] = len(nodes[key])
    return {"cluster": {"summary": summary, "total_objects": len(objects),
                        "total_size_mb": total_size_mb, "callsite_enabled": callsite_enabled,
                        "summary_by": "callsite"}}
