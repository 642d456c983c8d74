import pickle

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
