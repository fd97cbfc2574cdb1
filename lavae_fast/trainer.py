"""Training as a library: :class:`Trainer` runs a :class:`~lavae_fast.train_config.TrainConfig`.

::

    from lavae_fast import Trainer, TrainConfig

    config = TrainConfig(out="runs/dsprites", steps=2000, batch_size=16, canvas=(48, 48))
    with Trainer(config) as trainer:   # checks the config: ConfigError naming a bad setting
        trainer.setup()                # data, model, recipe, optimiser; resumes with resume=True
        result = trainer.fit()         # the loop: checkpoints, metrics.jsonl, TensorBoard, best model
        print(trainer.evaluate("test", K=100, n_eval=500))

The phases are those of ``python -m lavae_fast.train`` (:mod:`lavae_fast.train`, which is this class
behind an argument parser): :meth:`Trainer.setup` takes the run folder (its lock and its policy,
:mod:`lavae_fast.run_folder`), the data, the model and the :class:`~lavae_fast.recipe.Recipe` of the
model's kind, and :meth:`Trainer.resume` the checkpoint when ``config.resume`` is set;
:meth:`Trainer.fit` trains to ``config.steps`` (or ``stop_at``); :meth:`Trainer.save` writes a
checkpoint; :meth:`Trainer.evaluate` evaluates the model in memory. The trainer knows nothing of a
model's kind: everything kind-specific is the recipe's (:data:`lavae_fast.recipe.RECIPES`).

Errors are typed, never a usage message and an exit: :class:`~lavae_fast.train_config.ConfigError`
for a setting, the data or a resume that cannot be (the CLI prints it as a usage error, exit code
2), :class:`~lavae_fast.run_folder.RunDirectoryError` and
:class:`~lavae_fast.checkpoint.RunDirectoryInUse` for the run folder, :class:`NonFiniteLoss` when
the loss stops being finite, :class:`~lavae_fast.checkpoint.CheckpointWriteError` / ``OSError``
when a checkpoint cannot be written (the previous one is intact).

Reproducibility: the data order and every random number are functions of (seed, step, sample), see
:mod:`lavae_fast.noise`; a checkpoint holds the model, the aux VAE, the optimiser and the step, so a
resume continues to exactly the parameters an uninterrupted run reaches (same device and thread
count), even after a SIGKILL at any moment.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from . import distributed, performance
from ._io import dumps_strict, write_json
from .checkpoint import (BEST_NAME, CHECKPOINT_NAME, TRAINING_KEYS, CheckpointError, RunDirectoryInUse,
                         load_run_checkpoint, save_checkpoint)
from .data import DATASETS, load_run_split, parse_canvas
from .loading import build_model
from .engine.ops import use_engine
from .noise import data_indices
from .recipe import recipe_class
from .run_folder import (RunDirectoryError, best_on_record, discard_run, prepare_run_directory, truncate_metrics,
                         validation_score)
from .train_config import ADDED_SETTINGS, LEGACY_DEFAULTS, ConfigError, TrainConfig, run_defining_fields

__all__ = ["Trainer", "FitResult", "NonFiniteLoss", "ConfigError", "RunDirectoryError", "train", "resume_refusal",
           "recorded_precision", "accelerate", "StopSignals"]

# The options that define a run (fields marked run_defining in TrainConfig): a resumed run must
# agree on them. The data set directory is compared by content (its fingerprint), not by its path.
RUN_DEFINING = run_defining_fields()
# Options that were removed, with the only value this version still trains with.
REMOVED_OPTIONS = {"warmup_reduction": "sum"}


class NonFiniteLoss(FloatingPointError):
    """The loss of ``step`` (1-based) is ``value`` (NaN or ±inf); ``last_saved``: the step of the
    run's last checkpoint, None if none was written."""

    def __init__(self, step: int, value: float, last_saved: Optional[int]):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.step, self.value, self.last_saved = step, value, last_saved


@dataclass
class FitResult:
    """How :meth:`Trainer.fit` ended: the step reached, and the signal that stopped it early (0
    when the run reached its end or ``stop_at``)."""

    step: int
    stopped_by: int = 0

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0, or 128 + the signal's number."""
        return 128 + self.stopped_by if self.stopped_by else 0


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


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
    """``--bf16`` auto|on|off → ("bf16" or "float32", the reason to print) for a model of kind
    ``model`` (its recipe's :meth:`~lavae_fast.recipe.Recipe.precision`)."""
    return recipe_class(model).precision(request, native, why)


