"""What the ``shmray`` command line prints: aligned tables of state rows, rows as records,
summaries, ``shmray status`` and ``shmray memory`` in words.

Runs in: the ``shmray`` command line (any process of the user, attached to a session).

Plain functions from JSON-able answers to text, so every output is testable from rows built
by hand.  Tables keep ids whole (they are what ``--filter`` and ``get_task`` take) and cut
other long values to ``MAX_CELL`` characters; sizes read as KiB/MiB/GiB, times as local
clock times.  State names stay Ray's (RUNNING, PENDING_ARGS_AVAIL): they are what a filter
names.
"""

from __future__ import annotations

import datetime
from typing import Dict, Iterable, List, Optional, Sequence

MAX_CELL = 40
NONE = "-"

# The columns a table shows per listing (``--detail`` shows every column, as records).
TABLE_COLUMNS = {
    "tasks": ("task_id", "name", "state", "worker_pid", "error_type", "waiting_for"),
    "actors": ("actor_id", "class_name", "name", "state", "pid", "ray_namespace"),
    "objects": ("object_id", "object_size", "where", "task_status", "reference_type",
                "type", "pid"),
    "workers": ("worker_id", "worker_type", "state", "pid", "is_alive", "task_id"),
    "nodes": ("node_id", "node_ip", "state", "node_name", "resources_total"),
}
TASK_ORDER = ("PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER",
              "PENDING_ACTOR_TASK_ORDERING_OR_CONCURRENCY", "RUNNING", "FINISHED", "FAILED")
ACTOR_ORDER = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "ALIVE", "RESTARTING", "DEAD")


# -- values ---------------------------------------------------------------------------------


def size(n) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 12.0 MiB."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def amount(x) -> str:
    """A resource amount: 2 rather than 2.0, 0.5 as it is."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


def clock(ms) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def cell(column: str, value) -> str:
    """One value as a table or record shows it."""
    if value is None:
        return NONE
    if column == "object_size" or column.endswith("_bytes"):
        return size(value)
    if column.endswith("_time_ms") and isinstance(value, (int, float)):
        return clock(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {amount(v)}" for k, v in value.items()) or NONE
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or NONE
    return " ".join(str(value).split())  # one line, whatever the value held


def cut(text: str, width: int = MAX_CELL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _is_id(column: str) -> bool:
    return column.endswith("_id") or column == "id"


# -- tables and records ---------------------------------------------------------------------


def table(rows: Sequence[dict], columns: Sequence[str],
          widths: Optional[Dict[str, int]] = None) -> str:
    """An aligned table, a header line of the column names in capitals; a cell is cut at
    ``MAX_CELL`` characters, or its column's width in ``widths``, unless it is an id."""
    widths = widths or {}
    headers = [c.upper() for c in columns]
    body = [[cell(c, row.get(c)) if _is_id(c) else cut(cell(c, row.get(c)),
                                                        widths.get(c, MAX_CELL))
             for c in columns] for row in rows]
    sizes = [max([len(h)] + [len(line[i]) for line in body]) for i, h in enumerate(headers)]
    return "\n".join("  ".join(text.ljust(size) for text, size in zip(line, sizes)).rstrip()
                     for line in [headers] + body)


def records(rows: Sequence[dict]) -> str:
    """Each row as a block of ``column: value`` lines (for ``--detail``: too many columns
    for a table)."""
    blocks = []
    for row in rows:
        width = max((len(c) for c in row), default=0)
        blocks.append("\n".join(f"{c.ljust(width)}  {cell(c, v)}" for c, v in row.items()))
    return "\n\n".join(blocks)


def listing(what: str, rows: Sequence[dict], detail: bool) -> str:
    if not rows:
        return f"No {what} match."
    if detail:
        return records(rows)
    return table(rows, TABLE_COLUMNS[what])


def _in_order(counts: Dict[str, int], order: Iterable[str]) -> List[tuple]:
    order = list(order)
    known = [(s, counts[s]) for s in order if counts.get(s)]
    return known + sorted((s, n) for s, n in counts.items() if s not in order and n)


def counts_text(counts: Dict[str, int], order: Iterable[str] = ()) -> str:
    return ", ".join(f"{n} {state}" for state, n in _in_order(counts, order)) or "none"


