"""Fused Leaky ReLU → batch norm (lavae_fast.norm) against ``bn(F.leaky_relu(y))`` of nn.BatchNorm2d.

Values, the three gradients and the running statistics are compared for both memory formats and
the three dtypes; the ops go through opcheck and a float64 gradcheck; torch.compile of a module
using the API matches eager. The C++ comparison runs whenever lavae_fast._C is loaded (then it is
what serves CPU tensors); tests marked with the ``ext`` fixture skip without it, unless
LAVAE_FAST_REQUIRE_EXT=1 (set in CI) turns a missing extension into a failure.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lavae_fast import norm
from lavae_fast.norm import lrelu_batch_norm

SLOPE = 0.01
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)



def make_bn(C, dtype=torch.float32, momentum=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(C, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(C, generator=gen, dtype=dtype))
        bn.bias.copy_(torch.randn(C, generator=gen, dtype=dtype))
        bn.running_mean.copy_(torch.randn(C, generator=gen, dtype=dtype))
        bn.running_var.copy_(torch.rand(C, generator=gen, dtype=dtype) + 0.5)
    return bn


def make_y(shape, dtype=torch.float32, channels_last=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    # An offset and per-channel scales, so that the mean is far from 0 and the slope matters.
    C = shape[1]
    y = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3, C, dtype=torch.float64)[
        :, None, None] + 0.4
    y = y.to(dtype)
    return y.contiguous(memory_format=CL) if channels_last else y


def run_pair(y, bn, steps=2, grad_seed=2):
    """Run the fused API and the unfused modules side by side; returns both sides' results."""
    bn_ref = copy.deepcopy(bn)
    y1 = y.detach().clone().requires_grad_()
    y2 = y.detach().clone().requires_grad_()
    for _ in range(steps):
        o1 = lrelu_batch_norm(y1, bn, SLOPE)
        o2 = bn_ref(F.leaky_relu(y2, SLOPE))
    g = torch.randn(o1.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(y.dtype)
    o1.backward(g)
    o2.backward(g)
    return (o1, y1, bn), (o2, y2, bn_ref)


def assert_close(name, got, want, tol):
    assert got.shape == want.shape, name
    got, want = got.detach(), want.detach()
    err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    scale = float(want.double().abs().max().clamp(min=1.0)) if want.numel() else 1.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g}"


def check_pair(fused, ref, tol):
    (o1, y1, bn1), (o2, y2, bn2) = fused, ref
    assert o1.dtype == o2.dtype
    assert o1.stride() == o2.stride(), "out must keep y's memory format"
    assert_close("out", o1, o2, tol)
    assert_close("grad_y", y1.grad, y2.grad, tol)
    assert_close("grad_weight", bn1.weight.grad, bn2.weight.grad, tol)
    assert_close("grad_bias", bn1.bias.grad, bn2.bias.grad, tol)
    assert_close("running_mean", bn1.running_mean, bn2.running_mean, tol)
    assert_close("running_var", bn1.running_var, bn2.running_var, tol)
    assert int(bn1.num_batches_tracked) == int(bn2.num_batches_tracked)


