"""Actors in local mode: each instance lives in the driver, and each call runs there, at its
``.remote()``, to its end.

Runs in: the driver of a local-mode session (``_local_mode``).

- Sync and threaded actors: a call runs in the thread that made it.  Calls run one after
  the other whatever ``max_concurrency`` and concurrency groups say; calls to a sync actor
  from several threads of the driver take turns, as its mailbox would make them.
- Async actors: the instance gets an event loop of its own when it is made; ``__init__``
  and every call run on it (so ``asyncio.Event`` and the like bind to it), to their end
  before ``.remote()`` returns.  A call made from code that runs on another loop (the
  driver's own asyncio code, another async actor's call) sets that loop aside meanwhile;
  a call to the actor from one of its own calls runs on a loop of its own.  Calls that
  wait for each other (one awaits an event a later call sets) can't both run: the first
  never ends, as in Ray's local mode; a call that waits with nothing left on its loop to
  wake it says so on stderr after ``STUCK_AFTER`` seconds.
- The end: ``exit_actor()``, ``__ray_terminate__``, the last handle gone or the session's
  end run ``__ray_shutdown__`` (the actor's atexit handlers are the driver's: they run when
  it exits); ``kill`` runs nothing, and with ``max_restarts`` left runs ``__init__`` again
  with the same arguments (``was_current_actor_reconstructed``).  Calls to an actor that
  has ended raise ``ActorDiedError``; an ``__init__`` that raised, or a failed argument,
  fails every call, as in a session.
- Names and namespaces as a session's scheduler keeps them (``get_actor``,
  ``get_if_exists``, ``list_named_actors``); a detached actor outlives its handles.
"""

from __future__ import annotations

import bdb
import contextlib
import inspect
import sys
import threading
from typing import Dict, Optional

from . import _protocol as P, exceptions
from ._actor_instance import bound_method, init_failed, run_shutdown_hook
from ._context import Call
from ._ids import new_task_id, object_id_for_put
from ._task_results import apply_env, arguments, flush_output

# What a call raises that is its failure, as a worker would report it: any exception,
# ``sys.exit()`` included, but not the user stopping the program (Ctrl-C, ``q`` in pdb),
# nor what a test harness raises to stop a test.
CALL_FAILURES = (Exception, SystemExit)
STOPS_THE_PROGRAM = (bdb.BdbQuit,)
_EXITED = "it exited intentionally (exit_actor() or __ray_terminate__)"  # the scheduler's words


class LocalActor:
    """One actor: its instance, its loop (async), and whether and how it ended."""

    def __init__(self, spec: tuple, cls):
        self.spec = spec
        self.actor_id = spec[P.ACTOR_ID]
        self.options = spec[P.ACTOR_OPTIONS]
        self.class_name = spec[P.ACTOR_CLASS_NAME]
        self.cls = cls
        self.is_async = self.options["is_async"]
        self.instance = None
        self.loop = None
        self.methods: dict = {}
        self.restarted = False
        self.restarts = 0
        self.exit_requested = False      # exit_actor() was called in a call
        self.death: Optional[bytes] = None  # the object every call's results share once dead
        one_at_a_time = (not self.is_async and self.options["max_concurrency"] == 1
                         and not self.options.get("concurrency_groups"))
        self.turns = threading.RLock() if one_at_a_time else contextlib.nullcontext()


