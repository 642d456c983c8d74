"""``@shmray.remote`` on a class: actors, their handles and their methods.

Runs in: any process that creates or calls actors (driver, workers, other actors).

- ``Cls.remote(*args)`` asks the scheduler to fork a dedicated process that runs ``__init__``
  and then the calls sent to it.  It returns at once with a handle; only a named actor waits
  for the scheduler's answer, so a taken name raises ValueError on the line that asked for it.
- A handle counts as a reference to the actor: it holds an ObjectRef to a pseudo-object whose
  id is the actor's id, so handles kept in variables, sent to tasks, stored inside objects or
  held by other actors keep the actor alive through the same reference counting as objects,
  and the actor ends once none is left (unless it is detached), as in Ray.
- A call is a task addressed to the actor: same argument rules (top-level refs resolved,
  nested refs kept), same results and errors, and each caller's calls run in the order it
  made them, whichever way they travel.

Where the mailbox lives (DESIGN.md asks to measure before choosing).  Routing every call
through the scheduler (caller -> scheduler -> actor -> scheduler -> caller) gave one ordering
point but four hops: ~5k synchronous calls/s against ~12k for a process serving a Pipe.  So a
call whose arguments hold no ref goes straight to the actor's own socket and its result
straight back (``_direct``: two hops), owned by its caller, which tells the scheduler of it
only when it must (``_runtime.channels``); only calls with ref arguments, which may have to
wait for them, go through the scheduler.  The actor's mailbox is therefore its sockets: the
scheduler's connection and one connection per calling process.  (Figures: README.)
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict, Optional

from . import (_context, _options, _pickling, _placement_group, _protocol as P, _ray_backend,
               exceptions)
from ._context import current_task
from ._ids import new_task_id, object_id_for_put
from ._object_ref import ObjectRef, stale_session_error
from ._session import current
from ._task_spec import (actor_spec, check_call, check_parameters, pack_arguments,
                         parameters_of, return_ids, task_spec)
from .dag import ClassMethodNode, ClassNode

_SPECIAL_METHODS = ("__ray_ready__", "__ray_terminate__")


def method(*args, **options):
    """``@shmray.method(num_returns=2)``: options for one actor method (Ray's ``ray.method``)."""
    if args:
        raise TypeError("method() takes keyword options only: @shmray.method(num_returns=2)")
    _check_method_options(options)

    def decorate(function):
        function.__shmray_method_options__ = options
        return function

    return decorate


def _method_table(cls) -> Dict[str, dict]:
    """name -> {"num_returns": n, "is_async": bool} for every public-callable method."""
    table = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("__") and name not in ("__call__",):
            continue
        if not callable(member):
            continue
        function = member.__func__ if hasattr(member, "__func__") else member
        opts = getattr(function, "__shmray_method_options__", {})
        # A bound classmethod has no ``cls`` left to skip; a staticmethod has no ``self``.
        plain = not isinstance(inspect.getattr_static(cls, name, None),
                               (staticmethod, classmethod))
        generator = (inspect.isgeneratorfunction(function)
                     or inspect.isasyncgenfunction(function))
        table[name] = {
            "num_returns": opts.get("num_returns", "streaming" if generator else 1),
            "is_async": inspect.iscoroutinefunction(function)
            or inspect.isasyncgenfunction(function),
            "backpressure": opts.get("_generator_backpressure_num_objects"),
            "group": opts.get("concurrency_group"),
            "max_task_retries": opts.get("max_task_retries"),
            "retry_exceptions": _options.retry_exceptions_field(
                opts.get("retry_exceptions", False)),
            # so that every handle checks a call's arguments, wherever it was unpickled
            "parameters": parameters_of(member, skip_self=plain),
        }
    for name in _SPECIAL_METHODS:
        table[name] = {"num_returns": 1, "is_async": False, "group": None}
    return table


class ActorClassInheritanceException(TypeError):
    """A class tried to derive from an actor class (Ray's exception, in ``ray.actor``)."""


class ActorClass:
    """A class turned into an actor factory by ``@shmray.remote``."""

    def __init__(self, cls, options: Dict[str, Any]):
        self._cls = cls
        self._name = cls.__name__
        self._options = {**_options.ACTOR_DEFAULTS,
                         **_options.check(options, _options.ACTOR_DEFAULTS, "actors")}
        self._class_id = os.urandom(16)
        self._pickled = None
        self._methods = _method_table(cls)
        self._is_async = any(m["is_async"] for m in self._methods.values())
        groups = self._options["concurrency_groups"] or {}
        for name, method in self._methods.items():  # a typo here would surface at a call
            if method["group"] is not None and method["group"] not in groups:
                raise ValueError(
                    f"method {cls.__name__}.{name} is in concurrency group "
                    f"{method['group']!r}, which the class does not declare (its groups: "
                    f"{sorted(groups) or 'none'})")
        self.__doc__ = cls.__doc__
        self.__name__ = self._name
        self.__qualname__ = cls.__qualname__
        self.__module__ = cls.__module__

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"actors cannot be instantiated directly: instead of {self._name}(), "
            f"call {self._name}.remote()"
        )

    def __getattr__(self, name: str):
        # The user's class, through its MRO: class attributes, static and class methods (as
        # in Ray, whose actor class derives from the user's).
        cls = self.__dict__.get("_cls")
        if cls is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return getattr(cls, name)

    def __dir__(self):
        return sorted(set(object.__dir__(self)) | set(dir(self._cls)))

    def __mro_entries__(self, bases):
        raise ActorClassInheritanceException(
            f"class {self._name} is an actor class, and actor classes can't be subclassed (as "
            "in Ray): subclass the plain class, and make the subclass an actor with @remote"
        )

    def __reduce__(self):
        user = {k: v for k, v in self._options.items() if _options.ACTOR_DEFAULTS.get(k) != v}
        return _rebuild_class, (self._cls, user, self._class_id)

    def remote(self, *args, **kwargs) -> "ActorHandle":
        return self._create(args, kwargs, self._options)

    def bind(self, *args, **kwargs) -> ClassNode:
        """This actor, recorded in a graph (``shmray.dag``), made by ``execute()``."""
        return ClassNode(self, args, kwargs, {})

    def options(self, **options):
        merged = {**self._options,
                  **_options.check(options, _options.ACTOR_DEFAULTS, "actors", in_options=True)}
        parent = self

        class _Bound:
            def remote(self, *args, **kwargs):
                return parent._create(args, kwargs, merged)

            def bind(self, *args, **kwargs) -> ClassNode:
                return ClassNode(parent, args, kwargs, options)

        return _Bound()

    def _code(self) -> bytes:
        if self._pickled is None:
            self._pickled = _pickling.dumps(self._cls)
        return self._pickled

    def _create(self, args, kwargs, options) -> "ActorHandle":
        if self._cls.__init__ is not object.__init__:
            check_call(self._cls.__init__, self._name, args, kwargs, skip_self=True)
        if _context.runtime is None and _ray_backend.ray is not None:  # the session is Ray's
            ours = {k: v for k, v in self._options.items() if _options.ACTOR_DEFAULTS.get(k) != v}
            these = {k: v for k, v in options.items() if self._options.get(k) != v}
            return _ray_backend.call(_ray_backend.actor_class(self, ours), these, args, kwargs)
        runtime = current()
        max_concurrency = options["max_concurrency"]
        if max_concurrency is None:
            max_concurrency = 1000 if self._is_async else 1  # Ray's defaults
        num_cpus = options["num_cpus"]
        hold = _options.task_resources({**options, "num_cpus": num_cpus or 0})
        place = dict(hold) if num_cpus is not None else {**hold, "CPU": 1.0}
        runtime.check_feasible(place, f"actor {self._name}", actor=True)
        placement, capturable = _placement_group.resolve(options, place, f"actor {self._name}",
                                                         actor=True)
        if capturable and current_task.placement is not None and current_task.placement[2]:
            placement = _placement_group.captured(current_task.placement, place,
                                                  f"actor {self._name}", actor=True)
        namespace = options["namespace"] or runtime.options.get("namespace", "default")
        actor_options = {
            "is_async": self._is_async,
            "max_concurrency": max_concurrency,
            "max_restarts": options["max_restarts"],
            "max_task_retries": options["max_task_retries"],
            "max_pending_calls": options["max_pending_calls"],
            "place": place,
            "hold": hold,
            "name": options["name"],
            "namespace": namespace,
            "detached": (options["lifetime"]
                         or runtime.options.get("default_actor_lifetime")) == "detached",
            "get_if_exists": options["get_if_exists"],
            "methods": self._methods,
            "class_name": self._name,
            # __ray_shutdown__ runs when the session ends, too (``Scheduler.stop``)
            "shutdown_hook": hasattr(self._cls, "__ray_shutdown__"),
            "env_vars": _options.env_vars(options),  # for the actor's whole life
            "concurrency_groups": dict(options["concurrency_groups"] or {}),
            # Only a sync actor keeps each caller's order; a threaded or async one runs a
            # call whose arguments are ready before earlier ones still waiting (as in Ray).
            "ordered": (not self._is_async and max_concurrency == 1
                        and not options["concurrency_groups"]),
            "placement": placement,  # (pg id, bundle index, capture) or None
        }
        runtime.ensure_function(self._class_id, self._code, self._name)
        actor_id = object_id_for_put()
        args_blob, arg_ids, contained, temporaries = pack_arguments(runtime, args, kwargs,
                                                                    self._cls, "__init__")
        spec = actor_spec(actor_id, self._class_id, self._name, args_blob, arg_ids, contained,
                          actor_options)
        ref, actor_options = runtime.create_actor(spec, wait=options["name"] is not None)
        del temporaries
        return ActorHandle(ref, actor_options)


