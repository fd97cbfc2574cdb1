"""Tests of the LAVAE model, its loss terms, the β-VAE baseline, the aux VAE and the noise."""

import math

import pytest
import torch
import torch.nn.functional as F

from lavae_fast import reference as ref
from lavae_fast.aux_vae import AuxVAE, ink_anchors, peak_target, smooth_target, warmup_loss
from lavae_fast.baseline import BetaVAE
from lavae_fast.model import LAVAE, Latents, gaussian_kl
from lavae_fast.noise import Noise, data_indices, draw_noise, draw_normal, mix

from _tolerance import assert_step_matches_reference, compare_models

torch.set_num_threads(1)


def tiny(canvas=(12, 12), channels=1, ops="reference", **kw):
    """A small model: fast enough for exact, hand-checked comparisons."""
    cfg = dict(max_objects=4, latent_size=6, width=8, sprite_width=14, ops=ops)
    cfg.update(kw)
    return LAVAE(channels, canvas, 5, **cfg)


def images(B, C, H, W, p=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, C, H, W, generator=g) < p).float()


def noise_for(model, B, H, W, seed=0, step=0):
    return draw_noise(seed, step, range(B), num_pixels=H * W, max_objects=model.max_objects,
                      latent_size=model.latent_size)


def with_peaks(model, x, peaks):
    """Run forward with h_loc replaced so that the count is known: peaks[b] = list of flat pixels."""
    H, W = x.shape[-2:]
    D = H * W
    gamma = model.gamma_for(H, W)
    h = torch.zeros(x.shape[0], 1, H, W)
    for b, ps in enumerate(peaks):
        for j, p in enumerate(ps):
            h.view(x.shape[0], D)[b, p] = 6 * gamma - j  # distinct heights, all above 4γ
    return h


# ---------------------------------------------------------------------------------------------
# Deterministic inference: where infer() puts the objects
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ops", ["reference", "fused"])
def test_infer_puts_the_objects_at_the_counted_peaks_not_at_a_blunt_peaks_neighbour(ops):
    H, W = 9, 10
    D = H * W
    torch.manual_seed(0)
    m = tiny((H, W), ops=ops).eval()
    g = m.gamma_for(H, W)
    h = torch.zeros(4, 1, H, W)
    hv = h.view(4, D)
    hv[0, 12], hv[0, 13], hv[0, 75] = 8 * g, 7.5 * g, 6 * g  # 13: the blunt peak's neighbour, above 75
    hv[2, 40], hv[2, 41] = 6 * g, 6 * g  # a tie: both are 3×3 maxima, both counted
    hv[3, 12], hv[3, 34] = 8 * g, 5 * g  # 2 px apart: two peaks for 3×3, one for 5×5
    m.loc_head.register_forward_hook(lambda mod, inp, out: h / g)
    x = images(4, 1, H, W)
    lat = m.infer(x)
    assert lat.n.tolist() == [2, 0, 2, 2]
    assert lat.index.tolist() == [[12, 75, -1, -1], [-1] * 4, [40, 41, -1, -1], [12, 34, -1, -1]]
    top = m.infer(x, locations="top")  # the mode of the draws with the default 5×5 exclusion window
    assert top.index[0].tolist() == [12, 75, -1, -1] and torch.equal(top.n, lat.n)
    m.exclusion_window = 1  # the paper's q: two objects on one blunt peak
    top = m.infer(x, locations="top")
    assert top.index[0].tolist() == [12, 13, -1, -1] and torch.equal(top.n, lat.n)
    m.exclusion_window = 5
    # the appearance is μ of h_app read at the chosen locations
    h_app = m.encode(x)[0].flatten(2)
    for b in range(4):
        for i in range(int(lat.n[b])):
            torch.testing.assert_close(lat.z_app[b, i], h_app[b, : m.latent_size, lat.index[b, i]])
    m.set_count_window(5)
    lat5 = m.infer(x)
    assert lat5.n[3] == 1 and lat5.index[3].tolist() == [12, -1, -1, -1]
    with pytest.raises(ValueError, match="locations must be one of"):
        m.infer(x, locations="mode")


def test_peak_index_pads_a_canvas_smaller_than_the_slots_and_leaves_a_too_large_n_without_location():
    from lavae_fast.ops import peak_index

    h = torch.tensor([[[[3.0, 1.0]]], [[[0.0, 0.0]]]])  # D = 2 < M = 4
    idx = peak_index(h, 2.0, torch.tensor([1, 0]), 4)
    assert idx.tolist() == [[0, -1, -1, -1], [-1] * 4] and idx.dtype == torch.int64
    assert peak_index(h, 2.0, torch.tensor([2, 1]), 4).tolist() == [[0, -1, -1, -1], [-1] * 4]
    assert peak_index(h[:0], 2.0, torch.zeros(0, dtype=torch.long), 4).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Shapes, parameters, ops switch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("canvas,C", [((12, 12), 1), ((16, 20), 3), ((9, 13), 1)])
def test_forward_shapes_several_canvases(canvas, C):
    H, W = canvas
    m = tiny(canvas, C)
    B = 3
    out = m(images(B, C, H, W), force_n_prob=0.5)
    M, L = m.max_objects, m.latent_size
    assert out.loss.shape == ()
    for t in (out.neg_elbo, out.recon, out.kl_app, out.kl_n, out.kl_loc, out.n_hat, out.n):
        assert t.shape == (B,)
    assert out.index.shape == (B, M) and out.rows.shape == (B, M)
    assert out.z_app.shape == (B, M, L) and out.mu.shape == (B, M, L)
    assert out.lam.shape == (B, C, H, W) and out.h_loc.shape == (B, 1, H, W)
    assert out.sprites.shape == (B, M, C, 5, 5)
    assert out.gamma == pytest.approx(0.5 * math.log(H * W))
    assert torch.isfinite(out.neg_elbo).all()
    torch.testing.assert_close(out.neg_elbo, out.recon + out.kl_app + out.kl_n + out.kl_loc)
    out.loss.backward()
    assert m.prior_logits.grad is not None and m.loc_net[0][0].weight.grad is not None
    assert m.sample(2).shape == (2, C, H, W)
    assert m.reconstruct(images(2, C, H, W)).shape == (2, C, H, W)


def test_parameter_count_split_evenly():
    for C, S in ((1, 17), (3, 21)):
        m = LAVAE(C, (64, 64), S)
        groups = m.parameter_groups()
        total = sum(p.numel() for p in m.parameters())
        print(f"LAVAE C={C} S={S}: {total} parameters, {groups}")
        assert 450_000 <= total <= 560_000
        third = total / 3
        for part in ("location_inference", "appearance_inference", "sprite_generation"):
            assert abs(groups[part] - third) < 0.15 * third, (part, groups[part])
        assert sum(groups.values()) == total
    b = BetaVAE(1, (64, 64))
    nb = sum(p.numel() for p in b.parameters())
    print(f"BetaVAE: {nb} parameters")
    assert 700_000 <= nb <= 1_100_000
    assert b.latent_shape(64, 64) == (16, 8, 8)  # d = 1024


