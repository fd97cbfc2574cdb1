"""count_objects and gather_appearance under the Triton interpreter."""

import pytest
import torch

from lavae_fast import ops, reference
from triton_cases import assert_close64, assert_matches_reference, one_hot_maps, place_case, relaxed_maps

# ------------------------------------------------------------------------------------------------
# count_objects
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(9, 9), (7, 5), (1, 1), (2, 3), (40, 33)], ids=lambda s: "{}x{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_count_matches_reference(hw, dtype):
    H, W = hw
    g = torch.Generator().manual_seed(H * 100 + W)
    h = (torch.randn(4, H, W, generator=g) * 3).to(dtype)
    h[0] = h[0].round()  # plateaus: every tied point of a plateau counts
    h[1] = 0.0  # one flat image
    for threshold in (-100.0, 0.0, 1.5):
        for max_objects in (2, 1000):
            got = ops.count_objects(h, threshold, max_objects)
            want = reference.count_objects(h, threshold, max_objects)
            assert got.dtype == torch.int64
            assert torch.equal(got, want), (threshold, max_objects, got, want)


def test_count_peaks_on_corners_and_borders():
    H, W = 7, 5
    h = torch.zeros(1, 1, H, W, dtype=torch.float64)
    for r, c in [(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1), (3, 0), (0, 2), (3, 2)]:
        h[0, 0, r, c] = 5.0
    assert ops.count_objects(h, 1.0, 10).tolist() == [7]
    assert ops.count_objects(h, 5.0, 10).tolist() == [0]  # strictly above the threshold
    assert ops.count_objects(h, 1.0, 4).tolist() == [4]  # clipped


def test_count_threshold_is_not_rounded_to_float32():
    # A float64 map with a value between a threshold and its float32 rounding.
    thr = 0.1  # float32(0.1) > 0.1
    h = torch.full((1, 3, 3), -1.0, dtype=torch.float64)
    h[0, 1, 1] = 0.1 + 1e-12
    assert ops.count_objects(h, thr, 10).tolist() == [1] == reference.count_objects(h, thr, 10).tolist()


