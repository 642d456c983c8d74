"""joblib's ``Parallel`` on shmray (``shmray.util.joblib``), against joblib's default backend.

Each behaviour test runs twice: under ``"loky"`` (joblib's default, the reference) and under
``"shmray"``; a difference shows as one failing parameter.
"""

import contextlib
import os
import time

import numpy as np
import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed  # noqa: E402
from joblib.externals.loky import get_reusable_executor  # noqa: E402

import shmray  # noqa: E402
from shmray.util.joblib import register_shmray  # noqa: E402

MiB = 1 << 20

register_shmray()


@contextlib.contextmanager
def loky_reference(monkeypatch, folder):
    """joblib's default backend, tidied for conftest's watch on /dev/shm: its memmaps go to
    ``folder``, and its workers end with the test, with the semaphores they made."""
    monkeypatch.setenv("JOBLIB_TEMP_FOLDER", str(folder))
    before = set(os.listdir("/dev/shm"))
    try:
        with joblib.parallel_backend("loky", max_nbytes="1M"):
            yield
    finally:
        get_reusable_executor().shutdown(wait=True, kill_workers=True)
        # loky's resource tracker unlinks them shortly after; they are the reference's.
        for name in set(os.listdir("/dev/shm")) - before:
            if name.startswith(f"sem.loky-{os.getpid()}-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join("/dev/shm", name))


@pytest.fixture(params=["loky", "shmray"])
def backend(request, monkeypatch, tmp_path):
    """The backend's name, inside ``parallel_backend``; for shmray, a session of 2 CPUs."""
    if request.param == "loky":
        with loky_reference(monkeypatch, tmp_path):
            yield "loky"
        return
    shmray.init(num_cpus=2, object_store_memory=150 * MiB)
    try:
        with joblib.parallel_backend("shmray"):
            yield "shmray"
        shmray._context.runtime.store.check()
    finally:
        shmray.shutdown()


def scaled(x, factor, offset=None):
    out = x * factor
    if offset is not None:
        out = out + offset
    return out


def fail_on(i, bad):
    if i == bad:
        raise ValueError(f"bad item {i}")
    return i


def test_numpy_workload_gives_the_reference_results(backend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=MiB // 4)        # 2 MiB: goes through the store under shmray
    offset = rng.normal(size=MiB // 4)   # a large keyword argument too
    small = np.arange(10.0)               # stays in the batch
    expected = [scaled(x, i, offset) for i in range(7)] + [scaled(small, 3)]
    got = Parallel(n_jobs=2)([delayed(scaled)(x, i, offset=offset) for i in range(7)]
                             + [delayed(scaled)(small, 3)])
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_a_reused_parallel_sees_arrays_changed_between_calls(backend):
    """Where shmray differs on purpose: joblib's default backend, reused, passes the memmap
    it made at the first call for an array changed in place since; shmray puts the array
    afresh at each call."""
    x = np.zeros(MiB // 4)
    with Parallel(n_jobs=2) as parallel:
        assert parallel(delayed(np.sum)(x) for _ in range(2)) == [0.0, 0.0]
        x += 1
        expected = 0.0 if backend == "loky" else x.size
        assert parallel(delayed(np.sum)(x) for _ in range(2)) == [expected, expected]


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_return_as_generator(backend, return_as):
    results = Parallel(n_jobs=2, return_as=return_as)(delayed(pow)(i, 2) for i in range(20))
    assert not isinstance(results, list)
    got = list(results)
    expected = [i * i for i in range(20)]
    assert (got if return_as == "generator" else sorted(got)) == expected


def test_error_arrives_as_the_original_exception(backend):
    with pytest.raises(ValueError, match="bad item 3") as info:
        Parallel(n_jobs=2)(delayed(fail_on)(i, 3) for i in range(8))
    assert type(info.value) is ValueError
    assert "fail_on" in str(info.value.__cause__)  # the remote traceback


def test_parallel_is_usable_again_after_an_error(backend):
    with pytest.raises(ValueError):
        Parallel(n_jobs=2)(delayed(fail_on)(i, 0) for i in range(8))
    assert Parallel(n_jobs=2)(delayed(pow)(i, 2) for i in range(8)) == [i * i for i in range(8)]


@pytest.mark.parametrize("batch_size", ["auto", 1, 3])
def test_batch_size(backend, batch_size):
    got = Parallel(n_jobs=2, batch_size=batch_size)(delayed(pow)(i, 3) for i in range(50))
    assert got == [i ** 3 for i in range(50)]


@pytest.mark.parametrize("n_jobs", [1, 2, 5, -1, -2])
def test_n_jobs_values(backend, n_jobs):
    got = Parallel(n_jobs=n_jobs)(delayed(pow)(i, 2) for i in range(10))
    assert got == [i * i for i in range(10)]


def test_n_jobs_zero_is_refused(backend):
    with pytest.raises(ValueError, match="n_jobs == 0"):
        Parallel(n_jobs=0)(delayed(pow)(i, 2) for i in range(3))


def inner_sum(n):
    return sum(Parallel(n_jobs=2)(delayed(pow)(j, 2) for j in range(n)))


def inner_sum_unordered(n):
    return sum(Parallel(n_jobs=2, return_as="generator_unordered")(
        delayed(pow)(j, 2) for j in range(n)))


@pytest.mark.parametrize("inner", [inner_sum, inner_sum_unordered])
def test_nested_parallel_gives_the_reference_results(backend, inner):
    assert Parallel(n_jobs=2)(delayed(inner)(n) for n in range(8)) == [
        sum(j * j for j in range(n)) for n in range(8)]


# -- shmray only ------------------------------------------------------------------------


@pytest.fixture
def session():
    shmray.init(num_cpus=2, object_store_memory=150 * MiB)
    try:
        with joblib.parallel_backend("shmray"):
            yield shmray
    finally:
        shmray.shutdown()


def test_results_leave_the_store_once_the_caller_drops_them(session):
    """The thread that runs joblib's callbacks held the last future, and with it the last
    result, pinned in the store while it idled (up to a second, or until the next call)."""
    out = Parallel(n_jobs=2)(delayed(scaled)(np.ones(MiB // 2), 2) for _ in range(4))
    assert [a[0] for a in out] == [2.0] * 4
    del out
    store = shmray._context.runtime.store
    deadline = time.monotonic() + 0.6  # well within the callback thread's idle second
    while store.list() and time.monotonic() < deadline:
        shmray._context.runtime.settle()
        time.sleep(0.02)
    assert store.list() == []


def test_n_jobs_minus_one_means_the_sessions_cpus(session):
    assert joblib.effective_n_jobs(-1) == 2
    assert joblib.effective_n_jobs(-2) == 1
    assert joblib.effective_n_jobs(-5) == 1


def test_one_job_runs_in_the_caller(session):
    assert Parallel(n_jobs=1)(delayed(os.getpid)() for _ in range(3)) == [os.getpid()] * 3
    assert os.getpid() not in Parallel(n_jobs=2)(delayed(os.getpid)() for _ in range(3))


def where(x):
    return x.ctypes.data, x.flags.writeable


def test_a_large_argument_goes_into_the_store_once(session):
    x = np.ones(4 * MiB // 8)
    seen = Parallel(n_jobs=2, batch_size=1)(delayed(where)(x) for _ in range(6))
    # Every task saw the same read-only bytes of the arena: one put, no copies.
    assert len(set(seen)) == 1
    assert seen[0][1] is False


def timed_sleep(path, caller):
    start = time.monotonic()
    time.sleep(0.05)
    with open(path, "a") as f:
        f.write(f"{caller} {os.getpid()} {start} {time.monotonic()}\n")


def outer(path, n):
    Parallel(n_jobs=2)(delayed(timed_sleep)(path, os.getpid()) for _ in range(n))


def test_nested_parallel_runs_on_the_sessions_cpus_only(session, tmp_path):
    """Two CPUs, two outer tasks, each with a nested Parallel(n_jobs=2): the nested tasks
    run as tasks of the session (not threads of the outer task), while the outer tasks wait
    lending their CPUs, so no more than two compute at any time, and nothing deadlocks."""
    path = str(tmp_path / "spans")
    Parallel(n_jobs=2, batch_size=1)(delayed(outer)(path, 4) for _ in range(2))
    spans = [line.split() for line in open(path).read().splitlines()]
    assert len(spans) == 8
    assert all(caller != pid for caller, pid, _, _ in spans)
    events = sorted([(float(s), 1) for _, _, s, _ in spans]
                    + [(float(e), -1) for _, _, _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2


def test_a_parallel_inside_a_task_works_without_registering(session):
    @shmray.remote
    def task():
        with joblib.parallel_backend("loky"):  # a task's own choice still holds
            return Parallel(n_jobs=1)(delayed(pow)(i, 2) for i in range(4))

    assert shmray.get(task.remote(), timeout=60) == [0, 1, 4, 9]


def test_grid_search_gives_the_reference_best_params(monkeypatch, tmp_path):
    sklearn = pytest.importorskip("sklearn")
    del sklearn
    from sklearn.datasets import make_classification
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = make_classification(n_samples=200, n_features=8, random_state=0)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.01]}

    def search():
        return GridSearchCV(SVC(), grid, cv=3, n_jobs=2).fit(X, y).best_params_

    with loky_reference(monkeypatch, tmp_path):
        reference = search()
    shmray.init(num_cpus=2, object_store_memory=150 * MiB)
    try:
        with joblib.parallel_backend("shmray"):
            assert search() == reference
    finally:
        shmray.shutdown()


def test_local_mode_runs_every_call_in_the_driver():
    shmray.init(num_cpus=2, local_mode=True)
    try:
        with joblib.parallel_backend("shmray"):
            assert Parallel(n_jobs=2)(delayed(os.getpid)() for _ in range(3)) == [
                os.getpid()] * 3
            assert Parallel(n_jobs=2)(delayed(inner_sum)(n) for n in range(5)) == [
                0, 0, 1, 5, 14]
    finally:
        shmray.shutdown()


def test_shmray_imports_joblib_only_when_asked():
    import subprocess
    import sys

    code = ("import sys, shmray, shmray.util; "
            "assert 'joblib' not in sys.modules, 'imported joblib'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
