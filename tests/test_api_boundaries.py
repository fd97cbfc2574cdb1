"""The public Python API checks what it is given at the boundary (issue 27): types, integer-ness,
ranges and devices, each refusal a TypeError/ValueError whose message names the argument and
what was expected — where a hostile probe found silently wrong results (a float row truncated, a
NaN learning rate, a state dict that loads nothing) or raw tracebacks (overflow in the
dispatcher, an unknown device, a meta tensor). Valid input keeps working: Python ints and 0-d
integer tensors alike.

Every refusal case here failed on the code before the fix (silent acceptance or another
exception), except the few marked "pins" in a comment, which hold behaviour that was already
right; the valid-input checks (ints and 0-d tensors alike) passed before too.
Models are tiny and nothing trains: each test runs in well under a second.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from lavae_fast import ops
from lavae_fast import reference as ref
from lavae_fast.baseline import BetaVAE
from lavae_fast.model import MIN_TAU, LAVAE, Latents
from lavae_fast.recipe import Recipe

H = W = 8


def _names(exc: BaseException, name: str) -> bool:
    """The message names ``name`` as a word (``latents.index`` does not name ``index``'s ``n``)."""
    return re.search(rf"(^|[^\w.]){re.escape(name)}([^\w]|$)", str(exc)) is not None


def refuses(kind, name, fn, match=None):
    with pytest.raises(kind) as info:
        fn()
    assert _names(info.value, name), f"the refusal does not name {name!r}: {info.value}"
    if match is not None:
        assert re.search(match, str(info.value)), f"{match!r} not in: {info.value}"
    return info.value


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LAVAE(1, (H, W), 3, max_objects=3, latent_size=4, width=4, sprite_width=8).eval()


@pytest.fixture(scope="module")
def baseline():
    torch.manual_seed(0)
    return BetaVAE(1, (H, W), latent_channels=2, width=4)


@pytest.fixture
def lat():
    return Latents(n=torch.tensor([3, 2]), index=torch.tensor([[0, 9, 18], [27, 36, -1]]),
                   z_app=torch.zeros(2, 3, 4), canvas=(H, W))


def _images(B=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 1, H, W, generator=g) > 0.7).to(dtype)


# ---------------------------------------------------------------------------------------------
# 1. Latents editing, decoding and sampling: slots, rows and columns are ints
# ---------------------------------------------------------------------------------------------

# Before: move_object(lat, 0, 2.7, 3) stored row·W + col = 24.6 as flat index 24 (row 3, col 0),
# swap_objects(lat, 1.5, 0) truncated 1.5 to 1, a str slot raised a raw
# "'<=' not supported", a float slot an IndexError, decode(None) an AttributeError, a bool slot
# was slot 1 and a float n tensor for sample was truncated.
EDITS = [
    ("move float row", lambda m, lat: m.move_object(lat, 0, 2.7, 3), TypeError, "row", "must be an int"),
    ("move float col", lambda m, lat: m.move_object(lat, 0, 2, 3.0), TypeError, "col", "must be an int"),
    ("move float slot", lambda m, lat: m.move_object(lat, 0.0, 2, 3), TypeError, "obj", "must be an int"),
    ("move bool slot", lambda m, lat: m.move_object(lat, True, 2, 3), TypeError, "obj", "bool"),
    ("move float tensor row", lambda m, lat: m.move_object(lat, 0, torch.tensor(2.5), 3), TypeError, "row", None),
    ("move row off canvas", lambda m, lat: m.move_object(lat, 0, H, 3), ValueError, "row", r"\[0, 7\]"),
    ("swap float", lambda m, lat: m.swap_objects(lat, 1.5, 0), TypeError, "i", "must be an int"),
    ("swap str", lambda m, lat: m.swap_objects(lat, "0", 1), TypeError, "i", "must be an int"),
    ("swap float tensor", lambda m, lat: m.swap_objects(lat, 0, torch.tensor(1.0)), TypeError, "j", None),
    ("appearance float dim", lambda m, lat: m.change_appearance(lat, 0, 1.5, 2.0), TypeError, "dim", "must be an int"),
    ("appearance str value", lambda m, lat: m.change_appearance(lat, 0, 1, "a"), TypeError, "value", None),
    ("appearance nan value", lambda m, lat: m.change_appearance(lat, 0, 1, math.nan), ValueError, "value", None),
    ("decode None", lambda m, lat: m.decode(None), TypeError, "latents", "Latents"),
    ("move None", lambda m, lat: m.move_object(None, 0, 1, 1), TypeError, "latents", "Latents"),
    ("float canvas", lambda m, lat: m.decode(Latents(lat.n, lat.index, lat.z_app, (8.7, 8))), TypeError,
     "latents.canvas", None),
    ("sample bool n", lambda m, lat: m.sample(2, True), TypeError, "n", None),
    ("sample float n tensor", lambda m, lat: m.sample(2, torch.tensor([1.5, 2.7])), TypeError, "n", "integer"),
    ("sample n above D", lambda m, lat: m.sample(2, 3, canvas=(1, 2)), ValueError, "n", r"\[0, 2\]"),
    ("sample int canvas", lambda m, lat: m.sample(2, canvas=5), TypeError, "canvas", None),
    ("locate bogus", lambda m, lat: m.locate(torch.zeros(1, 1, H, W), torch.tensor([1]), "bogus"), ValueError,
     "locations", None),
]


