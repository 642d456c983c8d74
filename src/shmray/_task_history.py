"""Task rows from task events: what the state API lists (``shmray.util.state.list_tasks``).

Runs in: the scheduler (from every process's log: ``_scheduler.state``), and a local-mode
driver (from its own).

A task's events are scattered over the logs of the processes it touched (``_events``): its
submitter recorded that it was submitted, each process that ran an attempt of it recorded
the start and the end, and the scheduler recorded failures it decided itself (cancelled
while queued, its worker or actor gone).  Here they are put together, one row per attempt,
with Ray's field names.  An attempt started in a process that is gone and never ended
failed with it; a task seen submitted and never started is pending, in the state the
caller's ``pending`` says (the scheduler knows why those that went through it wait).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import _events
from ._events import ENDED, STARTED, SUBMITTED, Event
from ._scheduling_strategies import NODE_ID

# (pid of the process whose log it is, whether that process is alive, its events)
Source = Tuple[int, bool, Sequence[Event]]


def worker_id(pid: Optional[int]) -> Optional[str]:
    """A process's id in rows (Ray's are 28 random bytes; ours name the pid)."""
    return None if pid is None else f"{pid:056x}"


def ms(t: Optional[float]) -> Optional[int]:
    return None if not t else int(t * 1000)


def us(t: Optional[float]) -> Optional[int]:
    return None if not t else int(t * 1_000_000)


class _Attempt:
    __slots__ = ("pid", "start", "end", "error", "message")

    def __init__(self, pid: Optional[int], start: float):
        self.pid, self.start = pid, start
        self.end = 0.0
        self.error = 0
        self.message: Optional[str] = None

    def outcome(self) -> str:
        """How an ended attempt ended, as a row's state says it."""
        return "FAILED" if self.error else "FINISHED"


class _Task:
    __slots__ = ("name", "task_type", "actor_id", "first_arg", "created", "submitter",
                 "attempts", "first_seen")

    def __init__(self, event: Event):
        self.name = event.name
        self.task_type = event.task_type
        self.actor_id: Optional[bytes] = None
        self.first_arg: Optional[bytes] = None  # a task's first ref argument
        self.created = 0.0
        self.submitter: Optional[int] = None
        self.attempts: List[_Attempt] = []
        self.first_seen = event.time


Pending = Callable[..., Tuple[str, Optional[str]]]


def _unknown_pending(task_id: bytes, submitter: Optional[int], name: str):
    return "SUBMITTED_TO_WORKER", None


