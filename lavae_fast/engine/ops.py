"""The engine's public functional API and the one place where ops are dispatched by device.

Every op is a real PyTorch operator in the ``lavae_fast`` namespace (``torch.ops.lavae_fast.*``),
defined here with ``torch.library`` so that it exists whether or not a compiled backend was built:

* the schema comes from ``lavae_fast/op_schemas.inc`` (:mod:`lavae_fast._schemas`), the one source of
  the ops' names and schemas, which the C++ test driver also checks the CPU kernels against;
* the autograd formula (``register_autograd``) and the fake/meta implementation (``register_fake``,
  for ``torch.compile``) are defined in this module;
* ``CompositeExplicitAutograd`` holds the plain-PyTorch fallback from :mod:`lavae_fast.reference`;
* the C++ extension ``lavae_fast._C`` registers CPU kernels (``TORCH_LIBRARY_IMPL(lavae_fast, CPU)``),
  which take precedence over the fallback for CPU tensors;
* the Triton launchers of ``lavae_fast.kernels`` are registered here for CUDA tensors
  (:func:`register_triton_kernels`).

Backward passes are ops of their own (``*_backward``), so fused backends implement them too.
No op draws random numbers: noise is an argument (SPEC §5).

Inputs are checked here, once, at the boundary: shapes (a canvas holds at least one pixel, a sprite
at least one channel), dtypes, devices, the scalar arguments, and the integer inputs' values:
``n`` ∈ [0, M] (and n ≤ D for the draws: one location each) and, for present slots, ``index`` ∈
[−1, D) — those two only for CPU tensors outside ``torch.compile``, where reading them costs no
device sync (on a GPU they are not read here). The ops refuse what the model refuses: τ below
:data:`MIN_TAU` (lavae_fast.model.MIN_TAU, the same constant), and ints the dispatcher cannot pass
(max_objects, windows). Value checks of the float data (range, NaN/Inf) belong to the entry
points (model forward, data loading, CLIs), not to the hot path. Every refusal is a ValueError or
TypeError that names the argument.
"""

from __future__ import annotations

import contextlib
import contextvars

import math
from typing import Optional

import torch
from torch import Tensor

from . import _backends, _schemas
from . import reference as _ref
from ._common import (INT64_MAX, MAX_WINDOW, MIN_TAU, check_int, check_real, check_tau, check_window, counted_peaks,
                      grad_h_app_layout, local_maxima_mask, object_mask, peak_index)

__all__ = ["use_engine", "current_engine", "place_and_loglik", "gumbel_topk_relaxed", "check_exclusion", "check_exclusion_window",
           "default_exclusion_window", "DEFAULT_EXCLUSION_WINDOW", "count_objects", "gather_appearance", "object_mask",
           "counted_peaks", "local_maxima_mask", "peak_index", "engine", "ENGINES", "register_triton_kernels", "MIN_TAU",
           "MAX_OBJECTS"]

_FLOAT_DTYPES = (torch.float32, torch.float64)

# The schemas come from lavae_fast/op_schemas.inc, the one source that the C++ test driver checks
# the CPU kernels against (engine/_schemas.py); norm.py defines the batch-norm ops.
_OP_NAMES = ("place_loglik", "place_loglik_backward", "gumbel_topk_relaxed", "gumbel_topk_relaxed_backward",
             "count_objects", "gather_appearance", "gather_appearance_backward")
_lib = torch.library.Library("lavae_fast", "DEF")
_schemas.define(_lib, _OP_NAMES)

# Reference fallbacks: any device without a fused kernel.
for _name, _fn in [
    ("place_loglik", _ref._fallback_place_loglik),
    ("place_loglik_backward", _ref._fallback_place_loglik_backward),
    ("gumbel_topk_relaxed", _ref._fallback_gumbel_topk_relaxed),
    ("gumbel_topk_relaxed_backward", _ref._fallback_gumbel_topk_relaxed_backward),
    ("count_objects", _ref._fallback_count_objects),
    ("gather_appearance", _ref._fallback_gather_appearance),
    ("gather_appearance_backward", _ref._fallback_gather_appearance_backward),
]:
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, for torch.compile and opcheck.
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake("lavae_fast::place_loglik")
def _(x, sprites, loc, n, index, eps):
    return x.new_empty(x.shape[0]), x.new_empty(x.shape)