def test_fused_and_reference_ops_agree():
    """The same draws, values and every gradient within flash-attention's rule (tests/_tolerance.py):
    the fused path's error against the reference in float64 at most ~2× the float32 reference's."""
    H = W = 12
    x = images(3, 1, H, W)
    torch.manual_seed(1)
    fused = tiny((H, W), ops="fused")
    steps = compare_models(lambda: fused, lambda: tiny((H, W), ops="reference"), x, noise_for(fused, 3, H, W),
                           tau=0.3, force_n_prob=0.5)
    assert steps[0]["discrete"][0].sum() > 0, "the comparison must place objects"
    assert_step_matches_reference(*steps)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="sprite_size"):
        LAVAE(1, (12, 12), 4)
    with pytest.raises(ValueError, match="ops"):
        LAVAE(1, (12, 12), 5, ops="cuda")
    with pytest.raises(ValueError, match="location_mode"):
        LAVAE(1, (12, 12), 5, location_mode="hard")


# ---------------------------------------------------------------------------------------------
# Loss terms against hand computations
# ---------------------------------------------------------------------------------------------


def explicit_log_q(logits_row, draws):
    """log Π_i b^(i)[draw_i], b^(i) = softmax renormalised over the locations not yet drawn."""
    p = torch.softmax(logits_row.double(), 0)
    remaining = torch.ones_like(p, dtype=torch.bool)
    total = 0.0
    for d in draws:
        total += math.log(p[d].item() / p[remaining].sum().item())
        remaining[d] = False
    return total


def explicit_canvas(sprites_b, draws, H, W):
    """Σ sprites placed with their centre pixel on each draw, by explicit loops."""
    C, S = sprites_b.shape[1], sprites_b.shape[-1]
    s = S // 2
    canvas = torch.zeros(C, H, W, dtype=torch.float64)
    for i, d in enumerate(draws):
        r0, c0 = d // W, d % W
        for u in range(S):
            for v in range(S):
                r, c = r0 + u - s, c0 + v - s
                if 0 <= r < H and 0 <= c < W:
                    canvas[:, r, c] += sprites_b[i, :, u, v].double()
    return canvas


@pytest.mark.parametrize("mode", ["straight_through", "relaxed"])
def test_elbo_terms_match_hand_computation(mode):
    H, W = 7, 8
    D = H * W
    torch.manual_seed(3)
    # the paper's q (window 1), whose draws the hand computation below repeats
    m = tiny((H, W), location_mode=mode, loc_kl="straight_through", exclusion_window=1)  # its value: the exact log q
    m.eval()  # batch norm from running statistics: every term is a function of this batch alone
    x = images(2, 1, H, W, p=0.3)
    # h_loc is fixed by a hook so that the counts are known: 2 objects in image 0, 1 in image 1.
    peaks = [[10, 40], [27]]
    h_fixed = with_peaks(m, x, peaks)
    m.loc_head.register_forward_hook(lambda mod, inp, out: h_fixed / m.gamma_for(H, W))
    nz = noise_for(m, 2, H, W, seed=5)
    out = m(x, noise=nz, tau=0.4, hard=False)  # the training objective of the mode, BN in eval mode
    assert out.n_hat.tolist() == [2, 1] and out.n.tolist() == [2, 1]

    logp_n = torch.log_softmax(m.prior_logits.detach().double(), 0)
    for b in range(2):
        n = int(out.n[b])
        draws = out.index[b, :n].tolist()
        # hard draws = top-n of h + g
        y = h_fixed.view(2, D)[b] + nz.gumbel[b]
        assert draws == y.topk(n).indices.tolist()
        assert (out.index[b, n:] == -1).all()
        # reconstruction: Bernoulli of the explicitly placed sprites
        if mode == "straight_through":
            canvas = explicit_canvas(out.sprites[b].detach(), draws, H, W)
        else:  # relaxed: a dense correlation with the relaxed maps, Σ_d r[d] sprite at d
            _, relaxed, _ = ref.gumbel_topk_relaxed(h_fixed.view(2, D)[b:b + 1], out.n[b:b + 1], 0.4, m.max_objects,
                                                   nz.gumbel[b:b + 1])
            canvas = torch.zeros(1, H, W, dtype=torch.float64)
            for i in range(n):
                for d in range(D):
                    w = relaxed[0, i, d].item()
                    if w:
                        canvas += w * explicit_canvas(out.sprites[b, i:i + 1].detach(), [d], H, W)
        lam = 1e-4 + (1 - 2e-4) * canvas.clamp(max=1)
        xb = x[b].double()
        recon = -(xb * lam.log() + (1 - xb) * (1 - lam).log()).sum()
        assert out.recon[b].item() == pytest.approx(recon.item(), rel=1e-4, abs=1e-3)
        # appearance KL: closed form over present slots only
        mu, lv = out.mu[b, :n].double(), out.logvar[b, :n].double()
        kl = 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum()
        assert out.kl_app[b].item() == pytest.approx(kl.item(), rel=1e-5, abs=1e-5)
        assert out.mu[b, n:].abs().sum() == 0 and out.sprites[b, n:].abs().sum() == 0
        # count term: −log p(n)
        assert out.kl_n[b].item() == pytest.approx(-logp_n[n].item(), rel=1e-6)
        # location term: exact log q of the draws without replacement + Σ log(D − i)
        if mode == "straight_through":
            expected = explicit_log_q(h_fixed.view(2, D)[b], draws) + sum(math.log(D - i) for i in range(n))
        else:
            expected = explicit_log_q(h_fixed.view(2, D)[b], draws) + sum(math.log(D - i) for i in range(n))
        assert out.kl_loc[b].item() == pytest.approx(expected, rel=1e-5, abs=1e-4)
    torch.testing.assert_close(out.loss, out.neg_elbo.mean())


def test_log_q_of_draws_without_replacement_matches_explicit_product():
    torch.manual_seed(7)
    B, D, M = 4, 30, 5
    logits = torch.randn(B, D) * 3
    n = torch.tensor([0, 1, 3, 5])
    g = -torch.log(-torch.log(torch.rand(B, D)))
    for impl in (ref.gumbel_topk_relaxed, __import__("lavae_fast.ops", fromlist=["x"]).gumbel_topk_relaxed):
        index, _, log_q = impl(logits, n, 0.5, M, g)
        for b in range(B):
            draws = index[b, : n[b]].tolist()
            assert log_q[b].item() == pytest.approx(explicit_log_q(logits[b], draws), rel=1e-5, abs=1e-5)


