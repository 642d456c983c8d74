"""Shared fixtures; and a guard that nothing of shmray outlives a test.

After every test: no process named shmray is left among this process's descendants, no
arena is mapped unless the test still holds a view, and /dev/shm gained no file.
"""

import gc
import os

import pytest

import shmray

MiB = 1 << 20


def arena_mappings(pid="self"):
    """Lines of /proc/PID/maps that map a shmray arena."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return [line for line in f if "shmray-arena" in line]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def arena_fds(pid="self"):
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if "shmray-arena" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    found.append(fd)
            except OSError:
                pass
    except FileNotFoundError:
        pass
    return found


def dev_shm_files():
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def wait_for(predicate, timeout=10.0, interval=0.01):
    """Poll until predicate() is true; fail after timeout (freeing is asynchronous)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {predicate.__doc__ or predicate}")
        time.sleep(interval)


def tasks_named(name, **where):
    """The state API's rows of the tasks named ``name`` (and matching ``where``)."""
    from shmray.util import state

    filters = [("name", "=", name)] + [(k, "=", v) for k, v in where.items()]
    return state.list_tasks(filters=filters, detail=True, limit=10_000)


def wait_for_tasks(name, count, **where):
    """Poll until ``count`` tasks named ``name`` are listed so (processes record what they
    do as they go, and the scheduler reads it when asked); their rows."""
    wait_for(lambda: len(tasks_named(name, **where)) == count, timeout=60)
    return tasks_named(name, **where)


def socket_inodes(pid: int) -> set:
    """The sockets ``pid`` has open, by inode: a socket open in two processes is one
    connection's end held by both."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def runtime():
    return shmray._context.runtime


def learn_short(fn, *args):
    """A few bursts, so the driver knows ``fn`` is short and sends many to a leased worker
    at once."""
    for _ in range(5):
        shmray.get([fn.remote(*args) for _ in range(100)], timeout=60)


def worker_pids():
    return runtime().query("workers")


def one_cpu():
    """Start a session of one CPU (the test shuts it down)."""
    shmray.init(num_cpus=1, object_store_memory=100 << 20)


def one_cpu_without_leases():
    """Start a session of one CPU whose driver leases no worker: every task goes through the
    scheduler, which sends short ones ahead to busy workers (the test shuts it down)."""
    one_cpu()
    runtime().leases.enabled = False


def settle():
    """Send queued releases and wait until the scheduler has handled them."""
    runtime().settle()


@pytest.fixture
def ray():
    """shmray started with a small store (150 MiB); checked and shut down afterwards."""
    shmray.init(num_cpus=2, object_store_memory=150 * MiB)
    try:
        yield shmray
        runtime = shmray._context.runtime
        if runtime is not None:
            runtime.store.check()
    finally:
        shmray.shutdown()


def in_both_modes(num_cpus: int = 2):
    """A fixture that starts shmray on ``num_cpus`` CPUs with a 150 MiB store twice: with
    its processes, and in local mode (every call in this process).  A test marked
    ``@pytest.mark.processes_only("why")`` is skipped in local mode, saying why."""

    @pytest.fixture(params=["processes", "local_mode"])
    def fixture(request):
        local = request.param == "local_mode"
        marker = request.node.get_closest_marker("processes_only")
        if local and marker is not None:
            pytest.skip(f"not in local mode: {marker.args[0]}")
        shmray.init(num_cpus=num_cpus, object_store_memory=150 * MiB, local_mode=local)
        try:
            yield shmray
            if not local and shmray._context.runtime is not None:
                shmray._context.runtime.store.check()
        finally:
            shmray.shutdown()

    return fixture


def pytest_configure(config):
    """Run the suite in a temp folder of its own (every process it starts inherits TMPDIR),
    so session folders of other shmray programs running meanwhile can't be mistaken for
    ours, and nothing of the run is left in /tmp afterwards.  It is removed at exit, after
    pytest's own exit handlers (registered later, run earlier), which clean up in it."""
    import atexit
    import shutil
    import tempfile

    private = tempfile.mkdtemp(prefix="shmray-tests-")
    os.environ["TMPDIR"] = private
    tempfile.tempdir = private
    suite = os.getpid()

    def remove_private():
        if os.getpid() == suite:  # not in a child a test forked that exits normally
            shutil.rmtree(private, ignore_errors=True)

    atexit.register(remove_private)


def session_dirs():
    import tempfile

    root = tempfile.gettempdir()
    return {name for name in os.listdir(root) if name.startswith("shmray-session-")}


def alive(pid: int) -> bool:
    """Whether pid runs and is not a zombie; a process may end while we look."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def shmray_children():
    """Live processes named shmray:: whose parent chain leads to this test process."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:  # any child may end between listing and looking at it
            if alive(child.pid) and " ".join(child.cmdline()).startswith("shmray::"):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before_shm = dev_shm_files()
    before_dirs = session_dirs()
    yield
    if shmray.is_initialized():
        shmray.shutdown()
        pytest.fail("the test left shmray running")
    gc.collect()
    assert dev_shm_files() - before_shm == set(), "a file was left in /dev/shm"
    assert arena_fds() == [], "an arena file descriptor is still open"
    assert shmray_children() == [], "a shmray process outlived the test"
    wait_for(lambda: session_dirs() - before_dirs == set(), timeout=10)