@pytest.mark.parametrize("case", EDITS, ids=[c[0] for c in EDITS])
def test_latents_helpers_refuse_what_is_not_an_int_slot_row_or_column(model, lat, case):
    _, call, kind, name, match = case
    refuses(kind, name, lambda: call(model, lat), match)


def test_latents_helpers_take_ints_and_0d_integer_tensors_alike(model, lat):
    want = model.move_object(lat, 1, 2, 3)
    assert want.index[:, 1].tolist() == [2 * W + 3, 2 * W + 3] and want.index.dtype == lat.index.dtype
    got = model.move_object(lat, torch.tensor(1), torch.tensor(2, dtype=torch.int32), torch.tensor(3))
    assert torch.equal(got.index, want.index)
    assert torch.equal(model.swap_objects(lat, torch.tensor(0), 1).index, model.swap_objects(lat, 0, 1).index)
    assert model.change_appearance(lat, 0, torch.tensor(1), 2).z_app[0, 0, 1].item() == 2.0
    assert model.decode(want).shape == (2, 1, H, W)


def test_sampling_on_a_canvas_smaller_than_max_objects_draws_at_most_d_objects(model):
    # Before: a prior draw of n = 3 on a 1×2 canvas reached decode, which refused its −1 index.
    lam, lat = model.sample(16, canvas=(1, 2), generator=torch.Generator().manual_seed(0), return_latents=True)
    assert lam.shape == (16, 1, 1, 2) and int(lat.n.max()) <= 2


# ---------------------------------------------------------------------------------------------
# 2. Recipe: step, sample ids, seed, optimiser, state
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe(model):
    return Recipe(model, 10)


def test_recipe_refuses_a_fractional_step_or_sample_id(recipe):
    x, ids = _images(), torch.arange(2)
    # Before: 1.5 ran as step 1.5 of the schedules (and step 1 of the noise); ids 0.5, 1.5 drew the
    # noise of images 0 and 1; three ids for two images raised "noise does not match the batch".
    refuses(TypeError, "step", lambda: recipe.loss(x, 1.5, ids), "must be an int")
    refuses(TypeError, "step", lambda: recipe.loss(x, True, ids))
    refuses(TypeError, "ids", lambda: recipe.loss(x, 1, ids.float() + 0.5), "integer")
    refuses(TypeError, "ids", lambda: recipe.loss(x, 1, [0, 1.5]))
    refuses(ValueError, "ids", lambda: recipe.loss(x, 1, torch.arange(3)), "one per image")
    refuses(TypeError, "counts", lambda: recipe.loss(x, 1, ids, counts=torch.tensor([1.5, 0.0])))


def test_recipe_step_refuses_a_nan_step_and_a_missing_optimiser(recipe):
    # The groups of recipe.optimizer() without building one (Adamax's first construction in a
    # process costs a second and more): Recipe.step reads only param_groups.
    opt = SimpleNamespace(param_groups=[{"name": g["name"], "lr": g["lr"]} for g in recipe.parameter_groups()])
    before = [g["lr"] for g in opt.param_groups]
    refuses(TypeError, "step", lambda: recipe.step(opt, math.nan))  # before: a NaN learning rate
    refuses(TypeError, "step", lambda: recipe.step(opt, 2.5))
    assert [g["lr"] for g in opt.param_groups] == before
    refuses(TypeError, "opt", lambda: recipe.step(None, 0), "param_groups")  # before: AttributeError
    assert recipe.step(opt, torch.tensor(3)) == recipe.step(opt, 3)


