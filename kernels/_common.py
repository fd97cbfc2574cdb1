"""Helpers shared by the Triton kernels: block sizes, scalar passing, input normalisation."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Every correlation/contraction uses tl.dot in IEEE fp32 (or fp64): the ops must agree with the
# reference within float32 tolerance, which TF32 (10-bit mantissa) would not. On an H100 "tf32x3"
# (three TF32 products, ~fp32 accuracy on tensor cores) is the candidate to measure against this.
DOT_PRECISION = "ieee"

# tl.dot needs every dimension >= 16 on NVIDIA targets.
MIN_DOT = 16

FLOAT_DTYPES = (torch.float32, torch.float64)


def next_pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def dot_dim(v: int) -> int:
    """A power-of-two block side >= v, at least the tl.dot minimum."""
    return max(MIN_DOT, next_pow2(v))


def split_scalar(v: float) -> tuple[float, float]:
    """(hi, lo) float32 pair with hi + lo == v to ~1e-15 relative.

    Triton passes Python floats to kernels as float32. For float64 data the kernels rebuild the
    double as hi + lo (see :func:`scalar`), so ε, τ and the threshold are not rounded to float32;
    for float32 data hi + lo rounds back to exactly float32(v), as PyTorch rounds a Python scalar.
    """
    import numpy as np

    hi = float(np.float32(v))
    lo = float(np.float32(v - hi))
    return hi, lo


@triton.jit
def scalar(hi, lo, dtype: tl.constexpr):
    # tl.cast: a float32 kernel argument when compiled, a Python float under the interpreter.
    return tl.cast(hi, tl.float32).to(dtype) + tl.cast(lo, tl.float32).to(dtype)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64 for the Triton kernels, got {t.dtype}")


def check_int64(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype int64, got {t.dtype}")


def warps_for(numel: int) -> int:
    """num_warps for a program whose largest tile has ``numel`` elements (~16 per thread)."""
    return int(min(16, max(4, numel // 512)))


def device_guarded(launcher):
    """Run a launcher with its tensors' CUDA device current.

    Triton launches on the current device; the dispatcher sets no device guard for kernels
    registered from Python, so without this, tensors on cuda:1 would be launched on cuda:0.
    """
    import contextlib
    import functools

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)

    return wrapper
