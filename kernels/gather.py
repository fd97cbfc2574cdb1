"""Triton kernels for ``lavae_fast::gather_appearance`` and its backward (SPEC §9.4).

    out[b,i,k]       = Σ_d loc[b,i,d]·h_app[b,k,d]        (i < n[b]; zero rows after)
                     = h_app[b,k,index[b,i]]             in index mode (loc is not read)
    grad_loc[b,i,d]  = Σ_k grad[b,i,k]·h_app[b,k,d]       (always the dense formula)
    grad_h[b,k,d]    = Σ_i grad[b,i,k]·loc[b,i,d]         (dense)  |  scatter at index (index mode)

Memory traffic, per image, in elements (K = 2L features, D pixels, M slots):
* forward, index mode — needed: read the n·K gathered features, write M·K. One program per image
  gathers exactly those (absent rows are masked loads: no traffic) and writes the [M, K] block.
* forward, dense — needed: read loc (n·D) and h_app (K·D), write M·K. The program streams both
  once over D and contracts with tl.dot.
* backward — needed: read grad (M·K) and h_app (K·D) for grad_loc, loc (n·D, dense mode) for
  grad_h; write grad_loc (M·D) and grad_h (K·D): both are dense outputs. One program per
  (image, pixel tile) reads its h_app/loc columns once and writes its columns of both outputs
  once; the grad block is tiny and stays in L1/L2. In index mode the scatter is a tl.dot of the
  incoming gradient with the one-hot matrix built in registers: every grad_h element is written
  exactly once (zeros included), without atomics, and repeated indices add up as in the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import DOT_PRECISION, check_float, check_int64, device_guarded, dot_dim

_BD = 64  # pixels per step of the dense contractions and per backward program
_BKF = 32  # features per block (64 needed ~200 registers a thread on sm_90, 32 about 130)


@triton.jit
def _gather_fwd_kernel(
    h_ptr, loc_ptr, idx_ptr, n_ptr, out_ptr, M, K, D,
    USE_INDEX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kt = tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    ii = tl.arange(0, BM)
    kk = kt * BK + tl.arange(0, BK)
    kmask = kk < K
    nb = tl.minimum(tl.load(n_ptr + b), M)  # n > M must not read past the slots
    imask = ii < nb
    if USE_INDEX:
        idx = tl.load(idx_ptr + b * M + ii, mask=ii < M, other=-1)
        # An index off the canvas would read another image's features: treated as absent.
        present = imask & (idx >= 0) & (idx < D)
        acc = tl.load(
            h_ptr + (b * K + kk[None, :]) * D + idx[:, None],
            mask=present[:, None] & kmask[None, :], other=0.0,
        )
    else:
        acc = tl.zeros([BM, BK], dtype)
        for d0 in range(0, tl.minimum(nb, 1) * D, BD):
            d = d0 + tl.arange(0, BD)
            dm = d < D
            a = tl.load(loc_ptr + (b * M + ii[:, None]) * D + d[None, :], mask=imask[:, None] & dm[None, :], other=0.0)
            hv = tl.load(h_ptr + (b * K + kk[None, :]) * D + d[:, None], mask=dm[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(a, hv, acc, input_precision=PREC, out_dtype=dtype)
    tl.store(out_ptr + (b * M + ii[:, None]) * K + kk[None, :], acc, mask=(ii[:, None] < M) & kmask[None, :])


@triton.jit
def _gather_bwd_kernel(
    g_ptr, h_ptr, loc_ptr, idx_ptr, n_ptr, gh_ptr, gloc_ptr, M, K, D,
    USE_INDEX: tl.constexpr, NEED_H: tl.constexpr, NEED_LOC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    dtype = h_ptr.dtype.element_ty
    ii = tl.arange(0, BM)
    d = t * BD + tl.arange(0, BD)
    dm = d < D
    nb = tl.minimum(tl.load(n_ptr + b), M)
    imask = ii < nb
    if NEED_LOC:
        # grad_loc[i, d] = Σ_k grad[i, k]·h_app[k, d]
        acc = tl.zeros([BM, BD], dtype)
        for k0 in range(0, tl.minimum(nb, 1) * K, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < K
            gv = tl.load(g_ptr + (b * M + ii[:, None]) * K + kk[None, :], mask=imask[:, None] & km[None, :], other=0.0)
            hv = tl.load(h_ptr + (b * K + kk[:, None]) * D + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
            acc = tl.dot(gv, hv, acc, input_precision=PREC, out_dtype=dtype)
        tl.store(gloc_ptr + (b * M + ii[:, None]) * D + d[None, :], acc, mask=(ii[:, None] < M) & dm[None, :])
    if NEED_H:
        # grad_h[k, d] = Σ_i grad[i, k]·Lmat[i, d], Lmat = loc, or the one-hot of index.
        if USE_INDEX:
            idx = tl.load(idx_ptr + b * M + ii, mask=ii < M, other=-1)
            present = imask & (idx >= 0)
            lm = tl.where(present[:, None] & (idx[:, None] == d[None, :]), 1.0, 0.0).to(dtype)
        else:
            lm = tl.load(loc_ptr + (b * M + ii[:, None]) * D + d[None, :], mask=imask[:, None] & dm[None, :], other=0.0)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < K
            gt = tl.load(g_ptr + (b * M + ii[None, :]) * K + kk[:, None], mask=km[:, None] & imask[None, :], other=0.0)
            out = tl.dot(gt, lm, input_precision=PREC, out_dtype=dtype)
            tl.store(gh_ptr + (b * K + kk[:, None]) * D + d[None, :], out, mask=km[:, None] & dm[None, :])


def _check(h_app, loc, n, index):
    check_float("h_app", h_app)
    if h_app.dim() != 4:
        raise ValueError(f"h_app must have shape [B,K,H,W], got {tuple(h_app.shape)}")
    B, K, H, W = h_app.shape
    if loc.dim() != 4 or loc.shape[0] != B or tuple(loc.shape[-2:]) != (H, W):
        raise ValueError(f"loc must have shape [B={B}, M, H={H}, W={W}], got {tuple(loc.shape)}")
    if loc.dtype != h_app.dtype:
        raise TypeError(f"loc must have the dtype of h_app ({h_app.dtype}), got {loc.dtype}")
    M = loc.shape[1]
    check_int64("n", n)
    if tuple(n.shape) != (B,):
        raise ValueError(f"n must have shape [B] = [{B}], got {tuple(n.shape)}")
    if index is not None:
        check_int64("index", index)
        if tuple(index.shape) != (B, M):
            raise ValueError(f"index must have shape [B, M] = {(B, M)}, got {tuple(index.shape)}")
    return B, K, H * W, M


@device_guarded
def gather_appearance(h_app, loc, n, index):
    """Forward op: [B, M, K]."""
    B, K, D, M = _check(h_app, loc, n, index)
    out = h_app.new_empty(B, M, K)
    if B * M * K == 0:
        return out
    if D == 0:
        return out.zero_()
    BK = min(_BKF, dot_dim(K))
    h_app = h_app.contiguous()
    _gather_fwd_kernel[(B, triton.cdiv(K, BK))](
        h_app, loc.contiguous() if index is None else h_app, index.contiguous() if index is not None else n,
        n.contiguous(), out, M, K, D,
        USE_INDEX=index is not None, BM=dot_dim(M), BK=BK, BD=_BD, PREC=DOT_PRECISION, num_warps=4,
    )
    return out


@device_guarded
def gather_appearance_backward(grad, h_app, loc, n, index, need_h_app, need_loc):
    """Backward op: (grad_h_app [B,K,H,W] or [0], grad_loc [B,M,H,W] or [0]). grad_h_app is
    contiguous whatever h_app's layout: the op's implementation in :mod:`lavae_fast.ops` returns it in
    h_app's layout."""
    B, K, D, M = _check(h_app, loc, n, index)
    if tuple(grad.shape) != (B, M, K):
        raise ValueError(f"grad must have shape {(B, M, K)}, got {tuple(grad.shape)}")
    empty = h_app.new_empty(0)
    grad_h = h_app.new_empty(h_app.shape) if need_h_app else empty
    grad_loc = loc.new_empty(loc.shape) if need_loc else empty
    if not (need_h_app or need_loc):
        return grad_h, grad_loc
    if B * D == 0 or M == 0 or K == 0:
        return grad_h.zero_(), grad_loc.zero_()
    h_app = h_app.contiguous()
    _gather_bwd_kernel[(B, triton.cdiv(D, _BD))](
        grad.to(h_app.dtype).contiguous(), h_app, loc.contiguous(),
        index.contiguous() if index is not None else n, n.contiguous(),
        grad_h if need_h_app else h_app, grad_loc if need_loc else h_app, M, K, D,
        USE_INDEX=index is not None, NEED_H=bool(need_h_app), NEED_LOC=bool(need_loc),
        BM=dot_dim(M), BK=min(_BKF, dot_dim(K)), BD=_BD, PREC=DOT_PRECISION, num_warps=4,
    )
    # The kernel writes the contiguous layout; lavae_fast.ops gives it h_app's (the op's contract).
    return grad_h, grad_loc
