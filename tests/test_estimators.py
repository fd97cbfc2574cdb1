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
    return E.Case(case.name, case.x.double(), case.sprites.double(), case.h.double(), case.note, case.window)


def _neighbourhood(d, window, canvas):
    """bool [D]: the window × window neighbourhood of pixel d on canvas (H, W), clipped."""
    H, W = canvas
    r, c = torch.arange(H * W) // W, torch.arange(H * W) % W
    k = window // 2
    return ((r - d // W).abs() <= k) & ((c - d % W).abs() <= k)


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


def _relaxed_samples(h, g, index, tau, window=1, canvas=None):
    """r_i = softmax((h+g)/τ) over the locations not among the hard draws before step i (with an
    exclusion window: outside their window × window neighbourhoods)."""
    rows, drawn = [], torch.zeros_like(h, dtype=torch.bool)
    for i in range(index.shape[0]):
        rows.append(torch.softmax(((h + g) / tau).masked_fill(drawn, float("-inf")), 0))
        if window == 1:
            drawn = drawn | F.one_hot(index[i], h.shape[0]).bool()
        else:
            drawn = drawn | _neighbourhood(int(index[i]), window, canvas)
    return torch.stack(rows)


def _explicit_surrogate(case, h, g, index, tau, mode, eps, h0):
    """The function whose gradient at h0 each estimator claims to be: for ``relaxed`` the
    log-likelihood of the relaxed placement; for ``straight_through`` the hard placement's
    log-likelihood linearised through the relaxed sample, LL(hard + dense(r(h)) − dense(r(h0)))."""
    H, W = case.H, case.W
    sprites = case.sprites[0, :, 0]
    x = case.x[0, 0]
    r = _relaxed_samples(h, g, index, tau, case.window, case.canvas).view(-1, H, W)
    if mode == "relaxed":
        return _loglik(x, _canvas(sprites, r), eps)
    hard = F.one_hot(index, case.D).to(h.dtype).view(-1, H, W)
    r0 = _relaxed_samples(h0, g, index, tau, case.window, case.canvas).view(-1, H, W)
    return _loglik(x, _canvas(sprites, hard) + _canvas(sprites, r) - _canvas(sprites, r0), eps)


@pytest.mark.parametrize("name", ["one", "two", "two_w3"])
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
    index, _, _ = ops.gumbel_topk_relaxed(case.h[None].expand(K, -1).contiguous(), n, tau, case.n, g, **case.op_kw)
    if case.window > 1:  # the surrogate's draws follow the window rule
        assert all(not _neighbourhood(int(index[k, 0]), case.window, case.canvas)[index[k, 1]] for k in range(K))
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


# ---------------------------------------------------------------------------------------------
# The exclusion window (SPEC §2): the exact expectation under the window rule, and the comparison
# ---------------------------------------------------------------------------------------------


def _explicit_window_expectation(h, table, window, canvas):
    """E_q[LL] for two draws under the window rule, written out without the op: b₁ = softmax(h),
    b₂ = softmax(h) over the pixels outside d₁'s window × window neighbourhood."""
    D = h.shape[0]
    total = h.new_zeros(())
    b1 = torch.softmax(h, 0)
    for d1 in range(D):
        keep = ~_neighbourhood(d1, window, canvas)
        b2 = torch.softmax(h.masked_fill(~keep, float("-inf")), 0)
        total = total + b1[d1] * (b2 * table[d1].masked_fill(~keep, 0.0)).sum()
    return total


def test_window_enumeration_covers_q_and_matches_an_explicit_formula():
    """The ordered draws under the 3×3 window carry all of q's mass; E_q[LL] from the op's log_q
    equals the explicit masked-softmax formula; at window 1 the op-based enumeration equals the
    closed form; and the window changes the expectation (so the case tests something)."""
    c1, c3 = E.make_case("two"), E.make_case("two_w3")
    assert c3.window == 3 and c1.window == 1 and torch.equal(c1.h, c3.h) and torch.equal(c1.x, c3.x)
    draws = E.ordered_draws(c3)
    # 8×8: 64² − Σ_d |d's 3×3 neighbourhood, clipped| = 4096 − (36·9 + 24·6 + 4·4)
    assert draws.shape == (3612, 2)
    assert all(not _neighbourhood(int(a), 3, c3.canvas)[b] for a, b in draws[::97].tolist())
    assert E.enumeration_mass(c3) == pytest.approx(1.0, abs=1e-12)
    assert E.enumeration_mass(c1) == pytest.approx(1.0, abs=1e-12)
    table = E.placement_loglik(c3, 1e-2)
    h = c3.h.double()
    e3 = E.exact_expectation_enumerated(h, c3, table).item()
    assert e3 == pytest.approx(_explicit_window_expectation(h, table, 3, c3.canvas).item(), rel=1e-12)
    e1 = E.exact_expectation_enumerated(h, c1, table).item()
    assert e1 == pytest.approx(E.exact_expectation(h, table).item(), rel=1e-12)
    assert abs(e3 - e1) > 0.5  # −40.78 against −42.17: the window matters in this scene
    # the KL's enumeration, too
    assert E.exact_log_q_expectation_enumerated(h, c1).item() == pytest.approx(
        E.exact_log_q_expectation(h, 2).item(), rel=1e-12)


def test_windowed_exact_gradient_matches_finite_differences_of_the_explicit_expectation():
    """The exact gradient at window 3 (autograd through the op's log_q over the enumerated draws)
    against central differences of the explicit, op-free expectation under the window rule, along
    random directions, float64; it differs from the window-1 gradient."""
    c3 = E.make_case("two_w3")
    eps, delta = 1e-2, 1e-5
    g3 = E.exact_gradient(c3, eps)
    table = E.placement_loglik(c3, eps)
    h = c3.h.double()
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(c3.D, generator=gen, dtype=torch.float64)
        f = [_explicit_window_expectation(h + s * delta * v, table, 3, c3.canvas).item() for s in (1, -1)]
        fd = (f[0] - f[1]) / (2 * delta)
        assert (g3 @ v).item() == pytest.approx(fd, rel=1e-6, abs=1e-8)
    g1 = E.exact_gradient(E.make_case("two"), eps)
    assert (g3 - g1).norm() > 0.1 * g1.norm()


def test_windowed_exact_expectation_matches_hard_window_draws():
    """Monte Carlo: the mean log-likelihood of the op's hard draws with window=3 matches the
    enumerated window-3 expectation, not the window-1 one (the two are many standard errors apart)."""
    c3 = E.make_case("two_w3")
    eps, K = 1e-2, 20000
    table = E.placement_loglik(c3, eps)
    g = E.draw_gumbel(K, c3.D, seed=13)
    index, _, _ = ops.gumbel_topk_relaxed(c3.h[None].expand(K, -1).contiguous(), torch.full((K,), 2), 0.5, 2, g,
                                          window=3, canvas=c3.canvas)
    ll = table[index[:, 0], index[:, 1]]
    se = ll.std().item() / K ** 0.5
    e3 = E.exact_expectation_enumerated(c3.h, c3, table).item()
    e1 = E.exact_expectation(c3.h, table).item()
    assert abs(ll.mean().item() - e3) < 4 * se
    assert abs(ll.mean().item() - e1) > 8 * se


def test_window_comparison_bias_ratio_and_check():
    """The table's arithmetic: bias = √(relerr² − mc²), ratio window 3 / window 1, PASS iff <= 1.2;
    only (ε, τ) pairs present at both windows, only the relaxed rows."""
    def row(case, mode, tau, relerr, mc):
        return {"case": case, "mode": mode, "eps": 1e-2, "tau": tau, "draws": 10, "relerr": relerr, "mc": mc,
                "cos": 0.9}

    rows = [row("two", "relaxed", 0.5, 0.5, 0.3), row("two_w3", "relaxed", 0.5, 0.65, 0.39),
            row("two", "relaxed", 0.1, 1.0, 0.0), row("two_w3", "relaxed", 0.1, 1.25, 0.0),
            row("two_w3", "relaxed", 0.02, 9.0, 0.0),  # no window-1 partner
            row("two", "straight_through", 0.5, 1.0, 0.0), row("two_w3", "straight_through", 0.5, 9.0, 0.0)]
    w = {r["tau"]: r for r in E.window_comparison(rows)}
    assert set(w) == {0.5, 0.1}
    assert w[0.5]["bias_w1"] == pytest.approx(0.4) and w[0.5]["bias_w3"] == pytest.approx(0.52)
    assert w[0.5]["ratio"] == pytest.approx(1.3) and not w[0.5]["pass"] and w[0.5]["noisy"]
    assert w[0.1]["ratio"] == pytest.approx(1.25) and not w[0.1]["pass"] and not w[0.1]["noisy"]
    rows[3]["relerr"] = 1.2  # ratio 1.2 exactly: passes
    assert {r["tau"]: r["pass"] for r in E.window_comparison(rows)} == {0.5: False, 0.1: True}
    assert "PASS" in E.format_window_table(E.window_comparison(rows))
    # the headline check: pooled over the resolved rows (τ = 0.5 is noisy here, so only τ = 0.1)
    c = E.window_summary(E.window_comparison(rows))
    assert c["pooled_rows"] == 1 and c["pooled_ratio"] == pytest.approx(1.2) and c["pass"]
    assert c["rows_passed"] == 1 and c["rows_noisy"] == 1 and c["max_ratio"] == pytest.approx(1.3)
    assert c["max_ratio_at"] == {"eps": 1e-2, "tau": 0.5}
    rows[3]["relerr"] = 1.5
    c = E.window_summary(E.window_comparison(rows))
    assert c["pooled_ratio"] == pytest.approx(1.5) and not c["pass"]
    assert E.format_window_summary(c).startswith("FAIL")
    # every row noisy: all of them pooled, √(0.52² + 0) / √(0.4² + 0)
    rows[2]["mc"] = rows[3]["mc"] = 0.9
    c = E.window_summary(E.window_comparison(rows))
    b1, b3 = (1.0 - 0.81) ** 0.5, (2.25 - 0.81) ** 0.5
    assert c["pooled_rows"] == 2
    assert c["pooled_ratio"] == pytest.approx(((0.52**2 + b3**2) / (0.4**2 + b1**2)) ** 0.5)


def test_quick_bench_window_case_reports_the_ratio_and_check(tmp_path, capsys):
    out = tmp_path / "est.json"
    threads = torch.get_num_threads()
    try:
        assert E.main(["--quick", "--cases", "two,two_w3", "--draws", "20", "--window-draws", "60",
                       "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    import json

    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [c["window"] for c in data["cases"]] == [1, 3]
    assert {(r["case"], r["mode"]) for r in data["rows"]} == {(c, m) for c in ("two", "two_w3") for m in E.MODES}
    w = data["window_rows"]
    assert {(r["eps"], r["tau"]) for r in w} == {(e, t) for e in (1e-4, 1e-2) for t in (0.5, 0.02)}
    assert all(r["draws"] == 60 and r["mode"] == "relaxed" and r["pass"] == (r["ratio"] <= 1.2) for r in w)
    check = data["window_check"]
    assert check["pass"] == (check["pooled_ratio"] <= 1.2) and check["ratio_max"] == 1.2 and check["draws"] == 60
    assert check["rows"] == 4 and check["rows_passed"] == sum(r["pass"] for r in w)
    assert "ratio <= 1.2" in text and ("PASS" in text or "FAIL" in text) and "sum of q: 1.0000000000" in text
    # without the window-1 partner there is no comparison, and the run says so
    assert E.main(["--quick", "--cases", "two_w3", "--draws", "10", "--window-draws", "10"]) == 0
    assert "needs both cases" in capsys.readouterr().out
    torch.set_num_threads(threads)