def test_straight_through_location_kl_has_the_gradient_of_z_st_dot_log_b():
    """SPEC §3: log q = Σ_i ⟨z_i^ST, log b^(i)⟩. The model writes it as log_q + Σ⟨r − r̄, h̄⟩ (value:
    exact log q; gradient: the op's log_q plus the relaxed-sample part). Check the gradient
    against autograd of the explicit formula, with log b^(i) built by masked log-softmax."""
    torch.manual_seed(11)
    B, D, M, tau = 3, 20, 4, 0.3
    h0 = torch.randn(B, D) * 2
    n = torch.tensor([1, 3, 4])
    g = -torch.log(-torch.log(torch.rand(B, D)))
    coef = torch.randn(B)  # a random linear functional of the per-image values

    h = h0.clone().requires_grad_(True)
    index, relaxed, log_q = ref.gumbel_topk_relaxed(h, n, tau, M, g)
    model_form = log_q + ((relaxed - relaxed.detach()) * h.detach()[:, None, :]).sum((1, 2))
    (gm,) = torch.autograd.grad((coef * model_form).sum(), h)

    h2 = h0.clone().requires_grad_(True)
    index2, relaxed2, _ = ref.gumbel_topk_relaxed(h2, n, tau, M, g)
    assert torch.equal(index, index2)
    hard = F.one_hot(index2.clamp(min=0), D).float() * (index2 >= 0).float()[..., None]
    z_st = hard - relaxed2.detach() + relaxed2
    explicit = torch.zeros(B)
    for b in range(B):
        drawn = torch.zeros(D, dtype=torch.bool)
        for i in range(int(n[b])):
            log_b = torch.log_softmax(h2[b].masked_fill(drawn, float("-inf")), 0)
            # off the allowed set z_st is exactly 0 (value and gradient): use 0 instead of −∞·0.
            explicit = explicit + F.one_hot(torch.tensor(b), B) * (z_st[b, i] * log_b.masked_fill(drawn, 0.0)).sum()
            drawn = drawn.clone()
            drawn[index2[b, i]] = True
    torch.testing.assert_close(model_form.detach(), explicit.detach(), rtol=1e-5, atol=1e-5)
    (ge,) = torch.autograd.grad((coef * explicit).sum(), h2)
    torch.testing.assert_close(gm, ge, rtol=1e-4, atol=1e-5)


