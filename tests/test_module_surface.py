"""The rest of Ray's module surface: what init() returns, JobConfig, LoggingConfig,
shmray.cloudpickle, custom serializers, ID classes, and the names whose features live
elsewhere (other languages, Ray Client) saying so when called."""

import logging
import os
import threading

import pytest

import shmray
from shmray.job_config import JobConfig

DEADLOCK = 60


def test_init_returns_rays_context():
    context = shmray.init(num_cpus=1)
    try:
        info = context.address_info
        for key in ("node_ip_address", "raylet_ip_address", "address", "gcs_address",
                    "session_dir", "webui_url", "node_id"):
            assert key in info
        assert info["address"] == info["session_dir"] and os.path.isdir(info["address"])
        assert context["node_ip_address"] == "127.0.0.1"  # Ray's mapping access
        assert context.dashboard_url is None
        assert context.python_version and context.ray_version == shmray.__version__
    finally:
        shmray.shutdown()


def test_job_config_sets_namespace_environment_and_default_lifetime():
    config = JobConfig(ray_namespace="jobs", runtime_env={"env_vars": {"SHMRAY_JOB": "on"}},
                       default_actor_lifetime="detached", metadata={"team": "a"})
    shmray.init(num_cpus=1, job_config=config)
    try:
        assert shmray.get_runtime_context().namespace == "jobs"

        @shmray.remote
        def read():
            return os.environ.get("SHMRAY_JOB")

        assert shmray.get(read.remote(), timeout=DEADLOCK) == "on"

        @shmray.remote
        class Service:
            def ping(self):
                return "pong"

        handle = Service.options(name="svc").remote()
        del handle  # detached by the job's default: lives on without handles
        found = shmray.get_actor("svc")
        assert shmray.get(found.ping.remote(), timeout=DEADLOCK) == "pong"
        shmray.kill(found)
    finally:
        shmray.shutdown()


def test_inits_own_namespace_wins_over_the_job_configs():
    shmray.init(num_cpus=1, namespace="mine", job_config=JobConfig(ray_namespace="theirs"))
    try:
        assert shmray.get_runtime_context().namespace == "mine"
    finally:
        shmray.shutdown()


def test_job_config_is_checked():
    with pytest.raises(ValueError, match="Default actor lifetime must be one of"):
        JobConfig(default_actor_lifetime="forever")
    with pytest.raises(TypeError, match="namespace must be None or a string"):
        JobConfig(ray_namespace=3)
    with pytest.raises(TypeError, match="job_config must be a shmray.job_config.JobConfig"):
        shmray.init(num_cpus=1, job_config={"ray_namespace": "x"})
    assert not shmray.is_initialized()


def test_logging_config_sets_the_shmray_logger():
    logger = logging.getLogger("shmray")
    level, handlers = logger.level, list(logger.handlers)
    with pytest.raises(ValueError, match="Invalid encoding type"):
        shmray.LoggingConfig(encoding="XML")
    try:
        shmray.init(num_cpus=1, logging_config=shmray.LoggingConfig(log_level="DEBUG"))
        assert logger.level == logging.DEBUG
    finally:
        shmray.shutdown()
        logger.setLevel(level)
        logger.handlers[:] = handlers


def test_shmray_cloudpickle_is_cloudpickle():
    import cloudpickle

    offset = 3
    restored = shmray.cloudpickle.loads(shmray.cloudpickle.dumps(lambda x: x + offset))
    assert restored(1) == 4
    assert shmray.cloudpickle.CloudPickler is cloudpickle.CloudPickler


class Locked:
    """Holds a lock, so it can't be pickled as it is."""

    def __init__(self, value):
        self.value = value
        self.lock = threading.Lock()


def test_a_registered_serializer_carries_an_unpicklable_class(ray):
    with pytest.raises(TypeError, match="Locked"):
        ray.put(Locked(1))
    ray.util.register_serializer(Locked, serializer=lambda locked: locked.value,
                                 deserializer=Locked)
    try:
        assert ray.get(ray.put(Locked(2)), timeout=DEADLOCK).value == 2

        @ray.remote
        def unwrap(locked):
            return locked.value * 10, isinstance(locked.lock, type(threading.Lock()))

        assert ray.get(unwrap.remote(Locked(3)), timeout=DEADLOCK) == (30, True)
    finally:
        ray.util.deregister_serializer(Locked)
    with pytest.raises(TypeError, match="Locked"):
        ray.put(Locked(4))
    ray.util.deregister_serializer(Locked)  # twice: nothing happens, as in Ray


