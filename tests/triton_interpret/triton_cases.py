"""Inputs and comparison helpers for the interpreted Triton tests."""

from __future__ import annotations

import torch


def assert_matches_reference(name, got, ref32, ref64, floor=1e-6):
    """The kernel's error against a float64 reference is at most ~2× plain PyTorch's float32 error.

    ``got`` and ``ref32`` are float32 results of the kernel and the reference, ``ref64`` the
    reference in float64; ``floor`` (relative to the largest value) covers results the float32
    reference happens to get exactly right.
    """
    got, ref32, ref64 = got.double(), ref32.double(), ref64.double()
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    scale = float(ref64.abs().max().clamp(min=1.0)) if ref64.numel() else 1.0
    err = float((got - ref64).abs().max()) if got.numel() else 0.0
    ref_err = float((ref32 - ref64).abs().max()) if got.numel() else 0.0
    tol = 2 * ref_err + floor * scale
    assert err <= tol, f"{name}: max error {err:.3g} vs float64 reference exceeds {tol:.3g} (float32 reference error {ref_err:.3g}, scale {scale:.3g})"


def assert_close64(name, got, ref, rtol=1e-10):
    scale = float(ref.abs().max().clamp(min=1.0)) if ref.numel() else 1.0
    err = float((got - ref).abs().max()) if got.numel() else 0.0
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol * scale:.3g}"


def one_hot_maps(index, H, W, dtype):
    """[B,M] flat indices (−1 = absent) -> [B,M,H,W] one-hot maps (zero maps for absent)."""
    B, M = index.shape
    maps = torch.zeros(B, M, H * W, dtype=dtype)
    present = index >= 0
    maps[present.nonzero(as_tuple=True) + (index[present],)] = 1
    return maps.view(B, M, H, W)


def place_case(B, M, C, S, H, W, *, dtype=torch.float64, seed=0, fractional_x=False):
    """Sprites, x, n and indices with every edge case the shape allows.

    Image 0 has n = M with its first objects on the four corners and then on the borders; image 1
    has n = 0 (when B > 2, otherwise n = 1); the rest draw n and positions at random. Absent slots
    hold −1 in even images and a valid position in odd ones: slots i ≥ n must be ignored either way.
    """
    g = torch.Generator().manual_seed(seed)
    D = H * W
    sprites = torch.rand(B, M, C, S, S, generator=g, dtype=dtype)
    if fractional_x:
        x = torch.rand(B, C, H, W, generator=g, dtype=dtype)
    else:
        x = (torch.rand(B, C, H, W, generator=g) < 0.4).to(dtype)
    n = torch.randint(0, M + 1, (B,), generator=g)
    n[0] = M
    if B > 1:
        n[1] = 0 if B > 2 else min(1, M)
    edge = [0, W - 1, (H - 1) * W, D - 1, W // 2, (H // 2) * W, (H // 2) * W + W - 1, (H - 1) * W + W // 2]
    edge = list(dict.fromkeys(edge))  # distinct, order kept
    index = torch.full((B, M), -1, dtype=torch.long)
    for b in range(B):
        perm = torch.randperm(D, generator=g).tolist()
        picks = (edge + [p for p in perm if p not in edge]) if b == 0 else perm
        k = min(int(n[b]), D) if b % 2 == 0 else min(M, D)
        index[b, :k] = torch.tensor(picks[:k], dtype=torch.long)
    n = torch.minimum(n, torch.tensor(D))
    return x, sprites, n, index


def relaxed_maps(B, M, H, W, *, dtype=torch.float64, seed=1, temperature=0.7):
    """Dense, non-negative location maps (softmax rows), as the relaxed mode produces."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, M, H * W, generator=g, dtype=dtype) / temperature
    return torch.softmax(logits, -1).view(B, M, H, W)


def gumbel_case(B, D, M, *, scale=1.0, gap=0.0, dtype=torch.float64, seed=0):
    """Logits (optionally with a few peaks ``gap`` above the rest), Gumbel noise and counts."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, D, generator=g, dtype=dtype) * scale
    if gap:
        for b in range(B):
            peaks = torch.randperm(D, generator=g)[: max(1, min(M, D) // 2)]
            logits[b, peaks] += gap
    u = torch.rand(B, D, generator=g, dtype=dtype).clamp(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    n = torch.randint(0, M + 1, (B,), generator=g)
    n[0] = M
    if B > 1:
        n[1] = 0
    # At most one draw per location: lavae_fast.ops refuses n > D on CPU tensors.
    return logits, gumbel, n.clamp(max=D)
