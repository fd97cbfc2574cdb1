"""gumbel_topk_relaxed under the Triton interpreter: draws, relaxed samples, log_q and gradients."""

import math

import pytest
import torch

from lavae_fast import _backends, ops, reference
from triton_cases import assert_close64, assert_matches_reference, gumbel_case

gumbel_kernels = _backends.kernels_package().gumbel
# (B, D, M, tau, scale, gap): D = 81 (9×9), 35 (7×5), D < M (a 2×2 canvas with 6 slots),
# and τ = 0.02 with γ-scaled logits and gaps of 25.
CASES = [
    (3, 81, 4, 0.5, 1.0, 0.0),
    (3, 35, 10, 0.3, 4.0, 0.0),
    (2, 4, 6, 0.5, 1.0, 0.0),
    (3, 64, 10, 0.02, 4.16, 25.0),
    (2, 45, 3, 0.02, 8.0, 40.0),
]


def _run(fn, logits, gumbel, n, tau, M, w_rel, w_lq):
    logits = logits.clone().requires_grad_()
    index, relaxed, log_q = fn(logits, n, tau, M, gumbel)
    loss = (w_rel * relaxed).sum() + (w_lq * log_q).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    return index, {"relaxed": relaxed.detach(), "log_q": log_q.detach(), "grad_logits": grad}


def _weights(B, M, D, dtype):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, M, D, generator=g, dtype=dtype), torch.randn(B, generator=g, dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}D{}M{}tau{}".format(*c[:4]))
def test_gumbel_matches_reference_float32(case):
    B, D, M, tau, scale, gap = case
    logits, gumbel, n = gumbel_case(B, D, M, scale=scale, gap=gap)
    w_rel, w_lq = _weights(B, M, D, torch.float64)
    idx, got = _run(ops.gumbel_topk_relaxed, logits.float(), gumbel.float(), n, tau, M, w_rel.float(), w_lq.float())
    idx32, ref32 = _run(reference.gumbel_topk_relaxed, logits.float(), gumbel.float(), n, tau, M, w_rel.float(), w_lq.float())
    idx64, ref64 = _run(reference.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq)
    assert torch.equal(idx, idx64) and torch.equal(idx32, idx64)
    for key in got:
        assert got[key].dtype == torch.float32
        assert torch.isfinite(got[key]).all(), key
        assert_matches_reference(key, got[key], ref32[key], ref64[key])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}D{}M{}tau{}".format(*c[:4]))
def test_gumbel_matches_reference_float64(case):
    B, D, M, tau, scale, gap = case
    logits, gumbel, n = gumbel_case(B, D, M, scale=scale, gap=gap, seed=1)
    w_rel, w_lq = _weights(B, M, D, torch.float64)
    idx, got = _run(ops.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq)
    idx_ref, ref = _run(reference.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq)
    assert torch.equal(idx, idx_ref)
    for key in got:
        assert_close64(key, got[key], ref[key], rtol=1e-9)


