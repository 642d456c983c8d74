"""Every message between shmray's processes, as data.

Runs in: every process.

A message is a plain tuple ``(OPCODE, field, ...)`` (see ``_connection`` for why not a class);
this module is the one place that says what each one carries, and the one place that builds
each: a constructor named after its kind (``release(ids)`` builds RELEASE), which
``tests/unit/test_layout.py`` checks nothing else bypasses.  Each process dispatches every
message it gets through one table: the scheduler's ``handlers[message[0]](connection,
*message[1:])`` (``_scheduler.loop``), a client's ``handlers[message[0]](*message[1:])``
(``_runtime.link``).

Objects travel as *locations*: ``(data, metadata)`` where ``data`` is the serialized value
(bytes) for a small object, or ``None`` for one sealed in the arena, which the reader maps
itself.  ``contained`` lists the ids of ObjectRefs pickled inside a value; whoever holds the
value holds those refs too.

Client (driver, worker, actor) -> scheduler
    REGISTER_FUNCTION  fn_id, pickled, name         a function's code, sent once per function
    SUBMIT             spec[, parent_id]             a task (TaskSpec tuple); the sender holds
                                                     its return refs; a leased worker names
                                                     the task it runs (its parent)
    PUT                object_id, data, metadata, contained
                                                     an object the sender made; it holds it
    HOLD               ids                           first local ref to each id
    RELEASE            ids                           last local ref to each id is gone
    ESCAPED            ids                           refs the sender pickled itself: it holds
                                                     their objects until it exits
    SUBSCRIBE          ids                           send READY for each id once it is ready
    BLOCKED            [task_id]                     a worker waits in get/wait: lend its CPU
                                                     (a leased worker names its task)
    HANDED_BACK        task_ids                      tasks sent ahead to a worker whose task
                                                     now waits in get/wait: not started, run
                                                     them elsewhere (they may be what it waits
                                                     for)
    UNBLOCKED          -                             ...and takes it back
    TASK_DONE          task_id, results, retryable, took
                                                     results: [(object_id, data, metadata,
                                                     contained)]; retryable: it raised an
                                                     exception its retry_exceptions covers;
                                                     took: its run time in seconds; results
                                                     None: sent ahead, it lacked an argument
                                                     (not run, send it again)
    QUERY              request_id, what              what: "resources", "available", "workers",
                                                     "ping" (a barrier), "objects" (how many
                                                     the directory has), "registered_calls"
                                                     (direct calls registered), "sent_ahead"
                                                     (tasks sent before their arguments were
                                                     ready, and those sent back unrun),
                                                     "named_actors",
                                                     ("actor", name, namespace),
                                                     "placement_groups" (their table),
                                                     ("placement_group", pg_id),
                                                     ("placement_group_named", name,
                                                     namespace), ("function",
                                                     fn_id) (its code, for a leased worker)
    CREATE_ACTOR       request_id, spec (ActorSpec)  the sender holds the new actor's handle;
                                                     a REPLY follows when request_id is not None
    ACTOR_CALL         actor_id, spec (TaskSpec)     a method call; fn_id is the method name
    LEASE_REQUEST      count                         lend me up to this many more workers, as
                                                     they become free (0: no more); it stands
                                                     until granted or replaced (drivers only)
    LEASE_RETURN       worker_pid, unanswered        done with that lease; unanswered: ids of
                                                     tasks sent on it whose results never came
                                                     (its channel ended), registered just
                                                     before; None: it could not be reached
                                                     (connect failed): replace it
    CALLER_DONE        task_id, delivered, actor_id  a registered task's (actor_id None) or
                                                     call's results as its callee sent them,
                                                     all usable at once (it reports the rest)
    LEASE_VERDICT      worker_pid                    answers LEASE_LOST: every result that
                                                     worker sent back has been reported
    LEASE_HANDED_BACK  worker_pid, task_ids          registered tasks that leased worker gave
                                                     back unstarted (HANDED_BACK): run them
    DIRECT_SUBMIT      worker_pid, spec              registers a task sent straight to a leased
                                                     worker; the sender holds its results.
                                                     Sent only when the scheduler needs to know
                                                     of it (``_runtime.leases``: ownership)
    DIRECT_CALL        actor_id, actor_pid, spec     registers a call sent straight to the actor
                                                     process actor_pid, as DIRECT_SUBMIT does a
                                                     task (``_runtime.channels``: ownership)
    CALLS_LOST         actor_id, actor_pid, task_ids the direct channel to that actor process
                                                     ended: these calls sent on it (registered
                                                     just before, in order) never answered
    KILL_ACTOR         request_id, actor_id, no_restart
                                                     SIGKILL the actor process; the REPLY
                                                     comes once its death is dealt with
    CANCEL             task_id, force, recursive     stop a task (or an actor call)
    CREATE_PLACEMENT_GROUP  pg_id, bundles, strategy, name, namespace, detached
                                                     reserve the bundles' resources as soon
                                                     as they are free (``_placement_group``)
    PLACEMENT_GROUP_READY  pg_id, object_id, value   make object_id (the sender holds it)
                                                     ready with value once the group is
                                                     created, or failed once it is removed
    REMOVE_PLACEMENT_GROUP request_id, pg_id         free its reservation, kill what runs in
                                                     it; the REPLY follows
    CONSUMED           task_id, count                the caller of a streaming task has taken
                                                     this many of its items (backpressure);
                                                     the scheduler passes it on to the
                                                     process running the task
Actor -> scheduler
    ACTOR_STARTED      error                         __init__ ran (error: None, or its RayTaskError
                                                     serialized)
    ACTOR_EXITING      -                             exit_actor() was called: don't restart
Worker or actor -> scheduler
    GENERATED          task_id, index, result        a streaming task yielded its index-th item:
                                                     result as TASK_DONE's; the item goes to the
                                                     task's owner, which holds it
Actor or leased worker -> scheduler
    DIRECT_DONE        task_id, results, caller_pid, retryable
                                                     a direct call's results (as TASK_DONE's);
                                                     those without refs inside are delivered
                                                     to the caller right after, unless
                                                     retryable.  A leased worker sends it
                                                     only for results it can't deliver, an
                                                     actor for those too and any in the arena
                                                     (the caller reports the rest,
                                                     CALLER_DONE, if it registered the call)
Scheduler -> client
    READY              object_id, data, metadata     the object is ready (owner or subscriber)
    EXECUTE            task_id, fn_id, pickled|None, name, args, arg_ids, num_returns,
                                                     values, retry_exceptions, extra
                                                     run a task; values: {id: (data, meta)}
                                                     of its top-level ref arguments; {id:
                                                     None}: not ready, sent ahead, made by
                                                     a task sent here before it
    EXIT               -                             finish what was sent before, then exit
    START_ACTOR        spec (ActorSpec), pickled class, values, restarted, gpu_ids
                                                     become this actor: run __init__
                                                     (restarted: after its process died;
                                                     gpu_ids: the GPUs it holds for life)
    CALL               task_id, method, name, args, arg_ids, num_returns, values, extra
                                                     run a method of the actor (extra: as a
                                                     TaskSpec's)
    CANCEL_CALL        task_id                       cancel a call sent before (queued calls
                                                     are dropped, async ones cancelled)
    REPLY              request_id, value             the answer to a QUERY
    LEASE_GRANTED      worker_pid                    a worker lent to the sender
    LEASE_RECALL       worker_pid                    give that lease back once its tasks are
                                                     done: the CPU is needed
    CONSUMED           task_id, count                (to the process running a streaming task)
                                                     its caller has taken this many items
    LEASE_LOST         worker_pid                    that worker you lease died: read what it
                                                     sent, report it, return the lease with
                                                     what it left unanswered, then answer
                                                     LEASE_VERDICT
Caller -> actor or leased worker, and back, on a direct channel (``_direct``)
    CALL, EXECUTE      as the scheduler's; arg_ids is empty, values too, and EXECUTE's
                                                     pickled is None (the worker asks the
                                                     scheduler for code it lacks)
    RESULT             task_id, delivered, undelivered, took, must_register
                                                     [(object_id, data, metadata)] of the
                                                     results the caller may use at once; the
                                                     ids of the others, which come as READY
                                                     from the scheduler (it must count refs
                                                     inside them first); took: its run time;
                                                     must_register: it submitted tasks or
                                                     waited in get() under its id, so the
                                                     driver must register it (an actor's
                                                     RESULT: always False)
    HANDED_BACK        task_ids                      (leased worker) its running task waits in
                                                     get(): these tasks, sent before, did not
                                                     start (none: the news alone)

An ActorSpec is the tuple ``(actor_id, class_id, class_name, args, arg_ids, contained,
options)``; ``options`` is a dict of the actor's options resolved by the caller (``is_async``,
``max_concurrency``, ``max_restarts``, ``max_task_retries``, ``place``/``hold`` resources,
``name``, ``namespace``, ``detached``, ``get_if_exists``, ``methods``, ``placement``: its
placement group's ``(pg_id, bundle_index, capture_child_tasks)`` or None).

A TaskSpec is the tuple ``(task_id, fn_id, name, args, arg_ids, contained, num_returns,
resources, max_retries, retry_exceptions, extra)``, ``extra`` being None or a dict of the
rarer options (``env_vars`` from runtime_env, ``max_calls``, ``backpressure``, the
``resources`` a task holds when not one CPU, ``placement``: ``(pg_id, bundle_index,
capture_child_tasks)``; EXECUTE adds ``gpu_ids``): ``args`` is
the serialized ``(args, kwargs)`` with each top-level ObjectRef replaced by ``ArgRef(i)``,
``arg_ids[i]`` being its id.  ``num_returns`` is a count, or ``STREAMING`` (the task is a
generator whose items stream to its caller as it yields them: item ``k`` is the object
``object_id_for_return(task_id, k + 1)``, and the task's one return, its completion, holds
how many there were) or ``DYNAMIC`` (a generator run to its end, returning a
``DynamicObjectRefGenerator`` of refs to the items).
"""

