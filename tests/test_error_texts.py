"""Errors as Ray raises them: the class a caller catches, and the text it reads.

End to end through real workers and actors.  Texts are Ray's where Ray has one: the
``ray::f() (pid=..., ip=...)`` header of a task's error, the failed-argument line, the
serialization errors of put() and of arguments, the error for a cause that can't be
pickled; each test says which.
"""

import os
import re
import sys
import threading

import pytest

import shmray
from shmray import exceptions

DEADLOCK = 60
SHMRAY_DIR = os.path.dirname(shmray.__file__)


def _error(ref, catch=exceptions.RayTaskError):
    with pytest.raises(catch) as info:
        shmray.get(ref, timeout=DEADLOCK)
    return info.value


# -- str(RayTaskError): Ray's header, the user's frames -----------------------------------


def test_task_error_text_is_rays_header_over_the_users_frames(ray):
    @ray.remote
    def f():
        raise ValueError("the real error")

    error = _error(f.remote())
    text = str(error)
    lines = text.split("\n")
    assert re.fullmatch(r"ray::f\(\) \(pid=(\d+), ip=127\.0\.0\.1\)", lines[0]), lines[0]
    assert int(lines[0].split("pid=")[1].split(",")[0]) == error.pid != os.getpid()
    assert lines[1].startswith(f'  File "{__file__}", line ') and lines[1].endswith(", in f")
    assert lines[2] == '    raise ValueError("the real error")'
    assert lines[-1] == "ValueError: the real error"
    assert "Traceback (most recent call last)" not in text
    assert SHMRAY_DIR not in text  # the worker's own frames are left out, as Ray's are
    assert isinstance(error, ValueError) and error.function_name == "f"


def test_actor_method_error_header_names_the_actor_id_and_repr(ray):
    @ray.remote
    class Counter:
        def __init__(self):
            self.count = 7

        def fail(self):
            raise KeyError("k")

        def __repr__(self):
            return f"Counter(count={self.count})"

    counter = Counter.remote()
    error = _error(counter.fail.remote(), KeyError)
    first = str(error).split("\n")[0]
    assert first == (f"ray::Counter.fail() (pid={error.pid}, ip=127.0.0.1, "
                     f"actor_id={counter._actor_id.hex()}, repr=Counter(count=7))")
    assert SHMRAY_DIR not in str(error)


def test_chained_exceptions_keep_both_tracebacks_each_under_the_header(ray):
    @ray.remote
    def f():
        try:
            {}["missing"]
        except KeyError as exc:
            raise RuntimeError("while looking it up") from exc

    text = str(_error(f.remote(), RuntimeError))
    assert text.count("ray::f() (pid=") == 2  # Ray heads each traceback of the chain
    assert "KeyError: 'missing'" in text and "direct cause of the following" in text
    assert text.endswith("RuntimeError: while looking it up")
    assert "Traceback (most recent call last)" not in text


# -- a task whose argument failed ----------------------------------------------------------


def test_failed_argument_text_is_rays(ray):
    @ray.remote
    def f():
        raise ValueError("the real error")

    @ray.remote
    def g(x):
        return x

    error = _error(g.remote(f.remote()), ValueError)  # still the user's class
    lines = str(error).split("\n")
    assert re.fullmatch(r"ray::g\(\) \(pid=\d+, ip=127\.0\.0\.1\)", lines[0]), lines[0]
    assert lines[1] == ("  At least one of the input arguments for this task could not be "
                        "computed:")
    assert re.fullmatch(r"shmray\.exceptions\.RayTaskError: ray::f\(\) \(pid=\d+, "
                        r"ip=127\.0\.0\.1\)", lines[2]), lines[2]
    assert lines[-1] == "ValueError: the real error"
    assert error.function_name == "g"
    assert isinstance(error.cause, exceptions.RayTaskError)
    assert error.cause.function_name == "f"