def recorded_precision(run_args: Dict) -> str:
    """The precision a checkpoint's run trained in. Runs from before ``--bf16 auto`` recorded only
    the flag (a bool; False when absent)."""
    if run_args.get("precision") in ("bf16", "float32"):
        return run_args["precision"]
    return "bf16" if run_args.get("bf16") is True else "float32"


def model_config(config, channels: int) -> Dict:
    """The model's construction config (checkpointed) of a :class:`TrainConfig` (or any object with its
    attributes, such as the parsed namespace): its recipe's :meth:`~lavae_fast.recipe.Recipe.model_config`."""
    return recipe_class(config.model).model_config(config, channels)


def accelerate(module, config) -> None:
    """Apply the speed flags in place: a module's own ``accelerate`` (LAVAE's
    :meth:`~lavae_fast.LAVAE.accelerate`: channels-last, fused norm, compile, bf16), else
    channels-last and the fused norm (compiled, with --compile, by its recipe's forward_module)."""
    from .model import use_fused_norm

    if hasattr(module, "accelerate"):
        module.accelerate(channels_last=config.channels_last, fused_norm=config.fused_norm, compile=config.compile,
                          bf16=config.precision == "bf16")
        return
    if config.channels_last:
        module.to(memory_format=torch.channels_last)
    use_fused_norm(module, config.fused_norm)


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


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """One training run of ``config`` (a :class:`TrainConfig`; see the module's docstring).

    Constructing it checks the config (:class:`ConfigError`) and touches nothing; :meth:`setup`
    does the work before the first step. Use it as a context manager, or call :meth:`close`, to
    release the run folder's lock (and a distributed process group)."""

    def __init__(self, config: TrainConfig):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a lavae_fast.TrainConfig, got {type(config).__name__}")
        config = config.checked()
        self.recipe_class = recipe_class(config.model)
        self.channels = DATASETS[config.dataset].channels
        if config.loc_lr is None:
            config.loc_lr = DATASETS[config.dataset].loc_lr
        config.canvas = list(parse_canvas(config.canvas))
        if config.exclusion_window is not None or not config.data:  # --data may fix another canvas
            self._prepare_config(config)
        if config.image_every is None:
            config.image_every = config.eval_every
        self.config = config
        self.ckpt_path = os.path.join(config.out, CHECKPOINT_NAME)
        self.best_path = os.path.join(config.out, BEST_NAME)
        self.dist = self.lock = self.model = self.aux = self.recipe = self.optimizer = None
        self.train_data = None
        self.data_fingerprint = None
        self.eval_splits: Sequence[str] = ()
        self.model_config: Dict = {}
        self.start = 0
        self.last_saved: Optional[int] = None  # the step of checkpoint.pt, for the messages
        self._bf16_native, self._bf16_why = False, ""
        self._closed = False

    def _prepare_config(self, config) -> None:
        try:
            self.recipe_class.prepare_config(config, lambda key: _recorded(config.out, key))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    # ---- set-up ---------------------------------------------------------------------------------

    def setup(self) -> "Trainer":
        """Everything before the first step: threads, the allocator, the process group, the run
        folder (checked and locked by rank 0 before any long work), the data, the model, its recipe
        and the optimiser, the precision; then :meth:`resume` if ``config.resume``, and the run's
        ``args.json``. Returns the trainer."""
        config = self.config
        if config.device == "cpu" or config.threads:
            performance.set_threads(config.threads)
        if config.tune_allocator:
            performance.tune_allocator()
        try:
            self.dist = dist = distributed.setup(config.device, config.batch_size, sync_bn=config.sync_bn,
                                                 backend=config.dist_backend)
        except distributed.DistributedSetupError as exc:
            raise ConfigError(str(exc)) from None
        # Every rank learns rank 0's verdict on the run folder, so that none is left waiting.
        problem = None
        if dist.is_main:
            try:
                self.lock = prepare_run_directory(config.out, config.resume, config.overwrite)
            except (RunDirectoryError, RunDirectoryInUse, OSError) as exc:
                problem = exc
        problem = dist.broadcast(None if problem is None else (isinstance(problem, RunDirectoryInUse), str(problem)))
        if problem:
            raise (RunDirectoryInUse if problem[0] else RunDirectoryError)(problem[1])
        self._load_data()
        self._build()
        if config.resume:
            self.resume()
        self._start_run()
        return self

    def _load_data(self) -> None:
        config, dist = self.config, self.dist
        try:
            self.train_data = train_data = load_run_split(config.to_dict(), "train")
        except (ValueError, OSError) as exc:  # a missing/damaged --data directory, an impossible --canvas
            raise ConfigError(f"training data ({'--data ' + config.data if config.data else '--dataset/--canvas'}): "
                              f"{exc}") from None
        if len(train_data.counts) == 0:
            raise ConfigError(f"training data ({'--data ' + config.data if config.data else '--n-train'}): the train "
                              "split holds no images")
        if config.data:
            from .data.storage import fingerprint

            stored = train_data.meta.get("dataset")
            if stored != config.dataset:
                raise ConfigError(f"--data {config.data} holds {stored!r}, not --dataset {config.dataset!r}")
            self.data_fingerprint = fingerprint(train_data.meta)
        x0, _ = train_data.get_batch([0])
        if x0.shape[1] != self.channels or list(x0.shape[-2:]) != list(config.canvas):
            if config.data:
                # A data directory fixes the canvas: adopt it rather than failing on the default.
                config.canvas = list(x0.shape[-2:])
            if x0.shape[1] != self.channels:
                raise ConfigError(f"--dataset {config.dataset} expects {self.channels} channel(s), data has "
                                  f"{x0.shape[1]}")
        self._prepare_config(config)  # the canvas of a --data directory, adopted above
        splits = []
        if config.eval_every and dist.is_main:
            # Build the evaluation splits now, so that a canvas too small for one of them (7 objects
            # on 32×32) is reported before training rather than at the first evaluation.
            for split in (("val",) if config.n_val else ()) + ("test", "test7"):
                try:
                    if len(load_run_split(config.to_dict(), split).counts):
                        splits.append(split)
                    else:
                        print(f"periodic evaluation skips the {split} split: it holds no images", file=sys.stderr)
                except (ValueError, OSError) as exc:
                    print(f"periodic evaluation skips the {split} split: {exc}", file=sys.stderr)
        self.eval_splits = splits

    def _build(self) -> None:
        config, recipe_cls = self.config, self.recipe_class
        device = self.dist.device
        torch.manual_seed(config.seed)
        self.model_config = recipe_cls.model_config(config, self.channels)
        try:
            model = build_model(self.model_config).to(device)
        except (TypeError, ValueError) as exc:  # a setting the model refuses (a window too large for the canvas...)
            raise ConfigError(f"the model's settings: {exc}") from None
        aux = recipe_cls.build_aux(self.channels)
        if aux is not None:
            aux = aux.to(device)
        if config.sync_bn:
            model = distributed.convert_sync_batchnorm(model)
            if aux is not None:
                aux = distributed.convert_sync_batchnorm(aux)
        self._bf16_native, self._bf16_why = performance.bf16_native(device)
        config.precision, config.precision_reason = recipe_cls.precision(config.bf16, self._bf16_native,
                                                                         self._bf16_why)
        accelerate(model, config)
        if aux is not None:
            accelerate(aux, config)
        self.model, self.aux = model, aux
        self.recipe = recipe_cls.from_config(model, config, aux=aux)
        self.optimizer = self.recipe.optimizer()

    def resume(self) -> int:
        """Continue from the run folder's checkpoint (rank 0 reads and verifies it, and sends it to
        the others, so that every process resumes from the same state): the model, the aux model,
        the optimiser and the step, after checking that the run's settings, data and precision are
        this config's (:class:`ConfigError` naming what differs). Without a checkpoint the run
        starts from scratch. Returns the step resumed from. Called by :meth:`setup`."""
        config, dist, model = self.config, self.dist, self.model
        found = None
        if dist.is_main:
            try:
                found = load_run_checkpoint(self.ckpt_path, required=TRAINING_KEYS)
            except FileNotFoundError:
                found = None
            except CheckpointError as exc:
                found = str(exc)
        found = dist.broadcast(found)
        if isinstance(found, str):
            raise ConfigError(f"--resume: {found}")
        if found is None:
            if dist.is_main:
                print(f"--resume: no checkpoint in {config.out}, starting from scratch", file=sys.stderr)
            return 0
        ckpt, used = found
        old = ckpt["args"]
        refusal = resume_refusal(old, config.to_dict())
        if refusal:
            raise ConfigError(refusal)
        self._check_resumed_data(ckpt, old)
        # The run keeps the precision it was trained in, whatever this machine would choose: a
        # resumed run continues the same computation (an explicit --bf16 on/off that differs is
        # refused, as other run settings are).
        if self.recipe_class.supports_bf16:
            recorded = recorded_precision(old)
            if config.bf16 != "auto" and config.precision != recorded:
                raise ConfigError(f"--resume with --bf16 {config.bf16}, but the run was trained in {recorded} "
                                  f"(checkpoint); leave --bf16 out (or use auto) to continue it in {recorded}")
            if recorded != config.precision:
                config.precision = recorded
                accelerate(model, config)
            config.precision_reason = ("recorded in the checkpoint: --resume keeps it, without detecting the "
                                       "machine again")
        model.load_state_dict(ckpt["model"])
        if self.aux is not None and ckpt.get("aux") is not None:
            self.aux.load_state_dict(ckpt["aux"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start = int(ckpt["step"])
        self.last_saved = self.start or None
        if dist.is_main:
            print(f"resumed from {used} at step {self.start}", file=sys.stderr)
        return self.start

    def _check_resumed_data(self, ckpt: Dict, old: Dict) -> None:
        config, fp = self.config, self.data_fingerprint
        if "data_fingerprint" in ckpt:
            if ckpt["data_fingerprint"] != fp:
                was = "in-memory data" if ckpt["data_fingerprint"] is None else f"data set {old.get('data')!r}"
                now = "in-memory data" if fp is None else f"--data {config.data}"
                raise ConfigError(f"--resume on different data: the run was trained on {was} (fingerprint "
                                  f"{str(ckpt['data_fingerprint'])[:12]}), {now} has fingerprint {str(fp)[:12]} "
                                  "(regenerated or another set); resume on the original data set or start a new run")
        elif bool(old.get("data")) != bool(config.data) or (
                config.data and os.path.realpath(old["data"]) != os.path.realpath(config.data)):
            # A checkpoint from before fingerprints: the directory itself must be the same.
            raise ConfigError(f"--resume with a different --data: {config.data!r} (checkpoint: {old.get('data')!r})")

    def _start_run(self) -> None:
        config = self.config
        if not self.dist.is_main:
            return
        if config.overwrite:
            discard_run(config.out)
        print(f"precision: {config.precision} ({config.precision_reason})", file=sys.stderr)
        if config.precision == "bf16" and not self._bf16_native:
            print(f"warning: training in bf16 where it is emulated ({self._bf16_why}); expect steps ~"
                  f"{performance.BF16_EMULATED_SLOWDOWN}x slower than with native bf16, and slower than "
                  f"float32 (--bf16 off)", file=sys.stderr)
        write_json(os.path.join(config.out, "args.json"), config.to_dict())
        # Log lines written after the checkpoint (or, with no checkpoint, by a run killed before
        # its first one) are redone now: they must not stay mixed with this session's.
        truncate_metrics(os.path.join(config.out, "metrics.jsonl"), self.start)

    # ---- checkpoints, evaluation ----------------------------------------------------------------

    def save(self, step: int, path: Optional[str] = None, **extra) -> str:
        """Write the run's state at ``step`` (model, aux model, optimiser, settings, the data's
        fingerprint, and ``extra`` entries) to ``path`` (default: the run's checkpoint.pt, keeping
        the previous one), atomically. Returns the path."""
        path = self.ckpt_path if path is None else path
        save_checkpoint(path, {
            "step": step, "args": self.config.to_dict(), "model_config": self.model_config,
            "model": self.model.state_dict(), "aux": None if self.aux is None else self.aux.state_dict(),
            "optimizer": self.optimizer.state_dict(), "data_fingerprint": self.data_fingerprint, **extra,
        }, keep_previous=path == self.ckpt_path)
        if path == self.ckpt_path:
            self.last_saved = step
        return path

    def evaluate(self, split: str = "test", *, K: int = 0, n_eval: Optional[int] = None, batch_size: int = 32,
                 seed: Optional[int] = None) -> Dict:
        """Evaluate the model as it is now on one of the run's splits ("test", "test7", "val"):
        :func:`lavae_fast.evaluate.evaluate_split`'s dict (−ELBO, counts, locations; the K-sample
        bound with ``K`` > 0) on its first ``n_eval`` images (default all). Leaves the model in
        training mode."""
        from .evaluate import evaluate_split

        with use_engine(self.config.ops):
            result = evaluate_split(self.model, load_run_split(self.config.to_dict(), split), K=K, n_eval=n_eval,
                                    batch_size=batch_size, device=self.dist.device,
                                    seed=self.config.seed if seed is None else seed)
        self.model.train()
        return result

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train from the step set up (0, or the checkpoint's) to ``config.steps`` (or
        ``config.stop_at``): log every ``log_every`` steps to metrics.jsonl and TensorBoard,
        evaluate every ``eval_every`` (keeping the best on the validation split as
        checkpoint.best.pt), checkpoint every ``ckpt_every`` and at the end. SIGINT / SIGTERM stop
        it after the current step with a checkpoint there (:attr:`FitResult.stopped_by`). Raises
        :class:`NonFiniteLoss` before the update of a step whose loss is not finite."""
        if self.model is None:
            raise RuntimeError("Trainer.fit: call setup() first")
        loop = _Loop(self)
        try:
            with use_engine(self.config.ops):  # --ops: which implementation of the engine runs the steps
                return loop.run()
        finally:
            loop.close()

    def close(self) -> None:
        """Release the run folder's lock and the process group (idempotent)."""
        if self.dist is not None and not self._closed:
            self._closed = True
            self.dist.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


class _Loop:
    """One :meth:`Trainer.fit`: its writers, its meter and the steps."""

    def __init__(self, trainer: Trainer):
        self.t = trainer
        config, dist = trainer.config, trainer.dist
        self.end = config.steps if config.stop_at is None else min(config.steps, config.stop_at)
        self.best_score = best_on_record(trainer.best_path, trainer.start) if dist.is_main else None
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            if dist.is_main:
                self.writer = SummaryWriter(os.path.join(config.out, "tb"),
                                            purge_step=trainer.start if trainer.start else None)
        except Exception as exc:  # tensorboard missing: keep training, the JSONL log still works
            print(f"TensorBoard disabled ({exc})", file=sys.stderr)
        # Rank 0 alone writes the log; the others write nowhere.
        self.metrics_file = open(os.path.join(config.out, "metrics.jsonl") if dist.is_main else os.devnull, "a")
        self.pbar = None
        if not config.no_progress and dist.is_main:
            from tqdm import tqdm

            self.pbar = tqdm(total=self.end, initial=trainer.start, dynamic_ncols=True, mininterval=2.0)
        self.net, self.aux_net = dist.wrap(trainer.model), dist.wrap(trainer.aux)
        if dist.world_size == 1:
            self.net = trainer.recipe_class.forward_module(trainer.model, config)
            self.aux_net = None if trainer.aux is None else (torch.compile(trainer.aux) if config.compile
                                                              else trainer.aux)
        self.meter = _Meter()
        self.t_last = time.time()

    def run(self) -> FitResult:
        t, config, dist = self.t, self.t.config, self.t.dist
        t.model.train()
        step, stopped = t.start, 0
        stop = StopSignals()
        with stop:
            for step in range(t.start, self.end):
                done = step + 1
                x, out, idx, counts, lrs = self._step(step)
                if done % config.log_every == 0 or done == self.end:
                    self._log(done, out, idx, counts, lrs)
                if self.writer is not None and config.image_every and (done % config.image_every == 0 or
                                                                       done == self.end):
                    with torch.no_grad():
                        grid = t.recipe.image_grid(x, out)
                    self.writer.add_image("train/input_over_reconstruction", grid, done)
                if config.eval_every and dist.is_main and (done % config.eval_every == 0 or done == self.end):
                    self._evaluate(done)
                if done % config.ckpt_every == 0 or done == self.end:
                    dist.assert_in_sync(model=t.model, aux=t.aux)  # collective: every process checks
                    if dist.is_main:
                        t.save(done)
                if self.pbar is not None:
                    self.pbar.update(1)
                # Every process stops at the same step: the signal may have reached only some of them.
                stopped = dist.agree_on_stop(stop.signum)
                if stopped:
                    if not (done % config.ckpt_every == 0 or done == self.end):
                        dist.assert_in_sync(model=t.model, aux=t.aux)
                        if dist.is_main:
                            t.save(done)
                    break
        if t.start >= self.end:
            print(f"nothing to do: checkpoint is at step {t.start}, target {self.end}", file=sys.stderr)
        if stopped and step + 1 >= self.end:
            stopped = 0  # the signal came during the last step: the run is complete, not interrupted
        if stopped and dist.is_main:
            print(f"stopped by {signal.Signals(stopped).name} at step {step + 1} of {self.end}; checkpoint saved in "
                  f"{t.ckpt_path}; continue with --resume (exit code {128 + stopped})", file=sys.stderr)
        return FitResult(step=step + 1 if self.end > t.start else t.start, stopped_by=stopped)

    def _step(self, step: int):
        t, config, dist = self.t, self.t.config, self.t.dist
        lrs = t.recipe.step(t.optimizer, step)
        # The global batch of the step, of which this process takes the slice [lo, hi).
        lo, hi = dist.shard(config.batch_size)
        idx = data_indices(config.seed, step, config.batch_size, len(t.train_data.counts))[lo:hi]
        x, counts = t.train_data.get_batch(idx.numpy())
        x = x.to(dist.device, non_blocking=True)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ids = torch.arange(step * config.batch_size + lo, step * config.batch_size + hi)
        probe = config.probe_gradients and (step + 1) % config.log_every == 0
        loss, out, log = t.recipe.forward(x, step, ids, counts, forward=self.net, aux_forward=self.aux_net,
                                          probe=probe, as_tensors=True)  # the logged values stay on the device
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item()
        if not math.isfinite(value):  # before the update: the weights in memory stay the last good ones
            raise NonFiniteLoss(step + 1, value, t.last_saved)
        t.optimizer.step()
        self.meter.add(**log)
        return x, out, idx, counts, lrs

    def _log(self, done: int, out, idx, counts, lrs) -> None:
        t, config, dist = self.t, self.t.config, self.t.dist
        centres = np.asarray(t.train_data.centres)[idx.numpy()]
        self.meter.add(**t.recipe.log_metrics(out, centres, counts))
        now = time.time()
        sums, n_summed = self.meter.totals()  # the interval's one read of the device's values
        means = dist.reduce_meter(sums, n_summed)  # over every process
        means.update({f"lr_{k}": v for k, v in lrs.items()})
        means["sec_per_step"] = (now - self.t_last) / max(1, n_summed.get("loss", 1))
        H, W = config.canvas
        means.update(t.recipe.log_constants(H * W))
        self.t_last = now
        self.meter = _Meter()
        rec = {"step": done, **{k: round(v, 6) for k, v in means.items()}}
        self.metrics_file.write(dumps_strict(rec) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}", v, done)
        if self.pbar is not None:
            # "loss" in the log is the −ELBO alone (nats per image); the bar says so, and that it is
            # the mean over the last --log-every steps, and shows the weighted warm-up term beside
            # it (the optimised loss adds it and the aux VAE's own ELBO).
            post = {f"-elbo(avg {config.log_every} steps)": f"{means.get('loss', float('nan')):.1f}"}
            if "warmup_term" in means:
                post["warm"] = f"{means['warmup_term']:.4g}"
            if "count_acc" in means:
                post["acc"] = f"{means['count_acc']:.2f}"
                post["hmax"] = f"{means.get('hloc_max_obj', float('nan')):.1f}/{means.get('threshold', float('nan')):.1f}"
            self.pbar.set_postfix(post, refresh=False)

    def _evaluate(self, done: int) -> None:
        t, config = self.t, self.t.config
        ev = {}
        for split in t.eval_splits:
            r = t.evaluate(split, n_eval=None if split == "val" else config.eval_size)
            ev[split] = r
            if self.writer is not None:
                for k, v in r.items():
                    # {mean, sem} → its mean; other dicts (the −ELBO's terms, by count) → one scalar per entry.
                    items = ({k: v["mean"]} if isinstance(v, dict) and "mean" in v else
                             {f"{k}/{j}": u for j, u in v.items()} if isinstance(v, dict) else {k: v})
                    for name, u in items.items():
                        if isinstance(u, (int, float)) and k not in ("images", "bound_images", "K"):
                            self.writer.add_scalar(f"eval_{split}/{name}", u, done)
        t.model.train()
        if "val" in ev and (self.best_score is None or validation_score(ev["val"]) > self.best_score):
            self.best_score = validation_score(ev["val"])
            t.save(done, t.best_path, validation=ev["val"])
            ev["val"]["best"] = True
        self.metrics_file.write(dumps_strict({"step": done, "eval": ev}) + "\n")
        self.metrics_file.flush()

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        if self.writer is not None:
            self.writer.close()
        self.metrics_file.close()


def train(config: TrainConfig) -> FitResult:
    """Set up and fit one run of ``config`` (:class:`Trainer`), releasing the run folder after."""
    with Trainer(config) as trainer:
        return trainer.setup().fit()
