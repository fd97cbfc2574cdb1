"""CPU throughput of the engine: eager reference vs fused C++ kernels, in the same run.

    python bench/throughput.py [--quick] [--only ops,scaling] [--json PATH] [--threads N] [--thp]

Sections (``--only`` picks some; each is a function ``section_<name>(ctx) -> rows``, registered
in SECTIONS, so later work can add e.g. training-step rows with ``pass = "step"``):

* ``ops``: each op at the paper's shapes (B = 64, 64×64, M = 10 with every slot present; C = 1,
  S = 17 and C = 3, S = 21; K = 2L = 64 appearance features), forward and forward+backward,
  reference vs fused, with the targets checked (PASS/FAIL) on ratios measured in the same run;
  Gumbel top-k also with the exclusion window (SPEC §2): window 5 at B = 64 (every slot present),
  and windows 1 and 5 at the 64×64 model's training shape (B = 16, n uniform in 0..3), the
  reference run with the same window, target fused >= 10x the reference fwd+bwd for each
  (rows "gumbel_topk_relaxed[w=5]", "gumbel_topk_relaxed[B=16,n=0-3]", "…[B=16,n=0-3,w=5]");
* ``gumbel``: only the Gumbel top-k rows (window 1 and 5, both shapes), to re-measure them alone;
* ``scaling``: fused placement forward+backward against canvas size (32² to 256²) and number of
  objects (1 to 32), with the correlation's FLOP rate;
* ``step``, ``eval``: a whole training step and the importance-sampled evaluation
  (bench/training_step.py);
* ``profile``: where the default training step's time goes (each operator call timed, grouped
  into categories; not in the default run, written to the JSON under "profile");
* ``gpu``: bench/gpu_bench.py's rows when a CUDA device is present (skipped otherwise).

Timing: implementations are called round-robin (one call each per round) so that they share the
machine's load at the same moments; each row gives the median and the 20th/80th percentiles.
The yardstick of the placement correlation is the float32 matmul rate (sgemm): FLOP bound =
2·B·M·C·D·S² / rate. For the target a 1024² matmul is timed in the same rounds as the placement
kernels (so it sees the same machine load); a 2048² figure from the start of the run is printed too.

``--thp`` sets THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU allocator then backs large tensors with
transparent huge pages): on machines where page faults are slow, allocating the 67 MB gradient of
h_app dominates the gather op for both implementations; the default leaves the allocator alone.

The output records the machine: CPU model and flags, PyTorch's and lavae_fast's kernel ISA (and
any ISA cap set in the environment: LAVAE_FAST_CPU_CAPABILITY caps the lavae_fast kernels,
ATEN_CPU_CAPABILITY PyTorch's and ours), the load average at the start and the end (and, in the
Gumbel rows, when each was measured).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--thp" in sys.argv:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read once, at PyTorch's first allocation

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # for the bench package; which lavae_fast is measured: use_engine

from bench.common import environment, load_average, sgemm_rate, time_interleaved, use_engine  # noqa: E402

use_engine(ROOT, require_cpu_kernels=__name__ == "__main__")
from lavae_fast import ops, performance  # noqa: E402
from lavae_fast import reference as ref  # noqa: E402

B, H, W, M, K = 64, 64, 64, 10, 64
EPS = 1e-4
SPRITE = {1: 17, 3: 21}  # multi-MNIST and multi-dSprites sprite sides
GAMMA = 0.5 * math.log(H * W)


class Context:
    def __init__(self, args, rate):
        self.args = args
        self.quick = args.quick
        self.rate = rate  # sgemm FLOP/s
        self.reps = 5 if args.quick else args.reps
        self.budget = 3.0 if args.quick else 25.0
        self.targets = []  # (description, passed, detail)
        self.extra = {}  # further JSON entries (the profile section's breakdown)
        # A float32 matmul timed alongside the placement kernels: the FLOP-rate yardstick.
        self.sgemm_n = 1024
        a, b = torch.randn(self.sgemm_n, self.sgemm_n), torch.randn(self.sgemm_n, self.sgemm_n)
        c = torch.empty(self.sgemm_n, self.sgemm_n)
        self.sgemm_fn = lambda: torch.mm(a, b, out=c)
        self.sgemm_flops = 2.0 * self.sgemm_n**3

    def time(self, fns):
        return time_interleaved(fns, reps=self.reps, warmup=1 if self.quick else 2, budget_s=self.budget)


def _row(op, pas, impl, C, timing, **extra):
    row = {"op": op, "pass": pas, "impl": impl, "C": C}
    row.update(timing)
    row.update(extra)
    return row


def _ratio(rows, op, pas, C, slow, fast, key="median_ms"):
    """Time of `slow` over time of `fast` (median by default; key="p20_ms" for the 20th
    percentiles, which show the ratio with less of the shared machine's noise)."""
    a, b = _pick(rows, op, pas, slow, C, key), _pick(rows, op, pas, fast, C, key)
    return None if a is None or b is None else a / b


def _ratio_text(rows, op, pas, C, slow, fast):
    return (f"{_ratio(rows, op, pas, C, slow, fast):.2f}x "
            f"(20th percentiles: {_ratio(rows, op, pas, C, slow, fast, 'p20_ms'):.2f}x)")


# ---------------------------------------------------------------------------------------------
# Inputs at the paper's shapes
# ---------------------------------------------------------------------------------------------


def place_inputs(C, S, b=B, h=H, w=W, m=M, seed=0, training_counts=False):
    """Inputs of placement + log-likelihood: every slot present (n = M), or with
    ``training_counts`` n drawn uniformly from {0, 1, 2, 3} per image, as in training (SPEC §8),
    where the dense pass's work is proportional to Σn."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(b, C, h, w, generator=g) < 0.2).float()
    sprites = torch.rand(b, m, C, S, S, generator=g)
    if training_counts:
        n = torch.randint(0, 4, (b,), generator=g)
    else:
        n = torch.full((b,), m, dtype=torch.long)
    index = torch.randint(0, h * w, (b, m), generator=g)
    loc = F.one_hot(index, h * w).float().view(b, m, h, w)
    return x, sprites, loc, n, index


def place_fns(x, sprites, loc, n, index, backward):
    """Callables for every implementation of placement + log-likelihood."""
    H_, W_ = x.shape[-2:]
    sp = sprites.clone().requires_grad_(backward)
    lc = loc.clone().requires_grad_(backward)
    gl = torch.ones(x.shape[0])

    def run(f):
        if not backward:
            def fwd():
                with torch.no_grad():
                    f()
            return fwd

        def fwd_bwd():
            torch.autograd.grad(f(), (sp, lc), gl)
        return fwd_bwd

    fns = {
        "fused": run(lambda: ops.place_and_loglik(x, sp, lc, n, index=index)),
        "reference": run(lambda: ref.place_and_loglik(x, sp, lc, n, index=index)),
        "fused-dense": run(lambda: ops.place_and_loglik(x, sp, lc, n)),
        "reference-dense": run(lambda: ref.place_and_loglik(x, sp, lc, n)),
    }
    if not backward:
        # What an eager implementation of the index-mode forward would do without the dense
        # gradient path: scatter the sprites into a padded canvas, then the log-likelihood.
        fns["eager-scatter"] = run(lambda: ref.bernoulli_loglik(x, ref.compose_index(sp, index, n, H_, W_), EPS))
    return fns


def correlation_flops(b, m, C, h, w, S):
    return 2.0 * b * m * C * h * w * S * S


def _dense_training_counts(ctx, C, S, rate):
    """Dense placement + log-likelihood (the relaxed samples place the sprites) with n drawn from
    0–3 per image as in training: rows ``place_and_loglik[n=0-3]`` and a target against the pass's
    own FLOPs, one correlation forward and three forward+backward, counted over the present slots."""
    x, sprites, loc, n, index = place_inputs(C, S, training_counts=True, seed=1)
    op = "place_and_loglik[n=0-3]"
    flops = correlation_flops(1, int(n.sum()), C, H, W, S)
    rows = []
    for backward, pas in [(False, "fwd"), (True, "fwd+bwd")]:
        fns = place_fns(x, sprites, loc, n, index, backward=backward)
        fns = {k: fns[k] for k in ("fused-dense", "reference-dense")}
        fns["sgemm"] = ctx.sgemm_fn
        res = ctx.time(fns)
        t = res.pop("sgemm")
        rate_now = ctx.sgemm_flops / (t["median_ms"] * 1e-3)
        for impl, tt in res.items():
            rows.append(_row(op, pas, impl, C, tt, S=S, B=B, H=H, W=W, M=M, n=int(n.sum()), mode="dense",
                             sgemm_gflops=rate_now / 1e9))
        _progress(rows[-len(res):])
        k = 1 if pas == "fwd" else 3
        b = k * flops / rate_now * 1e3
        tf = _pick(rows, op, pas, "fused-dense", C)
        ctx.targets.append((f"{op} dense {pas} C={C} S={S}: <= 2x its FLOP bound ({k} correlation"
                            f"{'s' if k > 1 else ''} over the {int(n.sum())} present slots: {k * flops / 1e9:.2f} GFLOP, "
                            f"{b:.1f} ms at the sgemm rate timed alongside)", tf <= 2 * b,
                            f"{tf:.1f} ms = {tf / b:.2f}x bound; reference {_ratio_text(rows, op, pas, C, 'reference-dense', 'fused-dense')}"))
    return rows


# ---------------------------------------------------------------------------------------------
# Section: ops
# ---------------------------------------------------------------------------------------------


def section_ops(ctx):
    rows = []
    channels = [1] if ctx.quick and ctx.args.channels is None else (ctx.args.channels or [1, 3])
    for C in channels:
        S = SPRITE[C]
        inputs = place_inputs(C, S)
        flops = correlation_flops(B, M, C, H, W, S)
        for backward, pas in [(False, "fwd"), (True, "fwd+bwd")]:
            fns = place_fns(*inputs, backward=backward)
            if ctx.quick:
                fns.pop("fused-dense")
            if backward:
                # The yardstick timed in the same rounds as the kernels, so that it sees the same
                # machine load (the start-of-run figure can be far off on a shared machine).
                fns["sgemm"] = ctx.sgemm_fn
            res = ctx.time(fns)
            if backward:
                t = res.pop("sgemm")
                rate = ctx.sgemm_flops / (t["median_ms"] * 1e-3)
                rows.append(_row("sgemm", "fwd", "torch.mm", 1, t, n=ctx.sgemm_n, gflops=rate / 1e9))
            for impl, t in res.items():
                rows.append(_row("place_and_loglik", pas, impl, C, t, S=S, B=B, H=H, W=W, M=M,
                                 mode="dense" if "dense" in impl else "index"))
                if backward:
                    rows[-1].update(bound_ms=flops / rate * 1e3, sgemm_gflops=rate / 1e9)
            _progress(rows[-len(res) - int(backward):])
        bound_ms = flops / rate * 1e3
        fb = _pick(rows, "place_and_loglik", "fwd+bwd", "fused", C)
        fb20 = _pick(rows, "place_and_loglik", "fwd+bwd", "fused", C, "p20_ms")
        ctx.targets.append((f"place_and_loglik index fwd+bwd C={C} S={S}: <= 2x the correlation's FLOP bound "
                            f"({flops / 1e9:.2f} GFLOP: {bound_ms:.1f} ms at the {rate / 1e9:.0f} GFLOP/s sgemm "
                            f"rate timed alongside)", fb <= 2 * bound_ms,
                            f"{fb:.1f} ms = {fb / bound_ms:.2f}x bound (20th percentile {fb20:.1f} ms)"))
        if any(r["impl"] == "fused-dense" and r["C"] == C for r in rows):
            # Dense mode (the relaxed samples place the sprites): its own FLOPs are one correlation
            # forward (the canvas), three forward+backward (canvas, grad_loc, grad_sprites).
            for pas, k in (("fwd", 1), ("fwd+bwd", 3)):
                t = _pick(rows, "place_and_loglik", pas, "fused-dense", C)
                b = k * bound_ms
                ctx.targets.append((f"place_and_loglik dense {pas} C={C} S={S}: <= 2x its FLOP bound ({k} "
                                    f"correlation{'s' if k > 1 else ''}: {k * flops / 1e9:.2f} GFLOP, {b:.1f} ms)",
                                    t <= 2 * b, f"{t:.1f} ms = {t / b:.2f}x bound"))
        if not ctx.quick:
            rows += _dense_training_counts(ctx, C, S, rate)
        r_dense = _ratio(rows, "place_and_loglik", "fwd", C, "reference-dense", "fused")
        r_scatter = _ratio(rows, "place_and_loglik", "fwd", C, "eager-scatter", "fused")
        ctx.targets.append((f"place_and_loglik index fwd C={C}: >= 30x faster than the dense reference",
                            r_dense >= 30, _ratio_text(rows, "place_and_loglik", "fwd", C, "reference-dense", "fused")))
        ctx.targets.append((f"place_and_loglik index fwd C={C}: >= 1.5x faster than eager scatter + loglik",
                            r_scatter >= 1.5, _ratio_text(rows, "place_and_loglik", "fwd", C, "eager-scatter", "fused")))

    # Gumbel top-k with relaxed samples, M = 10, γ-scaled logits.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, H * W, generator=g) * GAMMA
    gumbel = -torch.log(-torch.log(torch.rand(B, H * W, generator=g).clamp(1e-12, 1 - 1e-12)))
    n = torch.full((B,), M, dtype=torch.long)
    w_r = torch.randn(B, M, H * W, generator=g)
    w_q = torch.randn(B, generator=g)
    lg = logits.clone().requires_grad_()
    for pas in ["fwd", "fwd+bwd"]:
        def make(impl):
            if pas == "fwd":
                def f():
                    with torch.no_grad():
                        impl.gumbel_topk_relaxed(logits, n, 0.5, M, gumbel)
            else:
                def f():
                    _, relaxed, log_q = impl.gumbel_topk_relaxed(lg, n, 0.5, M, gumbel)
                    torch.autograd.grad((relaxed, log_q), lg, (w_r, w_q))
            return f

        res = ctx.time({"fused": make(ops), "reference": make(ref)})
        for impl, t in res.items():
            rows.append(_row("gumbel_topk_relaxed", pas, impl, 1, t, B=B, D=H * W, M=M))
        _progress(rows[-2:])
    r = _ratio(rows, "gumbel_topk_relaxed", "fwd+bwd", 1, "reference", "fused")
    ctx.targets.append(("gumbel_topk_relaxed fwd+bwd M=10: >= 10x faster than the sequential eager loop",
                        r >= 10, _ratio_text(rows, "gumbel_topk_relaxed", "fwd+bwd", 1, "reference", "fused")))
    # The exclusion window (SPEC §2): window 5 at this shape, both windows at the training shape.
    rows += gumbel_window_rows(ctx, GUMBEL_WINDOW_CASES)

    # Counting: h_loc with a few peaks above the threshold 4γ per image.
    h_loc = torch.randn(B, 1, H, W, generator=g) * 2
    for k in range(3):
        h_loc[:, 0, 10 + 15 * k, 12 + 14 * k] = 6 * GAMMA
    res = ctx.time({"fused": lambda: ops.count_objects(h_loc, 4 * GAMMA, M),
                    "reference": lambda: ref.count_objects(h_loc, 4 * GAMMA, M)})
    for impl, t in res.items():
        rows.append(_row("count_objects", "fwd", impl, 1, t, B=B, H=H, W=W))
    _progress(rows[-2:])
    r = _ratio(rows, "count_objects", "fwd", 1, "reference", "fused")
    ctx.targets.append(("count_objects: >= 5x faster than the eager max-pool reference", r >= 5,
                        _ratio_text(rows, "count_objects", "fwd", 1, "reference", "fused")))

    # Appearance gather, K = 2L = 64 features, straight-through (one-hot) maps.
    h_app = torch.randn(B, K, H, W, generator=g)
    index = torch.randint(0, H * W, (B, M), generator=g)
    loc = F.one_hot(index, H * W).float().view(B, M, H, W)
    w_g = torch.randn(B, M, K, generator=g)
    ha = h_app.clone().requires_grad_()
    lc = loc.clone().requires_grad_()
    for pas in ["fwd", "fwd+bwd"]:
        def make(impl, use_index):
            kw = {"index": index} if use_index else {}
            if pas == "fwd":
                def f():
                    with torch.no_grad():
                        impl.gather_appearance(h_app, loc, n, **kw)
            else:
                def f():
                    torch.autograd.grad(impl.gather_appearance(ha, lc, n, **kw), (ha, lc), w_g)
            return f

        fns = {"fused": make(ops, True), "reference": make(ref, True), "reference-dense": make(ref, False),
               "fused-dense": make(ops, False)}
        if ctx.quick:
            fns.pop("fused-dense")
        res = ctx.time(fns)
        for impl, t in res.items():
            rows.append(_row("gather_appearance", pas, impl, 1, t, B=B, K=K, M=M,
                             mode="dense" if "dense" in impl else "index"))
        _progress(rows[-len(res):])
    r = _ratio(rows, "gather_appearance", "fwd+bwd", 1, "reference-dense", "fused")
    r2 = _ratio(rows, "gather_appearance", "fwd+bwd", 1, "reference", "fused")
    ctx.targets.append(("gather_appearance fwd+bwd: >= 3x faster than the eager einsum over the maps",
                        r >= 3, _ratio_text(rows, "gather_appearance", "fwd+bwd", 1, "reference-dense", "fused")
                        + f"; vs the reference's index mode: {r2:.2f}x"))
    return rows


# ---------------------------------------------------------------------------------------------
# Gumbel top-k with an exclusion window (SPEC §2 "exclusion window", §9.2)
# ---------------------------------------------------------------------------------------------

# (B, canvas side, n drawn from 0–3 per image as in training (else every slot present), window).
# The ops section's own row "gumbel_topk_relaxed" is (64, 64, False, 1); the training shape of the
# 64×64 model is B = 16 with n ~ U{0..3}.
# The window rows' logits are a peaked field (gumbel_inputs(field="peaks")), where the window
# changes the draws; the ops section's window-1 row keeps its i.i.d. logits.
GUMBEL_WINDOW_CASES = [(B, H, False, 5), (16, H, True, 1), (16, H, True, 5)]


def gumbel_op_name(b, side, training_counts, window, m=M):
    """Row name: the ops section's "gumbel_topk_relaxed" (B = 64, 64×64, n = M, window 1), else
    with the differences in brackets, e.g. "gumbel_topk_relaxed[B=16,n=0-3,w=5]"."""
    tags = [] if b == B else [f"B={b}"]
    if side != H:
        tags.append(f"{side}x{side}")
    if m != M:
        tags.append(f"M={m}")
    if training_counts:
        tags.append("n=0-3")
    if window != 1:
        tags.append(f"w={window}")
    return "gumbel_topk_relaxed" + (f"[{','.join(tags)}]" if tags else "")


def gumbel_inputs(b, side, m, training_counts, seed=1, field="iid"):
    """logits [b,D], Gumbel noise [b,D], n [b] (= m, or uniform in 0..3) and fixed incoming
    gradients (w_r [b,m,D], w_q [b]).

    ``field="iid"``: γ·N(0, 1) per pixel; with seed 1, b = B, side = H, m = M and every slot present
    these are the inputs of the ops section's "gumbel_topk_relaxed" rows. ``field="peaks"``: what
    the location net gives, γ·(0.5·N(0, 1) + one bump of height ~6 and std 1.5 px per object, at
    random places, n[b] of them): the peaks are a few pixels wide, so at window 1 the later draws
    fall beside the earlier ones and the exclusion window changes the draws (SPEC §2), as in a
    trained model; with i.i.d. logits a window would hardly ever exclude anything."""
    D = side * side
    gamma = 0.5 * math.log(D)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, D, generator=g) * gamma
    gumbel = -torch.log(-torch.log(torch.rand(b, D, generator=g).clamp(1e-12, 1 - 1e-12)))
    if training_counts:
        n = torch.randint(0, min(4, m + 1), (b,), generator=g)
    else:
        n = torch.full((b,), m, dtype=torch.long)
    w_r = torch.randn(b, m, D, generator=g)
    w_q = torch.randn(b, generator=g)
    if field == "peaks":
        rr, cc = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        centres = torch.randint(0, side, (b, m, 2), generator=g)
        heights = 6.0 * (1 + 0.1 * torch.randn(b, m, generator=g))
        present = (torch.arange(m)[None] < n[:, None]).float()
        d2 = (rr[None, None] - centres[..., 0, None, None]) ** 2 + (cc[None, None] - centres[..., 1, None, None]) ** 2
        bumps = (heights * present)[..., None, None] * torch.exp(-d2.float() / (2 * 1.5**2))
        logits = gamma * (0.5 * logits / gamma + bumps.sum(1).view(b, D))
    elif field != "iid":
        raise ValueError(f"field must be 'iid' or 'peaks', got {field!r}")
    return logits, gumbel, n, w_r, w_q


def gumbel_fns(inputs, m, window, canvas, backward, tau=0.5):
    """{"fused", "reference"} callables of gumbel_topk_relaxed with the same window and canvas:
    forward under no_grad, or forward + the gradient on the logits (through relaxed and log_q).
    Each returns what it computed (index, relaxed, log_q, and the gradient or None), so that
    :func:`gumbel_agreement` checks the very calls that are timed."""
    logits, gumbel, n, w_r, w_q = inputs
    lg = logits.clone().requires_grad_()
    kw = {"window": window, "canvas": canvas}

    def make(impl):
        if not backward:
            def f():
                with torch.no_grad():
                    return (*impl.gumbel_topk_relaxed(logits, n, tau, m, gumbel, **kw), None)
            return f

        def f():
            index, relaxed, log_q = impl.gumbel_topk_relaxed(lg, n, tau, m, gumbel, **kw)
            (grad,) = torch.autograd.grad((relaxed, log_q), lg, (w_r, w_q))
            return index, relaxed.detach(), log_q.detach(), grad
        return f

    return {"fused": make(ops), "reference": make(ref)}


def gumbel_agreement(inputs, m, window, canvas, tau=0.5):
    """The timed pair (:func:`gumbel_fns`, forward + backward) run once each and compared: the
    draws equal, the largest differences of relaxed, log_q and the gradient; and, for a window > 1,
    the share of draws the window moves on these inputs (against the reference at window 1), i.e.
    whether a pair run at different windows could agree at all."""
    fns = gumbel_fns(inputs, m, window, canvas, backward=True, tau=tau)
    (fi, fr, fq, fg), (ri, rr, rq, rg) = fns["fused"](), fns["reference"]()
    res = {"index_equal": bool(torch.equal(fi, ri)), "relaxed_maxdiff": (fr - rr).abs().max().item(),
           "log_q_maxdiff": (fq - rq).abs().max().item(), "grad_maxdiff": (fg - rg).abs().max().item(),
           "draws": int((fi >= 0).sum())}
    if window != 1:
        logits, gumbel, n = inputs[:3]
        with torch.no_grad():
            i1 = ref.gumbel_topk_relaxed(logits, n, tau, m, gumbel)[0]
        res["draws_moved_by_window"] = int((i1 != ri).sum()) / max(res["draws"], 1)
    return res


def gumbel_window_rows(ctx, cases, m=M, tau=0.5):
    """Rows fwd and fwd+bwd, fused vs the reference's sequential eager loop with the same window,
    for each case (b, side, training_counts, window) of :data:`GUMBEL_WINDOW_CASES`; a target
    fused >= 10x the reference, fwd+bwd, per case. Each row carries its window, its logits' field,
    the load average when it was measured, and the fused/reference agreement on its inputs
    (checked before timing; a target fails if the draws differ)."""
    rows = []
    for b, side, training_counts, window in cases:
        op = gumbel_op_name(b, side, training_counts, window, m)
        # The ops section's own row (B = 64, every slot, window 1) keeps its i.i.d. logits.
        field = "iid" if op == "gumbel_topk_relaxed" else "peaks"
        inputs = gumbel_inputs(b, side, m, training_counts, field=field)
        canvas = (side, side)
        agree = gumbel_agreement(inputs, m, window, canvas, tau)
        n_total = int(inputs[2].sum())
        for backward, pas in [(False, "fwd"), (True, "fwd+bwd")]:
            res = ctx.time(gumbel_fns(inputs, m, window, canvas, backward, tau))
            load = load_average()
            for impl, t in res.items():
                rows.append(_row(op, pas, impl, 1, t, B=b, D=side * side, H=side, W=side, M=m, n=n_total,
                                 window=window, counts="0-3" if training_counts else "all", logits=field,
                                 tau=tau, load_average=load, agreement=agree))
            _progress(rows[-len(res):])
        r = _ratio(rows, op, "fwd+bwd", 1, "reference", "fused")
        if op == "gumbel_topk_relaxed":
            desc = "gumbel_topk_relaxed fwd+bwd M=10: >= 10x faster than the sequential eager loop"
        else:
            desc = (f"{op} fwd+bwd (B={b}, {side}x{side}, M={m}, n {'0-3' if training_counts else '= M'}, "
                    f"window {window}): >= 10x faster than the sequential eager loop with the same window")
        detail = _ratio_text(rows, op, "fwd+bwd", 1, "reference", "fused")
        if not agree["index_equal"]:
            detail += "; DRAWS DIFFER from the reference's"
        ctx.targets.append((desc, r >= 10 and agree["index_equal"], detail))
    return rows


def section_gumbel(ctx):
    """Only the Gumbel top-k rows: the ops section's window-1 row at B = 64 and the window rows
    (the ops section runs all of them; ``--only gumbel`` re-measures them alone)."""
    return gumbel_window_rows(ctx, [(B, H, False, 1)] + GUMBEL_WINDOW_CASES)


# ---------------------------------------------------------------------------------------------
# Section: scaling of the fused placement
# ---------------------------------------------------------------------------------------------


def section_scaling(ctx):
    rows = []
    C, S = 1, SPRITE[1]
    sizes = [32, 64, 128] if ctx.quick else [32, 64, 128, 256]
    counts = [1, 4, 16] if ctx.quick else [1, 2, 4, 8, 16, 32]
    b = 16 if ctx.quick else B
    cases = [("canvas", s, M) for s in sizes] + [("objects", H, m) for m in counts]
    for axis, side, m in cases:
        x, sprites, loc, n, index = place_inputs(C, S, b=b, h=side, w=side, m=m, seed=side + m)
        fns = place_fns(x, sprites, loc, n, index, backward=True)
        t = ctx.time({"fused": fns["fused"]})["fused"]
        flops = correlation_flops(b, m, C, side, side, S)
        rows.append(_row("place_and_loglik", "fwd+bwd", "fused", C, t, S=S, B=b, H=side, W=side, M=m,
                         mode="index", scaling=axis, gflops=flops / (t["median_ms"] * 1e-3) / 1e9,
                         frac_sgemm=flops / (t["median_ms"] * 1e-3) / ctx.rate))
        _progress(rows[-1:])
    return rows


# ---------------------------------------------------------------------------------------------
# Section: GPU (bench/gpu_bench.py) when CUDA is present
# ---------------------------------------------------------------------------------------------


def section_gpu(ctx):
    if not torch.cuda.is_available():
        print("# gpu: skipped (no CUDA device)")
        return []
    from bench.gpu_bench import run_gpu_rows

    return run_gpu_rows(argparse.Namespace(quick=ctx.quick))


def section_step(ctx):
    from bench.training_step import section_step as run

    return run(ctx)


def section_eval(ctx):
    from bench.training_step import section_eval as run

    return run(ctx)


def section_profile(ctx):
    from bench.training_step import section_profile as run

    return run(ctx)


SECTIONS = {"ops": section_ops, "scaling": section_scaling, "step": section_step, "eval": section_eval,
            "profile": section_profile, "gpu": section_gpu, "gumbel": section_gumbel}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _pick(rows, op, pas, impl, C, key="median_ms"):
    for r in rows:
        if r["op"] == op and r["pass"] == pas and r["impl"] == impl and r["C"] == C:
            return r[key]
    return None


def _progress(rows):
    for r in rows:
        shape = ", ".join(f"{k}={r[k]}" for k in ["B", "H", "W", "M", "S", "K", "D", "n", "window"] if k in r)
        extra = f"  {r['gflops']:.0f} GFLOP/s" if "gflops" in r else ""
        if "frac_sgemm" in r:
            extra += f" ({100 * r['frac_sgemm']:.0f}% of the start-of-run sgemm rate)"
        print(f"{r['op']:<20} {r['pass']:<8} {r['impl']:<16} C={r['C']}  {r['median_ms']:9.2f} ms "
              f"[p20 {r['p20_ms']:.2f}, p80 {r['p80_ms']:.2f}, n={r['reps']}]  ({shape}){extra}", flush=True)


def _sizes(text):
    try:
        return [(int(v), int(v)) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected canvas sides like 48,64, got {text!r}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer repetitions and cases")
    p.add_argument("--only", action="append", default=None,
                   help=f"sections to run, comma-separated or repeated ({', '.join(SECTIONS)}); default: all but gpu")
    p.add_argument("--json", default=None, help="write {environment, rows, targets} as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--reps", type=int, default=15, help="rounds per timing (default 15)")
    p.add_argument("--channels", type=int, nargs="+", choices=[1, 3], default=None)
    p.add_argument("--thp", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 (see the module docstring)")
    p.add_argument("--tune-allocator", action=argparse.BooleanOptionalAction, default=True,
                   help="the project's allocator setting (lavae_fast.performance.tune_allocator), as the training "
                        "CLI uses it; the step section's eager rows switch it off around their own calls")
    p.add_argument("--step-reps", type=int, default=7, help="rounds of the step section (default 7)")
    p.add_argument("--step-batch", type=int, default=64, help="batch of the step section (default 64)")
    p.add_argument("--step-channels", type=int, choices=[1, 3], default=1,
                   help="1: multi-MNIST shapes (S = 17, default), 3: multi-dSprites (S = 21)")
    p.add_argument("--step-sizes", type=_sizes, default=None,
                   help="canvases of the step section, e.g. 48,64 (default 64,32; --quick: 64)")
    p.add_argument("--step-impls", type=lambda v: [s for s in v.split(",") if s], default=None,
                   help="step implementations, comma-separated (eager, eager+allocator, default, compile, bf16, "
                        "bf16+compile; default: all)")
    p.add_argument("--step-budget", type=float, default=300.0, help="seconds per step timing (default 300)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tune_allocator:
        performance.tune_allocator()
    only = [s for arg in (args.only or ["ops,scaling,step,eval"]) for s in arg.split(",") if s]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if "ops" in only and "gumbel" in only:
        only.remove("gumbel")  # the ops section has the gumbel rows already
    step_impls = {"eager", "eager+allocator", "default", "compile", "bf16", "bf16+compile"}
    if args.step_impls and not set(args.step_impls) <= step_impls:
        p.error(f"unknown step implementation(s) {sorted(set(args.step_impls) - step_impls)}; choose from "
                f"{sorted(step_impls)}")

    env = environment()
    rate = sgemm_rate(1024 if args.quick else 2048)
    env["sgemm_gflops"] = rate / 1e9
    print(f"# {env['cpu']} ({env['cpu_flags']}), {env['logical_cpus']} logical CPUs, {env['torch_threads']} torch "
          f"threads; torch {env['torch']}, python {env['python']}")
    caps = ", ".join(f"{k}={v}" for k, v in env["isa_caps"].items()) or "none"
    print(f"# ISA: torch {env['torch_cpu_capability']}, lavae_fast kernels {env['cpu_kernels']} (caps set: {caps}); "
          f"bf16 native: {env['bf16_native']}; lavae_fast from {env['lavae_fast']}")
    print(f"# backends: {env['backends']}; THP_MEM_ALLOC_ENABLE={env['thp_alloc']}; allocator tuned: "
          f"{performance.allocator_tuned()}; load average {env['load_average_start']}")
    print(f"# sgemm ({1024 if args.quick else 2048}^2 float32 matmul): {rate / 1e9:.1f} GFLOP/s")
    for C, S in SPRITE.items():
        fl = correlation_flops(B, M, C, H, W, S)
        print(f"# placement correlation FLOP bound (B={B}, M={M}, C={C}, {H}x{W}, S={S}): "
              f"2*B*M*C*D*S^2 = {fl / 1e9:.2f} GFLOP -> {fl / rate * 1e3:.2f} ms at the sgemm rate")

    ctx = Context(args, rate)
    rows = []
    for name in only:
        print(f"\n## {name}")
        rows += SECTIONS[name](ctx)
    env["load_average_end"] = load_average()
    targets = [{"target": d, "pass": bool(ok), "measured": detail} for d, ok, detail in ctx.targets]
    if targets:
        print("\n## targets (ratios from this run)")
        for t in targets:
            print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['measured']}")
    print(f"# load average at the end: {env['load_average_end']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "targets": targets, **ctx.extra}, f, indent=1)
        print(f"# wrote {args.json}")
    return rows, targets


if __name__ == "__main__":
    main()
