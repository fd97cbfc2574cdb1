"""Turn a run (directory or checkpoint file) into a shippable model file with its provenance.

The file is a checkpoint in the run's own format (written by
:func:`lavae_fast.runtime.checkpoint.save_checkpoint`: atomic, with its SHA-256) holding only
:data:`lavae_fast.pretrained.SHIPPED_KEYS` — no optimiser, no warm-up VAE — plus ``provenance``:

* ``command``: the training command, rebuilt from the run's recorded arguments;
* ``config``: the settings that trained it, as a config file holds them (``train --config``):
  resolved as ``--resume`` resolves an old run's, without the output folder, data path or device;
* ``train_commit``: the commit that trained it when given (``--train-commit``; runs do not record it),
  ``export_commit``: the commit of the code that exported it (``git describe``-style, ``-dirty``
  when the work tree had changes);
* ``data``: the data settings (data set, canvas, split sizes, seed, directory, fingerprint);
* ``metrics``: the measured results, read from the run's ``eval.json`` (``python -m
  lavae_fast.evaluate RUN_DIR``), or None when exported with ``--no-metrics``;
* ``step``, ``source`` (the checkpoint file and its digest), versions of lavae_fast and torch, time.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from typing import Any, Dict, Optional

import torch

from .._version import __version__
from ..runtime.checkpoint import load_run_checkpoint, save_checkpoint
from ..train_config import resolved_settings
from . import KINDS, REGISTRY, SHIPPED_KEYS, model_file, names

__all__ = ["export", "training_command", "git_commit", "read_measured_metrics", "MetricsMismatch"]

DATA_KEYS = ("dataset", "data", "canvas", "n_train", "n_test", "n_test7", "data_seed")


# The settings that are paths on the machine that trained a model: the shipped provenance names
# them by these placeholders, not by that machine's folders.
PATH_PLACEHOLDERS = {"out": "RUN_DIR", "data": "DATA_DIR"}


def training_command(args: Dict[str, Any]) -> str:
    """``python -m lavae_fast.train …`` with every recorded argument that differs from the
    trainer's default, spelled as its own option (so the command is what was run, up to defaults),
    but for the paths of the machine that ran it: ``--out RUN_DIR`` and ``--data DATA_DIR`` stand
    for them (:data:`PATH_PLACEHOLDERS`)."""
    import argparse
    import shlex

    from ..train import build_parser

    parts = ["python", "-m", "lavae_fast.train"]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest not in args or action.dest == "help":
            continue
        value, default = args[action.dest], action.default
        if isinstance(value, (list, tuple)):  # the canvas: recorded as [H, W], spelled HxW
            if isinstance(default, (list, tuple)) and tuple(value) == tuple(default):
                continue
            value = "x".join(str(v) for v in value)
        elif value == default and not action.required:
            continue
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction) and value != action.const:
            continue  # a flag that sets another value of a shared dest (--no-bf16 sets bf16 = "off")
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            parts.append(f"--{'' if value else 'no-'}{action.dest.replace('_', '-')}")
        elif action.nargs == 0:  # store_true / store_false: the flag alone says it
            parts.append(flag)
        else:
            parts += [flag, PATH_PLACEHOLDERS.get(action.dest, str(value))]
    return " ".join(shlex.quote(p) for p in parts)


def git_commit(path: str) -> Optional[str]:
    """The commit checked out where ``path`` lives (+ "-dirty" for local changes), or None outside git."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", path, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        head = run("rev-parse", "HEAD")
        return head + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


class MetricsMismatch(ValueError):
    """A metrics file that is not an evaluation result of the checkpoint being exported."""