class History:
    """The tasks the logs told of so far, at most ``limit`` (the oldest finished go first).

    Events are taken in as they are read (``take``), so an answer costs what happened since
    the last, not the whole history; finished attempts are counted as they end, so a
    status costs only the tasks still open.  ``transfers``: the latest spills and restores.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.tasks: Dict[bytes, _Task] = {}
        self.open: set = set()              # tasks with no attempt, or one not ended
        self.closed: Dict[str, int] = {"FINISHED": 0, "FAILED": 0}  # ended attempts
        self.alive: Dict[int, bool] = {}    # pid -> whether it is (False: it ended)
        self.dropped = 0                    # tasks dropped past the limit
        self.transfers: list = []           # (pid, event), the latest ``limit``
        # What each process's slot said it runs (``_slot.running``): pid -> (task id, the
        # attempt made of it), until the slot names another or its end is recorded.
        self.slot_attempts: Dict[int, tuple] = {}

    def take(self, batches: Iterable[Source],
             running: Optional[Dict[int, Optional[tuple]]] = None) -> None:
        """Take in the events read since the last time, from each process (pid, whether
        it is alive, its new events): in time order across processes; then what the slots
        read just before said each process runs (pid -> (task id, start) or None)."""
        merged = []
        for pid, is_alive, events in batches:
            self.alive[pid] = is_alive
            for event in events:
                if event.kind in (SUBMITTED, STARTED, ENDED):
                    merged.append((event.time, event.kind, pid, event))
                elif event.kind in (_events.SPILLED, _events.RESTORED):
                    self.transfers.append((pid, event))
        del self.transfers[: -self.limit]
        merged.sort(key=lambda item: (item[0], item[1]))  # at one instant: submit first
        tasks = self.tasks
        for t, kind, pid, event in merged:
            task_id = event.task_id
            task = tasks.get(task_id)
            if task is None:
                task = tasks[task_id] = _Task(event)
                self.open.add(task_id)
            if event.name and not task.name:
                task.name = event.name
            if event.ref_id and event.task_type != _events.NORMAL_TASK:
                task.actor_id = event.ref_id
            elif event.ref_id and kind == SUBMITTED:
                task.first_arg = event.ref_id
            if kind == SUBMITTED:
                task.created, task.submitter = t, pid
            elif kind == STARTED:
                task.attempts.append(_Attempt(pid, t))
                self._still_open(task_id, task)
            else:
                self._end(task_id, task, pid, event)
        if running:
            self._running(running)
        if len(tasks) > self.limit + self.limit // 4:  # now and then, not at every task
            self._drop_oldest()

    def _running(self, running: Dict[int, Optional[tuple]]) -> None:
        """A worker or sync actor names the task it runs in its slot rather than logging
        the start: an attempt is made of it until its end is logged.  One the slot stopped
        naming without an end never ran (it went back unrun): it goes."""
        for pid, now in running.items():
            kept = self.slot_attempts.get(pid)
            if kept is not None and now is not None and kept[0] == now[0] \
                    and kept[1].start == now[1]:
                continue
            if kept is not None:
                del self.slot_attempts[pid]
                task_id, attempt = kept
                task = self.tasks.get(task_id)
                if not attempt.end and task is not None and attempt in task.attempts:
                    task.attempts.remove(attempt)
                    self._still_open(task_id, task)
            if now is None:
                continue
            task_id, start = now
            task = self.tasks.get(task_id)
            if task is None:
                task = self.tasks[task_id] = _Task(Event(0, STARTED, 0, 0, None, None, task_id,
                                                         None, start, 0.0, 0))
            if any(a.pid == pid and a.start == start or a.end >= start
                   for a in task.attempts if a.end or a.pid == pid):
                continue  # logged already (ended, or started by a log record)
            attempt = _Attempt(pid, start)
            task.attempts.append(attempt)
            self._still_open(task_id, task)
            self.slot_attempts[pid] = (task_id, attempt)

    def process_ended(self, pid: int) -> None:
        """``pid`` is gone: what its slot said it ran stays, failed with it if unended."""
        self.slot_attempts.pop(pid, None)

    def _end(self, task_id: bytes, task: _Task, pid: int, event: Event) -> None:
        """An ENDED event: it closes the attempt its process ran, or, recorded by another
        process (the scheduler, failing it), one whose process is gone, or one never
        started."""
        attempt = None
        for candidate in reversed(task.attempts):
            if not candidate.end and (candidate.pid == pid
                                      or not self.alive.get(candidate.pid, True)):
                attempt = candidate
                break
        if attempt is None:  # it ran here (a start time) without a start logged, or never
            attempt = _Attempt(pid if event.time2 else None, event.time2)
            task.attempts.append(attempt)
        attempt.end = event.time
        attempt.error = event.error
        attempt.message = event.message
        self.closed[attempt.outcome()] += 1
        self._still_open(task_id, task)

    def _still_open(self, task_id: bytes, task: _Task) -> None:
        """Keep ``open`` true: a task is open while it has no attempt, or one not ended."""
        if task.attempts and all(a.end for a in task.attempts):
            self.open.discard(task_id)
        else:
            self.open.add(task_id)

    def _drop_oldest(self) -> None:
        excess = len(self.tasks) - self.limit
        for task_id in list(self.tasks):
            if excess <= 0:
                break
            if task_id in self.open:
                continue  # what is still going on stays
            task = self.tasks.pop(task_id)
            for attempt in task.attempts:
                self.closed[attempt.outcome()] -= 1
            self.dropped += 1
            excess -= 1

    def rows(self, driver_pid: int, pending: Pending = _unknown_pending,
             job_id: str = "01000000") -> List[dict]:
        """One row per attempt of each task, oldest task first.  ``pending`` gives the
        state of a task never started (given its id, its submitter's pid and its name),
        and what it waits for (in words)."""
        rows = []
        for task_id, task in sorted(self.tasks.items(), key=lambda item: item[1].created
                                    or item[1].first_seen):
            rows.extend(_rows_of(task_id, task, self.alive, driver_pid, pending, job_id,
                                 self.tasks))
        return rows

    def open_states(self, pending: Pending = _unknown_pending) -> List[tuple]:
        """(state, what it waits for) of each attempt not ended (pending, running, or lost
        with its process): what ``rows`` gives beside those ended, without the rows."""
        states = []
        for task_id in self.open:
            states.extend((state, waiting_for) for _, attempt, state, _, _, waiting_for
                          in _states_of(task_id, self.tasks[task_id], self.alive, pending,
                                        self.tasks)
                          if attempt is None or not attempt.end)
        return states

    def states(self, open_states: List[tuple]) -> Dict[str, int]:
        """How many rows ``rows`` would give in each state (``open_states``: those of
        ``open_states``), at the cost of the open ones only: ended attempts are counted as
        they end."""
        counts = {state: count for state, count in self.closed.items() if count}
        for state, _ in open_states:
            counts[state] = counts.get(state, 0) + 1
        return counts

    def failed(self, task_id: bytes) -> Optional[str]:
        """The error type of a task whose latest attempt failed (None if it did not)."""
        task = self.tasks.get(task_id)
        if task is None or not task.attempts or not task.attempts[-1].error:
            return None
        return _events.ERRORS[task.attempts[-1].error]

    def transfer_rows(self) -> List[dict]:
        """Spills and restores, as task-like rows for the timeline (type SPILL or
        RESTORE)."""
        rows = []
        for pid, event in self.transfers:
            what = "SPILL" if event.kind == _events.SPILLED else "RESTORE"
            rows.append({
                "task_id": None, "object_id": event.ref_id.hex() if event.ref_id else None,
                "name": f"{what.lower()} {event.size} bytes", "type": what,
                "state": "FINISHED", "worker_pid": pid, "worker_id": worker_id(pid),
                "start_time_ms": ms(event.time2), "end_time_ms": ms(event.time),
                "start_time_us": us(event.time2), "end_time_us": us(event.time),
                "object_size": event.size})
        rows.sort(key=lambda row: row["start_time_us"] or 0)
        return rows


def _rows_of(task_id: bytes, task: _Task, alive: Dict[int, bool], driver_pid: int,
             pending, job_id: str, tasks: Dict[bytes, _Task]) -> List[dict]:
    type_name = _type_name(task)
    base = {
        "task_id": task_id.hex(), "name": task.name or "?", "job_id": job_id,
        "actor_id": task.actor_id.hex() if task.actor_id else None, "type": type_name,
        "func_or_class_name": task.name or "?",
        "parent_task_id": None, "node_id": NODE_ID, "required_resources": {},
        "creation_time_ms": ms(task.created or task.first_seen),
        "placement_group_id": None, "language": "PYTHON",
        "submitter_pid": task.submitter if task.submitter != driver_pid else None,
    }
    rows = []
    for number, attempt, state, error, message, waiting_for in _states_of(
            task_id, task, alive, pending, tasks):
        start, end, pid = (attempt.start, attempt.end, attempt.pid) if attempt is not None \
            else (0.0, 0.0, None)
        rows.append(dict(
            base, attempt_number=number, state=state, worker_id=worker_id(pid),
            worker_pid=pid, error_type=_events.ERRORS[error] if error else None,
            error_message=message, start_time_ms=ms(start), end_time_ms=ms(end),
            start_time_us=us(start), end_time_us=us(end), waiting_for=waiting_for))
    return rows


def _states_of(task_id: bytes, task: _Task, alive: Dict[int, bool], pending,
               tasks: Dict[bytes, _Task]) -> list:
    """(number, attempt or None, state, error code, message, what it waits for) of each
    attempt of a task (one, without an attempt, for a task never started)."""
    if not task.attempts:
        state, waiting_for = pending(task_id, task.submitter, task.name or "?")
        producer = tasks.get(task.first_arg[:24]) if task.first_arg else None
        if state == "SUBMITTED_TO_WORKER" and producer is not None and not _done(producer):
            # queued behind the task making its argument, on that task's worker
            state = "PENDING_ARGS_AVAIL"
            waiting_for = f"waits for the result of {producer.name or '?'}()"
        return [(0, None, state, 0, None, waiting_for)]
    states = []
    for number, attempt in enumerate(task.attempts):
        error, message, end = attempt.error, attempt.message, attempt.end
        if not end and attempt.pid is not None and not alive.get(attempt.pid, True):
            error = (_events.ACTOR_DIED if _type_name(task) == "ACTOR_TASK"
                     else _events.WORKER_DIED)
            message = f"the process running it (pid {attempt.pid}) died"
        state = "RUNNING" if not end and not error else "FAILED" if error else "FINISHED"
        states.append((number, attempt, state, error, message, None))
    return states


def _type_name(task: _Task) -> str:
    return _events.TYPES[task.task_type] if task.task_type < len(_events.TYPES) \
        else "NORMAL_TASK"


def _done(task: _Task) -> bool:
    return bool(task.attempts) and bool(task.attempts[-1].end) and not task.attempts[-1].error
