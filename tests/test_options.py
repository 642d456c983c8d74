"""Options, arguments and call order checked as Ray checks them: Ray's exception classes and
texts (programs and their tests match on them), at the line that made the mistake, wherever
the function or handle was unpickled; and the order threaded and async actors run calls in.
"""

import os
import time

import pytest

import shmray
from shmray import exceptions
from shmray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

DEADLOCK = 60  # seconds: only a deadlock takes this long


def noop():
    return 1


class Plain:
    def f(self, x):
        return x


# -- option types and values, at decoration and at .options() --------------------------------


@pytest.mark.parametrize("key, value, expected", [
    ("max_retries", 1.5, "(<class 'int'>, <class 'NoneType'>)"),
    ("num_cpus", "2", "(<class 'float'>, <class 'int'>, <class 'NoneType'>)"),
    ("num_returns", 2.0, "(<class 'int'>, <class 'str'>, <class 'NoneType'>)"),
    ("name", 5, "(<class 'str'>, <class 'NoneType'>)"),
    ("resources", [("x", 1)], "(<class 'dict'>, <class 'NoneType'>)"),
    ("runtime_env", "env", "(<class 'dict'>, <class 'NoneType'>)"),
    ("retry_exceptions", ValueError, "(<class 'bool'>, <class 'list'>, <class 'tuple'>)"),
    ("scheduling_strategy", 3, str((type(None), str, PlacementGroupSchedulingStrategy,
                                    NodeAffinitySchedulingStrategy))),
])
def test_a_task_option_of_the_wrong_type_is_rays_type_error(key, value, expected):
    message = (f"The type of keyword '{key}' must be {expected}, but received type "
               f"{type(value)}")
    with pytest.raises(TypeError) as decorating:
        shmray.remote(**{key: value})(noop)
    assert str(decorating.value) == message
    with pytest.raises(TypeError) as in_options:
        shmray.remote(noop).options(**{key: value})
    assert str(in_options.value) == message


@pytest.mark.parametrize("key, value", [
    ("namespace", object()), ("lifetime", 1), ("max_restarts", 1.0),
    ("max_concurrency", "4"), ("get_if_exists", 1), ("name", b"svc"),
])
def test_an_actor_option_of_the_wrong_type_is_rays_type_error(key, value):
    with pytest.raises(TypeError, match=f"The type of keyword '{key}' must be"):
        shmray.remote(**{key: value})(Plain)
    with pytest.raises(TypeError, match=f"The type of keyword '{key}' must be"):
        shmray.remote(Plain).options(**{key: value})


@pytest.mark.parametrize("options, message", [
    ({"max_retries": -2}, "The keyword 'max_retries' only accepts None, 0, -1 or a positive "
                          "integer, where -1 represents infinity."),
    ({"max_calls": -1}, "The keyword 'max_calls' only accepts None, 0 or a positive integer."),
    ({"num_cpus": -1}, "The quantity of resource num_cpus cannot be negative"),
    ({"num_gpus": 0.00001}, "The precision of the fractional quantity of resource num_gpus "
                            "cannot go beyond 0.0001"),
    ({"resources": {"CPU": 1}}, "Use the 'num_cpus' and 'num_gpus' keyword instead of 'CPU' "
                                "and 'GPU' in 'resources' keyword"),
    ({"resources": {"disk": -1}}, "The quantity of resource disk cannot be negative"),
    ({"retry_exceptions": [KeyboardInterrupt]},
     "retry_exceptions must be either a boolean or a list of exceptions"),
    ({"num_returns": "many"}, "The keyword 'num_returns' only accepts None, a non-negative "
                              "integer, \"streaming\" (for generators), or \"dynamic\""),
])
def test_a_task_option_with_a_wrong_value_is_rays_value_error(options, message):
    with pytest.raises(ValueError) as info:
        shmray.remote(**options)(noop)
    assert str(info.value) == message