def test_draw_structure():
    # index = the top-n of logits + g in order, −1 after; relaxed rows are distributions over the
    # locations not drawn before, zero rows for absent slots; log_q is an exact log-probability.
    B, D, M, tau = 3, 35, 5, 0.1
    logits, gumbel, n = gumbel_case(B, D, M, scale=2.0, seed=4)
    index, relaxed, log_q = ops.gumbel_topk_relaxed(logits, n, tau, M, gumbel)
    y = logits + gumbel
    for b in range(B):
        k = int(n[b])
        assert torch.equal(index[b, :k], y[b].topk(k).indices)
        assert (index[b, k:] == -1).all()
        assert (relaxed[b, k:] == 0).all()
        expected = 0.0
        remaining = torch.ones(D, dtype=torch.bool)
        for i in range(k):
            row = relaxed[b, i]
            assert math.isclose(float(row.sum()), 1.0, rel_tol=1e-12)
            assert (row[~remaining] == 0).all()
            expected += float(torch.log_softmax(logits[b].masked_fill(~remaining, -math.inf), 0)[index[b, i]])
            remaining[index[b, i]] = False
        assert math.isclose(float(log_q[b]), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_stable_at_low_temperature_with_large_gaps():
    # τ = 0.02 and gaps of 30 between γ-scaled logits: y/τ spans 1500+. A "full sum minus earlier
    # draws" normaliser would cancel to 0 or below here; each step's own maximum keeps it exact.
    B, D, M, tau = 2, 64, 8, 0.02
    logits = torch.zeros(B, D, dtype=torch.float64)
    logits[:, :M] = 30.0 * torch.arange(M, 0, -1, dtype=torch.float64)  # 240, 210, ..., 30
    gumbel = torch.zeros(B, D, dtype=torch.float64)
    n = torch.tensor([M, 3])
    for dtype in (torch.float32, torch.float64):
        index, relaxed, log_q = ops.gumbel_topk_relaxed(logits.to(dtype), n, tau, M, gumbel.to(dtype))
        assert torch.isfinite(relaxed).all() and torch.isfinite(log_q).all()
        assert torch.equal(index[0], torch.arange(M))
        # Each step puts (almost) all its mass on the next peak, never on an earlier one.
        for i in range(M):
            assert relaxed[0, i, i] > 1 - 1e-6
            assert (relaxed[0, i, :i] == 0).all()
        # log b^(i) of the largest remaining logit, 30 above the next: ≈ −(D−M+...)·e^−30 ≈ 0.
        assert abs(float(log_q[0])) < 1e-9
        idx_ref, rel_ref, lq_ref = reference.gumbel_topk_relaxed(logits, n, tau, M, gumbel)
        assert torch.allclose(relaxed.double(), rel_ref, atol=1e-6)
        assert torch.allclose(log_q.double(), lq_ref, atol=1e-6)


def test_gradcheck_float64():
    B, D, M, tau = 2, 12, 3, 0.5
    logits, gumbel, n = gumbel_case(B, D, M, seed=5)
    n = torch.tensor([3, 2])

    def f(lg):
        _, relaxed, log_q = ops.gumbel_topk_relaxed(lg, n, tau, M, gumbel)
        return relaxed, log_q

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(),), fast_mode=True)


def test_backward_with_one_incoming_gradient():
    B, D, M, tau = 2, 20, 4, 0.3
    logits, gumbel, n = gumbel_case(B, D, M, seed=6)
    relaxed, log_q, index = torch.ops.lavae_fast.gumbel_topk_relaxed(logits, n, tau, M, gumbel)
    w_rel, w_lq = _weights(B, M, D, torch.float64)
    bwd = torch.ops.lavae_fast.gumbel_topk_relaxed_backward
    ref = reference._fallback_gumbel_topk_relaxed_backward
    for gr, gq in ((w_rel, None), (None, w_lq), (w_rel, w_lq), (None, None)):
        got = bwd(gr, gq, logits, index, relaxed, n, tau)
        want = ref(gr, gq, logits, index, relaxed, n, tau)
        assert_close64("grad", got, want)
    assert (bwd(None, None, logits, index, relaxed, n, tau) == 0).all()


def test_large_canvas_uses_the_reference(monkeypatch):
    # Rows longer than one program's registers go to the reference implementation.
    monkeypatch.setattr(gumbel_kernels, "MAX_D", 16)
    B, D, M, tau = 2, 30, 3, 0.5
    logits, gumbel, n = gumbel_case(B, D, M, seed=7)
    w_rel, w_lq = _weights(B, M, D, torch.float64)
    idx, got = _run(ops.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq)
    idx_ref, ref = _run(reference.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq)
    assert torch.equal(idx, idx_ref)
    for key in got:
        assert_close64(key, got[key], ref[key])


def test_opcheck_gumbel_topk_relaxed():
    logits, gumbel, n = gumbel_case(2, 15, 4, seed=8)
    torch.library.opcheck(
        torch.ops.lavae_fast.gumbel_topk_relaxed.default, (logits.requires_grad_(), n, 0.4, 4, gumbel)
    )


