"""Property-based tests (hypothesis): random shapes and values through the fused ops and the reference.

For every op a strategy draws a shape (batch 0–3, up to 4–6 slots, canvases from 1×1 up, sprites
larger than the canvas, n = 0 everywhere, n = M, absent slots holding junk indices, index maps that
break the one-hot promise, plateaus and ±inf/NaN values for counting, τ down to 0.02 with logit gaps
of 20+), values from a seeded generator, and with some probability one defect (n outside [0, M]
or, for the draws, above D, an index outside [−1, D) for a present slot, a wrong shape, dtype or
device, a bad scalar, an empty canvas). The property:

* valid input: the fused op (``lavae_fast.ops``, C++ kernels on the CPU) returns, the reference
  (``lavae_fast.reference``) returns, and they agree — values and every gradient — within float
  tolerance (float64: 1e-8 relative; float32: against a float64 reference, at most 4× the float32
  reference's own error plus 1e-5 relative);
* invalid input: the fused op refuses with a ValueError/TypeError whose message names the argument,
  and the registered kernel called directly (``torch.ops.lavae_fast.*``, skipping the Python checks)
  refuses as well with an error, never a crash or a silent answer (but for n > D in the draws,
  which the Python boundary refuses and the kernel answers as the reference does: every location
  once, the slots past D absent). The reference is unchecked by design; how often it raised too
  is counted.

The number of examples is bounded (``LAVAE_HYPOTHESIS_EXAMPLES``, default 400 per op) and printed
with ``pytest -s``; no example database is written.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lavae_fast import _backends, ops
from lavae_fast import reference as ref

EXAMPLES = int(os.environ.get("LAVAE_HYPOTHESIS_EXAMPLES", "400"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NO_DEFECT = [None] * 12  # weight: roughly half of the examples are valid
# Mostly small, sometimes larger: more than 12 slots (the kernels' output blocks), canvases wider
# than a vector (16 floats) with partial tails.
SLOTS = st.one_of(st.integers(0, 4), st.integers(5, 14))
SIDE = st.one_of(st.integers(1, 8), st.integers(9, 23))


@pytest.fixture(autouse=True, scope="module")
def _kernels_and_threads():
    if not _backends.cpu_kernels_loaded:
        msg = f"lavae_fast._C is not loaded ({_backends.cpu_kernels_error})"
        if os.environ.get("LAVAE_FAST_REQUIRE_EXT") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tally:
    def __init__(self, op):
        self.op = op
        self.valid = self.refused = self.reference_refused_too = self.discarded = 0

    def report(self):
        total = self.valid + self.refused
        print(f"\n[hypothesis] {self.op}: {total} examples: {self.valid} valid (fused = reference), "
              f"{self.refused} refused (reference raised too on {self.reference_refused_too})"
              + (f"; {self.discarded} discarded (near-tied keys)" if self.discarded else ""))
        assert self.valid > 0 and total >= min(EXAMPLES, 20)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


EPS32 = torch.finfo(torch.float32).eps


def _sum_floor(terms: int) -> float:
    """Relative float32 error floor of sums of ``terms`` terms computed in different orders (the
    kernels and the reference block their sums differently): 2·N·ε₃₂, at least 1e-5."""
    return max(1e-5, 2 * terms * EPS32)


def _close(name, got, want64, want32=None, dtype=torch.float64, floor=1e-5):
    """got against the float64 reference; float32 results get the tolerance of the float32
    reference's own error (want32) plus a relative ``floor``."""
    assert got.shape == want64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    if got.numel() == 0:
        return
    got, want64 = got.double(), want64.double()
    nan_got, nan_want = torch.isnan(got), torch.isnan(want64)
    assert torch.equal(nan_got, nan_want), f"{name}: NaN in different places"
    finite = ~nan_got
    got, want64 = got[finite], want64[finite]
    if got.numel() == 0:
        return
    inf = torch.isinf(want64)
    assert torch.equal(got[inf], want64[inf]), f"{name}: infinities differ"
    got, want64 = got[~inf], want64[~inf]
    if got.numel() == 0:
        return
    scale = float(want64.abs().max().clamp(min=1.0))
    err = float((got - want64).abs().max())
    if dtype == torch.float64:
        tol = 1e-8 * scale
    else:
        ref_err = float((want32.double()[finite][~inf] - want64).abs().max())
        tol = 4 * ref_err + floor * scale
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (scale {scale:.3g})"