def test_relaxed_location_kl_is_r_dot_log_b_and_tends_to_the_exact_log_q():
    """loc_kl="relaxed" (SPEC §3): Σ_i ⟨r_i, log b^(i)⟩ with b^(i) renormalised over the locations
    not drawn before step i. Value and gradient against an explicit loop; at small τ the value is
    the exact log q of the hard draws."""
    torch.manual_seed(12)
    B, D, M, tau = 3, 20, 4, 0.3
    h0 = torch.randn(B, D) * 2
    n = torch.tensor([1, 3, 0])
    g = -torch.log(-torch.log(torch.rand(B, D)))
    coef = torch.randn(B)
    h = h0.clone().requires_grad_(True)
    index, relaxed, log_q = ref.gumbel_topk_relaxed(h, n, tau, M, g)
    val = LAVAE.relaxed_log_q(h, relaxed, index)
    (gm,) = torch.autograd.grad((coef * val).sum(), h)
    h2 = h0.clone().requires_grad_(True)
    _, relaxed2, _ = ref.gumbel_topk_relaxed(h2, n, tau, M, g)
    explicit = []
    for b in range(B):
        drawn, tot = torch.zeros(D, dtype=torch.bool), h2.new_zeros(())
        for i in range(int(n[b])):
            log_b = torch.log_softmax(h2[b].masked_fill(drawn, float("-inf")), 0).masked_fill(drawn, 0.0)
            tot = tot + (relaxed2[b, i] * log_b).sum()
            drawn = drawn.clone()
            drawn[index[b, i]] = True
        explicit.append(tot)
    explicit = torch.stack(explicit)
    torch.testing.assert_close(val.detach(), explicit.detach(), rtol=1e-5, atol=1e-5)
    (ge,) = torch.autograd.grad((coef * explicit).sum(), h2)
    torch.testing.assert_close(gm, ge, rtol=1e-4, atol=1e-5)
    assert val[2].item() == 0.0  # no objects, no term
    assert not torch.allclose(val, log_q, atol=1e-2)  # at τ = 0.3 the relaxed sample is spread
    _, r_cold, lq_cold = ref.gumbel_topk_relaxed(h0, n, 1e-3, M, g)
    torch.testing.assert_close(LAVAE.relaxed_log_q(h0, r_cold, index), lq_cold, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loc_kl", ["straight_through", "relaxed", "hard"])
def test_loc_kl_option_picks_the_location_term(loc_kl):
    H, W = 6, 7
    torch.manual_seed(4)
    m = tiny((H, W), location_mode="relaxed", loc_kl=loc_kl, exclusion_window=1)  # the paper's q, as computed here
    m.eval()
    x = images(2, 1, H, W, p=0.3)
    h_fixed = with_peaks(m, x, [[5, 30], [12]]).requires_grad_(True)
    m.loc_head.register_forward_hook(lambda mod, inp, out: h_fixed / m.gamma_for(H, W))
    nz = noise_for(m, 2, H, W, seed=2)
    out = m(x, noise=nz, tau=0.4, hard=False)  # the training term (BN in eval mode)
    (got,) = torch.autograd.grad(out.kl_loc.sum(), h_fixed)
    logits = h_fixed.view(2, -1)
    index, relaxed, log_q = ref.gumbel_topk_relaxed(logits, out.n, 0.4, m.max_objects, nz.gumbel)
    if loc_kl == "straight_through":
        term = log_q + ((relaxed - relaxed.detach()) * logits.detach()[:, None, :]).sum((1, 2))
    elif loc_kl == "hard":
        term = log_q
    else:
        term = LAVAE.relaxed_log_q(logits, relaxed, index)
    (want,) = torch.autograd.grad(term.sum(), h_fixed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    log_p = -torch.tensor([sum(math.log(H * W - i) for i in range(int(k))) for k in out.n])
    torch.testing.assert_close(out.kl_loc.detach(), (term - log_p).detach(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="loc_kl"):
        tiny((H, W), loc_kl="score")


def test_gaussian_kl_matches_closed_form():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p).sum(-1))
    assert gaussian_kl(torch.zeros(3), torch.zeros(3)).item() == 0.0


def test_initial_appearance_kl_is_small():
    """q(z_app) starts at the prior: at initialisation the KL an object would carry, at any pixel
    of real multi-dSprites images, is far below a nat (the default conv init gave log σ² up to
    ±20 there and ~5e3 nats per object at step 1; the head is now initialised near zero)."""
    from lavae_fast.data.generator import generate_arrays

    x = torch.from_numpy(generate_arrays("multi-dsprites", 8, seed=0, canvas=(32, 32))["images"]).float()
    m = LAVAE(channels=3, canvas=(32, 32), sprite_size=21, ops="reference")  # default widths
    m.train()  # batch statistics, as at the first training step
    with torch.no_grad():
        h_app, _, _ = m.encode(x)
    mu, logvar = h_app.split(m.latent_size, dim=1)
    kl_per_pixel = gaussian_kl(mu.movedim(1, -1), logvar.movedim(1, -1))  # [B,H,W]: one object there
    assert kl_per_pixel.max().item() < 1.0, kl_per_pixel.max().item()
    assert logvar.abs().max().item() < 1.0 and mu.abs().max().item() < 1.0


def test_count_objects_matches_brute_force_loop():
    torch.manual_seed(2)
    h = torch.randn(3, 9, 11) * 5
    h[0, 4, 4] = h[0, 4, 5] = 30.0  # a plateau: both points are local maxima (h ≥ max-pool)
    thr = 4.0
    expected = []
    for b in range(3):
        c = 0
        for r in range(9):
            for q in range(11):
                nb = [h[b, rr, qq] for rr in range(max(0, r - 1), min(9, r + 2)) for qq in range(max(0, q - 1), min(11, q + 2))]
                if h[b, r, q] >= max(nb) and h[b, r, q] > thr:
                    c += 1
        expected.append(min(c, 10))
    from lavae_fast import ops

    for impl in (ref.count_objects, ops.count_objects):
        assert impl(h, thr, 10).tolist() == expected
        assert impl(h[:, None], thr, 2).tolist() == [min(e, 2) for e in expected]


@pytest.mark.parametrize("ops_name", ["reference", "fused"])
def test_count_window_reaches_n_hat(ops_name):
    import copy
    import pickle

    H, W = 9, 11
    torch.manual_seed(5)
    m = tiny((H, W), ops=ops_name, max_objects=6)
    m.eval()
    assert m.count_window == 3  # SPEC §2's 3×3 by default
    x = images(3, 1, H, W, p=0.3)
    gamma = m.gamma_for(H, W)
    # Two peaks 2 px apart in image 0, one peak in image 1, none in image 2: the 3×3 counter sees
    # two in image 0, the 5×5 one (its window holds both) one.
    h_fixed = torch.zeros(3, 1, H, W)
    h_fixed[0, 0, 4, 3], h_fixed[0, 0, 4, 5] = 6 * gamma, 5 * gamma
    h_fixed[1, 0, 2, 2] = 6 * gamma
    m.loc_head.register_forward_hook(lambda mod, inp, out: h_fixed / gamma)
    with torch.no_grad():
        assert m.encode(x)[2].tolist() == [2, 1, 0]
        m.count_window = 5
        _, h_loc, n_hat = m.encode(x)
        assert n_hat.tolist() == [1, 1, 0]
        assert torch.equal(n_hat, ref.count_objects(h_loc, 4 * gamma, m.max_objects, 5))
        m.set_count_window(1)
        assert m.encode(x)[2].tolist() == [2, 1, 0]
    for bad in (0, 2, -1, 4, 3.0, True):
        with pytest.raises(ValueError, match="count_window"):
            m.set_count_window(bad)
        with pytest.raises(ValueError, match="count_window"):
            m.count_window = bad
        with pytest.raises(ValueError, match="count_window"):
            tiny((H, W), count_window=bad)
    assert m.count_window == 1
    assert copy.deepcopy(m).count_window == 1
    m7 = tiny((H, W), count_window=7)  # without the test's hook, which does not pickle
    assert pickle.loads(pickle.dumps(m7)).count_window == 7
    state = m7.__getstate__()
    del state["_count_window"]  # a model pickled before the option existed counted 3×3
    old = LAVAE.__new__(LAVAE)
    old.__setstate__(state)
    assert old.count_window == 3


def test_count_window_on_a_model_of_its_own_h_loc():
    # An untrained model's own h_loc (no planted peaks): n̂ of a count_window=5 model is the
    # reference's 5×5 count of that h_loc, for both engines.
    H, W = 10, 9
    for ops_name in ("reference", "fused"):
        torch.manual_seed(6)
        m = tiny((H, W), ops=ops_name, count_window=5, max_objects=10)
        m.eval()
        x = images(4, 1, H, W, p=0.3, seed=3)
        with torch.no_grad():
            _, h_loc, n_hat = m.encode(x)
        for thr in (4 * m.gamma_for(H, W), float(h_loc.median())):  # the model's, and one that counts
            assert torch.equal(m.engine.count_objects(h_loc, thr, 10, m.count_window),
                               ref.count_objects(h_loc, thr, 10, 5))
        assert torch.equal(n_hat, ref.count_objects(h_loc, 4 * m.gamma_for(H, W), 10, 5))


def test_learned_prior_is_a_distribution_and_learns():
    m = tiny()
    with torch.no_grad():
        m.prior_logits.copy_(torch.randn(m.max_objects + 1) * 3)
    p = m.prior_log_probs().exp()
    assert (p >= 0).all() and p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert p.shape == (m.max_objects + 1,)
    # its gradient comes from −log p(n): one step of descent raises p of the counts used
    x = images(4, 1, 12, 12)
    out = m(x, force_n_prob=1.0)  # every n forced to 1
    out.kl_n.mean().backward()
    g = m.prior_logits.grad
    assert g[1] < 0 and (g[torch.arange(m.max_objects + 1) != 1] > 0).all()


# ---------------------------------------------------------------------------------------------
# Importance-sampled bound
# ---------------------------------------------------------------------------------------------


def test_importance_bound_above_elbo_and_rises_with_k():
    torch.manual_seed(4)
    H = W = 10
    m = tiny((H, W), ops="fused")
    x = images(6, 1, H, W, p=0.15, seed=9)
    h_fixed = with_peaks(m, x, [[11, 55], [30], [], [44, 12], [70], [5, 90]])
    m.loc_head.register_forward_hook(lambda mod, inp, out: h_fixed / m.gamma_for(H, W) + 0.3 * out)
    m.eval()
    gen = torch.Generator().manual_seed(0)
    reps = 30
    elbo = torch.stack([-m(x, noise=Noise(
        gumbel=-torch.log(-torch.log(torch.rand(6, H * W, generator=gen))),
        eps=torch.randn(6, m.max_objects, m.latent_size, generator=gen), coin=torch.ones(6))).neg_elbo.detach()
        for _ in range(reps)]).mean(0)
    k1 = torch.stack([m.log_likelihood(x, K=1, generator=gen) for _ in range(reps)]).mean(0)
    k10 = torch.stack([m.log_likelihood(x, K=10, generator=gen, chunk=3) for _ in range(reps // 3)]).mean(0)
    k100 = m.log_likelihood(x, K=100, generator=gen)
    # K = 1 is an unbiased estimate of the ELBO (sampled instead of analytic KL): close on average
    assert (k1 - elbo).abs().mean() < 0.1 * elbo.abs().mean()
    assert k10.mean() > k1.mean() and k100.mean() > k10.mean()
    assert k100.mean() >= elbo.mean()
    assert m.training is False


def test_baseline_bound_and_terms():
    torch.manual_seed(0)
    b = BetaVAE(1, (16, 16), width=16)
    x = images(4, 1, 16, 16)
    out = b(x, beta=0.3)
    torch.testing.assert_close(out.loss, (out.recon + 0.3 * out.kl).mean())
    torch.testing.assert_close(out.neg_elbo, out.recon + out.kl)
    recon = -(x * out.lam.log() + (1 - x) * (1 - out.lam).log()).flatten(1).sum(1)
    torch.testing.assert_close(out.recon, recon, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(out.kl, gaussian_kl(out.mu.flatten(1), out.logvar.flatten(1)))
    out.loss.backward()
    b.eval()
    gen = torch.Generator().manual_seed(1)
    k1 = torch.stack([b.log_likelihood(x, K=1, generator=gen) for _ in range(20)]).mean(0)
    k50 = b.log_likelihood(x, K=50, generator=gen, chunk=7)
    assert k50.mean() > k1.mean()
    assert b.sample(3).shape == (3, 1, 16, 16) and b.reconstruct(x).shape == x.shape
    assert BetaVAE(3, (37, 37)).latent_shape(37, 37) == (16, 5, 5)
    assert BetaVAE(3, (37, 37))(images(2, 3, 37, 37)).lam.shape == (2, 3, 37, 37)


# ---------------------------------------------------------------------------------------------
# Structure: present objects only, forced n, manipulation, sampling
# ---------------------------------------------------------------------------------------------


def test_decoder_sees_only_present_objects():
    m = tiny()
    seen = []
    m.sprite_decoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    x = images(3, 1, 12, 12)
    h_fixed = with_peaks(m, x, [[3, 50, 100], [], [77]])
    m.loc_head.register_forward_hook(lambda mod, inp, out: h_fixed / m.gamma_for(12, 12))
    out = m(x)
    assert out.n.tolist() == [3, 0, 1] and seen == [4]
    seen.clear()
    h_fixed.zero_()
    out = m(x)
    assert out.n.tolist() == [0, 0, 0] and seen == []  # nothing present: decoder not run
    assert torch.isfinite(out.loss) and (out.lam < 1e-3).all()


def test_forced_n_uses_the_coin():
    m = tiny()
    x = images(4, 1, 12, 12)
    nz = noise_for(m, 4, 12, 12)
    nz.coin = torch.tensor([0.1, 0.9, 0.5, 0.49])
    out = m(x, noise=nz, force_n_prob=0.5)
    assert out.forced.tolist() == [True, False, False, True]
    assert out.n[0] == 1 and out.n[3] == 1
    assert torch.equal(out.n[1:3], out.n_hat[1:3])


def test_manipulation_helpers():
    torch.manual_seed(0)
    m = tiny((12, 12))
    m.eval()
    lat = Latents(n=torch.tensor([2, 2]), index=torch.tensor([[5, 70, -1, -1], [30, 100, -1, -1]]),
                  z_app=torch.randn(2, 4, 6) * torch.tensor([1.0, 1, 0, 0])[None, :, None], canvas=(12, 12))
    moved = m.move_object(lat, 0, 6, 6)
    assert moved.index[:, 0].tolist() == [78, 78] and lat.index[0, 0] == 5
    assert moved.rows[0, 0] == 6 and moved.cols[0, 0] == 6
    swapped = m.swap_objects(lat, 0, 1)
    assert swapped.index[0, :2].tolist() == [70, 5]
    # swapping locations of two objects = placing each sprite at the other's place: a swap of
    # appearances renders the same image
    same = Latents(lat.n, lat.index, lat.z_app[:, [1, 0, 2, 3]], lat.canvas)
    torch.testing.assert_close(m.decode(swapped), m.decode(same))
    changed = m.change_appearance(lat, 1, 3, 2.5)
    assert changed.z_app[0, 1, 3] == 2.5 and not torch.equal(m.decode(changed), m.decode(lat))
    with pytest.raises(ValueError, match="absent"):
        m.move_object(lat, 2, 0, 0)
    with pytest.raises(ValueError, match="canvas"):
        m.move_object(lat, 0, 12, 0)
    lam, lat2 = m.sample(3, n=2, return_latents=True)
    assert lam.shape == (3, 1, 12, 12) and lat2.n.tolist() == [2, 2, 2]
    assert (lat2.index[:, :2] >= 0).all() and (lat2.index[:, 2:] == -1).all()
    assert (lat2.index[:, 0] != lat2.index[:, 1]).all()
    assert m.sample(5, n=torch.tensor([0, 1, 2, 3, 4])).shape == (5, 1, 12, 12)
    with pytest.raises(ValueError, match="n must be"):
        m.sample(2, n=9)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: torch.rand(2, 3, 12, 12), "channel"),
    (lambda: torch.rand(2, 1, 10, 12), "canvas"),
    (lambda: torch.rand(2, 1, 12, 12) * 2, r"\[0,1\]"),
    (lambda: torch.rand(2, 1, 12, 12) - 0.5, r"\[0,1\]"),
    (lambda: torch.full((2, 1, 12, 12), float("nan")), "NaN"),
    (lambda: torch.rand(0, 1, 12, 12), "empty"),
    (lambda: torch.rand(1, 12, 12), "shape"),
])
def test_bad_inputs_give_clear_errors(make, match):
    m = tiny()
    b = BetaVAE(1, (12, 12), width=8)
    x = make()
    for fn in (m, m.reconstruct, m.log_likelihood, m.infer, b, b.log_likelihood):
        with pytest.raises(ValueError, match=match):
            fn(x)
    with pytest.raises(TypeError, match="floating"):
        m((torch.rand(2, 1, 12, 12) > 0.5).to(torch.uint8))


def test_noise_shape_mismatch_is_an_error():
    m = tiny()
    nz = noise_for(m, 3, 12, 12)
    with pytest.raises(ValueError, match="noise"):
        m(images(2, 1, 12, 12), noise=nz)


# ---------------------------------------------------------------------------------------------
# Noise and reproducibility
# ---------------------------------------------------------------------------------------------


def test_noise_is_a_function_of_seed_step_and_sample():
    kw = dict(num_pixels=50, max_objects=3, latent_size=4, aux_shape=(2, 3, 3))
    a = draw_noise(1, 7, range(6), **kw)
    b = draw_noise(1, 7, range(6), **kw)
    for f in ("gumbel", "eps", "coin", "aux_eps"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    # independent of batch composition: images 2..4 alone get the rows 2..4 of the whole batch
    part = draw_noise(1, 7, [4, 2, 3], **kw)
    assert torch.equal(part.gumbel, a.gumbel[[4, 2, 3]]) and torch.equal(part.eps, a.eps[[4, 2, 3]])
    # ... and streams are independent: dropping the aux stream changes nothing else
    no_aux = draw_noise(1, 7, range(6), **{**kw, "aux_shape": None})
    assert no_aux.aux_eps is None and torch.equal(no_aux.gumbel, a.gumbel)
    assert not torch.equal(draw_noise(1, 8, range(6), **kw).gumbel, a.gumbel)
    assert not torch.equal(draw_noise(2, 7, range(6), **kw).gumbel, a.gumbel)
    assert not torch.equal(a.gumbel[0], a.gumbel[1])
    assert mix(1, 2, 3) != mix(1, 3, 2) and 0 <= mix(5) < 2 ** 63
    # roughly the right distributions
    big = draw_noise(0, 0, range(40), num_pixels=500, max_objects=2, latent_size=50)
    assert abs(big.gumbel.mean().item() - 0.5772) < 0.05
    assert abs(big.eps.std().item() - 1.0) < 0.05 and 0 <= big.coin.min() and big.coin.max() < 1
    assert torch.equal(draw_normal(0, 1, [3], (2, 2)), draw_normal(0, 1, [0, 1, 2, 3], (2, 2))[3:])


def test_data_order_is_a_function_of_seed_and_step():
    N, B = 10, 4
    got = torch.cat([data_indices(3, s, B, N) for s in range(5)])  # 20 samples = 2 epochs
    assert sorted(got[:10].tolist()) == list(range(10)) and sorted(got[10:].tolist()) == list(range(10))
    assert torch.equal(data_indices(3, 2, B, N), data_indices(3, 2, B, N))
    assert not torch.equal(got[:10], got[10:])  # each epoch its own permutation
    assert not torch.equal(data_indices(4, 0, B, N), data_indices(3, 0, B, N))
    with pytest.raises(ValueError, match="empty"):
        data_indices(0, 0, 4, 0)


def test_same_seed_same_forward():
    x = images(3, 1, 12, 12)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        m = tiny()
        outs.append(m(x, noise=noise_for(m, 3, 12, 12, seed=9), tau=0.2, force_n_prob=0.3))
    assert torch.equal(outs[0].neg_elbo, outs[1].neg_elbo) and torch.equal(outs[0].index, outs[1].index)


# ---------------------------------------------------------------------------------------------
# Aux VAE
# ---------------------------------------------------------------------------------------------


def test_smooth_target_is_a_normalised_gaussian_blur():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 1, 20, 23, generator=g)
    assert smooth_target(t, 0.0) is t
    # Far from the edges an impulse becomes the 2-D Gaussian of σ = 1.5 px, cut at ±⌈3σ⌉ = ±5 px
    # along each axis and normalised to sum 1.
    imp = torch.zeros(1, 1, 31, 31)
    imp[0, 0, 15, 15] = 1.0
    b = smooth_target(imp, 1.5)
    yy, xx = torch.meshgrid(torch.arange(31.0), torch.arange(31.0), indexing="ij")
    expect = torch.exp(-((yy - 15) ** 2 + (xx - 15) ** 2) / (2 * 1.5**2))
    expect = torch.where(((yy - 15).abs() <= 5) & ((xx - 15).abs() <= 5), expect, torch.zeros(()))
    torch.testing.assert_close(b[0, 0], expect / expect.sum(), atol=1e-7, rtol=1e-5)
    # A constant map stays constant (replicated edges, normalised kernel); nothing becomes negative.
    torch.testing.assert_close(smooth_target(torch.full((1, 1, 9, 12), 3.0), 2.0), torch.full((1, 1, 9, 12), 3.0))
    assert (smooth_target(t, 3.0) >= 0).all()
    with pytest.raises(ValueError, match="sigma"):
        smooth_target(t, -1.0)


def test_peak_target_puts_one_cone_at_each_counted_maximum():
    # Blobs above the threshold at (4, 8), (20, 25) and at the corner (31, 39); one below it.
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(40.0), indexing="ij")

    def blob(r, c, h):
        return h * torch.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 4.0**2))

    t = (blob(4, 8, 30) + blob(20, 25, 22) + blob(20, 5, 9) + blob(31, 39, 18))[None, None]
    p = peak_target(t, 15.0, 31.0, radius=5.0)
    assert p.shape == t.shape and (p >= 0).all()
    assert ref.count_objects(p, 15.0, 10).item() == ref.count_objects(t, 15.0, 10).item() == 3
    for r, c in [(4, 8), (20, 25), (31, 39)]:
        assert p[0, 0, r, c].item() == pytest.approx(31.0)
        assert p[0, 0, r, c - 3].item() == pytest.approx(31.0 * (1 - 3 / 5))  # linear flank
        assert p[0, 0, r - 3, c - 4].item() == pytest.approx(0.0, abs=1e-6)  # r = 5: the cone's foot
    assert p[0, 0, 20, 5].item() == 0  # the blob under the threshold gets no cone
    # Every point of a flank has a higher neighbour: the apexes are the only local maxima.
    pooled = F.max_pool2d(F.pad(p, (1, 1, 1, 1), value=float("-inf")), 3, stride=1)
    assert int(((p >= pooled) & (p > 0)).sum()) == 3
    # Overlapping cones: the higher value wins (no sum above the height).
    two = torch.zeros(1, 1, 9, 9)
    two[0, 0, 4, 2], two[0, 0, 4, 6] = 20.0, 19.0
    q = peak_target(two, 1.0, 10.0, radius=3.0)
    assert q.max().item() == pytest.approx(10.0) and q[0, 0, 4, 4].item() == pytest.approx(10.0 / 3)
    assert peak_target(torch.zeros(2, 1, 7, 7), 1.0, 5.0, 2.0).abs().max() == 0