def test_launcher_rejects_bad_inputs(launchers):
    logits, gumbel, n = gumbel_case(2, 15, 4, seed=8)
    with pytest.raises(ValueError, match="gumbel"):
        launchers["gumbel_topk_relaxed"](logits, n, 0.4, 4, gumbel[:, :3])
    with pytest.raises(ValueError, match="tau"):
        launchers["gumbel_topk_relaxed"](logits, n, 0.0, 4, gumbel)
    with pytest.raises(TypeError, match="n"):
        launchers["gumbel_topk_relaxed"](logits, n.int(), 0.4, 4, gumbel)


# ---------------------------------------------------------------------------------------------
# The exclusion window (SPEC §2, §9.2 item 2): step i's candidates are the pixels outside the
# window × window neighbourhoods (clipped to the canvas) of the earlier draws.
# ---------------------------------------------------------------------------------------------

# (B, H, W, M, window, tau, scale, gap, corners), each with H·W > (M − 1)·window²; image 0 draws
# n = M, image 1 n = 0. `corners`: image 0's largest logits sit on the four corners and two border
# midpoints, so that its windows are clipped by the canvas. The last two: τ = 0.02 with γ-scaled
# logits and peaks 25 / 40 above the rest. Window 1 with a canvas: the paper's op.
WINDOW_CASES = [
    (3, 4, 5, 3, 3, 0.5, 1.0, 0.0, False),
    (3, 6, 6, 2, 5, 0.3, 2.0, 0.0, False),
    (3, 7, 9, 4, 3, 0.5, 4.0, 0.0, False),
    (3, 9, 8, 5, 3, 0.3, 2.0, 0.0, True),
    (3, 9, 8, 3, 5, 0.5, 1.0, 0.0, True),
    (3, 4, 5, 3, 1, 0.5, 1.0, 0.0, True),
    (3, 8, 8, 4, 3, 0.02, 4.16, 25.0, False),
    (2, 9, 9, 3, 5, 0.02, 8.0, 40.0, True),
]


def _window_id(c):
    return "B{}_{}x{}M{}w{}tau{}".format(*c[:6]) + ("_corners" if c[8] else "")


