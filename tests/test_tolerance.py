"""The fused-vs-reference tolerance (tests/_tolerance.py) passes the real fused path and fails a
wrong one: a gradient off by a little more than float32 rounding, or a fused op that is slightly off."""

import pytest
import torch

from lavae_fast import ops
from lavae_fast.model import LAVAE
from lavae_fast.noise import draw_noise

from _tolerance import assert_matches_reference, assert_step_matches_reference, compare_models

H, W = 6, 7


def _tiny(ops_name):
    return LAVAE(1, (H, W), 5, max_objects=3, latent_size=4, width=4, sprite_width=8, ops=ops_name)


@pytest.fixture(scope="module")
def steps():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(4)
        x = (torch.rand(3, 1, H, W) < 0.4).float()
        fused = _tiny("fused")
        nz = draw_noise(0, 0, range(3), num_pixels=H * W, max_objects=3, latent_size=4)
        return compare_models(lambda: fused, lambda: _tiny("reference"), x, nz, tau=0.3, force_n_prob=1.0)
    finally:
        torch.set_num_threads(threads)


def test_the_fused_step_passes(steps):
    assert_step_matches_reference(*steps)


@pytest.mark.parametrize("key", ["grad:app_net.0.0.weight", "grad:sprite_decoder.out.bias", "grad:loc_head.2.bias",
                                 "neg_elbo"])
def test_one_entry_off_by_1e_5_of_the_scale_fails(steps, key):
    """Any tensor, large or small, is checked: one entry moved by 1e-5 of its scale (the largest
    gradient entry for gradients), ~10× the floor, fails."""
    fused, ref32, ref64 = steps
    scale = max(float(v.abs().max()) for k, v in ref64.items() if k.startswith("grad:")) if key != "neg_elbo" else \
        float(ref64[key].abs().max())
    bad = dict(fused)
    bad[key] = fused[key].clone()
    bad[key].view(-1)[0] += 1e-5 * scale
    with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
        assert_step_matches_reference(bad, ref32, ref64)


def test_a_slightly_wrong_fused_op_fails(monkeypatch):
    """A fused gather_appearance whose gradient is 1e-4 too large (relative): far below the old
    fixed rtol=1e-3 of tests/test_model.py, still caught."""
    real = ops.gather_appearance

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g * (1 + 1e-4)

    def wrong_gather(h_app, loc, n, *, index=None):
        return real(Scaled.apply(h_app), loc, n, index=index)

    torch.manual_seed(4)
    x = (torch.rand(3, 1, H, W) < 0.4).float()
    fused = _tiny("fused")
    monkeypatch.setattr(ops, "gather_appearance", wrong_gather)  # the fused model's engine
    assert fused._ops is ops
    nz = draw_noise(0, 0, range(3), num_pixels=H * W, max_objects=3, latent_size=4)
    with pytest.raises(AssertionError, match="grad:app"):
        assert_step_matches_reference(*compare_models(lambda: fused, lambda: _tiny("reference"), x, nz, tau=0.3,
                                                      force_n_prob=1.0))


def test_single_tensors_and_refusals():
    ref64 = torch.linspace(-1, 1, 100, dtype=torch.float64)
    ref32 = ref64.float()
    assert_matches_reference("exact", ref32.clone(), ref32, ref64)
    with pytest.raises(AssertionError, match="nan: fused error"):
        assert_matches_reference("nan", torch.full_like(ref32, float("nan")), ref32, ref64)
    with pytest.raises(AssertionError, match="float64"):
        assert_matches_reference("dtype", ref32, ref32, ref32)
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_matches_reference("shape", ref32[:5], ref32, ref64)