# -- summaries ------------------------------------------------------------------------------


def summary(what: str, answer: dict) -> str:
    """``shmray summary tasks|actors|objects``: the totals, then one line per group."""
    cluster = answer.get("cluster", {})
    groups = list(cluster.get("summary", {}).values())
    if what == "tasks":
        head = (f"{cluster.get('total_tasks', 0)} tasks, "
                f"{cluster.get('total_actor_tasks', 0)} actor calls, "
                f"{cluster.get('total_actor_scheduled', 0)} actors created")
        rows = [{"func_or_class_name": g["func_or_class_name"], "type": g["type"],
                 "state_counts": counts_text(g["state_counts"], TASK_ORDER)} for g in groups]
        columns = ("func_or_class_name", "type", "state_counts")
    elif what == "actors":
        head = f"{cluster.get('total_actors', 0)} actors"
        rows = [{"class_name": g["class_name"],
                 "state_counts": counts_text(g["state_counts"], ACTOR_ORDER)} for g in groups]
        columns = ("class_name", "state_counts")
    else:
        head = (f"{cluster.get('total_objects', 0)} object references, "
                f"{cluster.get('total_size_mb', 0.0):.1f} MiB")
        rows = [{"call_site": key, "total_objects": g["total_objects"],
                 "total_size_mb": f"{g['total_size_mb']:.1f}",
                 "reference_types": counts_text(g["ref_type_counts"]),
                 "task_states": counts_text(g["task_state_counts"])}
                for key, g in cluster.get("summary", {}).items()]
        columns = ("call_site", "total_objects", "total_size_mb", "reference_types",
                   "task_states")
    if not rows:
        return head
    return head + "\n\n" + table(rows, columns, dict.fromkeys(columns, 80))


def sessions(found: list) -> str:
    """``shmray sessions``: the user's running sessions, as the transport lists them."""
    if not found:
        return "No shmray session of yours is running."
    if all(isinstance(one, dict) for one in found):
        columns = list(dict.fromkeys(key for one in found for key in one))
        return table(found, columns)
    return "\n".join(str(one) for one in found)


# -- status ---------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _resource(name: str, used, total) -> str:
    show = size if "memory" in name else amount
    return f"{show(used)} / {show(total)}"


def status(answer: dict, now_ms: float) -> str:
    """``shmray status``: the session, its resources, workers, actors, store and tasks, what
    pending tasks wait for, and the tasks that will never run unless someone acts."""
    session = answer.get("session", {})
    lines = [f"Session {session.get('session_name', '?')}"
             f"  (driver pid {session.get('driver_pid', '?')}, "
             f"scheduler pid {session.get('scheduler_pid', '?')}"
             + (f", up {_duration((now_ms - session['start_time_ms']) / 1000)}"
                if session.get("start_time_ms") else "") + ")"]
    if session.get("session_dir"):
        lines.append(f"  folder {session['session_dir']}")

    resources = answer.get("resources", {})
    total, used = resources.get("total", {}), resources.get("used", {})
    lines += ["", "Resources (used / total)"]
    width = max((len(name) for name in total), default=0)
    lines += [f"  {name.ljust(width)}  {_resource(name, used.get(name, 0), amount_)}"
              for name, amount_ in total.items()]

    workers = answer.get("workers", {})
    actors = answer.get("actors", {})
    store = answer.get("store", {})
    tasks = answer.get("tasks", {})
    capacity, in_use = store.get("capacity"), store.get("used")
    share = f" ({100 * in_use / capacity:.0f}%)" if capacity and in_use is not None else ""
    lines += [
        "",
        f"Workers  {workers.get('total', 0)}: {workers.get('busy', 0)} busy, "
        f"{workers.get('idle', 0)} idle, {workers.get('leased', 0)} leased to the driver, "
        f"{workers.get('blocked', 0)} blocked in get",
        f"Actors   {counts_text(actors, ACTOR_ORDER)}",
        f"Store    {size(in_use)} of {size(capacity)} used{share}, "
        f"{store.get('num_objects', 0)} objects; {size(store.get('spilled_bytes', 0))} "
        f"spilled ({store.get('spilled_objects', 0)} objects)",
        f"Tasks    {counts_text(tasks, TASK_ORDER)}",
    ]
    pending = answer.get("pending") or []
    if pending:
        lines += ["", "Pending tasks, by what they wait for"]
        width = max(len(str(p.get("count", ""))) for p in pending)
        lines += [f"  {str(p.get('count', '?')).rjust(width)}  {p.get('text') or p.get('reason')}"
                  for p in pending]
    stuck = answer.get("stuck") or []
    if stuck:
        lines += ["", f"Stuck: {len(stuck)} task(s) will not run unless you act"]
        lines += [f"  {s.get('name', '?')} (task {s.get('task_id', '?')}): "
                  f"{s.get('text') or s.get('reason')}" for s in stuck]
    return "\n".join(lines)


