"""Ray's ``ray.util.check_serialize`` path; the code is in ``shmray._check_serialize``,
below the modules whose errors use it (put(), task arguments).

Runs in: any process.
"""

from .._check_serialize import FailureTuple, inspect_serializability

__all__ = ["FailureTuple", "inspect_serializability"]
