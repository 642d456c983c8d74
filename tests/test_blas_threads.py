"""BLAS and OpenMP thread pools follow ``num_cpus``: each task and actor runs with its pools
limited to the CPUs it holds (at least one), set at run time in the process that runs it,
unless the user set OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS, which win.
And a driver that ran multithreaded BLAS before ``init`` forks safely."""

import os
import subprocess
import sys
import textwrap

import pytest
import threadpoolctl

import shmray
from shmray._threads import VARIABLES

pytestmark = pytest.mark.skipif(
    not any(info["user_api"] == "blas" for info in threadpoolctl.threadpool_info()),
    reason="threadpoolctl finds no BLAS in this numpy (before 3.5 it missed numpy 2's)")


def blas_threads():
    """What this process's BLAS pools run with, and the OMP_NUM_THREADS it sees."""
    counts = {info["num_threads"] for info in threadpoolctl.threadpool_info()
              if info["user_api"] == "blas"}
    return counts, os.environ.get("OMP_NUM_THREADS"), os.getpid()


@pytest.fixture
def no_user_settings(monkeypatch):
    """The suite's own environment must not decide: no thread variable is set (restored
    afterwards)."""
    for name in VARIABLES:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def ray(no_user_settings):
    with shmray.init(num_cpus=2, object_store_memory=100 << 20):
        yield shmray


def test_each_task_runs_with_as_many_blas_threads_as_cpus_it_holds(ray):
    """Tasks of different sizes, one after another, on workers that are reused: each sees
    its own size (a fraction or zero: one thread), and OMP_NUM_THREADS says it, as in Ray."""
    probe = ray.remote(blas_threads)
    seen = {}
    for num_cpus in (1, 2, 1, 0.5, 2, 0, 1.5, 2, 1):
        counts, omp, pid = ray.get(probe.options(num_cpus=num_cpus).remote(), timeout=60)
        expected = max(1, int(num_cpus))
        assert (num_cpus, counts, omp) == (num_cpus, {expected}, str(expected))
        seen.setdefault(pid, set()).add(expected)
    assert any(len(sizes) > 1 for sizes in seen.values()), "no worker ran two sizes"


def test_workers_start_sized_for_the_usual_task_without_a_blas_thread(ray):
    """The scheduler sized the pools before forking: a one-CPU task finds them so, and its
    worker runs no BLAS thread until it needs one (resizing OpenBLAS in the worker would
    start its thread server, whose new thread spins for tens of milliseconds)."""
    @ray.remote
    def threads_here():
        return len(os.listdir("/proc/self/task")), blas_threads()[0]

    assert ray.get(threads_here.remote(), timeout=60) == (1, {1})


def test_tasks_in_a_burst_on_leased_workers_run_one_thread_each(ray):
    probe = ray.remote(blas_threads)
    assert {tuple(c) for c, _, _ in ray.get([probe.remote() for _ in range(50)],
                                            timeout=60)} == {(1,)}


def test_an_actor_runs_with_as_many_blas_threads_as_cpus_it_holds(ray):
    @ray.remote
    class Probe:
        def threads(self):
            return blas_threads()[:2]

    assert ray.get(Probe.remote().threads.remote(), timeout=60) == ({1}, "1")
    assert ray.get(Probe.options(num_cpus=2).remote().threads.remote(),
                   timeout=60) == ({2}, "2")
    assert ray.get(Probe.options(num_cpus=0.5).remote().threads.remote(),
                   timeout=60) == ({1}, "1")


def test_a_library_a_task_imports_follows_num_cpus_too(ray, tmp_path):
    """A library loaded by a module a task imports (here, a second copy of numpy's OpenBLAS)
    starts with the size in force (OMP_NUM_THREADS holds it when the library reads it), and
    is resized with the others when a later task on that worker needs another size."""
    library = next(info["filepath"] for info in threadpoolctl.threadpool_info()
                   if info["internal_api"] == "openblas")
    copy = tmp_path / os.path.basename(library)  # threadpoolctl knows it by its name
    copy.write_bytes(open(library, "rb").read())
    (tmp_path / "late_blas.py").write_text(f"import ctypes\nhandle = ctypes.CDLL({str(copy)!r})\n")

    @ray.remote
    def late_threads():
        sys.path.insert(0, str(tmp_path))
        import late_blas  # noqa: F401 (loads the copy, once per worker)

        return {info["num_threads"] for info in threadpoolctl.threadpool_info()
                if info["filepath"] == str(copy)}

    sizes = (1, 2, 1, 2, 1)
    assert [ray.get(late_threads.options(num_cpus=n).remote(), timeout=60)
            for n in sizes] == [{n} for n in sizes]


