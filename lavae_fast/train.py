"""Training (SPEC §5): ``python -m lavae_fast.train --model lavae --dataset multi-dsprites --out RUN``.

The recipe of the paper's appendix B, every milestone scaled by one ``--steps`` budget (100k = the
paper's schedule; see :mod:`lavae_fast.schedules`):

* Adamax, batch 64; lr 1e-3, except the location inference net (loc residual net + head): 1e-4
  (multi-MNIST) or 5e-4 (multi-dSprites), decayed exponentially ×100 over the horizon;
* τ from 0.5 to 0.02, exponentially;
* the location estimator: in training the relaxed Gumbel-softmax samples place the sprites, read
  the appearance and give log q (``--location-mode relaxed --loc-kl relaxed``, the paper's; hard
  draws everywhere else); ``straight_through`` is an option (SPEC §3);
* warm-up: an auxiliary VAE (:mod:`lavae_fast.aux_vae`) trained alongside on its own ELBO (its own
  parameter group, lr 1e-3); its per-location KL map is the source of h_loc's target, the squared
  distance summed over pixels per image with weight 1 (``--warmup-weight``) for 30% of the
  horizon, then linearly → 0 over the next 30% (the aux VAE is not run after that). The target's
  form is a decision SPEC §5 leaves to us (each step measured, see :mod:`lavae_fast.aux_vae`): the
  map is blurred (σ = S/7 px, ``--warmup-blur``) so that it has one peak per object, and scaled
  per batch so that its typical object peak sits at 2·4γ (the raw map peaks below the count
  threshold 4γ); each of its points above 4γ becomes a cone of height 2·4γ and radius S/4
  (``--warmup-target cones``, ``--warmup-peak``, ``--warmup-radius``), its apex moved to the
  image's ink centroid around the detection (``--warmup-anchor ink``). The scale, the target's
  own count accuracy and its peak heights are logged (``--probe-gradients`` logs each term's push
  on h_loc);
* n forced to 1 per image with probability 1 for 30%, then linearly → 0.1 over the next 30%.

Reproducibility: the data order and every random number are functions of (seed, step, sample), see
:mod:`lavae_fast.noise`; a checkpoint holds the model, the aux VAE, the optimiser and the step, so
``--resume`` continues to exactly the parameters an uninterrupted run reaches (same device and
thread count: float summation order is the only thing not pinned), even after a SIGKILL at any
moment: checkpoints are written atomically, the previous one is kept, and a truncated or corrupt
one is detected on load and replaced by the previous (:mod:`lavae_fast.checkpoint`).

The measurements behind each choice (the side-by-side estimator runs, the warm-up ablations, the
evidence run) are in ``docs/recipe.md``.

Several processes or machines: ``torchrun --standalone --nproc_per_node=N -m lavae_fast.train ...``
trains with DistributedDataParallel, ``--batch-size`` being the global batch (see
:mod:`lavae_fast.distributed`).

Precision: ``--bf16 auto`` (the default) trains LAVAE's convolutions in bf16 where the device computes
bf16 natively (:func:`lavae_fast.performance.bf16_native`: a CPU with AVX-512 BF16 or AMX, a CUDA GPU
that supports it) and in float32 elsewhere, where bf16 would be emulated and slower; ``--bf16 on`` /
``--bf16 off`` force it. The choice and its reason are printed and recorded (``precision``,
``precision_reason`` in ``args.json`` and the checkpoint's args); ``--resume`` keeps the recorded one.

The options are parsed into a :class:`~lavae_fast.train_config.TrainConfig` (one field per option;
the fields marked ``run_defining`` are the settings a ``--resume`` must keep), which the trainer
runs on and records as ``args.json``.

Outputs in ``--out RUN_DIR``: ``checkpoint.pt`` and ``checkpoint.prev.pt``, ``checkpoint.best.pt``
(the best on the validation split so far, see ``--n-val``), ``metrics.jsonl`` (one line per log
interval), TensorBoard scalars and image grids (``tb/``), ``args.json``.

Safety of the run directory (:func:`prepare_run_directory`, checked before any long work): one
process owns it at a time (``RUN_DIR/.lock``, an ``fcntl.flock`` the kernel releases on any exit;
rank 0 under torchrun); a directory that holds any of a run's files (:func:`run_contents`:
checkpoints, the metrics log, ``args.json``, ``tb/``, evaluation results, ``figures/``) is refused
unless ``--resume`` or ``--overwrite`` says what to do with it; ``--resume`` with nothing to
continue from beside a best checkpoint, results or figures is refused too; ``--overwrite`` removes
all of the old run or nothing; a run file that is a directory is refused up front. The
checkpoint records the data set's fingerprint (:func:`lavae_fast.data.storage.fingerprint`) and
``--resume`` compares it, whatever path names the set. SIGINT / SIGTERM stop the run after the
current step with a checkpoint there, exit code 128 + the signal (130 / 143). A checkpoint that
cannot be written (a full disk) ends the run with exit code 1 and a message; the previous
checkpoint is intact. A non-finite loss (a learning rate far too high) ends it with exit code 1 and
a message naming the last good checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _cli, distributed, performance
# The shared argument types, under the names this module's parser has always used.
from ._cli import accept_negative_numbers as _accept_negative_numbers
from ._cli import canvas as _parse_canvas
from ._cli import nonneg_int as _nonneg_int
from ._cli import odd_positive_int as _odd_positive_int
from ._cli import positive_float as _positive_float
from ._cli import positive_int as _positive_int
from ._io import atomic_write, dumps_strict, fsync_dir, write_json
from .checkpoint import (BEST_NAME, CHECKPOINT_NAME, PREVIOUS_NAME, TRAINING_KEYS, CheckpointError, CheckpointWriteError,
                         RunDirectoryInUse, load_run_checkpoint, lock_run_directory, remove_stale_temporaries,
                         save_checkpoint)
from .data import DATASETS, load_run_split, parse_canvas
from .loading import build_model
from .model import count_threshold
from .metrics import index_rows_cols, location_accuracy, peak_distances
from .noise import data_indices
from .recipe import LR, Recipe
from .train_config import (ADDED_SETTINGS, LEGACY_DEFAULTS, ConfigFileError, TrainConfig, config_argv, read_config_file,
                           run_defining_fields)

__all__ = ["main", "build_parser"]


# The options that define a run (fields marked run_defining in TrainConfig): a resumed run must
# agree on them. The data set directory is compared by content (its fingerprint), not by its path.
RUN_DEFINING = run_defining_fields()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _scale(s):
    if s == "auto":
        return s
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive number, got {s}")
    return v


def _auto_or_length(positive: bool):
    """'auto' or a finite length in pixels (> 0 when ``positive``, else >= 0)."""
    need = "> 0" if positive else ">= 0"

    def parse(s):
        if s == "auto":
            return s
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or a number {need}, got {s!r}") from None
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise argparse.ArgumentTypeError(f"expected 'auto' or a number {need}, got {s!r}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavae_fast.train", description="Train LAVAE or the β-VAE baseline.")
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE_OR_NAME",
                   help="settings from a YAML file (one `option: value` line each, e.g. `batch_size: 16`), a run's "
                        "args.json, or the config that trained a shipped model by name (lavae-multi-dsprites, "
                        "lavae-multi-mnist-10k, lavae-multi-dsprites-64, baseline-multi-dsprites, "
                        "baseline-multi-mnist-10k: lavae_fast/configs/); options typed on the command line "
                        "override it")
    p.add_argument("--model", choices=["lavae", "baseline"], default="lavae")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="multi-dsprites")
    p.add_argument("--data", default=None, help="data set directory (python -m lavae_fast.data generate); "
                                                "default: generate a small one in memory")
    p.add_argument("--canvas", type=_parse_canvas, default=(64, 64), help="N or HxW (in-memory data only)")
    p.add_argument("--n-train", type=_positive_int, default=20000, help="in-memory training images")
    p.add_argument("--n-test", type=_nonneg_int, default=1000, help="in-memory 0–3-object test images (0: none)")
    p.add_argument("--n-test7", type=_nonneg_int, default=1000,
                   help="in-memory 7-object test images (0: none, e.g. on a canvas too small for 7)")
    p.add_argument("--n-val", type=_nonneg_int, default=500,
                   help="validation images (0–3 objects, generated in memory from the data's settings and a "
                        "stream of their own: held out from training and testing); at each --eval-every the "
                        "model is evaluated on them and the best so far (count accuracy, then -ELBO) is kept "
                        "as RUN_DIR/checkpoint.best.pt, the checkpoint to ship; 0: no validation")
    p.add_argument("--data-seed", type=_nonneg_int, default=0)
    p.add_argument("--steps", type=_positive_int, default=100_000, help="budget; 100000 = the paper's schedule")
    p.add_argument("--batch-size", type=_cli.batch_size, default=64,
                   help="global batch; under torchrun each of the N processes takes batch-size/N images")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="run directory (owned by one trainer at a time)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds a run, deleting all of that run's files: "
                        "checkpoints, metrics.jsonl, args.json, tb/, evaluation results and figures/ (all or "
                        "nothing; without it such a directory is refused)")
    p.add_argument("--ops", choices=["fused", "reference"], default="fused")
    p.add_argument("--location-mode", choices=["relaxed", "straight_through"], default="relaxed",
                   help="training estimator of the locations (SPEC §3): the relaxed Gumbel-softmax samples place "
                        "the sprites (default, the paper's) or straight-through (hard in value, relaxed in gradient)")
    p.add_argument("--loc-kl", choices=["relaxed", "straight_through", "hard"], default="relaxed",
                   help="location term log q in training (SPEC §3): log q at the relaxed sample (default), the exact "
                        "log q of the hard draws plus the straight-through gradient, or the exact log q with its own "
                        "gradient only (see lavae_fast.model.LAVAE)")
    p.add_argument("--count-window", type=_odd_positive_int, default=3, metavar="N",
                   help="the counter's neighbourhood (odd): n̂ counts the points of h_loc above 4γ that are maxima of "
                        "their N×N window (default 3, SPEC §2's 3×3; see lavae_fast.ops.count_objects)")
    p.add_argument("--exclusion-window", type=_odd_positive_int, default=None, metavar="N",
                   help="q's exclusion window (odd): each location draw removes its N×N neighbourhood from the later "
                        "draws' candidates, in training, the bound and inference (default 5, measured better than the "
                        "paper's 1 — only the drawn pixel — in docs/recipe.md, or the largest odd window the canvas "
                        "holds where it cannot hold 5; SPEC §2; see lavae_fast.ops.gumbel_topk_relaxed)")
    p.add_argument("--width", type=_cli.channels, default=44, help="channels of LAVAE's residual nets")
    p.add_argument("--sprite-width", type=_cli.channels, default=48)
    p.add_argument("--lr", type=_positive_float, default=LR)
    p.add_argument("--loc-lr", type=_positive_float, default=None, help="location-net lr (default: 1e-4 MNIST, 5e-4 dSprites)")
    p.add_argument("--loc-lr-decay", type=_positive_float, default=100.0,
                   help="total exponential decay of the location-net lr over the horizon (paper: 100)")
    p.add_argument("--warmup-scale", type=_scale, default="auto",
                   help="multiplier of the aux VAE's KL map as h_loc's target: a number (1 = the raw map, "
                        "nats per latent location) or 'auto' (peaks lifted to 2·4γ, see aux_vae.auto_target_scale)")
    p.add_argument("--warmup-peak", type=_positive_float, default=2.0,
                   help="height of the target's object peaks as a multiple of the threshold 4γ (with "
                        "--warmup-target map: of the auto-scaled map's typical peak)")
    p.add_argument("--warmup-blur", type=_auto_or_length(False), default="auto",
                   help="σ in pixels of the Gaussian blur applied to the KL map before it becomes h_loc's target "
                        "(0: none; 'auto': sprite size / 7, see aux_vae.smooth_target)")
    p.add_argument("--warmup-target", choices=["cones", "map"], default="cones",
                   help="h_loc's warm-up target: 'cones' (default) one cone of height --warmup-peak·4γ at each point the "
                        "smoothed, scaled KL map counts (aux_vae.peak_target); 'map' that map itself")
    p.add_argument("--warmup-anchor", choices=["ink", "map"], default="ink",
                   help="with --warmup-target cones: a cone stands at the map's peak, or at the ink centroid of the "
                        "image in the sprite-sized window around it (aux_vae.ink_anchors)")
    p.add_argument("--warmup-radius", type=_auto_or_length(True), default="auto",
                   help="with --warmup-target cones: their radius in pixels ('auto': sprite size / 4)")
    p.add_argument("--warmup-weight", type=_positive_float, default=1.0,
                   help="multiplier of the warm-up loss, on top of its schedule (default 1, the paper's; ×300 was "
                        "needed by straight-through only, see docs/recipe.md)")
    p.add_argument("--log-every", type=_positive_int, default=50)
    p.add_argument("--probe-gradients", action="store_true",
                   help="at each log step, log how hard each loss term pushes on h_loc (hgrad_*; a few extra "
                        "partial backward passes)")
    p.add_argument("--ckpt-every", type=_positive_int, default=500)
    p.add_argument("--eval-every", type=_nonneg_int, default=1000, help="0: never")
    p.add_argument("--eval-size", type=_positive_int, default=256, help="test images per split at --eval-every")
    p.add_argument("--image-every", type=_nonneg_int, default=None, help="image grids (default: --eval-every)")
    p.add_argument("--stop-at", type=_positive_int, default=None, help="stop after this step (as if interrupted)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: the CPUs this process may use)")
    speed = p.add_argument_group("speed (none of these changes what a step computes, bf16 aside)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="channels-last memory format for the convolutions (default: on)")
    speed.add_argument("--fused-norm", action=argparse.BooleanOptionalAction, default=True,
                       help="each Leaky ReLU + batch norm as one fused op (lavae_fast.norm; default: on)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the convolutional nets (20-40 s of compilation at the first step)")
    speed.add_argument("--bf16", nargs="?", choices=["auto", "on", "off"], const="on", default="auto",
                       help="bf16 autocast for LAVAE's convolutions. auto (default): bf16 where the device computes "
                            "it natively (a CPU with avx512_bf16 or amx_bf16, a CUDA GPU that supports it), float32 "
                            "elsewhere; on (or a bare --bf16): always (where bf16 is emulated, e.g. an AVX2-only CPU, "
                            f"~{performance.BF16_EMULATED_SLOWDOWN}x slower); off: float32. The choice is printed and "
                            "recorded in args.json and the checkpoint; --resume keeps the recorded one")
    speed.add_argument("--no-bf16", dest="bf16", action="store_const", const="off", help="same as --bf16 off")
    speed.add_argument("--tune-allocator", action=argparse.BooleanOptionalAction, default=True,
                       help="keep freed activations in the process instead of unmapping them (glibc; see "
                            "lavae_fast.performance)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sync-bn", action="store_true",
                   help="distributed GPU runs: batch norm over the global batch (SyncBatchNorm) in the inference "
                        "nets and the aux VAE; refused on the CPU, where SyncBatchNorm does not run")
    p.add_argument("--dist-backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="torchrun runs: process-group backend (auto: nccl for --device cuda, gloo on the CPU)")
    _accept_negative_numbers(p)
    return p


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------

# The defaults of runs written before a setting existed or changed: train_config.LEGACY_DEFAULTS
# and ADDED_SETTINGS (the config module holds them, so that config files resolve old runs too).
# Options that were removed, with the only value this version still trains with.
REMOVED_OPTIONS = {"warmup_reduction": "sum"}


def _flag(key: str, value) -> str:
    return f"--{key.replace('_', '-')} {value}"


def resume_refusal(old: Dict, new: Dict) -> Optional[str]:
    """Why a run recorded with args ``old`` cannot be resumed with ``new`` (None if it can), both
    dicts of settings (:meth:`TrainConfig.to_dict`, a run's ``args.json``): the run-defining
    settings (:data:`RUN_DEFINING`) that differ, each named with the flag that would continue the run as it
    was started — including settings whose default changed since (the training estimator became
    ``relaxed``, SPEC §3) and options that no longer exist."""
    removed = [k for k, keep in REMOVED_OPTIONS.items() if k in old and old[k] != keep]
    if removed:
        return ("--resume: this run was trained with " + ", ".join(f"{_flag(k, old[k])}" for k in removed) +
                ", an option this version no longer has (see the training docstring); start a new run")
    earlier = {**ADDED_SETTINGS, **LEGACY_DEFAULTS}
    recorded = {k: old.get(k, earlier.get(k)) for k in RUN_DEFINING if k in old or k in earlier}
    diff = [k for k, v in recorded.items() if v != new[k]]
    if not diff:
        return None
    parts = [f"{k}={new[k]!r} (checkpoint: {recorded[k]!r})" for k in diff]
    msg = "--resume with different run settings: " + ", ".join(parts)
    changed = [k for k in diff if k in LEGACY_DEFAULTS and recorded[k] == LEGACY_DEFAULTS[k]]
    if changed:
        msg += (". The run was started with the earlier defaults (the training estimator was straight-through "
                "then, relaxed now: SPEC §3); to continue it as it was started pass " +
                " ".join(_flag(k, recorded[k]) for k in changed))
    return msg


def choose_precision(request: str, native: bool, why: str, model: str = "lavae") -> Tuple[str, str]:
    """``--bf16`` auto|on|off → ("bf16" or "float32", the reason to print), given whether the device
    computes bf16 natively and why (:func:`lavae_fast.performance.bf16_native`)."""
    if model != "lavae":
        return "float32", f"--model {model} has no bf16 path"
    if request == "on":
        return "bf16", "--bf16 on"
    if request == "off":
        return "float32", "--bf16 off"
    if request != "auto":
        raise ValueError(f"--bf16 must be auto, on or off, got {request!r}")
    return ("bf16" if native else "float32"), f"--bf16 auto: {why}"


def recorded_precision(run_args: Dict) -> str:
    """The precision a checkpoint's run trained in. Runs from before ``--bf16 auto`` recorded only
    the flag (a bool; False when absent)."""
    if run_args.get("precision") in ("bf16", "float32"):
        return run_args["precision"]
    return "bf16" if run_args.get("bf16") is True else "float32"


def model_config(config, channels: int) -> Dict:
    """The model's construction config (checkpointed) of a :class:`TrainConfig` (or any object with its
    attributes, such as the parsed namespace)."""
    canvas = list(parse_canvas(config.canvas))
    if config.model == "baseline":
        return {"kind": "baseline", "channels": channels, "canvas": canvas}
    S = DATASETS[config.dataset].sprite_size
    return {"kind": "lavae", "channels": channels, "canvas": canvas, "sprite_size": S, "width": config.width,
            "sprite_width": config.sprite_width, "ops": config.ops, "location_mode": config.location_mode,
            "loc_kl": config.loc_kl, "count_window": config.count_window,
            "exclusion_window": config.exclusion_window}


def _compiled(module, config):
    """``module`` itself, or its ``torch.compile``d wrapper (same parameters) with --compile."""
    return torch.compile(module) if config.compile else module


def accelerate(module, config) -> None:
    """Apply the speed flags in place: LAVAE's own :meth:`~lavae_fast.LAVAE.accelerate`;
    channels-last for the baseline and the aux VAE (compiled, with --compile, by the caller)."""
    from .model import LAVAE, use_fused_norm

    if isinstance(module, LAVAE):
        module.accelerate(channels_last=config.channels_last, fused_norm=config.fused_norm, compile=config.compile,
                          bf16=config.precision == "bf16")
        return
    if config.channels_last:
        module.to(memory_format=torch.channels_last)
    use_fused_norm(module, config.fused_norm)


def image_grid(x: torch.Tensor, lam: torch.Tensor, rows=None, cols=None, n=None, count: int = 8) -> torch.Tensor:
    """[3, 2H+2, count·(W+2)] grid: inputs on top, reconstructions below with the inferred
    locations marked by red crosses."""
    x, lam = x[:count].detach().float().cpu(), lam[:count].detach().float().cpu()
    if x.shape[1] == 1:
        x, lam = x.expand(-1, 3, -1, -1), lam.expand(-1, 3, -1, -1)
    lam = lam.clone()
    B, _, H, W = x.shape
    if rows is not None:
        for b in range(B):
            for i in range(int(n[b])):
                r, c = int(rows[b, i]), int(cols[b, i])
                for dr, dc in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < H and 0 <= cc < W:
                        lam[b, :, rr, cc] = torch.tensor([1.0, 0.0, 0.0])
    grid = torch.full((3, 2 * H + 2, B * (W + 2)), 0.5)
    for b in range(B):
        grid[:, 1 : H + 1, b * (W + 2) + 1 : b * (W + 2) + 1 + W] = x[b]
        grid[:, H + 2 : 2 * H + 2, b * (W + 2) + 1 : b * (W + 2) + 1 + W] = lam[b]
    return grid.clamp(0, 1)


class _Meter:
    """Running means over a log interval, of numbers and of 0-dim tensors. A tensor is summed where
    it is, in float64 as the numbers are (the same sums), so that a step does not wait for the
    device; :meth:`totals` reads every sum at once. None and NaN values are skipped."""

    def __init__(self):
        self.sums: Dict[str, object] = {}  # float, or a float64 tensor
        self.counts: Dict[str, object] = {}  # int, or an int64 tensor (the non-NaN values summed)

    def add(self, **kv):
        for k, v in kv.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.detach().to(torch.float64)
                ok = ~torch.isnan(v)
                self.sums[k] = self.sums.get(k, 0.0) + torch.where(ok, v, 0.0)
                self.counts[k] = self.counts.get(k, 0) + ok.long()
                continue
            if isinstance(v, float) and math.isnan(v):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def totals(self) -> Tuple[Dict[str, float], Dict[str, int]]:
        """(sums, counts) as numbers, the tensors read in one host sync; a key whose values were all
        NaN is left out."""
        tensors = [k for k in self.sums if isinstance(self.sums[k], torch.Tensor)]
        sums, counts = dict(self.sums), dict(self.counts)
        if tensors:
            device = self.sums[tensors[0]].device
            read = torch.stack([self.sums[k].to(device) for k in tensors] +
                               [torch.as_tensor(self.counts[k], dtype=torch.float64).to(device)
                                for k in tensors]).tolist()
            sums.update(zip(tensors, read[:len(tensors)]))
            counts.update((k, int(c)) for k, c in zip(tensors, read[len(tensors):]))
        keep = [k for k in sums if counts[k]]
        return {k: sums[k] for k in keep}, {k: counts[k] for k in keep}

    def means(self) -> Dict[str, float]:
        sums, counts = self.totals()
        return {k: sums[k] / counts[k] for k in sums}


def truncate_metrics(path: str, step: int) -> None:
    """Drop the lines of a metrics.jsonl log after ``step`` (and a torn last line), atomically:
    a resumed run redoes those steps and logs them again."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                keep.append(raw if raw.endswith(b"\n") else raw + b"\n")
    with atomic_write(path, "wb", tmp=path + ".tmp") as f:
        f.writelines(keep)