from __future__ import annotations

from typing import Optional

REGISTER_FUNCTION = 1
SUBMIT = 2
PUT = 3
HOLD = 4
RELEASE = 5
ESCAPED = 26
GENERATED = 27
CONSUMED = 28
SUBSCRIBE = 6
BLOCKED = 7
UNBLOCKED = 8
TASK_DONE = 9
QUERY = 10
CREATE_ACTOR = 11
ACTOR_CALL = 12
KILL_ACTOR = 13
ACTOR_STARTED = 14
ACTOR_EXITING = 15
CANCEL = 16
DIRECT_CALL = 17
DIRECT_DONE = 18
LEASE_REQUEST = 19
LEASE_RETURN = 20
DIRECT_SUBMIT = 21
CALLER_DONE = 22
LEASE_VERDICT = 23
HANDED_BACK = 24
LEASE_HANDED_BACK = 25
CALLS_LOST = 29
CREATE_PLACEMENT_GROUP = 41
PLACEMENT_GROUP_READY = 42
REMOVE_PLACEMENT_GROUP = 43

READY = 30
EXECUTE = 31
EXIT = 32
REPLY = 33
START_ACTOR = 34
CALL = 35
CANCEL_CALL = 36
RESULT = 37
LEASE_GRANTED = 38
LEASE_RECALL = 39
LEASE_LOST = 40

