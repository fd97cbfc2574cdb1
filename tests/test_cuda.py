"""The ops on CUDA tensors (Triton kernels) against the reference, at the model's shapes.

Skipped, with the reason, where no CUDA device is present; the kernels are then still checked
under the Triton interpreter by tests/test_triton.py. ``bash bench/gpu_check.sh`` runs this file
and the GPU benchmark on a GPU machine.

To check this file itself without a GPU, run it on the interpreter with smaller shapes:
``TRITON_INTERPRET=1 LAVAE_FAST_DISABLE_EXTENSION=1 LAVAE_FAST_CUDA_TESTS_DEVICE=cpu pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from lavae_fast import _backends, ops, reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_interpret"))
from triton_cases import assert_matches_reference, gumbel_case, one_hot_maps, place_case, relaxed_maps  # noqa: E402

sys.path.pop(0)

DEVICE = os.environ.get("LAVAE_FAST_CUDA_TESTS_DEVICE", "cuda")
ON_INTERPRETER = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

if ON_INTERPRETER:
    _backends.kernels_package("testing").register_interpreter_kernels(ops.register_triton_kernels)
    # The model's shapes are too slow for the interpreter: same code, smaller canvases.
    HW, B_PLACE, B_GUMBEL, B_COUNT = (12, 11), 2, 2, 3
else:
    HW, B_PLACE, B_GUMBEL, B_COUNT = (64, 64), 16, 16, 64

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (ON_INTERPRETER or torch.cuda.is_available()),
        reason="no CUDA device: the Triton kernels are checked under TRITON_INTERPRET by tests/test_triton.py",
    ),
]


@pytest.fixture(autouse=True)
def _true_float32():
    # The reference runs on the same GPU: its convolutions and matmuls must not use TF32.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def dev(t):
    return None if t is None else t.to(DEVICE)


def test_triton_kernels_serve_cuda_tensors():
    if ON_INTERPRETER:
        pytest.skip("the interpreter registers the launchers for CPU tensors")
    assert _backends.triton_kernels_loaded, _backends.triton_kernels_error
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lavae_fast::place_loglik", "CUDA")


# ------------------------------------------------------------------------------------------------
# place_and_loglik
# ------------------------------------------------------------------------------------------------


def _place(fn, x, sprites, loc, n, index, w_ll, w_lam):
    x, sprites, loc = (t.clone().requires_grad_() for t in (x, sprites, loc))
    ll, lam = fn(x, sprites, loc, n, index=index, return_lambda=True)
    loss = (w_ll * ll).sum() + (w_lam * lam).sum()
    gx, gs, gl = torch.autograd.grad(loss, (x, sprites, loc))
    return {"loglik": ll.detach(), "lambda": lam.detach(), "grad_x": gx, "grad_sprites": gs, "grad_loc": gl}


@pytest.mark.parametrize("C,S", [(1, 17), (3, 21)], ids=["mnist", "dsprites"])
@pytest.mark.parametrize("mode", ["index", "dense"])
def test_place_model_shapes(C, S, mode):
    H, W = HW
    B, M = B_PLACE, 10
    x, sprites, n, index = place_case(B, M, C, S, H, W, seed=C)
    loc = one_hot_maps(index, H, W, torch.float64) if mode == "index" else relaxed_maps(B, M, H, W, seed=C)
    idx = index if mode == "index" else None
    w_ll = torch.randn(B, dtype=torch.float64)
    w_lam = torch.randn(B, C, H, W, dtype=torch.float64)
    args64 = [dev(t) for t in (x, sprites, loc)]
    args32 = [t.float() for t in args64]
    n, idx = dev(n), dev(idx)
    got = _place(ops.place_and_loglik, *args32, n, idx, dev(w_ll).float(), dev(w_lam).float())
    ref32 = _place(reference.place_and_loglik, *args32, n, idx, dev(w_ll).float(), dev(w_lam).float())
    ref64 = _place(reference.place_and_loglik, *args64, n, idx, dev(w_ll), dev(w_lam))
    for key in got:
        assert got[key].device.type == DEVICE
        floor = 1e-4 if key.startswith("grad") else 1e-6  # see test_triton_interp_place.py
        assert_matches_reference(key, got[key].cpu(), ref32[key].cpu(), ref64[key].cpu(), floor=floor)


def test_place_is_deterministic_and_accepts_non_contiguous_inputs():
    H, W = HW
    B, M, C, S = B_PLACE, 10, 3, 21
    x, sprites, n, index = (dev(t) for t in place_case(B, M, C, S, H, W, seed=5))
    sprites_nc = sprites.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    loc = dev(one_hot_maps(index.cpu(), H, W, torch.float64))
    a = ops.place_and_loglik(x.float(), sprites.float(), loc.float(), n, index=index)
    b = ops.place_and_loglik(x.float(), sprites_nc.float(), loc.float(), n, index=index)
    assert torch.equal(a, b)  # no atomics: bitwise the same every run


def test_place_n_beyond_m_is_clipped_not_a_crash():
    # engine/ops.py checks n only on the CPU (a GPU check would sync); the kernels clip n to M.
    H, W = HW
    x, sprites, n, index = (dev(t) for t in place_case(2, 3, 1, 5, H, W, seed=6))
    loc = dev(one_hot_maps(index.cpu(), H, W, torch.float32))
    big = torch.full_like(n, 7)
    full = torch.full_like(n, 3)
    op = torch.ops.lavae_fast.place_loglik
    for idx in (index, None):
        a = op(x.float(), sprites.float(), loc, big, idx, 1e-4)
        b = op(x.float(), sprites.float(), loc, full, idx, 1e-4)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------
# gumbel_topk_relaxed
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau,gap", [(0.5, 0.0), (0.02, 25.0)], ids=["tau0.5", "tau0.02"])
def test_gumbel_model_shapes(tau, gap):
    H, W = HW
    B, D, M = B_GUMBEL, H * W, 10
    gamma = 0.5 * math.log(D)
    logits, gumbel, n = gumbel_case(B, D, M, scale=gamma, gap=gap)
    w_rel = torch.randn(B, M, D, dtype=torch.float64)
    w_lq = torch.randn(B, dtype=torch.float64)

    def run(fn, lg, g, wr, wq):
        lg = lg.clone().requires_grad_()
        index, relaxed, log_q = fn(lg, dev(n), tau, M, g)
        (grad,) = torch.autograd.grad((wr * relaxed).sum() + (wq * log_q).sum(), lg)
        return index, {"relaxed": relaxed.detach(), "log_q": log_q.detach(), "grad": grad}

    i_got, got = run(ops.gumbel_topk_relaxed, dev(logits).float(), dev(gumbel).float(), dev(w_rel).float(), dev(w_lq).float())
    _, ref32 = run(reference.gumbel_topk_relaxed, dev(logits).float(), dev(gumbel).float(), dev(w_rel).float(), dev(w_lq).float())
    i_ref, ref64 = run(reference.gumbel_topk_relaxed, dev(logits), dev(gumbel), dev(w_rel), dev(w_lq))
    assert torch.equal(i_got.cpu(), i_ref.cpu())
    for key in got:
        assert torch.isfinite(got[key]).all(), key
        assert_matches_reference(key, got[key].cpu(), ref32[key].cpu(), ref64[key].cpu())


# ------------------------------------------------------------------------------------------------
# count_objects and gather_appearance
# ------------------------------------------------------------------------------------------------


def test_count_model_shapes():
    H, W = HW
    h = torch.randn(B_COUNT, 1, H, W) * 6
    h[0] = h[0].round()
    for dtype in (torch.float32, torch.float64):
        for thr in (0.0, 4 * 0.5 * math.log(H * W)):
            got = ops.count_objects(dev(h.to(dtype)), thr, 10)
            assert torch.equal(got.cpu(), reference.count_objects(h.to(dtype), thr, 10))
            for window in (1, 5, 7):  # the counter's window (3×3 by default, SPEC §2)
                got = ops.count_objects(dev(h.to(dtype)), thr, 10, window)
                assert torch.equal(got.cpu(), reference.count_objects(h.to(dtype), thr, 10, window)), window


@pytest.mark.parametrize("mode", ["index", "dense"])
def test_gather_model_shapes(mode):
    H, W = HW
    B, M, K = B_PLACE, 10, 64
    _, _, n, index = place_case(B, M, 1, 1, H, W, seed=8)
    loc = one_hot_maps(index, H, W, torch.float64) if mode == "index" else relaxed_maps(B, M, H, W, seed=8)
    idx = dev(index) if mode == "index" else None
    h_app = torch.randn(B, K, H, W, dtype=torch.float64)
    w = torch.randn(B, M, K, dtype=torch.float64)

    def run(fn, h, l, wt):
        h, l = h.clone().requires_grad_(), l.clone().requires_grad_()
        out = fn(h, l, dev(n), index=idx)
        gh, gl = torch.autograd.grad((wt * out).sum(), (h, l))
        return {"out": out.detach(), "grad_h_app": gh, "grad_loc": gl}

    got = run(ops.gather_appearance, dev(h_app).float(), dev(loc).float(), dev(w).float())
    ref32 = run(reference.gather_appearance, dev(h_app).float(), dev(loc).float(), dev(w).float())
    ref64 = run(reference.gather_appearance, dev(h_app), dev(loc), dev(w))
    for key in got:
        assert_matches_reference(key, got[key].cpu(), ref32[key].cpu(), ref64[key].cpu())


# ------------------------------------------------------------------------------------------------
# The op machinery on CUDA: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------


def test_opcheck_all_ops():
    H, W = 9, 7
    x, sprites, n, index = (dev(t) for t in place_case(2, 3, 1, 5, H, W, seed=9))
    loc = dev(one_hot_maps(index.cpu(), H, W, torch.float64))
    for idx in (index, None):
        torch.library.opcheck(
            torch.ops.lavae_fast.place_loglik.default,
            (x, sprites.clone().requires_grad_(), loc.clone().requires_grad_(), n, idx, 1e-4),
        )
    logits, gumbel, n2 = (dev(t) for t in gumbel_case(2, H * W, 4, seed=9))
    torch.library.opcheck(
        torch.ops.lavae_fast.gumbel_topk_relaxed.default, (logits.requires_grad_(), n2, 0.3, 4, gumbel)
    )
    torch.library.opcheck(torch.ops.lavae_fast.count_objects.default, (dev(torch.randn(2, H, W)), 0.5, 3))
    torch.library.opcheck(torch.ops.lavae_fast.count_objects.default, (dev(torch.randn(2, H, W)), 0.5, 3, 5))
    h_app = dev(torch.randn(2, 8, H, W, dtype=torch.float64))
    for idx in (index, None):
        torch.library.opcheck(
            torch.ops.lavae_fast.gather_appearance.default,
            (h_app.clone().requires_grad_(), loc.clone().requires_grad_(), n, idx),
        )


def test_torch_compile_of_the_ops():
    if ON_INTERPRETER:
        pytest.skip("torch.compile is exercised on real CUDA tensors only")
    H, W = HW
    x, sprites, n, index = (dev(t) for t in place_case(4, 10, 1, 17, H, W, seed=10))
    loc = dev(one_hot_maps(index.cpu(), H, W, torch.float32))
    x, sprites = x.float(), sprites.float()

    def f(x, sprites, loc):
        return ops.place_and_loglik(x, sprites, loc, n, index=index)

    compiled = torch.compile(f, fullgraph=True)
    assert torch.allclose(compiled(x, sprites, loc), f(x, sprites, loc), rtol=1e-6, atol=1e-3)