@pytest.mark.parametrize("name", ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"])
def test_the_users_variable_in_a_tasks_runtime_env_wins(ray, name):
    """numpy loaded long before the task: its value is applied at run time.  The next task
    without it gets its CPUs' worth again."""
    probe = ray.remote(blas_threads)
    env = {"runtime_env": {"env_vars": {name: "1"}}}
    for _ in range(2):
        counts, _, _ = ray.get(probe.options(num_cpus=2, **env).remote(), timeout=60)
        assert counts == {1}
        counts, omp, _ = ray.get(probe.options(num_cpus=2).remote(), timeout=60)
        assert (counts, omp) == ({2}, "2")


def test_the_users_variable_in_an_actors_runtime_env_wins(ray):
    @ray.remote(num_cpus=2, runtime_env={"env_vars": {"OPENBLAS_NUM_THREADS": "1"}})
    class Probe:
        def threads(self):
            return blas_threads()[0]

    assert ray.get(Probe.remote().threads.remote(), timeout=60) == {1}


@pytest.mark.parametrize("where", ["driver", "session"])
def test_the_users_variable_in_the_driver_or_the_session_wins(no_user_settings, monkeypatch,
                                                              where):
    """Set in the driver's environment before init (after numpy was imported: it read the
    environment before), or in init's runtime_env: every task and actor keeps the user's
    value, whatever its num_cpus."""
    session_env = {}
    if where == "driver":
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    else:
        # init sets it in the driver too; ``no_user_settings`` removes it afterwards
        session_env = {"runtime_env": {"env_vars": {"OPENBLAS_NUM_THREADS": "1"}}}
    with shmray.init(num_cpus=2, object_store_memory=100 << 20, **session_env):
        probe = shmray.remote(blas_threads)
        for num_cpus in (2, 1, 2):
            assert shmray.get(probe.options(num_cpus=num_cpus).remote(),
                              timeout=60)[0] == {1}

        @shmray.remote(num_cpus=2)
        class Probe:
            def threads(self):
                return blas_threads()[0]

        assert shmray.get(Probe.remote().threads.remote(), timeout=60) == {1}


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="multithreaded BLAS needs 2 cores")
def test_a_driver_that_ran_multithreaded_blas_forks_safely(no_user_settings):
    """The driver's BLAS ran with two threads just before init forked the scheduler (and
    through it the workers): tasks of one and two threads all finish, with the right
    products.  In a process of its own, so that a hang fails the test instead of the suite."""
    script = textwrap.dedent("""
        import os
        import numpy as np, threadpoolctl, shmray

        blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        assert all(i["num_threads"] >= 2 for i in blas), blas
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((1500, 1500)), rng.standard_normal((1500, 1500))
        expected = a @ b  # the driver's pool runs, then init forks
        assert len(os.listdir("/proc/self/task")) >= 2, "BLAS threads alive at the fork"
        shmray.init(num_cpus=2, object_store_memory=200 << 20)
        try:
            matmul = shmray.remote(lambda x, y: x @ y)
            refs = [matmul.options(num_cpus=n).remote(a, b) for n in (1, 2, 1, 2, 1, 2)]
            for product in shmray.get(refs, timeout=120):
                assert np.allclose(product, expected)
            expected = a @ b  # and the driver's pool still works after the forks
            assert np.allclose(shmray.get(matmul.remote(a, b), timeout=120), expected)
        finally:
            shmray.shutdown()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_fitting_pools_leaves_the_driver_alone(ray):
    """Only workers and actors resize their pools: the driver's BLAS keeps its threads."""
    before = blas_threads()[:2]
    ray.get([ray.remote(blas_threads).options(num_cpus=n).remote() for n in (1, 2)],
            timeout=60)
    assert blas_threads()[:2] == before