class LocalActors:
    """The session's actors, by id, and the names of the named ones."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.table: Dict[bytes, LocalActor] = {}
        self.named: Dict[tuple, bytes] = {}  # (namespace, name) -> actor id

    def create(self, spec: tuple):
        """(the handle's ref, the actor's options); its ``__init__`` has run."""
        runtime = self.runtime
        options = spec[P.ACTOR_OPTIONS]
        name = options["name"]
        key = (options["namespace"], name)
        if name is not None and key in self.named:
            existing = self.table[self.named[key]]
            if options["get_if_exists"]:
                return runtime.add_owned_ref(existing.actor_id), existing.options
            raise ValueError(
                f"The name {name!r} (namespace={options['namespace']!r}) is already taken by "
                "a live actor; pick another name, or pass get_if_exists=True")
        actor = LocalActor(spec, runtime.loaded(spec[P.ACTOR_CLASS_ID]))
        self.table[actor.actor_id] = actor
        if name is not None:
            self.named[key] = actor.actor_id
        ref = runtime.add_owned_ref(actor.actor_id)
        if options["detached"]:
            runtime.add_local_ref(actor.actor_id)  # a detached actor outlives its handles
        self._construct(actor)
        return ref, options

    def _construct(self, actor: LocalActor) -> None:
        runtime, spec = self.runtime, actor.spec
        failed = runtime.failed_argument(spec[P.ACTOR_ARG_IDS])
        if failed is not None:  # its calls fail with the argument's error
            runtime.add_local_ref(failed)
            self._dead(actor, failed)
            return
        call = Call(new_task_id(), f"{actor.class_name}.__init__", "__init__",
                    actor.options["hold"])
        try:
            with self._context(actor, call):
                args, kwargs = arguments(runtime, spec[P.ACTOR_ARGS], spec[P.ACTOR_ARG_IDS], {})
                if actor.is_async:
                    import asyncio  # only for async actors: see _actor_async.run

                    actor.loop = asyncio.new_event_loop()
                    actor.instance = self._on_loop(actor, _construct(actor.cls, args, kwargs))
                else:
                    actor.instance = actor.cls(*args, **kwargs)
        except STOPS_THE_PROGRAM:
            raise
        except CALL_FAILURES as exc:
            self._dead(actor, self._error_object(init_failed(actor.class_name, exc)))
        finally:
            flush_output()

    def _error_object(self, error: BaseException) -> bytes:
        object_id = object_id_for_put()
        self.runtime.store_error([object_id], error)
        return object_id

    # -- calls -----------------------------------------------------------------------------

    def call(self, actor_id: bytes, spec: tuple, return_ids) -> None:
        """Run a call now; its results (or its error) are stored under ``return_ids``."""
        runtime = self.runtime
        actor = self.table[actor_id]
        if actor.death is not None:
            for object_id in return_ids:
                runtime.share(object_id, actor.death)
            return
        method = spec[P.SPEC_FN_ID]
        if method in ("__ray_ready__", "__ray_terminate__"):
            runtime.run(spec, return_ids, lambda: method == "__ray_ready__" or None,
                        contextlib.nullcontext, False)
            if method == "__ray_terminate__":
                self._end(actor, _EXITED)
            return
        call = Call(spec[P.SPEC_TASK_ID], spec[P.SPEC_NAME], method, actor.options["hold"])
        retry_exceptions = (spec[P.SPEC_EXTRA] or {}).get("retry_exceptions", False)
        with actor.turns:
            runtime.run(spec, return_ids,
                        lambda *args, **kwargs: self._invoke(actor, method, args, kwargs),
                        lambda: self._context(actor, call), retry_exceptions,
                        exited=lambda exc: self._exited(actor, exc))
        if actor.exit_requested:  # the caller sees the actor's death, as in Ray
            runtime.store_error(return_ids, exceptions.ActorDiedError(
                f"The actor {actor.class_name} exited: exit_actor() was called in this call"))
            self._end(actor, _EXITED)

    @contextlib.contextmanager
    def _context(self, actor: LocalActor, call: Call):
        env_vars = actor.options.get("env_vars")
        restore = apply_env(env_vars) if env_vars else None  # runtime_env, for each call
        try:
            with self.runtime.running(call, actor):
                yield
        finally:
            if restore is not None:
                restore()

    def _invoke(self, actor: LocalActor, name: str, args, kwargs):
        method = self._method(actor, name)
        if not actor.is_async:
            return method(*args, **kwargs)
        outcome = self._on_loop(actor, _call(method, args, kwargs))
        if inspect.isasyncgen(outcome):
            return self._async_items(actor, outcome)
        return outcome

    def _async_items(self, actor: LocalActor, items):
        """An async generator's items, each taken on the actor's loop."""
        while True:
            try:
                yield self._on_loop(actor, items.__anext__())
            except StopAsyncIteration:
                return

    @staticmethod
    def _method(actor: LocalActor, name: str):
        return bound_method(actor.instance, name, actor.methods)

    @staticmethod
    def _on_loop(actor: LocalActor, awaitable):
        """Run ``awaitable`` on the actor's loop to its end, setting aside the loop that
        runs here, if any (whose coroutine made this call)."""
        import asyncio  # only for async actors: see _actor_async.run

        loop, own = actor.loop, False
        if loop.is_running():  # the actor calls itself: its loop is busy with the caller
            loop, own = asyncio.new_event_loop(), True
        outer = asyncio._get_running_loop()
        asyncio._set_running_loop(None)
        watch = _StuckWatch(loop, actor.class_name)
        try:
            return loop.run_until_complete(awaitable)
        finally:
            watch.stop()
            asyncio._set_running_loop(outer)
            if own:
                loop.close()

    # -- the end ---------------------------------------------------------------------------

    def kill(self, actor_id: bytes, no_restart: bool) -> None:
        actor = self.table.get(actor_id)
        if actor is None or actor.death is not None:
            return
        limit = actor.options["max_restarts"]
        if not no_restart and (limit == -1 or actor.restarts < limit):
            actor.restarts += 1
            actor.restarted = True
            self._close_loop(actor)
            actor.instance, actor.methods = None, {}
            self._construct(actor)
            return
        self._end(actor, "it was killed by kill()", graceful=False)

    def handles_gone(self, actor_id: bytes) -> None:
        """No handle is left (nor is it detached): it ends, and is forgotten."""
        actor = self.table.pop(actor_id, None)
        if actor is None:
            return
        if actor.death is None:
            self._end(actor, "every handle to it went out of scope")
        self.runtime.release_later(actor.death)

    def _exited(self, actor: LocalActor, exc: SystemExit) -> BaseException:
        """What a call that ran ``sys.exit()`` raises: its actor's process would have ended,
        so the actor is dead (exit_actor() ends it gracefully in ``call``)."""
        if actor.exit_requested:
            return _died(actor, _EXITED)
        why = f"its process exited: sys.exit({exc.code!r}) was called in a call to it"
        self._end(actor, why, graceful=False)
        return _died(actor, why)

    def _end(self, actor: LocalActor, why: str, graceful: bool = True) -> None:
        self._dead(actor, self._error_object(_died(actor, why)))
        if graceful:
            self._shut_down(actor)
        self._close_loop(actor)
        actor.instance, actor.methods = None, {}

    def _dead(self, actor: LocalActor, death: bytes) -> None:
        actor.death = death
        key = (actor.options["namespace"], actor.options["name"])
        if self.named.get(key) == actor.actor_id:
            del self.named[key]

    def _shut_down(self, actor: LocalActor) -> None:
        run_shutdown_hook(actor.instance, actor.class_name, passes=STOPS_THE_PROGRAM)

    @staticmethod
    def _close_loop(actor: LocalActor) -> None:
        if actor.loop is not None and not actor.loop.is_running():
            actor.loop.close()
        actor.loop = None

    def end_all(self) -> None:
        """The session ends: every live actor ends gracefully."""
        for actor in list(self.table.values()):
            if actor.death is None:
                self._shut_down(actor)
            self._close_loop(actor)
        self.table.clear()
        self.named.clear()

    def query(self, what):
        """The scheduler's answers about actors (``get_actor``, ``list_named_actors``)."""
        if what == "named_actors":
            return sorted(self.named)
        if isinstance(what, tuple) and what[0] == "actor":
            actor = self.table.get(self.named.get((what[2], what[1])))
            return (actor.actor_id, actor.options) if actor is not None else None
        return None