def test_ink_anchors_move_detections_to_the_ink_centroid():
    x = torch.zeros(2, 3, 24, 30)
    x[0, 0, 10:15, 4:9] = 1  # a 5×5 square centred at (12, 6)
    x[0, 1:, 3:6, 20:27] = 1  # a 3×7 bar centred at (4, 23), ink in two channels
    imp = torch.zeros(2, 1, 24, 30)
    imp[0, 0, 14, 8] = 1  # detected 2 px off the square's centre
    imp[0, 0, 2, 24] = 1  # detected off the bar's centre (its window holds the whole bar)
    imp[1, 0, 7, 7] = 1  # no ink within reach: stays where it is
    out = ink_anchors(imp, x, half=4)
    assert out.sum() == 3
    assert out[0, 0, 12, 6] == 1 and out[0, 0, 4, 23] == 1 and out[1, 0, 7, 7] == 1
    # Two detections of one object collapse onto its centroid.
    imp2 = torch.zeros(2, 1, 24, 30)
    imp2[0, 0, 11, 5] = imp2[0, 0, 13, 7] = 1
    out2 = ink_anchors(imp2, x, half=4)
    assert out2.sum() == 1 and out2[0, 0, 12, 6] == 1
    # No detections: nothing to move.
    assert ink_anchors(torch.zeros(1, 1, 5, 5), torch.ones(1, 1, 5, 5), 2).sum() == 0