SHAPES = [(3, 1, 5, 7), (2, 3, 7, 5), (2, 44, 9, 7), (3, 17, 5, 3), (1, 17, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_batchnorm_training(shape, channels_last, dtype):
    bn = make_bn(shape[1], dtype)
    fused, ref = run_pair(make_y(shape, dtype, channels_last), bn)
    check_pair(fused, ref, 1e-12 if dtype == torch.float64 else 2e-5)


def test_momentum_none_cumulative_average():
    bn = make_bn(5, momentum=None)
    fused, ref = run_pair(make_y((2, 5, 6, 5), channels_last=True), bn, steps=3)
    check_pair(fused, ref, 2e-5)
    assert int(fused[2].num_batches_tracked) == 3


def test_no_running_stats_and_no_affine():
    for kw in [dict(track_running_stats=False), dict(affine=False)]:
        bn = nn.BatchNorm2d(4, **kw)
        y = make_y((2, 4, 5, 3))
        for mode in ["train", "eval"]:
            bn.train(mode == "train")
            ref = copy.deepcopy(bn)
            got = lrelu_batch_norm(y, bn, SLOPE)
            want = ref(F.leaky_relu(y, SLOPE))
            assert_close(f"{kw} {mode}", got, want, 2e-5)
            if bn.running_mean is not None:
                assert_close("running_mean", bn.running_mean, ref.running_mean, 1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_eval_mode_uses_running_stats(channels_last):
    bn = make_bn(6).eval()
    y = make_y((2, 6, 5, 7), channels_last=channels_last).requires_grad_()
    got = lrelu_batch_norm(y, bn, SLOPE)
    want = copy.deepcopy(bn)(F.leaky_relu(y, SLOPE))
    assert_close("eval out", got, want, 1e-6)
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_bfloat16_within_bf16_tolerance(channels_last):
    """bf16 y (float32 parameters, as under autocast) against the float32 computation of the same
    bf16 values: out and grad_y are rounded to bf16 once; statistics and parameter grads stay float32."""
    y = make_y((2, 44, 7, 9), torch.bfloat16, channels_last)
    bn = make_bn(44)
    bn_ref = copy.deepcopy(bn)
    y1 = y.clone().requires_grad_()
    y2 = y.float().requires_grad_()
    o1 = lrelu_batch_norm(y1, bn, SLOPE)
    o2 = bn_ref(F.leaky_relu(y2, SLOPE))
    assert o1.dtype == torch.bfloat16 and o1.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    g = torch.randn(o1.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    o1.backward(g)
    o2.backward(g.float())
    assert y1.grad.dtype == torch.bfloat16 and bn.weight.grad.dtype == torch.float32
    assert_close("out", o1, o2, 8e-3)
    assert_close("grad_y", y1.grad, y2.grad, 8e-3)
    assert_close("grad_weight", bn.weight.grad, bn_ref.weight.grad, 1e-4)
    assert_close("grad_bias", bn.bias.grad, bn_ref.bias.grad, 1e-4)
    assert_close("running_mean", bn.running_mean, bn_ref.running_mean, 1e-5)
    assert_close("running_var", bn.running_var, bn_ref.running_var, 1e-5)


def test_large_offset_keeps_float32_accuracy():
    """|mean| ≫ std: a one-pass Σa² − (Σa)²/n would lose the variance in float32."""
    y = (torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 0.01 + 100.0).contiguous(
        memory_format=CL)
    w, b = torch.ones(3), torch.zeros(3)
    out, mean, invstd = torch.ops.lavae_fast.lrelu_batch_norm(y, w, b, SLOPE, 1e-5)
    out64, mean64, invstd64 = norm.reference_forward(y.double(), w.double(), b.double(), SLOPE, 1e-5)
    assert_close("mean", mean, mean64, 1e-6)
    assert_close("invstd", invstd / invstd64, torch.ones(3, dtype=torch.float64), 1e-4)
    assert_close("out", out, out64, 1e-3)


def test_op_gradcheck_float64():
    y = make_y((2, 3, 3, 5), torch.float64).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = lambda y, w, b: torch.ops.lavae_fast.lrelu_batch_norm(y, w, b, SLOPE, 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (y, w, b))
    ycl = y.detach().contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradcheck(f, (ycl, w, b))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(channels_last):
    y = make_y((2, 5, 3, 4), channels_last=channels_last).requires_grad_()
    w = torch.randn(5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    torch.library.opcheck(torch.ops.lavae_fast.lrelu_batch_norm.default, (y, w, b, SLOPE, 1e-5))
    out, mean, invstd = torch.ops.lavae_fast.lrelu_batch_norm(y.detach(), w.detach(), b.detach(), SLOPE, 1e-5)
    g = torch.randn_like(out)
    for needs in [(True, True, True), (True, False, False), (False, True, True)]:
        torch.library.opcheck(torch.ops.lavae_fast.lrelu_batch_norm_backward.default,
                              (g, y.detach(), w.detach(), mean, invstd, SLOPE, *needs))


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, momentum=None)

    def forward(self, x):
        return lrelu_batch_norm(self.conv(x), self.bn, SLOPE)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    eager = _Layer()
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    x = torch.randn(2, 3, 7, 5).contiguous(memory_format=CL)
    for _ in range(2):
        o1 = eager(x)
        o2 = compiled(x)
        assert_close("compiled out", o2, o1, 1e-5)
    o1.square().sum().backward()
    o2.square().sum().backward()
    for (name, p1), p2 in zip(eager.named_parameters(), compiled_mod.parameters()):
        assert_close(f"grad {name}", p2.grad, p1.grad, 1e-4)
    for (name, b1), b2 in zip(eager.named_buffers(), compiled_mod.buffers()):
        assert_close(f"buffer {name}", b2, b1, 1e-6)


def test_no_graph_break_with_running_stats():
    layer = _Layer()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 3, 5, 5))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_one_value_per_channel_raises():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        lrelu_batch_norm(torch.randn(1, 3, 1, 1), bn, SLOPE)
    assert int(bn.num_batches_tracked) == 0
    bn.eval()  # running statistics: one value is fine, as in nn.BatchNorm2d
    assert lrelu_batch_norm(torch.randn(1, 3, 1, 1), bn, SLOPE).shape == (1, 3, 1, 1)


def test_bad_inputs_name_the_argument():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="y must have 4 dimensions"):
        lrelu_batch_norm(torch.randn(3, 4, 4), bn, SLOPE)
    with pytest.raises(TypeError, match="y must have dtype"):
        lrelu_batch_norm(torch.randn(2, 3, 4, 4).half(), bn, SLOPE)
    with pytest.raises(ValueError, match="num_features"):
        lrelu_batch_norm(torch.randn(2, 4, 4, 4), bn, SLOPE)
    with pytest.raises(TypeError, match="bn.weight must be float64"):
        lrelu_batch_norm(torch.randn(2, 3, 4, 4, dtype=torch.float64), bn, SLOPE)
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d"):
        lrelu_batch_norm(torch.randn(2, 3, 4, 4), nn.BatchNorm1d(3), SLOPE)
    with pytest.raises(ValueError, match="slope"):
        lrelu_batch_norm(torch.randn(2, 3, 4, 4), bn, float("nan"))
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        lrelu_batch_norm([1.0], bn, SLOPE)
    # Direct op calls are checked too (C++ kernel or reference fallback alike).
    with pytest.raises((RuntimeError, ValueError, TypeError), match="weight"):
        torch.ops.lavae_fast.lrelu_batch_norm(torch.randn(2, 3, 4, 4), torch.ones(4), torch.zeros(3), SLOPE, 1e-5)


def test_reference_fallback_matches_kernel_dispatch():
    """The CompositeExplicitAutograd reference agrees with what the op dispatches to on CPU."""
    y = make_y((2, 44, 5, 7), channels_last=True)
    w, b = torch.randn(44), torch.randn(44)
    got = torch.ops.lavae_fast.lrelu_batch_norm(y, w, b, SLOPE, 1e-5)
    want = norm.reference_forward(y, w, b, SLOPE, 1e-5)
    for name, a, r in zip(["out", "mean", "invstd"], got, want):
        assert_close(name, a, r, 2e-5)
    assert got[0].stride() == want[0].stride()


def test_cpu_kernel_is_registered_and_used(ext):
    for name in ["lrelu_batch_norm", "lrelu_batch_norm_backward"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lavae_fast::{name}", "CPU"), name
    # The reference refuses an ill-shaped grad_out with its own ValueError; the C++ kernel's
    # message says "lrelu_batch_norm_backward: grad_out must have shape" (a RuntimeError).
    y = torch.randn(2, 3, 4, 4)
    one = torch.ones(3)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.lavae_fast.lrelu_batch_norm_backward(torch.randn(2, 3, 4, 5), y, one, one, one, SLOPE, True, True,
                                                       True)
