"""The package's shape: imports only go downward (no cycle among shmray's modules), and no
module imports another inside a function to dodge one.  Read from the source with ast."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "src" / "shmray"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports():
    """(module, imported shmray module, whether at module level) for every import."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "build" not in p.name}
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((name, target if target in modules else base, id(node) in top))
    return modules, found


def test_no_module_imports_inside_a_function():
    _, found = _imports()
    assert [(m, t) for m, t, at_top in found if not at_top and t.startswith("shmray")] == []


def test_imports_form_no_cycle():
    modules, found = _imports()
    graph = {name: set() for name in modules}
    for module, target, _ in found:
        if target in modules and target != module:
            graph[module].add(target)
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_messages_are_built_only_by_their_constructors():
    """A tuple that starts with an opcode (``(P.RELEASE, ids)``) built anywhere but in
    ``_protocol``'s constructors would let two places disagree about a message's fields."""
    import re

    opcodes = set(re.findall(r"^([A-Z_]+) = \d+$", (PACKAGE / "_protocol.py").read_text(), re.M))
    built = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Tuple) or not node.elts:
                continue
            first, rest = node.elts[0], node.elts[1:]
            if not (isinstance(first, ast.Attribute) and first.attr in opcodes):
                continue
            if all(isinstance(e, ast.Attribute) and e.attr in opcodes for e in rest) and rest:
                continue  # a set of opcodes, not a message
            if len(rest) == 1 and isinstance(rest[0], ast.Starred):
                continue  # a message received, its fields put back together
            built.append(f"{path.name}:{node.lineno}")
    assert built == []


def test_modules_and_classes_stay_readable_and_say_where_they_run():
    """No module past ~600 lines nor class past ~400 (the C store excepted: one arena under
    one lock reads best whole), and each module's docstring says which processes run it."""
    problems = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        tree = ast.parse(text)
        name = path.relative_to(PACKAGE)
        if len(text.splitlines()) > 600:
            problems.append(f"{name}: {len(text.splitlines())} lines")
        if "Runs in:" not in (ast.get_docstring(tree) or ""):
            problems.append(f"{name}: its docstring does not say what runs it")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 400:
                problems.append(f"{name}: class {node.name} is "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert problems == []
