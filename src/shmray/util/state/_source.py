"""Where the state API's rows come from: the one function every listing, summary, the
timeline and the ``shmray`` command line ask.

Runs in: any process that asks about a session.

Two routes to the same answer (``State.answer`` in the scheduler):

    driver, task, actor ──QUERY ("state", request)──> scheduler   (its own session)
    any other process ──unix socket, JSON──> scheduler             (``_inspect_client``)

A process in a session (``_context.runtime`` set: the driver after ``init``, every worker and
actor) asks over the link it already has, so the API works inside tasks with nothing to
find.  Any other process (the command line in another terminal, a script that never called
``init``) attaches to a running session of its user through the transport, which finds the
session (by name or folder, else the only one running) and explains when it can't.
"""

from __future__ import annotations

from typing import Optional

from ... import _context, _inspect_client as transport, _ray_backend
from .exception import RayStateApiException


def fetch(request: dict, address: Optional[str] = None):
    """The session's answer to ``request`` ({"what": "tasks"} ...).  ``address``: None or
    "auto" (Ray's spelling for "the running one") asks this process's session if it is in
    one, else the only session of this user running; a session's name or folder asks that
    one."""
    if address == "auto":
        address = None
    if _ray_backend.ray is not None and address is None:
        raise RayStateApiException(
            "this session runs on a Ray cluster (init(address=...)): ask Ray's state API, "
            "ray.util.state, and the `ray` command line (pip install \"ray[default]\")")
    runtime = _context.runtime
    if runtime is not None and address is None:
        answer = runtime.query(("state", request))
    else:
        answer = transport.fetch(request, session=address)
    if answer is None:
        raise RayStateApiException(
            f"the session does not answer state queries ({request.get('what')!r}): its "
            "scheduler is from a shmray without the state API")
    if isinstance(answer, dict) and set(answer) == {"error"}:
        raise RayStateApiException(f"the session could not answer: {answer['error']}")
    return answer


def running_sessions() -> list:
    """The sessions of this user running on this machine, as the transport describes them."""
    return transport.list_sessions()