STREAMING = -1  # num_returns of a streaming generator task (see TaskSpec below)
DYNAMIC = -2    # num_returns of a dynamic generator task

LEASE_SHAPE = {"CPU": 1.0}  # what a lease holds, and the only tasks a lease runs ask for

# TaskSpec field positions
SPEC_TASK_ID = 0
SPEC_FN_ID = 1
SPEC_NAME = 2
SPEC_ARGS = 3
SPEC_ARG_IDS = 4
SPEC_CONTAINED = 5
SPEC_NUM_RETURNS = 6
SPEC_RESOURCES = 7
SPEC_MAX_RETRIES = 8
SPEC_RETRY_EXCEPTIONS = 9
SPEC_EXTRA = 10

# ActorSpec field positions
ACTOR_ID = 0
ACTOR_CLASS_ID = 1
ACTOR_CLASS_NAME = 2
ACTOR_ARGS = 3
ACTOR_ARG_IDS = 4
ACTOR_CONTAINED = 5
ACTOR_OPTIONS = 6


# -- every message, built here only: one constructor per kind, named after it ----------------
# (Readers unpack the fields in the order the table above gives them.)

# Client -> scheduler

def register_function(fn_id: bytes, pickled: bytes, name: str) -> tuple:
    return (REGISTER_FUNCTION, fn_id, pickled, name)


