"""Definitions that the engine's implementations and its users share, each in one place.

* :func:`object_mask`: which of the M object slots of an image hold an object (slot i < n);
* :func:`local_maxima_mask` and :func:`counted_peaks`: the local-maximum rule of the counter
  (SPEC §2, §9.3; a window × window neighbourhood, 3×3 by default, :func:`check_window`) —
  ``count_objects`` counts the points of :func:`counted_peaks`, and the metrics
  (:mod:`lavae_fast.metrics`) find h_loc's peaks with :func:`local_maxima_mask`;
* :func:`peak_index`: the flat indices of the counted peaks, highest first — where
  :meth:`lavae_fast.LAVAE.infer` puts the objects it counted;
* :func:`grad_h_app_layout`: the memory layout of the appearance gather's gradient to h_app;
* the public API's argument checks, each a TypeError/ValueError that names the argument:
  :func:`check_int` (a Python int or a 0-d integer tensor, never a bool or a float),
  :func:`check_real`, :func:`check_tau` (τ ≥ :data:`MIN_TAU`, shared by the model and the op) and
  :func:`check_device`.

Imported by :mod:`lavae_fast.reference` and :mod:`lavae_fast.ops` (which re-export them); it
imports nothing of the package.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["object_mask", "local_maxima_mask", "counted_peaks", "check_window", "peak_index", "grad_h_app_layout",
           "check_int", "check_real", "check_tau", "check_device", "MIN_TAU", "MAX_WINDOW", "INT64_MAX"]

# Below this τ the relaxed sample softmax((logits+g)/τ) is already one-hot to float32 precision,
# while (logits+g)/τ overflows float32 (inf − inf = NaN in the loss) from τ ≈ 1e-37 on; the
# schedule's smallest τ is 0.02. The model and gumbel_topk_relaxed refuse smaller ones
# (re-exported as lavae_fast.model.MIN_TAU).
MIN_TAU = 1e-6
# The largest int the dispatcher passes to an op (a C++ int64_t).
INT64_MAX = 2**63 - 1
# The largest window (counter, exclusion) accepted: max_pool2d, which the reference runs, takes
# a 32-bit kernel size; a window wider than twice the canvas covers all of it anyway.
MAX_WINDOW = 2**31 - 1


def check_int(value, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as a Python int, or a TypeError/ValueError naming it (as ``name``).

    An int is a Python int (or a NumPy integer) or a 0-d integer tensor; a bool, a float (even an
    integral one: 2.0), a string or a tensor of another dtype or shape is refused, as is a value
    outside [minimum, maximum] (each bound when given)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an int or a 0-d integer tensor, got a tensor of dtype "
                            f"{str(value.dtype).replace('torch.', '')} and shape {tuple(value.shape)}")
        if value.device.type == "meta":
            raise TypeError(f"{name} must be an int, got a tensor on the meta device (it holds no value)")
        value = int(value)
    elif isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    else:
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            rng = f">= {minimum}"
        elif minimum is None:
            rng = f"<= {maximum}"
        else:
            rng = f">= {minimum} and <= {maximum}"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return int(value)


def _as_real(value, name: str) -> float:
    """``value`` as a float (NaN and ±inf included), or a TypeError naming it: a real number
    (not a bool or a string) or a 0-d real tensor."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a 0-d tensor, got a tensor of dtype "
                            f"{str(value.dtype).replace('torch.', '')} and shape {tuple(value.shape)}")
        if value.device.type == "meta":
            raise TypeError(f"{name} must be a number, got a tensor on the meta device (it holds no value)")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_real(value, name: str, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
               finite: bool = True) -> float:
    """``value`` as a finite float in [minimum, maximum] (each bound when given), or a
    TypeError/ValueError naming it (as ``name``). ``finite=False`` lets ±inf through (never NaN)."""
    v = _as_real(value, name)
    if not finite and v != v:
        raise ValueError(f"{name} must be a number, got NaN")
    below, above = minimum is not None and v < minimum, maximum is not None and v > maximum
    if (finite and not math.isfinite(v)) or below or above:
        if minimum is not None and maximum is not None:
            raise ValueError(f"{name} must lie in [{minimum:g}, {maximum:g}], got {value!r}")
        rng = (f" >= {minimum:g}" if minimum is not None else "") + (f" <= {maximum:g}" if maximum is not None else "")
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number{rng}, got {value!r}")
    return v


def check_tau(tau, name: str = "tau") -> float:
    """The Gumbel-softmax temperature as a float: finite and at least :data:`MIN_TAU`; a
    TypeError/ValueError naming it otherwise (the model's forward and gumbel_topk_relaxed)."""
    v = _as_real(tau, name)
    if not (math.isfinite(v) and v >= MIN_TAU):
        raise ValueError(f"{name} must be > 0 and finite, and at least {MIN_TAU:g} (lavae_fast.model.MIN_TAU: "
                         f"smaller ones overflow float32 and change nothing else), got {tau!r}")
    return v


def check_device(device, name: str = "device") -> torch.device:
    """``device`` as a torch.device this process can put tensors on, or a TypeError/ValueError
    naming it: a torch.device, a string ("cpu", "cuda", "cuda:1", …) or a device index; an unknown
    name, a backend this build or machine lacks, an index past its devices and "meta" (no data)
    are refused before any work."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name} must be a torch.device, a string such as 'cpu' or 'cuda:0', or a device index, "
                        f"got {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} must name a device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise ValueError(f"{name}={device!r} holds no data: pick a device such as 'cpu' or 'cuda'")
    if dev.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, dev.type, None)
        is_available = getattr(backend, "is_available", None)
        if not callable(is_available):
            return dev  # a backend torch does not describe (a plug-in): left to it
        available = bool(is_available())
        device_count = getattr(backend, "device_count", None)
        count = device_count() if available and callable(device_count) else 1
    if not available:
        raise ValueError(f"{name}={device!r}, but {dev.type} is not available in this process "
                         f"(torch {torch.__version__}); use device='cpu'")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{name}={device!r}, but this process sees {count} {dev.type} device(s)")
    return dev


def object_mask(n: Tensor, max_objects: int) -> Tensor:
    """[B, M] bool: slot i of image b holds an object (i < n[b])."""
    return torch.arange(max_objects, device=n.device)[None, :] < n[:, None]


def check_window(window, name: str = "window") -> int:
    """The counter's neighbourhood size ``window`` as an int, or a ValueError naming it (as
    ``name``): an odd int in [1, :data:`MAX_WINDOW`] (the window × window neighbourhood centred on
    the point; SPEC §2 uses 3)."""
    if (isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0
            or window > MAX_WINDOW):
        raise ValueError(f"{name} must be an odd int >= 1 and <= {MAX_WINDOW} (the counter's window × window "
                         f"neighbourhood), got {window!r}")
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
