"""What tasks and actors print reaches the driver's terminal, prefixed like Ray's.

Each test runs a real driver script in a subprocess and reads its stdout/stderr, as a user
would see them.
"""

import subprocess
import sys
import textwrap

SCRIPT_HEAD = """
import os, sys, time
import shmray as ray
"""


def run_driver(body: str, timeout: float = 60):
    script = SCRIPT_HEAD + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_task_prints_are_prefixed_line_by_line():
    out, err = run_driver("""
        ray.init(num_cpus=2, object_store_memory=100 << 20)

        @ray.remote
        def chatty(i):
            print(f"line one of {i}")
            print(f"line two of {i}", file=sys.stderr)
            sys.stdout.write("partial ")
            sys.stdout.write("line\\n")
            return os.getpid()

        pids = ray.get([chatty.remote(i) for i in range(3)])
        print("PIDS", *pids)
        ray.shutdown()
    """)
    pids = out.split("PIDS")[1].split()
    for i, pid in enumerate(pids):
        assert f"(chatty pid={pid}) line one of {i}\n" in out
        assert f"(chatty pid={pid}) line two of {i}\n" in err
    assert out.count("partial line") == 3
    for line in out.splitlines():  # no line is torn or unprefixed
        assert line.startswith(("(chatty pid=", "PIDS")), line


def test_actor_prints_carry_the_class_name():
    out, _ = run_driver("""
        ray.init(num_cpus=1, object_store_memory=100 << 20)

        @ray.remote
        class Talker:
            def say(self, text):
                print(text)
                return os.getpid()

        t = Talker.remote()
        pid = ray.get(t.say.remote("hello from an actor"))
        print("PID", pid)
        ray.shutdown()
    """)
    pid = out.split("PID")[1].split()[0]
    assert f"(Talker pid={pid}) hello from an actor\n" in out


def test_log_to_driver_false_writes_session_files():
    out, _ = run_driver("""
        ctx = ray.init(num_cpus=1, object_store_memory=100 << 20, log_to_driver=False)

        @ray.remote
        def quiet():
            print("to the log file")
            return os.getpid()

        pid = ray.get(quiet.remote())
        logs = os.path.join(ctx["session_dir"], "logs")  # init() returns a mapping
        time.sleep(0.1)
        with open(os.path.join(logs, f"worker-{pid}.out")) as f:
            print("LOGGED", f.read().strip())
        ray.shutdown()
        print("GONE", not os.path.exists(ctx["session_dir"]))
    """)
    assert "LOGGED to the log file" in out
    assert "(quiet pid=" not in out
    assert "GONE True" in out


def test_an_error_in_ray_shutdown_is_printed_with_its_traceback():
    out, err = run_driver("""
        ray.init(num_cpus=1, object_store_memory=100 << 20)

        @ray.remote
        class Clumsy:
            def __ray_shutdown__(self):
                raise ValueError("dropped the keys")

            def ping(self):
                return 1

        a = Clumsy.remote()
        ray.get(a.ping.remote())
        ray.get(a.__ray_terminate__.remote())
        time.sleep(0.5)
        ray.shutdown()
    """)
    assert "Clumsy.__ray_shutdown__() raised" in err
    assert "ValueError: dropped the keys" in err
