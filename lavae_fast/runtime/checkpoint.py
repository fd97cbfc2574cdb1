"""Checkpoints that survive a kill at any moment.

A checkpoint is a dict saved with ``torch.save``:
``{"format": 1, "step", "args" (the training CLI's settings as a dict,
:meth:`lavae_fast.train_config.TrainConfig.to_dict`), "model_config" (the
constructor keywords plus "kind": "lavae" | "baseline"), "model", "aux" (or None), "optimizer",
"sha256"}``. ``sha256`` is a digest of everything else (:func:`state_digest`: every tensor's dtype,
shape and bytes, every other value's repr, in the dict's order); a file without one (stripped or
edited) is refused, since nothing could tell it from a damaged one.

Writes are atomic and keep the previous checkpoint: the new file goes to a temporary name in the
same directory and is flushed and fsync'ed; then the current ``checkpoint.pt`` is hard-linked to
``checkpoint.prev.pt`` and the new file is ``os.replace``d over ``checkpoint.pt``. At every moment
``checkpoint.pt`` is a complete file (the old or the new one), and a kill leaves at worst a stale
temporary file ``.tmp-PID-….pt`` (removed by :func:`remove_stale_temporaries` when the next run
starts, unless process PID is still alive). A write that fails (a full disk) raises
:class:`CheckpointWriteError` and leaves both checkpoints as they were.

A run directory belongs to one process at a time: :func:`lock_run_directory` (``fcntl.flock`` on
``DIR/.lock``, released by the kernel on any exit).

Reads are verified (:func:`load_checkpoint`): a file torch cannot read (or could only read by
running the arbitrary code a pickle may carry: loading is ``weights_only``), one that is not a lavae_fast
checkpoint, one that lacks a required key, one without a digest or one whose digest differs is refused with a
:class:`CheckpointError` naming the file and the reason. Given a run directory, the loader falls
back to ``checkpoint.prev.pt`` with a warning when ``checkpoint.pt`` is refused (or absent), so a
checkpoint damaged after it was written costs one checkpoint interval, not the run.

This module knows the file format, not the models: reading a model's checkpoint (by a shipped
model's name too) and making it a model is :mod:`lavae_fast.hub.reader`'s.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import shutil
import tempfile
import warnings
from typing import Any, Dict, Iterable, Tuple

import numpy as np
import torch

from ._io import atomic_write
from ._process import pid_alive

__all__ = ["save_checkpoint", "load_checkpoint", "load_run_checkpoint", "state_digest",
           "previous_path", "remove_stale_temporaries", "CheckpointError", "CheckpointWriteError",
           "RunDirectoryInUse", "lock_run_directory", "CHECKPOINT_NAME", "PREVIOUS_NAME", "BEST_NAME", "LOCK_NAME",
           "TRAINING_KEYS"]

FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
# The checkpoint the trainer chose on the validation split (lavae_fast.train): what a run ships.
BEST_NAME = "checkpoint.best.pt"
LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"
# Temporaries are named .tmp-PID-XXXX.pt so that cleanup can tell a dead writer's file from a live one's.
_TMP_PID_RE = re.compile(r"^\.tmp-(\d+)-.*\.pt$")
# What ``--resume`` needs to continue a run exactly (the model's BN statistics are in "model").
TRAINING_KEYS = ("step", "args", "model_config", "model", "aux", "optimizer")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated, corrupt or incomplete."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only or vanished directory); the
    previous checkpoint is untouched."""


class RunDirectoryInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


# ---------------------------------------------------------------------------------------------
# Digest
# ---------------------------------------------------------------------------------------------


