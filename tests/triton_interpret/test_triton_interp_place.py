"""place_loglik under the Triton interpreter: values and gradients against the reference."""

import pytest
import torch

from lavae_fast import _backends, ops, reference
from triton_cases import assert_close64, assert_matches_reference, one_hot_maps, place_case, relaxed_maps

place_kernels = _backends.kernels_package().place

# (B, M, C, S, H, W): odd canvases, C = 1 and 3, sprites larger than the canvas, and a canvas
# of several tiles for every kernel (17×19 = 323 pixels).
SHAPES = [
    (3, 4, 1, 3, 9, 9),
    (3, 3, 3, 5, 7, 5),
    (2, 2, 1, 11, 7, 5),
    (3, 4, 3, 7, 5, 6),
    (2, 3, 3, 5, 17, 19),
]


def _run(fn, x, sprites, loc, n, index, w_ll, w_lam):
    x = x.clone().requires_grad_()
    sprites = sprites.clone().requires_grad_()
    loc = loc.clone().requires_grad_()
    ll, lam = fn(x, sprites, loc, n, index=index, return_lambda=True)
    loss = (w_ll * ll).sum()
    if w_lam is not None:
        loss = loss + (w_lam * lam).sum()
    gx, gs, gl = torch.autograd.grad(loss, (x, sprites, loc))
    return {"loglik": ll.detach(), "lambda": lam.detach(), "grad_x": gx, "grad_sprites": gs, "grad_loc": gl}


def _inputs(shape, mode, seed=0):
    B, M, C, S, H, W = shape
    x, sprites, n, index = place_case(B, M, C, S, H, W, seed=seed)
    if mode == "index":
        loc = one_hot_maps(index, H, W, torch.float64)
        return x, sprites, loc, n, index
    # Dense maps everywhere, absent slots included: those must contribute nothing.
    return x, sprites, relaxed_maps(B, M, H, W, seed=seed + 1), n, None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}M{}C{}S{}_{}x{}".format(*s))
@pytest.mark.parametrize("mode", ["index", "dense"])
@pytest.mark.parametrize("with_lambda_grad", [False, True], ids=["ll", "ll+lambda"])
def test_place_matches_reference_float32(shape, mode, with_lambda_grad):
    x, sprites, loc, n, index = _inputs(shape, mode)
    B, _, C, _, H, W = shape
    g = torch.Generator().manual_seed(5)
    w_ll = torch.randn(B, generator=g, dtype=torch.float64)
    w_lam = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 100 if with_lambda_grad else None

    def f32(t):
        return None if t is None else t.float()

    got = _run(ops.place_and_loglik, *(f32(t) for t in (x, sprites, loc)), n, index, w_ll.float(), f32(w_lam))
    ref32 = _run(reference.place_and_loglik, *(f32(t) for t in (x, sprites, loc)), n, index, w_ll.float(), f32(w_lam))
    ref64 = _run(reference.place_and_loglik, x, sprites, loc, n, index, w_ll, w_lam)
    for key in got:
        assert got[key].dtype == torch.float32
        # Gradients get a looser floor: dL/dΣ ∝ 1/λ² near λ = ε amplifies the last-bit rounding of
        # Σ, which depends on the summation order (a kernel Σ closer to float64 than the
        # reference's can still land on a worse-conditioned pixel). The backward op itself, fed
        # the same Σ, is held to the strict rule in test_place_backward_op_float32.
        floor = 1e-4 if key.startswith("grad") else 1e-6
        assert_matches_reference(key, got[key], ref32[key], ref64[key], floor=floor)
    # Absent slots get exactly zero gradients.
    absent = torch.arange(shape[1])[None, :] >= n[:, None]
    assert got["grad_sprites"][absent].abs().max().item() == 0 if absent.any() else True
    assert got["grad_loc"][absent].abs().max().item() == 0 if absent.any() else True


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}M{}C{}S{}_{}x{}".format(*s))
@pytest.mark.parametrize("mode", ["index", "dense"])
def test_place_backward_op_float32(shape, mode):
    # The backward op alone, every input shared with the reference (Σ included).
    x, sprites, loc, n, index = _inputs(shape, mode, seed=9)
    B, M, C, S, H, W = shape
    g = torch.Generator().manual_seed(6)
    gll = torch.randn(B, generator=g, dtype=torch.float64)
    gcan = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    _, canvas = reference._fallback_place_loglik(x.float(), sprites.float(), loc.float(), n, index, 1e-4)
    args32 = [t.float() for t in (gll, gcan, x, sprites, loc)]
    args64 = [t.double() for t in args32]  # the same values, evaluated in float64
    bwd = torch.ops.lavae_fast.place_loglik_backward
    for gc in (True, False):
        a32 = list(args32) if gc else [args32[0], None] + args32[2:]
        a64 = list(args64) if gc else [args64[0], None] + args64[2:]
        got = bwd(*a32, n, index, canvas, 1e-4, True, True)
        ref32 = reference._fallback_place_loglik_backward(*a32, n, index, canvas, 1e-4, True, True)
        ref64 = reference._fallback_place_loglik_backward(*a64, n, index, canvas.double(), 1e-4, True, True)
        for name, a, r32, r64 in zip(("grad_sprites", "grad_loc"), got, ref32, ref64):
            assert_matches_reference(name, a, r32, r64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}M{}C{}S{}_{}x{}".format(*s))
