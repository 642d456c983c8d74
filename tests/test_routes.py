"""The same checks on every route work can take: a task through the scheduler, a task on a
worker the driver leases (``_runtime.leases``), and a call straight to an actor (a direct
channel).  Each route has code of its own for results, errors and refs; these checks hold
them to one behaviour.  (loky's ``tests/_executor_mixin.py`` runs one set of checks against
each of its executors the same way.)

The fixture asserts, after each test, that every call took the route it is named for.
"""

import numpy as np
import pytest

import shmray
from shmray import exceptions

from conftest import runtime

DEADLOCK = 60


def add(a, b):
    return a + b


def array_of(n):
    return np.arange(n, dtype=np.float64)


def fail(message):
    raise ValueError(message)


def pair(x):
    return x, x + 1


def ref_inside(x):
    return [shmray.put(x)]


def fan_out(n):
    @shmray.remote
    def square(i):
        return i * i

    return sum(shmray.get([square.remote(i) for i in range(n)], timeout=DEADLOCK))


class Route:
    """Calls ``fn(*args)`` by one route, and counts the calls that must have taken it."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0
        self._remote = {}
        self.runner = None
        if name == "scheduler":
            runtime().leases.enabled = False
        if name == "actor":
            @shmray.remote
            class Runner:
                def run(self, fn, *args):
                    return fn(*args)

            self.runner = Runner.remote()
            # The first calls go through the scheduler while the actor starts listening.
            shmray.get([self.runner.run.remote(int) for _ in range(3)], timeout=DEADLOCK)
        self.before = self.taken()

    def call(self, fn, *args, num_returns=1):
        self.calls += 1
        if self.runner is not None:
            return self.runner.run.options(num_returns=num_returns).remote(fn, *args)
        if fn not in self._remote:
            self._remote[fn] = shmray.remote(fn)
        return self._remote[fn].options(num_returns=num_returns).remote(*args)

    def taken(self) -> int:
        if self.name == "actor":
            return runtime().channels.calls_sent
        return runtime().leases.tasks_sent

    def check(self) -> None:
        expected = 0 if self.name == "scheduler" else self.calls
        assert self.taken() - self.before == expected, f"not every call took the {self.name} route"


@pytest.fixture(params=["scheduler", "lease", "actor"])
def route(request, ray):
    taken = Route(request.param)
    yield taken
    taken.check()


def test_a_value_comes_back(route):
    assert shmray.get(route.call(add, 1, 2), timeout=DEADLOCK) == 3
    assert shmray.get(route.call(add, [1], ["two"]), timeout=DEADLOCK) == [1, "two"]


def test_a_large_array_comes_back_as_a_view_of_the_arena(route):
    ref = route.call(array_of, 1 << 20)  # 8 MiB
    value = shmray.get(ref, timeout=DEADLOCK)
    assert np.array_equal(value, np.arange(1 << 20, dtype=np.float64))
    assert not value.flags.writeable
    assert runtime().store.contains(ref.binary()) == "sealed"


def test_an_error_is_both_the_task_error_and_its_cause(route):
    with pytest.raises(ValueError) as info:
        shmray.get(route.call(fail, "the message"), timeout=DEADLOCK)
    assert isinstance(info.value, exceptions.RayTaskError)
    assert "the message" in str(info.value)
    assert "raise ValueError(message)" in str(info.value)  # the remote traceback


def test_several_returns(route):
    first, second = route.call(pair, 41, num_returns=2)
    assert shmray.get([first, second], timeout=DEADLOCK) == [41, 42]


def test_a_result_holding_a_ref_keeps_its_object(route):
    outer = route.call(ref_inside, "inner value")
    (inner,) = shmray.get(outer, timeout=DEADLOCK)
    del outer
    assert shmray.get(inner, timeout=DEADLOCK) == "inner value"


def test_work_submitted_from_there_runs(route):
    assert shmray.get(route.call(fan_out, 4), timeout=DEADLOCK) == 0 + 1 + 4 + 9
