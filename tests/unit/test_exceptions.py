import pickle
import sys

import pytest

from shmray.exceptions import RayError, RayTaskError


class CustomError(Exception):
    def __init__(self, a, b):
        super().__init__(a, b)
        self.extra = a + b


def _remote_failure(cause):
    return RayTaskError("f", "Traceback (most recent call last):\n  ...\nValueError: boom\n",
                        cause, None, 1234)


def test_dual_instance_of_ray_task_error_and_cause():
    err = _remote_failure(ValueError("boom")).as_instanceof_cause()
    assert isinstance(err, RayTaskError)
    assert isinstance(err, ValueError)
    assert isinstance(err, RayError)
    with pytest.raises(ValueError) as info:
        raise err
    assert "f()" in str(info.value) and "boom" in str(info.value)


def test_cause_with_custom_init_and_attributes():
    err = _remote_failure(CustomError(1, 2)).as_instanceof_cause()
    assert isinstance(err, CustomError)
    assert err.extra == 3
    assert err.cause.args == (1, 2)


def test_dual_error_pickles():
    err = _remote_failure(KeyError("k")).as_instanceof_cause()
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, KeyError) and isinstance(back, RayTaskError)
    assert back.traceback_str == err.traceback_str


def test_without_cause_stays_plain():
    err = RayTaskError("g", "tb", None).as_instanceof_cause()
    assert type(err) is RayTaskError


def test_every_error_class_is_raised_somewhere_or_says_it_never_is():
    """A class Ray's users catch but shmray never raises must say so (and when Ray raises
    it); every other class must be made somewhere in shmray's code."""
    import ast
    import pathlib

    from shmray import exceptions

    package = pathlib.Path(exceptions.__file__).parent
    made = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                made.add(func.attr if isinstance(func, ast.Attribute) else
                         getattr(func, "id", None))
    wrong = []
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        says_never = "never raised" in " ".join((cls.__doc__ or "").split())
        if says_never == (name in made):
            wrong.append(name)
    assert wrong == [], "raised but documented as never, or never raised and not documented"


def test_header_is_rays_and_heads_each_traceback():
    err = RayTaskError("f", "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                       "ValueError: boom\n", ValueError("boom"), None, 42, "127.0.0.1",
                       "A(x=1)", "ab" * 14)
    assert str(err) == (f"ray::f() (pid=42, ip=127.0.0.1, actor_id={'ab' * 14}, repr=A(x=1))\n"
                        "  File \"x.py\", line 1, in f\nValueError: boom")
    group_text = "  + Exception Group Traceback (most recent call last):\n  | ExceptionGroup: g"
    assert str(RayTaskError("g", group_text, None, None, 7)).startswith(
        "ray::g() (pid=7, ip=127.0.0.1)\n")


def test_dual_of_a_failure_that_passed_through_a_task_is_the_innermost_class():
    inner = _remote_failure(KeyError("k")).as_instanceof_cause()
    outer = RayTaskError("g", "tb", inner).as_instanceof_cause()
    assert isinstance(outer, KeyError) and outer.cause is inner
    back = pickle.loads(pickle.dumps(outer))
    assert isinstance(back, KeyError) and isinstance(back.cause, RayTaskError)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is Python 3.11+")
def test_dual_exception_group_pickles():
    group = ExceptionGroup("g", [ValueError(1)])  # noqa: F821
    back = pickle.loads(pickle.dumps(_remote_failure(group).as_instanceof_cause()))
    assert isinstance(back, ExceptionGroup) and back.message == "g"  # noqa: F821
    assert [type(e) for e in back.exceptions] == [ValueError]


class ReadOnlyArgs(Exception):
    def __init__(self, code):
        super().__init__()
        self.code = code

    @property
    def args(self):
        return (self.code,)


def test_cause_with_read_only_args_rebuilds_by_state():
    from shmray.exceptions import portable_exception

    portable = portable_exception(ReadOnlyArgs(5))
    dual = pickle.loads(pickle.dumps(_remote_failure(portable).as_instanceof_cause()))
    assert isinstance(dual, ReadOnlyArgs) and dual.code == 5 and dual.cause.args == (5,)
