"""An imported set trains: ``--dataset imported --data DIR`` (issue 26), its channels and sprite side
from the set's meta.json, ``--sprite-size`` over it, labels used only where they exist."""

from __future__ import annotations

import json
import os

import pytest

from lavae_fast.checkpoint import load_run_checkpoint
from lavae_fast.data import import_images
from lavae_fast.data.shapes import write_scene_folder
from lavae_fast.train_config import ConfigError, TrainConfig
from lavae_fast.trainer import Trainer, train

SMALL = dict(dataset="imported", batch_size=4, width=8, steps=4, log_every=2, ckpt_every=2, eval_every=0,
             n_val=8, bf16="off", threads=1, no_progress=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A labelled set of 120 random-shape scenes, 32×32, imported from PNGs."""
    root = tmp_path_factory.mktemp("imported")
    pngs = str(root / "pngs")
    write_scene_folder(pngs, n=120, canvas=32, seed=3)
    out = str(root / "set")
    import_images(pngs, out, labels=os.path.join(pngs, "labels.csv"), progress=False)
    return out


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_an_imported_set_trains_with_its_own_channels_and_sprite_size(imported, tmp_path):
    with open(os.path.join(imported, "meta.json")) as f:
        meta = json.load(f)
    run = str(tmp_path / "r")
    assert train(TrainConfig(out=run, data=imported, **SMALL)).step == 4
    state = load_run_checkpoint(os.path.join(run, "checkpoint.pt"))[0]
    cfg = state["model_config"]
    assert cfg["channels"] == meta["channels"] and cfg["sprite_size"] == meta["sprite_size"]
    assert cfg["canvas"] == [meta["height"], meta["width"]]
    assert state["args"]["loc_lr"] == 5e-4 and state["args"]["sprite_size"] is None
    assert "count_acc" in _metrics(run)[-1]  # labelled: the count is logged
    # --sprite-size overrides the set's, and defines the run.
    run2 = str(tmp_path / "s7")
    train(TrainConfig(out=run2, data=imported, sprite_size=7, **SMALL))
    assert load_run_checkpoint(os.path.join(run2, "checkpoint.pt"))[0]["model_config"]["sprite_size"] == 7
    with pytest.raises(ConfigError, match=r"sprite_size=9 \(checkpoint: 7\)"):
        with Trainer(TrainConfig(out=run2, data=imported, sprite_size=9, resume=True, **{**SMALL, "steps": 4})) as t:
            t.setup()


def test_an_imported_set_needs_its_directory_and_its_name(imported, tmp_path):
    with pytest.raises(ConfigError, match="pass its directory as --data DIR"):
        Trainer(TrainConfig(out=str(tmp_path / "a"), **SMALL))
    with pytest.raises(ConfigError, match="holds 'imported', not --dataset 'multi-dsprites'"):
        with Trainer(TrainConfig(out=str(tmp_path / "b"), data=imported, **{**SMALL, "dataset": "multi-dsprites"})) as t:
            t.setup()
    with pytest.raises(ConfigError, match="sprite_size"):
        TrainConfig(out="r", sprite_size=8).checked()  # odd only


def test_an_unlabelled_set_trains_and_evaluates_saying_what_it_skipped(tmp_path):
    from lavae_fast.evaluate import evaluate_run

    pngs, out = str(tmp_path / "pngs"), str(tmp_path / "set")
    write_scene_folder(pngs, n=120, canvas=32, seed=4)
    os.remove(os.path.join(pngs, "labels.csv"))  # the scenes alone, as a user's folder would be
    import_images(pngs, out, progress=False)
    run = str(tmp_path / "r")
    train(TrainConfig(out=run, data=out, **{**SMALL, "eval_every": 2, "eval_size": 8}))
    logged = _metrics(run)
    assert not any("count_acc" in r or "loc_acc" in r for r in logged if "eval" not in r)
    evals = [r["eval"] for r in logged if "eval" in r]
    assert evals and all(set(e) == {"val", "test"} for e in evals)  # no test7 in an imported set
    for e in evals:
        assert "count_accuracy" not in e["val"] and e["val"]["neg_elbo_by_count"] == {}
        assert "no labels" in e["val"]["skipped"]
    # Without counts, the best checkpoint is the lowest validation −ELBO.
    best = load_run_checkpoint(os.path.join(run, "checkpoint.best.pt"))[0]
    assert best["validation"]["neg_elbo"]["mean"] == min(e["val"]["neg_elbo"]["mean"] for e in evals)
    res = evaluate_run(run, splits=("test",), K=2, n_eval=8).results["test"]
    assert res["nll_bound"]["mean"] > 0 and res["nll_bound_by_count"] == {} and "count_accuracy" not in res


def test_evaluate_takes_the_splits_an_imported_set_holds(imported, tmp_path):
    from lavae_fast.evaluate import EvaluationError, evaluate_run

    run = str(tmp_path / "r")
    train(TrainConfig(out=run, data=imported, **{**SMALL, "steps": 2}))
    res = evaluate_run(run, K=0, n_eval=8)  # default: test and test7, those the set holds
    assert list(res.results) == ["test"] and 0.0 <= res.results["test"]["count_accuracy"] <= 1.0
    with pytest.raises(EvaluationError, match="split 'test7'.*not 'test7'"):  # named: it must be there
        evaluate_run(run, splits=("test", "test7"), K=0, n_eval=8)
