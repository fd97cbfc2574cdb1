"""A run folder on disk: what makes a folder a run's, its lock and policy, its metrics log.

``python -m lavae_fast.train --out RUN_DIR`` (and :class:`lavae_fast.trainer.Trainer`) writes
``checkpoint.pt`` / ``checkpoint.prev.pt`` / ``checkpoint.best.pt``, ``metrics.jsonl``,
``args.json`` and ``tb/`` there; evaluation and the figures write their results beside them. One
process owns the folder at a time (:func:`prepare_run_directory`), ``--overwrite`` removes all of
an earlier run or nothing (:func:`discard_run`), and a resumed run drops the log lines of the steps
it redoes (:func:`truncate_metrics`). No model, no training: the readers of a run use these too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List

from ._io import atomic_write, fsync_dir
from .checkpoint import (BEST_NAME, CHECKPOINT_NAME, PREVIOUS_NAME, CheckpointError, load_run_checkpoint,
                         lock_run_directory, remove_stale_temporaries)

__all__ = ["RUN_FILES", "RUN_FOLDERS", "RunDirectoryError", "prepare_run_directory", "discard_run", "run_contents",
           "is_results_file", "truncate_metrics", "validation_score", "best_on_record"]


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
    validation split: count accuracy (LAVAE; the baseline and an unlabelled set have none), then the
    −ELBO, lower better."""
    return (float(result.get("count_accuracy") or 0.0), -float(result["neg_elbo"]["mean"]))


def best_on_record(path: str, start: int):
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