def _update(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        # The raw bytes (viewed as uint8 so that any dtype, bfloat16 included, hashes the same way).
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(memoryview(np.ascontiguousarray(raw)))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k, v in obj.items():
            h.update(repr(k).encode() + b"=")
            _update(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}:".encode())
        for v in obj:
            _update(h, v)
    else:
        # Plain data (numbers, strings, None, bools): repr is exact for floats and round-trips.
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def state_digest(state: Dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint dict without its own ``sha256`` entry."""
    h = hashlib.sha256()
    _update(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def previous_path(path: str) -> str:
    """``run/checkpoint.pt`` → ``run/checkpoint.prev.pt`` (where the previous checkpoint is kept)."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def _keep_previous(path: str) -> None:
    """Make ``previous_path(path)`` the current content of ``path`` without ``path`` ever missing."""
    prev = previous_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    link = os.path.join(directory, f"{_TMP_PREFIX}{os.getpid()}-prev.pt")
    try:
        if os.path.lexists(link):
            os.unlink(link)
        os.link(path, link)
        os.replace(link, prev)
    except OSError:
        # No hard links on this file system: a rename leaves a short window without `path`, which
        # the loader covers by falling back to the previous file.
        if os.path.lexists(link):
            os.unlink(link)
        os.replace(path, prev)


def _describe_write_failure(exc: BaseException, directory: str) -> str:
    why = f"{type(exc).__name__}: {exc}"
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    # torch's zip writer reports a full disk only as "unexpected pos …" from inline_container.cc.
    if full or "unexpected pos" in str(exc) or (free is not None and free < (64 << 20)):
        free_txt = "" if free is None else f" ({free / 2**20:.1f} MiB free)"
        why = f"the disk looks full{free_txt}; {why}"
    return why


def save_checkpoint(path: str, state: Dict[str, Any], keep_previous: bool = True) -> None:
    """Atomically write ``state`` (a dict of tensors / plain data) to ``path`` with its digest;
    the file it replaces becomes ``previous_path(path)`` when ``keep_previous``.

    Raises :class:`CheckpointWriteError` when the file cannot be written (e.g. a full disk); the
    checkpoint that was there and its ``.prev`` are then left as they were."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = {"format": FORMAT, **{k: v for k, v in state.items() if k not in ("format", "sha256")}}
    payload["sha256"] = state_digest(payload)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", suffix=".pt", dir=directory)
        os.close(fd)  # atomic_write opens it by name (keeping mkstemp's private mode)
    except OSError as exc:
        raise CheckpointWriteError(f"could not create a checkpoint file in {directory}: "
                                   f"{_describe_write_failure(exc, directory)}") from exc

    def write_error(exc):
        if not isinstance(exc, (OSError, RuntimeError)):
            return None
        return CheckpointWriteError(
            f"could not write checkpoint {path}: {_describe_write_failure(exc, directory)}; the previous "
            f"checkpoint{'s' if keep_previous else ''} in {directory} {'are' if keep_previous else 'is'} kept")

    def before_replace():
        if keep_previous and os.path.isfile(path):
            _keep_previous(path)

    with atomic_write(path, "wb", tmp=tmp, before_replace=before_replace, write_error=write_error) as f:
        torch.save(payload, f)


def remove_stale_temporaries(directory: str) -> list:
    """Delete the temporary files that killed writers of :func:`save_checkpoint` left in
    ``directory`` (names ``.tmp-*.pt``); returns their names. A temporary named after a process
    that is still alive (``.tmp-PID-….pt``) is left alone: it may be a save in progress."""
    removed = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        if not (name.startswith(_TMP_PREFIX) and name.endswith(".pt")):
            continue
        m = _TMP_PID_RE.match(name)
        if m and pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            pass
    return removed


def lock_run_directory(directory: str):
    """Take the run directory's lock (``DIR/.lock``, an ``fcntl.flock``): a file object to keep
    open for as long as the process owns the directory. The kernel releases the lock when the
    process exits in any way, SIGKILL included, so a killed run never leaves a stale lock.

    Raises :class:`RunDirectoryInUse` (naming the holder's PID) when another process holds it.
    Where ``fcntl`` does not exist (Windows) it returns None and nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; a second trainer is not detected
        warnings.warn("fcntl is unavailable: the run directory is not locked against a second trainer",
                      RuntimeWarning, stacklevel=2)
        return None
    path = os.path.join(directory, LOCK_NAME)
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            f.close()
            raise
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunDirectoryInUse(f"run directory {directory} is in use by another process (pid {holder}); "
                                "two trainers in one --out would overwrite each other's checkpoints and "
                                "logs: wait for it to finish, stop it, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_verified(path: str, map_location, required: Iterable[str]) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # Verify on the CPU: the digest reads every byte, and moving to the target device is cheap.
        # weights_only: a checkpoint holds tensors and plain data only, so the restricted unpickler
        # reads every good one, and a file that smuggles other objects (code run at load time) is
        # refused before anything in it executes — run directories and model files come from others.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, a damaged zip/pickle, or a forbidden object
        # The restricted unpickler reports garbage and forbidden objects alike as UnpicklingError,
        # with a page of advice on loading the file anyway; the line naming a global tells them apart.
        why = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln), None)
        if isinstance(exc, pickle.UnpicklingError) and why:
            raise CheckpointError(f"refused checkpoint {path}: it holds objects other than tensors and plain "
                                  f"data (not loaded, nothing in it was executed): {why}") from exc
        detail = "damaged pickle data (or not a torch file)" if isinstance(exc, pickle.UnpicklingError) else exc
        raise CheckpointError(f"could not read checkpoint {path} (truncated or corrupt?): "
                              f"{type(exc).__name__}: {detail}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not a lavae_fast checkpoint (format {FORMAT})")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    # Every checkpoint this package writes carries its digest (save_checkpoint): one without it was
    # stripped or edited, and nothing could tell a damaged one from a good one.
    if not isinstance(state.get("sha256"), str):
        raise CheckpointError(f"checkpoint {path} carries no SHA-256 digest (removed, or not written by "
                              "lavae_fast.checkpoint.save_checkpoint): its contents cannot be verified, so it is refused")
    digest = state_digest(state)
    if digest != state["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the stored "
                              f"SHA-256 ({digest[:12]}… ≠ {str(state['sha256'])[:12]}…)")
    if map_location is not None and str(map_location) != "cpu":
        state = _to_device(state, map_location)
    return state


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


def load_run_checkpoint(path: str, map_location="cpu", required: Iterable[str] = ()
                        ) -> Tuple[Dict[str, Any], str]:
    """(state, the file it came from) of the newest good checkpoint at ``path`` (a run directory
    or its ``checkpoint.pt``): ``path`` itself, else its ``.prev`` with a warning.

    Raises FileNotFoundError when neither file exists, :class:`CheckpointError` (listing both
    reasons) when none is good.
    """
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    prev = previous_path(path)
    errors = []
    for candidate in (path, prev):
        if not os.path.isfile(candidate):
            continue
        try:
            state = _read_verified(candidate, map_location, required)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors or candidate != path:
            why = errors[0] if errors else f"{path} is missing"
            warnings.warn(f"{why}; using the previous checkpoint {candidate} (step {state.get('step')})",
                          RuntimeWarning, stacklevel=2)
        return state, candidate
    if not errors:
        raise FileNotFoundError(f"no checkpoint at {path}")
    raise CheckpointError("no usable checkpoint: " + "; ".join(errors))


def load_checkpoint(path: str, map_location="cpu", required: Iterable[str] = ()) -> Dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    ``path`` is a file (read as is) or a run directory (its ``checkpoint.pt``, falling back to
    ``checkpoint.prev.pt``, see :func:`load_run_checkpoint`). ``required``: keys that must be
    present. Clear errors for missing (FileNotFoundError) and bad (:class:`CheckpointError`) files.
    """
    if os.path.isdir(path):
        return load_run_checkpoint(path, map_location, required)[0]
    return _read_verified(path, map_location, required)
