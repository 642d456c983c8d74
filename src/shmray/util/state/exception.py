"""``shmray.util.state.exception``: as ``ray.util.state.exception``, the errors of the state
API.

Runs in: any process that asks about a session (the driver, tasks, actors, the ``shmray``
command line).
"""


class RayStateApiException(Exception):
    """A state query could not be answered: the session does not answer state queries, or
    it answered with an error."""


class InvalidStateQuery(RayStateApiException, ValueError):
    """A state query was asked wrongly: an unknown filter column or predicate, a filter that
    is not a (key, predicate, value) triple, a value of the wrong type for its column, a
    limit out of range.  Ray raises ValueError for some of these and RayStateApiException for
    the others; this is both, so either ``except`` catches it."""


__all__ = ["InvalidStateQuery", "RayStateApiException"]
