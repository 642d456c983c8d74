"""The ``shmray`` command line (also ``python -m shmray``): see inside a running session from
another terminal.

Runs in: its own process, of the user whose session it attaches to.

    shmray status                      resources, workers, actors, store, tasks, what waits
    shmray memory                      objects by size, who holds each, totals vs the store
    shmray list tasks|actors|objects|workers|nodes [--filter KEY=VALUE ...] [--limit N]
                                       [--detail]
    shmray summary tasks|actors|objects
    shmray timeline [-o FILE]          Chrome trace events (Perfetto, chrome://tracing)
    shmray sessions                    the user's running sessions

Each takes ``--session NAME`` (needed when several sessions run) and, but timeline,
``--format table|json`` (tables for people, JSON for scripts).  Every answer comes through
``shmray.util.state`` (the same functions a program calls), so the command line and the API
can't disagree.  It starts nothing: a session it can't reach is an error, printed as one line
on stderr with exit status 1, as is a bad filter; usage errors exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from . import _cli_text as text
from .util.state import api
from .util.state._source import fetch, running_sessions
from .util.state._timeline import session_trace
from .util.state.common import DEFAULT_LIMIT
from .util.state.exception import InvalidStateQuery

LISTINGS = ("tasks", "actors", "objects", "workers", "nodes")
SUMMARIES = ("tasks", "actors", "objects")


def parse_filter(given: str) -> tuple:
    """``KEY=VALUE`` or ``KEY!=VALUE`` as Ray's (key, predicate, value)."""
    for predicate in ("!=", "="):
        key, found, value = given.partition(predicate)
        if found and key.strip():
            return key.strip(), predicate, value.strip()
    raise InvalidStateQuery(
        f"--filter {given!r}: write KEY=VALUE or KEY!=VALUE (e.g. --filter state=RUNNING)")


def _count(given: str) -> int:
    """An argparse type: a whole number >= 0."""
    try:
        number = int(given)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {given!r}")
    return number


def _dump(value) -> str:
    return json.dumps(value, indent=2, default=str)


# -- the commands: each returns what to print -------------------------------------------------


def run_status(args) -> str:
    answer = fetch({"what": "status"}, args.session)
    return _dump(answer) if args.format == "json" else text.status(answer, time.time() * 1000)


def run_memory(args) -> str:
    objects = fetch({"what": "objects"}, args.session)
    store = fetch({"what": "status"}, args.session).get("store", {})
    report = text.memory_report(objects, store)
    return _dump(report) if args.format == "json" else text.memory(report, args.limit)


def run_list(args) -> str:
    filters = [parse_filter(one) for one in args.filter or ()]
    as_table = args.format == "table"
    # A table shows some of shmray's detail columns (a worker's state); json shows exactly
    # the columns the API returns for --detail or not.
    listing = getattr(api, f"list_{args.what}")
    rows = listing(address=args.session, filters=filters, limit=args.limit,
                   detail=args.detail or as_table)
    if not as_table:
        return _dump(rows)
    return text.listing(args.what, rows, args.detail)


def run_summary(args) -> str:
    answer = getattr(api, f"summarize_{args.what}")(address=args.session)
    return _dump(answer) if args.format == "json" else text.summary(args.what, answer)


def run_timeline(args) -> str:
    events = session_trace(args.session)
    if args.output is None:
        return json.dumps(events)
    with open(args.output, "w") as out:
        json.dump(events, out)
    lanes = sum(1 for e in events if e["ph"] == "M" and e["name"] == "thread_name")
    shown = sum(1 for e in events if e["ph"] == "X")
    return (f"{shown} events on {lanes} lanes written to {args.output}: open it in "
            "https://ui.perfetto.dev or chrome://tracing")


def run_sessions(args) -> str:
    found = running_sessions()
    return _dump(found) if args.format == "json" else text.sessions(found)


# -- parsing --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    session = argparse.ArgumentParser(add_help=False)
    session.add_argument("--session", metavar="NAME", default=None,
                         help="the session to attach to, by name or folder (needed when "
                              "several run; `shmray sessions` lists them)")
    formats = argparse.ArgumentParser(add_help=False)
    formats.add_argument("--format", choices=("table", "json"), default="table",
                         help="table (default) for people, json for scripts")
    both = [session, formats]
    parser = argparse.ArgumentParser(
        prog="shmray", description="See inside a running shmray session.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    command = commands.add_parser(
        "status", parents=both, help="resources, workers, actors, store, tasks, and what "
        "pending tasks wait for")
    command.set_defaults(run=run_status)

    command = commands.add_parser(
        "memory", parents=both, help="objects by size, who holds each, pinned and spilled, "
        "totals beside the store's")
    command.add_argument("--limit", type=_count, default=50, help="objects shown (default 50)")
    command.set_defaults(run=run_memory)

    command = commands.add_parser("list", parents=both, help="list tasks, actors, objects, "
                                  "workers or nodes")
    command.add_argument("what", choices=LISTINGS)
    command.add_argument("--filter", action="append", metavar="KEY=VALUE",
                         help="keep rows whose KEY is VALUE (KEY!=VALUE: is not); "
                              "repeat for several, all must hold")
    command.add_argument("--limit", type=_count, default=DEFAULT_LIMIT,
                         help=f"at most this many rows (default {DEFAULT_LIMIT})")
    command.add_argument("--detail", action="store_true",
                         help="every column, one block per row")
    command.set_defaults(run=run_list)

    command = commands.add_parser("summary", parents=both,
                                  help="tasks by function, actors by class, objects by call "
                                  "site, counted by state")
    command.add_argument("what", choices=SUMMARIES)
    command.set_defaults(run=run_summary)

    command = commands.add_parser("timeline", parents=[session],
                                  help="Chrome trace events of the tasks that ran")
    command.add_argument("-o", "--output", metavar="FILE",
                         help="write them to FILE (default: print them)")
    command.set_defaults(run=run_timeline)

    command = commands.add_parser("sessions", parents=[formats],
                                  help="your running sessions")
    command.set_defaults(run=run_sessions)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # one line a user can act on, not a traceback
        if os.environ.get("SHMRAY_CLI_TRACEBACK"):
            raise
        message = str(error) or type(error).__name__
        print(f"shmray {args.command}: {message}", file=sys.stderr)
        return 1
    try:
        print(output)
        sys.stdout.flush()
    except BrokenPipeError:  # `shmray list tasks | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
