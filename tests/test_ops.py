"""The fused CPU engine (lavae_fast._C) against the plain-PyTorch reference (SPEC §9).

CPU tensors dispatch to the C++ kernels once ``lavae_fast._C`` is loaded; every comparison here
runs the public API (or the registered op) and the reference functions of
:mod:`lavae_fast.reference` under ordinary autograd. float64 results must agree to ~1e-10;
float32 results are compared with a float64 reference and may be off by at most a few times the
float32 reference's own error (the flash-attention tolerance rule).

Without the extension the C++ comparisons skip with a reason, unless LAVAE_FAST_REQUIRE_EXT=1
(set in CI), which turns a missing extension into a failure. The fallback kernels
(``reference._fallback_*``) and the warning/fallback path are tested either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from lavae_fast import _backends, ops
from lavae_fast import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRE_EXT = os.environ.get("LAVAE_FAST_REQUIRE_EXT") == "1"
OP_NAMES = [
    "place_loglik", "place_loglik_backward", "gumbel_topk_relaxed", "gumbel_topk_relaxed_backward",
    "count_objects", "gather_appearance", "gather_appearance_backward",
]



# ---------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------


def close64(name, got, want, rtol=1e-10):
    """float64 against float64: equal up to rounding (relative to the largest value)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return
    scale = float(want.abs().max().clamp(min=1.0))
    err = float((got - want).abs().max())
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol * scale:.3g}"


def close32(name, got, ref32, ref64, factor=4.0, floor=2e-6):
    """float32 result against a float64 reference: at most `factor` × the float32 reference's
    error, plus `floor` × the largest value (for outputs the float32 reference gets exactly)."""
    got, ref32, ref64 = got.double(), ref32.double(), ref64.double()
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    if got.numel() == 0:
        return
    assert not torch.isnan(got).any(), f"{name}: NaN in the fused result"
    scale = float(ref64.abs().max().clamp(min=1.0))
    err = float((got - ref64).abs().max())
    ref_err = float((ref32 - ref64).abs().max())
    tol = factor * ref_err + floor * scale
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (float32 reference error {ref_err:.3g}, scale {scale:.3g})"


def compare(name, dtype, got, ref_same, ref64):
    if dtype == torch.float64:
        close64(name, got, ref64)
    else:
        close32(name, got, ref_same, ref64)


def run_with_grads(fn, inputs, wrt, weights):
    """Call fn(*inputs) with fresh leaves for the positions in `wrt`; return (outputs, grads)
    of Σ_k ⟨output_k, weights_k⟩ (outputs that are int tensors or have no weight are skipped)."""
    leaves = [t.detach().clone().requires_grad_(True) if i in wrt else t for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights) if w is not None)
    grads = torch.autograd.grad(loss, [leaves[i] for i in wrt], allow_unused=True)
    grads = [torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(wrt, grads)]
    return [o.detach() for o in outs], grads


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def one_hot_maps(index, n, H, W, dtype):
    """[B,M] flat indices -> [B,M,H,W] one-hot maps for present slots (i < n, index ≥ 0)."""
    B, M = index.shape
    present = (torch.arange(M)[None] < n[:, None]) & (index >= 0)
    maps = torch.zeros(B, M, H * W, dtype=dtype)
    b, i = present.nonzero(as_tuple=True)
    maps[b, i, index[b, i]] = 1
    return maps.view(B, M, H, W)


