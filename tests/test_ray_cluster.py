"""Outgrowing one machine: the same program, unchanged, on a real Ray cluster through
``shmray.init(address=...)`` (``_ray_backend``), and on a session of this machine.

A module fixture starts a Ray head on loopback only (``--node-ip-address=127.0.0.1``, and
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` for the head and each driver, without which Ray
swaps 127.0.0.1 for the machine's interface address), with 2 CPUs, no dashboard and a temp
folder of its own, and stops it afterwards, leaving no process or folder behind.  Each
program (``ray_programs.py``) runs in a driver process of its own, against the head and
against a local session.  Skipped where Ray is not installed (``pip install "shmray[ray]"``);
``-m "not ray"`` skips them too.
"""

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

import shmray
from ray_programs import CASES

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason='Ray is not installed: pip install "shmray[ray]"')]

DEADLOCK = 120
HERE = os.path.dirname(os.path.abspath(__file__))
# Read by Ray as it starts, in the head and in each driver: loopback only (without the
# first, Ray swaps 127.0.0.1 for the machine's interface address), and token
# authentication, with a token of this run's: a head on loopback is still reachable by every
# user of the machine, and without a token any of them could run code as ours.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # Ray Client's head starts a server process per driver, and gives it 30 s to
           # come up: on a loaded 2-core machine (the suite beside it) it once took longer.
           "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120"}
RAY_PROCESSES = ("raylet", "gcs_server", "ray::")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    path = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    return {**env, **RAY_ENV, "PYTHONPATH": path}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray_processes() -> list:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            line = " ".join(process.info["cmdline"] or []) or process.info["name"] or ""
        except psutil.Error:
            continue
        if any(marker in line for marker in RAY_PROCESSES):
            found.append(process)
    return found


def _run(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=DEADLOCK, env=env or _env(), cwd=HERE)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1: {"ray": its address, "ray-client": Ray Client's}."""
    # Short: Ray's unix sockets go in it (107 bytes at most), and pytest's folders are long.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    port, client_port = _free_port(), _free_port()  # (not in Ray's worker ports, 10002-19999)
    # The head's workers import ray_programs (from this folder) to rebuild what it defines,
    # as a cluster's workers import a program's modules.
    started = subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--ray-client-server-port={client_port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        capture_output=True, text=True, timeout=DEADLOCK, env=_env())
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"ray": f"127.0.0.1:{port}", "ray-client": f"ray://127.0.0.1:{client_port}"}
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=DEADLOCK,
                       env=_env())
        deadline = time.monotonic() + 30
        while _ray_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in _ray_processes():
            process.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def head(cluster):
    return cluster["ray"]


# Through Ray Client ("ray://"), two of them: each of its drivers takes seconds to start.
WHERE = [(case, where) for case in sorted(CASES) for where in ("local", "ray")] + [
    (case, "ray-client") for case in ("errors", "refs_as_futures")]


@pytest.mark.parametrize("case, where", WHERE)
def test_a_ray_program_runs_unchanged(case, where, request):
    address = request.getfixturevalue("cluster")[where] if where != "local" else "local"
    done = _run("ray_programs.py", case, address)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr


def test_a_driver_without_the_clusters_token_is_refused(head):
    code = ("import shmray\n"
            "try:\n"
            f"    shmray.init(address={head!r})\n"
            "except ConnectionError as exc:\n"
            "    print('refused')\n"
            "print(shmray.is_initialized())\n")
    done = _run("-c", code, env={**_env(), "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    assert done.stdout.split() == ["refused", "False"], done.stdout + done.stderr


def test_every_byte_of_the_cluster_stays_on_loopback(head):
    done = _run("ray_programs.py", "parallel_tasks", head)
    assert done.returncode == 0, done.stdout + done.stderr
    sockets = []
    for process in _ray_processes():
        try:
            sockets += [c for c in process.net_connections(kind="inet") if c.laddr]
        except psutil.Error:
            continue
    assert sockets, "found none of the head's sockets"
    outside = [c for c in sockets if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert not outside, outside


def test_ray_address_in_the_environment_means_that_cluster(head):
    code = ("import shmray, ray\n"
            "f = shmray.remote(lambda: 1)\n"
            "for address in (None, 'auto'):\n"
            "    shmray.init(address=address)\n"
            "    assert isinstance(f.remote(), ray.ObjectRef)\n"
            "    try:\n"
            "        shmray.init(address=address)\n"
            "    except RuntimeError as exc:\n"
            "        assert 'called twice' in str(exc)\n"
            "    shmray.shutdown()\n"
            "shmray.init(address='local', num_cpus=1)\n"  # this machine, RAY_ADDRESS or not
            "assert isinstance(f.remote(), shmray.ObjectRef) and shmray.get(f.remote()) == 1\n"
            "shmray.shutdown()\n"
            "print('ok')\n")
    done = _run("-c", code, env={**_env(), "RAY_ADDRESS": head})
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr


def test_shmrays_own_additions_say_what_to_use_on_ray(head):
    code = ("import shmray\n"
            f"shmray.init(address={head!r})\n"
            "from shmray.util import state\n"
            "try:\n"
            "    state.list_tasks()\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n"
            "shmray.shutdown()\n")
    done = _run("-c", code)
    assert "ray.util.state" in done.stdout, done.stdout + done.stderr


def test_a_cluster_address_without_ray_installed_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import shmray\n"
            "try:\n"
            "    shmray.init(address='127.0.0.1:1')\n"
            "except ImportError as exc:\n"
            "    print(exc)\n"
            "print(shmray.is_initialized())\n")
    done = _run("-c", code)
    assert 'pip install "shmray[ray]"' in done.stdout, done.stdout + done.stderr
    assert done.stdout.strip().endswith("False")


def test_a_bad_address_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="'ray://host:port'"):
        shmray.init(address=7)
    assert not shmray.is_initialized()