@torch.library.register_fake("lavae_fast::place_loglik_backward")
def _(grad_loglik, grad_canvas, x, sprites, loc, n, index, canvas, eps, need_sprites, need_loc):
    gs = sprites.new_empty(sprites.shape) if need_sprites else sprites.new_empty(0)
    gl = loc.new_empty(loc.shape) if need_loc else loc.new_empty(0)
    return gs, gl


@torch.library.register_fake("lavae_fast::gumbel_topk_relaxed")
def _(logits, n, tau, max_objects, gumbel, window=1, canvas=None):
    B, D = logits.shape
    return (
        logits.new_empty(B, max_objects, D),
        logits.new_empty(B),
        logits.new_empty(B, max_objects, dtype=torch.long),
    )


@torch.library.register_fake("lavae_fast::gumbel_topk_relaxed_backward")
def _(grad_relaxed, grad_log_q, logits, index, relaxed, n, tau, window=1, canvas=None, gumbel=None):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("lavae_fast::count_objects")
def _(h_loc, threshold, max_objects, window=3):
    return h_loc.new_empty(h_loc.shape[0], dtype=torch.long)


@torch.library.register_fake("lavae_fast::gather_appearance")
def _(h_app, loc, n, index):
    return h_app.new_empty(h_app.shape[0], loc.shape[1], h_app.shape[1])


@torch.library.register_fake("lavae_fast::gather_appearance_backward")
def _(grad, h_app, loc, n, index, need_h_app, need_loc):
    gh = grad_h_app_layout(h_app, h_app.new_empty(h_app.shape)) if need_h_app else h_app.new_empty(0)
    gl = loc.new_empty(loc.shape) if need_loc else loc.new_empty(0)
    return gh, gl


# ---------------------------------------------------------------------------------------------
# Autograd: each backward is an op of its own, so fused backends implement it too.
# ---------------------------------------------------------------------------------------------


def _place_setup(ctx, inputs, output):
    x, sprites, loc, n, index, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, sprites, loc, n, index, output[1])


def _place_backward(ctx, grad_loglik, grad_canvas):
    x, sprites, loc, n, index, canvas = ctx.saved_tensors
    need_x, need_sprites, need_loc = ctx.needs_input_grad[:3]
    if grad_loglik is None:
        grad_loglik = canvas.new_zeros(canvas.shape[0])
    gs, gl = torch.ops.lavae_fast.place_loglik_backward(
        grad_loglik, grad_canvas, x, sprites, loc, n, index, canvas, ctx.eps, need_sprites, need_loc
    )
    gx = None
    if need_x:
        # d/dx of x log λ + (1−x) log(1−λ) is log λ − log(1−λ); elementwise, so no kernel needed.
        lam = ctx.eps + (1 - 2 * ctx.eps) * canvas.clamp(max=1)
        gx = grad_loglik[:, None, None, None] * (torch.log(lam) - torch.log(1 - lam))
    return gx, (gs if need_sprites else None), (gl if need_loc else None), None, None, None


torch.library.register_autograd("lavae_fast::place_loglik", _place_backward, setup_context=_place_setup)


# gumbel_topk_relaxed's formula. With the C++ extension loaded, CPU tensors take the same formula
# from csrc/autograd.cpp instead (registered to AutogradCPU, which wins over this registration to
# the Autograd key): it spares the Python glue around the op, a large share of the op's time at
# the training shape. The two must stay the same.
def _gumbel_setup(ctx, inputs, output):
    logits, n, tau, max_objects, gumbel, window, canvas = inputs
    relaxed, _, index = output
    ctx.tau = tau
    ctx.window = window
    ctx.canvas = canvas
    # The C++ kernel's backward at window 1 recomputes the relaxed rows from logits + the noise
    # (bit for bit the forward's) instead of reading them back: half the memory traffic of its
    # pass over grad_relaxed. The noise is saved only where that kernel can use it (CPU, window 1);
    # every other implementation reads relaxed and ignores it.
    ctx.save_for_backward(logits, index, relaxed, n,
                          gumbel if window == 1 and logits.device.type == "cpu" else None)
    ctx.mark_non_differentiable(index)