def _grads(fn, inputs, wrt, weights):
    """Outputs of fn(*inputs) and the gradients of Σ_k ⟨out_k, w_k⟩ with respect to inputs[wrt]."""
    leaves = [t.detach().clone().requires_grad_(True) if i in wrt else t for i, t in enumerate(inputs)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights) if w is not None)
    if loss.requires_grad:
        gs = torch.autograd.grad(loss, [leaves[i] for i in wrt], allow_unused=True)
    else:
        gs = [None] * len(wrt)
    gs = [torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(wrt, gs)]
    return [o.detach() for o in outs], gs


def _names_argument(exc: BaseException, name: str) -> bool:
    return re.search(rf"(^|[^\w]){re.escape(name)}([^\w]|$)", str(exc)) is not None


def _refusal(fused, raw, reference, name, tally):
    """The fused op must refuse naming ``name``; the raw kernel must refuse too."""
    with pytest.raises((ValueError, TypeError)) as info:
        fused()
    assert _names_argument(info.value, name), f"refusal does not name {name!r}: {info.value}"
    if raw is not None:
        with pytest.raises((RuntimeError, ValueError, TypeError, IndexError)):
            raw()
    try:
        reference()
    except Exception:
        tally.reference_refused_too += 1
    tally.refused += 1


def _upcast(ts):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts]


def _compare(name_outs, fn_fused, fn_ref, inputs, wrt, weights, dtype, floor=1e-5):
    """Fused vs reference (same dtype) vs reference in float64: outputs and gradients."""
    f_out, f_g = _grads(fn_fused, inputs, wrt, weights)
    r_out, r_g = _grads(fn_ref, inputs, wrt, weights)
    r64_out, r64_g = _grads(fn_ref, _upcast(inputs), wrt, weights) if dtype != torch.float64 else (r_out, r_g)
    for nm, a, b, c in zip(name_outs, f_out, r64_out, r_out):
        if a.dtype == torch.long:
            assert torch.equal(a, c), f"{nm}: fused {a.tolist()} != reference {c.tolist()}"
        else:
            _close(nm, a, b, c, dtype, floor)
    for k, a, b, c in zip(wrt, f_g, r64_g, r_g):
        _close(f"grad of input {k}", a, b, c, dtype, floor)


# ---------------------------------------------------------------------------------------------
# 1. place_and_loglik
# ---------------------------------------------------------------------------------------------

PLACE_DEFECTS = NO_DEFECT + ["n_high", "n_low", "n_dtype", "n_device", "index_high", "index_low", "index_dtype",
                             "index_shape", "loc_shape", "loc_dtype", "x_channels", "x_int", "x_dims",
                             "sprite_even", "sprite_nonsquare", "sprite_no_channel", "eps", "empty_canvas"]


@st.composite
def place_inputs(draw):
    c = {k: draw(v) for k, v in dict(
        dtype=st.sampled_from([torch.float32, torch.float64]), B=st.integers(0, 3), M=SLOTS,
        C=st.integers(1, 3), S=st.sampled_from([1, 3, 5, 7, 9, 17]), H=SIDE, W=SIDE,
        mode=st.sampled_from(["dense", "index"]), n_kind=st.sampled_from(["random", "zero", "full"]),
        sprite_kind=st.sampled_from(["uniform", "ones", "zeros", "binary"]),
        x_kind=st.sampled_from(["binary", "fraction", "zeros", "ones"]),
        loc_kind=st.sampled_from(["onehot", "soft", "heavy"]), eps=st.sampled_from([1e-4, 1e-7, 0.1, 0.49]),
        seed=st.integers(0, 2**31 - 1), defect=st.sampled_from(PLACE_DEFECTS)).items()}
    return c


