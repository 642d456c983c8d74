"""Local mode, ``init(local_mode=True)``: every task and actor call runs in the driver, at
its ``.remote()``, one after the other, so ``breakpoint()``, pdb and IDE debuggers work
inside remote code.

Runs in: the driver (the only process of a local-mode session).

``LocalRuntime`` takes the place of the ``Runtime`` a session installs (``_context``): the
API, ``RemoteFunction``, ``ActorHandle`` and ``ObjectRef`` call the same methods of it, so
everything above the runtime is unchanged, options checks and their errors included.
There is no scheduler process, no worker, no arena and no socket.  What was decided:

- Eager, in submission order, as Ray's local mode was: ``.remote()`` runs the function
  before it returns, so every ref is ready when the caller gets it; ``wait`` finds all of
  them ready, ``cancel`` finds its task done and leaves it alone (``force`` on an actor
  call is refused, as always).  A nested task runs inside its parent's call.
- Values are copied as between processes (Ray's local mode serialized too, so that it
  behaves like the real thing: ray#5853): arguments are packed by ``_task_spec`` and
  rebuilt for the call, results and ``put`` values are kept serialized (the bytes a small
  value travels as) and rebuilt at each ``get``.  A task that mutates its argument changes
  its copy, an unpicklable argument raises at ``.remote()``, arrays come back read-only.
- The function and the class a call runs are those a worker would run: unpickled once
  per session from the pickle a worker gets (a function of ``__main__`` has its own
  globals, as in a worker).  Breakpoints by file and line still hit: the code keeps its
  file names.
- Errors are the real ones: ``_task_results.task_error`` wraps an exception into the
  ``RayTaskError`` that is also the user's class (its pid is the driver's); a failed
  argument fails the call with its error without running it; ``retry_exceptions`` retries
  as many times as ``max_retries`` allows.  What a worker would report is any exception
  and ``SystemExit``; ``KeyboardInterrupt``, pdb's quit (``bdb.BdbQuit``) and other
  ``BaseException``s (a test harness's timeout) are not the task's failure: they stop the
  program at the ``.remote()``, as in a plain script.
- Refs are counted as in a real session and an object is dropped with its last ref (and
  the refs its value holds with it); an actor ends when its last handle goes.
- Resources are checked for feasibility only (a task asking more than the machine has
  raises ``TaskUnschedulableError`` at ``.remote()``); nothing waits for them, since one
  call runs at a time.  ``available_resources()`` counts what the calls running (nested)
  hold.
- Generators run to their end at ``.remote()``: a streaming one's items are all there
  (``_generator_backpressure_num_objects`` has nothing to hold back; an endless generator
  never returns, as it would not in a plain program).
- Actors: ``_local_actors``.

Not there: placement groups (``placement_group()`` raises NotImplementedError, saying
why).  Not there by nature: process isolation (a crash, ``os._exit`` or a segfault in a task ends
the program), parallelism, ``max_calls``, worker and actor pids other than the driver's.
Calls made from several threads of the driver run at once, each in its thread; what
``get_runtime_context()`` says of the actor is right for one of them at a time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

from . import _events, _local_state, _pickling, _protocol as P, _resources, exceptions
from ._context import Call, current_call, current_task
from ._ids import object_id_for_put, object_id_for_return
from ._local_actors import CALL_FAILURES, STOPS_THE_PROGRAM, LocalActors
from ._object_ref import ObjectRef
from ._object_ref_generator import ObjectRefGenerator
from ._runtime import INLINE_THRESHOLD
from ._serialization import META_ERROR, deserialize_inline, serialize
from ._task_results import (
    apply_env,
    arguments,
    dynamic_items,
    flush_output,
    items_of,
    should_retry,
    split_returns,
    task_error,
)


class LocalRuntime:
    """A session whose every call runs in this process, now."""

    inline_threshold = INLINE_THRESHOLD  # large arguments are put first, as in a session
    local_mode = True

    def __init__(self, options: dict, session_dir: str):
        self.options = options
        self.total = options["total"]
        self.session_dir = session_dir
        self.socket_dir = None
        self.forked_from: Optional[int] = None
        self.objects: Dict[bytes, tuple] = {}  # id -> (data, metadata, contained ids)
        self.counts: Dict[bytes, int] = {}     # id -> live refs (and holds) to it here
        self.releases: collections.deque = collections.deque()  # from ObjectRef.__del__
        self.kept: set = set()           # refs the user pickled: held for the session
        self.actor_calls: set = set()    # task ids of actor calls whose results live
        self.held: List[dict] = []       # resources of the calls running (nested)
        self.stream_counts: Dict[bytes, int] = {}  # streaming task -> items it yielded
        self._code: dict = {}            # function or class id -> its pickle's maker
        self._loaded: dict = {}          # ... -> the function or class, unpickled once
        self._lock = threading.RLock()   # bookkeeping only: never held around user code
        self.actors = LocalActors(self)
        self.closed = False

    # -- refs and objects ------------------------------------------------------------------

    def add_local_ref(self, object_id: bytes, announce: bool = True) -> None:
        with self._lock:
            self.counts[object_id] = self.counts.get(object_id, 0) + 1

    def add_owned_ref(self, object_id: bytes) -> ObjectRef:
        self.add_local_ref(object_id)
        return ObjectRef.counted(object_id, self)

    def release_later(self, object_id: bytes) -> None:
        self.releases.append(object_id)  # from __del__, anywhere: see ObjectRef

    def drain(self) -> None:
        """Apply the releases ObjectRef.__del__ queued; objects and actors with no ref left
        go (an actor's ``__ray_shutdown__`` runs outside the lock)."""
        ended = []
        with self._lock:
            while self.releases:
                object_id = self.releases.popleft()
                count = self.counts.get(object_id, 0) - 1
                if count > 0:
                    self.counts[object_id] = count
                    continue
                self.counts.pop(object_id, None)
                entry = self.objects.pop(object_id, None)
                if entry is not None:
                    self.releases.extend(entry[2])  # what its value held
                self.actor_calls.discard(object_id[:24])
                if object_id in self.actors.table:
                    ended.append(object_id)
        for actor_id in ended:
            self.actors.handles_gone(actor_id)

    def num_local_refs(self) -> int:
        self.drain()
        return len(self.counts)

    def settle(self) -> None:
        self.drain()

    def exported(self, object_id: bytes) -> None:
        """A ref pickled by the user (not into a value of ours, whose container holds it):
        its object lives as long as the session, as in Ray."""
        if _pickling.in_own_pickle() or object_id in self.kept:
            return
        self.kept.add(object_id)
        self.add_local_ref(object_id)

    def put(self, value) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError(
                "calling put() on an ObjectRef is not allowed (as in Ray): pass the ref itself "
                "where it is needed, or wrap it in a list, put([ref]), to store a reference to it"
            )
        self.drain()
        object_id = object_id_for_put()
        self.store(object_id, serialize(value))
        return ObjectRef.counted(object_id, self)  # store() counted it for the caller

    def store(self, object_id: bytes, serialized) -> None:
        """Keep an object's bytes, holding the refs inside it; counts one ref for the
        caller."""
        data = serialized.to_bytes()
        with self._lock:
            for inner in serialized.contained_refs:
                self.counts[inner] = self.counts.get(inner, 0) + 1
            self.objects[object_id] = (data, serialized.metadata,
                                       tuple(serialized.contained_refs))
            self.counts[object_id] = self.counts.get(object_id, 0) + 1

    def store_error(self, object_ids: Sequence[bytes], error) -> None:
        """Make each of ``object_ids`` raise ``error`` (what they held before goes)."""
        serialized = serialize(error, META_ERROR)
        for object_id in object_ids:
            with self._lock:
                previous = self.objects.pop(object_id, None)
                if previous is not None:
                    self.releases.extend(previous[2])
                    self.counts[object_id] -= 1
            self.store(object_id, serialized)

    def value_at(self, object_id: bytes, location=None):
        entry = self.objects.get(object_id)
        if entry is None:
            raise exceptions.ObjectLostError(
                f"object {object_id.hex()} is not in the object store any more")
        value = deserialize_inline(entry[0])
        if entry[1] == META_ERROR:
            if isinstance(value, exceptions.RayTaskError):
                raise value.as_instanceof_cause()
            raise value
        return value

    def get_values(self, refs: Sequence[ObjectRef], timeout: Optional[float]) -> list:
        self.drain()
        for ref in refs:  # the first failed one raises, as in a session: all are known
            entry = self.objects.get(ref.binary())
            if entry is not None and entry[1] == META_ERROR:
                self.value_at(ref.binary())
        return [self.value_at(ref.binary()) for ref in refs]

    def wait(self, refs: Sequence, num_returns: int, timeout: Optional[float]):
        """Everything is ready: the first ``num_returns``, in input order."""
        self.drain()
        return list(refs[:num_returns]), list(refs[num_returns:])

    def wait_streams(self, items: Sequence, streams: dict, num_returns: int,
                     timeout: Optional[float]):
        return self.wait(items, num_returns, timeout)

    def still_pending(self, ids) -> set:
        return set()

    def future_of(self, ref: ObjectRef) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(self.get_values([ref], None)[0])
        except Exception as exc:
            future.set_exception(exc)
        return future

    async def await_ref(self, ref: ObjectRef):
        return self.get_values([ref], None)[0]

    # -- tasks -----------------------------------------------------------------------------

    def check_feasible(self, demand: dict, what: str, actor: bool = False) -> None:
        _resources.check_feasible(demand, self.total, what, actor)

    def ensure_function(self, fn_id: bytes, pickled_fn, name: str) -> None:
        self._code.setdefault(fn_id, pickled_fn)

    def loaded(self, fn_id: bytes):
        """The function or class as a worker would run it: unpickled once."""
        found = self._loaded.get(fn_id)
        if found is None:
            found = self._loaded[fn_id] = _pickling.loads(self._code[fn_id]())
        return found

    def submit(self, spec: tuple, return_ids: Sequence[bytes]) -> List[ObjectRef]:
        """Run a task now; its results' refs."""
        self.check_feasible(spec[P.SPEC_RESOURCES], f"task {spec[P.SPEC_NAME]}()")
        self.drain()
        function = self.loaded(spec[P.SPEC_FN_ID])
        extra = spec[P.SPEC_EXTRA] or {}
        call = Call(spec[P.SPEC_TASK_ID], spec[P.SPEC_NAME], function,
                    extra.get("resources") or P.LEASE_SHAPE)
        self.run(spec, return_ids, function, lambda: self.running(call, None),
                 spec[P.SPEC_RETRY_EXCEPTIONS])
        return [ObjectRef.counted(object_id, self) for object_id in return_ids]

    def run(self, spec: tuple, return_ids: Sequence[bytes], invoke, context,
            retry_exceptions, exited=None) -> None:
        """Run a task or actor call to its end and store its results (or its error) under
        ``return_ids``, each counted once for the caller's ref.  ``invoke(*args, **kwargs)``
        runs it; ``context()`` is entered around it.  ``sys.exit()`` in it ends no process
        here, but is reported as a session reports the process ending: ``exited(exc)`` says
        what an actor's call raises; a task's worker "crashed" (retried while it may)."""
        task_id, name = spec[P.SPEC_TASK_ID], spec[P.SPEC_NAME]
        num_returns = spec[P.SPEC_NUM_RETURNS]
        kind = _events.ACTOR_TASK if task_id in self.actor_calls else _events.NORMAL_TASK
        began = _events.started(task_id, name, kind)
        failure = (0, None)
        failed = self.failed_argument(spec[P.SPEC_ARG_IDS])
        if failed is not None:  # the call's own error around its argument's, as a session's
            data = self.objects[failed][0]
            self.store_error(return_ids, exceptions.FailedArgument(name, bytes(data)))
            _events.ended(task_id, name, began, kind, error=_events.TASK_EXECUTION_EXCEPTION)
            return
        retries = spec[P.SPEC_MAX_RETRIES]
        env_vars = (spec[P.SPEC_EXTRA] or {}).get("env_vars")
        restore = apply_env(env_vars) if env_vars else None
        try:
            while True:
                try:
                    with context():
                        args, kwargs = arguments(self, spec[P.SPEC_ARGS],
                                                 spec[P.SPEC_ARG_IDS], {})
                        outcome = invoke(*args, **kwargs)
                        del args, kwargs
                        if num_returns < 0:
                            outcome = self._generate(task_id, outcome, num_returns, name)
                        # a generator's one return: its count, or its refs (dynamic)
                        values = split_returns(outcome, num_returns if num_returns >= 0
                                               else 1, name)
                        serialized = [serialize(value) for value in values]
                        del outcome, values
                except STOPS_THE_PROGRAM:
                    raise
                except SystemExit as exc:
                    if exited is None and retries != 0:
                        retries -= 1
                        continue
                    self.store_error(return_ids, exited(exc) if exited is not None
                                     else _worker_exited(name, spec, exc))
                    failure = (_events.WORKER_DIED, _events.error_message(exc))
                    return
                except CALL_FAILURES as exc:
                    if retries != 0 and should_retry(exc, retry_exceptions):
                        retries -= 1
                        continue
                    self.store_error(return_ids, task_error(name, exc))
                    failure = (_events.error_code(exc), _events.error_message(exc))
                    return
                for object_id, value in zip(return_ids, serialized):
                    self.store(object_id, value)
                return
        finally:
            _events.ended(task_id, name, began, kind, error=failure[0], message=failure[1])
            flush_output()
            if restore is not None:
                restore()

    def failed_argument(self, arg_ids) -> Optional[bytes]:
        for object_id in arg_ids:
            entry = self.objects.get(object_id)
            if entry is not None and entry[1] == META_ERROR:
                return object_id
        return None

    def share(self, object_id: bytes, source_id: bytes) -> None:
        """``object_id`` holds what ``source_id`` holds (an error passed on)."""
        data, metadata, contained = self.objects[source_id]
        with self._lock:
            for inner in contained:
                self.counts[inner] = self.counts.get(inner, 0) + 1
            self.objects[object_id] = (data, metadata, contained)
            self.counts[object_id] = self.counts.get(object_id, 0) + 1

    def _generate(self, task_id: bytes, outcome, num_returns: int, name: str):
        """A generator's items: a dynamic one's refs, or a streaming one's count (item
        ``i`` stored as return ``i + 1``, held for the ``LocalRefGenerator``)."""
        items = items_of(outcome, name)
        if num_returns == P.DYNAMIC:
            return dynamic_items(self, items)
        count = 0
        try:
            for value in items:
                self.store(object_id_for_return(task_id, count + 1), serialize(value))
                count += 1
        finally:
            self.stream_counts[task_id] = count  # the items before an error stay
        return count

    def generator(self, completion: ObjectRef, task_id: bytes) -> "LocalRefGenerator":
        return LocalRefGenerator(completion, self, self.stream_counts.pop(task_id, 0))

    @contextmanager
    def running(self, call: Call, actor):
        """What ``get_runtime_context()`` and ``exit_actor()`` see during a call (a task's,
        or ``actor``'s), put back as it was afterwards: calls nest here."""
        token = current_call.set(call)
        task = current_task
        saved = (task.task_id, task.actor_id, task.actor_options, task.actor_class,
                 task.restarted, task.in_asyncio_actor, task.exit_requested, task.gpu_ids)
        task.task_id = call.task_id if actor is None else None
        task.actor_id = actor.actor_id if actor is not None else None
        task.actor_options = actor.options if actor is not None else None
        task.actor_class = actor.cls if actor is not None else None
        task.restarted = actor.restarted if actor is not None else False
        task.in_asyncio_actor = actor.is_async if actor is not None else False
        task.exit_requested = False
        # get_gpu_ids(): the session's first GPUs, as many as the call holds (one call runs
        # at a time); CUDA_VISIBLE_DEVICES is the driver's own.
        gpus = call.resources.get("GPU", 0)
        task.gpu_ids = tuple(self.options.get("gpu_ids", ())[:math.ceil(gpus)]) if gpus else ()
        self.held.append(call.resources)
        try:
            yield
        finally:
            self.held.pop()
            if actor is not None and task.exit_requested:
                actor.exit_requested = True
            (task.task_id, task.actor_id, task.actor_options, task.actor_class,
             task.restarted, task.in_asyncio_actor, task.exit_requested, task.gpu_ids) = saved
            current_call.reset(token)

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        """Every task has finished by the time its ref exists: nothing to stop."""
        if force and ref.task_id() in self.actor_calls:
            raise ValueError(
                "force=True is not supported for actor calls (as in Ray): use kill() on the actor"
            )

    # -- actors ----------------------------------------------------------------------------

    def create_actor(self, spec: tuple, wait: bool):
        self.drain()
        return self.actors.create(spec)

    def call_actor(self, actor_id: bytes, spec: tuple, return_ids, direct_ok: bool,
                   ordered: bool = True) -> List[ObjectRef]:
        self.drain()
        self.actor_calls.add(spec[P.SPEC_TASK_ID])
        self.actors.call(actor_id, spec, return_ids)
        return [ObjectRef.counted(object_id, self) for object_id in return_ids]

    def kill_actor(self, actor_id: bytes, no_restart: bool) -> None:
        self.drain()
        self.actors.kill(actor_id, no_restart)

    # -- the rest of the Runtime's face ----------------------------------------------------

    def publish(self, ids) -> None:
        """Nobody else needs to hear of an object."""

    def send(self, message: tuple) -> None:
        """What the API sends a scheduler itself: only placement groups do, and local mode
        has none to reserve (its calls run one at a time and take nothing)."""
        raise NotImplementedError(_NO_PLACEMENT_GROUPS)

    def request(self, make_message, *fields):
        raise NotImplementedError(_NO_PLACEMENT_GROUPS)  # placement groups' too

    def send_owning(self, message: tuple, return_ids):
        raise NotImplementedError(_NO_PLACEMENT_GROUPS)  # placement groups' too

    def flush(self) -> None:
        """Nothing is ever waiting to be sent."""

    def poke(self) -> None:
        """From ActorHandle.__del__, anywhere: the next call of the runtime drains."""

    def return_idle_leases(self) -> None:
        """No worker is leased."""

    def query(self, what):
        """What a session's scheduler would answer."""
        self.drain()
        if what == "resources":
            return dict(self.total)
        if what == "available":
            available = dict(self.total)
            for resources in self.held:
                for name, amount in resources.items():
                    available[name] = available.get(name, 0.0) - amount
            return available
        if what == "objects":
            return len(self.objects)
        if what == "workers":
            return []
        if what == "registered_calls":
            return 0
        if what == "placement_groups":
            return {}
        if isinstance(what, tuple) and what[0] == "state":
            return _local_state.answer(self, what[1])
        return self.actors.query(what)

    def forget_after_fork(self, parent_pid: int) -> None:
        """A forked child: the session is the parent's (nothing of it is shared)."""
        self.forked_from = parent_pid
        self.closed = True

    def close(self) -> None:
        """The session's end: live actors end gracefully (``__ray_shutdown__``)."""
        self.drain()
        self.actors.end_all()
        self.closed = True
        with self._lock:
            self.objects.clear()
            self.counts.clear()
            self.releases.clear()


class LocalRefGenerator(ObjectRefGenerator):
    """What a streaming generator task returns in local mode: its items are all there.
    Each item is held for the generator until ``next()`` hands it out."""

    def __init__(self, completion: ObjectRef, runtime: LocalRuntime, count: int):
        super().__init__(completion, runtime, None)
        self._count = count
        self._taken = 0
        self._error_given = False

    def _failed(self) -> bool:
        entry = self._runtime.objects.get(self._completion.binary())
        return entry is not None and entry[1] == META_ERROR

    def __next__(self) -> ObjectRef:
        if self._taken < self._count:
            self._taken += 1
            item_id = object_id_for_return(self._completion.task_id(), self._taken)
            return ObjectRef.counted(item_id, self._runtime)  # the generator's hold, given
        if self._failed() and not self._error_given:
            self._error_given = True
            return self._runtime.add_owned_ref(self._completion.binary())
        raise StopIteration

    async def __anext__(self) -> ObjectRef:
        try:
            return self.__next__()
        except StopIteration:
            raise StopAsyncIteration from None

    def next_ready(self) -> bool:
        return True

    def is_finished(self) -> bool:
        return self._taken >= self._count and (self._error_given or not self._failed())

    def task_id(self) -> bytes:
        return self._completion.task_id()

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._completion.task_id().hex()})"

    def __del__(self):
        runtime = getattr(self, "_runtime", None)
        if runtime is None:
            return
        task_id = self._completion.task_id()
        while self._taken < self._count:  # items never handed out go
            self._taken += 1
            runtime.release_later(object_id_for_return(task_id, self._taken))


_NO_PLACEMENT_GROUPS = (
    "placement groups are not available in local mode: nothing runs in parallel there, so "
    "there is nothing to reserve. Start shmray without local_mode=True to use them, or leave "
    "the placement group out while you debug")


def _worker_exited(name: str, spec: tuple, exc: SystemExit) -> exceptions.WorkerCrashedError:
    return exceptions.WorkerCrashedError(
        f"the worker running {name}() exited: sys.exit({exc.code!r}) (in local mode that "
        "worker is the driver, which lives on). It was retried "
        f"{spec[P.SPEC_MAX_RETRIES]} time(s) (max_retries).")
