"""Every import path, attribute and ``python -m`` command that README.md, docs/ and examples/ name
works, and so does every module path from before the package's modules moved into folders
(issue 25), as the very module at its new home.

The lists below are the documents' own; a test reads the documents again and fails on a path they
name that is not listed here, so that a new one gets checked too.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest

import lavae_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(lavae_fast.__file__)))
DOCUMENTS = ["README.md", *(os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                            if f.endswith(".md")),
             *(os.path.join("examples", f) for f in sorted(os.listdir(os.path.join(ROOT, "examples")))
               if f.endswith(".py"))]

# The modules the documents name (in prose, `import`s and `python -m`), and the names they use from them.
MODULES = {
    "lavae_fast": ["LAVAE", "BetaVAE", "Recipe", "Trainer", "TrainConfig", "ops", "reference", "__version__"],
    "lavae_fast.model": ["LAVAE", "Latents"],  # an old path, named as one
    "lavae_fast.ops": ["place_and_loglik", "gumbel_topk_relaxed", "count_objects", "gather_appearance", "engine"],
    "lavae_fast.reference": ["place_and_loglik", "gumbel_topk_relaxed", "count_objects", "gather_appearance"],
    "lavae_fast.norm": ["lrelu_batch_norm"],
    "lavae_fast.performance": ["bf16_native", "tune_allocator"],
    "lavae_fast._backends": ["cpu_capability", "kernels_package"],
    "lavae_fast.data": ["MultiObjectDataset", "generate_arrays", "import_images"],
    "lavae_fast.data.shapes": ["draw_scenes", "write_scene_folder"],
    "lavae_fast.recipe": ["Recipe", "LAVAERecipe", "BetaVAERecipe", "register_recipe"],
    "lavae_fast.train": ["main"],
    "lavae_fast.evaluate": ["main", "evaluate_run"],
    "lavae_fast.figures": ["main"],
    "lavae_fast.pretrained": ["REGISTRY", "resolve", "shipped"],
    "lavae_fast.pretrained.shipping": ["export"],
}
# Built or mapped at installation: checked where the build has them (tests/test_ops.py, test_triton.py).
BUILT = ["lavae_fast._C", "lavae_fast.kernels"]
# The methods and attributes the documents call on the models and the recipe.
MEMBERS = {
    "LAVAE": ["from_pretrained", "infer", "decode", "swap_objects", "log_likelihood", "accelerate", "count_window",
              "exclusion_window", "eval"],
    "BetaVAE": ["from_pretrained"],
    "Recipe": ["optimizer", "step", "loss"],
    "Trainer": ["setup", "fit", "evaluate"],
}
# ``python -m`` commands (torchrun's ``-m`` included) and the console scripts of setup.py.
COMMANDS = ["lavae_fast.data", "lavae_fast.train", "lavae_fast.evaluate", "lavae_fast.figures", "lavae_fast.pretrained"]
CONSOLE_SCRIPTS = {
    "lavae-data": "lavae_fast.data.__main__:main",
    "lavae-train": "lavae_fast.train:main",
    "lavae-evaluate": "lavae_fast.evaluate:main",
    "lavae-figures": "lavae_fast.figures:main",
    "lavae-demo": "lavae_fast.demo:main",
}

# Each module's path before issue 25 -> the module that holds it now.
OLD_PATHS = {
    "lavae_fast.ops": "lavae_fast.engine.ops",
    "lavae_fast.norm": "lavae_fast.engine.norm",
    "lavae_fast.reference": "lavae_fast.engine.reference",
    "lavae_fast._schemas": "lavae_fast.engine._schemas",
    "lavae_fast._backends": "lavae_fast.engine._backends",
    "lavae_fast.noise": "lavae_fast.engine.noise",
    "lavae_fast._common": "lavae_fast.engine._common",
    "lavae_fast.model": "lavae_fast.models.lavae",
    "lavae_fast.baseline": "lavae_fast.models.baseline",
    "lavae_fast.aux_vae": "lavae_fast.models.aux_vae",
    "lavae_fast.distributed": "lavae_fast.runtime.distributed",
    "lavae_fast.performance": "lavae_fast.runtime.performance",
    "lavae_fast._io": "lavae_fast.runtime._io",
    "lavae_fast._process": "lavae_fast.runtime._process",
    "lavae_fast.loading": "lavae_fast.hub.loading",
}
# lavae_fast.checkpoint was split: the file format to runtime, the model reader to the hub.
CHECKPOINT_MOVED = {"read_model_checkpoint": "lavae_fast.hub.reader", "restore_model": "lavae_fast.hub.reader",
                    "model_kwargs": "lavae_fast.hub.reader", "LEGACY_LAVAE_CONFIG": "lavae_fast.hub.reader",
                    "save_checkpoint": "lavae_fast.runtime.checkpoint", "load_checkpoint": "lavae_fast.runtime.checkpoint",
                    "CheckpointError": "lavae_fast.runtime.checkpoint", "state_digest": "lavae_fast.runtime.checkpoint"}


def _documents_text() -> str:
    parts = []
    for name in DOCUMENTS:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def test_the_documents_name_no_path_left_out_here():
    text = _documents_text()
    named = set(re.findall(r"\blavae_fast(?:\.[A-Za-z_]\w*)*", text))
    listed = set(MODULES) | set(BUILT) | {f"{m}.{a}" for m, names in MODULES.items() for a in names}
    assert named - listed == set(), "named in README/docs/examples, not checked here: add them"
    commands = set(re.findall(r"(?:python|torchrun)\b[^`\n]*?\s-m\s+(lavae_fast[\w.]*)", text))
    assert commands and commands <= set(COMMANDS), commands - set(COMMANDS)
    imports = re.findall(r"^\s*from (lavae_fast[\w.]*) import ([\w, ]+)$", text, re.M)
    assert imports
    for module, names in imports:
        assert {n.strip() for n in names.split(",")} <= set(MODULES[module]), (module, names)
    scripts = set(re.findall(r"\blavae-(?:data|train|evaluate|figures|demo)\b", text))
    assert scripts <= set(CONSOLE_SCRIPTS), scripts


def test_the_documents_file_paths_exist_and_are_not_old_paths():
    for path in re.findall(r"\blavae_fast/[\w/.\-]*\w/?", _documents_text()):
        full = os.path.join(ROOT, path)
        assert os.path.exists(full), path
        if path.endswith(".py"):
            with open(full, encoding="utf-8") as f:
                assert "sys.modules[__name__] = " not in f.read(), f"{path} is an old path: name the module's new home"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_named_module_imports_with_its_named_attributes(module):
    mod = importlib.import_module(module)
    missing = [name for name in MODULES[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lacks {missing}"


def test_the_built_modules_import_where_built(ext):
    assert importlib.import_module("lavae_fast._C").cpu_capability() in ("default", "avx2", "avx512")
    try:
        kernels = lavae_fast._backends.kernels_package()  # lavae_fast.kernels, or a checkout's kernels/
    except ImportError as exc:
        pytest.skip(f"the Triton kernels do not import here: {exc}")
    assert callable(kernels.count_objects)


@pytest.mark.parametrize("owner", sorted(MEMBERS))
def test_the_named_members_exist(owner):
    cls = getattr(lavae_fast, owner)
    assert not [m for m in MEMBERS[owner] if not hasattr(cls, m)]


@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_each_console_script_resolves(script):
    module, _, function = CONSOLE_SCRIPTS[script].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        assert f'"{script}={CONSOLE_SCRIPTS[script]}"' in f.read()


@pytest.mark.parametrize("module", COMMANDS)
def test_each_python_m_command_says_its_help(module):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage:" in res.stdout


# ---------------------------------------------------------------------------------------------
# The old module paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_an_old_path_is_the_module_at_its_new_home(old):
    new = importlib.import_module(OLD_PATHS[old])
    assert importlib.import_module(old) is new
    assert sys.modules[old] is new and getattr(lavae_fast, old.rpartition(".")[2]) is new
    exec(f"import {old} as via_import", namespace := {})
    assert namespace["via_import"] is new


@pytest.mark.parametrize("name", sorted(CHECKPOINT_MOVED))
def test_the_old_checkpoint_path_gives_each_name_from_its_new_home(name):
    import lavae_fast.checkpoint

    home = importlib.import_module(CHECKPOINT_MOVED[name])
    assert getattr(lavae_fast.checkpoint, name) is getattr(home, name)
    exec(f"from lavae_fast.checkpoint import {name} as got", namespace := {})
    assert namespace["got"] is getattr(home, name)
    assert name in lavae_fast.checkpoint.__all__


def test_a_patch_through_an_old_path_reaches_the_code_that_runs(monkeypatch):
    import lavae_fast._backends
    import lavae_fast.checkpoint
    from lavae_fast import LAVAE
    from lavae_fast.engine import _backends
    from lavae_fast.hub import reader

    monkeypatch.setattr(lavae_fast._backends, "cpu_kernels_error", "patched")
    assert _backends.cpu_kernels_error == "patched"

    def fake_restore(cls, state, path, **kw):
        return ("restored", path)

    monkeypatch.setattr(lavae_fast.checkpoint, "restore_model", fake_restore)
    assert reader.restore_model is fake_restore
    assert LAVAE.from_pretrained("multi-dsprites")[0] == "restored"  # it calls hub.reader's restore_model
    monkeypatch.undo()
    assert reader.restore_model is not fake_restore and _backends.cpu_kernels_error != "patched"


def test_the_old_paths_are_attributes_of_a_freshly_imported_package():
    # Importing the package used to import most of these modules, which made them its attributes.
    homes = {old.rpartition(".")[2]: new for old, new in OLD_PATHS.items()}
    code = ("import importlib, lavae_fast\n"
            f"for name, home in {homes!r}.items():\n"
            "    assert getattr(lavae_fast, name) is importlib.import_module(home), name\n"
            "assert lavae_fast.checkpoint.save_checkpoint is importlib.import_module('lavae_fast.runtime.checkpoint').save_checkpoint\n"
            "print(lavae_fast._backends.cpu_capability.__module__)\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "lavae_fast.engine._backends"