@pytest.mark.parametrize("mode", ["index", "dense"])
def test_place_matches_reference_float64(shape, mode):
    x, sprites, loc, n, index = _inputs(shape, mode, seed=3)
    w_ll = torch.randn(shape[0], dtype=torch.float64)
    got = _run(ops.place_and_loglik, x, sprites, loc, n, index, w_ll, None)
    ref = _run(reference.place_and_loglik, x, sprites, loc, n, index, w_ll, None)
    for key in got:
        assert got[key].dtype == torch.float64
        assert_close64(key, got[key], ref[key])


def test_place_training_shape_index_mode():
    # The model's shapes (M = 10, S = 17) on a small canvas, fractional x.
    B, M, C, S, H, W = 2, 10, 1, 17, 20, 18
    x, sprites, n, index = place_case(B, M, C, S, H, W, seed=7, fractional_x=True)
    loc = one_hot_maps(index, H, W, torch.float64)
    w = torch.tensor([1.0, -0.5], dtype=torch.float64)
    got = _run(ops.place_and_loglik, x.float(), sprites.float(), loc.float(), n, index, w.float(), None)
    ref32 = _run(reference.place_and_loglik, x.float(), sprites.float(), loc.float(), n, index, w.float(), None)
    ref64 = _run(reference.place_and_loglik, x, sprites, loc, n, index, w, None)
    for key in got:
        assert_matches_reference(key, got[key], ref32[key], ref64[key], floor=1e-4 if key.startswith("grad") else 1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 1, 3, 9, 9), (2, 3, 3, 9, 7, 5)], ids=["C1", "C3_big_sprite"])
def test_index_mode_gradients_equal_dense_mode_at_one_hot_maps(shape):
    # The index mode never reads loc, so a finite-difference check cannot see its forward; its
    # gradients must be the dense formula's, which is what the dense mode computes.
    B, M, C, S, H, W = shape
    x, sprites, n, index = place_case(B, M, C, S, H, W, seed=11)
    loc = one_hot_maps(index, H, W, torch.float64)
    w = torch.randn(B, dtype=torch.float64)
    by_index = _run(ops.place_and_loglik, x, sprites, loc, n, index, w, None)
    dense = _run(ops.place_and_loglik, x, sprites, loc, n, None, w, None)
    for key in by_index:
        assert_close64(key, by_index[key], dense[key])


def test_place_dense_gradcheck():
    B, M, C, S, H, W = 2, 2, 3, 3, 4, 5
    x, sprites, n, _ = place_case(B, M, C, S, H, W, seed=2, fractional_x=True)
    # Keep Σ away from the kink at 1, where finite differences straddle two branches.
    sprites = sprites * 0.3
    loc = relaxed_maps(B, M, H, W, seed=4)
    inputs = tuple(t.clone().requires_grad_() for t in (x, sprites, loc))
    assert torch.autograd.gradcheck(
        lambda a, s, l: ops.place_and_loglik(a, s, l, n, return_lambda=True), inputs, fast_mode=True
    )


