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
