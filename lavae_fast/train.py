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

The options are generated from :class:`~lavae_fast.train_config.TrainConfig` (one option per field;
the fields marked ``run_defining`` are the settings a ``--resume`` must keep) and parsed into one,
which :class:`lavae_fast.trainer.Trainer` runs and records as ``args.json``: this module is that
trainer behind an argument parser, mapping its errors to exit codes and messages. From Python, use
the trainer itself (``lavae_fast.Trainer``).

Outputs in ``--out RUN_DIR``: ``checkpoint.pt`` and ``checkpoint.prev.pt``, ``checkpoint.best.pt``
(the best on the validation split so far, see ``--n-val``), ``metrics.jsonl`` (one line per log
interval), TensorBoard scalars and image grids (``tb/``), ``args.json``.

Safety of the run directory (:func:`lavae_fast.run_folder.prepare_run_directory`, checked before any long work): one
process owns it at a time (``RUN_DIR/.lock``, an ``fcntl.flock`` the kernel releases on any exit;
rank 0 under torchrun); a directory that holds any of a run's files (:func:`~lavae_fast.run_folder.run_contents`:
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
import errno
import signal
import sys
from typing import List, Optional, Sequence

from .checkpoint import CheckpointWriteError, RunDirectoryInUse
from .loading import build_model  # noqa: F401  (this module's name for it, as before the trainer)
# What this module held before the trainer and the run folder got their own modules: the names
# stay importable from here.
from .run_folder import (RUN_FILES, RUN_FOLDERS, RunDirectoryError, discard_run, is_results_file,  # noqa: F401
                         prepare_run_directory, run_contents, truncate_metrics, validation_score)
from .train_config import (ADDED_SETTINGS, LEGACY_DEFAULTS, ConfigError, ConfigFileError, TrainConfig,  # noqa: F401
                           build_parser, config_argv, read_config_file)
from .trainer import (REMOVED_OPTIONS, RUN_DEFINING, NonFiniteLoss, StopSignals, Trainer, _Meter,  # noqa: F401
                      accelerate, choose_precision, model_config, recorded_precision, resume_refusal)
from .recipe import image_grid  # noqa: F401

__all__ = ["main", "build_parser", "parse_with_config"]

# Exit codes of main(): 0 done (or --stop-at reached), 1 an error after start-up (a full disk),
# 2 a usage error (argparse's), 128 + the signal's number after SIGINT (130) or SIGTERM (143),
# once the checkpoint of the step reached is written.
EXIT_ERROR = 1


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
    trainer = None
    try:
        trainer = Trainer(config)
        trainer.setup()
        return trainer.fit().exit_code
    except (ConfigError, RunDirectoryError, RunDirectoryInUse) as exc:  # usage errors: exit code 2
        parser.error(str(exc))
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
        ckpt_path = trainer.ckpt_path
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
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
