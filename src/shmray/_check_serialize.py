"""``inspect_serializability``: which part of a value can't be pickled, as Ray's
``ray.util.inspect_serializability`` (public as ``shmray.util.inspect_serializability``).

Runs in: any process (a debugging aid called by the user; and the report of a put() or a
task argument that can't be pickled).

A value that cloudpickle refuses is taken apart the way cloudpickle takes it apart: a
function into the globals and closure cells its code uses, an object into its attributes, a
container into its items; each part is tried on its own, and the search goes on into the
parts that fail, ``depth`` levels down.  What fails with no failing part of its own is the
culprit, reported with the name it has in its parent.
"""

from __future__ import annotations

import inspect
import io
import sys
from typing import Any, NamedTuple, Optional, Set, TextIO, Tuple

from ._pickling import trial_dumps


class FailureTuple(NamedTuple):
    """A part that can't be pickled: the object, its name, and the name of its parent."""

    obj: Any
    name: str
    parent: Any

    def __repr__(self) -> str:
        return f"FailTuple({self.name} [obj={self.obj!r}, parent={self.parent!r}])"


def inspect_serializability(base_obj: Any, name: Optional[str] = None, depth: int = 3,
                            print_file: Optional[TextIO] = None) -> Tuple[bool, Set]:
    """(whether ``base_obj`` pickles, the set of ``FailureTuple`` of the parts that don't),
    printing what it finds to ``print_file`` (standard output by default)."""
    out = print_file or sys.stdout
    name = name or getattr(base_obj, "__name__", None) or type(base_obj).__name__
    failures: Set[FailureTuple] = set()
    print(f"Checking serializability of {name!r}", file=out)
    ok = _inspect(base_obj, name, None, depth, failures, out, level=0)
    if ok:
        print(f"{name!r} can be serialized", file=out)
    else:
        print(f"{name!r} can't be serialized; the parts at fault:", file=out)
        for failure in failures:
            print(f"    {failure.name} (in {failure.parent!r}): {type(failure.obj).__name__}",
                  file=out)
    return ok, failures


def serializability_report(value) -> str:
    """What ``inspect_serializability`` prints about ``value``, for an error message."""
    out = io.StringIO()
    try:
        inspect_serializability(value, print_file=out)
    except Exception as error:  # taking apart an exotic object must not hide the real error
        print(f"(inspecting it failed: {type(error).__name__}: {error})", file=out)
    return out.getvalue()


def _pickles(value) -> Optional[str]:
    try:
        trial_dumps(value)
    except Exception as error:  # what pickling raises varies: TypeError, PicklingError, ...
        return f"{type(error).__name__}: {error}"
    return None


def _inspect(value, name: str, parent, depth: int, failures: Set, out: TextIO,
             level: int) -> bool:
    error = _pickles(value)
    if error is None:
        return True
    print(f"{'    ' * level}{name!r} fails: {error}", file=out)
    found = False
    if depth > 0:
        for part_name, part in _parts(value):
            if _pickles(part) is not None:
                found = True
                _inspect(part, part_name, value, depth - 1, failures, out, level + 1)
    if not found:
        failures.add(_failure(value, name, parent))
    return False


def _failure(value, name: str, parent) -> FailureTuple:
    try:
        hash(value)
    except TypeError:  # a set holds hashable members only: keep its repr
        value = repr(value)
    try:
        hash(parent)
    except TypeError:
        parent = repr(parent)
    return FailureTuple(value, name, parent)


def _parts(value):
    """(name, part) for the parts cloudpickle would pickle ``value`` from."""
    if inspect.isfunction(value):
        closure = inspect.getclosurevars(value)
        yield from closure.globals.items()
        yield from closure.nonlocals.items()
    elif isinstance(value, dict):
        yield from ((repr(key), item) for key, item in value.items())
    elif isinstance(value, (list, tuple, set, frozenset)):
        yield from ((f"[{index}]", item) for index, item in enumerate(value))
    elif hasattr(value, "__dict__") and not inspect.isclass(value):
        yield from vars(value).items()