def place_case(B, M, C, S, H, W, seed, dtype=torch.float64, maps="onehot"):
    """x, sprites, loc, n, index with the edge cases the shape allows.

    Image 0 has n = M and its objects on the corners, then the borders; image 1 (when B > 2) has
    n = 0; the rest draw n and positions at random. Absent slots hold −1 or a huge junk value
    (never read). One present slot of the last image is −1 (an absent draw, as Gumbel top-k gives
    for a canvas smaller than n) when B > 2. `maps`: "onehot" (the index's one-hot maps) or "soft"
    (dense maps of small positive mass, so that Σ stays mostly below 1 and gradients flow).
    """
    g = torch.Generator().manual_seed(seed)
    D = H * W
    x = (torch.rand(B, C, H, W, generator=g) < 0.4).to(dtype)
    x[0, :, 0, 0] = 0.3  # a fractional target
    sprites = (torch.rand(B, M, C, S, S, generator=g) * 0.7).to(dtype)
    n = torch.randint(0, M + 1, (B,), generator=g)
    n[0] = M
    if B > 2:
        n[1] = 0
    index = torch.randint(0, D, (B, M), generator=g)
    edge = list(dict.fromkeys([0, W - 1, (H - 1) * W, D - 1, W // 2, (H // 2) * W, (H // 2) * W + W - 1]))
    k = min(M, len(edge))
    index[0, :k] = torch.tensor(edge[:k])
    absent = torch.arange(M)[None] >= n[:, None]
    junk = torch.where(torch.arange(B)[:, None] % 2 == 0, -1, 10**9).expand(B, M)
    index = torch.where(absent, junk, index)
    if B > 2 and n[-1] > 0:
        index[-1, 0] = -1
    if maps == "onehot":
        loc = one_hot_maps(index, n, H, W, dtype)
    else:
        loc = (torch.softmax(torch.randn(B, M, D, generator=g) * 2, -1) * 0.5).to(dtype).view(B, M, H, W)
    return x, sprites, loc, n, index


PLACE_SHAPES = [
    # B, M, C, S, H, W
    (3, 2, 1, 5, 1, 1),      # 1×1 canvas, sprite larger than it
    (4, 3, 1, 7, 5, 7),      # odd, non-square, sprite larger than the canvas
    (3, 4, 3, 9, 13, 9),     # C = 3
    (3, 5, 1, 17, 32, 32),   # MNIST sprite
    (2, 3, 3, 21, 64, 64),   # dSprites sprite on the paper's canvas
    (3, 14, 1, 5, 16, 20),   # M > 12: two blocks of output channels (7 + 6)
    (3, 3, 1, 19, 9, 40),    # wide, S > H
]


def _place_fn(mode, eps=1e-4, with_lambda=True, impl=ops):
    def fn(x, sprites, loc, n, index):
        kw = {"index": index} if mode == "index" else {}
        return impl.place_and_loglik(x, sprites, loc, n, eps=eps, return_lambda=with_lambda, **kw)

    return fn


def _place_weights(x, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return [torch.randn(x.shape[0], generator=g, dtype=torch.float64),
            torch.randn(x.shape, generator=g, dtype=torch.float64)]


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def test_extension_loaded_when_required():
    if REQUIRE_EXT:
        assert _backends.cpu_kernels_loaded, f"lavae_fast._C failed to load: {_backends.cpu_kernels_error}"
    elif not _backends.cpu_kernels_loaded:
        pytest.skip(f"lavae_fast._C not loaded: {_backends.cpu_kernels_error}")


@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_has_a_cpu_kernel(ext, name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lavae_fast::{name}", "CPU"), name


# ---------------------------------------------------------------------------------------------
# 1. place_and_loglik
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["index", "onehot", "soft"])
@pytest.mark.parametrize("shape", PLACE_SHAPES, ids=lambda s: "B{}M{}C{}S{}_{}x{}".format(*s))
def test_place_matches_reference(ext, shape, mode, dtype):
    seed = zlib.crc32(repr((shape, mode)).encode()) % 1000
    case64 = place_case(*shape, seed=seed, maps="soft" if mode == "soft" else "onehot")
    weights = _place_weights(case64[0], seed)
    fn_mode = "index" if mode == "index" else "dense"
    case = [t.to(dtype) if t.is_floating_point() else t for t in case64]
    got, ggot = run_with_grads(_place_fn(fn_mode), case, [0, 1, 2], weights)
    want, gwant = run_with_grads(_place_fn(fn_mode, impl=ref), case, [0, 1, 2], weights)
    want64, gwant64 = run_with_grads(_place_fn(fn_mode, impl=ref), case64, [0, 1, 2], weights)
    for k, name in enumerate(["loglik", "lambda"]):
        compare(name, dtype, got[k], want[k], want64[k])
    for k, name in enumerate(["grad_x", "grad_sprites", "grad_loc"]):
        compare(name, dtype, ggot[k], gwant[k], gwant64[k])
    if mode == "soft":
        # The soft maps keep most of Σ below 1: the gradient test is not vacuous.
        assert (gwant64[2].abs() > 0).float().mean() > 0.3


def test_place_index_gradients_equal_dense_at_one_hot(ext):
    # Index mode promises one-hot maps and must give the dense formula's gradients there (a
    # finite-difference check cannot see this: the index forward does not read loc).
    for shape in [(4, 3, 1, 7, 5, 7), (3, 4, 3, 9, 13, 9), (3, 5, 1, 17, 32, 32)]:
        x, sprites, loc, n, index = place_case(*shape, seed=3)
        # Present slots with index −1 have zero maps but still a dense loc gradient; keep to the
        # one-hot promise by giving every present slot a position.
        index = torch.where(index == -1, 0, index)
        loc = one_hot_maps(index, n, *x.shape[-2:], x.dtype)
        w = _place_weights(x, 3)
        a, ga = run_with_grads(_place_fn("index"), [x, sprites, loc, n, index], [0, 1, 2], w)
        b, gb = run_with_grads(_place_fn("dense"), [x, sprites, loc, n, index], [0, 1, 2], w)
        for u, v, name in zip(a + ga, b + gb, ["loglik", "lambda", "grad_x", "grad_sprites", "grad_loc"]):
            close64(f"{shape} {name}", u, v)


def test_place_gradcheck_dense(ext):
    x, sprites, loc, n, index = place_case(2, 2, 2, 3, 4, 5, seed=5, maps="soft")
    x = torch.rand(x.shape, dtype=torch.float64)  # fractional targets: smooth in every input
    n = torch.tensor([2, 1])
    sprites = sprites * 0.4  # Σ < 1 everywhere: no kink at the clamp
    inputs = [t.requires_grad_() if i < 3 else t for i, t in enumerate([x, sprites, loc])]
    fn = lambda x, s, l: ops.place_and_loglik(x, s, l, n, return_lambda=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_place_eps_and_overlap_clamp(ext):
    # Overlapping sprites reach Σ = 1 exactly at pixel 0 (the clamp is inclusive: the gradient
    # still flows) and Σ = 1.5 at pixel 1 (no gradient from the log-likelihood there); other eps
    # values go through the same formula.
    x = torch.tensor([[[[1.0, 0.0, 0.6]]]], dtype=torch.float64)
    sprites = torch.full((1, 5, 1, 1, 1), 0.5, dtype=torch.float64)
    index = torch.tensor([[0, 0, 1, 1, 1]])
    n = torch.tensor([5])
    loc = one_hot_maps(index, n, 1, 3, torch.float64)
    w = [torch.ones(1, dtype=torch.float64), None]
    for eps in [1e-4, 1e-2, 0.1]:
        for mode in ["index", "dense"]:
            got, g = run_with_grads(_place_fn(mode, eps=eps), [x, sprites, loc, n, index], [1, 2], w)
            want, gw = run_with_grads(_place_fn(mode, eps=eps, impl=ref), [x, sprites, loc, n, index], [1, 2], w)
            close64("loglik", got[0], want[0])
            close64("grad_sprites", g[0], gw[0])
            close64("grad_loc", g[1], gw[1])
            assert float(got[1][0, 0, 0, 0]) == pytest.approx(1 - eps)
            assert float(g[0][0, 0].abs().sum()) > 0  # Σ = 1: gradient flows
            assert float(g[0][0, 2].abs().sum()) == 0  # Σ = 1.5: blocked by the clamp


def test_place_non_contiguous_inputs(ext):
    x, sprites, loc, n, index = place_case(4, 3, 2, 5, 7, 9, seed=11, maps="soft")
    xs = x.new_zeros(x.shape[:-1] + (2 * x.shape[-1],))
    xs[..., ::2] = x
    x_nc = xs[..., ::2]
    sprites_nc = sprites.transpose(-1, -2).contiguous().transpose(-1, -2)
    loc_nc = loc.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    index_nc = index.t().contiguous().t()
    n_nc = torch.stack([n, n], 1)[:, 0]
    assert not any(t.is_contiguous() for t in [x_nc, sprites_nc, loc_nc, index_nc, n_nc])
    w = _place_weights(x, 11)
    for mode in ["dense", "index"]:
        a, ga = run_with_grads(_place_fn(mode), [x_nc, sprites_nc, loc_nc, n_nc, index_nc], [1, 2], w)
        b, gb = run_with_grads(_place_fn(mode, impl=ref), [x, sprites, loc, n, index], [1, 2], w)
        for u, v in zip(a + ga, b + gb):
            close64(mode, u, v)


@pytest.mark.parametrize("B", [3, 6])
def test_place_thread_count_does_not_change_results(ext, B):
    # B = 3 on two threads splits images into row tasks, B = 6 gives whole images to threads,
    # one thread always takes whole images: every split must give bitwise the same result.
    x, sprites, loc, n, index = place_case(B, 4, 3, 9, 20, 24, seed=13, maps="soft")
    w = _place_weights(x, 13)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in [1, 2]:
            torch.set_num_threads(threads)
            for mode in ["dense", "index"]:
                results.append(run_with_grads(_place_fn(mode), [x, sprites, loc, n, index], [1, 2], w))
    finally:
        torch.set_num_threads(old)
    for (a, ga), (b, gb) in zip(results[:2], results[2:]):
        for u, v in zip(a + ga, b + gb):
            assert torch.equal(u, v)  # every output element is computed by one task, same order


def test_place_backward_op_flags_and_grad_canvas(ext):
    x, sprites, loc, n, index = place_case(3, 3, 2, 5, 6, 7, seed=17, maps="soft")
    ll, canvas = torch.ops.lavae_fast.place_loglik(x, sprites, loc, n, None, 1e-4)
    gl = torch.randn(3, dtype=torch.float64)
    gc = torch.randn(canvas.shape, dtype=torch.float64)
    for idx in [None, index]:
        for gcanvas in [None, gc]:
            for need_s, need_l in [(True, True), (True, False), (False, True), (False, False)]:
                got = torch.ops.lavae_fast.place_loglik_backward(
                    gl, gcanvas, x, sprites, loc, n, idx, canvas, 1e-4, need_s, need_l)
                want = ref._fallback_place_loglik_backward(
                    gl, gcanvas, x, sprites, loc, n, idx, canvas, 1e-4, need_s, need_l)
                for u, v, need in zip(got, want, [need_s, need_l]):
                    assert u.shape == ((0,) if not need else v.shape)
                    close64("backward", u, v)


def test_place_nan_stays_in_its_image(ext):
    x, sprites, loc, n, index = place_case(3, 2, 1, 5, 6, 6, seed=19)
    sprites[0, 0, 0, 2, 2] = float("nan")
    got = ops.place_and_loglik(x, sprites, loc, n, index=index)
    want = ref.place_and_loglik(x, sprites, loc, n, index=index)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    close64("other images", got[1:], want[1:])


def test_place_bad_inputs_raise_naming_the_argument(ext):
    x, sprites, loc, n, index = place_case(2, 3, 1, 5, 6, 6, seed=23)
    op = torch.ops.lavae_fast.place_loglik
    bad_index = index.clone()
    bad_index[0, 0] = 36  # = D: outside the canvas for a present slot
    with pytest.raises(ValueError, match="index"):
        ops.place_and_loglik(x, sprites, loc, n, index=bad_index)
    bad_index[0, 0] = -2
    with pytest.raises(RuntimeError, match="index"):
        op(x, sprites, loc, n, bad_index, 1e-4)
    # Direct calls of the op skip the Python checks: the kernel's own checks must hold.
    with pytest.raises(RuntimeError, match="loc"):
        op(x, sprites, loc[:, :, :5], n, None, 1e-4)
    with pytest.raises(RuntimeError, match="n must lie"):
        op(x, sprites, loc, n + 5, None, 1e-4)
    with pytest.raises(RuntimeError, match="sprites"):
        op(x, sprites[..., :4, :4], loc, n, None, 1e-4)
    with pytest.raises(RuntimeError, match="x must have the dtype"):
        op(x.float(), sprites, loc, n, None, 1e-4)
    with pytest.raises(RuntimeError, match="eps"):
        op(x, sprites, loc, n, None, 0.7)
    ll, canvas = op(x, sprites, loc, n, None, 1e-4)
    with pytest.raises(RuntimeError, match="canvas"):
        torch.ops.lavae_fast.place_loglik_backward(ll, None, x, sprites, loc, n, None, canvas[:1], 1e-4, True, True)


# ---------------------------------------------------------------------------------------------
# 2. gumbel_topk_relaxed
# ---------------------------------------------------------------------------------------------


def gumbel_case(B, D, M, scale, seed, gaps=False):
    g = torch.Generator().manual_seed(seed)
    if gaps:
        # Logits on a ladder with steps of 20+ (γ-scaled logits are this far apart at τ = 0.02).
        logits = (torch.randperm(D, generator=g).double() * 23.0 - 10 * D) + torch.rand(B, D, generator=g, dtype=torch.float64)
    else:
        logits = torch.randn(B, D, generator=g, dtype=torch.float64) * scale
    u = torch.rand(B, D, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    n = torch.randint(0, M + 1, (B,), generator=g)
    n[0] = M
    if B > 1:
        n[1] = 0
    # At most one draw per location: the op refuses n > D (a canvas smaller than M holds n ≤ D).
    return logits, n.clamp(max=D), gumbel


GUMBEL_CASES = [
    # B, D, M, tau, logit scale, gaps
    (4, 35, 5, 0.5, 1.0, False),
    (3, 7, 10, 0.3, 2.0, False),    # D < M: n ≤ D, slots ≥ D are absent
    (3, 1, 3, 0.5, 1.0, False),     # a single pixel: n ≤ 1
    (5, 100, 4, 0.02, 20.0, False),
    (3, 4096, 10, 0.02, 4.16 * 3, False),  # the paper's canvas, γ-scaled logits
    (4, 257, 14, 0.1, 1.0, False),  # partial last vector, M > 12
    (3, 60, 6, 0.02, 0.0, True),    # gaps of 20+ at τ = 0.02
]


def _gumbel_fn(impl, n, tau, M, gumbel):
    def fn(logits):
        index, relaxed, log_q = impl.gumbel_topk_relaxed(logits, n, tau, M, gumbel.to(logits.dtype))
        return relaxed, log_q, index

    return fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GUMBEL_CASES, ids=lambda c: "B{}D{}M{}tau{}s{}g{}".format(*c))
def test_gumbel_matches_reference(ext, case, dtype):
    B, D, M, tau, scale, gaps = case
    logits64, n, gumbel = gumbel_case(B, D, M, scale, seed=D + M, gaps=gaps)
    g = torch.Generator().manual_seed(7)
    w = [torch.randn(B, M, D, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)]
    got, ggot = run_with_grads(_gumbel_fn(ops, n, tau, M, gumbel), [logits64.to(dtype)], [0], w)
    want, gwant = run_with_grads(_gumbel_fn(ref, n, tau, M, gumbel), [logits64.to(dtype)], [0], w)
    want64, gwant64 = run_with_grads(_gumbel_fn(ref, n, tau, M, gumbel), [logits64], [0], w)
    assert torch.equal(got[2], want64[2]), "index"
    assert (got[2][torch.arange(M)[None] >= n[:, None]] == -1).all()
    compare("relaxed", dtype, got[0], want[0], want64[0])
    compare("log_q", dtype, got[1], want[1], want64[1])
    compare("grad_logits", dtype, ggot[0], gwant[0], gwant64[0])
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all() and torch.isfinite(ggot[0]).all()


def test_gumbel_stable_at_low_temperature(ext):
    # τ = 0.02 and logit gaps of 20+: exponents reach −1000 and more. "Full sum minus the earlier
    # draws" would cancel to 0 or a negative normaliser here; the fused op must stay finite and
    # match the float64 reference in float32.
    logits64, n, gumbel = gumbel_case(4, 300, 10, 0, seed=29, gaps=True)
    gumbel = gumbel * 0.01
    g = torch.Generator().manual_seed(29)
    w = [torch.randn(4, 10, 300, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    got, ggot = run_with_grads(_gumbel_fn(ops, n, 0.02, 10, gumbel), [logits64.float()], [0], w)
    want64, gwant64 = run_with_grads(_gumbel_fn(ref, n, 0.02, 10, gumbel), [logits64], [0], w)
    assert all(torch.isfinite(t).all() for t in got[:2] + ggot)
    present = torch.arange(10)[None] < n[:, None]
    rows = got[0][present]
    assert torch.allclose(rows.sum(-1), torch.ones(len(rows)), atol=1e-5)
    assert torch.equal(got[2], want64[2])
    close64("relaxed vs float64 (float32 op)", got[0].double(), want64[0], rtol=1e-6)
    close64("log_q vs float64 (float32 op)", got[1].double(), want64[1], rtol=1e-6)
    close64("grad vs float64 (float32 op)", ggot[0].double(), gwant64[0], rtol=1e-5)


def test_gumbel_gradcheck(ext):
    logits, n, gumbel = gumbel_case(3, 6, 3, 1.0, seed=31)

    def fn(lg):
        index, relaxed, log_q = ops.gumbel_topk_relaxed(lg, n, 0.5, 3, gumbel)
        return relaxed, log_q

    assert torch.autograd.gradcheck(fn, [logits.requires_grad_()], eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gumbel_backward_op_with_one_grad_missing(ext):
    logits, n, gumbel = gumbel_case(4, 50, 6, 2.0, seed=37)
    relaxed, log_q, index = torch.ops.lavae_fast.gumbel_topk_relaxed(logits, n, 0.3, 6, gumbel)
    gr = torch.randn(relaxed.shape, dtype=torch.float64)
    gq = torch.randn(4, dtype=torch.float64)
    for a, b in [(gr, None), (None, gq), (gr, gq)]:
        got = torch.ops.lavae_fast.gumbel_topk_relaxed_backward(a, b, logits, index, relaxed, n, 0.3)
        want = ref._fallback_gumbel_topk_relaxed_backward(a, b, logits, index, relaxed, n, 0.3)
        close64("grad_logits", got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GUMBEL_CASES, ids=lambda c: "B{}D{}M{}tau{}s{}g{}".format(*c))
def test_gumbel_backward_recomputes_the_rows_from_the_noise(ext, case, dtype):
    # Given the forward's noise, the window-1 backward recomputes the relaxed rows (the forward's,
    # bit for bit) instead of reading them: its gradient is as close to the float64 reference as
    # the one from the saved rows, and the rows passed are not read (zeros in their place).
    B, D, M, tau, scale, gaps = case
    logits64, n, gumbel64 = gumbel_case(B, D, M, scale, seed=D + M + 5, gaps=gaps)
    logits, gumbel = logits64.to(dtype), gumbel64.to(dtype)
    relaxed, log_q, index = torch.ops.lavae_fast.gumbel_topk_relaxed(logits, n, tau, M, gumbel)
    index64, relaxed64, _ = ref.gumbel_topk_relaxed(logits64, n, tau, M, gumbel64)
    assert torch.equal(index, index64)
    g = torch.Generator().manual_seed(11)
    gr = torch.randn(B, M, D, generator=g, dtype=torch.float64)
    gq = torch.randn(B, generator=g, dtype=torch.float64)
    bwd = torch.ops.lavae_fast.gumbel_topk_relaxed_backward
    for a, b in [(gr, None), (None, gq), (gr, gq)]:
        a_ = None if a is None else a.to(dtype)
        b_ = None if b is None else b.to(dtype)
        got = bwd(a_, b_, logits, index, torch.zeros_like(relaxed), n, tau, 1, None, gumbel)
        saved = bwd(a_, b_, logits, index, relaxed, n, tau)
        want64 = ref._fallback_gumbel_topk_relaxed_backward(a, b, logits64, index, relaxed64, n, tau)
        which = "relaxed" if b is None else "log_q" if a is None else "both"
        compare(f"grad_logits ({which}, recomputed rows)", dtype, got, saved, want64)
        assert torch.isfinite(got).all()


def _saved_for_backward(fn):
    """The tensors autograd saves while fn() runs (its saved-tensor pack hook sees each)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("python_formula", [False, True], ids=["registered", "python"])
def test_gumbel_autograd_passes_the_noise_at_window_1(ext, python_formula):
    # The autograd formula saves the noise for the C++ backward where it recomputes the rows (CPU,
    # window 1), and only there: a window > 1 reads the saved rows. Both formulas: the one CPU
    # tensors get (csrc/autograd.cpp, with the extension) and lavae_fast.ops' own in Python (every
    # other device), run here through a plain autograd.Function around the same two callbacks.
    logits, n, gumbel = gumbel_case(3, 36, 4, 1.0, seed=83)
    g = torch.Generator().manual_seed(5)
    w = [torch.randn(3, 4, 36, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
    for window, canvas, noise in [(1, None, True), (3, (6, 6), False)]:
        lg = logits.clone().requires_grad_()
        if python_formula:
            def fn(lg=lg, window=window, canvas=canvas):
                return _PythonFormula.apply(lg, n, 0.5, 4, gumbel, window, None if canvas is None else list(canvas))
        else:
            def fn(lg=lg, window=window, canvas=canvas):
                return ops.gumbel_topk_relaxed(lg, n, 0.5, 4, gumbel, window=window, canvas=canvas)[1:]
        out, saved = _saved_for_backward(fn)
        relaxed, log_q = out[0], out[1]
        if not python_formula:  # CPU tensors take csrc/autograd.cpp's formula
            assert "GumbelTopkRelaxed" in relaxed.grad_fn.name(), relaxed.grad_fn.name()
        assert any(t.data_ptr() == relaxed.data_ptr() for t in saved)
        assert any(t.data_ptr() == gumbel.data_ptr() for t in saved) == noise, window
        # And the gradient (through the noise at window 1) is the reference's.
        (got,) = torch.autograd.grad((relaxed, log_q), lg, w)
        want = run_with_grads(_gumbel_window_fn(ref, n, 0.5, 4, gumbel, window, canvas), [logits], [0], w)[1][0]
        close64(f"grad_logits (window {window})", got, want)


def _gumbel_window_fn(impl, n, tau, M, gumbel, window, canvas):
    def fn(logits):
        index, relaxed, log_q = impl.gumbel_topk_relaxed(logits, n, tau, M, gumbel, window=window, canvas=canvas)
        return relaxed, log_q, index

    return fn


class _PythonFormula(torch.autograd.Function):
    """lavae_fast.ops' Python autograd formula of gumbel_topk_relaxed (its setup_context and backward
    callbacks) around the op, for CPU tensors, which otherwise get csrc/autograd.cpp's."""

    @staticmethod
    def forward(logits, n, tau, M, gumbel, window, canvas):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.lavae_fast.gumbel_topk_relaxed(logits, n, tau, M, gumbel, window, canvas)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ops._gumbel_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_relaxed, grad_log_q, grad_index):
        return ops._gumbel_backward(ctx, grad_relaxed, grad_log_q, grad_index)


def test_gumbel_backward_checks_the_noise(ext):
    logits, n, gumbel = gumbel_case(2, 10, 3, 1.0, seed=89)
    relaxed, log_q, index = torch.ops.lavae_fast.gumbel_topk_relaxed(logits, n, 0.5, 3, gumbel)
    bwd = torch.ops.lavae_fast.gumbel_topk_relaxed_backward
    for bad in [gumbel[:, :5], gumbel.float(), gumbel[None]]:
        with pytest.raises(RuntimeError, match="gumbel"):
            bwd(torch.randn_like(relaxed), log_q, logits, index, relaxed, n, 0.5, 1, None, bad)
    # A window > 1 reads the rows: the noise is checked and then not used.
    logits, n, gumbel = gumbel_case(2, 36, 3, 1.0, seed=97)
    relaxed, log_q, index = torch.ops.lavae_fast.gumbel_topk_relaxed(logits, n, 0.5, 3, gumbel, 3, [6, 6])
    gr = torch.randn_like(relaxed)
    close64("window 3, noise given", bwd(gr, log_q, logits, index, relaxed, n, 0.5, 3, [6, 6], gumbel),
            bwd(gr, log_q, logits, index, relaxed, n, 0.5, 3, [6, 6]))


def test_gumbel_non_contiguous_inputs(ext):
    logits, n, gumbel = gumbel_case(4, 40, 5, 1.0, seed=41)
    lg_nc = torch.stack([logits, logits], -1)[..., 0]
    gb_nc = gumbel.t().contiguous().t()
    assert not lg_nc.is_contiguous() and not gb_nc.is_contiguous()
    a = ops.gumbel_topk_relaxed(lg_nc, n, 0.5, 5, gb_nc)
    b = ref.gumbel_topk_relaxed(logits, n, 0.5, 5, gumbel)
    assert torch.equal(a[0], b[0])
    close64("relaxed", a[1], b[1])
    close64("log_q", a[2], b[2])


def test_gumbel_bad_inputs_raise(ext):
    logits, n, gumbel = gumbel_case(2, 10, 3, 1.0, seed=43)
    op = torch.ops.lavae_fast.gumbel_topk_relaxed
    with pytest.raises(RuntimeError, match="gumbel"):
        op(logits, n, 0.5, 3, gumbel[:, :5])
    with pytest.raises(RuntimeError, match="tau"):
        op(logits, n, 0.0, 3, gumbel)
    with pytest.raises(RuntimeError, match="n must lie"):
        op(logits, n, 0.5, 2, gumbel)
    relaxed, log_q, index = op(logits, n, 0.5, 3, gumbel)
    bad = index.clone()
    bad[0, 0] = 10
    with pytest.raises(RuntimeError, match="index"):
        torch.ops.lavae_fast.gumbel_topk_relaxed_backward(None, log_q, logits, bad, relaxed, n, 0.5)


# ---------------------------------------------------------------------------------------------
# 3. count_objects
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (13, 9), (64, 64)])
def test_count_matches_reference(ext, hw, dtype):
    H, W = hw
    g = torch.Generator().manual_seed(H * W)
    B = 6
    h = (torch.randn(B, H, W, generator=g) * 2).to(dtype)
    # Planted peaks (corners and borders included), a plateau of equal maxima and a NaN.
    h[0, 0, 0] = 20
    h[0, H - 1, W - 1] = 21
    h[1, H // 2, :] = 18  # plateau: every point equals its neighbours' max
    h[2] = 30  # constant image: every pixel is a local maximum
    h[3, 0, 0] = float("nan")
    h[3, -1, -1] = 25
    for threshold, max_objects in [(5.0, 10), (5.0, 3), (-100.0, 1000), (40.0, 10)]:
        for hin in [h, h[:, None]]:
            got = ops.count_objects(hin, threshold, max_objects)
            want = ref.count_objects(hin, threshold, max_objects)
            assert got.dtype == torch.long and torch.equal(got, want), (threshold, max_objects)


def test_count_non_contiguous_and_bad_inputs(ext):
    h = torch.randn(3, 12, 10) * 10
    h_nc = h.transpose(1, 2)
    assert torch.equal(ops.count_objects(h_nc, 5.0, 10), ref.count_objects(h_nc, 5.0, 10))
    with pytest.raises(RuntimeError, match="h_loc"):
        torch.ops.lavae_fast.count_objects(h[0], 5.0, 10)
    with pytest.raises(RuntimeError, match="max_objects"):
        torch.ops.lavae_fast.count_objects(h, 5.0, -1)


WINDOWS = (1, 3, 5, 7)


def _count_window_cases(seed: int):
    """Random h_loc [B,H,W] of odd sizes and sizes below the windows, with plateaus, ties, NaN and
    peaks on the borders, and B = 0."""
    g = torch.Generator().manual_seed(seed)
    for H, W in [(1, 1), (1, 6), (2, 3), (4, 2), (5, 7), (6, 6), (9, 13), (17, 11)]:
        h = torch.randn(5, H, W, generator=g) * 3
        h[0] = h[0].round()  # plateaus and ties
        h[1] = 2.0  # flat: every pixel is a maximum of any window
        h[2, 0, 0], h[2, -1, -1], h[2, 0, -1] = 20.0, 21.0, 20.0  # corners
        h[3, (H - 1) // 2, (W - 1) // 2] = float("nan")
        h[4, 0, :] = 19.0  # a plateau along the border
        yield h
    yield torch.randn(0, 5, 5, generator=g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_count_window_matches_reference(ext, dtype):
    for h in _count_window_cases(7):
        for window in WINDOWS:
            for threshold, max_objects in [(0.5, 1000), (0.5, 2), (-100.0, 3), (1.9, 0)]:
                got = ops.count_objects(h.to(dtype), threshold, max_objects, window)
                want = ref.count_objects(h.to(dtype), threshold, max_objects, window)
                assert got.dtype == torch.long and torch.equal(got, want), (tuple(h.shape), window, threshold)
                raw = torch.ops.lavae_fast.count_objects(h.to(dtype).contiguous(), threshold, max_objects, window)
                assert torch.equal(raw, want)


def _two_peaks_2px_apart():
    h = torch.zeros(1, 7, 9, dtype=torch.float64)
    h[0, 3, 3], h[0, 3, 5] = 5.0, 6.0
    return h


def test_count_window_reaches_the_kernel(ext):
    # Two peaks 2 px apart: each is the maximum of its 3×3 window, only the higher one of its 5×5.
    h = _two_peaks_2px_apart()
    for count in (ops.count_objects, ref.count_objects):
        assert count(h, 1.0, 10).tolist() == [2]  # the default is SPEC §2's 3×3
        assert [count(h, 1.0, 10, w).item() for w in WINDOWS] == [2, 2, 1, 1]
        assert count(h, 1.0, 10, window=5).tolist() == [1]
    assert torch.ops.lavae_fast.count_objects(h, 1.0, 10).tolist() == [2]  # the schema's default
    assert torch.ops.lavae_fast.count_objects(h, 1.0, 10, 5).tolist() == [1]
    assert torch.ops.lavae_fast.count_objects(h, 1.0, 10, window=5).tolist() == [1]


@pytest.mark.parametrize("window", [0, 2, 4, -1, -3, 3.0, True, None])
def test_count_window_refused(window):
    h = _two_peaks_2px_apart()
    for count in (ops.count_objects, ref.count_objects):
        with pytest.raises(ValueError, match="window"):
            count(h, 1.0, 10, window)


@pytest.mark.parametrize("window", [0, 2, 4, -1])
def test_count_window_refused_by_the_kernel(ext, window):
    # The registered op itself (the C++ kernel's check), not only the Python boundary.
    with pytest.raises(RuntimeError, match="window must be an odd integer >= 1"):
        torch.ops.lavae_fast.count_objects(_two_peaks_2px_apart(), 1.0, 10, window)


def test_local_maxima_window():
    from lavae_fast.metrics import local_maxima

    h = _two_peaks_2px_apart()[:, None]
    assert int(ops.counted_peaks(h, 1.0).sum()) == 2 and int(ops.counted_peaks(h, 1.0, 5).sum()) == 1
    peaks = ops.local_maxima_mask(h, 5) & (h > 0)
    assert peaks.nonzero().tolist() == [[0, 0, 3, 5]]
    # A background falling away from the corner (0, 0): its one local maximum is that corner.
    r, c = torch.meshgrid(torch.arange(7.0), torch.arange(9.0), indexing="ij")
    hb = torch.where(h > 0, h, -0.01 * (r + c).double())
    rows, cols = local_maxima(hb, 3)
    assert rows.tolist() == [[3, 3, 0]] and cols.tolist() == [[5, 3, 0]]
    rows, cols = local_maxima(hb, 3, window=5)
    assert rows.tolist() == [[3, 0, -1]] and cols.tolist() == [[5, 0, -1]]


# ---------------------------------------------------------------------------------------------
# 4. gather_appearance
# ---------------------------------------------------------------------------------------------


def gather_case(B, M, K, H, W, seed, maps):
    g = torch.Generator().manual_seed(seed)
    D = H * W
    h_app = torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
    n = torch.randint(0, M + 1, (B,), generator=g)
    n[0] = M
    if B > 2:
        n[1] = 0
    index = torch.randint(0, D, (B, M), generator=g)
    index[0, 0] = D - 1
    index = torch.where(torch.arange(M)[None] >= n[:, None], -1, index)
    if maps == "onehot":
        loc = one_hot_maps(index, n, H, W, torch.float64)
    else:
        loc = torch.softmax(torch.randn(B, M, D, generator=g, dtype=torch.float64) * 2, -1).view(B, M, H, W)
    return h_app, loc, n, index


# (2, 13, 37, 19, 23): several column chunks of the backward's tiling plus a partial one and a
# partial tile, two row groups (the second partial), two blocks of objects.
GATHER_SHAPES = [(3, 2, 1, 1, 1), (4, 3, 7, 5, 7), (3, 5, 64, 13, 9), (2, 10, 64, 32, 32), (3, 14, 5, 6, 9),
                 (2, 13, 37, 19, 23)]


def _gather_fn(mode, impl=ops):
    def fn(h_app, loc, n, index):
        return impl.gather_appearance(h_app, loc, n, **({"index": index} if mode == "index" else {}))

    return fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["index", "onehot", "soft"])
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "B{}M{}K{}_{}x{}".format(*s))
def test_gather_matches_reference(ext, shape, mode, dtype):
    case64 = gather_case(*shape, seed=sum(shape), maps="soft" if mode == "soft" else "onehot")
    B, M, K = shape[:3]
    w = [torch.randn(B, M, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]
    fmode = "index" if mode == "index" else "dense"
    case = [t.to(dtype) if t.is_floating_point() else t for t in case64]
    got, ggot = run_with_grads(_gather_fn(fmode), case, [0, 1], w)
    want, gwant = run_with_grads(_gather_fn(fmode, ref), case, [0, 1], w)
    want64, gwant64 = run_with_grads(_gather_fn(fmode, ref), case64, [0, 1], w)
    compare("value", dtype, got[0], want[0], want64[0])
    compare("grad_h_app", dtype, ggot[0], gwant[0], gwant64[0])
    compare("grad_loc", dtype, ggot[1], gwant[1], gwant64[1])


@pytest.mark.parametrize("mode", ["index", "onehot", "soft"])
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "B{}M{}K{}_{}x{}".format(*s))
def test_gather_channels_last_h_app(ext, shape, mode):
    """The model's channels-last h_app: same values and gradients as the reference on the
    contiguous tensor, and the gradient to h_app comes back channels-last (no conversion for the
    convolution's backward) whenever h_app is."""
    h_app, loc, n, index = gather_case(*shape, seed=7 + sum(shape), maps="soft" if mode == "soft" else "onehot")
    B, M, K = shape[:3]
    w = [torch.randn(B, M, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)]
    fmode = "index" if mode == "index" else "dense"
    h_cl = h_app.contiguous(memory_format=torch.channels_last)
    got, ggot = run_with_grads(_gather_fn(fmode), [h_cl, loc, n, index], [0, 1], w)
    want, gwant = run_with_grads(_gather_fn(fmode, ref), [h_app, loc, n, index], [0, 1], w)
    for name, u, v in [("value", got[0], want[0]), ("grad_h_app", ggot[0], gwant[0]), ("grad_loc", ggot[1], gwant[1])]:
        close64(name, u, v)
    if not h_cl.is_contiguous():  # K = 1 or a 1×1 canvas: both layouts are the same
        assert ggot[0].is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.lavae_fast.gather_appearance,
                          (h_cl.clone().requires_grad_(), loc.clone().requires_grad_(), n,
                           index if fmode == "index" else None))


def test_gather_index_gradients_equal_dense_at_one_hot(ext):
    h_app, loc, n, index = gather_case(4, 6, 9, 7, 11, seed=47, maps="onehot")
    index = torch.where(index == -1, 0, index)
    loc = one_hot_maps(index, n, 7, 11, torch.float64)
    w = [torch.randn(4, 6, 9, dtype=torch.float64)]
    a, ga = run_with_grads(_gather_fn("index"), [h_app, loc, n, index], [0, 1], w)
    b, gb = run_with_grads(_gather_fn("dense"), [h_app, loc, n, index], [0, 1], w)
    for u, v in zip(a + ga, b + gb):
        close64("index vs dense", u, v)


def test_gather_gradcheck_dense(ext):
    h_app, loc, n, index = gather_case(2, 3, 4, 3, 5, seed=53, maps="soft")
    fn = lambda h, l: ops.gather_appearance(h, l, n)  # noqa: E731
    assert torch.autograd.gradcheck(fn, [h_app.requires_grad_(), loc.requires_grad_()], eps=1e-6, atol=1e-7)


def test_gather_non_contiguous_and_bad_inputs(ext):
    h_app, loc, n, index = gather_case(3, 4, 6, 5, 8, seed=59, maps="soft")
    h_nc = h_app.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    loc_nc = loc.transpose(-1, -2).contiguous().transpose(-1, -2)
    for kw in [{}, {"index": index.t().contiguous().t()}]:
        close64("value", ops.gather_appearance(h_nc, loc_nc, n, **kw), ref.gather_appearance(h_app, loc, n, **kw))
    bad = index.clone()
    bad[0, 0] = 40
    with pytest.raises(ValueError, match="index"):
        ops.gather_appearance(h_app, loc, n, index=bad)
    with pytest.raises(RuntimeError, match="loc"):
        torch.ops.lavae_fast.gather_appearance(h_app, loc[:, :, :4], n, None)
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.lavae_fast.gather_appearance_backward(torch.zeros(3, 4, 5, dtype=torch.float64), h_app, loc, n,
                                                        None, True, True)


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration and AOT dispatch of every op
# ---------------------------------------------------------------------------------------------


def _opcheck_cases():
    x, sprites, loc, n, index = place_case(3, 3, 2, 5, 6, 7, seed=61, maps="soft")
    ll, canvas = torch.ops.lavae_fast.place_loglik(x, sprites, loc, n, None, 1e-4)
    gl = torch.randn(3, dtype=torch.float64)
    logits, gn, gumbel = gumbel_case(3, 20, 4, 1.0, seed=67)
    relaxed, log_q, gidx = torch.ops.lavae_fast.gumbel_topk_relaxed(logits, gn, 0.5, 4, gumbel)
    h_app, gloc, gathn, gathidx = gather_case(3, 3, 4, 5, 6, seed=71, maps="soft")
    gg = torch.randn(3, 3, 4, dtype=torch.float64)
    rg = lambda t: t.clone().requires_grad_()  # noqa: E731
    return [
        ("place_loglik", (x, rg(sprites), rg(loc), n, None, 1e-4)),
        ("place_loglik", (x, rg(sprites), rg(loc), n, index, 1e-4)),
        ("place_loglik_backward", (gl, None, x, sprites, loc, n, None, canvas, 1e-4, True, True)),
        ("place_loglik_backward", (gl, torch.randn_like(canvas), x, sprites, loc, n, index, canvas, 1e-4, True, False)),
        ("gumbel_topk_relaxed", (rg(logits), gn, 0.5, 4, gumbel)),
        ("gumbel_topk_relaxed_backward", (torch.randn_like(relaxed), torch.randn_like(log_q), logits, gidx, relaxed, gn, 0.5)),
        ("gumbel_topk_relaxed_backward", (None, torch.randn_like(log_q), logits, gidx, relaxed, gn, 0.5)),
        ("gumbel_topk_relaxed_backward",
         (torch.randn_like(relaxed), torch.randn_like(log_q), logits, gidx, relaxed, gn, 0.5, 1, None, gumbel)),
        ("count_objects", (torch.randn(3, 6, 7) * 5, 2.0, 4)),
        ("count_objects", (torch.randn(3, 6, 7) * 5, 2.0, 4, 5)),
        ("gather_appearance", (rg(h_app), rg(gloc), gathn, None)),
        ("gather_appearance", (rg(h_app), rg(gloc), gathn, gathidx)),
        ("gather_appearance_backward", (gg, h_app, gloc, gathn, None, True, True)),
        ("gather_appearance_backward", (gg, h_app, gloc, gathn, gathidx, True, False)),
    ]


@pytest.mark.parametrize("k", range(14))
def test_opcheck(ext, k):
    name, args = _opcheck_cases()[k]
    torch.library.opcheck(getattr(torch.ops.lavae_fast, name).default, args)


def test_opcheck_covers_every_op():
    assert {name for name, _ in _opcheck_cases()} == set(OP_NAMES)
    assert len(_opcheck_cases()) == 14


# ---------------------------------------------------------------------------------------------
# The fallback kernels (reference._fallback_*: explicit backward formulas) against autograd of
# the reference functions. These need no extension.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "index"])
def test_fallback_place_matches_reference_autograd(mode):
    x, sprites, loc, n, index = place_case(4, 3, 2, 7, 5, 8, seed=73, maps="soft" if mode == "dense" else "onehot")
    w = _place_weights(x, 73)
    idx = index if mode == "index" else None
    ll, canvas = ref._fallback_place_loglik(x, sprites, loc, n, idx, 1e-4)
    # The op returns Σ; the weights w[1] apply to λ = ε + (1−2ε)·min(Σ, 1).
    grad_canvas = w[1] * (1 - 2e-4) * (canvas <= 1).double()
    gs, gl = ref._fallback_place_loglik_backward(w[0], grad_canvas, x, sprites, loc, n, idx, canvas, 1e-4, True, True)
    want, gwant = run_with_grads(_place_fn(mode, impl=ref), [x, sprites, loc, n, index], [1, 2], w)
    lam = 1e-4 + (1 - 2e-4) * canvas.clamp(max=1)
    close64("loglik", ll, want[0])
    close64("lambda", lam, want[1])
    close64("grad_sprites", gs, gwant[0])
    close64("grad_loc", gl, gwant[1])


def test_fallback_gumbel_matches_reference_autograd():
    logits, n, gumbel = gumbel_case(4, 30, 5, 2.0, seed=79)
    w = [torch.randn(4, 5, 30, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    relaxed, log_q, index = ref._fallback_gumbel_topk_relaxed(logits, n, 0.3, 5, gumbel)
    grad = ref._fallback_gumbel_topk_relaxed_backward(w[0], w[1], logits, index, relaxed, n, 0.3)
    want, gwant = run_with_grads(_gumbel_fn(ref, n, 0.3, 5, gumbel), [logits], [0], w)
    close64("relaxed", relaxed, want[0])
    close64("log_q", log_q, want[1])
    assert torch.equal(index, want[2])
    close64("grad_logits", grad, gwant[0])


@pytest.mark.parametrize("mode", ["dense", "index"])
def test_fallback_gather_matches_reference_autograd(mode):
    h_app, loc, n, index = gather_case(4, 3, 5, 4, 6, seed=83, maps="soft" if mode == "dense" else "onehot")
    w = [torch.randn(4, 3, 5, dtype=torch.float64)]
    idx = index if mode == "index" else None
    out = ref._fallback_gather_appearance(h_app, loc, n, idx)
    gh, gl = ref._fallback_gather_appearance_backward(w[0], h_app, loc, n, idx, True, True)
    want, gwant = run_with_grads(_gather_fn(mode, ref), [h_app, loc, n, index], [0, 1], w)
    close64("value", out, want[0])
    close64("grad_h_app", gh, gwant[0])
    close64("grad_loc", gl, gwant[1])


# ---------------------------------------------------------------------------------------------
# Without the extension: the reference serves, with one warning when the build is missing.
# ---------------------------------------------------------------------------------------------

_SUBPROCESS_CHECK = textwrap.dedent(
    """
    import sys, warnings
    if sys.argv[1] == "missing":
        sys.modules["lavae_fast._C"] = None  # makes `import lavae_fast._C` fail with ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import lavae_fast
        from lavae_fast import _backends, ops, reference as ref
        _backends.load_cpu_kernels()  # a second call must not warn again
    ours = [w for w in caught if "lavae_fast._C" in str(w.message)]
    print("WARNINGS", len(ours))
    if ours:
        print("MESSAGE", str(ours[0].message))
    print("LOADED", _backends.cpu_kernels_loaded)
    print("CPU_KERNEL", torch._C._dispatch_has_kernel_for_dispatch_key("lavae_fast::place_loglik", "CPU"))
    torch.manual_seed(0)
    x = (torch.rand(2, 1, 6, 7) < 0.4).double()
    sprites = torch.rand(2, 3, 1, 5, 5, dtype=torch.float64) * 0.5
    n = torch.tensor([3, 1])
    index = torch.tensor([[0, 41, 20], [5, -1, -1]])
    loc = torch.zeros(2, 3, 42, dtype=torch.float64)
    loc[0, 0, 0] = loc[0, 1, 41] = loc[0, 2, 20] = loc[1, 0, 5] = 1
    loc = loc.view(2, 3, 6, 7)
    a = ops.place_and_loglik(x, sprites, loc, n, index=index)
    b = ref.place_and_loglik(x, sprites, loc, n, index=index)
    print("MATCH", bool(torch.allclose(a, b, rtol=1e-12, atol=1e-12)))
    print("DESCRIBE", _backends.describe())
    """
)


def _run_without_extension(how, cwd=ROOT):
    env = dict(os.environ)
    env.pop("LAVAE_FAST_REQUIRE_EXT", None)
    if how == "disabled":
        env["LAVAE_FAST_DISABLE_EXTENSION"] = "1"
    else:
        env.pop("LAVAE_FAST_DISABLE_EXTENSION", None)
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECK, how], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def test_disabled_extension_falls_back_to_reference():
    out = _run_without_extension("disabled")
    assert out["LOADED"] == "False" and out["CPU_KERNEL"] == "False"
    assert out["WARNINGS"] == "0"  # disabling on purpose is not worth a warning
    assert "LAVAE_FAST_DISABLE_EXTENSION" in out["DESCRIBE"]
    assert out["MATCH"] == "True"


def test_a_stale_extension_is_not_loaded_and_the_reference_serves(ext, tmp_path):
    """A build from other op schemas (the package changed a schema after the build) aborts the
    process when loaded; lavae_fast finds it from the digest stamped into the file and does not
    load it. Here: a copy of the package whose count_objects has no window argument, as before the
    build's (measured: without the check, importing that copy kills the process with SIGABRT)."""
    import shutil

    from lavae_fast import _C, _schemas

    assert _schemas.extension_digest(_C.__file__) == _schemas.digest()  # the build in use is current
    pkg = os.path.dirname(_C.__file__)  # the package's folder (_schemas is in its engine/)
    shutil.copytree(pkg, tmp_path / "lavae_fast", ignore=shutil.ignore_patterns("pretrained", "__pycache__"))
    inc = tmp_path / "lavae_fast" / "op_schemas.inc"
    text = inc.read_text()
    assert "int window=3) -> Tensor" in text
    inc.write_text(text.replace(", int window=3) -> Tensor", ") -> Tensor"))
    out = _run_without_extension("stale", cwd=tmp_path)
    assert out["WARNINGS"] == "1", out
    assert "stale build" in out["MESSAGE"] and "pip install" in out["MESSAGE"], out["MESSAGE"]
    assert out["LOADED"] == "False" and out["CPU_KERNEL"] == "False"
    assert out["MATCH"] == "True"


def test_the_schema_digest_ignores_comments_and_follows_the_schemas(tmp_path):
    from lavae_fast import _schemas

    path = tmp_path / "op_schemas.inc"
    text = open(_schemas.PATH).read()
    path.write_text("// another comment\n\n" + text)
    assert _schemas.digest(_schemas.read(str(path))) == _schemas.digest()
    path.write_text(text.replace("float eps)", "float eps, int extra)", 1))
    assert _schemas.digest(_schemas.read(str(path))) != _schemas.digest()
    blob = tmp_path / "blob.so"
    blob.write_bytes(b"\0" * 100 + _schemas.STAMP_PREFIX + b"0123abcd;" + b"\0" * 10)
    assert _schemas.extension_digest(str(blob)) == "0123abcd"
    blob.write_bytes(b"\0" * 100)
    assert _schemas.extension_digest(str(blob)) is None


def test_missing_extension_warns_once_and_falls_back():
    out = _run_without_extension("missing")
    assert out["WARNINGS"] == "1", out
    assert "pip install" in out["MESSAGE"]  # says how to build it
    assert out["LOADED"] == "False" and out["CPU_KERNEL"] == "False"
    assert out["MATCH"] == "True"