def _rebuild_class(cls, options, class_id) -> ActorClass:
    actor_class = ActorClass(cls, options)
    actor_class._class_id = class_id
    return actor_class


class ActorHandle:
    """A handle to an actor: call its methods with ``handle.method.remote(...)``."""

    def __init__(self, ref: ObjectRef, actor_options: dict):
        self._ref = ref
        self._actor_options = actor_options
        self._methods = actor_options["methods"]
        self._class_name = actor_options["class_name"]
        self._pending: set = set()  # our calls' results not yet seen ready (max_pending_calls)
        self._plans: Dict[str, tuple] = {}  # method name -> what its calls share (``_plan``)

    @property
    def _actor_id(self) -> bytes:
        return self._ref.binary()

    def __getattr__(self, name: str) -> "ActorMethod":
        methods = self.__dict__.get("_methods")
        if methods is None or name not in methods:
            raise AttributeError(
                f"actor {self.__dict__.get('_class_name', '?')} has no method {name!r}"
            )
        return ActorMethod(self, name, methods[name])

    def __reduce__(self):
        return ActorHandle, (self._ref, self._actor_options)

    def __del__(self):
        # The handle's ref goes now, and the flusher sends its release at once: an actor
        # whose last handle is dropped ends promptly, even while this process idles.
        ref = self.__dict__.pop("_ref", None)
        runtime = getattr(ref, "_tracker", None)
        del ref
        if runtime is not None:
            runtime.poke()

    def __repr__(self) -> str:
        return f"Actor({self._class_name}, {self._actor_id.hex()})"

    def _check_session(self) -> None:
        """Raise if this handle's session is not this process's: its actor is gone."""
        tracker = self._ref._tracker
        if tracker is None or tracker is not _context.runtime:
            raise stale_session_error(
                tracker, f"Actor handle {self!r}", "",
                "its actor is gone (actor handles can't outlive shmray.shutdown(): create "
                "the actor again in this session)")

    def __hash__(self) -> int:
        return hash(self._actor_id)

    def __eq__(self, other) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def _call(self, method_name: str, args, kwargs, how: dict):
        """Call a method; ``how``: its num_returns, backpressure and concurrency group."""
        if self._ref._tracker is not _context.runtime:
            self._check_session()
        runtime = current()
        plan = self._plans.get(method_name)
        if plan is None or plan[0] is not how:
            plan = self._plans[method_name] = self._plan(method_name, how)
        _, name, num_returns, retries, extra, limit, direct, ordered = plan
        if limit:
            self._pending = runtime.still_pending(self._pending)
            if len(self._pending) >= limit:
                raise exceptions.PendingCallsLimitExceeded(
                    f"actor {self._class_name} has {len(self._pending)} calls pending from this "
                    f"handle, its max_pending_calls; get() some results before calling again"
                )
        task_id = new_task_id()
        args_blob, arg_ids, contained, temporaries = pack_arguments(runtime, args, kwargs,
                                                                    self._class_name, method_name)
        spec = task_spec(task_id, method_name, name, args_blob, arg_ids, contained,
                         num_returns, {}, retries, False, dict(extra) if extra else None)
        results = return_ids(task_id, num_returns)
        refs = runtime.call_actor(self._actor_id, spec, results,
                                  direct_ok=direct and not arg_ids and not contained,
                                  ordered=ordered)
        del temporaries
        if limit:
            self._pending.update(results)
        if num_returns == 1 or num_returns == P.DYNAMIC:
            return refs[0]
        if num_returns == P.STREAMING:
            return runtime.generator(refs[0], task_id)
        return refs if num_returns else None

    def _plan(self, method_name: str, how: dict) -> tuple:
        """What every call of a method through this handle shares (with ``how`` as it was
        worked out for), worked out once rather than at every call."""
        options = self._actor_options
        retries = how.get("max_task_retries")
        if retries is None:  # the method's, else the actor's (Ray's order)
            retries = options.get("max_task_retries", 0)
        num_returns = _options.num_returns_code(how["num_returns"])
        extra = {}
        if how.get("backpressure") and how["backpressure"] > 0:
            extra["backpressure"] = how["backpressure"]
        if how.get("group") is not None:
            extra["group"] = how["group"]
        if how.get("retry_exceptions"):
            extra["retry_exceptions"] = how["retry_exceptions"]
        limit = options.get("max_pending_calls", -1)
        # A generator's items go through the scheduler (it holds them for us as they come).
        return (how, f"{self._class_name}.{method_name}", num_returns, retries,
                extra or None, limit if limit is not None and limit > 0 else 0,
                num_returns >= 0, options.get("ordered", True))


