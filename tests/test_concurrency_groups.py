"""Concurrency groups: an actor's methods in groups of their own threads (threaded actors)
or event loops (async actors), so a group that blocks never holds up another."""

import asyncio
import threading
import time

import pytest

import shmray

DEADLOCK = 60


@shmray.remote(concurrency_groups={"io": 2, "compute": 3})
class Threaded:
    def __init__(self):
        self.meeting = threading.Barrier(3)
        self.gate = threading.Event()

    @shmray.method(concurrency_group="compute")
    def meet(self):
        self.meeting.wait(timeout=DEADLOCK)  # all three at once, or none returns
        return threading.get_ident()

    @shmray.method(concurrency_group="io")
    def wait_at_gate(self):
        return self.gate.wait(timeout=DEADLOCK)

    def open_gate(self):
        self.gate.set()

    def ping(self):
        return "pong"


def test_n_calls_in_a_group_of_n_run_on_n_threads(ray):
    actor = Threaded.remote()
    threads = ray.get([actor.meet.remote() for _ in range(3)], timeout=DEADLOCK)
    assert len(set(threads)) == 3


def test_a_blocked_group_holds_up_neither_another_nor_the_default(ray):
    actor = Threaded.remote()
    waiting = [actor.wait_at_gate.remote() for _ in range(2)]  # the io group is full
    assert ray.get(actor.ping.remote(), timeout=DEADLOCK) == "pong"
    assert len(set(ray.get([actor.meet.remote() for _ in range(3)], timeout=DEADLOCK))) == 3
    actor.open_gate.remote()
    assert ray.get(waiting, timeout=DEADLOCK) == [True, True]


def test_a_call_can_name_its_group(ray):
    actor = Threaded.remote()
    waiting = [actor.wait_at_gate.remote() for _ in range(2)]
    blocked = actor.ping.options(concurrency_group="io").remote()  # behind the full group
    ready, _ = ray.wait([blocked], timeout=0.3)
    assert ready == []
    actor.open_gate.remote()
    assert ray.get(blocked, timeout=DEADLOCK) == "pong"
    assert ray.get(waiting, timeout=DEADLOCK) == [True, True]


def test_async_groups_have_loops_of_their_own(ray):
    @ray.remote(concurrency_groups={"slow": 1})
    class Async:
        @shmray.method(concurrency_group="slow")
        async def hog(self):
            time.sleep(1.5)  # blocks its group's loop, not the others'
            return "done"

        async def ping(self):
            await asyncio.sleep(0)
            return threading.get_ident()

        @shmray.method(concurrency_group="slow")
        async def where(self):
            return threading.get_ident()

    actor = Async.remote()
    main = ray.get(actor.ping.remote(), timeout=DEADLOCK)
    assert ray.get(actor.where.remote(), timeout=DEADLOCK) != main
    hogging = actor.hog.remote()
    time.sleep(0.2)
    ready, _ = ray.wait([actor.ping.remote()], timeout=1.0)  # answers while the hog runs
    assert ready
    ready, _ = ray.wait([hogging], timeout=0)
    assert ready == []
    assert ray.get(hogging, timeout=DEADLOCK) == "done"


def test_unknown_groups_are_refused_where_they_are_named(ray):
    with pytest.raises(ValueError, match="concurrency group 'nope'"):
        @ray.remote(concurrency_groups={"io": 1})
        class Typo:
            @shmray.method(concurrency_group="nope")
            def f(self):
                return 1

    actor = Threaded.remote()
    with pytest.raises(ValueError, match="no concurrency group 'nope'"):
        actor.ping.options(concurrency_group="nope")
    with pytest.raises(ValueError, match="concurrency_groups"):
        @ray.remote(concurrency_groups={"io": 0})
        class Zero:
            pass
