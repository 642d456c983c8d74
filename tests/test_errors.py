"""A task's failure as its caller sees it: the user's classes, messages and remote traceback.

End to end through real workers and actors; each test names the bug it guards.
"""

import linecache
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shmray
from shmray import exceptions

HERE = os.path.abspath(__file__)
DEADLOCK = 60


@pytest.fixture
def ray1():
    shmray.init(num_cpus=1, object_store_memory=100 << 20)
    try:
        yield shmray
    finally:
        shmray.shutdown()


def _raised(ref):
    with pytest.raises(exceptions.RayTaskError) as info:
        shmray.get(ref, timeout=60)
    return str(info.value)


# -- remote tracebacks keep the user's files, lines and source (cloudpickle >= 3.1.3 names
#    every code object it pickles by value "<dynamic-code>") ------------------------------


def test_traceback_of_a_local_function_names_its_file_line_and_source(ray1):
    @ray1.remote
    def divide(a, b):
        return a / b  # the line the traceback must show

    line = divide._function.__code__.co_firstlineno + 2
    text = _raised(divide.remote(1, 0))
    assert f'File "{HERE}", line {line}, in divide' in text
    assert "return a / b  # the line the traceback must show" in text
    assert "<dynamic-code>" not in text


def test_traceback_of_a_closure_and_a_nested_function(ray1):
    factor = 0

    def inner(x):
        return x / factor  # inner's line

    @ray1.remote
    def outer(x):
        return inner(x)

    text = _raised(outer.remote(3))
    assert f'File "{HERE}"' in text and "in inner" in text and "in outer" in text
    assert "return x / factor  # inner's line" in text
    assert "<dynamic-code>" not in text


def test_traceback_of_an_actor_method_and_its_init(ray1):
    @ray1.remote
    class Local:
        def __init__(self, fail=False):
            if fail:
                raise ValueError("init fails here")

        def method(self):
            raise KeyError("method fails here")

    text = _raised(Local.remote().method.remote())
    assert f'File "{HERE}"' in text and 'raise KeyError("method fails here")' in text

    with pytest.raises(exceptions.ActorDiedError) as info:
        shmray.get(Local.remote(fail=True).method.remote(), timeout=60)
    assert 'raise ValueError("init fails here")' in str(info.value)
    assert "<dynamic-code>" not in str(info.value)


def test_traceback_of_code_that_exists_only_in_linecache(ray1):
    """Code typed into a notebook cell has no file on disk; its source lines travel."""
    filename = "<cell-42-shmray-test>"
    source = "def from_a_cell(x):\n    return x['missing']  # cell source line\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        namespace = {}
        exec(compile(source, filename, "exec"), namespace)
        task = ray1.remote(namespace["from_a_cell"])
        text = _raised(task.remote({}))
    finally:
        del linecache.cache[filename]
    assert f'File "{filename}", line 2, in from_a_cell' in text
    assert "return x['missing']  # cell source line" in text


def test_traceback_of_a_function_in_main(tmp_path):
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent("""
        import shmray

        @shmray.remote
        def fails():
            raise RuntimeError("from __main__")  # main's line

        shmray.init(num_cpus=1, object_store_memory=100 << 20)
        try:
            shmray.get(fails.remote())
        except RuntimeError as error:
            print(error)
        shmray.shutdown()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert f'File "{script}", line 6, in fails' in out.stdout
    assert 'raise RuntimeError("from __main__")  # main\'s line' in out.stdout


# -- exceptions whose class the caller can't import --------------------------------------


def raise_an_error_only_this_process_can_import(folder: str, module: str, message: str):
    """Write a module defining OnlyHereError into ``folder``, import it, raise it."""
    sys.path.insert(0, folder)
    with open(os.path.join(folder, f"{module}.py"), "w") as f:
        f.write("class OnlyHereError(Exception):\n    pass\n")
    raise __import__(module).OnlyHereError(message)


def test_exception_of_a_class_the_driver_cannot_import(ray1, tmp_path):
    """It came back as a bare ModuleNotFoundError from unpickling, losing the task's name,
    message and traceback."""
    @ray1.remote
    def raise_private(folder):
        raise_an_error_only_this_process_can_import(folder, "only_in_the_worker", "the message")

    with pytest.raises(exceptions.RayTaskError) as info:
        shmray.get(raise_private.remote(str(tmp_path)), timeout=60)
    error = info.value
    assert isinstance(error, exceptions.UnserializableException)
    assert error.function_name == "raise_private"
    text = str(error)
    assert text.startswith("Failed to deserialize exception (ModuleNotFoundError: ")
    assert "Original exception:\nshmray.exceptions.RayTaskError: ray::raise_private() (pid=" \
        in text
    assert "only_in_the_worker.OnlyHereError: the message" in text
    assert "raise __import__(module).OnlyHereError(message)" in text
    assert "only_in_the_worker" in error.cause.original_stack_trace


def test_unimportable_exception_passes_through_a_nested_get(ray1, tmp_path):
    @ray1.remote
    def raise_private(folder):
        raise_an_error_only_this_process_can_import(folder, "only_in_that_worker", "deep")

    @ray1.remote
    def middle(folder):
        return shmray.get(raise_private.remote(folder))

    with pytest.raises(exceptions.RayTaskError) as info:
        shmray.get(middle.remote(str(tmp_path)), timeout=60)
    assert "OnlyHereError: deep" in str(info.value)


def test_sys_exit_in_a_task_ends_its_worker_not_the_driver(ray):
    """As in Ray: the worker exits, and the task fails as a crashed worker's would (after
    its retries), never as a SystemExit raised in the driver."""
    @ray.remote(max_retries=0)
    def quits():
        sys.exit(3)

    with pytest.raises(exceptions.WorkerCrashedError) as info:
        ray.get(quits.remote(), timeout=DEADLOCK)
    assert "exit code 3" in str(info.value) and "sys.exit()" in str(info.value)
    assert not isinstance(info.value, SystemExit)


class TwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")
        self.a, self.b = a, b


def test_exception_whose_init_differs_from_its_args_keeps_its_class(ray):
    @ray.remote
    def fails():
        raise TwoArgs(1, 2)

    with pytest.raises(TwoArgs) as info:
        ray.get(fails.remote(), timeout=DEADLOCK)
    assert (info.value.a, info.value.b) == (1, 2)


def test_refs_inside_an_exception_stay_alive(ray):
    @ray.remote
    def fails():
        raise ValueError(shmray.put(np.arange(300_000)), shmray.put("small"))

    with pytest.raises(ValueError) as info:
        ray.get(fails.remote(), timeout=DEADLOCK)
    big, small = info.value.cause.args
    time.sleep(0.2)
    assert ray.get(small, timeout=DEADLOCK) == "small"
    assert ray.get(big, timeout=DEADLOCK).sum() == np.arange(300_000).sum()


def test_nested_failures_keep_the_frames_they_passed(ray):
    @ray.remote
    def innermost():
        raise KeyError("deep")

    @ray.remote
    def middle():
        return shmray.get(innermost.remote())

    with pytest.raises(KeyError) as info:
        ray.get(middle.remote(), timeout=DEADLOCK)
    text = str(info.value)
    # Ray's text: middle's header and frames, then innermost's error as its get raised it.
    assert text.startswith("ray::middle() (pid=")
    assert "return shmray.get(innermost.remote())" in text
    assert "shmray.exceptions.RayTaskError(KeyError): ray::innermost() (pid=" in text
    assert text.endswith("KeyError: 'deep'")
    assert "_api.py" not in text and "_worker.py" not in text