@pytest.mark.parametrize("seed,kind", [("a", TypeError), (1.5, TypeError), (True, TypeError), (-1, ValueError),
                                       (2**64, ValueError)])
def test_recipe_refuses_a_seed_that_is_not_a_64_bit_natural_number(model, seed, kind):
    # Before: "a" raised int()'s own message, 1.5 became seed 1, True seed 1, -1 failed only at the
    # first loss and 2**64 drew the noise of seed 0.
    refuses(kind, "seed", lambda: Recipe(model, 10, seed=seed))


def test_recipe_load_state_dict_names_missing_and_unexpected_keys(model, baseline):
    r = Recipe(model, 10)
    refuses(ValueError, "aux", lambda: r.load_state_dict({}), "missing")  # before: loaded nothing, silently
    refuses(ValueError, "aux", lambda: r.load_state_dict({"aux": None}))  # a baseline recipe's state
    refuses(ValueError, "extra", lambda: r.load_state_dict({**r.state_dict(), "extra": 1}), "unexpected")
    refuses(TypeError, "state", lambda: r.load_state_dict(None))
    r.load_state_dict(Recipe(model, 10).state_dict())  # a LAVAE recipe's own state loads
    rb = Recipe(baseline, 10)
    refuses(ValueError, "aux", lambda: rb.load_state_dict({}), "missing")
    refuses(ValueError, "aux", lambda: rb.load_state_dict(r.state_dict()))
    rb.load_state_dict(rb.state_dict())


# ---------------------------------------------------------------------------------------------
# 3. BetaVAE: β, and float64 input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta,kind", [(-1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                                       ("1", TypeError)])
def test_baseline_refuses_a_beta_that_is_not_finite_and_non_negative(baseline, beta, kind):
    # Before: β = −1 rewarded the KL and NaN gave a NaN loss, both without a word.
    refuses(kind, "beta", lambda: baseline(_images(), beta=beta))
    assert torch.isfinite(baseline(_images(), beta=0).loss)