STUCK_AFTER = 10.0  # seconds a call may wait on an idle loop before we say it may never end


class _StuckWatch:
    """Says so, once, if a call waits with nothing left on its loop to wake it (no callback
    ready, no timer, no file watched): it may wait for a call that can only start after it
    ends, and then never ends.  A thread could still wake it: so a warning, not an error."""

    def __init__(self, loop, class_name: str):
        self.loop = loop
        self.class_name = class_name
        self.timer = loop.call_later(STUCK_AFTER, self.look)

    def look(self) -> None:
        loop = self.loop
        ready, timers = getattr(loop, "_ready", None), getattr(loop, "_scheduled", None)
        selector = getattr(loop, "_selector", None)
        if ready is None or timers is None or selector is None:
            return  # not the loop we know: say nothing rather than something wrong
        # (a cancelled timer stays listed until the loop sweeps it; one reader is the
        # loop's own wake-up pipe)
        if ready or any(not t.cancelled() for t in timers) or len(selector.get_map()) > 1:
            self.timer = loop.call_later(STUCK_AFTER, self.look)
            return
        print(f"shmray (local mode): a call of actor {self.class_name} has waited "
              f"{STUCK_AFTER:g} s with nothing left on its event loop to wake it. It may be "
              "waiting for another call of the actor (an event it sets, a queue it fills), "
              "which can't start before this one ends: local mode runs an actor's calls one "
              "at a time. Run without local_mode=True to let them run at once.",
              file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.timer.cancel()


async def _construct(cls, args, kwargs):
    return cls(*args, **kwargs)


async def _call(method, args, kwargs):
    outcome = method(*args, **kwargs)
    if inspect.isawaitable(outcome):
        outcome = await outcome
    return outcome


def _died(actor: LocalActor, why: str) -> exceptions.ActorDiedError:
    return exceptions.ActorDiedError(
        f"The actor {actor.class_name} (id {actor.actor_id.hex()}) is dead: {why}. Calls to it "
        "raise this error.")
