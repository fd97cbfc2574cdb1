"""Trained models shipped with the package, and loading any model by name, run directory or file.

    LAVAE.from_pretrained("multi-dsprites")            # a shipped model, by name
    LAVAE.from_pretrained("multi-dsprites-64")         # the one trained at the paper's 64×64
    LAVAE.from_pretrained("runs/dsprites")             # a run directory written by lavae_fast.train
    LAVAE.from_pretrained("runs/dsprites/checkpoint.pt", canvas=(96, 96))
    BetaVAE.from_pretrained("multi-dsprites")          # the β-VAE baseline trained on the same data

This module is the registry of shipped models (:data:`REGISTRY`, :func:`resolve`); reading a model
goes through :func:`lavae_fast.hub.reader.read_model_checkpoint` (one verified reader for every
reader of a run, :func:`lavae_fast.hub.loading.load_model` and ``from_pretrained`` alike): the file is
read with ``torch.load(weights_only=True)`` — tensors and plain data only, so a file carrying other
pickled objects is refused before any of its code runs — and its SHA-256 digest is verified.

A shipped model is package data in this folder: one file per (model kind, name), listed in
:data:`REGISTRY`, written by :func:`lavae_fast.pretrained.shipping.export` (on the command line
``python -m lavae_fast.pretrained export RUN_DIR --name multi-dsprites``). It is a checkpoint
in the same format as a run's, without the optimiser and the warm-up VAE, plus ``provenance`` (the
training command, commits, data settings, measured metrics).
A name whose file is not in this version of the package is refused with :class:`NotShipped`.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple, Union

from .._version import __version__

__all__ = ["REGISTRY", "KINDS", "NotShipped", "resolve", "shipped", "model_file"]

HERE = os.path.dirname(os.path.abspath(__file__))

# (model kind, name) -> file in this folder. Adding a model = exporting it here under its name;
# a new name is one new line.
REGISTRY: Dict[Tuple[str, str], str] = {
    ("lavae", "multi-dsprites"): "lavae-multi-dsprites.pt",
    ("lavae", "multi-mnist-10k"): "lavae-multi-mnist-10k.pt",
    # Trained on the paper's 64×64 canvas with taller warm-up cones and a 5×5 counter (README); no
    # baseline was trained at 64×64.
    ("lavae", "multi-dsprites-64"): "lavae-multi-dsprites-64.pt",
    ("baseline", "multi-dsprites"): "baseline-multi-dsprites.pt",
    ("baseline", "multi-mnist-10k"): "baseline-multi-mnist-10k.pt",
}
KINDS = {"lavae": "LAVAE", "baseline": "BetaVAE (the β-VAE baseline)"}
# What a shipped file keeps of a run's checkpoint: enough to rebuild the model and say where it came
# from. The optimiser's and the warm-up VAE's state are for resuming training, not for using the model.
SHIPPED_KEYS = ("step", "args", "model_config", "model", "data_fingerprint")


class NotShipped(FileNotFoundError):
    """A registered name whose model file is not part of this version of the package."""


def names(kind: str):
    return sorted(n for k, n in REGISTRY if k == kind)


def shipped(kind: Optional[str] = None):
    """The (kind, name) pairs whose files are present in this installation."""
    return sorted(key for key in REGISTRY
                  if (kind is None or key[0] == kind) and os.path.isfile(model_file(*key)))


def _looks_like_path(s: str) -> bool:
    return os.sep in s or (os.altsep is not None and os.altsep in s) or s.endswith(".pt") or s.startswith(".")


def resolve(name_or_path: Union[str, os.PathLike], kind: str) -> str:
    """The file or run directory that ``name_or_path`` names for a model of ``kind``.

    An existing path wins over a name (a run directory called ``multi-dsprites`` in the working
    directory is that run). Raises :class:`NotShipped` for a registered name without its file,
    ValueError for an unknown name, FileNotFoundError for a path that does not exist."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    s = os.fspath(name_or_path)
    if os.path.exists(s):
        return s
    if (kind, s) in REGISTRY:
        path = model_file(kind, s)
        if not os.path.isfile(path):
            raise NotShipped(f"the pretrained {KINDS[kind]} {s!r} is not shipped in lavae_fast {__version__} "
                             f"(expected at {path}); train one (python -m lavae_fast.train) and load its run "
                             "directory instead")
        return path
    if _looks_like_path(s):
        raise FileNotFoundError(f"no run directory or checkpoint file at {s}")
    raise ValueError(f"unknown pretrained model name {s!r} for {KINDS[kind]}: known names are "
                     f"{', '.join(repr(n) for n in names(kind))}; or give a run directory or checkpoint file")


def model_file(kind: str, name: str) -> str:
    """Where the registered model (kind, name) lives in this installation (present or not)."""
    return os.path.join(HERE, REGISTRY[(kind, name)])