def test_failed_argument_of_an_actor_call_and_of_a_chain(ray):
    @ray.remote
    def f():
        raise ValueError("root")

    @ray.remote
    def g(x):
        return x

    @ray.remote
    class Taker:
        def take(self, x):
            return x

    failed = f.remote()
    shmray.wait([failed], timeout=DEADLOCK)  # failed already: decided at submission
    text = str(_error(Taker.remote().take.remote(failed), ValueError))
    assert text.startswith("ray::Taker.take() (pid=")
    assert "At least one of the input arguments" in text

    text = str(_error(g.remote(g.remote(failed)), ValueError))
    assert text.count("At least one of the input arguments") == 2
    assert text.endswith("ValueError: root")


def test_a_failed_argument_that_is_not_a_task_error_arrives_as_it_is(ray):
    @ray.remote(max_retries=0)
    def crashes():
        os._exit(1)

    @ray.remote
    def g(x):
        return x

    error = _error(g.remote(crashes.remote()), exceptions.WorkerCrashedError)
    assert not isinstance(error, exceptions.RayTaskError)


# -- exceptions that aren't plain Exceptions -----------------------------------------------


class BaseOnly(BaseException):
    pass


def test_base_exception_subclass_is_catchable_as_its_class(ray):
    @ray.remote
    def f():
        raise BaseOnly("not an Exception")

    error = _error(f.remote(), BaseOnly)
    assert isinstance(error, exceptions.RayTaskError)
    assert str(error).endswith("BaseOnly: not an Exception")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is Python 3.11+")
def test_exception_group_is_catchable_as_a_group_and_splits(ray):
    @ray.remote
    def f():
        raise ExceptionGroup("several", [ValueError(1), TypeError(2)])  # noqa: F821

    error = _error(f.remote(), ExceptionGroup)  # noqa: F821
    assert isinstance(error, exceptions.RayTaskError)
    assert [type(e) for e in error.exceptions] == [ValueError, TypeError]
    assert str(error).startswith("ray::f() (pid=")
    # What ``except* ValueError`` does with it (written so, the module wouldn't import on
    # Python < 3.11):
    values, rest = error.split(ValueError)
    assert [type(e) for e in values.exceptions] == [ValueError]
    assert [type(e) for e in rest.exceptions] == [TypeError]


class ReadOnlyArgs(Exception):
    def __init__(self, code):
        super().__init__()
        self.code = code

    @property
    def args(self):
        return (self.code,)


def test_exception_with_a_read_only_args_property_keeps_its_class(ray):
    @ray.remote
    def f():
        raise ReadOnlyArgs(5)

    error = _error(f.remote(), ReadOnlyArgs)
    assert error.code == 5 and error.cause.code == 5
    assert error.args == (error.cause,)  # Ray's dual error's args


class Final(Exception):
    def __init_subclass__(cls, **kwargs):
        raise TypeError("Final can't be subclassed")


def test_a_class_that_cannot_be_subclassed_arrives_as_ray_task_error_with_a_warning(
        ray, caplog):
    @ray.remote
    def f():
        raise Final("no dual for me")

    error = _error(f.remote())
    assert "can't be subclassed! This exception is raised as RayTaskError only" in caplog.text
    assert type(error) is exceptions.RayTaskError
    assert isinstance(error.cause, Final) and error.cause.args == ("no dual for me",)


def test_make_dual_exception_instance():
    error = exceptions.RayTaskError("f", "Traceback (most recent call last):\nKeyError: 'k'",
                                    KeyError("k"))
    dual = error.make_dual_exception_instance()
    assert isinstance(dual, KeyError) and isinstance(dual, exceptions.RayTaskError)
    assert type(dual).__name__ == "RayTaskError(KeyError)"
    assert str(dual) == str(error) and dual.cause is error.cause
    with pytest.raises(TypeError):
        exceptions.RayTaskError("f", "tb", Final("x")).make_dual_exception_instance()


# -- exceptions that can't be pickled, or rebuilt ------------------------------------------