# ---------------------------------------------------------------------------------------------
# The run directory, interrupts
# ---------------------------------------------------------------------------------------------

# Exit codes of main(): 0 done (or --stop-at reached), 1 an error after start-up (a full disk),
# 2 a usage error (argparse's), 128 + the signal's number after SIGINT (130) or SIGTERM (143),
# once the checkpoint of the step reached is written.
EXIT_ERROR = 1
# A run folder is any folder that holds one of these: the files training writes, and what
# evaluation and the figures write beside them by default (the results of the run's own model).
RUN_FILES = (CHECKPOINT_NAME, PREVIOUS_NAME, BEST_NAME, "metrics.jsonl", "args.json")
RUN_FOLDERS = ("tb", "figures")
DISCARDED_PREFIX = ".discarded-"  # what --overwrite sets aside before deleting it (discard_run)


def is_results_file(name: str) -> bool:
    """Whether ``name`` is an evaluation result that ``python -m lavae_fast.evaluate`` writes in a
    run folder by default (``eval.json``, ``eval.DATA.json``, ``checkpoint.best.eval.json``...)."""
    return name.endswith(".json") and (name.startswith("eval.") or ".eval." in name)


def run_contents(out: str) -> List[str]:
    """The names of the run's files and folders present in ``out`` (sorted; empty when ``out``
    holds no run): checkpoints, the metrics log, ``args.json``, ``tb/``, evaluation results,
    ``figures/``. What ``--overwrite`` removes, and what makes ``out`` a run folder."""
    try:
        names = os.listdir(out)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if n in RUN_FILES or n in RUN_FOLDERS or is_results_file(n))