class ActorMethod:
    """``handle.method``: call it with ``.remote()``."""

    def __init__(self, handle: ActorHandle, name: str, how: dict):
        self._handle = handle
        self._name = name
        self._how = how  # num_returns, backpressure, concurrency group

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"actor methods cannot be called directly: instead of {self._name}(), "
            f"call {self._name}.remote()"
        )

    def remote(self, *args, **kwargs):
        parameters = self._how.get("parameters")
        if parameters is not None:
            check_parameters(parameters, f"{self._handle._class_name}.{self._name}", args,
                             kwargs)
        return self._handle._call(self._name, args, kwargs, self._how)

    def bind(self, *args, **kwargs) -> ClassMethodNode:
        """This call, recorded in a graph (``shmray.dag``), made by ``execute()``."""
        return ClassMethodNode(self._handle, self._name, args, kwargs, {}, method=self)

    def options(self, **options):
        _check_method_options(options)
        how = dict(self._how)
        for option, key in _METHOD_OPTIONS.items():
            if option in options:
                how[key] = options[option]
        if "retry_exceptions" in options:
            how["retry_exceptions"] = _options.retry_exceptions_field(options["retry_exceptions"])
        _check_group(how.get("group"), self._handle._actor_options)
        return ActorMethod(self._handle, self._name, how)


