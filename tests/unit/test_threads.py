"""_threads' decisions, on fake libraries: what each pool is sized to, whose setting wins,
and that a task of the size already in force costs no call into threadpoolctl."""

import sys

import pytest

from shmray import _threads

ONE = {"CPU": 1.0}


class FakeLibrary:
    def __init__(self, internal_api):
        self.internal_api = internal_api
        self.sizes = []

    def set_num_threads(self, n):
        self.sizes.append(n)


class FakeController:
    searches = 0
    libraries = []

    def __init__(self):
        FakeController.searches += 1
        self.lib_controllers = FakeController.libraries


@pytest.fixture
def libraries(monkeypatch):
    """An OpenBLAS, an MKL and an OpenMP runtime, loaded in a process with no user
    setting, as the scheduler sees them before its first fork; module state and the
    environment are put back afterwards."""
    for name in _threads.VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(_threads.threadpoolctl, "ThreadpoolController", FakeController)
    monkeypatch.setattr(FakeController, "searches", 0)
    found = {api: FakeLibrary(api) for api in ("openblas", "mkl", "openmp")}
    monkeypatch.setattr(FakeController, "libraries", list(found.values()))
    for name, value in (("_modules_seen", -1), ("_controller", None), ("_user", None),
                        ("_last", (None, None)), ("_sized_for", None)):
        monkeypatch.setattr(_threads, name, value)
    return found


def sizes(libraries):
    return {api: library.sizes[-1] if library.sizes else None
            for api, library in libraries.items()}


def test_pools_follow_the_cpus_a_task_holds_rounded_down_at_least_one(libraries):
    for cpus, expected in ((1.0, 1), (2.0, 2), (0.5, 1), (0.0, 1), (2.5, 2), (3.0, 3)):
        _threads.fit({"CPU": cpus} if cpus else {})
        assert sizes(libraries) == dict.fromkeys(libraries, expected)
        assert _threads.os.environ["OMP_NUM_THREADS"] == str(expected)


def test_a_task_of_the_size_in_force_calls_nothing(libraries):
    _threads.fit(ONE)
    calls = sum(len(library.sizes) for library in libraries.values())
    for _ in range(3):
        _threads.fit(ONE)
        _threads.fit({"CPU": 1.0})  # another dict of the same size
        _threads.fit({"CPU": 1.0}, {"UNRELATED": "x"})
    assert sum(len(library.sizes) for library in libraries.values()) == calls
    assert FakeController.searches == 1


def test_libraries_are_looked_for_again_only_after_an_import(libraries, monkeypatch):
    _threads.fit(ONE)
    _threads.fit({"CPU": 2.0})
    assert FakeController.searches == 1
    monkeypatch.setitem(sys.modules, "a_module_a_task_imported", object())
    _threads.fit(ONE)
    assert FakeController.searches == 2


def test_each_pool_keeps_the_variable_the_user_set_for_it(libraries):
    _threads.fit({"CPU": 2.0}, {"OPENBLAS_NUM_THREADS": "1"})
    assert sizes(libraries) == {"openblas": 1, "mkl": 2, "openmp": 2}
    _threads.fit({"CPU": 2.0}, {"OMP_NUM_THREADS": "3,1"})  # the outer level
    assert sizes(libraries) == {"openblas": 3, "mkl": 3, "openmp": 3}
    _threads.fit({"CPU": 2.0}, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "2"})
    assert sizes(libraries) == {"openblas": 1, "mkl": 2, "openmp": 1}
    _threads.fit({"CPU": 2.0})  # the next task without them: its CPUs again
    assert sizes(libraries) == {"openblas": 2, "mkl": 2, "openmp": 2}


def test_the_scheduler_sizes_pools_for_the_usual_task_before_its_first_fork(libraries):
    _threads.before_fork()
    assert sizes(libraries) == {"openblas": 1, "mkl": 1, "openmp": 1}
    assert _threads.os.environ["OMP_NUM_THREADS"] == "1"
    calls = sum(len(library.sizes) for library in libraries.values())
    _threads.before_fork()  # the next forks: nothing to do
    _threads.fit(_threads.P.LEASE_SHAPE)  # a worker's usual task: nothing either
    assert sum(len(library.sizes) for library in libraries.values()) == calls
    assert FakeController.searches == 1


def test_the_users_environment_at_the_first_fork_wins_and_is_kept(libraries, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _threads.before_fork()
    _threads.fit({"CPU": 2.0})
    assert sizes(libraries) == {"openblas": 1, "mkl": 1, "openmp": 1}
    assert _threads.os.environ["OMP_NUM_THREADS"] == "1"


def test_a_value_the_libraries_would_ignore_leaves_that_pool_alone(libraries):
    _threads.fit({"CPU": 2.0}, {"OPENBLAS_NUM_THREADS": "many", "MKL_NUM_THREADS": "0"})
    assert sizes(libraries) == {"openblas": None, "mkl": None, "openmp": 2}