@pytest.mark.parametrize("H,W", [(64, 64), (48, 48), (13, 18)])
def test_aux_vae_shapes_and_terms(H, W):
    aux = AuxVAE(3, width=8)
    x = images(2, 3, H, W)
    eps = torch.randn(2, *AuxVAE.latent_shape(H, W))
    out = aux(x, eps)
    h, w = out.kl_map.shape[-2:]
    assert out.kl_map.shape == (2, 1, *AuxVAE.latent_shape(H, W)[1:])
    assert H / 6 - 1 <= h <= H / 4 + 1 and W / 6 - 1 <= w <= W / 4 + 1
    assert out.target.shape == (2, 1, H, W) and not out.target.requires_grad
    torch.testing.assert_close(out.kl, out.kl_map.flatten(1).sum(1))
    assert (out.kl_map >= 0).all()
    torch.testing.assert_close(out.neg_elbo, out.recon + out.kl)
    h_loc = torch.randn(2, 1, H, W, requires_grad=True)
    wl = warmup_loss(h_loc, out.target)  # per image: summed over pixels, averaged over the batch
    torch.testing.assert_close(wl, ((h_loc - out.target) ** 2).sum() / 2)
    torch.testing.assert_close(warmup_loss(h_loc, out.target, reduction="mean"), ((h_loc - out.target) ** 2).mean())
    torch.testing.assert_close(warmup_loss(h_loc, out.target, scale=2.0, reduction="mean"),
                               ((h_loc - 2 * out.target) ** 2).mean())
    wl.backward()
    assert h_loc.grad is not None


