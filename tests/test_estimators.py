"""Tests of bench/estimators.py: the exact expectation by enumeration, the per-sample surrogates
(finite differences with the Gumbel noise frozen), and the relaxed estimator's convergence."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # the bench package (lavae_fast itself is the one pytest already imported)

from bench import estimators as E  # noqa: E402
from lavae_fast import ops  # noqa: E402


def _double(case: E.Case) -> E.Case:
    return E.Case(case.name, case.x.double(), case.sprites.double(), case.h.double(), case.note)


# ---------------------------------------------------------------------------------------------
# An explicit, op-free statement of the surrogates (SPEC §1, §3), for finite differences
# ---------------------------------------------------------------------------------------------


def _canvas(sprites, maps):
    """Σ_i Σ_d maps[i,d]·(sprite_i centred at d), by explicit shifts: sprites [n,S,S], maps
    [n,H,W] -> [H,W]."""
    n, S, _ = sprites.shape
    H, W = maps.shape[-2:]
    s = S // 2
    out = maps.new_zeros(H + 2 * s, W + 2 * s)
    for i in range(n):
        for u in range(S):
            for v in range(S):
                out[u:u + H, v:v + W] = out[u:u + H, v:v + W] + sprites[i, u, v] * maps[i]
    return out[s:s + H, s:s + W]


def _loglik(x, canvas, eps):
    lam = eps + (1 - 2 * eps) * canvas.clamp(max=1)
    return (x * lam.log() + (1 - x) * (1 - lam).log()).sum()


def _relaxed_samples(h, g, index, tau):
    """r_i = softmax((h+g)/τ) over the locations not among the hard draws before step i."""
    rows, drawn = [], torch.zeros_like(h, dtype=torch.bool)
    for i in range(index.shape[0]):
        rows.append(torch.softmax(((h + g) / tau).masked_fill(drawn, float("-inf")), 0))
        drawn = drawn | F.one_hot(index[i], h.shape[0]).bool()
    return torch.stack(rows)


def _explicit_surrogate(case, h, g, index, tau, mode, eps, h0):
    """The function whose gradient at h0 each estimator claims to be: for ``relaxed`` the
    log-likelihood of the relaxed placement; for ``straight_through`` the hard placement's
    log-likelihood linearised through the relaxed sample, LL(hard + dense(r(h)) − dense(r(h0)))."""
    H, W = case.H, case.W
    sprites = case.sprites[0, :, 0]
    x = case.x[0, 0]
    r = _relaxed_samples(h, g, index, tau).view(-1, H, W)
    if mode == "relaxed":
        return _loglik(x, _canvas(sprites, r), eps)
    hard = F.one_hot(index, case.D).to(h.dtype).view(-1, H, W)
    r0 = _relaxed_samples(h0, g, index, tau).view(-1, H, W)
    return _loglik(x, _canvas(sprites, hard) + _canvas(sprites, r) - _canvas(sprites, r0), eps)


@pytest.mark.parametrize("name", ["one", "two"])
@pytest.mark.parametrize("mode", E.MODES)
@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_surrogate_gradient_matches_finite_differences_with_the_noise_frozen(name, mode, tau):
    """Each draw's gradient from the ops (what training uses) against central differences of the
    explicit surrogate, along random directions, float64. A lost 1/τ, a flipped sign or a sprite
    placed by the wrong slot's sample changes the directional derivative."""
    case = _double(E.make_case(name))
    eps, delta, K = 1e-2, 1e-5, 3
    g = E.draw_gumbel(K, case.D, seed=3).double()
    G = E.per_draw_gradients(case, g, tau, mode, eps)
    n = torch.full((K,), case.n, dtype=torch.long)
    index, _, _ = ops.gumbel_topk_relaxed(case.h[None].expand(K, -1).contiguous(), n, tau, case.n, g)
    gen = torch.Generator().manual_seed(1)
    for k in range(K):
        # the value: the hard placement's log-likelihood (ST) or the relaxed one, as the ops compute it
        value = E.surrogate(case.h[None].clone(), case, g[k:k + 1], tau, mode, eps).item()
        explicit = _explicit_surrogate(case, case.h, g[k], index[k], tau, mode, eps, case.h).item()
        assert value == pytest.approx(explicit, rel=1e-9, abs=1e-9)
        for _ in range(3):
            v = torch.randn(case.D, generator=gen, dtype=torch.float64)
            f = [_explicit_surrogate(case, case.h + s * delta * v, g[k], index[k], tau, mode, eps, case.h).item()
                 for s in (1, -1)]
            fd = (f[0] - f[1]) / (2 * delta)
            ad = (G[k] @ v).item()
            assert ad == pytest.approx(fd, rel=1e-5, abs=1e-6 * (1 + G[k].abs().max().item())), (k, ad, fd)


