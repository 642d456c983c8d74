"""``shmray.cloudpickle``: the cloudpickle shmray pickles with, where Ray's users find it
(``ray.cloudpickle``: ``dumps``, ``loads``, ``CloudPickler``, ...).

Runs in: every process.

It is the cloudpickle package itself, not a copy: ``dumps`` here is cloudpickle's, with no
shmray bookkeeping (a ref pickled with it is the user's to keep alive, as with any pickle).
"""

from cloudpickle import (  # noqa: F401
    CloudPickler,
    Pickler,
    dump,
    dumps,
    load,
    loads,
    register_pickle_by_value,
    unregister_pickle_by_value,
)

__all__ = ["CloudPickler", "Pickler", "dump", "dumps", "load", "loads",
           "register_pickle_by_value", "unregister_pickle_by_value"]
