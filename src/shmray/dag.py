"""``shmray.dag``: Ray's lazy task graphs.  ``f.bind(...)`` records a call instead of making
it; ``dag.execute(...)`` makes every call of the graph, each once, and returns the refs of
its output, as Ray's ``ray.dag``.

Runs in: the driver, workers and actors (wherever a graph is built and executed).

A node holds what was bound: the remote function, actor class or actor method, its
arguments (which may hold other nodes, at any depth of lists, tuples and dicts) and its
options.  Executing a graph walks it from the output, submits each node once (a node
several others use is shared, so a ClassNode is one actor per execution) and passes the
refs of a node's results on as its users' arguments, so the calls run as an ordinary task
DAG: nothing waits in the driver.  ``InputNode`` stands for ``execute``'s arguments:
``inp`` is the only positional one, ``inp[i]`` the i-th, ``inp[key]`` and ``inp.key`` a
keyword one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional


class DAGNode:
    """A call bound into a graph; ``execute()`` makes it, and the calls it depends on."""

    def __init__(self, args: tuple, kwargs: Dict[str, Any], options: Dict[str, Any]):
        self._bound_args = tuple(args)
        self._bound_kwargs = dict(kwargs)
        self._bound_options = dict(options)

    def get_args(self) -> tuple:
        return self._bound_args

    def get_kwargs(self) -> Dict[str, Any]:
        return dict(self._bound_kwargs)

    def get_options(self) -> Dict[str, Any]:
        return dict(self._bound_options)

    def execute(self, *args, **kwargs):
        """Submit the graph's calls; the refs of this node's results (the actor handle, for
        a ClassNode), with ``args``/``kwargs`` where the graph has an InputNode."""
        return self._run(_Execution(args, kwargs))

    def _run(self, execution: "_Execution"):
        done = execution.results
        if id(self) not in done:
            done[id(self)] = self._submit(execution)
        return done[id(self)]

    def _arguments(self, execution: "_Execution"):
        return (_resolve(self._bound_args, execution),
                _resolve(self._bound_kwargs, execution))

    def _submit(self, execution: "_Execution"):
        raise NotImplementedError  # each kind of node says how it is called

    def __getstate__(self):
        raise TypeError("a DAG node can't be pickled or passed to a task: execute() the "
                        "graph, and pass the refs it returns")


class _RemoteNode(DAGNode):
    """A node made by ``.remote()`` on what was bound (with its ``.options()``)."""

    def __init__(self, body, args, kwargs, options):
        super().__init__(args, kwargs, options)
        self._body = body

    def _submit(self, execution):
        args, kwargs = self._arguments(execution)
        return _with_options(self._body, self._bound_options).remote(*args, **kwargs)


class FunctionNode(_RemoteNode):
    """``remote_function.bind(...)``: a task."""


class ClassNode(_RemoteNode):
    """``ActorClass.bind(...)``: an actor, made once per execution; ``node.method.bind()``
    calls one of its methods."""

    def __getattr__(self, name: str) -> "_UnboundMethod":
        if name.startswith("_"):
            raise AttributeError(name)
        return _UnboundMethod(self, name, {})


class ClassMethodNode(DAGNode):
    """``class_node.method.bind(...)`` or ``handle.method.bind(...)``: an actor call."""

    def __init__(self, actor, method_name: str, args, kwargs, options, method=None):
        super().__init__(args, kwargs, options)
        self._actor = actor  # a ClassNode, or a live actor handle
        self._method_name = method_name
        self._method = method  # a live handle's method, options applied

    def _submit(self, execution):
        args, kwargs = self._arguments(execution)
        if self._method is not None:
            return self._method.remote(*args, **kwargs)
        method = getattr(self._actor._run(execution), self._method_name)
        return _with_options(method, self._bound_options).remote(*args, **kwargs)


class _UnboundMethod:
    """``class_node.method``: ``.bind()`` it (``.options()`` first if need be)."""

    def __init__(self, actor, name: str, options: Dict[str, Any]):
        self._actor, self._name, self._options = actor, name, options

    def options(self, **options) -> "_UnboundMethod":
        return _UnboundMethod(self._actor, self._name, {**self._options, **options})

    def bind(self, *args, **kwargs) -> ClassMethodNode:
        return ClassMethodNode(self._actor, self._name, args, kwargs, self._options)


class InputNode(DAGNode):
    """``execute()``'s arguments, in the graph: ``with InputNode() as inp: ...``."""

    def __init__(self):
        super().__init__((), {}, {})

    def __enter__(self) -> "InputNode":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def __getitem__(self, key) -> "InputAttributeNode":
        return InputAttributeNode(self, key)

    def __getattr__(self, name: str) -> "InputAttributeNode":
        if name.startswith("_"):
            raise AttributeError(name)
        return InputAttributeNode(self, name)

    def _submit(self, execution):
        if len(execution.args) == 1 and not execution.kwargs:
            return execution.args[0]
        raise ValueError(
            f"the graph uses its InputNode as one value, but execute() was given "
            f"{len(execution.args)} positional and {len(execution.kwargs)} keyword "
            "arguments: pass one, or use inp[i] / inp['key'] / inp.key in the graph")


class InputAttributeNode(DAGNode):
    """``inp[i]`` (the i-th positional argument of ``execute``), ``inp[key]`` or
    ``inp.key`` (a keyword argument)."""

    def __init__(self, input_node: InputNode, key):
        super().__init__((), {}, {})
        self._input_node, self._key = input_node, key

    def _submit(self, execution):
        key = self._key
        try:
            return execution.args[key] if isinstance(key, int) else execution.kwargs[key]
        except (IndexError, KeyError):
            raise ValueError(
                f"the graph reads input {key!r}, which execute() was not given (it got "
                f"{len(execution.args)} positional arguments and keywords "
                f"{sorted(execution.kwargs)})") from None


class MultiOutputNode(DAGNode):
    """Several outputs: ``execute()`` returns the list of their results."""

    def __init__(self, outputs: List[DAGNode]):
        super().__init__((list(outputs),), {}, {})

    def _submit(self, execution):
        return _resolve(self._bound_args[0], execution)


class _Execution:
    """One ``execute()``: its inputs, and each node's results once submitted."""

    def __init__(self, args: tuple, kwargs: Dict[str, Any]):
        self.args, self.kwargs = args, kwargs
        self.results: Dict[int, Any] = {}


def _resolve(value, execution: _Execution):
    """``value`` with every node in it replaced by that node's results."""
    if isinstance(value, DAGNode):
        return value._run(execution)
    if type(value) in (list, tuple):  # not subclasses: a namedtuple keeps its fields
        resolved = [_resolve(item, execution) for item in value]
        return resolved if type(value) is list else tuple(resolved)
    if type(value) is dict:
        return {key: _resolve(item, execution) for key, item in value.items()}
    return value


def _with_options(callee, options: Optional[Dict[str, Any]]):
    return callee.options(**options) if options else callee


__all__ = ["ClassMethodNode", "ClassNode", "DAGNode", "FunctionNode", "InputAttributeNode",
           "InputNode", "MultiOutputNode"]
