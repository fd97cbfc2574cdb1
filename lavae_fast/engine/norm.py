"""Fused Leaky ReLU → batch norm (training statistics): ``bn(F.leaky_relu(y, slope))`` in two passes.

Every conv of the inference nets is followed by Leaky ReLU then BatchNorm2d in training mode (the
paper's order, see ``ConvAct`` in :mod:`lavae_fast.models.layers`). Done op by op this reads and
writes the activation several times; the fused op reads y twice and writes out once in the forward
pass (pass 1: per-channel Σa, Σa²; pass 2: out), and reads grad_out and y twice and writes grad_y
once in the backward pass. The activation a = leaky_relu(y) and x̂ are recomputed from y, never
stored.

Ops (namespace ``lavae_fast``, defined here with ``torch.library`` like :mod:`lavae_fast.ops`, from the
schemas of ``lavae_fast/op_schemas.inc``):

* ``lrelu_batch_norm(y, weight, bias, slope, eps) -> (out, mean, invstd)``
* ``lrelu_batch_norm_backward(grad_out, y, weight, mean, invstd, slope, need_y, need_weight,
  need_bias) -> (grad_y, grad_weight, grad_bias)`` (an output not asked for is an empty tensor)

y is [N,C,H,W] float32, float64 or bfloat16 (bfloat16: statistics and sums in float32, out in
bfloat16); weight, bias, mean and invstd are [C] in the statistics dtype (float64 for float64 y,
float32 otherwise). out and grad_y have y's memory format (see :func:`output_memory_format`).
mean is the batch mean of a per channel over (N,H,W), invstd = 1/sqrt(biased variance + eps).

The plain-PyTorch reference below is the ``CompositeExplicitAutograd`` fallback (any device, and
the CPU when ``lavae_fast._C`` is not built); ``csrc/kernels/lrelu_batch_norm.cpp`` holds the CPU
kernels. The module-level API :func:`lrelu_batch_norm` takes an ``nn.BatchNorm2d`` and behaves
exactly like ``bn(F.leaky_relu(y, slope))``, running statistics included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _schemas
from . import ops as _ops  # defines the lavae_fast namespace and loads the C++ kernels  # noqa: F401

__all__ = ["lrelu_batch_norm", "output_memory_format", "reference_forward", "reference_backward"]

_Y_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_lib = torch.library.Library("lavae_fast", "FRAGMENT")
_schemas.define(_lib, ("lrelu_batch_norm", "lrelu_batch_norm_backward"))  # from lavae_fast/op_schemas.inc


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of weight, bias, mean, invstd and of every sum, for a y of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_memory_format(y: Tensor) -> torch.memory_format:
    """The layout of out and grad_y: contiguous when y is (NCHW) contiguous, channels-last when y
    is channels-last (and not also contiguous, e.g. C = 1), contiguous otherwise. The C++ kernels
    and the fake implementations follow the same rule, so strides agree across backends."""
    if y.is_contiguous():
        return torch.contiguous_format
    if y.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch reference (the definition of correctness and the fallback of both ops)
# ---------------------------------------------------------------------------------------------


def _check_op_inputs(op: str, y: Tensor, weight: Tensor, **stats: Tensor):
    # Direct calls of torch.ops.lavae_fast.* reach the fallback without the Python API's checks.
    if y.dim() != 4:
        raise ValueError(f"{op}: y must be [N,C,H,W], got shape {tuple(y.shape)}")
    if y.dtype not in _Y_DTYPES:
        raise TypeError(f"{op}: y must be float32, float64 or bfloat16, got {y.dtype}")
    C, sd = y.shape[1], stats_dtype(y.dtype)
    for name, t in dict(weight=weight, **stats).items():
        if t.shape != (C,):
            raise ValueError(f"{op}: {name} must have shape [C] = [{C}], got {tuple(t.shape)}")
        if t.dtype != sd:
            raise TypeError(f"{op}: {name} must be {sd} for a {y.dtype} y, got {t.dtype}")


def reference_forward(y: Tensor, weight: Tensor, bias: Tensor, slope: float, eps: float):
    """(out, mean, invstd) computed op by op in the statistics dtype. Shapes as in the module doc."""
    _check_op_inputs("lrelu_batch_norm", y, weight, bias=bias)
    a = F.leaky_relu(y.to(stats_dtype(y.dtype)), slope)
    var, mean = torch.var_mean(a, dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight
    out = (a - mean[:, None, None]) * scale[:, None, None] + bias[:, None, None]
    out = out.to(y.dtype).contiguous(memory_format=output_memory_format(y))
    return out, mean, invstd


def reference_backward(grad_out: Tensor, y: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, slope: float,
                       need_y: bool, need_weight: bool, need_bias: bool):
    """(grad_y, grad_weight, grad_bias); an output not asked for is an empty tensor.

    grad_bias = Σg, grad_weight = Σg·x̂ over (N,H,W), and
    grad_y = weight·invstd·(g − mean(g) − x̂·mean(g·x̂))·(y > 0 ? 1 : slope).
    """
    _check_op_inputs("lrelu_batch_norm_backward", y, weight, mean=mean, invstd=invstd)
    if grad_out.shape != y.shape:
        raise ValueError(f"lrelu_batch_norm_backward: grad_out must have y's shape {tuple(y.shape)}, "
                         f"got {tuple(grad_out.shape)}")
    sd = stats_dtype(y.dtype)
    yf, g = y.to(sd), grad_out.to(sd)
    xhat = (F.leaky_relu(yf, slope) - mean[:, None, None]) * invstd[:, None, None]
    sum_g = g.sum(dim=(0, 2, 3))
    sum_gx = (g * xhat).sum(dim=(0, 2, 3))
    gy = y.new_empty(0)
    if need_y:
        n = y.numel() // y.shape[1]
        k = (weight * invstd)[:, None, None]
        gy = k * (g - (sum_g / n)[:, None, None] - xhat * (sum_gx / n)[:, None, None])
        gy = torch.where(yf > 0, gy, gy * slope)
        gy = gy.to(y.dtype).contiguous(memory_format=output_memory_format(y))
    # Separate empty tensors: outputs must not alias each other.
    return gy, (sum_gx if need_weight else weight.new_empty(0)), (sum_g if need_bias else weight.new_empty(0))


_lib.impl("lrelu_batch_norm", reference_forward, "CompositeExplicitAutograd")
_lib.impl("lrelu_batch_norm_backward", reference_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("lavae_fast::lrelu_batch_norm")
def _(y, weight, bias, slope, eps):
    C = y.shape[1]
    out = torch.empty_like(y, memory_format=output_memory_format(y))
    return out, weight.new_empty(C), weight.new_empty(C)


@torch.library.register_fake("lavae_fast::lrelu_batch_norm_backward")
def _(grad_out, y, weight, mean, invstd, slope, need_y, need_weight, need_bias):
    C = y.shape[1]
    gy = torch.empty_like(y, memory_format=output_memory_format(y)) if need_y else y.new_empty(0)
    return gy, weight.new_empty(C if need_weight else 0), weight.new_empty(C if need_bias else 0)


def _setup(ctx, inputs, output):
    y, weight, bias, slope, eps = inputs
    _, mean, invstd = output
    ctx.slope = slope
    ctx.save_for_backward(y, weight, mean, invstd)
    ctx.mark_non_differentiable(mean, invstd)


def _backward(ctx, grad_out, grad_mean, grad_invstd):
    y, weight, mean, invstd = ctx.saved_tensors
    need_y, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_out is None or not (need_y or need_w or need_b):
        return None, None, None, None, None
    gy, gw, gb = torch.ops.lavae_fast.lrelu_batch_norm_backward(
        grad_out, y, weight, mean, invstd, ctx.slope, need_y, need_w, need_b
    )
    return (gy if need_y else None), (gw if need_w else None), (gb if need_b else None), None, None


torch.library.register_autograd("lavae_fast::lrelu_batch_norm", _backward, setup_context=_setup)

# The C++ kernels were registered when lavae_fast.ops loaded lavae_fast._C (a kernel may be
# registered before its schema); nothing to load here.


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def lrelu_batch_norm(y: Tensor, bn: nn.BatchNorm2d, slope: float) -> Tensor:
    """``bn(F.leaky_relu(y, slope))``, fused when bn normalises with batch statistics.

    Args:
        y: [N,C,H,W] float32, float64 or bfloat16 (the conv output; any memory format, channels-last
            is the fast case). bfloat16 y needs float32 bn parameters (as under autocast).
        bn: the ``nn.BatchNorm2d(C)`` that follows the Leaky ReLU. In training mode (or whenever
            nn.BatchNorm2d would use batch statistics) the fused op runs and bn's running statistics
            are updated exactly as nn.BatchNorm2d does (momentum, or the cumulative average when
            ``bn.momentum`` is None; running_var gets the unbiased variance; num_batches_tracked + 1).
            Otherwise (eval with running statistics) ``F.batch_norm`` runs on ``leaky_relu(y)``.
        slope: the Leaky ReLU's negative slope (the model uses 0.01).

    Returns:
        [N,C,H,W] in y's dtype and memory format.
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    # (Under torch.compile with dynamic shapes a module's float attribute may arrive symbolic; the
    # eager call already checked it.)
    if not torch.compiler.is_compiling() and (
            isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope)):
        raise ValueError(f"slope must be a finite number, got {slope!r}")
    if y.dim() != 4:
        raise ValueError(f"y must have 4 dimensions [N,C,H,W], got shape {tuple(y.shape)}")
    if y.dtype not in _Y_DTYPES:
        raise TypeError(f"y must have dtype float32, float64 or bfloat16, got {str(y.dtype).replace('torch.', '')}")
    N, C, H, W = y.shape
    if C != bn.num_features:
        raise ValueError(f"y must have bn.num_features = {bn.num_features} channels, got shape {tuple(y.shape)}")
    sd = stats_dtype(y.dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, name)
        if t is None:
            continue
        if t.device != y.device:
            raise ValueError(f"y is on {y.device} but bn.{name} is on {t.device}")
        if t.dtype != sd:
            raise TypeError(f"bn.{name} must be {str(sd).replace('torch.', '')} for a "
                            f"{str(y.dtype).replace('torch.', '')} y, got {str(t.dtype).replace('torch.', '')}")

    # nn.BatchNorm2d's rules: batch statistics in training, and in eval when there are no
    # running statistics; the running statistics are updated only in training with tracking on.
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not bn_training:
        return F.batch_norm(F.leaky_relu(y, slope), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            False, 0.0, bn.eps)
    n = N * H * W
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training (batch statistics), "
                         f"got y of shape {tuple(y.shape)}")

    weight = bn.weight if bn.weight is not None else torch.ones(C, dtype=sd, device=y.device)
    bias = bn.bias if bn.bias is not None else torch.zeros(C, dtype=sd, device=y.device)
    out, mean, invstd = torch.ops.lavae_fast.lrelu_batch_norm(y, weight, bias, float(slope), float(bn.eps))

    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:
                    # A tensor, not float(...): reading the count would be a graph break under
                    # torch.compile (and a device sync on a GPU).
                    factor = 1.0 / bn.num_batches_tracked.to(sd)
            # The biased variance from invstd (no extra pass over y), made unbiased as in PyTorch.
            var = (invstd.pow(-2) - bn.eps).clamp_min(0) * (n / (n - 1))
            bn.running_mean.mul_(1 - factor).add_(mean * factor)
            bn.running_var.mul_(1 - factor).add_(var * factor)
    return out
