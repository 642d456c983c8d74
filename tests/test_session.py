"""A session's life: what belongs to it, and what a forked child of its processes may do.

A child forked by the user or a library (``os.fork()``, multiprocessing's fork start method)
from the driver or from a task never touches its parent's session; it gets a clear error if
it uses shmray, until it calls ``shmray.init()`` to start a session of its own.  These tests
run real driver scripts in subprocesses: a forked child must exit the way programs do
(atexit handlers, finalizers), which a test can't do inside pytest's own process.
"""

import subprocess
import sys
import textwrap

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
        runtime._settle()
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