class HoldsALock(Exception):
    def __init__(self):
        super().__init__("has a lock")
        self.lock = threading.Lock()


def test_an_exception_that_cannot_be_pickled_becomes_a_ray_error_saying_so(ray):
    @ray.remote
    def f():
        raise HoldsALock()

    error = _error(f.remote())
    assert type(error) is exceptions.RayTaskError  # as in Ray: the cause is a RayError
    assert type(error.cause) is exceptions.RayError
    assert str(error.cause) == (
        f"The original cause of the RayTaskError ({HoldsALock!r}) isn't serializable: "
        "cannot pickle '_thread.lock' object. Overwriting the cause to a RayError.")
    assert str(error).endswith("HoldsALock: has a lock")  # the user's traceback is kept


# -- KeyboardInterrupt and SystemExit in tasks and actors ----------------------------------


def test_keyboard_interrupt_in_a_task_is_task_cancelled(ray):
    @ray.remote(max_retries=2, retry_exceptions=True)
    def f():
        raise KeyboardInterrupt

    error = _error(f.remote(), exceptions.TaskCancelledError)
    assert not isinstance(error, exceptions.RayTaskError)


def test_keyboard_interrupt_in_an_actor_method_is_task_cancelled(ray):
    @ray.remote
    class A:
        def interrupted(self):
            raise KeyboardInterrupt

        def ping(self):
            return "pong"

    a = A.remote()
    _error(a.interrupted.remote(), exceptions.TaskCancelledError)
    assert shmray.get(a.ping.remote(), timeout=DEADLOCK) == "pong"


def test_sys_exit_in_a_task_is_retried_like_a_crash(ray, tmp_path):
    """Ray counts a worker that exited as a system failure: max_retries applies."""
    marker = tmp_path / "exited-once"

    @ray.remote(max_retries=1)
    def exits_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            sys.exit(0)
        return "second attempt"

    assert shmray.get(exits_once.remote(str(marker)), timeout=DEADLOCK) == "second attempt"


def test_sys_exit_in_an_actor_method_ends_the_actor(ray):
    @ray.remote
    class A:
        def quit(self):
            sys.exit(0)

        def ping(self):
            return "pong"

    a = A.remote()
    error = _error(a.quit.remote(), exceptions.ActorDiedError)
    assert "sys.exit()" in str(error)
    _error(a.ping.remote(), exceptions.ActorDiedError)


# -- serialization errors of put() and of arguments (Ray's texts) --------------------------


def test_put_of_a_value_that_cannot_be_pickled(ray):
    with pytest.raises(TypeError) as info:
        shmray.put(threading.Lock())
    text = str(info.value)
    assert re.match(r"Could not serialize the put value <unlocked _thread\.lock object at "
                    r"0x[0-9a-f]+>:\nChecking serializability of 'lock'\n", text), text
    assert "cannot pickle '_thread.lock' object" in text  # inspect_serializability's report


def test_argument_that_cannot_be_pickled_names_the_function_or_method(ray):
    @ray.remote
    def g(x):
        return x

    @ray.remote
    class A:
        def __init__(self, x=None):
            pass

        def m(self, x):
            return x

    lock = threading.Lock()
    fn = g._function
    for call, callee in [(lambda: g.remote(lock), f"{fn.__module__}.{fn.__qualname__}"),
                         (lambda: A.remote(lock), f"{__name__}.{A._cls.__qualname__}.__init__"),
                         (lambda: A.remote().m.remote(x=lock), "A.m")]:
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value).startswith(
            f"Could not serialize the argument {lock!r} for a task or actor {callee}:\n"
            "Checking serializability of 'lock'\n"), str(info.value)
        assert "cannot pickle '_thread.lock' object" in str(info.value)


# -- refs and handles used after their session ended ---------------------------------------


