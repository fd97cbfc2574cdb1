"""Location-gradient estimators against the exact gradient, on cases small enough to enumerate.

    python bench/estimators.py [--quick] [--json PATH] [--threads N] [--draws K] [--seed S]

What training differentiates (SPEC §3) is a one-sample surrogate of the expected reconstruction
log-likelihood E_{z~q}[log p(x|z)], where z holds n locations drawn without replacement from
b = softmax(h_loc). On a small canvas with one or two objects every placement can be enumerated,
so the expectation, and its gradient on h_loc, are exact (autograd through the enumeration). Each
estimator's per-draw gradient — the gradient of the surrogate the model builds in that location
mode, with the project's own ops, :func:`lavae_fast.ops.gumbel_topk_relaxed` and
:func:`lavae_fast.ops.place_and_loglik` — is then compared with it over many Gumbel draws:

* ``straight_through``: z = onehot − r.detach() + r; the value is the hard placement (the op
  scatters at the drawn index), the gradient the dense correlation with the relaxed sample r.
* ``relaxed``: the relaxed samples r themselves place the sprites (dense correlation).

The sprites are fixed per slot (the model decodes them from z_app read at the drawn location; the
appearance path is not what is measured here). Cases (C = 1):

* ``one``: one object, 12×12, a 5×5 sprite with values in (0.3, 0.95) (the decoder's sigmoid);
* ``two``: two different 3×3 sprites on 8×8 (D·(D−1) = 4032 ordered placements);
* ``saturated``: one 5×5 sprite of ones (a saturated sigmoid) on 12×12: wherever it lands off
  the ink it paints background pixels at λ = 1 − ε, where the slope of log(1 − λ) is 1/ε, in both
  modes.

The logits are a seeded random field with a bump near (not on) each object, so that the
distribution is spread over a few placements and the exact gradient is informative.

Columns (per case, mode, ε, τ; K draws, the same Gumbel draws for every row): ``|g*|max`` the
exact gradient's largest entry; ``cos`` the cosine of the estimator's mean to the exact gradient;
``relerr`` ‖mean − g*‖/‖g*‖; ``mc`` the Monte Carlo part of it, ‖std/√K‖/‖g*‖ (relerr well
above mc is bias); ``cos1`` the median over draws of one draw's cosine; ``med``/``max`` the median
and maximum over draws of a draw's largest |∂/∂h| entry.

Measured (default run, 4000 draws, 1 thread, bench/results/estimators_cpu_t1.json; ~12 s):

* ``straight_through``: the mean points the right way (cos 0.79–0.99) but is ~1/ε too long:
  relerr 300–590 at ε = 1e-4, 40–78 at 1e-3, 5–11 at 1e-2, at every τ; single draws reach
  6.6e5 (one object) and 4.4e6 (saturated) at τ = 0.02, ε = 1e-4, against |g*| ≤ 15.
* ``relaxed``, one object: relerr 0.48 → 0.13 → 0.10 from τ = 0.5 to 0.1 (bias), then the
  Monte Carlo part (spread ∝ 1/τ) dominates. Saturated sprite: single draws grow as 1/τ (90 → 2e3)
  but not as 1/ε (2.0e3 at ε = 1e-4, 1.7e3 at 1e-2): the relaxed λ reaches 1 − ε only where r is
  one-hot, and there ∂r vanishes.
* ``relaxed``, two objects: aligned (cos ≥ 0.88) but ~1.6× too long, a bias that does not fall
  with τ (relerr 0.60, 0.68, 0.64 at τ = 0.1, 0.02, 0.005 with 40000 draws, ε = 1e-2; the exact
  gradient agrees with a score-function estimate to 1.6%). Cause: step 2's relaxed sample is
  masked by the *hard* first draw, so the surrogate jumps where the first two draws swap order,
  and a pathwise gradient cannot see a jump. Checked: along g*'s direction, central differences
  of the *mean* relaxed objective (100000 common draws, δ = 0.05) give 4.27 ± 0.07 at τ = 0.1 and
  4.15 ± 0.09 at τ = 0.02, the exact value is 4.23, the pathwise mean 6.55 and 6.70. (A relaxed
  top-k whose later steps are masked by the earlier relaxed samples would be continuous in h.)

A second table measures the location KL term the same way: each ``--loc-kl`` option's per-draw
gradient of log q(z_loc) (:meth:`lavae_fast.model.LAVAE.location_log_q`) against the exact
gradient of E_q[log q] (log p is constant in h). Measured: ``straight_through`` and ``relaxed``
agree to within the Monte Carlo error for one object (relerr 0.08–0.29, mc 0.06–0.37) and are
aligned but ~0.35 off for two (the jump again); ``hard`` has mean zero (relerr ≈ 1): it carries
none of the KL's gradient. Per draw the KL term's gradient is O(1) (≤ 64 at τ = 0.02), against
10³–10⁶ for the reconstruction's straight-through estimate at ε = 1e-4.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and ROOT not in sys.path:
    # The estimator math of the checkout in front of us (no kernels are timed: the Python
    # fallback of the ops gives the same values and gradients as the C++ kernels, tests/test_ops).
    sys.path.insert(0, ROOT)

from lavae_fast import ops  # noqa: E402
from lavae_fast.noise import gumbel_from_uniform  # noqa: E402

MODES = ("straight_through", "relaxed")
TAUS = (0.5, 0.2, 0.1, 0.05, 0.02)  # the schedule's range (SPEC §3)
EPSILONS = (1e-4, 1e-3, 1e-2)  # 1e-4 is the model's (SPEC §1)
CASES = ("one", "two", "saturated")


@dataclass
class Case:
    """A brute-forceable scene: x [1,1,H,W] in {0,1}, sprites [1,n,1,S,S], logits h [D]."""

    name: str
    x: Tensor
    sprites: Tensor
    h: Tensor
    note: str

    @property
    def n(self) -> int:
        return self.sprites.shape[1]

    @property
    def H(self) -> int:
        return self.x.shape[-2]

    @property
    def W(self) -> int:
        return self.x.shape[-1]

    @property
    def D(self) -> int:
        return self.H * self.W

    def describe(self) -> dict:
        return {"name": self.name, "objects": self.n, "canvas": [self.H, self.W], "sprite": self.sprites.shape[-1],
                "note": self.note}


def _blob(S: int) -> Tensor:
    """An S×S sprite in (0.3, 0.95): high in the middle, lower at the rim (a sigmoid's range)."""
    r = torch.arange(S, dtype=torch.float32) - S // 2
    d2 = r[:, None] ** 2 + r[None, :] ** 2
    return 0.3 + 0.65 * torch.exp(-d2 / (S * S / 8))


def _logits(H: int, W: int, bumps, seed: int) -> Tensor:
    """A seeded random field (std 1) plus a Gaussian bump of height 3 at each (row, col)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(H, W, generator=g)
    rr, cc = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for r, c in bumps:
        h = h + 3.0 * torch.exp(-((rr - r) ** 2 + (cc - c) ** 2).float() / 4.0)
    return h.flatten()


def _ink(H: int, W: int, sprite: Tensor, at) -> Tensor:
    """x: the sprite's pixels above ½ inked at ``at`` (row, col of its centre), clipped to the canvas."""
    x = torch.zeros(H, W)
    S = sprite.shape[-1]
    r0, c0 = at[0] - S // 2, at[1] - S // 2
    for u in range(S):
        for v in range(S):
            if 0 <= r0 + u < H and 0 <= c0 + v < W and sprite[u, v] > 0.5:
                x[r0 + u, c0 + v] = 1.0
    return x


def make_case(name: str, seed: int = 0) -> Case:
    """One of :data:`CASES` (see the module docstring)."""
    if name == "one":
        H = W = 12
        s = _blob(5)
        x = _ink(H, W, s, (5, 6))
        h = _logits(H, W, [(6, 7)], seed)
        sprites = s[None, None, None]
        note = "one object, sprite values in (0.3, 0.95)"
    elif name == "two":
        H = W = 8
        s1 = _blob(3)
        s2 = torch.tensor([[0.9, 0.2, 0.9], [0.2, 0.9, 0.2], [0.9, 0.2, 0.9]])  # an ×, unlike the blob
        x = torch.maximum(_ink(H, W, s1, (2, 2)), _ink(H, W, s2, (5, 5)))
        h = _logits(H, W, [(2, 3), (5, 4)], seed)
        sprites = torch.stack([s1, s2])[None, :, None]
        note = "two objects, different sprites, ordered placements without replacement"
    elif name == "saturated":
        H = W = 12
        s = torch.ones(5, 5)
        x = _ink(H, W, s, (5, 6))
        h = _logits(H, W, [(6, 7)], seed)
        sprites = s[None, None, None]
        note = "one saturated sprite (all ones): off the ink it paints background at λ = 1−ε"
    else:
        raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    return Case(name, x[None, None], sprites.float(), h.float(), note)


# ---------------------------------------------------------------------------------------------
# The exact expectation, by enumeration
# ---------------------------------------------------------------------------------------------


def placement_loglik(case: Case, eps: float, chunk: int = 1024) -> Tensor:
    """log p(x | z) for every placement, float64: [D] for one object, [D, D] (row: the first
    draw, column: the second; the diagonal is never drawn) for two. Computed with
    :func:`lavae_fast.ops.place_and_loglik` at one-hot maps, as the model's hard placement."""
    n, D, H, W = case.n, case.D, case.H, case.W
    if n == 1:
        index = torch.arange(D)[:, None]
    elif n == 2:
        a = torch.arange(D)
        index = torch.stack(torch.meshgrid(a, a, indexing="ij"), -1).reshape(D * D, 2)
    else:
        raise ValueError(f"exact enumeration is implemented for one or two objects, got {n}")
    out = []
    for lo in range(0, index.shape[0], chunk):
        idx = index[lo:lo + chunk]
        P = idx.shape[0]
        maps = F.one_hot(idx, D).to(case.sprites.dtype).view(P, n, H, W)
        nn_ = torch.full((P,), n, dtype=torch.long)
        out.append(ops.place_and_loglik(case.x.expand(P, -1, -1, -1), case.sprites.expand(P, -1, -1, -1, -1),
                                        maps, nn_, index=idx, eps=eps))
    ll = torch.cat(out).double()
    return ll if n == 1 else ll.view(D, D)


def exact_expectation(h: Tensor, table: Tensor) -> Tensor:
    """E_{z~q}[log p(x|z)] for logits h [D] (differentiable) and the table of
    :func:`placement_loglik`: Σ_d b_d·LL(d) for one object; for two, Σ over ordered pairs
    d₁ ≠ d₂ of b_{d₁}·b_{d₂}/(1 − b_{d₁})·LL(d₁, d₂) (sampling without replacement, eq. 11)."""
    h = h.double()
    log_b1 = torch.log_softmax(h, 0)
    if table.dim() == 1:
        return (log_b1.exp() * table).sum()
    D = h.shape[0]
    eye = torch.eye(D, dtype=torch.bool)
    log_b2 = torch.log_softmax(h[None, :].expand(D, D).masked_fill(eye, float("-inf")), 1)  # row d₁ drawn
    p = (log_b1[:, None] + log_b2).exp()  # exactly 0 on the diagonal
    return (p * table.masked_fill(eye, 0.0)).sum()


def exact_gradient(case: Case, eps: float) -> Tensor:
    """∂/∂h_loc of the exact expected reconstruction log-likelihood [D], float64."""
    h = case.h.double().requires_grad_(True)
    (g,) = torch.autograd.grad(exact_expectation(h, placement_loglik(case, eps)), h)
    return g


# ---------------------------------------------------------------------------------------------
# The per-sample surrogates, as the model builds them (lavae_fast/model.py, forward)
# ---------------------------------------------------------------------------------------------


def draw_gumbel(K: int, D: int, seed: int) -> Tensor:
    """K rows of standard Gumbel noise [K, D] (float32), from a seeded generator."""
    u = torch.rand(K, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return gumbel_from_uniform(u).float()


def surrogate(h_rows: Tensor, case: Case, gumbel: Tensor, tau: float, mode: str, eps: float) -> Tensor:
    """The reconstruction log-likelihood of each draw [K] with the placement of ``mode``:
    h_rows [K, D] logits (one row per draw, so that each row's gradient is that draw's estimate),
    gumbel [K, D]. Same ops and the same straight-through construction as ``LAVAE.forward``."""
    K, D = h_rows.shape
    n = torch.full((K,), case.n, dtype=torch.long)
    index, relaxed, _ = ops.gumbel_topk_relaxed(h_rows, n, float(tau), case.n, gumbel)
    if mode == "straight_through":
        hard = F.one_hot(index.clamp(min=0), D).to(relaxed.dtype) * (index >= 0).to(relaxed.dtype)[..., None]
        z, kw = hard - relaxed.detach() + relaxed, {"index": index}
    elif mode == "relaxed":
        z, kw = relaxed, {}
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    x = case.x.expand(K, -1, -1, -1)
    sprites = case.sprites.expand(K, -1, -1, -1, -1)
    return ops.place_and_loglik(x, sprites, z.view(K, case.n, case.H, case.W), n, eps=eps, **kw)


def per_draw_gradients(case: Case, gumbel: Tensor, tau: float, mode: str, eps: float) -> Tensor:
    """Each draw's estimate of ∂E[log p(x|z)]/∂h_loc [K, D] (float32, as in training)."""
    h_rows = case.h[None].expand(gumbel.shape[0], -1).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(surrogate(h_rows, case, gumbel, tau, mode, eps).sum(), h_rows)
    return g


def compare(G: Tensor, exact: Tensor) -> dict:
    """Statistics of per-draw estimates G [K, D] against the exact gradient [D] (see the module
    docstring for the columns)."""
    G = G.double()
    K = G.shape[0]
    norm = exact.norm().item()
    mean = G.mean(0)
    se = G.std(0) / math.sqrt(K) if K > 1 else torch.zeros_like(mean)
    size = G.abs().amax(1)
    cos1 = F.cosine_similarity(G, exact[None], dim=1)
    return {
        "exact_max": exact.abs().max().item(),
        "exact_norm": norm,
        "cos": F.cosine_similarity(mean, exact, dim=0).item(),
        "relerr": (mean - exact).norm().item() / norm,
        "mc": se.norm().item() / norm,
        "cos1_median": cos1.median().item(),
        "draw_max_median": size.median().item(),
        "draw_max_max": size.max().item(),
        "finite": bool(torch.isfinite(G).all()),
    }


# ---------------------------------------------------------------------------------------------
# The location KL term: the options of LAVAE.location_log_q against E_q[log q] by enumeration
# ---------------------------------------------------------------------------------------------


def exact_log_q_expectation(h: Tensor, n: int) -> Tensor:
    """E_{z~q}[log q(z)] (minus the entropy of n ordered draws without replacement) for logits h
    [D], differentiable; log p(z) is a constant, so this carries the whole gradient of the KL."""
    h = h.double()
    log_b1 = torch.log_softmax(h, 0)
    if n == 1:
        return (log_b1.exp() * log_b1).sum()
    if n != 2:
        raise ValueError(f"exact enumeration is implemented for one or two objects, got {n}")
    D = h.shape[0]
    eye = torch.eye(D, dtype=torch.bool)
    log_b2 = torch.log_softmax(h[None, :].expand(D, D).masked_fill(eye, float("-inf")), 1).masked_fill(eye, 0.0)
    log_p = (log_b1[:, None] + log_b2).masked_fill(eye, float("-inf"))
    return (log_p.exp() * log_p.masked_fill(eye, 0.0)).sum()


def loc_kl_gradients(case: Case, gumbel: Tensor, tau: float, loc_kl: str) -> Tensor:
    """Each draw's gradient on h_loc of the training term log q(z_loc) of ``loc_kl`` [K, D], built
    by :meth:`lavae_fast.model.LAVAE.location_log_q`, as the model builds it."""
    from lavae_fast.model import LAVAE

    K = gumbel.shape[0]
    h_rows = case.h[None].expand(K, -1).clone().requires_grad_(True)
    n = torch.full((K,), case.n, dtype=torch.long)
    index, relaxed, log_q = ops.gumbel_topk_relaxed(h_rows, n, float(tau), case.n, gumbel)
    (g,) = torch.autograd.grad(LAVAE.location_log_q(h_rows, relaxed, index, log_q, loc_kl).sum(), h_rows)
    return g


def run_loc_kl(cases=("one", "two"), taus=TAUS, draws: int = 4000, seed: int = 0):
    """Rows (case, loc_kl, tau, :func:`compare`'s stats) for the location KL term's gradient."""
    from lavae_fast.model import LAVAE

    rows = []
    for name in cases:
        case = make_case(name, seed)
        gumbel = draw_gumbel(draws, case.D, seed + 1)
        h = case.h.double().requires_grad_(True)
        (exact,) = torch.autograd.grad(exact_log_q_expectation(h, case.n), h)
        for loc_kl in LAVAE.LOC_KL_CHOICES:
            for tau in taus:
                stats = compare(loc_kl_gradients(case, gumbel, tau, loc_kl), exact)
                rows.append({"case": name, "loc_kl": loc_kl, "tau": tau, "draws": draws, **stats})
    return rows


def format_kl_table(rows) -> str:
    head = (f"{'case':<10} {'loc_kl':<16} {'tau':>5} {'|g*|max':>8} {'cos':>6} {'relerr':>8} {'mc':>7} "
            f"{'cos1':>6} {'med':>9} {'max':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<10} {r['loc_kl']:<16} {r['tau']:>5.2f} {r['exact_max']:>8.3g} {r['cos']:>+6.2f} "
                     f"{r['relerr']:>8.3g} {r['mc']:>7.2g} {r['cos1_median']:>+6.2f} {r['draw_max_median']:>9.3g} "
                     f"{r['draw_max_max']:>9.3g}")
    return "\n".join(lines)


def run(cases=CASES, modes=MODES, taus=TAUS, epsilons=EPSILONS, draws: int = 4000, seed: int = 0):
    """Every row of the grid: list of dicts (case, mode, eps, tau, K and :func:`compare`'s stats)."""
    rows = []
    for name in cases:
        case = make_case(name, seed)
        gumbel = draw_gumbel(draws, case.D, seed + 1)  # the same draws for every row of the case
        for eps in epsilons:
            exact = exact_gradient(case, eps)
            for mode in modes:
                for tau in taus:
                    stats = compare(per_draw_gradients(case, gumbel, tau, mode, eps), exact)
                    rows.append({"case": name, "mode": mode, "eps": eps, "tau": tau, "draws": draws, **stats})
    return rows


def format_table(rows) -> str:
    head = (f"{'case':<10} {'mode':<16} {'eps':>7} {'tau':>5} {'|g*|max':>8} {'cos':>6} {'relerr':>8} {'mc':>7} "
            f"{'cos1':>6} {'med':>9} {'max':>9}")
    lines = [head, "-" * len(head)]
    prev = None
    for r in rows:
        key = (r["case"], r["eps"])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        lines.append(f"{r['case']:<10} {r['mode']:<16} {r['eps']:>7.0e} {r['tau']:>5.2f} {r['exact_max']:>8.3g} "
                     f"{r['cos']:>+6.2f} {r['relerr']:>8.3g} {r['mc']:>7.2g} {r['cos1_median']:>+6.2f} "
                     f"{r['draw_max_median']:>9.3g} {r['draw_max_max']:>9.3g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 200 draws, τ ∈ {0.5, 0.02}, ε ∈ {1e-4, 1e-2}")
    p.add_argument("--draws", type=int, default=None, help="Gumbel draws per row (default 4000; --quick 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", default=None, help="write {environment, cases, rows} as JSON here")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    draws = args.draws if args.draws is not None else (200 if args.quick else 4000)
    if draws < 2:
        p.error(f"--draws must be at least 2 (the spread needs two), got {draws}")
    torch.set_num_threads(args.threads)
    taus = (TAUS[0], TAUS[-1]) if args.quick else TAUS
    epsilons = (EPSILONS[0], EPSILONS[-1]) if args.quick else EPSILONS
    t0 = time.time()
    rows = run(cases, MODES, taus, epsilons, draws, args.seed)
    print(f"# location-gradient estimators vs the exact gradient of E_q[log p(x|z)] on h_loc; "
          f"{draws} Gumbel draws per row, seed {args.seed}")
    for name in cases:
        c = make_case(name, args.seed)
        print(f"# {name}: {c.n} object(s), {c.H}x{c.W}, sprite {c.sprites.shape[-1]} px; {c.note}")
    print(format_table(rows))
    kl_cases = [c for c in cases if c != "saturated"]  # the KL term does not see the sprites
    kl_rows = run_loc_kl(kl_cases, taus, draws, args.seed)
    print("# location KL term: each --loc-kl option's gradient of log q(z_loc) vs the exact gradient of E_q[log q]")
    print(format_kl_table(kl_rows))
    print(f"# {time.time() - t0:.1f} s, {torch.get_num_threads()} thread(s)")
    if args.json:
        if ROOT not in sys.path:
            sys.path.append(ROOT)  # bench.common, when this module was imported from elsewhere
        from bench.common import environment

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "cases": [make_case(c, args.seed).describe() for c in cases],
                       "rows": rows, "loc_kl_rows": kl_rows}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
