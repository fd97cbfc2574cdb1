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

Exclusion window (SPEC §2, §9.2 item 2; ``window`` w odd > 1, ``canvas`` = [H, W], H·W = D):
step i's candidate set S_i is the pixels outside the w×w neighbourhoods, clipped to the canvas,
of the draws before it, and "not among index[:i]" above becomes "in S_i" for index, relaxed and
log_q alike. The draws are no longer the top-k of y, and the excluded pixels are no longer the
top-ranked ones, so the suffix sums above do not apply; the window has its own specialization
(the ``WINDOWED`` constexpr: window 1 compiles to the code above, unchanged, and ignores the
canvas). S_i is a register mask over the row, updated after each draw by the window test
|row − row_p| ≤ w//2 and |col − col_p| ≤ w//2 (row = d // W, col = d % W, computed once); step i
draws the argmax of y over S_i (ties: the lowest flat index), and its relaxed row and b^(i) are
softmaxes over S_i, each formed against S_i's own maximum — t_i = y of the draw itself for y/τ,
a max-reduction for the logits — so every exponent is ≤ 0 and every normaliser is a sum of
positive terms over S_i only. Nothing is formed as "full sum minus the windows' sums", which the
window around a peak (all but e^−30 of the mass at τ = 0.02) would cancel. (The C++ kernel
groups pixels by the first window that covers them so as to take one exp per pixel; here the
row is in registers and each step computes its D exps for the stored row anyway, so summing
them over S_i directly costs one reduction, as a group sum would.) Per step that is four row
reductions in the forward (argmax, Σ over y, max and Σ over the logits; window 1: two) and two
in the backward's log_q term: more arithmetic, no more memory traffic. The traffic is that of
window 1 and still the minimum: the forward reads logits and gumbel once (2·D) and writes relaxed
(M·D), index (M), log_q (1); the backward reads the k relaxed and grad_relaxed rows (2·k·D),
logits (D), index (M) and writes the gradient (D). H·W > (M − 1)·w² (checked by the launchers)
leaves S_i non-empty at every step.
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
    tau_hi, tau_lo, D, M, STEPS, CW, HALF,
    BD: tl.constexpr, BM: tl.constexpr, WINDOWED: tl.constexpr,
):
    # WINDOWED (window w > 1 on a canvas CW pixels wide, HALF = w // 2) is a constexpr: the
    # window-1 specialization compiles the original code below, unchanged (CW and HALF unused).
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
    if WINDOWED:
        # One loop, each step on its candidate set S_i (`allowed`) held as a register mask: the
        # draw is the argmax of y over S_i (ties: lowest index); the relaxed row and b^(i) are
        # softmaxes over S_i, each against S_i's own maximum (t_i for y, a max-reduction for the
        # logits), so every exponent is ≤ 0 and every sum is of positive terms only; then the
        # draw's w×w window (clipped to the canvas: rows and columns of real pixels) leaves S.
        prow = d // CW
        pcol = d % CW
        ivec = tl.full([BM], -1, tl.int32)
        logq = tl.sum(tl.zeros([BM], dtype), axis=0)
        allowed = dmask
        for i in range(0, k):
            ti, ii = tl.max(tl.where(allowed, y, float("-inf")), axis=0, return_indices=True,
                            return_indices_tie_break_left=True)
            ey = tl.exp(tl.where(allowed, (y - ti) / tau, float("-inf")))
            tl.store(relaxed_ptr + (b * M + i) * D + d, ey / tl.sum(ey, axis=0), mask=dmask)
            mi = tl.max(tl.where(allowed, lg, float("-inf")), axis=0)
            zl = tl.sum(tl.exp(tl.where(allowed, lg - mi, float("-inf"))), axis=0)
            logq += tl.load(logits_ptr + b * D + ii) - mi - tl.log(zl)
            ivec = tl.where(j == i, ii, ivec)
            near = (tl.abs(prow - ii // CW) <= HALF) & (tl.abs(pcol - ii % CW) <= HALF)
            allowed = allowed & ~near
    else:
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
    tau_hi, tau_lo, D, M, STEPS, CW, HALF,
    HAS_GREL: tl.constexpr, HAS_GLQ: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, WINDOWED: tl.constexpr,
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
        if WINDOWED:
            # b^(i) = softmax(logits) over step i's candidate set S_i (`allowed`), against S_i's own
            # maximum; S_{i+1} = S_i minus the w×w window of draw i (absent draws, −1, remove nothing).
            prow = d // CW
            pcol = d % CW
            allowed = dmask
            lq = tl.zeros([BD], dtype)
            for i in range(0, M):
                ii = tl.load(index_ptr + b * M + i)
                if ii >= 0:
                    mi = tl.max(tl.where(allowed, lg, float("-inf")), axis=0)
                    el = tl.exp(tl.where(allowed, lg - mi, float("-inf")))
                    lq += (d == ii).to(dtype) - el / tl.sum(el, axis=0)
                    near = (tl.abs(prow - ii // CW) <= HALF) & (tl.abs(pcol - ii % CW) <= HALF)
                    allowed = allowed & ~near
        else:
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


def _window(window, canvas, D: int, M: int) -> tuple[bool, int, int]:
    """(windowed, canvas width, half window) for the kernels, or a ValueError naming the argument.

    ``window``: an odd int ≥ 1; 1 is the paper's op (``canvas`` is then not used, as in the
    reference and the C++ kernels). A window w > 1 needs ``canvas`` = [H, W] with H·W = D and
    D > (M − 1)·w², so that every step keeps a candidate (SPEC §2)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1, got {window!r}")
    if window == 1:
        return False, 1, 0
    if canvas is None or len(canvas) != 2:
        raise ValueError(f"window {window} needs canvas = [H, W], got {canvas!r}")
    H, W = (int(v) for v in canvas)
    if H < 1 or W < 1 or H * W != D:
        raise ValueError(f"canvas [{H}, {W}] does not hold the D = {D} locations of logits")
    if not D > (M - 1) * window * window:
        raise ValueError(f"window {window} is too large for the canvas [{H}, {W}] and {M} slots: it needs "
                         f"H·W > (max_objects − 1)·window² = {(M - 1) * window * window}")
    return True, W, window // 2


def _too_long(D: int) -> str:
    return (f"rows of D = {D} locations do not fit one program's registers (MAX_D = {MAX_D}); "
            "lavae_fast.ops runs them on the reference")


@device_guarded
def gumbel_topk_relaxed(logits, n, tau, max_objects, gumbel, window=1, canvas=None):
    """Forward op: (relaxed [B,M,D], log_q [B], index [B,M] int64); ``window`` > 1 excludes each
    draw's window × window neighbourhood on ``canvas`` = [H, W] from the later steps (SPEC §2)."""
    M = int(max_objects)
    _check(logits, n, M)
    B, D = logits.shape
    if tuple(gumbel.shape) != (B, D) or gumbel.dtype != logits.dtype:
        raise ValueError(f"gumbel must be a {logits.dtype} tensor of shape {(B, D)}, got {gumbel.dtype} {tuple(gumbel.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    windowed, cw, half = _window(window, canvas, D, M)
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
        tau_hi, tau_lo, D, M, min(M, D), cw, half,
        BD=BD, BM=next_pow2(M), WINDOWED=windowed, num_warps=min(16, max(4, BD // 256)),
    )
    return relaxed, log_q, index


@device_guarded
def gumbel_topk_relaxed_backward(grad_relaxed, grad_log_q, logits, index, relaxed, n, tau, window=1, canvas=None,
                                 gumbel=None):
    """Backward op: d loss / d logits [B, D] (``window``, ``canvas``: those of the forward). ``gumbel``,
    the forward's noise, is accepted for the schema and not used: this kernel reads relaxed (the C++
    kernel recomputes the rows from the noise at window 1 instead)."""
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
    windowed, cw, half = _window(window, canvas, D, M)
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
        tau_hi, tau_lo, D, M, min(M, D), cw, half,
        HAS_GREL=grad_relaxed is not None, HAS_GLQ=grad_log_q is not None,
        BD=BD, BM=next_pow2(M), WINDOWED=windowed, num_warps=min(16, max(4, BD // 256)),
    )
    return out