@pytest.mark.parametrize("options, message", [
    ({"lifetime": "forever"},
     "actor `lifetime` argument must be one of 'detached', 'non_detached' and 'None'."),
    ({"max_restarts": -5}, "The keyword 'max_restarts' only accepts None, 0, -1 or a positive "
                           "integer, where -1 represents infinity."),
    ({"get_if_exists": True}, "The actor name must be specified to use `get_if_exists`."),
])
def test_an_actor_option_with_a_wrong_value_is_rays_value_error(options, message):
    with pytest.raises(ValueError) as info:
        shmray.remote(**options)(Plain)
    assert str(info.value) == message


def test_options_refuses_what_only_the_decorator_may_set():
    with pytest.raises(ValueError, match=r"Setting 'max_calls' is not supported in '.options\(\)'"):
        shmray.remote(noop).options(max_calls=1)
    with pytest.raises(ValueError, match="Setting 'concurrency_groups' is not supported"):
        shmray.remote(Plain).options(concurrency_groups={"io": 1})
    with pytest.raises(ValueError, match="Invalid option keyword num_cpu for remote functions"):
        shmray.remote(noop).options(num_cpu=1)


def test_num_returns_none_means_the_default(ray):
    assert ray.get(ray.remote(num_returns=None)(noop).remote(), timeout=DEADLOCK) == 1

    @ray.remote(num_returns=None)
    def count():
        yield 1
        yield 2

    assert [ray.get(ref, timeout=DEADLOCK) for ref in count.remote()] == [1, 2]  # streaming


def test_method_options_are_checked_like_task_options(ray):
    with pytest.raises(TypeError, match="The type of keyword 'max_task_retries' must be"):
        shmray.method(max_task_retries=1.0)
    with pytest.raises(ValueError, match="Invalid option keyword bogus for actor methods"):
        shmray.method(bogus=1)
    handle = ray.remote(Plain).remote()
    with pytest.raises(TypeError, match="The type of keyword 'num_returns' must be"):
        handle.f.options(num_returns=1.0)
    assert ray.get(handle.f.remote(3), timeout=DEADLOCK) == 3


def test_async_def_under_remote_is_rays_value_error():
    with pytest.raises(ValueError, match="'async def' should not be used for remote tasks"):
        @shmray.remote
        async def coroutine():
            return 1
    with pytest.raises(ValueError, match="'async def' should not be used for remote tasks"):
        @shmray.remote(num_cpus=1)
        async def generator():
            yield 1


# -- namespaces --------------------------------------------------------------------------------


def test_namespaces_are_checked_as_ray_checks_them(ray):
    with pytest.raises(TypeError, match="namespace must be None or a string."):
        ray.get_actor("svc", namespace=5)
    with pytest.raises(ValueError, match='"" is not a valid namespace'):
        ray.get_actor("svc", namespace="")


@pytest.mark.parametrize("namespace, error", [(123, TypeError), ("", ValueError)])
def test_init_refuses_a_namespace_that_is_not_a_name(namespace, error):
    with pytest.raises(error, match="namespace"):
        shmray.init(num_cpus=1, namespace=namespace)
    assert not shmray.is_initialized()


# -- arguments checked wherever a function or handle is used ----------------------------------


def test_functions_and_handles_passed_into_a_task_still_check_their_arguments(ray):
    @ray.remote
    def add(x, y=1):
        return x + y

    @ray.remote
    class Adder:
        def add(self, x, *, y=1):
            return x + y

        @staticmethod
        def static(x):
            return x

        @classmethod
        def named(cls, x):
            return f"{cls.__name__}:{x}"

    @ray.remote
    def misuse(function, handle):
        errors = []
        for call in (lambda: function.remote(), lambda: function.remote(1, 2, 3),
                     lambda: handle.add.remote(), lambda: handle.add.remote(1, 2),
                     lambda: handle.static.remote(), lambda: handle.named.remote(1, 2)):
            try:
                call()
                errors.append(None)
            except TypeError as error:
                errors.append(str(error))
        good = [function.remote(1), handle.add.remote(1, y=2), handle.static.remote(4),
                handle.named.remote(5)]
        return errors, shmray.get(good)

    adder = Adder.remote()
    errors, good = ray.get(misuse.remote(add, adder), timeout=DEADLOCK)
    assert errors == [
        "add.remote(): missing a required argument: 'x'",
        "add.remote(): too many positional arguments",
        "Adder.add.remote(): missing a required argument: 'x'",
        "Adder.add.remote(): too many positional arguments",
        "Adder.static.remote(): missing a required argument: 'x'",
        "Adder.named.remote(): too many positional arguments",
    ]
    assert good == [2, 3, 4, "Adder:5"]


