"""BLAS and OpenMP thread pools sized to the CPUs a task or actor holds.

Runs in: worker and actor processes, and the scheduler, which sizes the pools for the usual
task before it forks them (``before_fork``); the driver looks for the libraries at ``init``
(``find_libraries``).  Each process forked inherits what its parent found and set.

A BLAS library (OpenBLAS, MKL, BLIS) or an OpenMP runtime starts one thread per core by
default.  Two workers each running a matmul with every core's threads would put twice as
many threads as cores on the machine, and they fight over caches and cores; so each task and
actor runs with its pools limited to the CPUs it holds: ``num_cpus`` rounded down, at least
one (Ray's rule for ``OMP_NUM_THREADS``: a fractional or zero CPU still gets a thread).

Environment variables are read only when a library loads, and a worker's libraries are
loaded before it runs anything (the driver imported numpy before ``init``; the worker, forked,
inherits it), and a worker runs tasks of different sizes one after another.  So the pools are
resized at run time, through threadpoolctl: the maintained library for this (by
scikit-learn's developers, used by scikit-learn and joblib), which finds every BLAS and
OpenMP library loaded in the process and calls its own ``set_num_threads``.  Finding the
libraries costs a millisecond or two, resizing a fraction of one, and neither happens per
task:

- the driver finds the libraries at ``init``, and the scheduler sizes them for the usual
  task (one CPU) before its first fork, so every worker and actor starts sized for it.
  Resizing OpenBLAS starts its thread server, whose new thread spins for tens of
  milliseconds; in the scheduler the fork that follows stops it at once (OpenBLAS's fork
  handler, which shuts the server down in the parent too), and the children inherit the
  size without a thread: the scheduler is single-threaded again from that first fork on,
  as DESIGN.md has it;
- ``fit`` does nothing unless a task asks for another size than the last one (two identity
  checks for the usual task), and the libraries are looked for again only then, and only
  if modules were imported since the last search;
- a library a task loads later reads ``OMP_NUM_THREADS``, which holds the size in force, as
  Ray sets it in its workers.

The user's settings always win.  A pool whose variable (``OPENBLAS_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OMP_NUM_THREADS``...: ``_READS``) the user set, in the driver's
environment before ``init`` or in ``runtime_env``'s ``env_vars`` (of the session, read by
the scheduler before its first fork; of an actor or a task, passed to ``fit``), gets that
value instead of the CPU count.  It is applied at run time too: the library may have read
the environment before the user set the variable (numpy imported first), and always has
before an actor's or a task's ``env_vars`` are set.

Forking after the driver ran multithreaded BLAS is safe with OpenBLAS built on pthreads
(numpy's wheels), whose fork handler stops its threads before the fork, so the child starts
fresh ones when it needs them.  GNU OpenMP has no such handler: a child forked after the
parent used an OpenMP parallel region may hang in its own first one (a libgomp limitation
that any fork-based pool shares).
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Optional

import threadpoolctl

from . import _protocol as P

# The variables each kind of pool reads when its library loads, first one set wins
# (threadpoolctl's ``internal_api`` names).  A kind not listed reads OMP_NUM_THREADS.
_READS = {
    "openblas": ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
    "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS"),
    "blis": ("BLIS_NUM_THREADS", "OMP_NUM_THREADS"),
    "openmp": ("OMP_NUM_THREADS",),
}
_OTHERS = ("OMP_NUM_THREADS",)
VARIABLES = frozenset(name for names in _READS.values() for name in names)

_user: Optional[Dict[str, str]] = None  # the user's settings when the scheduler started
_last = (None, None)             # (resources, env_vars) of the last ``fit``
_sized_for = None                # (size, settings) the pools were last sized for
_controller = None               # threadpoolctl's view of the libraries loaded here
_modules_seen = -1               # len(sys.modules) when the libraries were last looked for


def before_fork() -> None:
    """In the scheduler, before it forks a worker or an actor: the first time, note the
    user's settings (the driver's environment at ``init``, the session's ``runtime_env``)
    and size the pools for the usual task, which the children inherit."""
    global _user
    if _user is None:
        _user = {name: os.environ[name] for name in VARIABLES if name in os.environ}
    fit(P.LEASE_SHAPE)
    find_libraries()  # a no-op unless something was imported since


def fit(resources: dict, env_vars: Optional[dict] = None) -> None:
    """Size the pools for a task or actor that holds ``resources`` and runs with
    runtime_env's ``env_vars`` (None: none).  Free when nothing changed since the last."""
    if resources is _last[0] and env_vars is None and _last[1] is None:
        return
    _resize(resources, env_vars)


def _resize(resources: dict, env_vars: Optional[dict]) -> None:
    global _last, _sized_for
    _last = (resources, env_vars)
    size = max(1, int(resources.get("CPU", 0)))
    settings = _user or {}
    if env_vars and not VARIABLES.isdisjoint(env_vars):
        settings = {**settings, **{k: v for k, v in env_vars.items() if k in VARIABLES}}
    if _sized_for == (size, settings):
        return
    _sized_for = (size, settings)
    if "OMP_NUM_THREADS" not in settings:  # for the libraries loaded from now on
        os.environ["OMP_NUM_THREADS"] = str(size)
    for library in find_libraries():
        threads = size
        for name in _READS.get(library.internal_api, _OTHERS):
            if name in settings:
                threads = _count(settings[name])
                break
        if threads is not None:
            library.set_num_threads(threads)


def find_libraries() -> list:
    """The BLAS and OpenMP libraries loaded here, looked for again only if something was
    imported since the last time (a library loads with the module that needs it).  The
    driver calls it at ``init``: a search costs a millisecond or two there, twice that in
    a freshly forked scheduler (its page tables are new)."""
    global _controller, _modules_seen
    if len(sys.modules) != _modules_seen:
        _modules_seen = len(sys.modules)
        _controller = threadpoolctl.ThreadpoolController()
    return _controller.lib_controllers


def _count(value: str) -> Optional[int]:
    """A thread count as the libraries read it (OMP_NUM_THREADS may list one per nesting
    level: the first is the outer one); None for a value they would ignore, which leaves
    that pool alone."""
    try:
        count = int(str(value).split(",")[0])
    except ValueError:
        return None
    return count if count >= 1 else None
