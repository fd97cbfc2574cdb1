"""Reading a model's checkpoint, for every reader of a trained model.

:func:`read_model_checkpoint` finds the file (a run directory, a checkpoint file or a shipped model's
name, :func:`lavae_fast.pretrained.resolve`) and reads it verified
(:func:`lavae_fast.runtime.checkpoint.load_checkpoint`); :func:`restore_model` makes it a model of a
given class. This module imports no model class: ``LAVAE.from_pretrained`` and
``BetaVAE.from_pretrained`` use it with their own class, :func:`lavae_fast.hub.loading.load_model`
picks the class from the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

from ..engine._common import check_device
from ..runtime.checkpoint import CheckpointError, load_checkpoint, load_run_checkpoint

__all__ = ["read_model_checkpoint", "restore_model", "model_kwargs", "LEGACY_LAVAE_CONFIG"]


def read_model_checkpoint(name_or_path, kind: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
    """(verified state, its file) of a model: a run directory, a checkpoint file or a shipped model's
    name (:func:`lavae_fast.pretrained.resolve`). ``kind``: "lavae" or "baseline" (a checkpoint of
    the other is refused), or None for whichever a path holds (a name then means a LAVAE).

    Raises FileNotFoundError (:class:`lavae_fast.pretrained.NotShipped` for a name not shipped),
    ValueError for an unknown name, :class:`CheckpointError` for a damaged file or one of the other kind.
    """
    from ..pretrained import KINDS, resolve

    path = resolve(name_or_path, kind or "lavae")
    # FileNotFoundError / CheckpointError (a ValueError) with the file named; for a run directory,
    # the file actually read (checkpoint.pt, or its .prev after a warning).
    if os.path.isdir(path):
        state, path = load_run_checkpoint(path)
    else:
        state = load_checkpoint(path)
    cfg = state.get("model_config")
    # Any kind a recipe registers is a model's (lavae_fast.loading.MODEL_CLASSES builds it, and says
    # so for a kind it does not know); the shipped kinds only give the messages their names.
    if not isinstance(cfg, dict) or not isinstance(cfg.get("kind"), str) or not cfg["kind"]:
        raise CheckpointError(f"{path} does not say which model it holds (no model_config with a kind)")
    if kind is not None and cfg["kind"] != kind:
        other = {"lavae": "LAVAE.from_pretrained", "baseline": "BetaVAE.from_pretrained"}.get(
            cfg["kind"], "lavae_fast.loading.load_model")
        raise CheckpointError(f"{path} holds a {KINDS.get(cfg['kind'], cfg['kind'])} checkpoint, not a "
                              f"{KINDS.get(kind, kind)} one: load it with {other}")
    return state, path


def _check_canvas(canvas) -> Tuple[int, int]:
    if isinstance(canvas, int) and not isinstance(canvas, bool):
        canvas = (canvas, canvas)
    try:
        h, w = canvas
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"canvas must be a positive int or (H, W) of positive ints, got {canvas!r}")
    return int(h), int(w)


# LAVAE options a checkpoint may lack because it was written before they existed, with the value
# those versions used (the training estimator changed from straight-through to relaxed: SPEC §3;
# the counter was always 3×3 before count_window; q excluded only the drawn pixel before
# exclusion_window).
LEGACY_LAVAE_CONFIG = {"location_mode": "straight_through", "loc_kl": "straight_through", "count_window": 3,
                       "exclusion_window": 1}


def model_kwargs(config: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """(kind, constructor keyword arguments) of a checkpoint's ``model_config``; a LAVAE config from
    before an option existed gets that option's value of its time (:data:`LEGACY_LAVAE_CONFIG`),
    not today's default."""
    cfg = dict(config)
    kind = cfg.pop("kind")
    # The engine is chosen where a model runs (lavae_fast.ops.use_engine), not stored with it: the
    # checkpoints written before recorded the one they trained with.
    cfg.pop("ops", None)
    if kind == "lavae":
        for k, v in LEGACY_LAVAE_CONFIG.items():
            cfg.setdefault(k, v)
    return kind, cfg


def restore_model(cls, state: Dict[str, Any], path: str, *, canvas=None, device="cpu"):
    """The model of a checkpoint read by :func:`read_model_checkpoint`, as an instance of ``cls``
    (``LAVAE`` or ``BetaVAE``, the class its ``model_config`` names) in eval mode on ``device``.
    ``canvas``: (H, W) or N to run it on another canvas (both models are fully convolutional:
    LAVAE's γ follows D = H·W, the baseline's latent grid ⌈H/8⌉×⌈W/8⌉). Raises
    :class:`CheckpointError` when the configuration or the weights do not fit ``cls``."""
    from ..pretrained import KINDS

    device = check_device(device)
    kind, cfg = model_kwargs(state["model_config"])
    if canvas is not None:
        cfg["canvas"] = _check_canvas(canvas)
    try:
        model = cls(**cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its model_config does not build a {KINDS.get(kind, kind)}: {exc}") from exc
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit the {KINDS.get(kind, kind)} its model_config describes "
                              f"(a checkpoint of another version?): {exc}") from exc
    return model.to(device).eval()
