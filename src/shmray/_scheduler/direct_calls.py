"""Actor calls their callers sent straight to the actor, as the scheduler hears of them.

Runs in: the scheduler.  (The caller's side is in ``_runtime.channels``, the route drawn
whole in ``_direct``.)

A caller owns its direct calls, and registers one here only when we must know of it
(DIRECT_CALL): from then on it is owed, failed and retried like a call we forwarded, and
the caller's calls queued here after it wait until it is done (``direct_open``).  Done is
said by the caller (CALLER_DONE: results it could use at once), or by the actor (DIRECT_DONE:
results in the arena, holding refs, or a failure to retry), in either order: results that
overtake their registration wait in ``Directory.early``.

When the actor's process dies, a registered call it had not answered may still have
answered its caller: it waits for the caller's word (``Actor.awaiting``).  The caller reads
all the process sent, reports what it got, and names the calls that never came back
(CALLS_LOST), which are settled then (``_settle``): those whose replies the process parked
finish with them, the rest run again on the next process while retries are left, else
fail.  Word that comes before we see the death is kept (``Actor.given_up``).

``DirectCalls`` is a part of ``actors.Actors`` (whose ``forward``, ``_retry_call`` and
``_exit_when_done`` it uses), kept apart to keep each readable.
"""

from __future__ import annotations

import collections

from .. import exceptions
from .clients import Client
from .objects import serialized
from .records import Actor