@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (2, 3), (4, 2), (7, 5), (9, 13)], ids=lambda s: "{}x{}".format(*s))
@pytest.mark.parametrize("window", [1, 3, 5, 7])
def test_count_window_matches_reference(hw, window):
    # Canvases smaller than the window included; plateaus, a flat image, a NaN, border peaks.
    H, W = hw
    g = torch.Generator().manual_seed(H * 100 + W + window)
    h = torch.randn(5, H, W, generator=g, dtype=torch.float64) * 3
    h[0] = h[0].round()
    h[1] = 2.0
    h[2, 0, 0], h[2, -1, -1], h[2, 0, -1] = 20.0, 21.0, 20.0
    h[3, (H - 1) // 2, (W - 1) // 2] = float("nan")
    h[4, 0, :] = 19.0
    for dtype in (torch.float64, torch.float32):
        for threshold, max_objects in [(0.5, 1000), (0.5, 2), (-100.0, 3)]:
            got = ops.count_objects(h.to(dtype), threshold, max_objects, window)
            want = reference.count_objects(h.to(dtype), threshold, max_objects, window)
            assert torch.equal(got, want), (dtype, threshold, max_objects, got, want)
    assert ops.count_objects(torch.zeros(0, H, W), 0.0, 5, window).shape == (0,)


def test_count_window_reaches_the_kernel(launchers):
    # Two peaks 2 px apart: two 3×3 maxima, one 5×5 maximum.
    h = torch.zeros(1, 7, 9, dtype=torch.float64)
    h[0, 3, 3], h[0, 3, 5] = 5.0, 6.0
    assert [launchers["count_objects"](h, 1.0, 10, w).item() for w in (1, 3, 5, 7)] == [2, 2, 1, 1]
    assert launchers["count_objects"](h, 1.0, 10).tolist() == [2]
    assert torch.ops.lavae_fast.count_objects(h, 1.0, 10, 5).tolist() == [1]
    assert ops.count_objects(h, 1.0, 10, window=5).tolist() == [1]
    for bad in (0, 2, 4, -1):
        with pytest.raises(ValueError, match="window"):
            launchers["count_objects"](h, 1.0, 10, bad)


# ------------------------------------------------------------------------------------------------
# gather_appearance
# ------------------------------------------------------------------------------------------------

# (B, K, H, W, M): K = 2L = 64 as in the model, odd canvases, a 1×2 canvas with more slots than pixels.
GATHER_SHAPES = [(3, 8, 9, 9, 4), (3, 64, 7, 5, 10), (2, 5, 1, 2, 3), (2, 70, 5, 6, 3)]


def _gather_inputs(shape, mode, dtype=torch.float64, seed=0):
    B, K, H, W, M = shape
    x, _, n, index = place_case(B, M, 1, 1, H, W, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    h_app = torch.randn(B, K, H, W, generator=g, dtype=dtype)
    if mode == "index":
        return h_app, one_hot_maps(index, H, W, dtype), n, index
    return h_app, relaxed_maps(B, M, H, W, seed=seed + 2, dtype=dtype), n, None


def _run_gather(fn, h_app, loc, n, index, w):
    h_app = h_app.clone().requires_grad_()
    loc = loc.clone().requires_grad_()
    out = fn(h_app, loc, n, index=index)
    gh, gl = torch.autograd.grad((w * out).sum(), (h_app, loc))
    return {"out": out.detach(), "grad_h_app": gh, "grad_loc": gl}


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "B{}K{}_{}x{}_M{}".format(*s))
@pytest.mark.parametrize("mode", ["index", "dense"])
def test_gather_matches_reference(shape, mode):
    h_app, loc, n, index = _gather_inputs(shape, mode)
    B, K, H, W, M = shape
    w = torch.randn(B, M, K, dtype=torch.float64)
    got = _run_gather(ops.gather_appearance, h_app, loc, n, index, w)
    ref = _run_gather(reference.gather_appearance, h_app, loc, n, index, w)
    for key in got:
        assert_close64(key, got[key], ref[key])
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    got32 = _run_gather(ops.gather_appearance, f32(h_app), f32(loc), n, index, f32(w))
    ref32 = _run_gather(reference.gather_appearance, f32(h_app), f32(loc), n, index, f32(w))
    for key in got32:
        assert got32[key].dtype == torch.float32
        assert_matches_reference(key, got32[key], ref32[key], ref[key])
    absent = torch.arange(M)[None, :] >= n[:, None]
    if absent.any():
        assert (got["out"][absent] == 0).all() and (got["grad_loc"][absent] == 0).all()


def test_gather_index_mode_gradients_equal_dense_mode():
    h_app, loc, n, index = _gather_inputs((3, 16, 7, 5, 4), "index", seed=3)
    w = torch.randn(3, 4, 16, dtype=torch.float64)
    by_index = _run_gather(ops.gather_appearance, h_app, loc, n, index, w)
    dense = _run_gather(ops.gather_appearance, h_app, loc, n, None, w)
    for key in by_index:
        assert_close64(key, by_index[key], dense[key])


def test_gather_repeated_index_adds_up():
    # Not produced by draws without replacement, but the scatter must still add, as the reference.
    h_app = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    index = torch.tensor([[4, 4, 0]])
    loc = one_hot_maps(index, 3, 3, torch.float64)
    n = torch.tensor([3])
    w = torch.randn(1, 3, 4, dtype=torch.float64)
    got = _run_gather(ops.gather_appearance, h_app, loc, n, index, w)
    ref = _run_gather(reference.gather_appearance, h_app, loc, n, index, w)
    for key in got:
        assert_close64(key, got[key], ref[key])


def test_gather_gradcheck_dense():
    h_app, loc, n, _ = _gather_inputs((2, 5, 3, 4, 3), "dense", seed=4)
    assert torch.autograd.gradcheck(
        lambda h, l: ops.gather_appearance(h, l, n), (h_app.requires_grad_(), loc.requires_grad_()), fast_mode=True
    )


@pytest.mark.parametrize("mode", ["index", "dense"])
def test_gather_backward_need_flags(mode):
    h_app, loc, n, index = _gather_inputs((2, 8, 5, 5, 3), mode)
    grad = torch.randn(2, 3, 8, dtype=torch.float64)
    bwd = torch.ops.lavae_fast.gather_appearance_backward
    both = bwd(grad, h_app, loc, n, index, True, True)
    only_h = bwd(grad, h_app, loc, n, index, True, False)
    only_l = bwd(grad, h_app, loc, n, index, False, True)
    none = bwd(grad, h_app, loc, n, index, False, False)
    assert only_h[1].shape == (0,) and only_l[0].shape == (0,) and none[0].shape == none[1].shape == (0,)
    assert torch.equal(only_h[0], both[0]) and torch.equal(only_l[1], both[1])


@pytest.mark.parametrize("mode", ["index", "dense"])
def test_gather_gradient_to_a_channels_last_h_app_is_channels_last(mode):
    # The launcher writes the gradient contiguous; lavae_fast.ops gives it h_app's layout (the op's
    # contract, as the reference and the C++ kernels do), for the model's channels-last path.
    h_app, loc, n, index = _gather_inputs((2, 8, 5, 5, 3), mode)
    h_cl = h_app.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, 8, dtype=torch.float64)
    got, _ = torch.ops.lavae_fast.gather_appearance_backward(grad, h_cl, loc, n, index, True, False)
    want, _ = reference._fallback_gather_appearance_backward(grad, h_cl, loc, n, index, True, False)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert_close64("grad_h_app", got, want)


def test_opcheck_count_and_gather():
    h_app, loc, n, index = _gather_inputs((2, 6, 4, 5, 3), "index")
    for idx in (index, None):
        torch.library.opcheck(
            torch.ops.lavae_fast.gather_appearance.default, (h_app.requires_grad_(), loc.requires_grad_(), n, idx)
        )
    torch.library.opcheck(torch.ops.lavae_fast.count_objects.default, (torch.randn(2, 4, 5), 0.5, 3))
    torch.library.opcheck(torch.ops.lavae_fast.count_objects.default, (torch.randn(2, 4, 5), 0.5, 3, 5))


def test_launchers_reject_bad_inputs(launchers):
    h_app, loc, n, index = _gather_inputs((2, 6, 4, 5, 3), "index")
    with pytest.raises(ValueError, match="loc"):
        launchers["gather_appearance"](h_app, loc[:, :, :2], n, None)
    with pytest.raises(ValueError, match="index"):
        launchers["gather_appearance"](h_app, loc, n, index[:1])
    with pytest.raises(ValueError, match="h_loc"):
        launchers["count_objects"](torch.randn(2, 2, 4, 5), 0.0, 3)
    with pytest.raises(TypeError, match="h_loc"):
        launchers["count_objects"](torch.zeros(2, 4, 5, dtype=torch.int32), 0.0, 3)
