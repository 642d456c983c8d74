"""A session's life: init, shutdown, and what a forked child of its processes may do.

A child forked by the user or a library (``os.fork()``, multiprocessing's fork start method)
from the driver or from a task never touches its parent's session; it gets a clear error if
it uses shmray, until it calls ``shmray.init()`` to start a session of its own.  The fork
tests run real driver scripts in subprocesses: a forked child must exit the way programs do
(atexit handlers, finalizers), which a test can't do inside pytest's own process.
"""

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

import shmray
from shmray import exceptions

DEADLOCK = 120


def run_driver(body: str) -> str:
    script = "import gc, os, sys, time\nimport numpy as np\nimport shmray\n" + \
        textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=DEADLOCK)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_forked_child_that_exits_leaves_the_parents_session_alone():
    """The child ran shmray's exit handler, which shut the parent's session down and
    deleted its spill files: the parent's next call raised RaySystemError."""
    out = run_driver("""
        shmray.init(num_cpus=2, object_store_memory=100 << 20)

        @shmray.remote
        def double(x):
            return x * 2

        arrays = [np.full(5 << 20, i, dtype=np.float64) for i in range(3)]  # 40 MiB each:
        refs = [shmray.put(a) for a in arrays]                               # one spills
        views = [shmray.get(r) for r in refs[1:]]  # pinned in the arena
        spill = os.path.join(shmray._context.runtime.session_dir, "spill")
        assert os.listdir(spill), "nothing spilled"
        pid = os.fork()
        if pid == 0:
            del views  # the child lets go of the views it inherited...
            gc.collect()
            sys.exit(0)  # ...and exits as programs do: atexit handlers, finalizers
        assert os.waitpid(pid, 0)[1] == 0
        assert os.listdir(spill), "the child removed the parent's spill files"
        runtime = shmray._context.runtime
        assert runtime.store.statistics().num_pinned == 2  # the child unpinned none of ours
        del views
        for i, ref in enumerate(refs):
            assert float(shmray.get(ref, timeout=60)[0]) == i
        assert shmray.get(double.remote(21), timeout=60) == 42
        del refs, ref, arrays
        gc.collect()
        runtime.settle()
        runtime.store.check()
        assert runtime.store.statistics().num_objects == 0
        shmray.shutdown()
        print("OK")
    """)
    assert out.strip() == "OK"


def test_a_forked_child_that_uses_shmray_gets_a_clear_error_or_its_own_session():
    """Parent and child both used the session: one read the other's replies (a get hung in
    2 of 3 runs)."""
    out = run_driver("""
        shmray.init(num_cpus=2, object_store_memory=100 << 20)

        @shmray.remote
        def square(x):
            return x * x

        ref = shmray.put(7)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            said = []
            assert not shmray.is_initialized()
            for attempt in (lambda: shmray.get(ref), lambda: square.remote(2),
                            lambda: shmray.put(1)):
                try:
                    attempt()
                    said.append("no error")
                except shmray.exceptions.RaySystemError as error:
                    said.append("forked" if "forked" in str(error) else str(error))
            shmray.init(num_cpus=1, object_store_memory=100 << 20)  # a session of its own
            said.append(str(shmray.get(square.remote(5), timeout=60)))
            try:
                shmray.get(ref)
            except shmray.exceptions.RaySystemError as error:
                said.append("parent's ref" if "forked" in str(error) else str(error))
            shmray.shutdown()
            os.write(write, ",".join(said).encode())
            sys.exit(0)
        os.close(write)
        results = [shmray.get(square.remote(i), timeout=60) for i in range(200)]
        assert results == [i * i for i in range(200)]
        message = b""
        while chunk := os.read(read, 4096):
            message += chunk
        assert os.waitpid(pid, 0)[1] == 0
        assert shmray.get(ref) == 7
        shmray.shutdown()
        print(message.decode())
    """)
    assert out.strip() == "forked,forked,forked,25,parent's ref"


def test_a_child_forked_in_a_task_leaves_the_worker_alone():
    out = run_driver("""
        shmray.init(num_cpus=1, object_store_memory=100 << 20)
        ref = shmray.put(3)

        @shmray.remote
        def fork_and_ask(refs):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                try:
                    shmray.get(refs[0])
                    said = b"no error"
                except shmray.exceptions.RaySystemError as error:
                    said = b"forked" if b"forked" in str(error).encode() else b"other"
                os.write(write, said)
                sys.exit(0)
            os.close(write)
            said = os.read(read, 100)
            os.waitpid(pid, 0)
            return said.decode(), shmray.get(refs[0])

        @shmray.remote
        def plain():
            return "still works"

        print(*shmray.get(fork_and_ask.remote([ref]), timeout=60))
        print(shmray.get(plain.remote(), timeout=60))
        shmray.shutdown()
    """)
    assert out.split("\n")[:2] == ["forked 3", "still works"]


def test_init_inside_a_task(ray):
    @ray.remote
    def inside():
        already = shmray.is_initialized()
        shmray.init(ignore_reinit_error=True)
        try:
            shmray.init()
        except RuntimeError as exc:
            return already, str(exc)
        return already, None

    already, error = ray.get(inside.remote(), timeout=DEADLOCK)
    assert already and "inside a task" in error


def test_shutdown_while_another_thread_puts_does_not_crash():
    """shutdown() once unmapped the arena under a copy running in another thread (SIGSEGV)."""
    shmray.init(num_cpus=1, object_store_memory=150 << 20)
    errors = []
    stop = threading.Event()

    def putter():
        array = np.ones(5 << 20)
        try:
            # no new put once shutdown is under way: like Ray's, it would start a new session
            while not stop.is_set():
                shmray.put(array)
        except Exception as exc:  # StoreClosedError / RaySystemError once shut down
            errors.append(exc)

    thread = threading.Thread(target=putter)
    thread.start()
    time.sleep(0.2)
    stop.set()
    shmray.shutdown()
    thread.join(timeout=DEADLOCK)
    assert not thread.is_alive()
    assert all(isinstance(e, exceptions.RaySystemError) for e in errors)


def test_shutdown_wakes_a_thread_blocked_in_get_with_a_clear_error():
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    outcome = []

    @shmray.remote
    def forever():
        time.sleep(1000)

    ref = forever.remote()

    def getter():
        try:
            shmray.get(ref)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=getter)
    thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    shmray.shutdown()
    thread.join(timeout=DEADLOCK)
    assert time.monotonic() - start < 5
    assert isinstance(outcome[0], exceptions.RaySystemError) and "shut down" in str(outcome[0])


def test_init_returns_a_context_like_rays():
    with shmray.init(num_cpus=1, object_store_memory=100 << 20) as context:
        assert context["node_ip_address"] == "127.0.0.1"
        assert context.dashboard_url is None and "session_dir" in context.address_info
        assert shmray.is_initialized()
    assert not shmray.is_initialized()
