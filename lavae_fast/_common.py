"""Definitions that the engine's implementations and its users share, each in one place.

* :func:`object_mask`: which of the M object slots of an image hold an object (slot i < n);
* :func:`local_maxima_mask` and :func:`counted_peaks`: the local-maximum rule of the counter
  (SPEC §2, §9.3; a window × window neighbourhood, 3×3 by default, :func:`check_window`) —
  ``count_objects`` counts the points of :func:`counted_peaks`, and the metrics
  (:mod:`lavae_fast.metrics`) find h_loc's peaks with :func:`local_maxima_mask`;
* :func:`peak_index`: the flat indices of the counted peaks, highest first — where
  :meth:`lavae_fast.LAVAE.infer` puts the objects it counted;
* :func:`grad_h_app_layout`: the memory layout of the appearance gather's gradient to h_app.

Imported by :mod:`lavae_fast.reference` and :mod:`lavae_fast.ops` (which re-export them); it
imports nothing of the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["object_mask", "local_maxima_mask", "counted_peaks", "check_window", "peak_index", "grad_h_app_layout"]


def object_mask(n: Tensor, max_objects: int) -> Tensor:
    """[B, M] bool: slot i of image b holds an object (i < n[b])."""
    return torch.arange(max_objects, device=n.device)[None, :] < n[:, None]


def check_window(window, name: str = "window") -> int:
    """The counter's neighbourhood size ``window`` as an int, or a ValueError naming it (as
    ``name``): an odd int ≥ 1 (the window × window neighbourhood centred on the point; SPEC §2 uses 3)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"{name} must be an odd int >= 1 (the counter's window × window neighbourhood), "
                         f"got {window!r}")
    return int(window)


def local_maxima_mask(h: Tensor, window: int = 3) -> Tensor:
    """h [B,1,H,W] → bool [B,1,H,W]: true where h ≥ max-pool_{window×window}(h) (−∞ outside the
    canvas, i.e. max_pool2d's own padding; ties are maxima too). ``window``: odd, ≥ 1."""
    window = check_window(window)
    return h >= F.max_pool2d(h, kernel_size=window, stride=1, padding=window // 2)


def counted_peaks(h: Tensor, threshold: float, window: int = 3) -> Tensor:
    """The points ``count_objects`` counts, as a mask: h [B,1,H,W] → bool [B,1,H,W], true at the
    window × window local maxima of :func:`local_maxima_mask` with h > threshold."""
    return local_maxima_mask(h, window) & (h > threshold)


def peak_index(h: Tensor, threshold: float, n: Tensor, max_objects: int, window: int = 3) -> Tensor:
    """The first n[b] of the points of :func:`counted_peaks` in order of height, as flat indices:
    h [B,1,H,W], n [B] → index [B, max_objects] int64, −1 from slot n[b] on.

    With n = the counter's n̂ (``count_objects(h, threshold, max_objects, window)``) these are
    exactly the peaks it counted (the highest ``max_objects`` when it clipped). Ties in height keep
    the lower flat index first, as ``topk`` on CPU does not promise: a stable sort makes it so."""
    B, _, H, W = h.shape
    D = H * W
    score = torch.where(counted_peaks(h, threshold, window), h, torch.full_like(h, float("-inf"))).flatten(1)
    k = min(max_objects, D)
    vals, idx = torch.sort(score, dim=1, descending=True, stable=True)
    idx = torch.where(torch.isfinite(vals[:, :k]), idx[:, :k], -1)  # n larger than the peaks: no location
    if k < max_objects:
        idx = torch.cat([idx, idx.new_full((B, max_objects - k), -1)], 1)
    return torch.where(object_mask(n.to(idx.device), max_objects), idx, idx.new_full((), -1))


def grad_h_app_layout(h_app: Tensor, grad_h: Tensor) -> Tensor:
    """``grad_h`` in the memory layout every implementation gives the gradient to h_app:
    channels-last when h_app is (the model's channels-last path, so the convolution's backward
    reads it without a conversion), contiguous otherwise."""
    if h_app.dim() == 4 and not h_app.is_contiguous() and h_app.is_contiguous(memory_format=torch.channels_last):
        return grad_h.contiguous(memory_format=torch.channels_last)
    return grad_h.contiguous()