class DirectCalls:
    """The part of ``Actors`` that keeps count of the direct calls callers registered."""

    def on_direct_call(self, client: Client, actor_id, actor_pid, spec: tuple) -> None:
        """A call its caller sent straight to the actor process ``actor_pid``, registered
        now that we must know of it (``_runtime.channels``)."""
        self.direct_call_count += 1
        task = self.tasks.admit(spec, client)
        task.direct = True
        actor = task.actor = self.table.get(actor_id)
        early = self.objects.take_early(task.task_id)
        if early is not None:
            results, _, retryable = early
            if retryable and actor is not None and retry_allowed(task):
                self._retry_call(actor, task)
            else:
                self.tasks.finish_direct(task, results, retryable)
            self.objects.unprotect(results)
            return
        if task.finished:
            return
        if actor is None:
            self.tasks.fail(task, *no_such_actor(actor_id))
            return
        if (actor.state == "alive" and actor.client is not None
                and actor.client.pid == actor_pid):
            actor.inflight[task.task_id] = task
            task.worker = actor.client
        else:  # it went to a process that died: its caller says what became of it
            actor.awaiting[task.task_id] = task
        actor.direct_open[client] = actor.direct_open.get(client, 0) + 1

    def on_direct_done(self, client: Client, task_id, results, caller_pid, retryable) -> None:
        """An actor reports a call its caller sent it straight: results its caller can't use
        at once (refs inside, in the arena, a failure to retry), or a caller gone."""
        actor = client.actor
        task = actor.inflight.pop(task_id, None)
        if task is None:
            if self.tasks.get(task_id) is not None:
                return  # finished meanwhile (e.g. its actor was declared dead)
            self.objects.keep_early(task_id, results, caller_pid, retryable)
            return
        actor.given_up.discard(task_id)
        if task.finished:
            pass
        elif retryable and retry_allowed(task):
            self._retry_call(actor, task)  # its caller was told to wait for us (``report``)
        else:
            self.tasks.finish_direct(task, results, retryable)
        self._direct_closed(actor, task.owner)

    def on_caller_done(self, client: Client, actor_id, task_id, delivered) -> None:
        """CALLER_DONE: a registered direct call's results, as the actor sent them back (it
        may have been finished meanwhile, cancelled while its actor was dead: not counted
        as done until now all the same)."""
        actor = self.table.get(actor_id)
        if actor is None:
            return
        task = actor.inflight.pop(task_id, None) or actor.awaiting.pop(task_id, None)
        if task is None:
            return
        actor.given_up.discard(task_id)
        if not task.finished:
            self.tasks.finish_direct(task, [(object_id, data, metadata, ())
                                            for object_id, data, metadata in delivered], False)
        self._direct_closed(actor, client)

    def on_calls_lost(self, client: Client, actor_id, actor_pid, task_ids) -> None:
        """CALLS_LOST: the caller's channel to ``actor_pid`` ended with these calls
        unanswered; it has reported all the process sent back.  If that process is dead
        they are settled now, else once we see it die (or hear from it: a call it finishes
        for a caller gone, it reports here)."""
        actor = self.table.get(actor_id)
        if actor is None:
            return
        retries = []
        for task_id in task_ids:
            task = actor.awaiting.pop(task_id, None)
            if task is None:
                if task_id in actor.inflight:
                    actor.given_up.add(task_id)
                continue
            if not task.finished:
                self._settle(actor, task, retries)
            self._direct_closed(actor, client, forward=False)
        if retries:  # first in its line, in the order they were made
            actor.queues.setdefault(client, collections.deque()).extendleft(reversed(retries))
        self.forward(actor)

    def _settle(self, actor: Actor, task, retries: list) -> None:
        """A direct call the dead process never answered: finished if it parked the reply,
        else again on the next process (appended to ``retries``) if allowed, else failed."""
        delivered = actor.finished.pop(task.task_id, None)
        task.worker = None
        if delivered is not None:
            self.tasks.finish(task, [(object_id, data, metadata, ())
                                     for object_id, data, metadata in delivered])
        elif actor.state != "dead" and retry_allowed(task):
            task.direct = False
            retries.append(task)
        elif actor.state == "dead":
            self.tasks.fail(task, *actor.death)
        else:
            self.tasks.fail(task, *died_error(
                actor, "its process died while this call was on its way to it or running; "
                "it is being restarted (max_task_retries would retry the call)"))

    def _direct_closed(self, actor: Actor, caller: Client, forward: bool = True) -> None:
        """One of ``caller``'s registered direct calls is done: its calls queued here behind
        them may go once none is left, and the actor may end if it is to."""
        open_calls = actor.direct_open.get(caller, 0) - 1
        if open_calls > 0:
            actor.direct_open[caller] = open_calls
            return
        actor.direct_open.pop(caller, None)
        if forward and caller in actor.queues:
            self.forward(actor)
        if actor.out_of_scope:
            self._exit_when_done(actor)

    def caller_died(self, caller: Client) -> None:
        """A caller died: its direct calls may never reach their actor (still in its
        buffers), and the results of those that did went to it alone.  They fail here (the
        owner of their results is gone, as Ray says); if one ran after all, its report finds
        it finished and its results are dropped."""
        for actor in self.table.values():
            if actor.direct_open.pop(caller, None) is None:
                continue
            for calls in (actor.inflight, actor.awaiting):
                for task_id, task in list(calls.items()):
                    if task.owner is caller and task.direct:
                        del calls[task_id]
                        self.tasks.fail(task, *serialized(exceptions.OwnerDiedError(
                            f"The result of {task.name}() is lost: the process that called "
                            f"it (pid {caller.pid}), which owned the result, died before it "
                            "had it")))
            self.forward(actor)  # its calls queued here were held behind those
            if actor.out_of_scope:
                self._exit_when_done(actor)


def no_such_actor(actor_id: bytes) -> tuple:
    return serialized(exceptions.ActorDiedError(
        f"no actor with id {actor_id.hex()} exists in this session"))


def retry_allowed(task) -> bool:
    """Whether a call may run again (max_task_retries), using up one retry if so."""
    if task.retries_left == 0:
        return False
    if task.retries_left > 0:
        task.retries_left -= 1
    return True


def died_error(actor: Actor, why: str) -> tuple:
    return serialized(exceptions.ActorDiedError(
        f"The actor {actor.class_name} (id {actor.actor_id.hex()}) is dead: {why}. "
        "Calls to it raise this error."))
