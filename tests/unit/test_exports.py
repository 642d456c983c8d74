"""The public surface is exactly what we mean to export (trio's test_exports habit)."""

import shmray
import shmray.exceptions as exc
import shmray.util.multiprocessing


def test_public_names():
    public = {name for name in dir(shmray) if not name.startswith("_")}
    assert public == set(shmray.__all__)
    assert set(shmray.__all__) == {
        "ActorClassID", "ActorID", "DynamicObjectRefGenerator", "FunctionID", "JobID",
        "LOCAL_MODE", "Language", "LoggingConfig", "NodeID", "ObjectID", "ObjectRef",
        "ObjectRefGenerator", "PlacementGroupID", "SCRIPT_MODE", "TaskID", "UniqueID",
        "WORKER_MODE", "WorkerID", "actor", "available_resources", "cancel", "client",
        "cloudpickle", "cluster_resources", "cpp_function", "dag", "exceptions", "get",
        "get_actor", "get_gpu_ids", "get_runtime_context", "init", "is_initialized",
        "java_actor_class", "java_function", "job_config", "kill", "method", "nodes", "put",
        "remote", "show_in_dashboard", "shutdown", "timeline", "util", "wait",
    }
    assert shmray.actor.__all__ == ["ActorClass", "ActorClassInheritanceException", "ActorHandle",
                                    "ActorMethod", "exit_actor"]
    assert shmray.util.__all__ == [
        "ActorPool", "as_completed", "deregister_serializer", "get_current_placement_group",
        "get_node_ip_address", "get_placement_group", "inspect_serializability",
        "list_named_actors", "map_unordered", "placement_group", "placement_group_table",
        "ProcessPoolExecutor", "progress", "register_serializer", "remove_placement_group",
        "scheduling_strategies"]
    assert shmray.util.multiprocessing.__all__ == [
        "AsyncResult", "IMapIterator", "JoinableQueue", "Pool", "TimeoutError"]
    assert shmray.util.scheduling_strategies.__all__ == [
        "NodeAffinitySchedulingStrategy", "PlacementGroupSchedulingStrategy"]


def test_all_names_resolve():
    for name in shmray.__all__:
        assert getattr(shmray, name) is not None


def test_exception_tree_matches_ray():
    assert issubclass(exc.RayTaskError, exc.RayError)
    assert issubclass(exc.ActorDiedError, exc.RayActorError)
    assert issubclass(exc.GetTimeoutError, exc.RayError)
    assert issubclass(exc.GetTimeoutError, TimeoutError)
    assert issubclass(exc.ObjectStoreFullError, exc.RayError)
    assert issubclass(exc.OwnerDiedError, exc.ObjectLostError)
    assert issubclass(exc.ReferenceCountingAssertionError, AssertionError)
    for name in exc.__all__:
        assert issubclass(getattr(exc, name), exc.RayError)
