"""The package's import graph: no cycle, and the readers of a run never import the trainer.

Every module of lavae_fast (and of its Triton kernels, ``lavae_fast.kernels``, which a source
checkout keeps in the top-level ``kernels/`` folder) is parsed, not imported: an import inside a
function counts as much as one at the top of the file, and so does ``importlib.import_module`` of a
literal name. The layering this checks (see shared/STYLE.md): the kernels import nothing of the
package above them; the model reaches the engine only through :mod:`lavae_fast.ops`; evaluation,
figures, metrics, checkpoints and data never import :mod:`lavae_fast.train`.
"""

from __future__ import annotations

import ast
import os
import pkgutil

import pytest

import lavae_fast

PACKAGE = "lavae_fast"
KERNELS = f"{PACKAGE}.kernels"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernels_dir() -> str | None:
    """The folder of the Triton kernels: inside the installed package, or the checkout's kernels/."""
    for path in (os.path.join(os.path.dirname(lavae_fast.__file__), "kernels"),
                 os.path.join(os.path.dirname(os.path.dirname(lavae_fast.__file__)), "kernels"),
                 os.path.join(ROOT, "kernels")):
        if os.path.isfile(os.path.join(path, "__init__.py")):
            return path
    return None


def _walk(name: str, folder: str, out: dict) -> None:
    """Every module under ``folder`` (a package named ``name``): dotted name -> (file, is_package)."""
    out[name] = (os.path.join(folder, "__init__.py"), True)
    for info in pkgutil.iter_modules([folder]):
        full = f"{name}.{info.name}"
        if full == KERNELS:
            continue  # walked from wherever the kernels live (below)
        if info.ispkg:
            _walk(full, os.path.join(folder, info.name), out)
        else:
            source = os.path.join(folder, info.name + ".py")
            out[full] = (source if os.path.isfile(source) else None, False)  # None: compiled (_C)


def package_modules() -> dict:
    modules: dict = {}
    _walk(PACKAGE, os.path.dirname(lavae_fast.__file__), modules)
    kernels = _kernels_dir()
    if kernels is not None:
        _walk(KERNELS, kernels, modules)
    return modules


def _canonical(dotted: str) -> str:
    # In a source checkout the kernels may be imported by their folder's name.
    if dotted == "kernels" or dotted.startswith("kernels."):
        return KERNELS + dotted[len("kernels"):]
    return dotted


def _target(dotted: str, modules: dict) -> str | None:
    """The package module that importing ``dotted`` runs: the longest known prefix."""
    dotted = _canonical(dotted)
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, modules: dict) -> set:
    """The package modules that module ``name`` imports, anywhere in its file."""
    path, is_pkg = modules[name]
    if path is None:
        return set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                t = _target(alias.name, modules)
                if t:
                    found.add(t)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = _canonical(node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                t = sub if sub in modules else _target(base, modules)
                if t:
                    found.add(t)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            t = _target(node.args[0].value, modules)
            if t:
                found.add(t)
    found.discard(name)
    return found


def import_graph() -> dict:
    modules = package_modules()
    return {name: imports_of(name, modules) for name in modules}


def find_cycle(graph: dict) -> list | None:
    """One cycle of ``graph`` (module -> imported modules) as [a, b, ..., a], or None."""
    state: dict = {}  # 1: on the current path, 2: done
    path: list = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def reachable(graph: dict, start: str) -> set:
    """Every module that importing ``start`` runs: its imports, transitively, and the packages above
    each (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first)."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        parts = node.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(graph.get(node, ()))
    return seen


def test_the_walk_finds_the_package():
    graph = import_graph()
    for name in ("lavae_fast.train", "lavae_fast.ops", "lavae_fast.data.generator", "lavae_fast.pretrained.shipping"):
        assert name in graph
    assert "lavae_fast.ops" in graph["lavae_fast.model"]
    if _kernels_dir() is not None:
        assert "lavae_fast.kernels.place" in graph["lavae_fast.kernels"]


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}) == ["b", "b2", "b"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("reader", ["lavae_fast.evaluate", "lavae_fast.figures", "lavae_fast.metrics",
                                    "lavae_fast.checkpoint", "lavae_fast.loading", "lavae_fast.data",
                                    "lavae_fast.data.__main__"])
def test_readers_of_a_run_do_not_import_the_trainer(reader):
    graph = import_graph()
    assert "lavae_fast.train" not in reachable(graph, reader), (
        f"{reader} imports lavae_fast.train (directly or through the modules it imports)")


@pytest.mark.parametrize("reader", ["lavae_fast.evaluate", "lavae_fast.figures", "lavae_fast.metrics"])
def test_the_evaluation_imports_no_training_module(reader):
    # Every module reaches the recipes through the package's __init__ (lavae_fast.Recipe), so this
    # checks the module's own imports: the evaluation finds a model's evaluator by its class, never
    # through a recipe or the trainer.
    training = {"lavae_fast.train", "lavae_fast.trainer", "lavae_fast.train_config", "lavae_fast.recipe"}
    assert not import_graph()[reader] & training


def test_the_model_knows_only_the_ops_api():
    graph = import_graph()
    assert "lavae_fast.reference" not in graph["lavae_fast.model"]


def test_the_kernels_import_nothing_above_them():
    graph = import_graph()
    above = {name: sorted(t for t in targets if not t.startswith(KERNELS))
             for name, targets in graph.items() if name.startswith(KERNELS)}
    assert not any(above.values()), above