def test_a_handle_from_get_actor_checks_arguments(ray):
    created = ray.remote(Plain).options(name="plain").remote()  # noqa: F841 (keeps it)
    found = ray.get_actor("plain")
    with pytest.raises(TypeError, match=r"Plain\.f\.remote\(\): missing a required argument"):
        found.f.remote()
    assert ray.get(found.f.remote(7), timeout=DEADLOCK) == 7


# -- which call runs first ---------------------------------------------------------------------


@pytest.fixture
def gate(tmp_path):
    """A file-backed gate: tasks wait until the test opens it (no sleeps to tune)."""
    path = tmp_path / "open"

    def opened():
        return path.exists()

    yield path, opened
    path.touch()


def _gated_task(ray, opened):
    @ray.remote
    def slow():
        deadline = time.monotonic() + DEADLOCK
        while not opened() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "slow"

    return slow


class Recorder:
    def __init__(self):
        self.seen = []

    def take(self, value):
        self.seen.append(value)
        return value

    def log(self):
        return list(self.seen)


class AsyncRecorder:
    def __init__(self):
        self.seen = []

    async def take(self, value):
        self.seen.append(value)
        return value

    async def log(self):
        return list(self.seen)


@pytest.mark.parametrize("kind", ["threaded", "async", "groups"])
def test_threaded_and_async_actors_run_a_ready_call_ahead_of_one_waiting(ray, gate, kind):
    path, opened = gate
    slow = _gated_task(ray, opened)
    if kind == "threaded":
        actor = ray.remote(max_concurrency=2)(Recorder).remote()
    elif kind == "groups":
        actor = ray.remote(concurrency_groups={"io": 1})(Recorder).remote()
    else:
        actor = ray.remote(AsyncRecorder).remote()
    waiting = actor.take.remote(slow.remote())
    ready_by_value = actor.take.remote("plain")
    ready_by_ref = actor.take.remote(ray.put("put"))
    assert ray.get([ready_by_value, ready_by_ref], timeout=DEADLOCK) == ["plain", "put"]
    assert ray.wait([waiting], timeout=0)[0] == []
    path.touch()
    assert ray.get(waiting, timeout=DEADLOCK) == "slow"
    assert ray.get(actor.log.remote(), timeout=DEADLOCK) == ["plain", "put", "slow"]


def test_a_sync_actor_keeps_each_callers_order(ray, gate):
    path, opened = gate
    slow = _gated_task(ray, opened)
    actor = ray.remote(Recorder).remote()
    first = actor.take.remote(slow.remote())
    second = actor.take.remote("plain")
    assert ray.wait([second], timeout=0.5)[0] == []  # behind the first, as in Ray
    path.touch()
    assert ray.get([first, second], timeout=DEADLOCK) == ["slow", "plain"]
    assert ray.get(actor.log.remote(), timeout=DEADLOCK) == ["slow", "plain"]


def test_calls_waiting_for_arguments_are_owed_when_the_last_handle_goes(ray, gate):
    path, opened = gate
    slow = _gated_task(ray, opened)

    @ray.remote
    def failing():
        raise KeyError("no such argument")

    actor = ray.remote(max_concurrency=2)(Recorder).remote()
    owed = actor.take.remote(slow.remote())
    doomed = actor.take.remote(failing.remote())
    del actor  # its process must run the call still waiting before it ends
    with pytest.raises(KeyError, match="no such argument"):
        ray.get(doomed, timeout=DEADLOCK)
    path.touch()
    assert ray.get(owed, timeout=DEADLOCK) == "slow"


def test_a_call_waiting_for_arguments_fails_with_its_actor(ray, gate):
    path, opened = gate
    slow = _gated_task(ray, opened)
    actor = ray.remote(AsyncRecorder).remote()
    waiting = actor.take.remote(slow.remote())
    ray.kill(actor)
    path.touch()
    with pytest.raises(exceptions.ActorDiedError):
        ray.get(waiting, timeout=DEADLOCK)
    assert os.path.exists(path)
