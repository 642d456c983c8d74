"""``shmray.util.progress``: a progress bar over refs as their tasks finish, or over any
iterable (``Pool.imap*`` results, executor maps, generators of results).

Runs in: the driver, workers and actors (wherever the loop over results runs).

With tqdm installed (``pip install shmray[tqdm]``) the bar is tqdm's (``tqdm.auto``, so a
notebook gets its widget).  Without it, a plain counter goes to stderr: ``desc: 37/100``
rewritten in place on a terminal, and at most one line a second otherwise (logs stay short),
with the final count always written.  ``disable=True`` shows nothing.

Over a list of refs, the loop yields results in the order their tasks finish (one ``wait``
per chunk, as ``as_completed``), which is what ``for x in tqdm(...)`` users expect from a
loop that shows progress: results as soon as they exist, not stalled behind the slowest
early task.  A failed or cancelled task counts as done: with ``yield_obj_refs=True`` every
ref is yielded and counted, and nothing raises; with values, its error is raised from the
loop once it has been counted, so the bar's final count is exact either way.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, List, Optional

from .._api import get
from .._object_ref import ObjectRef
from .helpers import ready_chunks


def progress(refs_or_iterable: Iterable[Any], desc: Optional[str] = None,
             total: Optional[int] = None, *, chunk_size: int = 10,
             yield_obj_refs: bool = False, disable: bool = False,
             **tqdm_kwargs) -> Iterator[Any]:
    """Iterate with a progress bar.

    A list or tuple of ObjectRefs gives their results (their refs, with ``yield_obj_refs``)
    in completion order, ``chunk_size`` refs per ``wait``; anything else is iterated as is,
    counting each item (``total`` defaults to its ``len()`` when it has one).
    ``tqdm_kwargs`` (``unit``, ``leave``, ``position``, ...) go to tqdm when it is used."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    refs = _as_refs(refs_or_iterable)
    if refs is not None:
        bar = _bar(desc, len(refs) if total is None else total, disable, tqdm_kwargs)
        return _over_refs(refs, bar, chunk_size, yield_obj_refs)
    if yield_obj_refs:
        raise ValueError("yield_obj_refs=True needs a list of ObjectRefs; got a "
                         f"{type(refs_or_iterable).__name__}")
    if total is None and hasattr(refs_or_iterable, "__len__"):
        total = len(refs_or_iterable)
    return _over_items(iter(refs_or_iterable), _bar(desc, total, disable, tqdm_kwargs))


def _as_refs(candidate) -> Optional[List[ObjectRef]]:
    """The refs, if ``candidate`` is a non-empty list/tuple of nothing but refs."""
    if not isinstance(candidate, (list, tuple)) or not candidate:
        return None
    if not isinstance(candidate[0], ObjectRef):
        return None
    if not all(isinstance(r, ObjectRef) for r in candidate):
        raise TypeError("progress() got a list mixing ObjectRefs and other values; pass only "
                        "refs (results come as tasks finish) or only values")
    return list(candidate)


def _over_refs(refs: List[ObjectRef], bar, chunk_size: int,
               yield_obj_refs: bool) -> Iterator[Any]:
    try:
        for ready in ready_chunks(refs, chunk_size):
            if yield_obj_refs:
                bar.update(len(ready))
                yield from ready
                continue
            try:
                values = get(ready)
            except Exception:  # some task of the chunk failed: one at a time, counting each
                for ref in ready:
                    bar.update(1)
                    yield get(ref)
                continue
            bar.update(len(ready))
            yield from values
    finally:
        bar.close()


def _over_items(items: Iterator[Any], bar) -> Iterator[Any]:
    try:
        for item in items:
            bar.update(1)
            yield item
    finally:
        bar.close()


def _bar(desc: Optional[str], total: Optional[int], disable: bool, tqdm_kwargs: dict):
    try:
        from tqdm.auto import tqdm  # an optional dependency, looked up at each call
    except ImportError:
        return _TextCounter(desc, total, disable)
    return tqdm(desc=desc, total=total, disable=disable, **tqdm_kwargs)


class _TextCounter:
    """The bar without tqdm: ``desc: n/total`` on stderr."""

    def __init__(self, desc: Optional[str], total: Optional[int], disable: bool):
        self.desc, self.total, self.disable = desc, total, disable
        self.n = 0
        self.closed = False
        self.on_terminal = _is_terminal(sys.stderr)
        self.last_shown = 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last_shown >= (0.1 if self.on_terminal else 1.0):
            self._show(final=False)
            self.last_shown = now

    def close(self) -> None:
        if not self.closed and not self.disable:
            self._show(final=True)
        self.closed = True

    def _show(self, final: bool) -> None:
        text = f"{self.desc + ': ' if self.desc else ''}{self.n}"
        if self.total is not None:
            text += f"/{self.total}"
        if self.on_terminal:  # rewritten in place
            sys.stderr.write("\r" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
