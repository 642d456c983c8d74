"""Lazy graphs (``shmray.dag``, Ray's ``bind`` / ``execute``): built without running anything,
executed as an ordinary task DAG, each node once per execution."""

import pytest

import shmray
from shmray.dag import ClassMethodNode, ClassNode, FunctionNode, InputNode, MultiOutputNode

DEADLOCK = 60


def test_bind_records_and_execute_runs(ray, tmp_path):
    ran = tmp_path / "ran"

    @ray.remote
    def add(x, y):
        ran.touch()
        return x + y

    @ray.remote
    def double(x):
        return 2 * x

    node = double.bind(add.bind(1, 2))
    assert isinstance(node, FunctionNode) and not ran.exists()  # nothing ran yet
    ref = node.execute()
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=DEADLOCK) == 6
    assert ray.get(node.execute(), timeout=DEADLOCK) == 6  # again: a fresh run


def test_inputs_shared_nodes_and_several_outputs(ray, tmp_path):
    @ray.remote
    def add(x, y):
        return x + y

    @ray.remote
    def counted(x):
        import uuid

        (tmp_path / uuid.uuid4().hex).touch()  # one file per run
        return (x,)

    with InputNode() as inp:
        shared = counted.bind(inp[0])
        total = add.bind(inp[0], inp.offset)
        dag = MultiOutputNode([shared, total, add.bind(shared, ())])
    first, second, third = ray.get(dag.execute(5, offset=10), timeout=DEADLOCK)
    assert first == (5,) and second == 15 and third == first
    assert len(list(tmp_path.iterdir())) == 1  # `shared` ran once, for both its users

    with InputNode() as inp:
        single = add.bind(inp, 1)
    assert ray.get(single.execute(41), timeout=DEADLOCK) == 42
    with pytest.raises(ValueError, match="uses its InputNode as one value"):
        single.execute(1, 2)
    with pytest.raises(ValueError, match="reads input 'offset'"):
        total.execute(1)


def test_actors_and_their_methods_in_a_graph(ray):
    @ray.remote
    class Counter:
        def __init__(self, start):
            self.value = start

        def add(self, amount):
            self.value += amount
            return self.value

    counter = Counter.bind(10)
    assert isinstance(counter, ClassNode) and "bind" in dir(Counter)
    first = counter.add.bind(1)
    dag = MultiOutputNode([first, counter.add.options(num_returns=1).bind(first)])
    assert isinstance(first, ClassMethodNode)
    low, high = ray.get(dag.execute(), timeout=DEADLOCK)
    assert (low, high) == (11, 22)  # one actor, its calls in order

    live = Counter.remote(0)
    assert ray.get(live.add.bind(5).execute(), timeout=DEADLOCK) == 5


def test_options_travel_with_bound_nodes(ray):
    @ray.remote
    def resources():
        return shmray.get_runtime_context().get_assigned_resources()

    node = resources.options(num_cpus=2).bind()
    assert node.get_options() == {"num_cpus": 2}
    assert ray.get(node.execute(), timeout=DEADLOCK)["CPU"] == 2


def test_a_node_cannot_be_passed_to_a_task(ray):
    @ray.remote
    def f(x):
        return x

    with pytest.raises(TypeError, match="a DAG node can't be pickled"):
        f.remote(f.bind(1))