def read_measured_metrics(path: str, state: Dict[str, Any], used: str) -> Dict[str, Any]:
    """The results file ``path`` (written by ``python -m lavae_fast.evaluate``) as the measured
    metrics of the checkpoint ``state`` (read from ``used``), or :class:`MetricsMismatch` naming what
    does not match: a file that is not an evaluation result, one of another checkpoint (step or
    digest), of other data than the run's, or measured with other counting or exclusion windows
    than the model's own. Shipping a model with another model's numbers is what this prevents."""
    from ..evaluate import RESULTS_KIND
    from ..hub.loading import MODEL_CLASSES
    from ..hub.reader import restore_model

    try:
        with open(path) as f:
            measured = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsMismatch(f"metrics {path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise MetricsMismatch(f"metrics {path} is not JSON ({exc})") from None
    meta = measured.get("meta") if isinstance(measured, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != RESULTS_KIND or not isinstance(measured.get("results"), dict):
        raise MetricsMismatch(f"metrics {path} is not an evaluation result of this version of lavae_fast (no "
                              f"meta.kind {RESULTS_KIND!r} and results): run `python -m lavae_fast.evaluate` on the run")
    again = f"run `python -m lavae_fast.evaluate {used}` again (it writes the metrics of the checkpoint it reads)"
    ck = meta.get("checkpoint") or {}
    if ck.get("sha256") != state.get("sha256") or ck.get("step") != int(state["step"]):
        raise MetricsMismatch(
            f"metrics {path} measured another checkpoint (step {ck.get('step')}, SHA-256 "
            f"{str(ck.get('sha256'))[:12]}…) than the one exported, {used} (step {int(state['step'])}, SHA-256 "
            f"{str(state.get('sha256'))[:12]}…): {again}")
    if not (meta.get("data") or {}).get("own"):
        raise MetricsMismatch(f"metrics {path} were measured on other data than the run's own "
                              f"({(meta.get('data') or {}).get('path')}): {again} without --data")
    model = restore_model(MODEL_CLASSES[state["model_config"]["kind"]], state, used)
    for key in ("count_window", "exclusion_window"):
        own = getattr(model, key, None)
        if meta.get(key) != own:
            raise MetricsMismatch(f"metrics {path} were measured with {key.replace('_', ' ')} {meta.get(key)}, the "
                                  f"exported model uses {own}: {again} without --{key.replace('_', '-')}")
    return measured


def export(run: str, *, name: Optional[str] = None, out: Optional[str] = None, metrics: Optional[str] = None,
           no_metrics: bool = False, train_commit: Optional[str] = None, note: Optional[str] = None,
           overwrite: bool = False) -> str:
    """Write the model of ``run`` (a run directory or checkpoint file) as a shippable file; returns
    its path.

    Destination: ``out``, or with ``name`` the registry's file for (the run's model kind, name) in
    this package folder. ``metrics``: a JSON file of measured results (default: where
    ``python -m lavae_fast.evaluate RUN`` writes them, :func:`lavae_fast.evaluate.default_results_path`); without one the export is refused unless ``no_metrics`` — a shipped model says
    how well it counts. An existing destination is replaced only with ``overwrite``.
    """
    if (name is None) == (out is None):
        raise ValueError("give exactly one of name (a registered model name) and out (a file path)")
    state, used = load_run_checkpoint(run)  # verified, weights_only, falls back to .prev with a warning
    kind = state["model_config"]["kind"]
    if name is not None:
        if (kind, name) not in REGISTRY:
            raise ValueError(f"unknown name {name!r} for a {KINDS[kind]}: registered names are "
                             f"{', '.join(repr(n) for n in names(kind))} (add one to lavae_fast.pretrained.REGISTRY)")
        out = model_file(kind, name)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")

    if metrics is None and not no_metrics:
        from ..evaluate import default_results_path

        metrics = default_results_path(run)
        if not os.path.isfile(metrics):
            raise FileNotFoundError(f"no measured metrics for {run}: run `python -m lavae_fast.evaluate {run}` "
                                    f"first (it writes {metrics}), pass --metrics FILE, or --no-metrics")
    measured = None
    if metrics is not None and not no_metrics:
        measured = read_measured_metrics(metrics, state, used)

    from ..train import build_parser

    args = dict(state["args"])
    provenance = {
        "name": name,
        "command": training_command(args),
        # The settings that trained it as a config file's (train --config): the run's recorded
        # settings resolved as --resume resolves them, without one machine's paths and devices.
        "config": resolved_settings(args, {a.dest for a in build_parser()._actions if a.option_strings}),
        "train_commit": train_commit,
        "export_commit": git_commit(os.path.dirname(os.path.abspath(__file__))),
        "data": {**{k: args.get(k) for k in DATA_KEYS}, "fingerprint": state.get("data_fingerprint")},
        "metrics": measured,
        # File names, not this machine's paths: the checkpoint's sha256 identifies it.
        "metrics_file": None if measured is None else os.path.basename(metrics),
        "step": int(state["step"]),
        "source": {"file": os.path.basename(used), "sha256": state.get("sha256")},
        "lavae_fast_version": __version__,
        "torch_version": str(torch.__version__),  # a str subclass weights_only would refuse
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": note,
    }
    # clone(): a view of a bigger buffer would otherwise save the whole buffer.
    model = {k: v.detach().cpu().clone() for k, v in state["model"].items()}
    shipped = {**{k: state.get(k) for k in SHIPPED_KEYS}, "model": model, "provenance": provenance}
    save_checkpoint(out, shipped, keep_previous=False)
    # save_checkpoint's temporary file is private (0600); package data must be readable by every user
    # of an installation made by another (root's pip install, a wheel built from this tree).
    os.chmod(out, 0o644)
    return out
