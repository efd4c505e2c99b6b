"""The layout a reader relies on: the top-level modules import each other one way only (no cycle,
imports inside functions included), and no script imports another script (the benchmarks may import
train.py, whose run they measure)."""
import ast
import os

from conftest import ROOT

SCRIPTS = {"sample", "train", "train_image", "evaluate", "bench", "bench_long"}


def import_graph():
    """{module: the project's top-level modules it imports} for every top-level .py file."""
    modules = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    graph = {}
    for module in modules:
        with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[module] = (imported & modules) - {module}
    return graph


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    return next((cycle for node in sorted(graph) if node not in state and (cycle := visit(node))), None)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"simda", "unet", "adapters", "train", "sample"} <= graph.keys()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_script_imports_another_script_and_the_models_import_no_script():
    graph = import_graph()
    for script in SCRIPTS:
        assert not graph[script] & SCRIPTS, f"{script} imports {graph[script] & SCRIPTS}"
    for library in graph.keys() - SCRIPTS:
        # the benchmarks build the training run they measure with train.py's own code (train.build_run)
        allowed = {"train"} if library.startswith("bench_") else set()
        assert not graph[library] & SCRIPTS - allowed, f"{library} imports {graph[library] & SCRIPTS}"
