"""What the scheduler knows of a task and of an actor: plain records, no logic.

Runs in: the scheduler.
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional

from .. import _protocol as P
from .clients import Client


_FIRST_RETURN = (1).to_bytes(4, "little")
_FINISHED_KEPT = 1024  # parked replies of an actor's dead processes kept, at most


class Task:
    __slots__ = ("spec", "task_id", "name", "owner", "return_ids", "resources", "shape",
                 "waiting_on", "retries_left", "worker", "finished", "held_ids", "actor",
                 "children", "cancelled", "started_at", "direct", "streamed", "consumed",
                 "gpu_ids", "placement", "pool", "ahead")

    def __init__(self, spec: tuple, owner: Client):
        self.spec = spec
        self.task_id = spec[P.SPEC_TASK_ID]
        self.name = spec[P.SPEC_NAME]
        self.owner = owner
        num_returns = spec[P.SPEC_NUM_RETURNS]
        if num_returns <= 1:  # most tasks and calls: one return (or a hidden one)
            self.return_ids = [self.task_id + _FIRST_RETURN]
        else:
            self.return_ids = [self.task_id + (i + 1).to_bytes(4, "little")
                               for i in range(num_returns)]
        self.resources: Dict[str, float] = spec[P.SPEC_RESOURCES]
        self.shape = tuple(sorted(self.resources.items())) if self.resources else ()
        extra = spec[P.SPEC_EXTRA]
        # (pg id, bundle index, capture) for a task in a placement group: it queues apart
        # and takes from its bundle's reservation (``pool``, set as it starts), not the
        # free pool, which ``pool`` None means.
        self.placement = extra.get("placement") if extra else None
        if self.placement is not None:
            self.shape += (self.placement[:2],)
        self.pool = None
        self.waiting_on = 0
        self.retries_left = spec[P.SPEC_MAX_RETRIES]
        self.worker: Optional[Client] = None
        self.finished = False
        # every id the task holds until it finishes: top-level args and refs nested in args
        arg_ids, contained = spec[P.SPEC_ARG_IDS], spec[P.SPEC_CONTAINED]
        self.held_ids = [*arg_ids, *contained] if arg_ids or contained else []
        self.actor: Optional["Actor"] = None  # set for actor method calls
        self.children: List["Task"] = []      # tasks it submitted while running (cancel)
        self.cancelled = False
        self.started_at = 0.0
        self.direct = False  # sent straight to its actor or leased worker by its caller
        self.streamed = 0    # a streaming task: items its owner has been sent
        self.consumed = 0    # ...and taken (backpressure; told again to a retried attempt)
        self.gpu_ids = ()    # the GPU ids it holds while it runs
        self.ahead = False   # sent to a worker before its arguments were ready (``tasks``)


class Actor:
    """The scheduler's record of one actor: its process, its mailbox order, its fate."""

    __slots__ = ("actor_id", "spec", "options", "class_name", "client", "state", "queues",
                 "inflight", "restarts_left", "death", "no_restart", "held", "waiting_on",
                 "creation_holds", "out_of_scope", "direct_open", "exit_sent", "restarting",
                 "ordered", "parked", "gpu_ids", "pool", "awaiting", "given_up", "finished")

    def __init__(self, spec: tuple):
        self.actor_id = spec[P.ACTOR_ID]
        self.spec = spec
        self.options = spec[P.ACTOR_OPTIONS]
        self.class_name = spec[P.ACTOR_CLASS_NAME]
        self.client: Optional[Client] = None
        self.state = "pending"                # pending -> alive -> (pending again) -> dead
        self.queues: Dict[Client, collections.deque] = {}   # per caller, in call order
        self.inflight: Dict[bytes, Task] = {}               # sent to the process, not done
        self.direct_open: Dict[Client, int] = {}  # per caller: direct calls not done yet
        # Direct calls a dead process never answered, until their callers say what they saw
        # (CALLER_DONE, CALLS_LOST): ``Actors._died``.  ``given_up``: those a caller lost
        # before we saw the death; ``finished``: the replies its last process parked.
        self.awaiting: Dict[bytes, Task] = {}
        self.given_up: set = set()
        self.finished: Dict[bytes, list] = {}
        self.exit_sent = False
        self.restarts_left = self.options["max_restarts"]
        self.death: Optional[tuple] = None    # (data, metadata) of the error calls get
        self.no_restart = False
        self.held: Dict[str, float] = {}
        self.gpu_ids = ()                     # the GPU ids its process holds, for its life
        self.pool = None  # the bundle's reservation it holds from; None: the free pool
        self.waiting_on = 0                   # constructor arguments not ready yet
        self.creation_holds = list(spec[P.ACTOR_ARG_IDS]) + list(spec[P.ACTOR_CONTAINED])
        self.out_of_scope = False
        self.restarting = False  # its process died; the next has not run __init__ yet
        # A sync actor runs each caller's calls in order; a threaded or async one runs a
        # call once its arguments are ready, so calls waiting for theirs wait here instead
        # of in their caller's line (``Actors.call_ready``).
        self.ordered = self.options.get("ordered", True)
        self.parked: set = set()

    def keep_finished(self, finished: dict) -> None:
        """The replies a dead process parked, until their calls are settled (``_died``):
        each death adds at most a slot's worth; those never claimed (a caller that had
        read them, or died) go, oldest first, past a bound."""
        self.finished.update(finished)
        while len(self.finished) > _FINISHED_KEPT:
            del self.finished[next(iter(self.finished))]

    def line_up(self, task: Task) -> None:
        """A new call: into its caller's line, or parked while its arguments are not ready
        and the actor need not keep order."""
        if task.waiting_on and not self.ordered:
            self.parked.add(task)
            return
        queue = self.queues.get(task.owner)
        if queue is None:
            queue = self.queues[task.owner] = collections.deque()
        queue.append(task)

    def unpark(self, task: Task) -> None:
        if task in self.parked:
            self.parked.discard(task)
            self.queues.setdefault(task.owner, collections.deque()).append(task)