def _make_place(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, M, C, S, H, W, dtype = c["B"], c["M"], c["C"], c["S"], c["H"], c["W"], c["dtype"]
    D = H * W
    x = {"binary": (torch.rand(B, C, H, W, generator=g) < 0.4).double(), "fraction": torch.rand(B, C, H, W, generator=g),
         "zeros": torch.zeros(B, C, H, W), "ones": torch.ones(B, C, H, W)}[c["x_kind"]].to(dtype)
    sp = {"uniform": torch.rand(B, M, C, S, S, generator=g), "ones": torch.ones(B, M, C, S, S),
          "zeros": torch.zeros(B, M, C, S, S),
          "binary": (torch.rand(B, M, C, S, S, generator=g) < 0.5).double()}[c["sprite_kind"]].to(dtype)
    n = {"random": torch.randint(0, M + 1, (B,), generator=g), "zero": torch.zeros(B, dtype=torch.long),
         "full": torch.full((B,), M, dtype=torch.long)}[c["n_kind"]]
    present = torch.arange(M)[None, :] < n[:, None]
    # Present slots: a pixel, or −1 (an absent draw) now and then; absent slots: junk, never read.
    index = torch.randint(0, D, (B, M), generator=g)
    index = torch.where(torch.rand(B, M, generator=g) < 0.15, -1, index)
    junk = torch.tensor([-1, -7, D, 10**9])[torch.randint(0, 4, (B, M), generator=g)]
    index = torch.where(present, index, junk)
    onehot = torch.zeros(B, M, D)
    b, i = (present & (index >= 0)).nonzero(as_tuple=True)
    onehot[b, i, index[b, i]] = 1
    if c["loc_kind"] == "onehot":
        loc = onehot
    elif c["loc_kind"] == "soft":  # in index mode: a broken one-hot promise, which must not matter
        loc = torch.softmax(torch.randn(B, M, D, generator=g) * 2, -1) * 0.6
    else:  # heavy maps: overlaps push Σ above 1, where the clamp stops the gradient
        loc = torch.rand(B, M, D, generator=g) * 1.5
    loc = loc.view(B, M, H, W).to(dtype)
    return x, sp, loc, n, (index if c["mode"] == "index" else None), present


def _break_place(c, x, sp, loc, n, index, present):
    """Apply the drawn defect; returns (inputs, eps, the argument the refusal must name) or None
    when the defect does not apply to this shape."""
    d, eps = c["defect"], c["eps"]
    B, M, H, W = c["B"], c["M"], c["H"], c["W"]
    other = torch.float32 if c["dtype"] == torch.float64 else torch.float64
    if d in ("n_high", "n_low") and B == 0:
        return None
    if d.startswith("index") and (index is None or (d in ("index_high", "index_low") and not present.any())):
        return None
    if d == "n_high":
        n = n.clone(); n[-1] = M + 1  # noqa: E702
        return (x, sp, loc, n, index), eps, "n"
    if d == "n_low":
        n = n.clone(); n[0] = -1  # noqa: E702
        return (x, sp, loc, n, index), eps, "n"
    if d == "n_dtype":
        return (x, sp, loc, n.int(), index), eps, "n"
    if d == "n_device":
        return (x, sp, loc, n.to("meta"), index), eps, "n"
    if d in ("index_high", "index_low"):
        index = index.clone()
        b, i = present.nonzero()[0].tolist()
        index[b, i] = H * W + 3 if d == "index_high" else -2
        return (x, sp, loc, n, index), eps, "index"
    if d == "index_dtype":
        return (x, sp, loc, n, index.int()), eps, "index"
    if d == "index_shape":
        return (x, sp, loc, n, index[:, :-1] if M else index[:, None, :]), eps, "index"
    if d == "loc_shape":
        return (x, sp, loc[..., : W - 1] if W > 1 else torch.cat([loc, loc], -1), n, index), eps, "loc"
    if d == "loc_dtype":
        return (x, sp, loc.to(other), n, index), eps, "loc"
    if d == "x_channels":
        return (torch.cat([x, x[:, :1]], 1), sp, loc, n, index), eps, "x"
    if d == "x_int":
        return (x.to(torch.uint8), sp, loc, n, index), eps, "x"
    if d == "x_dims":
        return (x[:, 0], sp, loc, n, index), eps, "x"
    if d == "sprite_even":
        return (x, torch.nn.functional.pad(sp, (0, 1, 0, 1)), loc, n, index), eps, "sprites"
    if d == "sprite_nonsquare":
        return (x, torch.nn.functional.pad(sp, (0, 2)), loc, n, index), eps, "sprites"
    if d == "sprite_no_channel":
        return (x[:, :0], sp[:, :, :0], loc, n, index), eps, "sprites"
    if d == "eps":
        return (x, sp, loc, n, index), [0.5, -0.1, float("nan"), 0.0][c["seed"] % 4], "eps"
    if d == "empty_canvas":
        return (x[..., :0, :], sp, loc[..., :0, :], n, index), eps, "x"
    raise AssertionError(d)


PLACE = Tally("place_and_loglik")
# Defects the kernel itself must refuse when called directly (everything that could make it read or
# write out of bounds); the others (a tensor on another device, no channel, an empty canvas) are
# harmless to it and refused by the Python boundary alone.
PLACE_RAW = {"n_high", "n_low", "n_dtype", "index_high", "index_low", "index_dtype", "index_shape", "loc_shape",
             "loc_dtype", "x_channels", "x_int", "x_dims", "sprite_even", "sprite_nonsquare"}


@SETTINGS
@given(place_inputs())
def _place_property(c):
    x, sp, loc, n, index, present = _make_place(c)
    if c["defect"] is not None:
        broken = _break_place(c, x, sp, loc, n, index, present)
        if broken is not None:
            (bx, bsp, bloc, bn, bidx), eps, name = broken
            _refusal(lambda: ops.place_and_loglik(bx, bsp, bloc, bn, index=bidx, eps=eps),
                     (lambda: torch.ops.lavae_fast.place_loglik(bx, bsp, bloc, bn, bidx, float(eps)))
                     if c["defect"] in PLACE_RAW else None,
                     lambda: ref.place_and_loglik(bx, bsp, bloc, bn, index=bidx, eps=eps), name, PLACE)
            return
    eps = c["eps"]
    g = torch.Generator().manual_seed(c["seed"] + 1)
    weights = [torch.randn(x.shape[0], generator=g, dtype=torch.float64),
               torch.randn(x.shape, generator=g, dtype=torch.float64)]

    def fn(impl):
        return lambda x_, sp_, loc_: impl.place_and_loglik(x_, sp_, loc_, n, index=index, eps=eps,
                                                          return_lambda=True)

    terms = x.shape[1] * max(x.shape[-1] * x.shape[-2], sp.shape[-1] ** 2)  # C·max(D, S²) per sum
    _compare(["loglik", "lambda"], fn(ops), fn(ref), [x, sp, loc], [0, 1, 2], weights, c["dtype"],
             _sum_floor(terms))
    PLACE.valid += 1


def test_place_and_loglik_property():
    _place_property()
    PLACE.report()


# ---------------------------------------------------------------------------------------------
# 2. gumbel_topk_relaxed
# ---------------------------------------------------------------------------------------------

GUMBEL_DEFECTS = NO_DEFECT + ["n_high", "n_low", "n_over_d", "n_dtype", "gumbel_shape", "gumbel_dtype", "logits_dims",
                              "logits_int", "tau", "max_objects", "empty"]


@st.composite
def gumbel_inputs(draw):
    return {k: draw(v) for k, v in dict(
        dtype=st.sampled_from([torch.float32, torch.float64]), B=st.integers(0, 3),
        D=st.one_of(st.integers(1, 30), st.integers(31, 300)), M=SLOTS, tau=st.sampled_from([0.02, 0.05, 0.3, 1.0, 4.0]),
        scale=st.sampled_from([0.5, 1.0, 5.0, 20.0]), gaps=st.booleans(), zero_noise=st.booleans(),
        n_kind=st.sampled_from(["random", "zero", "full"]), seed=st.integers(0, 2**31 - 1),
        defect=st.sampled_from(GUMBEL_DEFECTS)).items()}


GUMBEL = Tally("gumbel_topk_relaxed")


@SETTINGS
@given(gumbel_inputs())
def _gumbel_property(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, D, M, dtype, tau = c["B"], c["D"], c["M"], c["dtype"], c["tau"]
    logits = torch.randn(B, D, generator=g, dtype=torch.float64) * c["scale"]
    if c["gaps"]:  # a few locations far above the rest (γ-scaled peaks), gaps of 20+
        logits = logits + 25.0 * (torch.rand(B, D, generator=g) < 0.2)
    noise = torch.zeros(B, D) if c["zero_noise"] else -torch.log(-torch.log(torch.rand(B, D, generator=g).clamp(1e-12, 1 - 1e-7)))
    logits, noise = logits.to(dtype), noise.to(dtype)
    n = {"random": torch.randint(0, M + 1, (B,), generator=g), "zero": torch.zeros(B, dtype=torch.long),
         "full": torch.full((B,), M, dtype=torch.long)}[c["n_kind"]]
    n = n.clamp(max=D)  # one location per draw: more draws than locations is the defect n_over_d
    d = c["defect"]
    if d in ("n_high", "n_low") and B == 0 or d == "n_over_d" and (B == 0 or D >= M):
        d = None
    if d is not None:
        bl, bn, bt, bm, bg, name = logits, n, tau, M, noise, None
        if d == "n_high":
            bn = n.clone(); bn[0] = M + 1; name = "n"  # noqa: E702
        elif d == "n_low":
            bn = n.clone(); bn[-1] = -3; name = "n"  # noqa: E702
        elif d == "n_over_d":  # within [0, M], but more draws than the D locations
            bn = n.clone(); bn[0] = D + 1; name = "n"  # noqa: E702
        elif d == "n_dtype":
            bn, name = n.to(torch.int32), "n"
        elif d == "gumbel_shape":
            bg, name = torch.cat([noise, noise[:, :1]], 1), "gumbel"
        elif d == "gumbel_dtype":
            bg, name = noise.to(torch.float32 if dtype == torch.float64 else torch.float64), "gumbel"
        elif d == "logits_dims":
            bl, name = logits[:, None], "logits"
        elif d == "logits_int":
            bl, name = logits.long(), "logits"
        elif d == "tau":
            bt, name = [0.0, -1.0, float("nan")][c["seed"] % 3], "tau"
        elif d == "max_objects":
            bm, name = [-1, 2.5, True][c["seed"] % 3], "max_objects"
        elif d == "empty":
            bl, bg, name = logits[:, :0], noise[:, :0], "logits"
        raw_m = bm if isinstance(bm, int) and not isinstance(bm, bool) else -1
        _refusal(lambda: ops.gumbel_topk_relaxed(bl, bn, bt, bm, bg),
                 # harmless to the kernel: no location to read, or draws past D left absent (−1)
                 None if d in ("empty", "n_over_d") else
                 lambda: torch.ops.lavae_fast.gumbel_topk_relaxed(bl, bn, float(bt), raw_m, bg),
                 lambda: ref.gumbel_topk_relaxed(bl, bn, bt, bm, bg), name, GUMBEL)
        return
    # The draws are the top-n of logits + g; among equal keys their order is unspecified, and keys
    # within rounding of each other may be ordered differently by the float64 reference. Such
    # inputs (probability ~1e-4 at D = 300 in float32) are not compared.
    k = min(M + 1, D)
    if B and k > 1:
        top = (logits.double() + noise.double()).topk(k, dim=1).values
        gap = (top[:, :-1] - top[:, 1:]).min()
        tied = float(gap) <= 16 * torch.finfo(dtype).eps * max(1.0, float(top.abs().max()))
        GUMBEL.discarded += tied
        assume(not tied)
    w = torch.Generator().manual_seed(c["seed"] + 1)
    weights = [None, torch.randn(B, M, D, generator=w, dtype=torch.float64), torch.randn(B, generator=w,
                                                                                      dtype=torch.float64)]

    def fn(impl):
        return lambda lg: impl.gumbel_topk_relaxed(lg, n, tau, M, noise if lg.dtype == dtype else noise.double())

    # float32 conditioning: y = logits + g carries a rounding error of ε₃₂·|y|, which the softmax
    # at temperature τ turns into a relative error of ε₃₂·|y|/τ (up to ~1e-4 at τ = 0.02, |y| ≈ 50)
    # in any float32 implementation; the floor follows it.
    y_max = float((logits.double() + noise.double()).abs().max()) if logits.numel() else 0.0
    floor = max(_sum_floor(D), 2 * EPS32 * y_max / tau)
    _compare(["index", "relaxed", "log_q"], fn(ops), fn(ref), [logits], [0], weights, dtype, floor)
    GUMBEL.valid += 1


def test_gumbel_topk_relaxed_property():
    _gumbel_property()
    GUMBEL.report()


# ---------------------------------------------------------------------------------------------
# 3. count_objects
# ---------------------------------------------------------------------------------------------

COUNT_DEFECTS = NO_DEFECT + ["threshold_nan", "max_objects", "int", "dims", "channels", "empty"]


@st.composite
def count_inputs(draw):
    return {k: draw(v) for k, v in dict(
        dtype=st.sampled_from([torch.float32, torch.float64]), B=st.integers(0, 3), H=SIDE, W=SIDE, with_channel=st.booleans(), values=st.sampled_from(["plateaus", "continuous", "specials"]),
        threshold=st.sampled_from([-float("inf"), -1.0, 0.0, 0.5, 2.0, float("inf")]), max_objects=st.integers(0, 5),
        seed=st.integers(0, 2**31 - 1), defect=st.sampled_from(COUNT_DEFECTS)).items()}


COUNT = Tally("count_objects")


@SETTINGS
@given(count_inputs())
def _count_property(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, H, W, dtype = c["B"], c["H"], c["W"], c["dtype"]
    if c["values"] == "plateaus":  # small integers: equal neighbours (h ≥ max-pool counts ties)
        h = torch.randint(-1, 4, (B, H, W), generator=g).double()
    elif c["values"] == "continuous":
        h = torch.randn(B, H, W, generator=g, dtype=torch.float64) * 2
    else:  # NaN and ±inf are values, not checked by the op: both implementations must agree on them
        h = torch.randn(B, H, W, generator=g, dtype=torch.float64)
        pick = torch.randint(0, 6, (B, H, W), generator=g)
        h = torch.where(pick == 0, float("nan"), torch.where(pick == 1, float("inf"), torch.where(pick == 2, -float("inf"), h)))
    h = h.to(dtype)
    if c["with_channel"]:
        h = h[:, None]
    thr, m = c["threshold"], c["max_objects"]
    d = c["defect"]
    if d is not None:
        bh, bt, bm = h, thr, m
        if d == "threshold_nan":
            bt, name = float("nan"), "threshold"
        elif d == "max_objects":
            bm, name = [-1, 1.5, True][c["seed"] % 3], "max_objects"
        elif d == "int":
            bh, name = h.to(torch.int64), "h_loc"
        elif d == "dims":
            bh, name = h.reshape(-1), "h_loc"
        elif d == "channels":
            bh, name = h.reshape(B, 1, H, W).expand(B, 2, H, W), "h_loc"
        else:
            bh, name = h[..., :0], "h_loc"
        raw_m = bm if isinstance(bm, int) and not isinstance(bm, bool) else -1
        _refusal(lambda: ops.count_objects(bh, bt, bm),
                 # the kernel takes [B,H,W]: a NaN threshold, a channel dim or an empty canvas are
                 # harmless to it, refused by the Python boundary alone
                 None if d in ("threshold_nan", "channels", "empty") else
                 lambda: torch.ops.lavae_fast.count_objects(bh, float(bt), raw_m),
                 lambda: ref.count_objects(bh, bt, bm), name, COUNT)
        return
    got = ops.count_objects(h, thr, m)
    want = ref.count_objects(h, thr, m)
    assert got.dtype == torch.long and torch.equal(got, want), (got.tolist(), want.tolist())
    COUNT.valid += 1


def test_count_objects_property():
    _count_property()
    COUNT.report()


# ---------------------------------------------------------------------------------------------
# 4. gather_appearance
# ---------------------------------------------------------------------------------------------

GATHER_DEFECTS = NO_DEFECT + ["n_high", "n_low", "n_device", "index_high", "index_low", "index_shape", "loc_shape",
                              "loc_dtype", "h_app_dims", "h_app_int", "empty_canvas"]


@st.composite
def gather_inputs(draw):
    return {k: draw(v) for k, v in dict(
        dtype=st.sampled_from([torch.float32, torch.float64]), B=st.integers(0, 3),
        K=st.one_of(st.integers(0, 5), st.integers(6, 40)), M=SLOTS, H=SIDE, W=SIDE, mode=st.sampled_from(["dense", "index"]),
        loc_kind=st.sampled_from(["onehot", "soft"]), n_kind=st.sampled_from(["random", "zero", "full"]),
        seed=st.integers(0, 2**31 - 1), defect=st.sampled_from(GATHER_DEFECTS)).items()}


GATHER = Tally("gather_appearance")


@SETTINGS
@given(gather_inputs())
def _gather_property(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, K, M, H, W, dtype = c["B"], c["K"], c["M"], c["H"], c["W"], c["dtype"]
    D = H * W
    h_app = (torch.randn(B, K, H, W, generator=g, dtype=torch.float64) * 3).to(dtype)
    n = {"random": torch.randint(0, M + 1, (B,), generator=g), "zero": torch.zeros(B, dtype=torch.long),
         "full": torch.full((B,), M, dtype=torch.long)}[c["n_kind"]]
    present = torch.arange(M)[None, :] < n[:, None]
    index = torch.where(torch.rand(B, M, generator=g) < 0.15, -1, torch.randint(0, D, (B, M), generator=g))
    index = torch.where(present, index, torch.tensor([-1, -9, D, 10**9])[torch.randint(0, 4, (B, M), generator=g)])
    if c["loc_kind"] == "onehot":
        loc = torch.zeros(B, M, D)
        b, i = (present & (index >= 0)).nonzero(as_tuple=True)
        loc[b, i, index[b, i]] = 1
    else:
        loc = torch.softmax(torch.randn(B, M, D, generator=g), -1)
    loc = loc.view(B, M, H, W).to(dtype)
    idx = index if c["mode"] == "index" else None
    d = c["defect"]
    if d in ("n_high", "n_low") and B == 0:
        d = None
    if d in ("index_high", "index_low", "index_shape") and (idx is None or not present.any()):
        d = None
    if d is not None:
        bh, bl, bn, bi = h_app, loc, n, idx
        if d == "n_high":
            bn = n.clone(); bn[0] = M + 2; name = "n"  # noqa: E702
        elif d == "n_low":
            bn = n.clone(); bn[0] = -1; name = "n"  # noqa: E702
        elif d == "n_device":
            bn, name = n.to("meta"), "n"
        elif d in ("index_high", "index_low"):
            bi = idx.clone()
            b, i = present.nonzero()[0].tolist()
            bi[b, i] = D if d == "index_high" else -5
            name = "index"
        elif d == "index_shape":
            bi, name = idx[:, :-1], "index"
        elif d == "loc_shape":
            bl, name = torch.cat([loc, loc], -1), "loc"
        elif d == "loc_dtype":
            bl, name = loc.to(torch.float32 if dtype == torch.float64 else torch.float64), "loc"
        elif d == "h_app_dims":
            bh, name = h_app.flatten(1), "h_app"
        elif d == "h_app_int":
            bh, name = h_app.long(), "h_app"
        else:
            bh, bl, name = h_app[..., :0, :], loc[..., :0, :], "h_app"
        _refusal(lambda: ops.gather_appearance(bh, bl, bn, index=bi),
                 None if d in ("n_device", "empty_canvas") else  # harmless to the kernel itself
                 lambda: torch.ops.lavae_fast.gather_appearance(bh, bl, bn, bi),
                 lambda: ref.gather_appearance(bh, bl, bn, index=bi), name, GATHER)
        return
    w = torch.Generator().manual_seed(c["seed"] + 1)
    weights = [torch.randn(B, M, K, generator=w, dtype=torch.float64)]

    def fn(impl):
        return lambda h_, l_: impl.gather_appearance(h_, l_, n, index=idx)

    _compare(["appearance"], fn(ops), fn(ref), [h_app, loc], [0, 1], weights, dtype, _sum_floor(max(D, K, M)))
    GATHER.valid += 1


def test_gather_appearance_property():
    _gather_property()
    GATHER.report()