# -- memory ---------------------------------------------------------------------------------


def memory_report(objects: List[dict], store: dict) -> dict:
    """The objects of the "objects" rows, each once (rows are per holder), biggest first,
    with who holds each; and totals by where the bytes are, beside the store's own figures.
    JSON-able: ``shmray memory --format json`` prints it."""
    by_id: Dict[str, dict] = {}
    for row in objects:
        found = by_id.get(row.get("object_id"))
        if found is None:
            found = by_id[row.get("object_id")] = {
                "object_id": row.get("object_id"), "object_size": row.get("object_size"),
                "where": row.get("where") or ("spilled" if row.get("spilled") else None),
                "task_status": row.get("task_status"), "pinned": False, "holders": []}
        found["holders"].append({"pid": row.get("pid"), "type": row.get("type"),
                                 "reference_type": row.get("reference_type")})
        found["pinned"] |= row.get("reference_type") == "PINNED_IN_MEMORY"
    listed = sorted(by_id.values(), key=lambda o: -(o["object_size"] or 0))
    totals = {}
    for where in ("arena", "spilled", "inline"):
        these = [o for o in listed if o["where"] == where]
        totals[where] = {"objects": len(these),
                         "bytes": sum(o["object_size"] or 0 for o in these)}
    totals["pinned"] = {"objects": sum(o["pinned"] for o in listed),
                        "bytes": sum(o["object_size"] or 0 for o in listed if o["pinned"])}
    return {"objects": listed, "totals": totals, "store": store}


def _holders(holders: List[dict]) -> str:
    return ", ".join(f"{(h.get('type') or '?').lower()} {h.get('pid')} "
                     f"({h.get('reference_type')})" for h in holders)


def memory(report: dict, limit: int) -> str:
    """``shmray memory``: objects by size, who holds each, and the totals beside the
    store's used and spilled bytes."""
    listed = report["objects"]
    shown = listed[:limit]
    rows = [{"object_id": o["object_id"], "size": size(o["object_size"]),
             "where": (o["where"] or "?") + (", pinned" if o["pinned"] else ""),
             "held_by": _holders(o["holders"])} for o in shown]
    lines = [f"{len(listed)} objects held" + (f", the {len(shown)} biggest shown"
                                              if len(shown) < len(listed) else "")]
    if rows:
        lines += ["", table(rows, ("object_id", "size", "where", "held_by"), {"held_by": 80})]
    totals, store = report["totals"], report["store"]
    arena, spilled, inline = totals["arena"], totals["spilled"], totals["inline"]
    lines += [
        "",
        f"In the store    {size(arena['bytes'])} in {arena['objects']} objects; the store "
        f"has {size(store.get('used'))} of {size(store.get('capacity'))} in use",
        f"Spilled         {size(spilled['bytes'])} in {spilled['objects']} objects; the store "
        f"counts {size(store.get('spilled_bytes'))} in {store.get('spilled_objects', '?')}",
        f"Inline          {size(inline['bytes'])} in {inline['objects']} objects (small: "
        "carried in messages, not in the store)",
        f"Pinned          {totals['pinned']['objects']} objects "
        f"({size(totals['pinned']['bytes'])}): a get or a running task holds them",
    ]
    unheld = (store.get("used") or 0) - arena["bytes"]
    if store.get("used") is not None and unheld > 0:
        lines.append(f"                ({size(unheld)} of the store's use is in no object "
                     "listed: allocation headers and alignment, or objects being freed)")
    return "\n".join(lines)