def _gumbel_backward(ctx, grad_relaxed, grad_log_q, grad_index):
    logits, index, relaxed, n, gumbel = ctx.saved_tensors
    if grad_relaxed is None and grad_log_q is None:
        return None, None, None, None, None, None, None
    grad = torch.ops.lavae_fast.gumbel_topk_relaxed_backward(
        grad_relaxed, grad_log_q, logits, index, relaxed, n, ctx.tau, ctx.window, ctx.canvas, gumbel
    )
    return grad, None, None, None, None, None, None


torch.library.register_autograd(
    "lavae_fast::gumbel_topk_relaxed", _gumbel_backward, setup_context=_gumbel_setup
)


def _gather_setup(ctx, inputs, output):
    h_app, loc, n, index = inputs
    ctx.save_for_backward(h_app, loc, n, index)


def _gather_backward(ctx, grad):
    h_app, loc, n, index = ctx.saved_tensors
    need_h, need_loc = ctx.needs_input_grad[:2]
    gh, gl = torch.ops.lavae_fast.gather_appearance_backward(grad, h_app, loc, n, index, need_h, need_loc)
    return (gh if need_h else None), (gl if need_loc else None), None, None


torch.library.register_autograd(
    "lavae_fast::gather_appearance", _gather_backward, setup_context=_gather_setup
)


# ---------------------------------------------------------------------------------------------
# Triton kernels: the launchers of lavae_fast.kernels, with what the op contract adds to them
# ---------------------------------------------------------------------------------------------


def _triton_implementations(kernels) -> dict:
    """op name -> implementation, from the launchers of the Triton kernels' package ``kernels``.

    Two decisions are the ops' rather than the kernels': rows longer than one program's registers
    (``kernels.gumbel.MAX_D``, read at each call) run on the reference, and the gradient to h_app
    takes h_app's memory layout (:func:`grad_h_app_layout`; the kernel writes it contiguous)."""
    impls = dict(kernels.LAUNCHERS)
    launch = kernels.LAUNCHERS
    gumbel_kernels = kernels.gumbel

    def gumbel_topk_relaxed(logits, n, tau, max_objects, gumbel, window=1, canvas=None):
        if logits.dim() == 2 and logits.shape[1] > gumbel_kernels.MAX_D:
            return _ref._fallback_gumbel_topk_relaxed(logits, n, tau, max_objects, gumbel, window, canvas)
        return launch["gumbel_topk_relaxed"](logits, n, tau, max_objects, gumbel, window, canvas)

    def gumbel_topk_relaxed_backward(grad_relaxed, grad_log_q, logits, index, relaxed, n, tau, window=1,
                                     canvas=None, gumbel=None):
        if logits.dim() == 2 and logits.shape[1] > gumbel_kernels.MAX_D:
            return _ref._fallback_gumbel_topk_relaxed_backward(grad_relaxed, grad_log_q, logits, index, relaxed, n,
                                                               tau, window, canvas, gumbel)
        return launch["gumbel_topk_relaxed_backward"](grad_relaxed, grad_log_q, logits, index, relaxed, n, tau,
                                                      window, canvas, gumbel)

    def gather_appearance_backward(grad, h_app, loc, n, index, need_h_app, need_loc):
        gh, gl = launch["gather_appearance_backward"](grad, h_app, loc, n, index, need_h_app, need_loc)
        return (grad_h_app_layout(h_app, gh) if need_h_app else gh), gl

    impls.update(gumbel_topk_relaxed=gumbel_topk_relaxed, gumbel_topk_relaxed_backward=gumbel_topk_relaxed_backward,
                 gather_appearance_backward=gather_appearance_backward)
    return impls


_triton_registered: set = set()


def register_triton_kernels(device_type: str = "cuda", kernels=None) -> None:
    """Make the Triton launchers the implementations of the ops for ``device_type`` (once):
    "cuda", which this module does on import when CUDA and Triton are present, or "cpu" in a
    process run under ``TRITON_INTERPRET=1`` (tests: :mod:`lavae_fast.kernels.testing`), where
    the C++ CPU kernels must not be loaded. ``kernels``: the kernels' package (default
    :func:`lavae_fast._backends.kernels_package`)."""
    if device_type in _triton_registered:
        return
    if device_type == "cpu" and _backends.cpu_kernels_loaded:
        raise RuntimeError(
            "the C++ CPU kernels are loaded in this process; start it with LAVAE_FAST_DISABLE_EXTENSION=1"
        )
    kernels = _backends.kernels_package() if kernels is None else kernels
    for name, fn in _triton_implementations(kernels).items():
        torch.library.register_kernel(f"lavae_fast::{name}", device_type, fn)
    _triton_registered.add(device_type)