def validation_score(result: Dict) -> tuple:
    """What the best checkpoint maximises, from :func:`lavae_fast.evaluate.evaluate_split` on the
    validation split: count accuracy (LAVAE; the baseline has none), then the −ELBO, lower better."""
    return (float(result.get("count_accuracy", 0.0)), -float(result["neg_elbo"]["mean"]))


def _best_on_record(path: str, start: int):
    """The validation score of the run's ``checkpoint.best.pt``, None if there is none to beat. A
    best checkpoint from beyond the step the run continues from belongs to steps that are about to
    be redone (a run killed between its evaluation and its next checkpoint): it is removed."""
    if not os.path.isfile(path):
        return None
    state = None
    if start:
        try:
            state = load_run_checkpoint(path)[0]
        except (CheckpointError, OSError) as exc:
            print(f"warning: {path} is unreadable ({exc}); the validation starts a new best", file=sys.stderr)
    if state is None or int(state["step"]) > start or "validation" not in state:
        os.remove(path)
        return None
    return validation_score(state["validation"])


class NonFiniteLoss(FloatingPointError):
    """The loss of ``step`` (1-based) is ``value`` (NaN or ±inf); ``last_saved``: the step of the
    run's last checkpoint, None if none was written."""

    def __init__(self, step: int, value: float, last_saved: Optional[int]):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step, self.value, self.last_saved = step, value, last_saved


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked (names the path and what to do)."""


def prepare_run_directory(out: str, resume: bool, overwrite: bool):
    """Check ``out`` before any long work, take its lock and apply the resume/overwrite policy.

    Returns the open lock file (keep it until the run ends; see
    :func:`lavae_fast.checkpoint.lock_run_directory`). Raises :class:`RunDirectoryError` or
    :class:`~lavae_fast.checkpoint.RunDirectoryInUse` naming the problem: an empty ``--out``, a path
    that is a file, a run file that is a directory (the first save would fail), a checkpoint from
    an earlier run without ``--resume`` or ``--overwrite``."""
    if not out or not out.strip():
        raise RunDirectoryError("--out is empty: name the run directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunDirectoryError(f"--out {out} exists and is not a directory")
    if resume and overwrite:
        raise RunDirectoryError("--resume continues the run in --out, --overwrite discards it: pass one of them")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise RunDirectoryError(f"--out {out}: cannot create the run directory ({exc})") from None
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise RunDirectoryError(f"{path} exists and is not a file: training would fail at its first save or "
                                    "log line; remove it or choose another --out")
    tb = os.path.join(out, "tb")
    if os.path.lexists(tb) and not os.path.isdir(tb):
        raise RunDirectoryError(f"{tb} exists and is not a directory (TensorBoard writes there); remove it")
    try:
        lock = lock_run_directory(out)
    except OSError as exc:
        raise RunDirectoryError(f"--out {out}: cannot take the run directory's lock ({exc})") from None
    try:
        present = run_contents(out)
        has_ckpt = [n for n in (CHECKPOINT_NAME, PREVIOUS_NAME) if os.path.isfile(os.path.join(out, n))]
        if present and not resume and not overwrite:
            raise RunDirectoryError(
                f"--out {out} already holds a run ({', '.join(present)}): pass --resume to continue it, "
                "--overwrite to discard all of it and start again, or choose another --out")
        # Files of a run that got past its first checkpoint (a best checkpoint, results, figures),
        # with nothing to continue from: starting afresh would delete or mix with them.
        kept = [n for n in present if n not in ("args.json", "metrics.jsonl", "tb")]
        if resume and not has_ckpt and kept:
            raise RunDirectoryError(
                f"--resume: --out {out} holds {', '.join(kept)} but no {CHECKPOINT_NAME} to continue from; a new run "
                "there would delete or overwrite them: pass --overwrite to discard all of it, or choose another --out")
        # The lock is ours: any temporary left in the directory belongs to a dead writer, and so
        # does a discarded run that a killed --overwrite had set aside but not yet deleted.
        remove_stale_temporaries(out)
        for name in os.listdir(out):
            if name.startswith(DISCARDED_PREFIX):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock


def discard_run(out: str) -> List[str]:
    """``--overwrite``: remove everything of the earlier run (:func:`run_contents`: checkpoints, log,
    TensorBoard events, evaluation results, figures), all or nothing; returns the removed names.
    Called once the new run has its data and model, so that a failed start-up costs the old run
    nothing. Each entry is first renamed into a private folder in ``out`` (renames in one folder
    are atomic); if one cannot be, those moved are put back and the error is raised, so the old run
    stays whole. Only then is the private folder deleted."""
    names = run_contents(out)
    if not names:
        return names
    trash = tempfile.mkdtemp(prefix=DISCARDED_PREFIX, dir=out)
    moved = []
    try:
        for name in names:
            os.rename(os.path.join(out, name), os.path.join(trash, name))
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(os.path.join(trash, name), os.path.join(out, name))
        with contextlib.suppress(OSError):
            os.rmdir(trash)
        raise
    fsync_dir(out)
    shutil.rmtree(trash, ignore_errors=True)
    return names


class StopSignals:
    """SIGINT and SIGTERM (what a cluster sends before preemption) ask the loop to stop after the
    step in progress, save a checkpoint there and exit with 128 + the signal's number. A second
    signal while stopping is noted and ignored (SIGKILL still ends the process; the checkpoint
    write is atomic either way). Installed only in the main thread, where Python delivers
    signals."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self):
        self.signum = 0
        self._old = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum:
            print(f"\n{name} again: already stopping, a checkpoint is being written", file=sys.stderr)
            return
        self.signum = int(signum)
        print(f"\n{name} received: stopping after the current step and saving a checkpoint", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------


def _recorded(out: str, key: str):
    """The value of run setting ``key`` recorded in ``out``/args.json (the value of the versions
    before the setting, :data:`ADDED_SETTINGS`, where the file lacks it), or None without a
    readable args.json."""
    try:
        with open(os.path.join(out, "args.json"), encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    return old.get(key, ADDED_SETTINGS.get(key)) if isinstance(old, dict) else None


def _exclusion_problem(config) -> Optional[str]:
    """Why ``--exclusion-window`` cannot be drawn on ``config.canvas`` (None if it can): SPEC §2's
    H·W > (M − 1)·w², checked before the run directory is touched."""
    import inspect

    from .model import LAVAE
    from .ops import check_exclusion

    M = inspect.signature(LAVAE).parameters["max_objects"].default
    H, W = config.canvas
    if config.exclusion_window is None:  # the default: 5, or what this canvas holds (SPEC §2)
        from .ops import default_exclusion_window

        config.exclusion_window = default_exclusion_window((H, W), M)
    try:
        check_exclusion(config.exclusion_window, (H, W), H * W, M, "--exclusion-window")
    except ValueError as exc:
        return str(exc)
    return None


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``argv``; a ``--config FILE_OR_NAME`` in it supplies settings that the other options
    override (its values become options placed before them, parsed and checked as typed ones)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    if len(known.config) > 1:
        parser.error("--config given more than once: pass one file (options on the command line override it)")
    tokens: List[str] = []
    if known.config:
        try:
            tokens = config_argv(parser, read_config_file(known.config[0]), f"--config {known.config[0]}")
        except ConfigFileError as exc:
            parser.error(str(exc))
    return parser.parse_args(tokens + rest)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    config = TrainConfig.from_args(parse_with_config(parser, argv))
    channels = DATASETS[config.dataset].channels
    if config.loc_lr is None:
        config.loc_lr = DATASETS[config.dataset].loc_lr
    config.canvas = list(parse_canvas(config.canvas))
    if config.model == "lavae":
        import inspect

        from .model import LAVAE

        latent = inspect.signature(LAVAE).parameters["latent_size"].default
        if config.sprite_width <= latent:  # its residual blocks carry the latent_size z_app channels
            parser.error(f"--sprite-width must exceed LAVAE's latent size {latent}, got {config.sprite_width}")
        if config.exclusion_window is None and config.resume:
            # A resumed run keeps its own window unless one is asked for: a run from before the
            # setting drew with 1 (the default since is 5, or what the canvas holds).
            config.exclusion_window = _recorded(config.out, "exclusion_window")
        if config.exclusion_window is not None or not config.data:  # --data may fix another canvas
            problem = _exclusion_problem(config)
            if problem:
                parser.error(problem)
    if config.image_every is None:
        config.image_every = config.eval_every
    if config.device == "cpu" or config.threads:
        performance.set_threads(config.threads)
    if config.tune_allocator:
        performance.tune_allocator()
    try:
        dist = distributed.setup(config.device, config.batch_size, sync_bn=config.sync_bn, backend=config.dist_backend)
    except distributed.DistributedSetupError as exc:
        parser.error(str(exc))
    device = dist.device
    ckpt_path = os.path.join(config.out, CHECKPOINT_NAME)
    # ---- the run directory: checked and locked by rank 0 before any long work; every rank
    # learns the verdict, so that none is left waiting for the others.
    lock, problem = None, None
    if dist.is_main:
        try:
            lock = prepare_run_directory(config.out, config.resume, config.overwrite)
        except (RunDirectoryError, RunDirectoryInUse, OSError) as exc:
            problem = str(exc)
    problem = dist.broadcast(problem)
    if problem:
        parser.error(problem)
    try:
        return _train(parser, config, dist, device, channels, ckpt_path)
    except (CheckpointWriteError, OSError) as exc:
        # A full disk, a vanished directory: the previous checkpoint is intact (atomic writes).
        msg = str(exc)
        if not isinstance(exc, CheckpointWriteError) and getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            msg += (f" (the disk holding --out {config.out} is full; its last checkpoint is intact: free some space "
                    "and continue with --resume)")
        print(f"{parser.prog}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        print(f"{parser.prog}: error: out of memory ({str(exc).splitlines()[0][:200]}): lower --batch-size, --width or "
              f"--sprite-width; the run's checkpoints in {config.out} are intact", file=sys.stderr)
        return EXIT_ERROR
    except NonFiniteLoss as exc:
        where = (f"the last good checkpoint is {ckpt_path} (step {exc.last_saved}): continue from it with --resume "
                 "and a lower --lr / --loc-lr" if exc.last_saved is not None else
                 "no checkpoint was written before it: start again with a lower --lr / --loc-lr")
        print(f"{parser.prog}: error: the loss became {exc.value} at step {exc.step} (the learning rate is likely "
              f"too high for this run); training stopped before that step's update; {where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before the loop's own handler is installed: no step was taken
        print(f"{parser.prog}: interrupted during start-up, before the first step; nothing to save",
              file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if lock is not None:
            lock.close()


def _train(parser, config: TrainConfig, dist, device, channels, ckpt_path) -> int:
    # ---- data
    try:
        train_data = load_run_split(config.to_dict(), "train")
    except (ValueError, OSError) as exc:  # a missing/damaged --data directory, an impossible --canvas
        parser.error(f"training data ({'--data ' + config.data if config.data else '--dataset/--canvas'}): {exc}")
    N = len(train_data.counts)
    if N == 0:
        parser.error(f"training data ({'--data ' + config.data if config.data else '--n-train'}): the train split "
                     "holds no images")
    data_fingerprint = None
    if config.data:
        from .data.storage import fingerprint

        stored = train_data.meta.get("dataset")
        if stored != config.dataset:
            parser.error(f"--data {config.data} holds {stored!r}, not --dataset {config.dataset!r}")
        data_fingerprint = fingerprint(train_data.meta)
    x0, _ = train_data.get_batch([0])
    if x0.shape[1] != channels or list(x0.shape[-2:]) != list(config.canvas):
        if config.data:
            # A data directory fixes the canvas: adopt it rather than failing on the default.
            config.canvas = list(x0.shape[-2:])
        if x0.shape[1] != channels:
            parser.error(f"--dataset {config.dataset} expects {channels} channel(s), data has {x0.shape[1]}")
    H, W = config.canvas
    D = H * W
    if config.model != "lavae":
        config.exclusion_window = 1  # the baseline draws no locations; 1 is what runs before the setting record
    problem = _exclusion_problem(config) if config.model == "lavae" else None
    if problem:  # the canvas of a --data directory, adopted above
        parser.error(problem)
    eval_splits = []
    if config.eval_every and dist.is_main:
        # Build the evaluation splits now, so that a canvas too small for one of them (7 objects
        # on 32×32) is reported before training rather than at the first evaluation.
        for split in (("val",) if config.n_val else ()) + ("test", "test7"):
            try:
                if len(load_run_split(config.to_dict(), split).counts):
                    eval_splits.append(split)
                else:
                    print(f"periodic evaluation skips the {split} split: it holds no images", file=sys.stderr)
            except (ValueError, OSError) as exc:
                print(f"periodic evaluation skips the {split} split: {exc}", file=sys.stderr)

    # ---- model, aux VAE, optimiser
    torch.manual_seed(config.seed)
    cfg = model_config(config, channels)
    try:
        model = build_model(cfg).to(device)
    except (TypeError, ValueError) as exc:  # a setting the model refuses (a window too large for the canvas...)
        parser.error(f"the model's settings: {exc}")
    aux = None
    if config.model == "lavae":
        from .aux_vae import AuxVAE

        aux = AuxVAE(channels).to(device)
    if config.sync_bn:
        model = distributed.convert_sync_batchnorm(model)
        if aux is not None:
            aux = distributed.convert_sync_batchnorm(aux)
    bf16_native, bf16_why = performance.bf16_native(device)
    config.precision, config.precision_reason = choose_precision(config.bf16, bf16_native, bf16_why, config.model)
    accelerate(model, config)
    if aux is not None:
        accelerate(aux, config)
    recipe = Recipe.from_args(model, config, aux=aux)
    opt = recipe.optimizer()
    start = 0
    if config.resume:
        # Rank 0 reads (and verifies) the checkpoint and sends it to the others, so that every
        # process resumes from the same state, whether or not they share a file system.
        found = None
        if dist.is_main:
            try:
                found = load_run_checkpoint(ckpt_path, required=TRAINING_KEYS)
            except FileNotFoundError:
                found = None
            except CheckpointError as exc:
                found = str(exc)
        found = dist.broadcast(found)
        if isinstance(found, str):
            parser.error(f"--resume: {found}")
        if found is None:
            if dist.is_main:
                print(f"--resume: no checkpoint in {config.out}, starting from scratch", file=sys.stderr)
        else:
            ckpt, used = found
            old = ckpt["args"]
            refusal = resume_refusal(old, config.to_dict())
            if refusal:
                parser.error(refusal)
            if "data_fingerprint" in ckpt:
                if ckpt["data_fingerprint"] != data_fingerprint:
                    was = "in-memory data" if ckpt["data_fingerprint"] is None else f"data set {old.get('data')!r}"
                    now = "in-memory data" if data_fingerprint is None else f"--data {config.data}"
                    parser.error(f"--resume on different data: the run was trained on {was} (fingerprint "
                                 f"{str(ckpt['data_fingerprint'])[:12]}), {now} has fingerprint "
                                 f"{str(data_fingerprint)[:12]} (regenerated or another set); resume on the "
                                 "original data set or start a new run")
            elif bool(old.get("data")) != bool(config.data) or (
                    config.data and os.path.realpath(old["data"]) != os.path.realpath(config.data)):
                # A checkpoint from before fingerprints: the directory itself must be the same.
                parser.error(f"--resume with a different --data: {config.data!r} (checkpoint: {old.get('data')!r})")
            # The run keeps the precision it was trained in, whatever this machine would choose: a
            # resumed run continues the same computation (an explicit --bf16 on/off that differs is
            # refused, as other run settings are).
            if config.model == "lavae":
                recorded = recorded_precision(old)
                if config.bf16 != "auto" and config.precision != recorded:
                    parser.error(f"--resume with --bf16 {config.bf16}, but the run was trained in {recorded} "
                                 f"(checkpoint); leave --bf16 out (or use auto) to continue it in {recorded}")
                if recorded != config.precision:
                    config.precision = recorded
                    accelerate(model, config)
                config.precision_reason = ("recorded in the checkpoint: --resume keeps it, without detecting the "
                                         "machine again")
            model.load_state_dict(ckpt["model"])
            if aux is not None and ckpt.get("aux") is not None:
                aux.load_state_dict(ckpt["aux"])
            opt.load_state_dict(ckpt["optimizer"])
            start = int(ckpt["step"])
            if dist.is_main:
                print(f"resumed from {used} at step {start}", file=sys.stderr)
    if dist.is_main:
        if config.overwrite:
            discard_run(config.out)
        print(f"precision: {config.precision} ({config.precision_reason})", file=sys.stderr)
        if config.precision == "bf16" and not bf16_native:
            print(f"warning: training in bf16 where it is emulated ({bf16_why}); expect steps ~"
                  f"{performance.BF16_EMULATED_SLOWDOWN}x slower than with native bf16, and slower than "
                  f"float32 (--bf16 off)", file=sys.stderr)
        write_json(os.path.join(config.out, "args.json"), config.to_dict())
        # Log lines written after the checkpoint (or, with no checkpoint, by a run killed before
        # its first one) are redone now: they must not stay mixed with this session's.
        truncate_metrics(os.path.join(config.out, "metrics.jsonl"), start)
    net, aux_net = dist.wrap(model), dist.wrap(aux)
    if dist.world_size == 1:  # LAVAE compiles its nets itself; the others are compiled whole
        net = model if config.model == "lavae" else _compiled(model, config)
        aux_net = None if aux is None else _compiled(aux, config)

    last_saved = {"step": start if start else None}  # the step of checkpoint.pt, for the messages

    def save(step, path=ckpt_path, **extra):
        save_checkpoint(path, {
            "step": step, "args": config.to_dict(), "model_config": cfg, "model": model.state_dict(),
            "aux": None if aux is None else aux.state_dict(), "optimizer": opt.state_dict(),
            "data_fingerprint": data_fingerprint, **extra,
        }, keep_previous=path == ckpt_path)
        if path == ckpt_path:
            last_saved["step"] = step

    best_path = os.path.join(config.out, BEST_NAME)
    best_score = _best_on_record(best_path, start) if dist.is_main else None

    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        if dist.is_main:
            writer = SummaryWriter(os.path.join(config.out, "tb"), purge_step=start if start else None)
    except Exception as exc:  # tensorboard missing: keep training, the JSONL log still works
        print(f"TensorBoard disabled ({exc})", file=sys.stderr)
    # Rank 0 alone writes the log; the others write nowhere.
    metrics_file = open(os.path.join(config.out, "metrics.jsonl") if dist.is_main else os.devnull, "a")

    end = config.steps if config.stop_at is None else min(config.steps, config.stop_at)
    pbar = None
    if not config.no_progress and dist.is_main:
        from tqdm import tqdm

        pbar = tqdm(total=end, initial=start, dynamic_ncols=True, mininterval=2.0)
    meter = _Meter()
    threshold = count_threshold(D)
    t_last = time.time()
    model.train()
    step = start
    stop = StopSignals()
    stopped = 0
    with stop:
        for step in range(start, end):
            lrs = recipe.step(opt, step)
            # The global batch of the step, of which this process takes the slice [lo, hi).
            lo, hi = dist.shard(config.batch_size)
            idx = data_indices(config.seed, step, config.batch_size, N)[lo:hi]
            x, counts = train_data.get_batch(idx.numpy())
            x = x.to(device, non_blocking=True)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ids = torch.arange(step * config.batch_size + lo, step * config.batch_size + hi)
            probe = config.probe_gradients and (step + 1) % config.log_every == 0
            loss, out, log = recipe.forward(x, step, ids, counts, forward=net, aux_forward=aux_net, probe=probe,
                                          as_tensors=True)  # the logged values stay on the device
            opt.zero_grad(set_to_none=True)
            loss.backward()
            value = loss.item()
            if not math.isfinite(value):  # before the update: the weights in memory stay the last good ones
                raise NonFiniteLoss(step + 1, value, last_saved["step"])
            opt.step()
            meter.add(**log)
            done = step + 1

            if config.model == "lavae" and (done % config.log_every == 0 or done == end):
                centres = np.asarray(train_data.centres)[idx.numpy()]
                rows, cols = index_rows_cols(model.locate(out.h_loc.detach(), out.n_hat), out.h_loc.shape[-1])
                m, t = location_accuracy(rows, cols, out.n_hat, centres, counts)
                d = peak_distances(out.h_loc, centres, counts, model.count_window)
                meter.add(loc_acc=m / t if t else None, peak_dist_median=float(np.median(d)) if len(d) else None)

            if done % config.log_every == 0 or done == end:
                now = time.time()
                sums, n_summed = meter.totals()  # the interval's one read of the device's values
                means = dist.reduce_meter(sums, n_summed)  # over every process
                means.update({f"lr_{k}": v for k, v in lrs.items()})
                means["sec_per_step"] = (now - t_last) / max(1, n_summed.get("loss", 1))
                if config.model == "lavae":
                    means["threshold"] = threshold
                t_last = now
                meter = _Meter()
                rec = {"step": done, **{k: round(v, 6) for k, v in means.items()}}
                metrics_file.write(dumps_strict(rec) + "\n")
                metrics_file.flush()
                if writer is not None:
                    for k, v in means.items():
                        writer.add_scalar(f"train/{k}", v, done)
                if pbar is not None:
                    # "loss" in the log is the −ELBO alone (nats per image); the bar says so, and that
                    # it is the mean over the last --log-every steps, and shows the weighted warm-up
                    # term beside it (the optimised loss adds it and the aux VAE's own ELBO).
                    post = {f"-elbo(avg {config.log_every} steps)": f"{means.get('loss', float('nan')):.1f}"}
                    if "warmup_term" in means:
                        post["warm"] = f"{means['warmup_term']:.4g}"
                    if "count_acc" in means:
                        post["acc"] = f"{means['count_acc']:.2f}"
                        post["hmax"] = f"{means.get('hloc_max_obj', float('nan')):.1f}/{threshold:.1f}"
                    pbar.set_postfix(post, refresh=False)

            if writer is not None and config.image_every and (done % config.image_every == 0 or done == end):
                with torch.no_grad():
                    if config.model == "lavae":
                        grid = image_grid(x, out.lam, out.rows, out.cols, out.n)
                    else:
                        grid = image_grid(x, out.lam)
                writer.add_image("train/input_over_reconstruction", grid, done)

            if config.eval_every and dist.is_main and (done % config.eval_every == 0 or done == end):
                from .evaluate import evaluate_split

                ev = {}
                for split in eval_splits:
                    r = evaluate_split(model, load_run_split(config.to_dict(), split), K=0,
                                       n_eval=None if split == "val" else config.eval_size,
                                       batch_size=32, device=device, seed=config.seed)
                    ev[split] = r
                    if writer is not None:
                        for k, v in r.items():
                            # {mean, sem} → its mean; other dicts (the −ELBO's terms, by count) → one
                            # scalar per entry.
                            items = ({k: v["mean"]} if isinstance(v, dict) and "mean" in v else
                                     {f"{k}/{j}": u for j, u in v.items()} if isinstance(v, dict) else {k: v})
                            for name, u in items.items():
                                if isinstance(u, (int, float)) and k not in ("images", "bound_images", "K"):
                                    writer.add_scalar(f"eval_{split}/{name}", u, done)
                model.train()
                if "val" in ev and (best_score is None or validation_score(ev["val"]) > best_score):
                    best_score = validation_score(ev["val"])
                    save(done, best_path, validation=ev["val"])
                    ev["val"]["best"] = True
                metrics_file.write(dumps_strict({"step": done, "eval": ev}) + "\n")
                metrics_file.flush()

            if done % config.ckpt_every == 0 or done == end:
                dist.assert_in_sync(model=model, aux=aux)  # collective: every process checks
                if dist.is_main:
                    save(done)
            if pbar is not None:
                pbar.update(1)
            # Every process stops at the same step: the signal may have reached only some of them.
            stopped = dist.agree_on_stop(stop.signum)
            if stopped:
                if not (done % config.ckpt_every == 0 or done == end):
                    dist.assert_in_sync(model=model, aux=aux)
                    if dist.is_main:
                        save(done)
                break

    if start >= end:
        print(f"nothing to do: checkpoint is at step {start}, target {end}", file=sys.stderr)
    if pbar is not None:
        pbar.close()
    if writer is not None:
        writer.close()
    metrics_file.close()
    dist.close()
    if stopped and step + 1 >= end:
        stopped = 0  # the signal came during the last step: the run is complete, not interrupted
    if stopped:
        if dist.is_main:
            print(f"stopped by {signal.Signals(stopped).name} at step {step + 1} of {end}; checkpoint saved in "
                  f"{ckpt_path}; continue with --resume (exit code {128 + stopped})", file=sys.stderr)
        return 128 + stopped
    return 0


if __name__ == "__main__":
    sys.exit(main())
