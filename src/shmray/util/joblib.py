"""``shmray.util.joblib``: joblib's ``Parallel`` (and scikit-learn's ``n_jobs``) on shmray.

Runs in: the driver, and workers (a ``Parallel`` call nested in a task runs in that task).

    from shmray.util.joblib import register_shmray
    register_shmray()
    with joblib.parallel_backend("shmray"):
        Parallel(n_jobs=4)(delayed(f)(x) for x in xs)

joblib is an optional extra (``pip install shmray[joblib]``): this module imports it, and
nothing else in shmray imports this module.

How a call flows::

    Parallel ──batch──> ShmrayBackend.submit ──_run_batch.remote(batch, *refs)──> worker
       ^                  (arrays >= 1 MiB: put once                    (refs arrive as
       |                   per call, passed as refs)                     zero-copy views)
       └── retrieve_result_callback <── ref.future() done callback <──── result list

- A batch's large numpy arguments (top-level positional and keyword arguments of its
  calls) are put in the store once per ``Parallel`` call and travel as top-level ObjectRef
  arguments of the batch's task, which the worker receives as read-only views of the
  arena, where joblib's default backend dumps them to memmap files.  Results come back the
  same way: a large array in a result is a read-only view, as from ``shmray.get``.
- One task per batch, joblib's own auto-batching (``AutoBatchingMixin``) sizes batches.
- Nesting: a task's nested ``Parallel`` gets this backend again (``get_nested_backend``),
  so its batches are tasks of the same session, which run only on free CPUs: no
  oversubscription, whatever the nesting.  The driver retrieves results through joblib's
  callbacks (run on a thread of their own, ``_CallbackThread``); a task retrieves them
  with ``get``, in order, which lends its CPU to the tasks it waits for, as nested tasks
  need (joblib's callback retrieval polls, holding the CPU: nested calls would deadlock
  once every CPU runs an outer batch waiting).
- Errors: a task's exception reaches the caller as the original exception, its
  ``__cause__`` carrying the remote traceback (what joblib's default backend does).
- ``n_jobs=-1`` means the session's CPUs; the session starts at the first ``Parallel``
  call if none runs (as ``.remote()`` would start one).
"""

from __future__ import annotations

import copy
import os
import queue
import sys
import threading
import traceback

import numpy as np

try:
    from joblib._parallel_backends import (
        AutoBatchingMixin,
        FallbackToBackend,
        ParallelBackendBase,
        SequentialBackend,
    )
    from joblib.parallel import register_parallel_backend
except ImportError as error:  # an optional extra
    raise ImportError("shmray.util.joblib needs joblib: pip install 'shmray[joblib]' "
                      f"(or joblib>=1.4) ({error})") from error

from .. import _api, _context, _session
from ..exceptions import RayTaskError, UnserializableException

LARGE_ARRAY = 1 << 20  # bytes: joblib's own ``max_nbytes`` default for memmapping ("1M")


def register_shmray() -> None:
    """Register shmray as a joblib backend under the name ``"shmray"``."""
    register_parallel_backend("shmray", ShmrayBackend)


class _InStore:
    """Stands for the batch task's ``index``-th extra argument: a large array in the store."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return _InStore, (self.index,)


def _run_batch(batch, *arrays):
    """Runs in a worker: put the arrays back where they were, then run joblib's batch."""

    def resolve(value):
        return arrays[value.index] if type(value) is _InStore else value

    batch.items = [(func, tuple(resolve(a) for a in args),
                    {k: resolve(v) for k, v in kwargs.items()})
                   for func, args, kwargs in batch.items]
    return batch()


