"""Atomic checkpoints and rebuilding a model from one.

A checkpoint is a dict saved with ``torch.save``:
``{"format": 1, "step", "args" (the training CLI's namespace as a dict), "model_config" (the
constructor keywords plus "kind": "lavae" | "baseline"), "model", "aux" (or None), "optimizer"}``.

Writes are atomic: the file goes to a temporary name in the same directory, is flushed and
fsync'ed, then ``os.replace``d over the target, so a run killed mid-write leaves the previous
checkpoint intact and never a truncated one that ``--resume`` would choke on.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "build_model", "CHECKPOINT_NAME"]

FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Atomically write ``state`` (a dict of tensors / plain data) to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (the directory entry), where the platform allows it.
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for missing/corrupt files."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or not a torch file
        raise ValueError(f"could not read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise ValueError(f"{path} is not a lavae_fast checkpoint (format {FORMAT})")
    return state


def build_model(config: Dict[str, Any]):
    """Construct an (untrained) model from a checkpoint's ``model_config``."""
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind == "lavae":
        from .model import LAVAE

        return LAVAE(**cfg)
    if kind == "baseline":
        from .baseline import BetaVAE

        return BetaVAE(**cfg)
    raise ValueError(f"unknown model kind {kind!r} in checkpoint")