def test_gradient_passes_where_sum_is_exactly_one():
    # λ = ε + (1−2ε)·min(Σ, 1): the gradient passes where Σ ≤ 1 (inclusive) and stops above.
    H, W, S = 7, 5, 3
    sprites = torch.ones(1, 2, 1, S, S, dtype=torch.float64)
    index = torch.tensor([[12, 13]])  # (2,2) and (2,3): the windows overlap in two columns
    loc = one_hot_maps(index, H, W, torch.float64)
    x = torch.ones(1, 1, H, W, dtype=torch.float64)
    for n_val in (1, 2):
        n = torch.tensor([n_val])
        got = _run(ops.place_and_loglik, x, sprites, loc, n, index, torch.ones(1, dtype=torch.float64), None)
        ref = _run(reference.place_and_loglik, x, sprites, loc, n, index, torch.ones(1, dtype=torch.float64), None)
        for key in got:
            assert_close64(key, got[key], ref[key])
        gs = got["grad_sprites"][0, 0, 0]
        if n_val == 1:
            assert (gs != 0).all()  # Σ == 1 exactly under the whole sprite
        else:
            assert (gs[:, 1:] == 0).all() and (gs[:, 0] != 0).all()  # Σ == 2 in the overlap


@pytest.mark.parametrize("mode", ["index", "dense"])
def test_backward_need_flags(mode):
    shape = (2, 3, 3, 5, 7, 5)
    x, sprites, loc, n, index = _inputs(shape, mode)
    ll, canvas = torch.ops.lavae_fast.place_loglik(x, sprites, loc, n, index, 1e-4)
    gll = torch.randn(2, dtype=torch.float64)
    bwd = torch.ops.lavae_fast.place_loglik_backward
    both = bwd(gll, None, x, sprites, loc, n, index, canvas, 1e-4, True, True)
    only_s = bwd(gll, None, x, sprites, loc, n, index, canvas, 1e-4, True, False)
    only_l = bwd(gll, None, x, sprites, loc, n, index, canvas, 1e-4, False, True)
    none = bwd(gll, None, x, sprites, loc, n, index, canvas, 1e-4, False, False)
    assert only_s[1].shape == (0,) and only_l[0].shape == (0,)
    assert none[0].shape == (0,) and none[1].shape == (0,)
    assert torch.equal(only_s[0], both[0]) and torch.equal(only_l[1], both[1])
    assert both[0].shape == sprites.shape and both[1].shape == loc.shape


def test_ops_dispatch_to_the_triton_launchers(monkeypatch):
    calls = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            calls.append(grid)
            return self.kernel[grid]

    for name in ("_place_fwd_index_kernel", "_place_fwd_dense_kernel", "_grad_loc_kernel"):
        monkeypatch.setattr(place_kernels, name, Spy(getattr(place_kernels, name)))
    x, sprites, loc, n, index = _inputs((2, 2, 1, 3, 5, 5), "index")
    sprites.requires_grad_()
    ops.place_and_loglik(x, sprites, loc.requires_grad_(), n, index=index).sum().backward()
    ops.place_and_loglik(x, sprites, loc, n).sum()
    assert len(calls) == 3


def test_opcheck_place_loglik():
    x, sprites, loc, n, index = _inputs((2, 2, 1, 3, 4, 5), "index")
    for idx in (index, None):
        args = (x, sprites.requires_grad_(), loc.requires_grad_(), n, idx, 1e-4)
        torch.library.opcheck(torch.ops.lavae_fast.place_loglik.default, args)


def test_launcher_rejects_bad_shapes(launchers):
    x, sprites, loc, n, index = _inputs((2, 2, 1, 3, 4, 5), "index")
    with pytest.raises(ValueError, match="index"):
        launchers["place_loglik"](x, sprites, loc, n, index[:, :1], 1e-4)
    with pytest.raises(ValueError, match="loc"):
        launchers["place_loglik"](x, sprites, loc[:, :, :3], n, None, 1e-4)
    with pytest.raises(TypeError, match="sprites"):
        launchers["place_loglik"](x, sprites.half(), loc, n, None, 1e-4)