def test_exact_expectation_matches_hard_draws_and_its_gradient_the_score_function():
    """The enumeration is E over ordered draws without replacement: its value matches the mean
    log-likelihood of hard Gumbel-top-2 draws, and its autograd gradient matches an independent
    estimator, the score function E[(LL − mean) ∂log q], within Monte Carlo error."""
    case = E.make_case("two")
    eps, K = 1e-2, 20000
    table = E.placement_loglik(case, eps)
    g = E.draw_gumbel(K, case.D, seed=7)
    h_rows = case.h[None].expand(K, -1).clone().requires_grad_(True)
    n = torch.full((K,), 2, dtype=torch.long)
    index, _, log_q = ops.gumbel_topk_relaxed(h_rows, n, 0.5, 2, g)
    ll = table[index[:, 0], index[:, 1]]
    exact = E.exact_expectation(case.h, table).item()
    assert abs(ll.mean().item() - exact) < 4 * ll.std().item() / K ** 0.5
    # the check has the power to tell: with replacement (b₂ = b) the value is 4.6 standard errors off
    b = torch.softmax(case.h.double(), 0)
    with_replacement = (b[:, None] * b[None, :] * table).sum().item()
    assert abs(with_replacement - exact) > 4 * ll.std().item() / K ** 0.5
    (score,) = torch.autograd.grad(log_q.sum(), h_rows)
    sf = (ll - ll.mean())[:, None] * score.double()
    stats = E.compare(sf, E.exact_gradient(case, eps))
    assert stats["relerr"] < 3 * stats["mc"] + 0.01, stats
    assert stats["cos"] > 0.99, stats


def test_relaxed_mean_approaches_the_exact_gradient_as_tau_falls():
    """One object: the relaxed objective E_g[LL(r_τ)] tends to the exact expectation as τ → 0, and
    so does the mean of its gradient (its spread grows like 1/τ, hence many draws)."""
    case = E.make_case("one")
    eps, K = 1e-2, 20000
    exact = E.exact_gradient(case, eps)
    g = E.draw_gumbel(K, case.D, seed=11)
    err = {tau: E.compare(E.per_draw_gradients(case, g, tau, "relaxed", eps), exact) for tau in (0.5, 0.2, 0.1)}
    assert err[0.5]["relerr"] > 0.15 and err[0.5]["relerr"] > 5 * err[0.5]["mc"], err[0.5]  # a bias at τ = 0.5
    assert err[0.2]["relerr"] < err[0.5]["relerr"]
    assert err[0.1]["relerr"] < 0.5 * err[0.5]["relerr"], err
    assert err[0.1]["cos"] > 0.99, err[0.1]


def test_location_kl_options_against_the_exact_gradient_of_e_log_q():
    """One object: the straight-through and relaxed location terms are unbiased estimates of
    ∂E_q[log q]/∂h (the KL's gradient: log p is constant); "hard" (the exact log q's own gradient,
    onehot − b) has mean zero, whatever the KL's gradient is."""
    case = E.make_case("one")
    K = 4000
    h = case.h.double().requires_grad_(True)
    (exact,) = torch.autograd.grad(E.exact_log_q_expectation(h, 1), h)
    # the enumeration itself: −entropy of softmax(h)
    b = torch.softmax(case.h.double(), 0)
    assert E.exact_log_q_expectation(case.h, 1).item() == pytest.approx((b * b.log()).sum().item(), rel=1e-12)
    g = E.draw_gumbel(K, case.D, seed=5)
    for loc_kl in ("straight_through", "relaxed"):
        st = E.compare(E.loc_kl_gradients(case, g, 0.5, loc_kl), exact)
        assert st["relerr"] < 3 * st["mc"] + 0.02 and st["cos"] > 0.98, (loc_kl, st)
    hard = E.loc_kl_gradients(case, g, 0.5, "hard").double()
    st = E.compare(hard, exact)
    assert st["relerr"] > 0.9, st  # misses the KL's gradient altogether
    assert hard.mean(0).norm() < 4 * (hard.std(0) / K ** 0.5).norm()  # zero mean, up to Monte Carlo error


def test_quick_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "est.json"
    threads = torch.get_num_threads()
    try:
        assert E.main(["--quick", "--cases", "one", "--draws", "50", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    import json

    data = json.loads(out.read_text())
    assert {"environment", "cases", "rows", "loc_kl_rows"} <= set(data)
    rows = data["rows"]
    assert {(r["mode"], r["tau"], r["eps"]) for r in rows} == {(m, t, e) for m in E.MODES for t in (0.5, 0.02)
                                                                  for e in (1e-4, 1e-2)}
    assert all(r["finite"] and -1 <= r["cos"] <= 1 for r in rows)
    with pytest.raises(SystemExit):
        E.main(["--cases", "nope"])
