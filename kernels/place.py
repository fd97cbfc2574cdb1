"""Triton kernels for ``lavae_fast::place_loglik`` and ``lavae_fast::place_loglik_backward``.

Semantics (SPEC §1, §9.1; the reference is ``lavae_fast.reference``):
    Σ[b,c,h,w] = Σ_{i<n[b]} Σ_{u,v} sprite[b,i,c,u,v] · loc[b,i,h−u+s,w−v+s]      (s = S//2)
    λ = ε + (1−2ε)·min(Σ, 1);   loglik[b] = Σ_{c,h,w} x log λ + (1−x) log(1−λ)
In index mode ``loc[b,i]`` is the one-hot of ``index[b,i]`` (−1: absent), so Σ is a scatter of
the sprites; the gradients are always the dense formula's:
    g = dL/dΣ = grad_loglik·(1−2ε)·[Σ ≤ 1]·(x/λ − (1−x)/(1−λ)) + grad_canvas
    grad_loc[b,i,h,w]      = Σ_{c,u,v} g[b,c,h+u−s,w+v−s] · sprite[b,i,c,u,v]     (a correlation)
    grad_sprite[b,i,c,u,v] = Σ_{h,w} loc[b,i,h,w] · g[b,c,h+u−s,w+v−s]
                           = g[b,c,r_i+u−s,c_i+v−s] in index mode (a window gather)
with zero rows for absent slots (i ≥ n[b], or index −1). No per-object canvas exists anywhere:
each program accumulates, for its tile of the canvas, the present sprites that overlap it.

Memory traffic, per image, in elements (D = H·W pixels, n present objects of M slots), and how
each kernel reaches it:
* forward, index mode (grid: one program per image, looping over canvas tiles) — needed: read
  x (C·D), write Σ (C·D), read the n·C·S² present sprite values and n indices. Each x pixel is
  read once and each Σ pixel written once; the sprite values are masked gathers that only touch
  the n present sprites and stay in L1/L2 after their first use; the log-likelihood is reduced in
  registers. That is the minimum: a streaming kernel, one launch (no partial-sum pass).
* forward, dense mode (grid: image × canvas tile) — needed: additionally the n present location
  maps (n·D; absent maps are never read: the reduction stops at n·S²). Each loc pixel is gathered
  S² times, but from the cache lines of the tile and its halo, so DRAM sees it about once. The
  n·C·S²·D multiply-adds (tl.dot) make this mode compute-bound, not memory-bound.
* backward — needed: read x and Σ (2·C·D), the sprites (n·C·S²) and, in dense mode, loc (n·D);
  write grad_loc (M·D, a dense output: absent rows are written as zeros) and grad_sprites
  (M·C·S²). The design adds one round trip of g = dL/dΣ (write C·D, read C·D, mostly from L2):
  computing g inside the correlation would repeat its two divisions S² times per pixel, and
  Triton offers no explicit shared memory to stage a g halo in. Then:
  - grad_loc (grid: image × pixel tile): one tl.dot per K-step of (c,u,v); every gathered g value
    feeds all M slots at once (the slots are the rows of the dot, the sprites its staged operand);
  - grad_sprites, index mode (grid: image × slot): a gather of one C×S×S window per slot;
  - grad_sprites, dense mode (grid: image × chunk of C·S²): a tl.dot reducing over pixels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DOT_PRECISION,
    check_float,
    check_int64,
    device_guarded,
    dot_dim,
    next_pow2,
    scalar,
    split_scalar,
    warps_for,
)

# Block sizes. Forward index mode streams the canvas: 1024 elements (channels × pixels) a step.
# The correlations hold a [16, BP] accumulator and gather a [BK, BP] window per step. Register
# counts from ptxas for sm_90 (float32, 4 warps, no spills; tests/test_triton.py compiles them):
# BK = 32 needed 221 registers a thread (2 programs an SM), BK = 16 needs 72.
_FWD_INDEX_BP = 1024
_CORR_BP = 128
_CORR_BK = 16
_GS_BK = 32  # dense grad_sprites: output chunk of C·S² per program
_GS_BP = 32  # dense grad_sprites: pixels per reduction step (BP = 64 needed 255 registers)
_ELEM_BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _loglik_tile(acc, b, cc, p, x_ptr, canvas_ptr, eps, one_m2eps, C, D):
    """Store Σ for one tile and return its log-likelihood. acc [R, BP], rows = channels."""
    full = (cc[:, None] < C) & (p[None, :] < D)
    offs = (b * C + cc[:, None]) * D + p[None, :]
    tl.store(canvas_ptr + offs, acc, mask=full)
    x = tl.load(x_ptr + offs, mask=full, other=0.0)
    # The same expression as the reference (λ first, then 1−λ), so both round alike.
    lam = eps + one_m2eps * tl.minimum(acc, 1.0)
    ll = x * tl.log(lam) + (1.0 - x) * tl.log(1.0 - lam)
    ll = tl.where(full, ll, 0.0)
    return tl.sum(tl.sum(ll, axis=1), axis=0)


@triton.jit
def _place_fwd_index_kernel(
    x_ptr, spr_ptr, n_ptr, idx_ptr, canvas_ptr, ll_ptr,
    eps_hi, eps_lo, k_hi, k_lo, M, H, W,
    C: tl.constexpr, S: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
):
    # One program per image streams its canvas tile by tile: the log-likelihood is summed in a
    # fixed order inside the program (deterministic, no atomics) and the op is a single launch,
    # which matters for a kernel whose whole traffic at B = 1024 takes ~10 µs.
    b = tl.program_id(0).to(tl.int64)
    dtype = canvas_ptr.dtype.element_ty
    eps = scalar(eps_hi, eps_lo, dtype)
    one_m2eps = scalar(k_hi, k_lo, dtype)
    D = H * W
    cc = tl.arange(0, BC)
    cmask = cc < C
    s: tl.constexpr = S // 2
    nb = tl.minimum(tl.load(n_ptr + b), M)  # n > M cannot read past the index row
    total = tl.sum(tl.zeros([BP], dtype), axis=0)
    for p0 in range(0, D, BP):
        p = p0 + tl.arange(0, BP)
        pmask = p < D
        h = p // W
        w = p % W
        acc = tl.zeros([BC, BP], dtype=dtype)
        for i in range(0, nb):  # absent slots are never read
            idx = tl.load(idx_ptr + b * M + i)
            du = h - idx // W + s
            dv = w - idx % W + s
            m = pmask & (du >= 0) & (du < S) & (dv >= 0) & (dv < S) & (idx >= 0)
            offs = ((b * M + i) * C + cc[:, None]) * (S * S) + (du * S + dv)[None, :]
            acc += tl.load(spr_ptr + offs, mask=cmask[:, None] & m[None, :], other=0.0)
        total += _loglik_tile(acc, b, cc, p, x_ptr, canvas_ptr, eps, one_m2eps, C, D)
    tl.store(ll_ptr + b, total)


@triton.jit
def _place_fwd_dense_kernel(
    x_ptr, spr_ptr, loc_ptr, n_ptr, canvas_ptr, part_ptr,
    eps_hi, eps_lo, k_hi, k_lo, M, H, W, T,
    C: tl.constexpr, S: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):
    # Σ[c, p] = Σ_k A[c, k]·L[k, p] over k = (i, u, v): A = the sprites (rows: channels, padded to
    # the tl.dot minimum), L = the location windows of the tile, gathered per step.
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    dtype = canvas_ptr.dtype.element_ty
    D = H * W
    p = t * BP + tl.arange(0, BP)
    pmask = p < D
    h = p // W
    w = p % W
    cc = tl.arange(0, BC)
    cmask = cc < C
    s: tl.constexpr = S // 2
    SS: tl.constexpr = S * S
    nb = tl.minimum(tl.load(n_ptr + b), M)
    KK = nb * SS  # absent slots contribute nothing, so the reduction stops at the present ones
    acc = tl.zeros([BC, BP], dtype=dtype)
    for k0 in range(0, KK, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < KK
        i = kk // SS
        uv = kk % SS
        u = uv // S
        v = uv % S
        a = tl.load(
            spr_ptr + ((b * M + i[None, :]) * C + cc[:, None]) * SS + uv[None, :],
            mask=cmask[:, None] & kmask[None, :], other=0.0,
        )
        hh = h[None, :] - u[:, None] + s
        ww = w[None, :] - v[:, None] + s
        lm = kmask[:, None] & pmask[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        lv = tl.load(loc_ptr + (b * M + i[:, None]) * D + hh * W + ww, mask=lm, other=0.0)
        acc = tl.dot(a, lv, acc, input_precision=PREC, out_dtype=dtype)
    eps = scalar(eps_hi, eps_lo, dtype)
    one_m2eps = scalar(k_hi, k_lo, dtype)
    tl.store(part_ptr + b * T + t, _loglik_tile(acc, b, cc, p, x_ptr, canvas_ptr, eps, one_m2eps, C, D))


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dcanvas_kernel(
    gll_ptr, gcan_ptr, x_ptr, canvas_ptr, g_ptr, total, CD,
    eps_hi, eps_lo, k_hi, k_lo,
    HAS_GCAN: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    dtype = g_ptr.dtype.element_ty
    eps = scalar(eps_hi, eps_lo, dtype)
    one_m2eps = scalar(k_hi, k_lo, dtype)
    sig = tl.load(canvas_ptr + offs, mask=m, other=0.0)
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    gll = tl.load(gll_ptr + offs // CD, mask=m, other=0.0)
    lam = eps + one_m2eps * tl.minimum(sig, 1.0)
    # Inclusive: the gradient passes through min(Σ, 1) where Σ ≤ 1 (SPEC §1).
    pass_ = (sig <= 1.0).to(dtype)
    g = (x / lam - (1.0 - x) / (1.0 - lam)) * one_m2eps * pass_ * gll
    if HAS_GCAN:
        g += tl.load(gcan_ptr + offs, mask=m, other=0.0)
    tl.store(g_ptr + offs, g, mask=m)


@triton.jit
def _grad_loc_kernel(
    g_ptr, spr_ptr, n_ptr, gloc_ptr, M, H, W,
    C: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):
    # grad_loc[i, p] = Σ_k A[i, k]·G[k, p] over k = (c, u, v): A = the sprites of all slots (rows),
    # G = the g windows around the tile's pixels, gathered once per step for all slots.
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    dtype = gloc_ptr.dtype.element_ty
    D = H * W
    p = t * BP + tl.arange(0, BP)
    pmask = p < D
    h = p // W
    w = p % W
    s: tl.constexpr = S // 2
    SS: tl.constexpr = S * S
    K: tl.constexpr = C * SS
    nb = tl.minimum(tl.load(n_ptr + b), M)
    ii = tl.arange(0, BM)
    imask = ii < nb
    acc = tl.zeros([BM, BP], dtype=dtype)
    for k0 in range(0, tl.minimum(nb, 1) * K, BK):  # nothing to correlate when n = 0
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        c = kk // SS
        uv = kk % SS
        u = uv // S
        v = uv % S
        a = tl.load(spr_ptr + (b * M + ii[:, None]) * K + kk[None, :], mask=imask[:, None] & kmask[None, :], other=0.0)
        hh = h[None, :] + u[:, None] - s
        ww = w[None, :] + v[:, None] - s
        gm = kmask[:, None] & pmask[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        gv = tl.load(g_ptr + (b * C + c[:, None]) * D + hh * W + ww, mask=gm, other=0.0)
        acc = tl.dot(a, gv, acc, input_precision=PREC, out_dtype=dtype)
    tl.store(gloc_ptr + (b * M + ii[:, None]) * D + p[None, :], acc, mask=(ii[:, None] < M) & pmask[None, :])


@triton.jit
def _grad_spr_dense_kernel(
    g_ptr, loc_ptr, n_ptr, gspr_ptr, M, H, W,
    C: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
    PREC: tl.constexpr,
):
    # grad_sprite[i, k] = Σ_p loc[i, p]·G[p, k] for one chunk of k = (c, u, v), reducing over pixels.
    b = tl.program_id(0).to(tl.int64)
    kt = tl.program_id(1)
    dtype = gspr_ptr.dtype.element_ty
    D = H * W
    s: tl.constexpr = S // 2
    SS: tl.constexpr = S * S
    K: tl.constexpr = C * SS
    kk = kt * BK + tl.arange(0, BK)
    kmask = kk < K
    c = kk // SS
    uv = kk % SS
    u = uv // S
    v = uv % S
    nb = tl.minimum(tl.load(n_ptr + b), M)
    ii = tl.arange(0, BM)
    imask = ii < nb
    acc = tl.zeros([BM, BK], dtype=dtype)
    for p0 in range(0, tl.minimum(nb, 1) * D, BP):
        p = p0 + tl.arange(0, BP)
        pmask = p < D
        h = p // W
        w = p % W
        a = tl.load(loc_ptr + (b * M + ii[:, None]) * D + p[None, :], mask=imask[:, None] & pmask[None, :], other=0.0)
        hh = h[:, None] + u[None, :] - s
        ww = w[:, None] + v[None, :] - s
        gm = pmask[:, None] & kmask[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        gv = tl.load(g_ptr + (b * C + c[None, :]) * D + hh * W + ww, mask=gm, other=0.0)
        acc = tl.dot(a, gv, acc, input_precision=PREC, out_dtype=dtype)
    tl.store(gspr_ptr + (b * M + ii[:, None]) * K + kk[None, :], acc, mask=(ii[:, None] < M) & kmask[None, :])


@triton.jit
def _grad_spr_index_kernel(
    g_ptr, idx_ptr, n_ptr, gspr_ptr, M, H, W,
    C: tl.constexpr, S: tl.constexpr, BK: tl.constexpr,
):
    # grad_sprite[i] is the C×S×S window of g centred on the slot's pixel (zero off the canvas).
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    D = H * W
    s: tl.constexpr = S // 2
    SS: tl.constexpr = S * S
    K: tl.constexpr = C * SS
    nb = tl.load(n_ptr + b)
    idx = tl.load(idx_ptr + b * M + i)
    present = (i < nb) & (idx >= 0)
    r0 = idx // W
    c0 = idx % W
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        c = kk // SS
        uv = kk % SS
        hh = r0 + uv // S - s
        ww = c0 + uv % S - s
        m = kmask & present & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        val = tl.load(g_ptr + (b * C + c) * D + hh * W + ww, mask=m, other=0.0)
        tl.store(gspr_ptr + (b * M + i) * K + kk, val, mask=kmask)


# ---------------------------------------------------------------------------------------------
# Launchers: the registered implementations (same signatures and outputs as the op schemas)
# ---------------------------------------------------------------------------------------------


def _check(x, sprites, loc, n, index):
    check_float("sprites", sprites)
    if sprites.dim() != 5 or sprites.shape[3] != sprites.shape[4] or sprites.shape[3] % 2 == 0:
        raise ValueError(f"sprites must have shape [B,M,C,S,S] with S odd, got {tuple(sprites.shape)}")
    B, M, C, S, _ = sprites.shape
    if x.dim() != 4 or tuple(x.shape[:2]) != (B, C):
        raise ValueError(f"x must have shape [B={B}, C={C}, H, W], got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if tuple(loc.shape) != (B, M, H, W):
        raise ValueError(f"loc must have shape [B, M, H, W] = {(B, M, H, W)}, got {tuple(loc.shape)}")
    if loc.dtype != sprites.dtype:
        raise TypeError(f"loc must have the dtype of sprites ({sprites.dtype}), got {loc.dtype}")
    check_int64("n", n)
    if tuple(n.shape) != (B,):
        raise ValueError(f"n must have shape [B] = [{B}], got {tuple(n.shape)}")
    if index is not None:
        check_int64("index", index)
        if tuple(index.shape) != (B, M):
            raise ValueError(f"index must have shape [B, M] = {(B, M)}, got {tuple(index.shape)}")
    return B, M, C, S, H, W


@device_guarded
def place_loglik(x, sprites, loc, n, index, eps):
    """Forward op: (loglik [B], Σ [B,C,H,W]) — Σ before the clamp, saved for the backward."""
    B, M, C, S, H, W = _check(x, sprites, loc, n, index)
    dtype = sprites.dtype
    x = x.to(dtype).contiguous()
    sprites = sprites.contiguous()
    n = n.contiguous()
    D = H * W
    canvas = torch.empty(B, C, H, W, dtype=dtype, device=x.device)
    if B == 0 or D == 0 or C == 0:
        return x.new_zeros(B), canvas.zero_()
    eps_hi, eps_lo = split_scalar(eps)
    k_hi, k_lo = split_scalar(1 - 2 * eps)
    if index is not None:
        ll = x.new_empty(B)
        BC = next_pow2(C)
        BP = min(_FWD_INDEX_BP // BC, next_pow2(D))
        _place_fwd_index_kernel[(B,)](
            x, sprites, n, index.contiguous(), canvas, ll,
            eps_hi, eps_lo, k_hi, k_lo, M, H, W,
            C=C, S=S, BC=BC, BP=BP, num_warps=warps_for(BC * BP),
        )
    else:
        # Compute-bound (n·C·S²·D multiply-adds): many programs, one per (image, tile), and the
        # tiles' partial sums added in a fixed order afterwards.
        BP = min(_CORR_BP, dot_dim(D))
        T = triton.cdiv(D, BP)
        part = torch.empty(B, T, dtype=dtype, device=x.device)
        _place_fwd_dense_kernel[(B, T)](
            x, sprites, loc.contiguous(), n, canvas, part,
            eps_hi, eps_lo, k_hi, k_lo, M, H, W, T,
            C=C, S=S, BC=dot_dim(C), BP=BP, BK=_CORR_BK, PREC=DOT_PRECISION, num_warps=4,
        )
        ll = part.sum(1)
    return ll, canvas


@device_guarded
def place_loglik_backward(grad_loglik, grad_canvas, x, sprites, loc, n, index, canvas, eps,
                          need_sprites, need_loc):
    """Backward op: (grad_sprites [B,M,C,S,S] or [0], grad_loc [B,M,H,W] or [0])."""
    B, M, C, S, H, W = _check(x, sprites, loc, n, index)
    dtype = sprites.dtype
    D = H * W
    empty = sprites.new_empty(0)
    if not (need_sprites or need_loc):
        return empty, empty
    # The kernels write every element, absent rows included, so the outputs start uninitialised.
    grad_sprites = sprites.new_empty(sprites.shape) if need_sprites else empty
    grad_loc = loc.new_empty(loc.shape) if need_loc else empty
    if B == 0 or M == 0 or D == 0 or C == 0:
        return grad_sprites.zero_(), grad_loc.zero_()
    if tuple(canvas.shape) != (B, C, H, W):
        raise ValueError(f"canvas must have shape {(B, C, H, W)}, got {tuple(canvas.shape)}")
    if tuple(grad_loglik.shape) != (B,):
        raise ValueError(f"grad_loglik must have shape [B] = [{B}], got {tuple(grad_loglik.shape)}")
    if grad_canvas is not None and tuple(grad_canvas.shape) != (B, C, H, W):
        raise ValueError(f"grad_canvas must have shape {(B, C, H, W)}, got {tuple(grad_canvas.shape)}")
    x = x.to(dtype).contiguous()
    sprites = sprites.contiguous()
    n = n.contiguous()
    eps_hi, eps_lo = split_scalar(eps)
    k_hi, k_lo = split_scalar(1 - 2 * eps)

    # g = dL/dΣ, elementwise.
    g = torch.empty(B, C, H, W, dtype=dtype, device=x.device)
    total = B * C * D
    gcan = grad_canvas.to(dtype).contiguous() if grad_canvas is not None else g
    _dcanvas_kernel[(triton.cdiv(total, _ELEM_BLOCK),)](
        grad_loglik.to(dtype).contiguous(), gcan, x, canvas.to(dtype).contiguous(), g, total, C * D,
        eps_hi, eps_lo, k_hi, k_lo,
        HAS_GCAN=grad_canvas is not None, BLOCK=_ELEM_BLOCK, num_warps=4,
    )
    BM = dot_dim(M)
    if need_loc:
        BP = min(_CORR_BP, dot_dim(D))
        _grad_loc_kernel[(B, triton.cdiv(D, BP))](
            g, sprites, n, grad_loc, M, H, W,
            C=C, S=S, BM=BM, BP=BP, BK=_CORR_BK, PREC=DOT_PRECISION, num_warps=4,
        )
    if need_sprites:
        K = C * S * S
        if index is not None:
            BK = min(1024, next_pow2(K))
            _grad_spr_index_kernel[(B, M)](
                g, index.contiguous(), n, grad_sprites, M, H, W, C=C, S=S, BK=BK, num_warps=4,
            )
        else:
            _grad_spr_dense_kernel[(B, triton.cdiv(K, _GS_BK))](
                g, loc.contiguous(), n, grad_sprites, M, H, W,
                C=C, S=S, BM=BM, BK=_GS_BK, BP=_GS_BP, PREC=DOT_PRECISION, num_warps=4,
            )
    return grad_sprites, grad_loc
