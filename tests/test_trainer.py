"""Training from Python: TrainConfig as the one source of the settings, the Trainer, recipes by kind.

The CLI's own behaviour (exit codes, messages, resume) is tested through ``train.main`` in
test_train.py, test_safety.py and test_resilience.py; these tests drive the library directly, as a
user's script would, with no argument parser in sight.
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lavae_fast.checkpoint import RunDirectoryInUse, load_run_checkpoint
from lavae_fast.loading import MODEL_CLASSES
from lavae_fast.recipe import RECIPES, BetaVAERecipe, LAVAERecipe, Recipe, recipe_class, register_recipe
from lavae_fast.run_folder import RunDirectoryError
from lavae_fast.train_config import ConfigError, TrainConfig, build_parser
from lavae_fast.trainer import FitResult, Trainer, train

# A run of a few seconds: 32×32 in-memory multi-dSprites, narrow nets, float32, no periodic evaluation.
SMALL = dict(canvas=(32, 32), n_train=40, n_test=16, n_test7=0, n_val=0, batch_size=4, width=8, steps=6,
             log_every=2, ckpt_every=2, eval_every=0, bf16="off", threads=1, no_progress=True, seed=5)


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "sec_per_step"} for line in f]


# ---------------------------------------------------------------------------------------------
# TrainConfig: defaults, checks
# ---------------------------------------------------------------------------------------------


def test_the_config_defaults_are_the_cli_defaults():
    parsed = TrainConfig.from_args(build_parser().parse_args(["--out", "r"]))
    assert parsed == TrainConfig(out="r")
    # Every field but out has a default, and every CLI option comes from a field.
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert [n for n, f in fields.items() if f.default is dataclasses.MISSING] == []
    dests = [a.dest for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "config")]
    assert set(dests) == set(TrainConfig.cli_fields())


@pytest.mark.parametrize("bad,match", [
    (dict(steps=0), "steps (--steps): must be a positive integer"),
    (dict(steps=2.5), "steps (--steps): must be an integer"),
    (dict(batch_size=True), "batch_size takes a value"),
    (dict(canvas="axb"), "canvas (--canvas)"),
    (dict(model="cnn"), "model (--model): invalid choice"),
    (dict(lr=float("nan")), "lr (--lr): must be a positive finite number"),
    (dict(exclusion_window=4), "exclusion_window (--exclusion-window): must be an odd"),
    (dict(warmup_target="blobs"), "warmup_target (--warmup-target): invalid choice"),
    (dict(out=None), "out: a run directory is required"),
])
def test_checked_refuses_a_bad_setting_naming_it(bad, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{"out": "r", **bad}).checked()


def test_checked_normalises_as_the_cli_does_and_leaves_the_original_alone():
    config = TrainConfig(out="r", canvas=48, lr=1)
    checked = config.checked()
    assert checked.canvas == (48, 48) and checked.lr == 1.0 and isinstance(checked.lr, float)
    assert config.canvas == 48  # not modified in place
    assert TrainConfig.from_dict({"out": "r", "batch-size": 8}).batch_size == 8
    with pytest.raises(ConfigError, match="unknown setting 'batchsize'"):
        TrainConfig.from_dict({"out": "r", "batchsize": 8})


def test_a_trainer_refuses_settings_the_model_kind_refuses_before_touching_the_folder(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(ConfigError, match="--sprite-width must exceed LAVAE's latent size"):
        Trainer(TrainConfig(out=str(run), sprite_width=32))
    with pytest.raises(ConfigError, match="too large"):
        Trainer(TrainConfig(out=str(run), canvas=(8, 8), exclusion_window=7))
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer({"out": str(run)})
    assert not run.exists()


# ---------------------------------------------------------------------------------------------
# Train, resume, evaluate from Python
# ---------------------------------------------------------------------------------------------


def test_a_python_user_trains_resumes_and_evaluates_without_argparse(tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    result = train(TrainConfig(out=whole, **SMALL))
    assert result == FitResult(step=6, stopped_by=0) and result.exit_code == 0

    with Trainer(TrainConfig(out=split, stop_at=4, **SMALL)) as trainer:
        assert trainer.setup().fit().step == 4
    # The stop writes a checkpoint at its step, the end of that session: the resume starts there.
    state = load_run_checkpoint(os.path.join(split, "checkpoint.pt"))[0]
    assert state["step"] == 4
    with Trainer(TrainConfig(out=split, resume=True, **SMALL)) as trainer:
        assert trainer.setup().start == 4
        assert trainer.fit() == FitResult(step=6)
        ev = trainer.evaluate("test", n_eval=8)
        assert ev["images"] == 8 and 0.0 <= ev["count_accuracy"] <= 1.0 and ev["neg_elbo"]["mean"] > 0
        assert trainer.model.training  # evaluate leaves the model training

    # A resumed run reaches what the uninterrupted one reaches, and logs the same (the stop is at a
    # log step: a stop between them logs the part-interval it ran).
    a = load_run_checkpoint(os.path.join(whole, "checkpoint.pt"))[0]["model"]
    b = load_run_checkpoint(os.path.join(split, "checkpoint.pt"))[0]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(whole) == _metrics(split)


def test_the_trainer_raises_typed_errors_for_the_run_folder_and_the_resume(tmp_path):
    run = str(tmp_path / "r")
    short = {**SMALL, "steps": 2}
    train(TrainConfig(out=run, **short))
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        Trainer(TrainConfig(out=run, **short)).setup()
    with pytest.raises(ConfigError, match=r"--resume with different run settings: seed=6 \(checkpoint: 5\)"):
        with Trainer(TrainConfig(out=run, resume=True, **{**short, "seed": 6})) as trainer:
            trainer.setup()
    # The folder is released by close(): the next trainer takes it.
    with Trainer(TrainConfig(out=run, resume=True, **short)) as trainer:
        trainer.setup()
        with pytest.raises(RunDirectoryInUse):
            Trainer(TrainConfig(out=run, resume=True, **short)).setup()


def test_recipes_by_kind():
    assert RECIPES["lavae"] is LAVAERecipe and RECIPES["baseline"] is BetaVAERecipe
    assert recipe_class("baseline") is BetaVAERecipe
    with pytest.raises(ValueError, match="unknown model kind 'cnn'"):
        recipe_class("cnn")
    with pytest.raises(TypeError, match="model must be a lavae_fast.LAVAE or lavae_fast.BetaVAE"):
        Recipe(nn.Linear(2, 2), 10)
    assert LAVAERecipe.precision("auto", True, "native")[0] == "bf16"
    assert BetaVAERecipe.precision("on", True, "native") == ("float32", "--model baseline has no bf16 path")


# ---------------------------------------------------------------------------------------------
# A third kind of model: nothing in the trainer changes
# ---------------------------------------------------------------------------------------------


class TinyAE(nn.Module):
    """A model the package has never heard of: a 1×1 convolution autoencoder with a Bernoulli
    likelihood."""

    def __init__(self, channels: int, canvas):
        super().__init__()
        self.channels, self.canvas = channels, tuple(canvas)
        self.enc = nn.Conv2d(channels, 4, 1)
        self.dec = nn.Conv2d(4, channels, 1)

    def forward(self, x):
        logits = self.dec(torch.tanh(self.enc(x)))
        nll = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        return SimpleNamespace(loss=nll.mean(), neg_elbo=nll, lam=torch.sigmoid(logits))


class TinyRecipe(Recipe):
    kind = "tiny"
    model_class = TinyAE

    def _forward(self, x, step, ids, counts, forward, aux_forward, probe):
        out = forward(x)
        return out.loss, out, {"loss": out.neg_elbo.detach().mean()}


@pytest.fixture
def tiny_recipe():
    register_recipe(TinyRecipe)
    yield TinyRecipe
    RECIPES.pop("tiny")
    MODEL_CLASSES.pop("tiny")


def test_a_third_recipe_trains_and_resumes_through_the_unchanged_trainer(tmp_path, tiny_recipe):
    assert "tiny" in [a for a in build_parser()._actions if a.dest == "model"][0].choices
    run = str(tmp_path / "tiny")
    settings = {**SMALL, "model": "tiny"}
    assert train(TrainConfig(out=run, stop_at=4, **settings)).step == 4
    with Trainer(TrainConfig(out=run, resume=True, **settings)) as trainer:
        assert trainer.setup().start == 4 and isinstance(trainer.model, TinyAE)
        assert trainer.fit().step == 6
    state = load_run_checkpoint(os.path.join(run, "checkpoint.pt"))[0]
    assert state["model_config"] == {"kind": "tiny", "channels": 3, "canvas": [32, 32]} and state["aux"] is None
    logged = _metrics(run)
    assert [r["step"] for r in logged] == [2, 4, 6] and all(r["loss"] > 0 for r in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]  # it learns


def test_a_third_recipe_evaluates_and_exports_through_the_unchanged_trainer_evaluation_and_hub(tmp_path, tiny_recipe,
                                                                                              capsys):
    """The tiny model has no evaluator of its own and no bound: the default one measures its −ELBO,
    during fit (the best checkpoint is chosen on the validation split) and on its finished run."""
    from lavae_fast.evaluate import EvaluationError, Evaluator, evaluate_run, evaluator_class
    from lavae_fast.evaluate import main as eval_main

    run = str(tmp_path / "tiny")
    train(TrainConfig(out=run, **{**SMALL, "model": "tiny", "n_val": 6, "eval_every": 3, "eval_size": 8}))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert set(r["eval"]) == {"val", "test"}  # test7 holds no image (n_test7 = 0)
        val = r["eval"]["val"]
        assert val["images"] == 6 and val["neg_elbo"]["mean"] > 0 and val["neg_elbo_terms"] == {}
        assert "count_accuracy" not in val and "nll_bound" not in val
    best = load_run_checkpoint(os.path.join(run, "checkpoint.best.pt"))[0]
    lowest = min(evals, key=lambda r: r["eval"]["val"]["neg_elbo"]["mean"])
    assert best["step"] == lowest["step"] and best["validation"]["neg_elbo"] == lowest["eval"]["val"]["neg_elbo"]
    with Trainer(TrainConfig(out=run, resume=True, **{**SMALL, "model": "tiny"})) as trainer:
        assert evaluator_class(trainer.setup().model) is Evaluator

    # The readers of a run find its model class by the kind the recipe registered: nothing in the
    # hub or the evaluation names it.
    with pytest.raises(EvaluationError, match="no log_likelihood.*--K 0"):  # before the work
        evaluate_run(run)
    ours = evaluate_run(os.path.join(run, "checkpoint.best.pt"), splits=("val", "test"), K=0)
    assert ours.meta["model"] == "tiny" and ours.meta["step"] == best["step"]
    assert ours.results["val"]["neg_elbo"]["mean"] == pytest.approx(best["validation"]["neg_elbo"]["mean"], rel=1e-5)
    assert eval_main([run, "--K", "0", "--splits", "test", "--threads", "1"]) == 0
    assert "tiny on multi-dsprites [32, 32], step 6, K = 0" in capsys.readouterr().out
    with open(os.path.join(run, "eval.json")) as f:
        assert json.load(f)["results"]["test"]["images"] == 16
    # Exported as a model file with its provenance, and loaded back as its own class.
    from lavae_fast.loading import load_model
    from lavae_fast.pretrained.shipping import export

    shipped = export(run, out=str(tmp_path / "tiny.pt"), train_commit="abc")
    model, state = load_model(shipped)
    assert isinstance(model, TinyAE) and state["provenance"]["config"]["model"] == "tiny"
    assert state["provenance"]["metrics"]["results"]["test"]["images"] == 16


# ---------------------------------------------------------------------------------------------
# The engine: chosen where a model runs, not stored with it
# ---------------------------------------------------------------------------------------------


def test_the_engine_is_a_context_not_model_state(tmp_path):
    from lavae_fast import LAVAE, ops, reference
    from lavae_fast.hub.reader import model_kwargs
    from lavae_fast.ops import current_engine, use_engine

    m = LAVAE(1, (12, 12), 5, max_objects=3, latent_size=4, width=4, sprite_width=8)
    assert m.engine is ops and current_engine() == "fused"
    with use_engine("reference") as impl:
        assert impl is reference and m.engine is reference
        with use_engine("fused"):
            assert m.engine is ops
        assert m.engine is reference
    assert m.engine is ops  # restored on exit
    pinned = LAVAE(1, (12, 12), 5, max_objects=3, latent_size=4, width=4, sprite_width=8, ops="reference")
    with use_engine("fused"):
        assert pinned.engine is reference  # a model given an engine keeps it
    with pytest.raises(ValueError, match="'fused' or 'reference'"):
        with use_engine("triton"):
            pass
    # A run's checkpoint does not record the engine; one written before still loads, unpinned.
    run = str(tmp_path / "r")
    train(TrainConfig(out=run, **{**SMALL, "steps": 2, "ops": "reference"}))
    state = load_run_checkpoint(os.path.join(run, "checkpoint.pt"))[0]
    assert "ops" not in state["model_config"] and state["args"]["ops"] == "reference"
    kind, kwargs = model_kwargs({**state["model_config"], "ops": "reference"})
    assert kind == "lavae" and "ops" not in kwargs
