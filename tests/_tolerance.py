"""How close a fused float32 result must be to the reference: flash-attention's rule.

A fixed rtol between the fused and the reference float32 paths encodes one machine's rounding:
both sum in an order of their own (oneDNN picks its convolution kernels by ISA, the C++ kernels are
built for the host), so the gap moves with the CPU, and a tolerance that held on AVX-512 failed on
AVX2. The reference's own float32 error is the yardstick instead: run the reference in float64 too,
and require

    max |fused − ref64|  ≤  FACTOR · max |ref32 − ref64|  +  FLOOR · max |ref64|

per tensor. The fused path may round differently, not worse by more than ~2×. The floor (a few
float32 ulps of the tensor's largest entry; for gradients, of its sub-network's largest gradient
entry) covers tensors that the float32 reference happens to get (nearly) exactly right.

Whole models: :func:`compare_models` runs one training step (forward and backward) of the fused
model, the reference, and the reference in float64 from the same weights; pass its three results
to :func:`assert_step_matches_reference`. Single tensors: :func:`assert_matches_reference`.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import torch

FACTOR = 2.0
# ~8 float32 ulps (eps = 1.19e-7) of the scale. Measured on the odd-canvas model of
# tests/test_hostile_input.py, 12 random cases, by default and with oneDNN capped to AVX2
# (ONEDNN_MAX_CPU_ISA=AVX2): the worst tensor used 0.85 of the bound by default; with AVX2, one
# case in 12 went over it (1.51: the location head's last weight, the fused error 7× the float32
# reference's 6.7e-6 at a scale of 18), the others at most 0.71. With 1e-7 several went over. A
# fused gather_appearance whose gradient is 1e-4 too large (relative) fails by 36× (test_tolerance.py).
FLOOR = 1e-6


def reference_error(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, *, factor: float = FACTOR,
                    floor: float = FLOOR, scale: Optional[float] = None):
    """(error of ``got``, its allowed bound, the float32 reference's error), all against ``ref64``.

    ``scale`` (default: max |ref64|) is what ``floor`` is relative to."""
    if not (got.shape == ref32.shape == ref64.shape):
        raise AssertionError(f"shapes differ: got {tuple(got.shape)}, ref32 {tuple(ref32.shape)}, "
                             f"ref64 {tuple(ref64.shape)}")
    if ref64.dtype != torch.float64:
        raise AssertionError(f"ref64 must be float64 (the reference run in double), got {ref64.dtype}")
    if got.numel() == 0:
        return 0.0, 0.0, 0.0
    got, ref32 = got.detach().double(), ref32.detach().double()
    ref64 = ref64.detach()
    if scale is None:
        scale = float(ref64.abs().max())
    err = float((got - ref64).abs().max())
    ref_err = float((ref32 - ref64).abs().max())
    return err, factor * ref_err + floor * scale, ref_err


def assert_matches_reference(name: str, got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, *,
                             factor: float = FACTOR, floor: float = FLOOR, scale: Optional[float] = None) -> None:
    """``got`` (the fused float32 result) is within ``factor`` × the float32 reference's own error
    of the float64 reference, plus ``floor`` × ``scale``. NaN anywhere fails."""
    err, bound, ref_err = reference_error(got, ref32, ref64, factor=factor, floor=floor, scale=scale)
    assert err <= bound, (
        f"{name}: fused error {err:.3g} against the float64 reference exceeds {bound:.3g} = "
        f"{factor:g} x the float32 reference's error {ref_err:.3g} + {floor:g} x scale")


def float64_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (the same parameters and buffers, in double)."""
    return copy.deepcopy(model).to(torch.float64)


def model_step(model, x: torch.Tensor, noise, **kw) -> Dict[str, torch.Tensor]:
    """One LAVAE forward and backward: the per-image −ELBO and every parameter's gradient, named
    (``neg_elbo``, ``grad:<parameter>``), plus the discrete choices (``n``, ``index``) under
    ``discrete``. ``x`` is cast to the model's dtype; ``kw`` goes to the forward (tau, ...)."""
    dtype = next(model.parameters()).dtype
    model.zero_grad(set_to_none=True)
    out = model(x.to(dtype), noise=noise, **kw)
    out.loss.backward()
    res = {"neg_elbo": out.neg_elbo.detach()}
    res.update({f"grad:{k}": p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None})
    res["discrete"] = (out.n.clone(), out.index.clone())
    return res


def assert_step_matches_reference(fused: Dict, ref32: Dict, ref64: Dict, **kw) -> None:
    """Compare three :func:`model_step` results: the same counts and draws (else the continuous
    values compare different objects), then every value and gradient by the rule above."""
    for res, label in ((fused, "fused path"), (ref32, "float32 reference"), (ref64, "float64 reference")):
        bad = [k for k, v in res.items() if k != "discrete" and not torch.isfinite(v).all()]
        assert not bad, f"the {label} gave NaN or Inf in {bad[:5]}"
    for other, label in ((ref32, "float32 reference"), (ref64, "float64 reference")):
        n, index = other["discrete"]
        assert torch.equal(fused["discrete"][0], n) and torch.equal(fused["discrete"][1], index), (
            f"the fused path counted or drew differently from the {label} (n {fused['discrete'][0].tolist()} vs "
            f"{n.tolist()}): the comparison needs a case without near-ties")
    assert fused.keys() == ref32.keys() == ref64.keys(), (
        f"different tensors: fused {sorted(fused)}, ref32 {sorted(ref32)}, ref64 {sorted(ref64)}")
    # A gradient's floor is relative to the largest gradient entry of its sub-network (app_net,
    # loc_head, sprite_decoder, ...), not of its own tensor: the bias of a conv followed by batch
    # norm has a true gradient of ~0, a sum over every pixel that cancels, with rounding errors of
    # the size of its terms (measured with oneDNN capped to AVX2: a bias gradient off by 1.1e-6 where
    # the float32 reference happened to be only 1.7e-7 off). Nor of the whole model: the location
    # net's gradients reach 1e5 (straight-through's 1/ε, SPEC §3) while the appearance net's are
    # ~1, and a floor at the model's scale hid a 1e-3 relative error in the appearance gradients.
    scales = {}
    for k, v in ref64.items():
        if k.startswith("grad:") and v.numel():
            g = _group(k)
            scales[g] = max(scales.get(g, 0.0), float(v.abs().max()))
    for k in fused:
        if k != "discrete":
            assert_matches_reference(k, fused[k], ref32[k], ref64[k],
                                     scale=scales[_group(k)] if k.startswith("grad:") else None, **kw)


def _group(key: str) -> str:
    """``grad:app_net.1.body.0.0.weight`` → ``app_net``: the sub-network a gradient belongs to."""
    return key.split(":", 1)[1].split(".", 1)[0]


def compare_models(make_fused: Callable[[], torch.nn.Module], make_ref: Callable[[], torch.nn.Module],
                   x: torch.Tensor, noise, **kw):
    """The fused model, the reference and the reference in float64 (all from the same weights),
    one :func:`model_step` each: (fused, ref32, ref64)."""
    fused, ref = make_fused(), make_ref()
    ref.load_state_dict(fused.state_dict())
    ref64 = float64_twin(ref)
    return model_step(fused, x, noise, **kw), model_step(ref, x, noise, **kw), model_step(ref64, x, noise, **kw)
