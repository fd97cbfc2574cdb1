"""Plain-PyTorch reference implementations of the four engine operations (SPEC §9).

These functions are the *definition of correctness*: every fused kernel (C++ for CPU tensors,
Triton for CUDA tensors) must agree with them in value and gradient within float32 tolerance.
They are written for clarity, batched over images with different object counts, and are
differentiable through ordinary PyTorch autograd. They serve three purposes:

* tests compare the fused ops against them;
* benchmarks use them as the "eager reference" baseline;
* the registered ops fall back to them (see ``_fallback_*`` at the bottom) when no fused kernel is
  registered for a device, e.g. when the C++ extension was not built.

Shapes: B images, C colour channels, H×W canvas (D = H·W pixels), M object slots, S odd sprite
side, K = 2L appearance features. ``n`` [B] int64 is the number of present objects per image;
slots ``i >= n[b]`` are absent and contribute nothing.

Same public signatures as :mod:`lavae_fast.ops`, so model code can swap one for the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# One definition of each, shared with lavae_fast.ops (re-exported here for the reference's users).
from ._common import check_window, counted_peaks, grad_h_app_layout, object_mask

__all__ = [
    "place_and_loglik",
    "gumbel_topk_relaxed",
    "count_objects",
    "gather_appearance",
    "object_mask",
    "counted_peaks",
    "compose_dense",
    "compose_index",
    "bernoulli_loglik",
]


# ---------------------------------------------------------------------------------------------
# 1. Sprite placement fused with the Bernoulli log-likelihood
# ---------------------------------------------------------------------------------------------


def compose_dense(sprites: torch.Tensor, loc: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Σ_{i<n} sprite_i ∗ loc_i, the centred 2-D convolution of SPEC §1.

    sprites [B,M,C,S,S], loc [B,M,H,W], n [B] -> canvas [B,C,H,W] (before the clamp).
    The sprite's centre pixel (S//2, S//2) lands on the location pixel; what falls off the canvas
    is dropped (zero padding of width S//2, which may exceed the canvas).
    """
    B, M, C, S, _ = sprites.shape
    H, W = loc.shape[-2:]
    if B == 0 or M == 0:
        return sprites.new_zeros(B, C, H, W) + 0 * loc.sum()
    mask = object_mask(n, M).to(sprites.dtype)
    # conv2d is a correlation; a true convolution flips the kernel. With one group per image, the
    # M location maps are the input channels and the C sprite channels the output channels.
    weight = (sprites * mask[:, :, None, None, None]).flip(-1, -2)
    weight = weight.permute(0, 2, 1, 3, 4).reshape(B * C, M, S, S)
    out = F.conv2d(loc.reshape(1, B * M, H, W), weight, padding=S // 2, groups=B)
    return out.view(B, C, H, W)


def compose_index(sprites: torch.Tensor, index: torch.Tensor, n: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The same canvas as :func:`compose_dense` for one-hot maps given by their flat ``index``.

    sprites [B,M,C,S,S], index [B,M] int64 (−1 = absent), n [B] -> canvas [B,C,H,W].
    Scatter-adds each present sprite into a canvas padded by S//2 on every side, then crops.
    """
    B, M, C, S, _ = sprites.shape
    s = S // 2
    Hp, Wp = H + 2 * s, W + 2 * s
    present = object_mask(n, M) & (index >= 0)
    idx = torch.where(present, index, torch.zeros_like(index))
    # In padded coordinates the sprite's top-left corner sits exactly at the location pixel.
    r, c = idx // W, idx % W
    ar = torch.arange(S, device=sprites.device)
    flat = (r[:, :, None, None] + ar[None, None, :, None]) * Wp + (c[:, :, None, None] + ar[None, None, None, :])
    src = sprites * present[:, :, None, None, None].to(sprites.dtype)
    src = src.permute(0, 2, 1, 3, 4).reshape(B, C, M * S * S)
    flat = flat.reshape(B, 1, M * S * S).expand(B, C, M * S * S)
    canvas = sprites.new_zeros(B, C, Hp * Wp).scatter_add(2, flat, src)
    return canvas.view(B, C, Hp, Wp)[:, :, s : s + H, s : s + W]


def bernoulli_loglik(x: torch.Tensor, canvas: torch.Tensor, eps: float) -> torch.Tensor:
    """Σ_{c,d} x log λ + (1−x) log(1−λ) with λ = ε + (1−2ε)·min(Σ, 1).  [B,C,H,W] -> [B].

    ``clamp(max=1)`` passes the gradient where Σ ≤ 1 and blocks it only where overlapping sprites
    push Σ above 1 (SPEC §1); the fused kernels use the same inclusive convention.
    """
    lam = eps + (1 - 2 * eps) * canvas.clamp(max=1)
    return (x * torch.log(lam) + (1 - x) * torch.log(1 - lam)).flatten(1).sum(1)


def place_and_loglik(x, sprites, loc, n, *, index=None, eps: float = 1e-4, return_lambda: bool = False):
    """Reference of ``lavae_fast.ops.place_and_loglik`` (SPEC §9.1).

    x [B,C,H,W] in [0,1]; sprites [B,M,C,S,S]; loc [B,M,H,W]; n [B] int64 -> loglik [B] (nats),
    plus λ [B,C,H,W] when ``return_lambda``. With ``index`` [B,M] the value is the scatter at
    ``index`` (loc's values are not read) while every gradient is the dense formula's.
    """
    H, W = x.shape[-2:]
    if index is None:
        canvas = compose_dense(sprites, loc, n)
    else:
        dense = compose_dense(sprites.detach(), loc, n)
        # value: the scatter; gradient to loc: the dense correlation; gradient to sprites: the
        # scatter's, which equals the dense formula's at one-hot maps.
        canvas = compose_index(sprites, index, n, H, W) + (dense - dense.detach())
    ll = bernoulli_loglik(x, canvas, eps)
    if return_lambda:
        return ll, eps + (1 - 2 * eps) * canvas.clamp(max=1)
    return ll


# ---------------------------------------------------------------------------------------------
# 2. Gumbel-top-k sampling without replacement with relaxed step samples
# ---------------------------------------------------------------------------------------------


def gumbel_topk_relaxed(logits, n, tau: float, max_objects: int, gumbel, *, window: int = 1, canvas=None):
    """Reference of ``lavae_fast.ops.gumbel_topk_relaxed`` (SPEC §2, §3, §9.2): the sequential loop.

    logits [B,D], n [B] int64, gumbel [B,D] noise -> (index [B,M] int64, relaxed [B,M,D], log_q [B]).
    Step i draws the largest of logits+g over its candidate set S_i (Gumbel-top-k = sequential
    sampling without replacement); relaxed[b,i] = softmax((logits+g)/τ) over S_i;
    log_q = Σ_i log b^(i)[index_i], b^(i) = softmax(logits) renormalised over S_i (eq. 11).
    ``window`` = 1 (the paper's): S_i = the locations not drawn before step i. An odd ``window``
    w > 1 (the exclusion window of SPEC §2) needs ``canvas`` = (H, W) with H·W = D: S_i = the
    locations outside the w × w neighbourhoods (clipped to the canvas) of the earlier draws.
    n ≤ D: every draw takes a location of its own, and ``lavae_fast.ops.gumbel_topk_relaxed``
    refuses n > D (on CPU tensors, as it checks n). This reference, unchecked by design, then draws
    every pixel once and leaves slots i ≥ D absent (index −1 below n): not a valid draw of q, and
    not a case the model produces (its n̂ counts distinct pixels). Each masked softmax subtracts its own maximum, so τ = 0.02 with large logit gaps
    is stable.
    """
    if window != 1:
        return _gumbel_topk_window(logits, n, tau, max_objects, gumbel, window, canvas)
    B, D = logits.shape
    M = max_objects
    y = logits + gumbel
    active = object_mask(n, M)
    steps = min(M, D)
    index = torch.full((B, M), -1, dtype=torch.long, device=logits.device)
    relaxed = logits.new_zeros(B, M, D)
    log_q = logits.new_zeros(B)
    if steps == 0 or B == 0:
        return index, relaxed + 0 * logits.sum(), log_q + 0 * logits.sum()
    top = y.detach().topk(steps, dim=1).indices
    index[:, :steps] = torch.where(active[:, :steps], top, -1)
    drawn = torch.zeros(B, D, dtype=torch.bool, device=logits.device)
    rows = []
    for i in range(steps):
        act = active[:, i]
        r_i = torch.softmax((y / tau).masked_fill(drawn, float("-inf")), dim=1)
        lb_i = torch.log_softmax(logits.masked_fill(drawn, float("-inf")), dim=1)
        rows.append(torch.where(act[:, None], r_i, torch.zeros_like(r_i)))
        log_q = log_q + torch.where(act, lb_i.gather(1, top[:, i : i + 1]).squeeze(1), torch.zeros_like(log_q))
        drawn = drawn | (F.one_hot(top[:, i], D).bool() & act[:, None])
    relaxed = torch.stack(rows + [logits.new_zeros(B, D)] * (M - steps), dim=1)
    return index, relaxed, log_q


def exclusion_cover(index, window: int, canvas):
    """The pixels each draw excludes from the later steps: index [B] flat (−1 = none) →
    bool [B,D], the window × window neighbourhood of index on the (H, W) canvas, clipped to it."""
    H, W = canvas
    B = index.shape[0]
    hit = F.one_hot(index.clamp(min=0), H * W).to(torch.float32) * (index >= 0)[:, None].to(torch.float32)
    return F.max_pool2d(hit.view(B, 1, H, W), window, stride=1, padding=window // 2).view(B, H * W) > 0


def _gumbel_topk_window(logits, n, tau, M, gumbel, window, canvas):
    B, D = logits.shape
    y = logits + gumbel
    active = object_mask(n, M)
    index = torch.full((B, M), -1, dtype=torch.long, device=logits.device)
    log_q = logits.new_zeros(B)
    excluded = torch.zeros(B, D, dtype=torch.bool, device=logits.device)
    rows = []
    ninf = float("-inf")
    for i in range(M):
        act = active[:, i]
        ym = y.masked_fill(excluded, ninf)
        # argmax keeps the first (lowest-index) maximum: the ties rule of topk's window-1 path
        # is "lower index first" as well in every fused kernel.
        pick = ym.detach().argmax(1)
        r_i = torch.softmax(ym / tau, dim=1)
        lb_i = torch.log_softmax(logits.masked_fill(excluded, ninf), dim=1)
        rows.append(torch.where(act[:, None], r_i, torch.zeros_like(r_i)))
        log_q = log_q + torch.where(act, lb_i.gather(1, pick[:, None]).squeeze(1), torch.zeros_like(log_q))
        idx = torch.where(act, pick, -1)
        index[:, i] = idx
        excluded = excluded | exclusion_cover(idx, window, canvas)
    relaxed = torch.stack(rows, dim=1) if rows else logits.new_zeros(B, 0, D) + 0 * logits.sum()
    return index, relaxed, log_q + 0 * logits.sum()


# ---------------------------------------------------------------------------------------------
# 3. Local-maximum object counting
# ---------------------------------------------------------------------------------------------


def count_objects(h_loc, threshold: float, max_objects: int, window: int = 3):
    """Reference of ``lavae_fast.ops.count_objects`` (SPEC §2, §9.3). No gradient.

    h_loc [B,H,W] or [B,1,H,W] -> n [B] int64: the points with h ≥ max-pool_{window×window}(h)
    (−∞ outside the canvas, i.e. max_pool2d's own padding) and h > threshold, clipped to
    ``max_objects``. ``window``: odd, ≥ 1; SPEC §2's counter is 3×3, the default.
    """
    window = check_window(window)
    h = h_loc.detach()
    if h.dim() == 3:
        h = h[:, None]
    if h.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=h.device)
    return counted_peaks(h, threshold, window).flatten(1).sum(1).clamp(max=max_objects).long()


# ---------------------------------------------------------------------------------------------
# 4. Appearance gather at the drawn locations
# ---------------------------------------------------------------------------------------------


def gather_appearance(h_app, loc, n, *, index=None):
    """Reference of ``lavae_fast.ops.gather_appearance`` (SPEC §9.4).

    h_app [B,K,H,W], loc [B,M,H,W], n [B] -> [B,M,K]: Σ_d loc[b,i,d]·h_app[b,:,d], zero rows for
    i ≥ n[b]. With ``index`` the value reads h_app at ``index`` (loc's values are not read); the
    gradient to loc is still the dense one (h_app's column dotted with the incoming gradient).
    """
    B, K = h_app.shape[:2]
    M = loc.shape[1]
    mask = object_mask(n, M).to(h_app.dtype)
    feats = h_app.flatten(2)  # [B,K,D]
    maps = loc.flatten(2) * mask[:, :, None]
    if index is None:
        return torch.einsum("bmd,bkd->bmk", maps, feats)
    dense = torch.einsum("bmd,bkd->bmk", maps, feats.detach())
    present = mask.bool() & (index >= 0)
    idx = torch.where(present, index, torch.zeros_like(index))
    picked = feats.gather(2, idx[:, None, :].expand(B, K, M)).transpose(1, 2)
    picked = picked * present[:, :, None].to(h_app.dtype)
    return picked + (dense - dense.detach())


# ---------------------------------------------------------------------------------------------
# Fallback kernels for the registered ops (lavae_fast.ops). They run below autograd, so the
# backward formulas are written out explicitly; tests check them against autograd of the
# reference functions above.
# ---------------------------------------------------------------------------------------------


def _dloglik_dcanvas(grad_loglik, grad_canvas, x, canvas, eps):
    """dL/dΣ [B,C,H,W] from dL/dloglik [B] (and an optional dL/dΣ from the canvas output)."""
    lam = eps + (1 - 2 * eps) * canvas.clamp(max=1)
    g = (x / lam - (1 - x) / (1 - lam)) * (1 - 2 * eps) * (canvas <= 1).to(canvas.dtype)
    g = g * grad_loglik[:, None, None, None]
    if grad_canvas is not None:
        g = g + grad_canvas
    return g


def _fallback_place_loglik(x, sprites, loc, n, index, eps):
    H, W = x.shape[-2:]
    if index is None:
        canvas = compose_dense(sprites, loc, n)
    else:
        canvas = compose_index(sprites, index, n, H, W)
    return bernoulli_loglik(x, canvas, eps), canvas.contiguous()


def _fallback_place_loglik_backward(grad_loglik, grad_canvas, x, sprites, loc, n, index, canvas, eps,
                                    need_sprites, need_loc):
    B, M, C, S, _ = sprites.shape
    H, W = x.shape[-2:]
    s = S // 2
    g = _dloglik_dcanvas(grad_loglik, grad_canvas, x, canvas, eps)
    mask = object_mask(n, M).to(sprites.dtype)
    empty = sprites.new_empty(0)
    grad_sprites, grad_loc = empty, empty
    if need_loc:
        # dL/dloc[b,i,p] = Σ_c Σ_{u,v} g[b,c,p+(u,v)−s] sprite_i[c,u,v]: a correlation.
        weight = (sprites * mask[:, :, None, None, None]).reshape(B * M, C, S, S)
        if B * M == 0:
            grad_loc = loc.new_zeros(loc.shape)
        else:
            grad_loc = F.conv2d(g.reshape(1, B * C, H, W), weight, padding=s, groups=B).view(B, M, H, W)
    if need_sprites:
        gpad = F.pad(g, (s, s, s, s))  # [B,C,H+2s,W+2s]
        if index is None:
            # dL/dsprite_i[c,u,v] = Σ_p loc_i[p] g[c, p+(u,v)−s]: correlate the padded g with loc.
            if B * M * C == 0:
                grad_sprites = sprites.new_zeros(sprites.shape)
            else:
                w = loc[:, None].expand(B, C, M, H, W).reshape(B * C * M, 1, H, W)
                out = F.conv2d(gpad.reshape(1, B * C, H + 2 * s, W + 2 * s), w, groups=B * C)
                grad_sprites = out.view(B, C, M, S, S).permute(0, 2, 1, 3, 4)
        else:
            present = mask.bool() & (index >= 0)
            idx = torch.where(present, index, torch.zeros_like(index))
            r, c = idx // W, idx % W
            ar = torch.arange(S, device=sprites.device)
            Wp = W + 2 * s
            flat = (r[:, :, None, None] + ar[None, None, :, None]) * Wp + (c[:, :, None, None] + ar[None, None, None, :])
            flat = flat.reshape(B, 1, M * S * S).expand(B, C, M * S * S)
            win = gpad.reshape(B, C, -1).gather(2, flat).view(B, C, M, S, S).permute(0, 2, 1, 3, 4)
            grad_sprites = win * present[:, :, None, None, None].to(g.dtype)
        grad_sprites = (grad_sprites * mask[:, :, None, None, None]).contiguous()
    return grad_sprites, grad_loc.contiguous() if need_loc else grad_loc


def _fallback_gumbel_topk_relaxed(logits, n, tau, max_objects, gumbel, window=1, canvas=None):
    # The op's outputs are ordered (relaxed, log_q, index): opcheck's autograd check sums the
    # outputs in order and cannot start that sum from an int64 tensor.
    with torch.no_grad():
        index, relaxed, log_q = gumbel_topk_relaxed(logits, n, tau, max_objects, gumbel, window=window,
                                                    canvas=_canvas_of(canvas, logits.shape[1]))
    return relaxed, log_q, index


def _canvas_of(canvas, D: int):
    """The op schema's ``canvas`` (None or [H, W]) as the reference's (H, W), or None."""
    return None if canvas is None or len(canvas) == 0 else (int(canvas[0]), int(canvas[1]))


def _fallback_gumbel_topk_relaxed_backward(grad_relaxed, grad_log_q, logits, index, relaxed, n, tau, window=1,
                                           canvas=None, gumbel=None):
    # gumbel (the forward's noise, optional) lets an implementation recompute the relaxed rows
    # instead of reading them (the C++ kernel does at window 1); this one reads relaxed.
    B, D = logits.shape
    M = index.shape[1]
    grad = logits.new_zeros(B, D)
    if grad_relaxed is not None:
        # d softmax(y/τ) over the allowed set: (1/τ) r ⊙ (g − ⟨g, r⟩); zero where r is zero.
        inner = (grad_relaxed * relaxed).sum(-1, keepdim=True)
        grad = grad + (relaxed * (grad_relaxed - inner)).sum(1) / tau
    if grad_log_q is not None:
        # d log b^(i)[idx_i] / d logits = onehot(idx_i) − b^(i), for every present step.
        # b^(i) lives on step i's candidate set: the draws before it excluded (window 1), or
        # their window × window neighbourhoods.
        drawn = torch.zeros(B, D, dtype=torch.bool, device=logits.device)
        acc = logits.new_zeros(B, D)
        cv = _canvas_of(canvas, D)
        for i in range(min(M, D)):
            act = index[:, i] >= 0
            b_i = torch.softmax(logits.masked_fill(drawn, float("-inf")), dim=1)
            hit = F.one_hot(index[:, i].clamp(min=0), D).to(logits.dtype)
            acc = acc + torch.where(act[:, None], hit - b_i, torch.zeros_like(b_i))
            if window == 1:
                drawn = drawn | (hit.bool() & act[:, None])
            else:
                drawn = drawn | exclusion_cover(torch.where(act, index[:, i], -1), window, cv)
        grad = grad + grad_log_q[:, None] * acc
    return grad


def _fallback_count_objects(h_loc, threshold, max_objects, window=3):
    return count_objects(h_loc, threshold, max_objects, window)


def _fallback_gather_appearance(h_app, loc, n, index):
    with torch.no_grad():
        return gather_appearance(h_app, loc, n, index=index).contiguous()


def _fallback_gather_appearance_backward(grad, h_app, loc, n, index, need_h_app, need_loc):
    B, K = h_app.shape[:2]
    M = loc.shape[1]
    mask = object_mask(n, M).to(h_app.dtype)
    g = grad * mask[:, :, None]  # [B,M,K]
    feats = h_app.flatten(2)
    empty = h_app.new_empty(0)
    grad_h, grad_loc = empty, empty
    if need_loc:
        grad_loc = torch.einsum("bmk,bkd->bmd", g, feats).reshape(loc.shape)
    if need_h_app:
        if index is None:
            grad_h = torch.einsum("bmk,bmd->bkd", g, loc.flatten(2)).reshape(h_app.shape)
        else:
            present = mask.bool() & (index >= 0)
            idx = torch.where(present, index, torch.zeros_like(index))
            src = (g * present[:, :, None].to(g.dtype)).transpose(1, 2)  # [B,K,M]
            grad_h = feats.new_zeros(feats.shape).scatter_add(2, idx[:, None, :].expand(B, K, M), src)
            grad_h = grad_h.view(h_app.shape)
        grad_h = grad_h_app_layout(h_app, grad_h)
    return grad_h, grad_loc