def submit(spec: tuple, parent_id: Optional[bytes] = None) -> tuple:
    return (SUBMIT, spec) if parent_id is None else (SUBMIT, spec, parent_id)


def put(object_id: bytes, data, metadata: bytes, contained) -> tuple:
    return (PUT, object_id, data, metadata, contained)


def hold(ids: list) -> tuple:
    return (HOLD, ids)


def release(ids: list) -> tuple:
    return (RELEASE, ids)


def escaped(ids: list) -> tuple:
    return (ESCAPED, ids)


def subscribe(ids: list) -> tuple:
    return (SUBSCRIBE, ids)


def blocked(task_id: Optional[bytes] = None) -> tuple:
    return (BLOCKED,) if task_id is None else (BLOCKED, task_id)


def unblocked() -> tuple:
    return (UNBLOCKED,)


def handed_back(task_ids: list) -> tuple:
    """To the scheduler, or on a direct channel to the driver leasing the worker."""
    return (HANDED_BACK, task_ids)


def task_done(task_id: bytes, results: list, retryable: bool, took: float) -> tuple:
    return (TASK_DONE, task_id, results, retryable, took)


def not_run(task_id: bytes) -> tuple:
    """TASK_DONE of a task sent ahead that did not find here an argument it was to: the
    scheduler runs it once that is ready."""
    return (TASK_DONE, task_id, None, False, 0.0)


def query(request_id: int, what) -> tuple:
    return (QUERY, request_id, what)


def create_actor(request_id: Optional[int], spec: tuple) -> tuple:
    return (CREATE_ACTOR, request_id, spec)


def actor_call(actor_id: bytes, spec: tuple) -> tuple:
    return (ACTOR_CALL, actor_id, spec)


def kill_actor(request_id: int, actor_id: bytes, no_restart: bool) -> tuple:
    return (KILL_ACTOR, request_id, actor_id, no_restart)


def cancel(task_id: bytes, force: bool, recursive: bool) -> tuple:
    return (CANCEL, task_id, force, recursive)


def consumed(task_id: bytes, count: int) -> tuple:
    """Both ways: from a streaming task's caller, and on to the process running it."""
    return (CONSUMED, task_id, count)


def generated(task_id: bytes, index: int, result: tuple) -> tuple:
    return (GENERATED, task_id, index, result)


def lease_request(count: int) -> tuple:
    return (LEASE_REQUEST, count)


def lease_return(worker_pid: int, unanswered: Optional[list]) -> tuple:
    return (LEASE_RETURN, worker_pid, unanswered)


def caller_done(task_id: bytes, delivered: list, actor_id: Optional[bytes] = None) -> tuple:
    return (CALLER_DONE, task_id, delivered, actor_id)


def lease_verdict(worker_pid: int) -> tuple:
    return (LEASE_VERDICT, worker_pid)


def lease_handed_back(worker_pid: int, task_ids: list) -> tuple:
    return (LEASE_HANDED_BACK, worker_pid, task_ids)


def direct_submit(worker_pid: int, spec: tuple) -> tuple:
    return (DIRECT_SUBMIT, worker_pid, spec)


def direct_call(actor_id: bytes, actor_pid: int, spec: tuple) -> tuple:
    return (DIRECT_CALL, actor_id, actor_pid, spec)


def calls_lost(actor_id: bytes, actor_pid: int, task_ids: list) -> tuple:
    return (CALLS_LOST, actor_id, actor_pid, task_ids)


def create_placement_group(pg_id: bytes, bundles: list, strategy: str, name: str,
                           namespace: str, detached: bool) -> tuple:
    return (CREATE_PLACEMENT_GROUP, pg_id, bundles, strategy, name, namespace, detached)


def placement_group_ready(pg_id: bytes, object_id: bytes, value: bytes) -> tuple:
    return (PLACEMENT_GROUP_READY, pg_id, object_id, value)


