"""Triton kernel for ``lavae_fast::count_objects`` (SPEC §2, §9.3). No gradient.

n[b] = min(#{p : h[p] ≥ h[q] for every q in the window × window neighbourhood of p inside the
                  canvas, and h[p] > threshold}, max_objects)
(the window × window max-pool with −∞ padding, window odd, 3 by default as in SPEC §2; plateaus
count every tied point, as in the reference).

Memory traffic, per image: needed — read h once (D elements), write one int64. One program per
image streams the canvas in tiles; the window² − 1 neighbour reads of a pixel are shifted loads of
the same tile and its halo of window // 2 pixels, served from L1, so DRAM sees each pixel about
once. The window is a compile-time constant (one compilation per radius), clipped to the canvas:
a neighbour farther than H − 1 rows or W − 1 columns is never inside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, device_guarded, next_pow2, scalar, split_scalar

_BP = 1024


@triton.jit
def _count_kernel(h_ptr, out_ptr, thr_hi, thr_lo, H, W, max_objects, RY: tl.constexpr, RX: tl.constexpr,
                  BP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    dtype = h_ptr.dtype.element_ty
    thr = scalar(thr_hi, thr_lo, dtype)
    D = H * W
    base = h_ptr + b * D
    count = tl.sum(tl.zeros([BP], tl.int32), axis=0)
    for p0 in range(0, D, BP):
        p = p0 + tl.arange(0, BP)
        pm = p < D
        r = p // W
        c = p % W
        v = tl.load(base + p, mask=pm, other=0.0)
        peak = pm & (v > thr)
        for dr in tl.static_range(-RY, RY + 1):
            for dc in tl.static_range(-RX, RX + 1):
                if dr * dr + dc * dc > 0:  # the neighbours, not the pixel itself
                    rr = r + dr
                    cc = c + dc
                    inside = pm & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
                    nb = tl.load(base + rr * W + cc, mask=inside, other=float("-inf"))
                    peak = peak & (v >= nb)
        count += tl.sum(peak.to(tl.int32), axis=0)
    tl.store(out_ptr + b, tl.minimum(count, max_objects).to(tl.int64))


@device_guarded
def count_objects(h_loc, threshold, max_objects, window=3):
    """Forward op: n [B] int64."""
    check_float("h_loc", h_loc)
    if h_loc.dim() == 4 and h_loc.shape[1] == 1:
        h_loc = h_loc[:, 0]
    if h_loc.dim() != 3:
        raise ValueError(f"h_loc must have shape [B,H,W] or [B,1,H,W], got {tuple(h_loc.shape)}")
    if max_objects < 0:
        raise ValueError(f"max_objects must be >= 0, got {max_objects}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1, got {window!r}")
    B, H, W = h_loc.shape
    out = torch.empty(B, dtype=torch.long, device=h_loc.device)
    if B == 0:
        return out
    if H * W == 0:
        return out.zero_()
    thr_hi, thr_lo = split_scalar(threshold)
    r = window // 2
    # Clip in Python ints first: max_objects may exceed int32.
    _count_kernel[(B,)](
        h_loc.contiguous(), out, thr_hi, thr_lo, H, W, min(int(max_objects), H * W),
        RY=min(r, H - 1), RX=min(r, W - 1), BP=min(_BP, next_pow2(H * W)), num_warps=4,
    )
    return out
