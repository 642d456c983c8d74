"""The listing pipeline, as Ray's state API server runs it: check the filters, keep the rows
that match all of them, keep the listing's columns, sort by id, cut at the limit.

Runs in: any process that asks about a session (after ``_source.fetch``).

Ray's filter semantics, kept: each filter is ``(column, "=" | "!=", value)`` and all must
hold; the column is matched case-insensitively and must be one the row class lets a filter
name; a string value compares with a string column case-insensitively ("running" finds
RUNNING tasks); a string value for a number or true/false column is converted first
("pid=1234", "is_alive=true"), and a value that does not convert is an error naming the
column; a row without the column never matches.  Rows are sorted by their id so a listing
cut at the limit is the same listing each time.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

from .common import MAX_LIMIT, StateSchema
from .exception import InvalidStateQuery

Filter = Tuple[str, str, object]
PREDICATES = ("=", "!=")
_TRUE = ("true", "1")
_FALSE = ("false", "0")


def check_filters(filters: Optional[Sequence], schema: type) -> List[Filter]:
    """``filters`` checked against ``schema`` (a StateSchema class), each value converted to
    its column's type; raises InvalidStateQuery naming what is wrong."""
    if filters is None:
        return []
    if isinstance(filters, (str, bytes)) or not isinstance(filters, Iterable):
        raise InvalidStateQuery(
            f"filters must be a list of (key, predicate, value) tuples, got {filters!r}")
    kinds = {c.name: c.kind for c in schema.COLUMNS}
    allowed = schema.filterable_columns()
    checked = []
    for one in filters:
        if isinstance(one, (str, bytes)) or not isinstance(one, Sequence) or len(one) != 3:
            raise InvalidStateQuery(
                f"The given filter has incorrect input type, {one!r}. "
                "Provide (key, predicate, value) tuples.")
        column, predicate, value = one
        if predicate not in PREDICATES:
            raise InvalidStateQuery(
                f"Unsupported filter predicate {predicate!r} is given. "
                "Available predicates: =, !=.")
        column = str(column).lower()
        if column not in allowed:
            raise InvalidStateQuery(
                f"The given filter column {column!r} is not supported. Supported filter "
                f"columns: {', '.join(sorted(allowed))}")
        checked.append((column, predicate, _convert(column, kinds[column], value)))
    return checked


def _convert(column: str, kind: Optional[type], value):
    if not isinstance(value, str) or kind is None:
        return value
    if kind is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise InvalidStateQuery(
            f"Invalid filter `--filter {column} {value}` for a boolean type column. "
            f"Please provide `--filter {column} [True|true|1]` for True or "
            f"`--filter {column} [False|false|0]` for False.")
    try:
        return kind(value)
    except ValueError:
        raise InvalidStateQuery(
            f"Invalid filter `--filter {column} {value}` for a {kind.__name__} type "
            f"column. Please provide an {kind.__name__} filter `--filter {column} "
            f"[{kind.__name__}]`") from None


def _equal(actual, wanted) -> bool:
    if isinstance(actual, str) and isinstance(wanted, str):
        return actual.lower() == wanted.lower()
    return actual == wanted


def matches(answer: dict, filters: List[Filter]) -> bool:
    """Whether one of the scheduler's rows passes every filter."""
    for column, predicate, wanted in filters:
        if column not in answer:
            return False
        if _equal(answer[column], wanted) != (predicate == "="):
            return False
    return True


def check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidStateQuery(f"limit must be a whole number >= 0, got {limit!r}")
    if limit > MAX_LIMIT:
        raise InvalidStateQuery(
            f"Given limit {limit} exceeds the supported limit {MAX_LIMIT}. Use a lower "
            "limit, and filters to find the rows you want.")
    return limit


def check_timeout(timeout) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise InvalidStateQuery(f"timeout must be a number of seconds > 0, got {timeout!r}")


def select(answers: list, schema: type, filters: List[Filter], detail: bool,
           limit: Optional[int]) -> Tuple[List[StateSchema], int]:
    """The rows of ``answers`` that pass ``filters``, as ``schema`` rows with the listing's
    columns, sorted by id, at most ``limit`` (None: all); and how many passed."""
    kept = [answer for answer in answers if matches(answer, filters)]
    kept.sort(key=lambda answer: str(answer.get(schema.ID_COLUMN) or ""))
    rows = [schema.from_answer(answer, detail) for answer in
            (kept if limit is None else kept[:limit])]
    return rows, len(kept)