def test_eval_mode_forward_uses_the_hard_draws_in_every_mode():
    """SPEC §3: the relaxed samples place the sprites only in training. In eval mode (or with
    hard=True) a relaxed-mode model reports the −ELBO of the hard draws, term by term what a
    straight-through model (hard in value) reports; in train mode the two differ."""
    H, W = 9, 10
    torch.manual_seed(4)
    relaxed = tiny((H, W), location_mode="relaxed", loc_kl="relaxed")
    st = tiny((H, W), location_mode="straight_through", loc_kl="straight_through")
    st.load_state_dict(relaxed.state_dict())
    x = images(3, 1, H, W, p=0.3)
    nz = noise_for(relaxed, 3, H, W, seed=2)
    relaxed.eval(), st.eval()
    a, b = relaxed(x, noise=nz, tau=0.5, force_n_prob=1.0), st(x, noise=nz, tau=0.5, force_n_prob=1.0)
    for k in ("recon", "kl_loc", "kl_app", "neg_elbo"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k))
    c = relaxed(x, noise=nz, tau=0.5, force_n_prob=1.0, hard=False)  # the relaxed objective
    assert not torch.allclose(c.recon, a.recon)


# ---------------------------------------------------------------------------------------------
# q's exclusion window (SPEC §2): exclusion_window, relaxed_log_q's candidate sets
# ---------------------------------------------------------------------------------------------


