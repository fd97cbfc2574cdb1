"""The package's import graph: no cycle, the layers that the folders show, and the readers of a run
never import the trainer.

Every module of lavae_fast (and of its Triton kernels, ``lavae_fast.kernels``, which a source
checkout keeps in the top-level ``kernels/`` folder) is parsed, not imported: an import inside a
function counts as much as one at the top of the file, and so does ``importlib.import_module`` of a
literal name. The layering this checks (see shared/STYLE.md): the kernels import nothing of the
package above them; each layer folder (engine/, models/, runtime/, hub/) imports only what
:data:`LAYERS` allows it, and none reaches the trainer, the recipe, evaluation or the CLIs; the
models reach the engine only through its API (:mod:`lavae_fast.engine.ops`, never its reference or
backends); evaluation, figures, metrics, checkpoints and data never import :mod:`lavae_fast.train`.
The old module paths at the top of the package (shims, issue 25) belong to no layer: each only
aliases its module's new home.
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
    assert "lavae_fast.engine.ops" in graph["lavae_fast.models.lavae"]
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
                                    "lavae_fast.runtime.checkpoint", "lavae_fast.hub.reader", "lavae_fast.hub.loading",
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
    models = [name for name in graph if _layer(name) == "lavae_fast.models"]
    assert "lavae_fast.models.lavae" in models
    for name in models:
        assert not graph[name] & {"lavae_fast.engine.reference", "lavae_fast.engine._backends"}, name


def test_the_kernels_import_nothing_above_them():
    graph = import_graph()
    above = {name: sorted(t for t in targets if not t.startswith(KERNELS))
             for name, targets in graph.items() if name.startswith(KERNELS)}
    assert not any(above.values()), above


# ---------------------------------------------------------------------------------------------
# The layers that the folders show (issue 25; shared/STYLE.md, lesson 13)
# ---------------------------------------------------------------------------------------------

# The engine at the bottom, the models on it, runtime beside them (it needs neither), the hub on
# the models and runtime. A module of a layer may import the modules of its own layer and those
# listed here ("pkg.*": that package and every module under it), nothing else of lavae_fast.
LAYERS = {
    "lavae_fast.engine": (
        ["lavae_fast._C", f"{KERNELS}.*"],
        "the ops and their backends are the bottom layer: no model, file format, registry or trainer"),
    "lavae_fast.models": (
        ["lavae_fast.engine.ops", "lavae_fast.engine.norm", "lavae_fast.engine.noise", "lavae_fast.engine._common",
         "lavae_fast.hub.reader"],
        "a model knows the engine's API, never its reference or backends (so never which backend runs); "
        "from_pretrained reads its checkpoint through hub.reader, which imports no model"),
    "lavae_fast.runtime": (
        [],
        "file formats, processes and speed settings: no model class and no registry of shipped models"),
    "lavae_fast.hub": (
        ["lavae_fast.models.*", "lavae_fast.runtime.*", "lavae_fast.engine._common", "lavae_fast.pretrained"],
        "models by name, run or file: the models, the file format and the registry (lavae_fast.pretrained "
        "itself, not its export, which needs the trainer)"),
}

# What sits above every layer: the trainer, its configuration, run folders and recipes, evaluation
# and figures, the CLIs, and pretrained's export and command line. No module of a layer reaches
# one, however indirectly.
ABOVE_THE_LAYERS = frozenset({
    "lavae_fast.train", "lavae_fast.train_config", "lavae_fast.trainer", "lavae_fast.run_folder",
    "lavae_fast.recipe", "lavae_fast.schedules", "lavae_fast.evaluate", "lavae_fast.figures", "lavae_fast.metrics",
    "lavae_fast.demo", "lavae_fast._cli", "lavae_fast.pretrained.shipping", "lavae_fast.pretrained.__main__",
    "lavae_fast.data.__main__",
})


def _layer(name: str) -> str | None:
    for layer in LAYERS:
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def _allowed(target: str, patterns) -> bool:
    return any(target == p[:-2] or target.startswith(p[:-1]) if p.endswith(".*") else target == p
               for p in patterns)


def layer_violations(graph: dict) -> list:
    """(module, imported module, the rule) for every import of a layer's module that its row of
    :data:`LAYERS` does not allow."""
    found = []
    for name in sorted(graph):
        layer = _layer(name)
        if layer is None:
            continue
        allowed, why = LAYERS[layer]
        for target in sorted(graph[name]):
            if _layer(target) != layer and not _allowed(target, allowed):
                found.append((name, target, why))
    return found


def imported_by(graph: dict, start: str) -> set:
    """The modules that ``start`` imports, transitively (not the packages above each: importing any
    module of lavae_fast runs the package's __init__, which imports the public API, the recipe
    included, and the trainer when asked for; what a layer depends on is what its own modules
    import)."""
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def shims(graph: dict) -> dict:
    """The old module paths (issue 25): top-level modules that put another module in sys.modules
    under their own name -> the modules they import."""
    modules = package_modules()
    found = {}
    for name, targets in graph.items():
        path = modules[name][0]
        if path is None or name.count(".") != 1:
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        if "sys.modules[__name__] = " in source:
            found[name] = targets
    return found


def test_the_walk_finds_every_layer():
    graph = import_graph()
    for layer in LAYERS:
        assert layer in graph and any(_layer(n) == layer and n != layer for n in graph), layer


def test_each_layer_imports_only_what_its_row_allows():
    violations = layer_violations(import_graph())
    assert not violations, "\n".join(f"{m} imports {t}: {why}" for m, t, why in violations)


# One import each row forbids, planted into the real graph: the rule must catch it.
PLANTED = [
    ("lavae_fast.engine.ops", "lavae_fast.models.lavae"),          # the engine imports a model
    ("lavae_fast.engine._backends", "lavae_fast.runtime._io"),     # ... or a file format
    ("lavae_fast.models.lavae", "lavae_fast.engine.reference"),    # a model knows the reference
    ("lavae_fast.models.baseline", "lavae_fast.engine._backends"),  # ... or a backend
    ("lavae_fast.models.lavae", "lavae_fast.ops"),                 # ... or imports an old path
    ("lavae_fast.models.lavae", "lavae_fast.hub.loading"),         # the models import the loader
    ("lavae_fast.runtime.checkpoint", "lavae_fast.pretrained"),    # the file format imports the registry
    ("lavae_fast.runtime.checkpoint", "lavae_fast.models.lavae"),  # ... or a model class
    ("lavae_fast.hub.reader", "lavae_fast.pretrained.shipping"),   # the hub imports export
    ("lavae_fast.hub.loading", "lavae_fast.evaluate"),             # ... or evaluation
]


@pytest.mark.parametrize("module, target", PLANTED)
def test_a_planted_import_breaks_its_layer_rule(module, target):
    graph = {name: set(targets) for name, targets in import_graph().items()}
    assert target in graph and target not in graph[module]
    graph[module].add(target)
    assert [(m, t) for m, t, _ in layer_violations(graph)] == [(module, target)]


def test_no_layer_reaches_the_trainer_evaluation_or_a_cli():
    graph = import_graph()
    for name in graph:
        if _layer(name) is not None:
            above = sorted(imported_by(graph, name) & ABOVE_THE_LAYERS)
            assert not above, f"{name} imports {above} (directly or through the modules it imports)"
    planted = {name: set(targets) for name, targets in graph.items()}
    planted["lavae_fast.pretrained"].add("lavae_fast.pretrained.shipping")  # the registry, which hub.reader imports
    assert "lavae_fast.pretrained.shipping" in imported_by(planted, "lavae_fast.models.lavae")


def test_the_model_reader_imports_no_model():
    # What lets from_pretrained (models) use it: no cycle, and the models stay below the hub's loader.
    graph = import_graph()
    assert not [t for t in imported_by(graph, "lavae_fast.hub.reader") if _layer(t) == "lavae_fast.models"]


def test_the_old_paths_only_alias_the_new_homes():
    graph = import_graph()
    old = shims(graph)
    assert "lavae_fast.model" in old and "lavae_fast.ops" in old
    for name, targets in old.items():
        assert _layer(name) is None and targets and all(_layer(t) is not None for t in targets), (name, targets)
    # Nothing moved imports an old path; only the modules that stay where they were may.
    for name, targets in graph.items():
        if _layer(name) is not None:
            assert not targets & set(old), (name, sorted(targets & set(old)))
