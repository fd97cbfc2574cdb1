"""Triton kernels for ``lavae_fast::gumbel_topk_relaxed`` and its backward (SPEC §3, §9.2).

Forward, per image (one program), y = logits + g, K = min(M, D) steps, k = min(n, K) draws:
    index[i]   = the i-th largest y (i < k), −1 after
    relaxed[i] = softmax(y/τ) over the locations not among index[:i]    (zero rows for i ≥ k)
    log_q      = Σ_{i<k} log softmax(logits)[index[i]] over the same sets (eq. 11)
Numerics: the top-k values t_0 ≥ t_1 ≥ … are selected once; the locations never drawn ("the
rest") are summed once against their own maximum m_r: R = Σ_rest exp((y − m_r)/τ). Step i's
normaliser is then formed against its own maximum, which is t_i itself:
    Z_i = Σ_{j=i}^{k−1} exp((t_j − t_i)/τ) + exp((m_r − t_i)/τ)·R          (every term ≤ 1·count)
and likewise for log_q with the logits (whose maximum over step i's set is max(logit[t_j≥i], m_r)).
Nothing is ever formed as "full sum minus the earlier draws", which cancels catastrophically at
τ = 0.02 with γ-scaled logit gaps of 20+ (a gap of 1000 in y/τ).

Memory traffic, per image, in elements: needed — read logits and gumbel (2·D), write relaxed
(M·D, rows of absent slots included: it is a dense output), index (M) and log_q (1). The program
loads the row once into registers (one pass over D), does the k selections and all reductions on
registers, and writes each relaxed element once: exactly the minimum. The row must fit in one
program's registers: D ≤ MAX_D (64×64 canvases use 4096); the launchers refuse longer rows, which
:mod:`lavae_fast.ops` routes to the reference.

Backward, per image: needed — read relaxed and grad_relaxed rows of the k drawn steps (2·k·D;
rows i ≥ k of the forward output are zero, so they are skipped), logits (D), index (M), write the
gradient (D). The log_q term recomputes each step's renormalised softmax b^(i) on registers from
the same suffix sums. Reaches that minimum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, check_int64, device_guarded, next_pow2, scalar, split_scalar

# Largest D kept in one program's registers (32 elements a thread at 16 warps for each live row).
MAX_D = 16384


@triton.jit
def _pick(vec, j, i):
    """vec[i] of a small register vector (no dynamic indexing in Triton)."""
    return tl.sum(tl.where(j == i, vec, tl.zeros_like(vec)), axis=0)


@triton.jit
def _gumbel_fwd_kernel(
    logits_ptr, gumbel_ptr, n_ptr, relaxed_ptr, logq_ptr, index_ptr,
    tau_hi, tau_lo, D, M, STEPS,
    BD: tl.constexpr, BM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    dtype = logits_ptr.dtype.element_ty
    tau = scalar(tau_hi, tau_lo, dtype)
    d = tl.arange(0, BD)
    dmask = d < D
    lg = tl.load(logits_ptr + b * D + d, mask=dmask, other=float("-inf"))
    y = lg + tl.load(gumbel_ptr + b * D + d, mask=dmask, other=0.0)
    y = tl.where(dmask, y, float("-inf"))
    k = tl.minimum(tl.minimum(tl.load(n_ptr + b), M), STEPS)
    j = tl.arange(0, BM)
    ninf = tl.full([BM], float("-inf"), dtype)
    tvec = ninf  # t_i = y of the i-th draw
    lvec = ninf  # logits of the i-th draw
    ivec = tl.full([BM], -1, tl.int32)
    taken = d < 0
    work = y
    for i in range(0, k):
        ti, ii = tl.max(work, axis=0, return_indices=True, return_indices_tie_break_left=True)
        hit = d == ii
        tvec = tl.where(j == i, ti, tvec)
        lvec = tl.where(j == i, tl.sum(tl.where(hit, lg, 0.0), axis=0), lvec)
        ivec = tl.where(j == i, ii, ivec)
        work = tl.where(hit, float("-inf"), work)
        taken = taken | hit
    rest = dmask & ~taken
    # Rest sums against their own maxima; an empty rest gives R = 0 and m_r = −inf. Exponents are
    # masked before exp so that no lane ever computes an overflow or inf − inf.
    my = tl.max(tl.where(rest, y, float("-inf")), axis=0)
    ml = tl.max(tl.where(rest, lg, float("-inf")), axis=0)
    my0 = tl.where(my > float("-inf"), my, 0.0)
    ml0 = tl.where(ml > float("-inf"), ml, 0.0)
    Ry = tl.sum(tl.exp(tl.where(rest, (y - my0) / tau, float("-inf"))), axis=0)
    Rl = tl.sum(tl.exp(tl.where(rest, lg - ml0, float("-inf"))), axis=0)

    logq = tl.sum(tl.zeros([BM], dtype), axis=0)
    drawn = d < 0
    for i in range(0, k):
        suffix = (j >= i) & (j < k)
        ti = _pick(tvec, j, i)
        zy = tl.sum(tl.exp(tl.where(suffix, (tvec - ti) / tau, float("-inf"))), axis=0) + tl.exp((my - ti) / tau) * Ry
        ok = dmask & ~drawn
        row = tl.exp(tl.where(ok, (y - ti) / tau, float("-inf"))) / zy
        tl.store(relaxed_ptr + (b * M + i) * D + d, row, mask=dmask)
        li = _pick(lvec, j, i)
        mi = tl.maximum(tl.max(tl.where(suffix, lvec, float("-inf")), axis=0), ml)
        zl = tl.sum(tl.exp(tl.where(suffix, lvec - mi, float("-inf"))), axis=0) + tl.exp(ml - mi) * Rl
        logq += li - mi - tl.log(zl)
        drawn = drawn | (d == _pick(ivec, j, i))
    for i in range(k, M):  # absent slots: zero rows
        tl.store(relaxed_ptr + (b * M + i) * D + d, tl.zeros([BD], dtype), mask=dmask)
    tl.store(logq_ptr + b, logq)
    tl.store(index_ptr + b * M + j, tl.where(j < k, ivec, -1).to(tl.int64), mask=j < M)


@triton.jit
def _gumbel_bwd_kernel(
    grel_ptr, glq_ptr, logits_ptr, index_ptr, relaxed_ptr, n_ptr, out_ptr,
    tau_hi, tau_lo, D, M, STEPS,
    HAS_GREL: tl.constexpr, HAS_GLQ: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    tau = scalar(tau_hi, tau_lo, dtype)
    d = tl.arange(0, BD)
    dmask = d < D
    k = tl.minimum(tl.minimum(tl.load(n_ptr + b), M), STEPS)
    acc = tl.zeros([BD], dtype)
    if HAS_GREL:
        # d softmax(y/τ)/dy over the allowed set: (1/τ)·r ⊙ (g − ⟨g, r⟩); rows i ≥ k are zero.
        for i in range(0, k):
            r = tl.load(relaxed_ptr + (b * M + i) * D + d, mask=dmask, other=0.0)
            gr = tl.load(grel_ptr + (b * M + i) * D + d, mask=dmask, other=0.0)
            acc += r * (gr - tl.sum(gr * r, axis=0))
        acc = acc / tau
    if HAS_GLQ:
        # d log b^(i)[idx_i]/d logits = onehot(idx_i) − b^(i) for every valid draw.
        lg = tl.load(logits_ptr + b * D + d, mask=dmask, other=float("-inf"))
        j = tl.arange(0, BM)
        ivec = tl.load(index_ptr + b * M + j, mask=j < M, other=-1)
        valid = ivec >= 0
        taken = d < 0
        lvec = tl.full([BM], float("-inf"), dtype)
        for i in range(0, M):
            ii = _pick(ivec, j, i)
            hit = (d == ii) & (ii >= 0)
            taken = taken | hit
            lvec = tl.where(j == i, tl.sum(tl.where(hit, lg, 0.0), axis=0), lvec)
        lvec = tl.where(valid, lvec, float("-inf"))
        rest = dmask & ~taken
        ml = tl.max(tl.where(rest, lg, float("-inf")), axis=0)
        ml0 = tl.where(ml > float("-inf"), ml, 0.0)
        Rl = tl.sum(tl.exp(tl.where(rest, lg - ml0, float("-inf"))), axis=0)
        lq = tl.zeros([BD], dtype)
        drawn = d < 0
        for i in range(0, M):
            ii = _pick(ivec, j, i)
            if ii >= 0:
                suffix = (j >= i) & valid
                mi = tl.maximum(tl.max(tl.where(suffix, lvec, float("-inf")), axis=0), ml)
                zl = tl.sum(tl.exp(tl.where(suffix, lvec - mi, float("-inf"))), axis=0) + tl.exp(ml - mi) * Rl
                hit = d == ii
                ok = dmask & ~drawn
                bi = tl.exp(tl.where(ok, lg - mi, float("-inf"))) / zl
                lq += hit.to(dtype) - bi
                drawn = drawn | hit
        acc += tl.load(glq_ptr + b) * lq
    tl.store(out_ptr + b * D + d, acc, mask=dmask)


def _check(logits, n, M):
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [B, D], got {tuple(logits.shape)}")
    check_int64("n", n)
    if tuple(n.shape) != (logits.shape[0],):
        raise ValueError(f"n must have shape [B] = [{logits.shape[0]}], got {tuple(n.shape)}")
    if M < 0:
        raise ValueError(f"max_objects must be >= 0, got {M}")


def _too_long(D: int) -> str:
    return (f"rows of D = {D} locations do not fit one program's registers (MAX_D = {MAX_D}); "
            "lavae_fast.ops runs them on the reference")


@device_guarded
def gumbel_topk_relaxed(logits, n, tau, max_objects, gumbel):
    """Forward op: (relaxed [B,M,D], log_q [B], index [B,M] int64)."""
    M = int(max_objects)
    _check(logits, n, M)
    B, D = logits.shape
    if tuple(gumbel.shape) != (B, D) or gumbel.dtype != logits.dtype:
        raise ValueError(f"gumbel must be a {logits.dtype} tensor of shape {(B, D)}, got {gumbel.dtype} {tuple(gumbel.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if D > MAX_D:
        raise ValueError(_too_long(D))
    relaxed = logits.new_empty(B, M, D)
    log_q = logits.new_empty(B)
    index = torch.empty(B, M, dtype=torch.long, device=logits.device)
    if B == 0:
        return relaxed, log_q, index
    if D == 0 or M == 0:
        return relaxed.zero_(), log_q.zero_(), index.fill_(-1)
    BD = next_pow2(D)
    tau_hi, tau_lo = split_scalar(tau)
    _gumbel_fwd_kernel[(B,)](
        logits.contiguous(), gumbel.contiguous(), n.contiguous(), relaxed, log_q, index,
        tau_hi, tau_lo, D, M, min(M, D), BD=BD, BM=next_pow2(M), num_warps=min(16, max(4, BD // 256)),
    )
    return relaxed, log_q, index


@device_guarded
def gumbel_topk_relaxed_backward(grad_relaxed, grad_log_q, logits, index, relaxed, n, tau):
    """Backward op: d loss / d logits [B, D]."""
    M = index.shape[1] if index.dim() == 2 else -1
    _check(logits, n, M)
    B, D = logits.shape
    check_int64("index", index)
    if tuple(index.shape) != (B, M):
        raise ValueError(f"index must have shape [B, M], got {tuple(index.shape)}")
    if tuple(relaxed.shape) != (B, M, D):
        raise ValueError(f"relaxed must have shape {(B, M, D)}, got {tuple(relaxed.shape)}")
    if grad_relaxed is not None and tuple(grad_relaxed.shape) != (B, M, D):
        raise ValueError(f"grad_relaxed must have shape {(B, M, D)}, got {tuple(grad_relaxed.shape)}")
    if grad_log_q is not None and tuple(grad_log_q.shape) != (B,):
        raise ValueError(f"grad_log_q must have shape [B] = [{B}], got {tuple(grad_log_q.shape)}")
    if D > MAX_D:
        raise ValueError(_too_long(D))
    out = logits.new_empty(B, D)
    if B == 0 or D == 0:
        return out
    if M == 0 or (grad_relaxed is None and grad_log_q is None):
        return out.zero_()
    BD = next_pow2(D)
    tau_hi, tau_lo = split_scalar(tau)
    dtype = logits.dtype
    _gumbel_bwd_kernel[(B,)](
        grad_relaxed.to(dtype).contiguous() if grad_relaxed is not None else out,
        grad_log_q.to(dtype).contiguous() if grad_log_q is not None else out,
        logits.contiguous(), index.contiguous(), relaxed.to(dtype).contiguous(), n.contiguous(), out,
        tau_hi, tau_lo, D, M, min(M, D),
        HAS_GREL=grad_relaxed is not None, HAS_GLQ=grad_log_q is not None,
        BD=BD, BM=next_pow2(M), num_warps=min(16, max(4, BD // 256)),
    )
    return out