def test_refs_and_handles_of_a_session_that_was_shut_down():
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        @shmray.remote
        class A:
            def ping(self):
                return "pong"

        @shmray.remote
        def f(x):
            return x

        ref, actor = shmray.put(1), A.remote()
        shmray.get(actor.ping.remote(), timeout=DEADLOCK)
    finally:
        shmray.shutdown()
    handle_gone = r"Actor handle Actor\(A, [0-9a-f]+\) belongs to a shmray session that " \
                  r"has been shut down"
    try:  # get() and remote() start a session if none runs (as Ray's do): not one for these
        with pytest.raises(exceptions.RaySystemError, match="whose owner is unknown"):
            shmray.get(ref)
        with pytest.raises(exceptions.RaySystemError, match=handle_gone):
            actor.ping.remote()
        with pytest.raises(exceptions.RaySystemError, match=handle_gone):
            shmray.kill(actor)
        with pytest.raises(exceptions.RaySystemError, match="whose owner is unknown"):
            f.remote(ref)
        # Inside a value, as what makes the value unpicklable (its pickling raises it):
        with pytest.raises(TypeError, match=r"(?s)argument \[ObjectRef.*whose owner is unknown"):
            f.remote([ref])
        with pytest.raises(TypeError, match=r"(?s)put value \{'ref'.*whose owner is unknown"):
            shmray.put({"ref": ref})
    finally:
        shmray.shutdown()


# -- the names Ray exports -----------------------------------------------------------------

RAY_EXCEPTIONS = {  # every class ray.exceptions exports, with its bases there
    "RayError": (Exception,), "RayTaskError": ("RayError",), "RayActorError": ("RayError",),
    "TaskCancelledError": ("RayError",), "TaskUnschedulableError": ("RayError",),
    "ActorDiedError": ("RayActorError",), "ActorUnschedulableError": ("RayError",),
    "ActorUnavailableError": ("RayActorError",), "AsyncioActorExit": ("RayError",),
    "LocalRayletDiedError": ("RayError",), "WorkerCrashedError": ("RayError",),
    "TaskPlacementGroupRemoved": ("RayError",), "ActorPlacementGroupRemoved": ("RayError",),
    "ObjectStoreFullError": ("RayError",), "OutOfDiskError": ("RayError",),
    "OutOfMemoryError": ("RayError",), "ObjectLostError": ("RayError",),
    "ObjectFetchTimedOutError": ("ObjectLostError",), "GetTimeoutError": ("RayError",
                                                                         TimeoutError),
    "OwnerDiedError": ("ObjectLostError",), "ObjectFreedError": ("ObjectLostError",),
    "ReferenceCountingAssertionError": ("ObjectLostError", AssertionError),
    "PendingCallsLimitExceeded": ("RayError",), "PlasmaObjectNotAvailable": ("RayError",),
    "ObjectReconstructionFailedError": ("ObjectLostError",),
    "ObjectReconstructionFailedMaxAttemptsExceededError": ("ObjectLostError",),
    "ObjectReconstructionFailedLineageEvictedError": ("ObjectLostError",),
    "RayChannelError": ("RaySystemError",),
    "RayChannelTimeoutError": ("RayChannelError", TimeoutError),
    "RayCgraphCapacityExceeded": ("RaySystemError",), "RuntimeEnvSetupError": ("RayError",),
    "CrossLanguageError": ("RayError",), "RaySystemError": ("RayError",),
    "NodeDiedError": ("RayError",), "UnserializableException": ("RayError",),
    "AuthenticationError": ("RayError",), "ObjectRefStreamEndOfStreamError": ("RayError",),
    "OufOfBandObjectRefSerializationException": ("RayError",),
}


@pytest.mark.parametrize("name", sorted(RAY_EXCEPTIONS))
def test_every_class_ray_exports_is_there_with_its_bases(name):
    cls = getattr(exceptions, name)
    assert name in exceptions.__all__
    for base in RAY_EXCEPTIONS[name]:
        assert issubclass(cls, getattr(exceptions, base) if isinstance(base, str) else base)