def window_case(B, H, W, M, *, scale=1.0, gap=0.0, corners=False, dtype=torch.float64, seed=0):
    logits, gumbel, n = gumbel_case(B, H * W, M, scale=scale, gap=gap, dtype=dtype, seed=seed)
    if corners:
        D = H * W
        edge = [0, W - 1, (H - 1) * W, D - 1, (H // 2) * W, (H - 1) * W + W // 2]
        # Decreasing, well above everything else (gaps included): image 0 draws them in this order
        # where the windows allow.
        boost = logits[0].abs().max() + gap + 10.0 * scale
        for r, p in enumerate(edge):
            logits[0, p] = boost + (len(edge) - r) * 2.0 * scale
    return logits, gumbel, n


def _run_w(fn, logits, gumbel, n, tau, M, w_rel, w_lq, window, canvas):
    return _run(lambda *a: fn(*a, window=window, canvas=canvas), logits, gumbel, n, tau, M, w_rel, w_lq)


@pytest.mark.parametrize("case", WINDOW_CASES, ids=_window_id)
def test_window_matches_reference_float32(case):
    B, H, W, M, window, tau, scale, gap, corners = case
    D = H * W
    logits, gumbel, n = window_case(B, H, W, M, scale=scale, gap=gap, corners=corners)
    w_rel, w_lq = _weights(B, M, D, torch.float64)
    args = (n, tau, M)
    idx, got = _run_w(ops.gumbel_topk_relaxed, logits.float(), gumbel.float(), *args, w_rel.float(), w_lq.float(),
                      window, (H, W))
    idx32, ref32 = _run_w(reference.gumbel_topk_relaxed, logits.float(), gumbel.float(), *args, w_rel.float(),
                          w_lq.float(), window, (H, W))
    idx64, ref64 = _run_w(reference.gumbel_topk_relaxed, logits, gumbel, *args, w_rel, w_lq, window, (H, W))
    assert torch.equal(idx, idx64) and torch.equal(idx32, idx64)
    assert (idx[0] >= 0).all() and (idx[1] == -1).all()  # n = M and n = 0 in the same batch
    for key in got:
        assert got[key].dtype == torch.float32
        assert torch.isfinite(got[key]).all(), key
        assert_matches_reference(key, got[key], ref32[key], ref64[key])


@pytest.mark.parametrize("case", WINDOW_CASES, ids=_window_id)
def test_window_matches_reference_float64(case):
    B, H, W, M, window, tau, scale, gap, corners = case
    D = H * W
    logits, gumbel, n = window_case(B, H, W, M, scale=scale, gap=gap, corners=corners, seed=1)
    w_rel, w_lq = _weights(B, M, D, torch.float64)
    idx, got = _run_w(ops.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq, window, (H, W))
    idx_ref, ref = _run_w(reference.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq, window, (H, W))
    assert torch.equal(idx, idx_ref)
    for key in got:
        assert_close64(key, got[key], ref[key], rtol=1e-9)


def test_window_draws_at_corners_and_borders():
    # 9×8 canvas, 3×3 window: the corners and border midpoints carry the largest logits, so the
    # draws land there with windows clipped by the canvas; every draw lies outside the earlier
    # windows, every relaxed row is a distribution that is zero on them, and log_q is the exact
    # log-probability of the draws under eq. 11 with the windows' candidate sets.
    H, W, M, window, tau = 9, 8, 5, 3, 0.3
    D, h = H * W, window // 2
    logits, gumbel, n = window_case(3, H, W, M, scale=2.0, corners=True, seed=4)
    index, relaxed, log_q = ops.gumbel_topk_relaxed(logits, n, tau, M, gumbel, window=window, canvas=(H, W))
    assert index[0].tolist() == [0, W - 1, (H - 1) * W, D - 1, (H // 2) * W]
    rows, cols = torch.arange(D) // W, torch.arange(D) % W
    y = logits + gumbel
    for b in range(3):
        k = int(n[b])
        assert (index[b, k:] == -1).all() and (relaxed[b, k:] == 0).all()
        allowed = torch.ones(D, dtype=torch.bool)
        expected = 0.0
        for i in range(k):
            p = int(index[b, i])
            assert allowed[p] and float(y[b, p]) == float(y[b][allowed].max())
            row = relaxed[b, i]
            assert math.isclose(float(row.sum()), 1.0, rel_tol=1e-12)
            assert (row[~allowed] == 0).all() and (row[allowed] > 0).all()
            expected += float(torch.log_softmax(logits[b].masked_fill(~allowed, -math.inf), 0)[p])
            allowed &= ~(((rows - p // W).abs() <= h) & ((cols - p % W).abs() <= h))
        assert math.isclose(float(log_q[b]), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_window_stable_when_the_window_holds_almost_all_the_mass():
    # SPEC §9.2 item 2: τ = 0.02, and the first draw's 3×3 window holds all but e^−30 of the
    # logits' mass (image 0; image 1: all but e^−115, beyond float32's exp range) and all but
    # e^−1500 of y/τ's. The later steps' normalisers are sums over what is left; "full sum minus
    # the window" would cancel to noise (or below 0) in float32, and a reference maximum taken
    # over more than the step's candidates would underflow. float32 against the float64
    # reference, values and gradients.
    H, W, M, window, tau = 8, 8, 3, 3, 0.02
    D = H * W
    g = torch.Generator().manual_seed(9)
    logits = 0.5 * torch.randn(2, D, generator=g, dtype=torch.float64)
    for b, (r, c), peak in ((0, (3, 3), 32.0), (1, (0, 7), 120.0)):  # an inner window, a clipped corner one
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if 0 <= r + dr < H and 0 <= c + dc < W:
                    logits[b, (r + dr) * W + c + dc] = peak
        logits[b, r * W + c] = peak + 0.5
    u = torch.rand(2, D, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    gumbel = -0.05 * torch.log(-torch.log(u))
    n = torch.tensor([M, M])
    w_rel, w_lq = _weights(2, M, D, torch.float64)
    idx, got = _run_w(ops.gumbel_topk_relaxed, logits.float(), gumbel.float(), n, tau, M, w_rel.float(),
                      w_lq.float(), window, (H, W))
    idx32, ref32 = _run_w(reference.gumbel_topk_relaxed, logits.float(), gumbel.float(), n, tau, M, w_rel.float(),
                          w_lq.float(), window, (H, W))
    idx64, ref64 = _run_w(reference.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq, window, (H, W))
    assert torch.equal(idx, idx64) and idx[0, 0] == 3 * W + 3 and idx[1, 0] == 7
    for key in got:
        assert torch.isfinite(got[key]).all(), key
        assert_matches_reference(key, got[key], ref32[key], ref64[key])
    rel = got["relaxed"].double()
    assert torch.allclose(rel.sum(-1), torch.ones(2, M, dtype=torch.float64), atol=1e-5)
    # log_q to float32 precision of its own size (the later steps' terms are O(1) numbers).
    for b in range(2):
        assert abs(float(got["log_q"][b]) - float(ref64["log_q"][b])) < 1e-5 * max(1.0, abs(float(ref64["log_q"][b])))


def test_window_one_with_a_canvas_is_window_one(launchers):
    # The canvas only matters for a window > 1: window 1 with it is the paper's op, bit for bit.
    H, W, M, tau = 5, 7, 4, 0.3
    fwd, bwd = launchers["gumbel_topk_relaxed"], launchers["gumbel_topk_relaxed_backward"]
    for dtype in (torch.float32, torch.float64):
        logits, gumbel, n = gumbel_case(3, H * W, M, dtype=dtype, seed=10)
        plain = fwd(logits, n, tau, M, gumbel)
        for out in (fwd(logits, n, tau, M, gumbel, 1, [H, W]),
                    torch.ops.lavae_fast.gumbel_topk_relaxed(logits, n, tau, M, gumbel, 1, [H, W])):
            assert all(torch.equal(a, b) for a, b in zip(plain, out))
        relaxed, _, index = plain
        w_rel, w_lq = _weights(3, M, H * W, dtype)
        want = bwd(w_rel, w_lq, logits, index, relaxed, n, tau)
        assert torch.equal(bwd(w_rel, w_lq, logits, index, relaxed, n, tau, 1, [H, W]), want)
        assert torch.equal(torch.ops.lavae_fast.gumbel_topk_relaxed_backward(
            w_rel, w_lq, logits, index, relaxed, n, tau, 1, [H, W]), want)
        idx, r, lq = ops.gumbel_topk_relaxed(logits, n, tau, M, gumbel, window=1, canvas=(H, W))
        assert torch.equal(idx, index) and torch.equal(r, relaxed) and torch.equal(lq, plain[1])


def test_window_backward_with_one_incoming_gradient():
    H, W, M, window, tau = 6, 6, 2, 5, 0.3
    D = H * W
    logits, gumbel, n = window_case(2, H, W, M, seed=6)
    n = torch.tensor([M, 1])
    relaxed, log_q, index = torch.ops.lavae_fast.gumbel_topk_relaxed(logits, n, tau, M, gumbel, window, [H, W])
    w_rel, w_lq = _weights(2, M, D, torch.float64)
    bwd = torch.ops.lavae_fast.gumbel_topk_relaxed_backward
    ref = reference._fallback_gumbel_topk_relaxed_backward
    for gr, gq in ((w_rel, None), (None, w_lq), (w_rel, w_lq), (None, None)):
        got = bwd(gr, gq, logits, index, relaxed, n, tau, window, [H, W])
        want = ref(gr, gq, logits, index, relaxed, n, tau, window, [H, W])
        assert_close64("grad", got, want)
    assert (bwd(None, None, logits, index, relaxed, n, tau, window, [H, W]) == 0).all()


def test_window_gradcheck_float64():
    H, W, M, window, tau = 4, 5, 3, 3, 0.5
    logits, gumbel, n = window_case(2, H, W, M, seed=5)
    n = torch.tensor([3, 2])

    def f(lg):
        _, relaxed, log_q = ops.gumbel_topk_relaxed(lg, n, tau, M, gumbel, window=window, canvas=(H, W))
        return relaxed, log_q

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(),), fast_mode=True)


def test_window_large_canvas_uses_the_reference(monkeypatch):
    monkeypatch.setattr(gumbel_kernels, "MAX_D", 16)
    H, W, M, window, tau = 5, 6, 3, 3, 0.5
    logits, gumbel, n = window_case(2, H, W, M, seed=7)
    w_rel, w_lq = _weights(2, M, H * W, torch.float64)
    idx, got = _run_w(ops.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq, window, (H, W))
    idx_ref, ref = _run_w(reference.gumbel_topk_relaxed, logits, gumbel, n, tau, M, w_rel, w_lq, window, (H, W))
    assert torch.equal(idx, idx_ref)
    for key in got:
        assert_close64(key, got[key], ref[key])


def test_opcheck_gumbel_topk_relaxed_window():
    logits, gumbel, n = window_case(2, 4, 5, 3, seed=8)
    torch.library.opcheck(
        torch.ops.lavae_fast.gumbel_topk_relaxed.default, (logits.requires_grad_(), n, 0.4, 3, gumbel, 3, [4, 5])
    )


def test_launcher_rejects_bad_window_or_canvas(launchers):
    fwd, bwd = launchers["gumbel_topk_relaxed"], launchers["gumbel_topk_relaxed_backward"]
    H, W, M = 4, 5, 3
    logits, gumbel, n = window_case(2, H, W, M, seed=8)
    relaxed, _, index = fwd(logits, n, 0.4, M, gumbel, 3, [H, W])
    for window in (0, 2, -1, True, 3.0):
        with pytest.raises(ValueError, match="window"):
            fwd(logits, n, 0.4, M, gumbel, window, [H, W])
        with pytest.raises(ValueError, match="window"):
            bwd(relaxed, None, logits, index, relaxed, n, 0.4, window, [H, W])
    for canvas in (None, [H * W], [H, W + 1], [H * W, 1, 1], [0, 0]):
        with pytest.raises(ValueError, match="canvas"):
            fwd(logits, n, 0.4, M, gumbel, 3, canvas)
        with pytest.raises(ValueError, match="canvas"):
            bwd(relaxed, None, logits, index, relaxed, n, 0.4, 3, canvas)
    with pytest.raises(ValueError, match="window"):  # 20 pixels, (M − 1)·25 = 50: too large
        fwd(logits, n, 0.4, M, gumbel, 5, [H, W])


def test_window_ties_draw_the_lowest_index_first():
    # Equal values of logits + g: each step draws the lowest flat index outside the earlier
    # windows, as the reference's argmax does (and topk's order at window 1).
    H, W, M, window = 6, 7, 3, 3
    logits = torch.zeros(2, H * W, dtype=torch.float64)
    logits[1, 20:] = 1.0  # image 1: ties among pixels 20.. (20 = row 2, col 6: a clipped window)
    gumbel = torch.zeros_like(logits)
    n = torch.tensor([M, M])
    index, _, _ = ops.gumbel_topk_relaxed(logits, n, 0.5, M, gumbel, window=window, canvas=(H, W))
    idx_ref, _, _ = reference.gumbel_topk_relaxed(logits, n, 0.5, M, gumbel, window=window, canvas=(H, W))
    assert torch.equal(index, idx_ref)
    assert index[0].tolist() == [0, 2, 4] and index[1].tolist() == [20, 21, 23]