def test_a_serializer_registered_before_init_serves_the_sessions_workers():
    shmray.util.register_serializer(Locked, serializer=lambda locked: locked.value,
                                    deserializer=Locked)
    try:
        shmray.init(num_cpus=1)

        @shmray.remote
        def make(value):
            return Locked(value)  # pickled by the worker, with the driver's serializer

        assert shmray.get(make.remote(5), timeout=DEADLOCK).value == 5
    finally:
        shmray.shutdown()
        shmray.util.deregister_serializer(Locked)


def test_id_classes_as_rays():
    assert shmray.ObjectID is shmray.ObjectRef
    task_id = shmray.TaskID.from_random()
    assert shmray.TaskID.from_hex(task_id.hex()) == task_id and task_id.size() == 24
    assert shmray.ActorID.nil().is_nil() and not shmray.ActorID.from_random().is_nil()
    assert shmray.JobID.size() == 4 and shmray.NodeID.size() == 28
    with pytest.raises(ValueError, match="TaskID takes 24 bytes"):
        shmray.TaskID(b"short")


@pytest.mark.parametrize("call, message", [
    (lambda: shmray.java_function("a.B", "f"), "Java or C\\+\\+"),
    (lambda: shmray.java_actor_class("a.B"), "Java or C\\+\\+"),
    (lambda: shmray.cpp_function("f"), "Java or C\\+\\+"),
    (lambda: shmray.client("ray://head:10001"), "Ray Client"),
])
def test_names_for_features_elsewhere_say_so_when_called(call, message):
    with pytest.raises(NotImplementedError, match=message):
        call()


def test_modes_and_languages_have_rays_values():
    assert (shmray.SCRIPT_MODE, shmray.WORKER_MODE, shmray.LOCAL_MODE) == (0, 1, 2)
    assert shmray.Language.PYTHON == 0
    shmray.show_in_dashboard("progress: 50%")  # no dashboard: logged, not an error


# -- util.as_completed / util.map_unordered ------------------------------------------------------


def test_as_completed_hands_out_results_as_they_finish(ray, tmp_path):
    gate = tmp_path / "open"

    @ray.remote
    def wait_for_gate(value):
        import time

        deadline = time.monotonic() + DEADLOCK
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return value

    @ray.remote
    def quick(value):
        return value

    refs = [wait_for_gate.remote("slow"), quick.remote("fast")]
    results = ray.util.as_completed(refs, chunk_size=1, timeout=DEADLOCK)
    assert next(results) == "fast"  # the slow one still waits for the gate
    gate.touch()
    assert list(results) == ["slow"]
    assert list(ray.util.as_completed([quick.remote(1)], yield_obj_refs=True))[0] is not None
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1"):
        next(ray.util.as_completed(refs, chunk_size=0))


def test_map_unordered_keeps_its_backpressure(ray):
    submitted = []

    @ray.remote
    def square(x):
        return x * x

    class Counting:
        def remote(self, item):
            submitted.append(item)
            return square.remote(item)

    results = ray.util.map_unordered(Counting(), range(20), backpressure_size=4, chunk_size=2)
    first = next(results)
    assert len(submitted) <= 5  # four in flight, then one more once a chunk came back
    assert sorted([first, *results]) == [x * x for x in range(20)]
    assert sorted(ray.get(list(ray.util.map_unordered(square, [1, 2], yield_obj_refs=True)),
                          timeout=DEADLOCK)) == [1, 4]


def test_inspect_serializability_finds_the_part_at_fault():
    import io

    lock = threading.Lock()

    class Holder:
        def __init__(self):
            self.fine = 1
            self.lock = lock

    holder = Holder()

    def uses_holder():
        return holder.fine

    printed = io.StringIO()
    ok, failures = shmray.util.inspect_serializability(uses_holder, print_file=printed)
    assert not ok
    assert [failure.name for failure in failures] == ["lock"]
    assert "'uses_holder' can't be serialized" in printed.getvalue()
    assert shmray.util.inspect_serializability([1, "two"], print_file=io.StringIO()) == (
        True, set())
