"""Hostile input at the entry points (model forward on user data, the command lines) and odd but
legal input (a one-pixel canvas, sprites larger than the canvas, n = 0 everywhere) end to end.
The ops' own boundary is driven by tests/test_properties.py."""

import math

import pytest
import torch

from lavae_fast import ops
from lavae_fast import reference as ref
from lavae_fast.evaluate import main as evaluate_main
from lavae_fast.model import LAVAE
from lavae_fast.noise import draw_noise
from lavae_fast.train import main as train_main

from _tolerance import assert_step_matches_reference, compare_models


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(canvas, S, **kw):
    return LAVAE(1, canvas, S, max_objects=3, latent_size=4, width=4, sprite_width=8, **kw)


def _noise(model, B, D, seed=0):
    return draw_noise(seed, 0, range(B), num_pixels=D, max_objects=model.max_objects, latent_size=model.latent_size)


# ---------------------------------------------------------------------------------------------
# Odd but legal
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ops_name", ["fused", "reference"])
@pytest.mark.parametrize("canvas,S", [((1, 1), 3), ((1, 1), 1), ((3, 5), 9), ((2, 7), 17)])
def test_tiny_canvases_and_sprites_larger_than_the_canvas_train(canvas, S, ops_name):
    torch.manual_seed(0)
    m = _model(canvas, S, ops=ops_name)
    H, W = canvas
    x = (torch.rand(3, 1, H, W) < 0.5).float()
    nz = _noise(m, 3, H * W)
    out = m(x, noise=nz, tau=0.3, force_n_prob=1.0)  # forced n = 1: the sprite decoder runs
    assert torch.isfinite(out.loss) and out.n.tolist() == [1, 1, 1]
    out.loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert out.lam.shape == (3, 1, H, W) and bool(((out.lam > 0) & (out.lam < 1)).all())


def test_fused_and_reference_models_agree_on_an_odd_canvas():
    """Values and every gradient within flash-attention's rule (tests/_tolerance.py): a fixed rtol
    held on AVX-512 and failed where oneDNN runs AVX2 convolutions."""
    torch.manual_seed(1)
    x = (torch.rand(2, 1, 3, 5) < 0.5).float()
    fused = _model((3, 5), 9, ops="fused")
    nz = _noise(fused, 2, 15, seed=3)
    steps = compare_models(lambda: fused, lambda: _model((3, 5), 9, ops="reference"), x, nz, tau=0.2,
                           force_n_prob=1.0)
    assert steps[0]["discrete"][0].tolist() == [1, 1]  # forced n = 1: sprites are placed and differentiated
    assert_step_matches_reference(*steps)


def test_n_zero_everywhere_is_legal():
    torch.manual_seed(2)
    m = _model((6, 6), 5)
    with torch.no_grad():  # push every location logit below the count threshold 4γ
        m.loc_head[-1].bias.fill_(-100.0)
    x = (torch.rand(4, 1, 6, 6) < 0.3).float()
    out = m(x, noise=_noise(m, 4, 36), tau=0.5, force_n_prob=0.0)
    assert out.n.tolist() == [0, 0, 0, 0] and (out.index == -1).all()
    assert torch.isfinite(out.loss) and float(out.kl_loc.detach().abs().max()) == 0.0
    # nothing drawn: λ = ε everywhere, so the likelihood is the all-background one
    eps = 1e-4
    expect = (x * math.log(eps) + (1 - x) * math.log(1 - eps)).flatten(1).sum(1)
    torch.testing.assert_close(-out.recon, expect)
    out.loss.backward()
    assert all(p.grad is None for p in m.sprite_decoder.parameters())  # the decoder saw no object
    # the ops at n = 0 everywhere, M slots of junk that is never read
    B, M = 2, 3
    sprites, loc = torch.rand(B, M, 1, 5, 5), torch.rand(B, M, 6, 6)
    n, junk = torch.zeros(B, dtype=torch.long), torch.full((B, M), 10**9)
    for index in (None, junk):
        ll = ops.place_and_loglik(x[:B], sprites, loc, n, index=index)
        torch.testing.assert_close(ll, ref.place_and_loglik(x[:B], sprites, loc, n, index=index))
        assert not ops.gather_appearance(torch.rand(B, 4, 6, 6), loc, n, index=index).any()


# ---------------------------------------------------------------------------------------------
# Model forward on user data: values are checked here, once
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"tau": 0.0}, "tau must be > 0"),
    ({"tau": float("nan")}, "tau must be > 0"),
    ({"force_n_prob": 1.5}, "force_n_prob must lie in"),
    ({"force_n_prob": float("nan")}, "force_n_prob must lie in"),
])
def test_model_refuses_bad_scalars(kw, match):
    m = _model((6, 6), 5)
    with pytest.raises(ValueError, match=match):
        m(torch.zeros(2, 1, 6, 6), **kw)


@pytest.mark.parametrize("field,value", [("gumbel", float("nan")), ("eps", float("inf")), ("coin", float("nan"))])
def test_model_refuses_non_finite_noise(field, value):
    m = _model((6, 6), 5)
    nz = _noise(m, 2, 36)
    getattr(nz, field).view(-1)[0] = value
    with pytest.raises(ValueError, match=f"noise.{field} contains NaN or Inf"):
        m(torch.zeros(2, 1, 6, 6), noise=nz)
    nz = _noise(m, 2, 36)
    nz.coin = nz.coin[:1]
    with pytest.raises(ValueError, match="noise does not match"):
        m(torch.zeros(2, 1, 6, 6), noise=nz)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1.5, -0.01])
def test_model_refuses_images_outside_0_1(value):
    m = _model((6, 6), 5)
    x = torch.zeros(2, 1, 6, 6)
    x[1, 0, 3, 2] = value
    with pytest.raises(ValueError, match=r"^x "):
        m(x)


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,match", [
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--loc-lr", "inf"], "--loc-lr"),
    (["--warmup-scale", "inf"], "--warmup-scale"),
    (["--device", "banana"], "--device"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data"),
    (["--canvas", "8"], "--dataset/--canvas"),  # 19×19 dSprites patches do not fit
    (["--batch-size", "0"], "--batch-size"),
])
def test_train_cli_refuses_naming_the_argument(tmp_path, capsys, bad, match):
    with pytest.raises(SystemExit) as info:
        train_main(["--out", str(tmp_path / "r"), "--steps", "1", "--n-train", "8", "--threads", "1",
                    "--no-progress"] + bad)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("bad,match", [
    (["--batch-size", "0"], "--batch-size"),
    (["--K", "-1"], "--K"),
    (["--splits", "test,valid"], "--splits"),
    (["--device", "banana"], "--device"),
    (["--threads", "0"], "--threads"),
])
def test_evaluate_cli_refuses_naming_the_argument(tmp_path, capsys, bad, match):
    with pytest.raises(SystemExit):
        evaluate_main([str(tmp_path)] + bad)
    assert match in capsys.readouterr().err


def test_evaluate_cli_on_a_missing_run(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        evaluate_main([str(tmp_path / "nothing"), "--K", "0"])