# Compiled backends register their kernels on import; the reference stays as the fallback.
_backends.load_cpu_kernels()
_backends.load_triton_kernels(lambda kernels: register_triton_kernels("cuda", kernels))


# ---------------------------------------------------------------------------------------------
# Boundary checks
# ---------------------------------------------------------------------------------------------


def _fail(msg: str):
    raise ValueError(msg)


def _check_tensor(name: str, t, dim: int | None = None, dtypes=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        _fail(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def _check_same_device(**tensors):
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        _fail(f"all inputs must be on the same device, got {listing}")


def _check_counts(n: Tensor, B: int, max_objects: int, D: Optional[int] = None):
    """n: int64 [B] in [0, max_objects], and ≤ D (the locations) when D is given: the draws take
    one location each."""
    _check_tensor("n", n, 1, (torch.int64,))
    if n.shape[0] != B:
        _fail(f"n must have shape [B] = [{B}], got {tuple(n.shape)}")
    # Reading n's values is free on the CPU; on a GPU it would be a device sync, so it is skipped.
    if n.device.type == "cpu" and not torch.compiler.is_compiling() and n.numel():
        lo, hi = int(n.min()), int(n.max())
        if lo < 0 or hi > max_objects:
            _fail(f"n must lie in [0, max_objects={max_objects}], got values in [{lo}, {hi}]")
        if D is not None and hi > D:
            _fail(f"n must be <= D = {D}, the number of locations of logits (each draw takes a location "
                  f"without replacement), got n[{int(n.argmax())}] = {hi}")


def _check_index(index, B: int, M: int, n: Tensor, D: int):
    if index is None:
        return
    _check_tensor("index", index, 2, (torch.int64,))
    if tuple(index.shape) != (B, M):
        _fail(f"index must have shape [B, M] = [{B}, {M}], got {tuple(index.shape)}")
    # A present slot's index is a pixel or −1 (an absent draw); absent slots are never read. As
    # for n, reading the values is free on the CPU only.
    if index.device.type == "cpu" and not torch.compiler.is_compiling() and index.numel():
        lo, hi = torch.aminmax(index)
        if int(lo) >= -1 and int(hi) < D:  # the usual case, one pass (absent slots hold −1)
            return
        present = torch.arange(M)[None, :] < n[:, None]
        bad = present & ((index < -1) | (index >= D))
        if bool(bad.any()):
            b, i = (int(v) for v in bad.nonzero()[0])
            _fail(f"index[{b}, {i}] = {int(index[b, i])} is outside [0, D={D}) for a present slot "
                  f"(i < n[{b}] = {int(n[b])}); use -1 only for an absent draw")


def _check_canvas(name: str, H: int, W: int):
    if H * W == 0:
        _fail(f"{name} must have a canvas of at least one pixel, got H×W = {H}×{W}")


# The most slots gumbel_topk_relaxed (and LAVAE) accepts; the paper uses M = 10.
MAX_OBJECTS = 1024


def _check_max_objects(max_objects, maximum: int = INT64_MAX) -> int:
    """max_objects as an int in [0, maximum] (by default what the dispatcher passes: an int64)."""
    return check_int(max_objects, "max_objects", minimum=0, maximum=maximum)


# ---------------------------------------------------------------------------------------------
# Public API (SPEC §9): keep these names and argument orders.
# ---------------------------------------------------------------------------------------------


def place_and_loglik(
    x: Tensor,
    sprites: Tensor,
    loc: Tensor,
    n: Tensor,
    *,
    index: Optional[Tensor] = None,
    eps: float = 1e-4,
    return_lambda: bool = False,
):
    """Place sprites at their locations and return the Bernoulli log-likelihood of ``x`` (SPEC §9.1).

    Args:
        x: [B,C,H,W] image with values in [0,1].
        sprites: [B,M,C,S,S] sprites in [0,1], S odd; the centre pixel lands on the location.
        loc: [B,M,H,W] location maps (one-hot, straight-through or relaxed).
        n: [B] int64 number of present objects; slots i ≥ n[b] contribute nothing.
        index: optional [B,M] int64 flat pixel of each one-hot map (−1 for absent slots). A
            promise that ``loc[b,i]`` is in value the one-hot of ``index[b,i]``: the forward then
            scatters at ``index`` without reading ``loc``; gradients stay the dense formula's.
        eps: λ = ε + (1−2ε)·min(Σ, 1).
        return_lambda: also return λ [B,C,H,W].

    Returns:
        loglik [B] in nats (summed over channels and pixels), and λ when ``return_lambda``.
    """
    _check_tensor("sprites", sprites, 5, _FLOAT_DTYPES)
    B, M, C, S, S2 = sprites.shape
    _check_tensor("x", x, 4)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    _check_tensor("loc", loc, 4, (sprites.dtype,))
    if S != S2 or S % 2 == 0:
        _fail(f"sprites must be square with an odd side [B,M,C,S,S], got {tuple(sprites.shape)}")
    if C == 0:
        _fail(f"sprites must have at least one channel, got shape {tuple(sprites.shape)}")
    if x.shape[0] != B or x.shape[1] != C:
        _fail(f"x must have shape [B={B}, C={C}, H, W] to match sprites, got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    _check_canvas("x", H, W)
    if tuple(loc.shape) != (B, M, H, W):
        _fail(f"loc must have shape [B, M, H, W] = [{B}, {M}, {H}, {W}], got {tuple(loc.shape)}")
    # ε > 0 keeps the log-likelihood finite (SPEC §1); with ε = 0 an uncovered inked pixel gives
    # −inf and gradients of 0·∞.
    if not 0.0 < float(eps) < 0.5:
        _fail(f"eps must lie in (0, 0.5) (λ = ε + (1−2ε)·min(Σ, 1)), got {eps!r}")
    _check_same_device(x=x, sprites=sprites, loc=loc, n=n, index=index)
    _check_counts(n, B, M)
    _check_index(index, B, M, n, H * W)
    x = x.to(sprites.dtype).contiguous()
    ll, canvas = torch.ops.lavae_fast.place_loglik(
        x, sprites.contiguous(), loc.contiguous(), n.contiguous(),
        None if index is None else index.contiguous(), float(eps),
    )
    if return_lambda:
        return ll, eps + (1 - 2 * eps) * canvas.clamp(max=1)
    return ll


def gumbel_topk_relaxed(logits: Tensor, n: Tensor, tau: float, max_objects: int, gumbel: Tensor, *,
                        window: int = 1, canvas: Optional[tuple] = None):
    """Gumbel-top-k draws without replacement with relaxed step samples (SPEC §2, §3, §9.2).

    Args:
        logits: [B,D] location logits (already γ-scaled).
        n: [B] int64 number of draws per image (≤ max_objects, and ≤ D: one location each).
        tau: Gumbel-softmax temperature, finite and ≥ :data:`MIN_TAU` (the model's bound).
        max_objects: M, the number of slots.
        gumbel: [B,D] standard Gumbel noise (the op draws none itself).
        window: the exclusion window w, an odd int ≥ 1: each draw removes its w × w neighbourhood
            (clipped to the canvas) from the later steps' candidates. 1 (default) removes only the
            drawn pixel: the paper's eq. 11, bit for bit the op without the argument.
        canvas: (H, W) with H·W = D, required when window > 1 (the neighbourhoods are on the
            canvas); a window needs H·W > (M − 1)·w², so that a pixel is left at every step.

    Returns:
        index [B,M] int64 (draw i is the largest of logits+g over step i's candidates, for i < n;
        −1 after); relaxed [B,M,D] (softmax((logits+g)/τ) over the same candidates; zero rows
        for absent slots); log_q [B] = exact log-probability of the draws (eq. 11 with the
        window's candidate sets). Differentiable in ``logits`` through ``relaxed`` and ``log_q``.
    """
    _check_tensor("logits", logits, 2, _FLOAT_DTYPES)
    _check_tensor("gumbel", gumbel, 2, (logits.dtype,))
    B, D = logits.shape
    if D == 0:
        _fail(f"logits must have at least one location (shape [B, D], D ≥ 1), got {tuple(logits.shape)}")
    if tuple(gumbel.shape) != (B, D):
        _fail(f"gumbel must have the shape of logits {(B, D)}, got {tuple(gumbel.shape)}")
    max_objects = _check_max_objects(max_objects)
    if max_objects > MAX_OBJECTS:
        # The op returns relaxed [B, M, D]: M = 10**9 asks for B·D·4 GB before any check of n.
        _fail(f"max_objects must be <= {MAX_OBJECTS} (lavae_fast.ops.MAX_OBJECTS; the relaxed output alone is "
              f"B·max_objects·D floats), got {max_objects}")
    tau = check_tau(tau)
    window, canvas = check_exclusion(window, canvas, D, max_objects)
    _check_same_device(logits=logits, n=n, gumbel=gumbel)
    _check_counts(n, B, max_objects, D)
    relaxed, log_q, index = torch.ops.lavae_fast.gumbel_topk_relaxed(
        logits.contiguous(), n.contiguous(), tau, max_objects, gumbel.contiguous(), window, canvas
    )
    return index, relaxed, log_q


def check_exclusion_window(window, name: str = "window") -> int:
    """The exclusion window as an int, or a ValueError naming it: an odd int in [1, MAX_WINDOW]
    (SPEC §2)."""
    if (isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0
            or window > MAX_WINDOW):
        raise ValueError(f"{name} must be an odd int >= 1 and <= {MAX_WINDOW} (each draw excludes its {name} × "
                         f"{name} neighbourhood from the later draws), got {window!r}")
    return int(window)


# The exclusion window a model gets by default (SPEC §2; docs/recipe.md: measured better than the
# paper's 1 side by side at 64×64, two seeds).
DEFAULT_EXCLUSION_WINDOW = 5


def largest_exclusion_window(D: int, max_objects: int) -> int:
    """The largest odd window w with (max_objects − 1)·w² < D (SPEC §2), for a canvas of D pixels;
    every window fits where max_objects ≤ 1, so then a large sentinel."""
    if max_objects <= 1:
        return 2**31 - 1
    w = math.isqrt((D - 1) // (max_objects - 1)) if D > 0 else 1
    return max(1, w - (1 - w % 2))


def default_exclusion_window(canvas, max_objects: int) -> int:
    """The default exclusion window for ``canvas`` (H, W) (None: any canvas): DEFAULT_EXCLUSION_WINDOW
    where the canvas holds it, else the largest odd window it holds (a 12×12 canvas with 10
    objects: 3; 8×8: 1)."""
    if canvas is None:
        return DEFAULT_EXCLUSION_WINDOW
    H, W = canvas
    return min(DEFAULT_EXCLUSION_WINDOW, largest_exclusion_window(int(H) * int(W), max_objects))


def check_exclusion(window, canvas, D: int, max_objects: int, name: str = "window"):
    """(window, canvas as [H, W] or None) for the op, or a ValueError naming what is wrong: the
    exclusion window is an odd int ≥ 1; one > 1 needs the canvas (H, W), H·W = D, and
    H·W > (max_objects − 1)·window² (SPEC §2: every step keeps a candidate)."""
    window = check_exclusion_window(window, name)
    if window == 1:
        return 1, None
    if canvas is None:
        raise ValueError(f"{name}={window} needs canvas=(H, W): the neighbourhoods lie on the canvas")
    try:
        H, W = (int(v) for v in canvas)
    except (TypeError, ValueError):
        raise ValueError(f"canvas must be (H, W), got {canvas!r}") from None
    if H < 1 or W < 1 or H * W != D:
        raise ValueError(f"canvas {(H, W)} does not hold the D = {D} locations of logits")
    if not D > (max_objects - 1) * window * window:
        fits = largest_exclusion_window(D, max_objects)
        raise ValueError(f"{name}={window} is too large for a {H}×{W} canvas and {max_objects} objects: it needs "
                         f"H·W > (max_objects − 1)·{name}² = {(max_objects - 1) * window * window}, so that every "
                         f"draw keeps a candidate; the largest that fits is {fits}")
    return int(window), [H, W]


def count_objects(h_loc: Tensor, threshold: float, max_objects: int, window: int = 3) -> Tensor:
    """Count local maxima of ``h_loc`` above ``threshold`` (SPEC §2, §9.3). No gradient.

    A point counts when h ≥ every neighbour of its ``window`` × ``window`` neighbourhood inside
    the canvas (ties count every tied point) and h > threshold.

    Args:
        h_loc: [B,H,W] or [B,1,H,W] location logits.
        threshold: strict lower bound (the model uses 4γ).
        max_objects: the count is clipped to this.
        window: the neighbourhood's side, an odd int ≥ 1; 3 (SPEC §2's 3×3) by default.

    Returns:
        n [B] int64.
    """
    _check_tensor("h_loc", h_loc, None, _FLOAT_DTYPES)
    if h_loc.dim() == 4 and h_loc.shape[1] == 1:
        h_loc = h_loc[:, 0]
    if h_loc.dim() != 3:
        _fail(f"h_loc must have shape [B,H,W] or [B,1,H,W], got {tuple(h_loc.shape)}")
    _check_canvas("h_loc", *h_loc.shape[-2:])
    max_objects = _check_max_objects(max_objects)
    threshold = check_real(threshold, "threshold", finite=False)
    window = check_window(window)
    return torch.ops.lavae_fast.count_objects(h_loc.detach().contiguous(), threshold, max_objects, window)


def gather_appearance(h_app: Tensor, loc: Tensor, n: Tensor, *, index: Optional[Tensor] = None) -> Tensor:
    """Read the appearance features at the drawn locations (SPEC §9.4).

    Args:
        h_app: [B,K,H,W] feature map (K = 2L: means and log-variances).
        loc: [B,M,H,W] location maps.
        n: [B] int64; rows i ≥ n[b] are zero.
        index: optional [B,M] int64, the same one-hot promise as in :func:`place_and_loglik`.

    Returns:
        [B,M,K]: Σ_d loc[b,i,d]·h_app[b,:,d].
    """
    _check_tensor("h_app", h_app, 4, _FLOAT_DTYPES)
    _check_tensor("loc", loc, 4, (h_app.dtype,))
    B, K, H, W = h_app.shape
    M = loc.shape[1]
    if loc.shape[0] != B or tuple(loc.shape[-2:]) != (H, W):
        _fail(f"loc must have shape [B={B}, M, H={H}, W={W}], got {tuple(loc.shape)}")
    _check_canvas("h_app", H, W)
    _check_same_device(h_app=h_app, loc=loc, n=n, index=index)
    _check_counts(n, B, M)
    _check_index(index, B, M, n, H * W)
    # A channels-last h_app (the model's fast path) is passed as it is: the kernels read its
    # [B,D,K] rows directly and return its gradient in the same layout.
    if not h_app.is_contiguous(memory_format=torch.channels_last):
        h_app = h_app.contiguous()
    return torch.ops.lavae_fast.gather_appearance(
        h_app, loc.contiguous(), n.contiguous(), None if index is None else index.contiguous()
    )


# ---------------------------------------------------------------------------------------------
# Choice of engine
# ---------------------------------------------------------------------------------------------

ENGINES = ("fused", "reference")
# The engine a model runs where it was not given one (LAVAE(ops=None), the default): a context, so
# that which implementation computes a step is the caller's choice at run time, not a model's
# stored state (a checkpoint does not pin it). contextvars: per thread and per asyncio task.
_ENGINE_IN_USE = contextvars.ContextVar("lavae_fast_engine", default="fused")


def current_engine() -> str:
    """The name of the engine in use here: "fused" unless :func:`use_engine` says otherwise."""
    return _ENGINE_IN_USE.get()


@contextlib.contextmanager
def use_engine(name: str):
    """``with use_engine("reference"): model(x)`` runs every model that was not given an engine of
    its own (``LAVAE(ops=...)``) on ``name``'s ops: "fused" or "reference" (see :func:`engine`).
    Yields that engine's namespace; the previous choice is restored on exit."""
    impl = engine(name)
    token = _ENGINE_IN_USE.set(name)
    try:
        yield impl
    finally:
        _ENGINE_IN_USE.reset(token)


def engine(name: str):
    """The namespace of the four engine ops by name: "fused" (this module: the registered ops with
    their C++/Triton kernels) or "reference" (:mod:`lavae_fast.reference`, plain PyTorch). Both have
    the same signatures, so a model (``LAVAE(ops=...)``, :meth:`LAVAE.set_ops`), a test or a
    benchmark can run either, and compare them in one process."""
    if name == "fused":
        import sys

        return sys.modules[__name__]
    if name == "reference":
        return _ref
    raise ValueError(f"ops must be 'fused' or 'reference', got {name!r}")
