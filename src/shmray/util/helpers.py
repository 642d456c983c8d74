"""``as_completed`` and ``map_unordered``: results in the order they finish, as Ray's
``ray.util`` helpers.

Runs in: the driver, workers and actors.

Both wait for ``chunk_size`` results at a time (one ``wait`` per chunk, not per result) and
hand them out in the order ``wait`` reports them; ``map_unordered`` keeps at most
``backpressure_size`` tasks in flight, so a long iterable never floods the scheduler.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Optional, Sequence

from .._api import get, wait
from .._object_ref import ObjectRef


def as_completed(refs: Sequence[ObjectRef], *, chunk_size: int = 10,
                 yield_obj_refs: bool = False, **kwargs) -> Iterator[Any]:
    """The results of ``refs`` (their refs, with ``yield_obj_refs``), a chunk at a time as
    each chunk is ready; ``kwargs`` go to ``wait`` (``timeout``, ``fetch_local``)."""
    _check_chunk(chunk_size)
    for ready in ready_chunks(refs, chunk_size, **kwargs):
        yield from _handed_out(ready, yield_obj_refs)


def ready_chunks(refs: Sequence[ObjectRef], chunk_size: int,
                 **kwargs) -> Iterator[List[ObjectRef]]:
    """The refs in chunks of up to ``chunk_size``, each as soon as it is ready."""
    pending = list(refs)
    while pending:
        ready, pending = _next_ready(pending, chunk_size, kwargs)
        yield ready


def _next_ready(pending: List[ObjectRef], chunk_size: int, wait_kwargs: dict):
    """(the next chunk of ``pending`` that is ready, the rest): one ``wait``."""
    return wait(pending, num_returns=min(chunk_size, len(pending)), **wait_kwargs)


def map_unordered(fn, items: Iterable[Any], *, backpressure_size: Optional[int] = 100,
                  chunk_size: int = 10, yield_obj_refs: bool = False,
                  **kwargs) -> Iterator[Any]:
    """``fn.remote(item)`` for each item, results as they finish, with no more than
    ``backpressure_size`` tasks in flight (None: no limit)."""
    _check_chunk(chunk_size)
    if backpressure_size is not None and backpressure_size < 1:
        raise ValueError("`backpressure_size` must be >= 1, or None for no limit")
    pending: List[ObjectRef] = []
    for item in items:
        if backpressure_size is not None and len(pending) >= backpressure_size:
            ready, pending = _next_ready(pending, chunk_size, kwargs)
            yield from _handed_out(ready, yield_obj_refs)
        pending.append(fn.remote(item))
    yield from as_completed(pending, chunk_size=chunk_size, yield_obj_refs=yield_obj_refs,
                            **kwargs)


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError("`chunk_size` must be >= 1")


def _handed_out(ready: List[ObjectRef], yield_obj_refs: bool) -> Iterable[Any]:
    return ready if yield_obj_refs else get(ready)
