"""``shmray.cloudpickle``: the cloudpickle shmray pickles with, where Ray's users find it
(``ray.cloudpickle``: ``dumps``, ``loads``, ``CloudPickler``, ...).

Runs in: every process.

It is the cloudpickle package itself, not a copy.  An ObjectRef pickled with it is
exported, as by any pickle the user makes: its object lives while the process that pickled
it does, so the ref resolves wherever it is unpickled (``ObjectRef.__reduce__``).
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