# An actor method's options (``@method``, ``.options``) -> where a call's ``how`` keeps them.
_METHOD_OPTIONS = {"num_returns": "num_returns", "concurrency_group": "group",
                   "max_task_retries": "max_task_retries",
                   "retry_exceptions": "retry_exceptions",
                   "_generator_backpressure_num_objects": "backpressure"}


def _check_method_options(options: dict) -> None:
    _options.check(options, _METHOD_DEFAULTS, "actor methods")


_METHOD_DEFAULTS = {option: None for option in (*_METHOD_OPTIONS, "name")}


def _check_group(group, actor_options: dict) -> None:
    groups = actor_options.get("concurrency_groups") or {}
    if group is not None and group not in groups:
        raise ValueError(
            f"actor {actor_options['class_name']} has no concurrency group {group!r}; its "
            f"groups: {sorted(groups) or 'none'} (declare them with "
            "@remote(concurrency_groups={...}))"
        )


def get_actor(name: str, namespace: Optional[str] = None) -> ActorHandle:
    """The handle of the named actor; ValueError if there is none."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an actor name is a non-empty str, got {name!r}")
    _options.check_namespace(namespace)
    if _ray_backend.ray is not None:
        return _ray_backend.ray.get_actor(name, namespace=namespace)
    runtime = current()
    namespace = namespace or runtime.options.get("namespace", "default")
    found = runtime.query(("actor", name, namespace))
    if found is None:
        raise ValueError(f"Failed to look up actor with name '{name}' in namespace "
                         f"'{namespace}': there is no such actor (it never existed, or it died)")
    actor_id, actor_options = found
    return ActorHandle(ObjectRef(actor_id), actor_options)


def list_named_actors(all_namespaces: bool = False):
    """Names of the live named actors (in this namespace, or all as dicts)."""
    runtime = current()
    named = runtime.query("named_actors")
    if all_namespaces:
        return [{"name": name, "namespace": namespace} for namespace, name in named]
    namespace = runtime.options.get("namespace", "default")
    return [name for ns, name in named if ns == namespace]


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """Kill an actor at once (SIGKILL); its pending and later calls raise ActorDiedError.

    Returns once the actor's process is dead and the scheduler has failed what it owed (or,
    with ``no_restart=False`` and restarts left, begun its restart): a call made after
    kill() never reaches the old process (Ray lets a few through)."""
    if _ray_backend.ray is not None:
        return _ray_backend.ray.kill(actor, no_restart=no_restart)
    if not isinstance(actor, ActorHandle):
        raise ValueError(f"kill() takes an actor handle, got {type(actor).__name__}; "
                         "to stop a task use cancel()")
    actor._check_session()
    current().kill_actor(actor._actor_id, bool(no_restart))


def exit_actor() -> None:
    """End the actor this is called in, after the current call (Ray's ``exit_actor``): the
    caller sees the actor's death, calls not started fail, and ``__ray_shutdown__`` and the
    actor's atexit handlers run."""
    if current_task.actor_id is None:
        where = "a task" if current_task.task_id is not None else "the driver"
        raise TypeError(  # the phrase Ray's users match on
            f"exit_actor API is called on a non-actor worker ({where}); call it inside an "
            "actor method to end that actor gracefully")
    current_task.exit_requested = True  # the actor ends even if user code catches this
    if current_task.in_asyncio_actor:
        raise exceptions.AsyncioActorExit("exit_actor() was called")  # as Ray does
    raise _ActorExit()


class _ActorExit(SystemExit):
    """Raised by exit_actor(); the actor process catches it and ends."""
