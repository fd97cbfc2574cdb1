"""Definitions that the engine's implementations and its users share, each in one place.

* :func:`object_mask`: which of the M object slots of an image hold an object (slot i < n);
* :func:`local_maxima_mask` and :func:`counted_peaks`: the 3×3 local-maximum rule of the counter
  (SPEC §2, §9.3) — ``count_objects`` counts the points of :func:`counted_peaks`, and the
  metrics (:mod:`lavae_fast.metrics`) find h_loc's peaks with :func:`local_maxima_mask`;
* :func:`grad_h_app_layout`: the memory layout of the appearance gather's gradient to h_app.

Imported by :mod:`lavae_fast.reference` and :mod:`lavae_fast.ops` (which re-export them); it
imports nothing of the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["object_mask", "local_maxima_mask", "counted_peaks", "grad_h_app_layout"]


def object_mask(n: Tensor, max_objects: int) -> Tensor:
    """[B, M] bool: slot i of image b holds an object (i < n[b])."""
    return torch.arange(max_objects, device=n.device)[None, :] < n[:, None]


def local_maxima_mask(h: Tensor) -> Tensor:
    """h [B,1,H,W] → bool [B,1,H,W]: true where h ≥ max-pool₃ₓ₃(h) (−∞ outside the canvas, i.e.
    max_pool2d's own padding; ties are maxima too)."""
    return h >= F.max_pool2d(h, kernel_size=3, stride=1, padding=1)


def counted_peaks(h: Tensor, threshold: float) -> Tensor:
    """The points ``count_objects`` counts, as a mask: h [B,1,H,W] → bool [B,1,H,W], true at the
    3×3 local maxima of :func:`local_maxima_mask` with h > threshold."""
    return local_maxima_mask(h) & (h > threshold)


def grad_h_app_layout(h_app: Tensor, grad_h: Tensor) -> Tensor:
    """``grad_h`` in the memory layout every implementation gives the gradient to h_app:
    channels-last when h_app is (the model's channels-last path, so the convolution's backward
    reads it without a conversion), contiguous otherwise."""
    if h_app.dim() == 4 and not h_app.is_contiguous() and h_app.is_contiguous(memory_format=torch.channels_last):
        return grad_h.contiguous(memory_format=torch.channels_last)
    return grad_h.contiguous()