# A worker that dies fails its batch at once (WorkerCrashedError), as a dead loky worker
# fails the call: running the batch again could only repeat what killed it.
_run_batch_task = _api.remote(max_retries=0)(_run_batch)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a task, as ``__cause__`` of that exception
    (joblib's default backend attaches one the same way)."""

    def __str__(self) -> str:
        return self.args[0]


def _outcome(result):
    """``result()``; a task's exception raised as the original exception, with the remote
    traceback as its cause."""
    try:
        return result()
    except RayTaskError as error:
        cause = error.cause
        if cause is None or isinstance(cause, UnserializableException):
            raise
        raise cause from RemoteTraceback(str(error))


class _Job:
    """What ``submit`` returns: joblib waits on it with ``get`` where it retrieves without
    callbacks (in a task); joblib before 1.5 calls ``get`` itself, later ones
    ``retrieve_result``."""

    __slots__ = ("ref",)

    def __init__(self, ref):
        self.ref = ref

    def get(self, timeout=None):
        return _outcome(lambda: _api.get(self.ref, timeout=timeout))


class ShmrayBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's backend API on shmray's tasks (see the module docstring)."""

    supports_retrieve_callback = True
    supports_return_generator = True
    supports_timeout = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, nesting_level=0, inner_max_num_threads=None, **backend_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        self.parallel = None
        self._stored: dict = {}    # id(array) -> (array, its ref), for one Parallel call
        self._pending: dict = {}   # future -> its ref, until it is done
        self._guard = threading.Lock()

    # A nested backend travels to the worker inside its batch: only its settings go.
    def __reduce__(self):
        return ShmrayBackend, (self.nesting_level, self.inner_max_num_threads)

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            return max(_session_cpus() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None,
                  **backend_kwargs):
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:  # as joblib's process backends: one job runs here, in order
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        runtime = _session.current()  # the session, started here if none runs yet
        if getattr(runtime, "local_mode", False):
            # Local mode runs every call in the driver, in order: joblib's sequential
            # backend does just that (and a nested Parallel, run inside a dispatch, can't
            # wait for callbacks queued behind the one dispatching it).
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        # In a task, results are waited for in ``get``, which lends the task's CPU, rather
        # than in joblib's polling loop (see the module docstring).  joblib retrieves
        # without callbacks in order only: an unordered generator there yields in order,
        # one of the orders it allows.
        in_task = _context.running_call() is not None
        self.supports_retrieve_callback = not in_task
        if in_task and parallel is not None:
            parallel.return_ordered = True
        return n_jobs

    def submit(self, func, callback=None):
        batch, refs = self._with_arrays_stored(func)
        ref = _run_batch_task.remote(batch, *refs)
        future = ref.future()
        with self._guard:
            self._pending[future] = ref
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(lambda done: _callbacks.call_soon(callback, done))
        return _Job(ref)

    apply_async = submit  # what joblib before 1.5 calls

    def retrieve_result_callback(self, out):
        return _outcome(out.result)

    def retrieve_result(self, out, timeout=None):
        return out.get(timeout)

    def abort_everything(self, ensure_ready=True):
        with self._guard:
            refs = list(self._pending.values())
            self._pending.clear()
        for ref in refs:
            _api.cancel(ref)

    def stop_call(self):
        # Each call puts its arrays afresh: between calls of a reused Parallel (``with
        # Parallel(...) as parallel``) the caller may have changed them in place.
        self._stored = {}

    def terminate(self):
        self._stored = {}
        self.reset_batch_stats()

    def get_nested_backend(self):
        return ShmrayBackend(nesting_level=self.nesting_level + 1), None

    # -- internals ---------------------------------------------------------------------

    def _forget(self, future) -> None:
        with self._guard:
            self._pending.pop(future, None)

    def _with_arrays_stored(self, batch):
        """A shallow copy of ``batch`` whose large arrays are ``_InStore`` marks, and the
        refs they stand for (each array put once per Parallel call)."""
        refs: list = []
        slots: dict = {}

        def store(value):
            if not (type(value) is np.ndarray and value.nbytes >= LARGE_ARRAY):
                return value
            key = id(value)
            if key not in slots:
                entry = self._stored.get(key)
                if entry is None:
                    # The array is kept with its ref, so its id stays its own this call.
                    entry = self._stored[key] = (value, _api.put(value))
                slots[key] = len(refs)
                refs.append(entry[1])
            return _InStore(slots[key])

        items = [(func, tuple(store(a) for a in args),
                  {k: store(v) for k, v in kwargs.items()})
                 for func, args, kwargs in batch.items]
        if not refs:
            return batch, refs
        batch = copy.copy(batch)
        batch.items = items
        return batch, refs


class _CallbackThread:
    """Runs joblib's completion callbacks on a thread of their own.  A ref's future is
    resolved by whichever thread of shmray reads its arrival, holding the runtime's lock;
    joblib's callback takes the Parallel's lock and submits the next batch, which needs the
    runtime's lock: run there, it would deadlock with a thread submitting under the
    Parallel's lock.  The thread ends after a second with nothing to run."""

    IDLE = 1.0  # seconds

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = None
        self._outstanding = 0

    def call_soon(self, fn, arg) -> None:
        with self._lock:
            self._outstanding += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="shmray-joblib-callbacks")
                self._thread.start()
        self._queue.put((fn, arg))

    def _run(self) -> None:
        while True:
            try:
                fn, arg = self._queue.get(timeout=self.IDLE)
            except queue.Empty:
                with self._lock:
                    if self._outstanding == 0:
                        self._thread = None
                        return
                continue
            try:
                fn(arg)
            except Exception:  # joblib keeps a task's outcome itself: this is its bug
                traceback.print_exc(file=sys.stderr)
            finally:
                # The future holds its result: kept here while the thread idles, a large
                # array would stay pinned in the store until the next call.
                del fn, arg
                with self._lock:
                    self._outstanding -= 1


_callbacks = _CallbackThread()


def _fresh_callbacks_after_fork() -> None:
    # A forked child (the scheduler, and through it every worker) has none of its parent's
    # threads: a callback thread the parent ran would look alive to it and never run.
    global _callbacks
    _callbacks = _CallbackThread()


os.register_at_fork(after_in_child=_fresh_callbacks_after_fork)


def _session_cpus() -> int:
    return int(_api.cluster_resources().get("CPU", 1))


__all__ = ["ShmrayBackend", "register_shmray"]