def _chebyshev_ok(index, n, w, W):
    """No present draw lies inside an earlier draw's w × w window (row and column distance both
    ≤ w//2); returns the number of pairs checked."""
    h, pairs = w // 2, 0
    for b in range(index.shape[0]):
        ps = [int(p) for p in index[b, : int(n[b])]]
        assert all(p >= 0 for p in ps), (b, ps)
        for i, p in enumerate(ps):
            for q in ps[:i]:
                pairs += 1
                assert max(abs(p // W - q // W), abs(p % W - q % W)) > h, f"image {b}: draws {ps}, window {w}"
    return pairs


def _pairs_inside(index, n, w, W):
    """How many pairs of present draws lie inside each other's w × w window."""
    h, count = w // 2, 0
    for b in range(index.shape[0]):
        ps = [int(p) for p in index[b, : int(n[b])]]
        count += sum(max(abs(p // W - q // W), abs(p % W - q % W)) <= h for i, p in enumerate(ps) for q in ps[:i])
    return count


def _gumbel(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).to(dtype)


@pytest.mark.parametrize("w", [1, 3, 5])
def test_relaxed_log_q_with_a_window_tends_to_the_exact_log_q(w):
    """As τ → 0 the relaxed rows become the hard draws and Σ_i ⟨r_i, log b^(i)⟩ the op's exact log q,
    with the model's own copy of the candidate-set rule (the window's neighbourhoods)."""
    from lavae_fast import ops

    H, W, M = 9, 11, 4
    g = torch.Generator().manual_seed(20 + w)
    h = torch.randn(3, H * W, generator=g, dtype=torch.float64) * 2
    gum = _gumbel((3, H * W), 30 + w)
    n = torch.tensor([4, 2, 0])
    kw = {} if w == 1 else {"window": w, "canvas": (H, W)}
    index, r_cold, lq = ops.gumbel_topk_relaxed(h, n, 1e-3, M, gum, **kw)
    if w > 1:
        _chebyshev_ok(index, n, w, W)
    val = LAVAE.relaxed_log_q(h, r_cold, index, **kw)
    torch.testing.assert_close(val, lq, rtol=1e-4, atol=1e-4)
    assert val[2].item() == 0.0
    if w > 1:  # the window matters here: the paper's candidate sets give another value
        assert float((LAVAE.relaxed_log_q(h, r_cold, index) - lq).abs().max()) > 0.1
        # and so does the canvas: the same window on the transposed canvas is another rule
        wrong = LAVAE.relaxed_log_q(h, r_cold, index, window=w, canvas=(W, H))
        assert float((wrong - lq).abs().max()) > 1e-3


@pytest.mark.parametrize("ops_name", ["reference", "fused"])
def test_relaxed_log_q_with_a_window_is_r_dot_log_b_and_finite_where_r_is_zero(ops_name):
    """With a window, r_i is exactly 0 on the earlier draws' windows, where log b^(i) = −∞: the term
    is masked (0, not 0·(−∞) = NaN), and value and gradients (to the logits and to r) are finite and
    those of an explicit loop over the windows."""
    from lavae_fast.ops import engine

    impl = engine(ops_name)
    H, W, M, w, tau = 7, 8, 4, 3, 0.3
    D = H * W
    g = torch.Generator().manual_seed(41)
    h0 = torch.randn(3, D, generator=g, dtype=torch.float64) * 2
    gum = _gumbel((3, D), 42)
    n = torch.tensor([4, 2, 0])
    coef = torch.randn(3, generator=g, dtype=torch.float64)
    h = h0.clone().requires_grad_(True)
    index, relaxed, _ = impl.gumbel_topk_relaxed(h, n, tau, M, gum, window=w, canvas=(H, W))
    assert (relaxed[0, 1:] == 0).sum() >= 3 * 4, "the case must have exact zeros in excluded windows"
    r_leaf = relaxed.detach().clone().requires_grad_(True)
    val = LAVAE.relaxed_log_q(h, relaxed, index, window=w, canvas=(H, W))
    gh, = torch.autograd.grad((coef * val).sum(), h)
    val_r = LAVAE.relaxed_log_q(h0, r_leaf, index, window=w, canvas=(H, W))
    gr, = torch.autograd.grad((coef * val_r).sum(), r_leaf)
    assert torch.isfinite(val).all() and torch.isfinite(gh).all() and torch.isfinite(gr).all()
    # The explicit loop: b^(i) over the pixels outside the windows of draws 0..i−1.
    h2 = h0.clone().requires_grad_(True)
    _, relaxed2, _ = impl.gumbel_topk_relaxed(h2, n, tau, M, gum, window=w, canvas=(H, W))
    explicit = []
    for b in range(3):
        excluded, tot = torch.zeros(D, dtype=torch.bool), h2.new_zeros(())
        for i in range(int(n[b])):
            assert (relaxed[b, i][excluded] == 0).all() and (gr[b, i][excluded] == 0).all()
            log_b = torch.log_softmax(h2[b].masked_fill(excluded, float("-inf")), 0).masked_fill(excluded, 0.0)
            tot = tot + (relaxed2[b, i] * log_b).sum()
            r, c = divmod(int(index[b, i]), W)
            excluded = excluded.clone()
            for rr in range(max(0, r - 1), min(H, r + 2)):
                for cc in range(max(0, c - 1), min(W, c + 2)):
                    excluded[rr * W + cc] = True
        explicit.append(tot)
    explicit = torch.stack(explicit)
    torch.testing.assert_close(val.detach(), explicit.detach(), rtol=1e-10, atol=1e-10)
    ge, = torch.autograd.grad((coef * explicit).sum(), h2)
    torch.testing.assert_close(gh, ge, rtol=1e-9, atol=1e-10)


def _blunt_peaks(m, H, W):
    """h_loc with three counted peaks: a blunt one at (3, 3) (its 8 neighbours just below it, not
    counted, but drawn next without a window), and single-pixel ones at (7, 8) and (1, 8)."""
    gamma = m.gamma_for(H, W)
    h = torch.zeros(3, 1, H, W)
    for b in range(3):
        h[b, 0, 2:5, 2:5] = 7.9 * gamma
        h[b, 0, 3, 3] = 8 * gamma
        h[b, 0, 7, 8] = 6 * gamma
        h[b, 0, 1, 8] = 5.5 * gamma
    h[2, 0, 1, 8] = 0.0  # image 2: two objects
    return h, gamma


class _DrawSpy:
    """An engine that records every gumbel_topk_relaxed call (its counts, draws and window keywords)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def gumbel_topk_relaxed(self, logits, n, tau, max_objects, gumbel, **kw):
        out = self.engine.gumbel_topk_relaxed(logits, n, tau, max_objects, gumbel, **kw)
        self.calls.append((n.clone(), out[0].clone(), dict(kw)))
        return out


@pytest.mark.parametrize("ops_name", ["reference", "fused"])
def test_exclusion_window_keeps_every_draw_outside_the_earlier_windows(ops_name):
    """A LAVAE with exclusion_window=3: the training draws (train and eval mode), the bound's draws
    and infer(locations="top") never put a draw inside an earlier draw's 3×3 window; with window 1
    the same noise puts later draws on the blunt peak's shoulders."""
    H, W = 10, 11
    torch.manual_seed(7)
    m = tiny((H, W), ops=ops_name, exclusion_window=3)
    assert m.exclusion_window == 3
    h, gamma = _blunt_peaks(m, H, W)
    m.loc_head.register_forward_hook(lambda mod, inp, out: h / gamma)
    x = images(3, 1, H, W, p=0.3)
    nz = noise_for(m, 3, H, W, seed=5)
    with torch.no_grad():
        assert m.encode(x)[2].tolist() == [3, 3, 2]
    top = m.infer(x, locations="top")
    assert top.index.tolist() == [[3 * W + 3, 7 * W + 8, 1 * W + 8, -1]] * 2 + [[3 * W + 3, 7 * W + 8, -1, -1]]
    spy = _DrawSpy(m.engine)
    m._ops = spy
    m.train()
    out_train = m(x, noise=nz, tau=0.5)
    out_train.loss.backward()
    m.eval()
    out_eval = m(x, noise=nz, tau=0.5)
    ll = m.log_likelihood(x, K=6, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out_train.loss) and torch.isfinite(out_eval.neg_elbo).all() and torch.isfinite(ll).all()
    m.infer(x, locations="top")
    assert len(spy.calls) == 4
    pairs = 0
    for n, index, kw in spy.calls:
        assert kw == {"window": 3, "canvas": (H, W)}
        pairs += _chebyshev_ok(index, n, 3, W)
    assert pairs >= 4 * (3 + 3 + 1)
    for out in (out_train, out_eval):
        _chebyshev_ok(out.index, out.n, 3, W)
    # The same model and noise with the paper's window: later draws land next to the first one.
    m.set_exclusion_window(1)
    spy.calls.clear()
    m(x, noise=nz, tau=0.5)
    m.log_likelihood(x, K=6, generator=torch.Generator().manual_seed(1))
    assert all(kw == {} for _, _, kw in spy.calls)
    assert sum(_pairs_inside(index, n, 3, W) for n, index, _ in spy.calls) > 0
    assert m.infer(x, locations="top").index[0, 1].item() in {2 * W + 2, 2 * W + 3, 2 * W + 4, 3 * W + 2, 3 * W + 4,
                                                               4 * W + 2, 4 * W + 3, 4 * W + 4}


def test_fused_and_reference_ops_agree_with_an_exclusion_window():
    """The fused and the reference engine give the same draws, −ELBO and gradients with
    exclusion_window=3 (the tolerance rule of tests/_tolerance.py), on images with 2–3 objects."""
    H = W = 12
    x = images(3, 1, H, W)
    torch.manual_seed(1)

    def make(ops_name):
        m = tiny((H, W), ops=ops_name, exclusion_window=3)
        h, gamma = _blunt_peaks(m, 10, 11)
        h = F.pad(h, (0, 1, 0, 2))  # the 10×11 peaks on the 12×12 canvas
        m.loc_head.register_forward_hook(lambda mod, inp, out: h / gamma + 0.02 * out)
        return m

    fused = make("fused")
    steps = compare_models(lambda: fused, lambda: make("reference"), x, noise_for(fused, 3, H, W), tau=0.3)
    n, index = steps[0]["discrete"]
    assert n.tolist() == [3, 3, 2]
    _chebyshev_ok(index, n, 3, W)
    assert_step_matches_reference(*steps)
    # The forward loss itself, one model switched between the engines.
    fused.train()
    nz = noise_for(fused, 3, H, W, seed=3)
    a = fused(x, noise=nz, tau=0.3).neg_elbo.detach()
    fused.set_ops("reference")
    b = fused(x, noise=nz, tau=0.3).neg_elbo.detach()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_exclusion_window_pickles_and_an_old_pickle_loads_as_1():
    import copy
    import pickle

    m5 = tiny((12, 12), exclusion_window=5)
    assert pickle.loads(pickle.dumps(m5)).exclusion_window == 5
    assert copy.deepcopy(m5).exclusion_window == 5
    assert tiny((12, 12)).exclusion_window == 5  # the default where the canvas holds it (144 > 3·25)
    assert tiny((12, 12), max_objects=10).exclusion_window == 3  # 144 > 9·9, not 9·25: the largest that fits
    assert tiny((8, 8), max_objects=10).exclusion_window == 1
    with pytest.raises(ValueError, match="exclusion_window=5 is too large.*largest that fits is 3"):
        tiny((12, 12), max_objects=10, exclusion_window=5)  # an explicit window is never reduced
    state = m5.__getstate__()
    del state["_exclusion_window"]  # a model pickled before the option existed excluded only the pixel
    old = LAVAE.__new__(LAVAE)
    old.__setstate__(state)
    assert old.exclusion_window == 1
    m5.exclusion_window = 3
    assert m5.exclusion_window == 3
