"""One way to read a trained model, for every reader of a run (evaluation, figures; the demo through them).

    model, state = load_model("runs/dsprites")             # a run directory written by lavae_fast.train
    model, state = load_model("runs/dsprites/checkpoint.pt")
    model, state = load_model("multi-dsprites")            # a shipped model (lavae_fast.pretrained)

The checkpoint is read and verified by :func:`lavae_fast.hub.reader.read_model_checkpoint` and the
model of the kind its ``model_config`` names is built (:func:`build_model`) with its weights.
``LAVAE.from_pretrained`` / ``BetaVAE.from_pretrained`` are the same reader for one class.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

from ..models.baseline import BetaVAE
from ..models.lavae import LAVAE
from .reader import model_kwargs, read_model_checkpoint, restore_model

__all__ = ["MODEL_CLASSES", "build_model", "load_model"]

# model_config["kind"] -> class
MODEL_CLASSES = {"lavae": LAVAE, "baseline": BetaVAE}


def _model_class(kind: str):
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown model kind {kind!r} in checkpoint")
    return MODEL_CLASSES[kind]


def build_model(config: Dict[str, Any]):
    """Construct an (untrained) model from a checkpoint's ``model_config``."""
    kind, cfg = model_kwargs(config)
    return _model_class(kind)(**cfg)


def load_model(run_or_name, kind: Optional[str] = None, *, canvas: Union[None, int, Sequence[int]] = None,
               device="cpu") -> Tuple[Any, Dict[str, Any]]:
    """(model in eval mode, its verified checkpoint dict) from a run directory, a checkpoint file or
    a shipped model's name. ``kind``: "lavae" or "baseline" to refuse the other, None for whichever
    the file holds (a name then means a LAVAE). ``canvas``: run the model on another canvas size.
    Errors as :func:`lavae_fast.hub.reader.read_model_checkpoint` and
    :func:`lavae_fast.hub.reader.restore_model`."""
    state, path = read_model_checkpoint(run_or_name, kind)
    return restore_model(_model_class(state["model_config"]["kind"]), state, path, canvas=canvas,
                         device=device), state
