"""The models' entry-point checks: what a caller passes is checked once, where it enters a model,
with a message that names the argument (inside a model the tensors are its own).

Shared by :class:`~lavae_fast.models.lavae.LAVAE` and :class:`~lavae_fast.models.baseline.BetaVAE`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..engine._common import check_int

__all__ = ["check_images", "check_size", "check_canvas", "as_dtype"]


def check_images(x, channels: int, canvas: Optional[Tuple[int, int]], name: str = "x", *,
                 values: bool = True) -> None:
    """Raise a ValueError/TypeError naming the problem unless ``x`` is a valid image batch.

    x must be a floating tensor [B,C,H,W] with data (not on the meta device) with B ≥ 1,
    C = ``channels``, (H,W) = ``canvas`` (when given), no NaN and values in [0,1] (the Bernoulli
    likelihood is defined only there). ``values=False`` skips the two checks that read the values
    (a device sync): for a caller whose model checks them anyway.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0,1], got dtype {x.dtype}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values): pass images that hold data")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [B,C,H,W], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); need at least one image")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if canvas is not None and tuple(x.shape[-2:]) != tuple(canvas):
        raise ValueError(f"{name} must have canvas H×W = {tuple(canvas)}, got {tuple(x.shape[-2:])}")
    if not values:
        return
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{name} must have values in [0,1] (Bernoulli likelihood), got values in [{lo:g}, {hi:g}]")


def check_size(name: str, value, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """``value`` as an int, or a ValueError/TypeError naming ``name`` and the allowed range
    (:func:`lavae_fast.engine._common.check_int`)."""
    return check_int(value, name, minimum=minimum, maximum=maximum)


def check_canvas(canvas):
    """``canvas`` as an (H, W) tuple of positive ints, or None; a TypeError/ValueError otherwise."""
    if canvas is None:
        return None
    try:
        canvas = tuple(canvas)
    except TypeError:
        raise TypeError(f"canvas must be (H, W) or None, got {canvas!r}") from None
    if len(canvas) != 2:
        raise ValueError(f"canvas must be (H, W) with positive sides, got {canvas}")
    return (check_size("canvas H", canvas[0]), check_size("canvas W", canvas[1]))


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Images of another floating dtype (float16, bfloat16, float64) are cast to the model's:
    values in [0,1] survive the cast (exactly from the half types; float64 rounds to float32)."""
    return x if x.dtype == dtype else x.to(dtype)