def remove_placement_group(request_id: int, pg_id: bytes) -> tuple:
    return (REMOVE_PLACEMENT_GROUP, request_id, pg_id)


def actor_started(error: Optional[bytes]) -> tuple:
    return (ACTOR_STARTED, error)


def actor_exiting() -> tuple:
    return (ACTOR_EXITING,)


def direct_done(task_id: bytes, results: list, caller_pid: int, retryable: bool) -> tuple:
    return (DIRECT_DONE, task_id, results, caller_pid, retryable)


# Scheduler -> client

def ready(object_id: bytes, data, metadata: bytes) -> tuple:
    return (READY, object_id, data, metadata)


def execute(spec: tuple, pickled: Optional[bytes], values: dict, gpu_ids=()) -> tuple:
    """EXECUTE of a TaskSpec: from the scheduler (with the function's code if the worker
    lacks it, and the values of small ref arguments), or from a driver to a worker it
    leases (neither: its tasks have no ref arguments, and the worker asks for code).  A
    task given GPUs finds their ids in its extra, as ``gpu_ids``."""
    extra = spec[SPEC_EXTRA]
    if gpu_ids:
        extra = {**extra, "gpu_ids": gpu_ids}
    return (EXECUTE, spec[SPEC_TASK_ID], spec[SPEC_FN_ID], pickled, spec[SPEC_NAME],
            spec[SPEC_ARGS], spec[SPEC_ARG_IDS], spec[SPEC_NUM_RETURNS], values,
            spec[SPEC_RETRY_EXCEPTIONS], extra)


def exit_() -> tuple:
    return (EXIT,)


def reply(request_id: int, value) -> tuple:
    return (REPLY, request_id, value)


def start_actor(spec: tuple, pickled_class: bytes, values: dict, restarted: bool,
                gpu_ids: tuple) -> tuple:
    return (START_ACTOR, spec, pickled_class, values, restarted, gpu_ids)


def call(spec: tuple, values: dict) -> tuple:
    """CALL of an actor method's TaskSpec: from the scheduler, or straight from the caller."""
    return (CALL, spec[SPEC_TASK_ID], spec[SPEC_FN_ID], spec[SPEC_NAME], spec[SPEC_ARGS],
            spec[SPEC_ARG_IDS], spec[SPEC_NUM_RETURNS], values, spec[SPEC_EXTRA])


def cancel_call(task_id: bytes) -> tuple:
    return (CANCEL_CALL, task_id)


def lease_granted(worker_pid: int) -> tuple:
    return (LEASE_GRANTED, worker_pid)


def lease_recall(worker_pid: int) -> tuple:
    return (LEASE_RECALL, worker_pid)


def lease_lost(worker_pid: int) -> tuple:
    return (LEASE_LOST, worker_pid)


# On a direct channel, back to the caller

def result(task_id: bytes, delivered: list, undelivered: list, took: float,
           must_register: bool) -> tuple:
    return (RESULT, task_id, delivered, undelivered, took, must_register)


# What may arrive on a direct channel's listening end, field by field (after the opcode).
# Any process of the session's user can connect there, so each message is checked before it
# is acted on (``well_formed``); the scheduler's own sockets are private to the session.
_LISTS = (list, tuple)
CALL_FIELDS = (bytes, str, str, bytes, _LISTS, int, dict, (type(None), dict))
EXECUTE_FIELDS = (bytes, bytes, type(None), str, bytes, _LISTS, int, dict,
                  (bool, bytes), (type(None), dict))


def well_formed(message, shapes: dict) -> bool:
    """Whether ``message`` is a tuple whose opcode is in ``shapes`` (opcode -> the types of
    its fields) and whose fields are of those types, with a task id for the first."""
    if type(message) is not tuple or not message or type(message[0]) is not int:
        return False
    shape = shapes.get(message[0])
    return (shape is not None and len(message) == len(shape) + 1
            and all(map(isinstance, message[1:], shape)) and len(message[1]) == 24)


class ArgRef:
    """Stands in the pickled arguments for the i-th top-level ObjectRef argument."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return ArgRef, (self.index,)