def test_baseline_log_likelihood_of_float64_images_is_that_of_their_float32_cast(baseline):
    # Pins (passes on the code before the fix as well: this tree's BetaVAE._input already casts
    # as LAVAE's does): images with values inside (0, 1), where a float64 path would differ.
    x = torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ll64 = baseline.log_likelihood(x, K=3, generator=torch.Generator().manual_seed(1))
    ll32 = baseline.log_likelihood(x.float(), K=3, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(ll64).all() and torch.equal(ll64, ll32)


# ---------------------------------------------------------------------------------------------
# 4. Integers beyond what the dispatcher holds
# ---------------------------------------------------------------------------------------------

HUGE = [
    # Before: accepted, then a raw "Expected a value of type 'int'" from the dispatcher at the first
    # forward (LAVAE, set_count_window) or the op call (count_objects).
    ("LAVAE count_window", lambda m: LAVAE(1, (H, W), 3, count_window=2**63 + 1), "count_window"),
    ("set_count_window", lambda m: m.set_count_window(2**63 + 1), "count_window"),
    ("LAVAE exclusion_window", lambda m: LAVAE(1, (H, W), 3, exclusion_window=2**63 + 1), "exclusion_window"),
    ("count_objects window", lambda m: ops.count_objects(torch.zeros(1, H, W), 0.0, 3, window=2**63 + 1), "window"),
    ("count_objects max_objects", lambda m: ops.count_objects(torch.zeros(1, H, W), 0.0, 2**63), "max_objects"),
    # Pins (refused before the fix as well): the model and the draws bound max_objects by 1024.
    ("LAVAE max_objects", lambda m: LAVAE(1, (H, W), 3, max_objects=2**63), "max_objects"),
    ("gumbel max_objects", lambda m: ops.gumbel_topk_relaxed(torch.zeros(1, 4), torch.tensor([1]), 0.5, 2**63,
                                                             torch.zeros(1, 4)), "max_objects"),
]


@pytest.mark.parametrize("case", HUGE, ids=[c[0] for c in HUGE])
def test_integers_too_large_for_the_dispatcher_are_refused_by_name(model, case):
    _, call, name = case
    refuses(ValueError, name, lambda: call(model))
    assert model.count_window == 3


# ---------------------------------------------------------------------------------------------
# 5. from_pretrained's device
# ---------------------------------------------------------------------------------------------

DEVICES = [("gpu0", ValueError), ("cuda:99", ValueError), ("meta", ValueError), (3.5, TypeError),
           (None, TypeError)]
if not torch.cuda.is_available():
    DEVICES.append(("cuda", ValueError))


@pytest.mark.parametrize("cls", [LAVAE, BetaVAE], ids=["lavae", "baseline"])
@pytest.mark.parametrize("device,kind", DEVICES, ids=[str(d) for d, _ in DEVICES])
def test_from_pretrained_refuses_a_device_it_cannot_use_before_reading(cls, device, kind):
    # Before: "Torch not compiled with CUDA enabled" (AssertionError), "Invalid device string"
    # (RuntimeError) after the checkpoint was read, and 3.5 was accepted by model.to(3.5).
    refuses(kind, "device", lambda: cls.from_pretrained("multi-dsprites", device=device))


# ---------------------------------------------------------------------------------------------
# 6. Meta-device and float64 images
# ---------------------------------------------------------------------------------------------


def test_meta_images_are_refused_by_name(model, baseline, recipe):
    x = torch.empty(2, 1, H, W, device="meta")
    # Before: "Tensor.item() cannot be called on meta tensors" (RuntimeError) from the value checks.
    for call in (lambda: model(x), lambda: model.infer(x), lambda: model.log_likelihood(x, K=1),
                 lambda: baseline(x), lambda: recipe.loss(x, 0, torch.arange(2))):
        refuses(ValueError, "x", call, "meta")


def test_recipe_loss_of_float64_images_is_that_of_their_float32_cast(model, recipe):
    # Before: "Input type (double) and bias type (float) should be the same" from the aux VAE,
    # which got the images uncast (the model casts them itself).
    x, ids = _images(), torch.arange(2)
    loss64, logs64 = recipe.loss(x.double(), 1, ids)
    loss32, logs32 = recipe.loss(x, 1, ids)
    assert loss64.dtype == torch.float32 and torch.equal(loss64, loss32) and logs64 == logs32


# ---------------------------------------------------------------------------------------------
# 7. The ops refuse what the model refuses
# ---------------------------------------------------------------------------------------------


def test_min_tau_is_one_constant_the_op_and_the_model_share():
    from lavae_fast import _common, model as model_module

    assert model_module.MIN_TAU is _common.MIN_TAU is ops.MIN_TAU == MIN_TAU


@pytest.mark.parametrize("tau", [MIN_TAU / 10, 1e-40, math.inf])
def test_gumbel_topk_relaxed_refuses_a_tau_the_model_refuses(tau):
    # Before: accepted (the model refused τ < MIN_TAU, the op computed on).
    logits, g = torch.randn(2, 8), torch.zeros(2, 8)
    refuses(ValueError, "tau", lambda: ops.gumbel_topk_relaxed(logits, torch.tensor([1, 2]), tau, 3, g),
            "at least 1e-06")
    ops.gumbel_topk_relaxed(logits, torch.tensor([1, 2]), MIN_TAU, 3, g)  # the smallest accepted


def test_gumbel_topk_relaxed_refuses_more_draws_than_locations():
    # Before: n = 3 on D = 2 drew both pixels and left slot 2 absent (index −1) below n.
    logits, g = torch.randn(2, 2), torch.zeros(2, 2)
    refuses(ValueError, "n", lambda: ops.gumbel_topk_relaxed(logits, torch.tensor([3, 1]), 0.5, 3, g), "D = 2")
    index, _, _ = ops.gumbel_topk_relaxed(logits, torch.tensor([2, 1]), 0.5, 3, g)  # n = D: every pixel once
    assert sorted(index[0, :2].tolist()) == [0, 1] and index[0, 2] == -1
    # The reference (unchecked by design) keeps its documented behaviour for n > D.
    index, _, _ = ref.gumbel_topk_relaxed(logits, torch.tensor([3, 1]), 0.5, 3, g)
    assert index[0, 2] == -1
