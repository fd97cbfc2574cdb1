"""The models shipped as package data, run for real: found by name in the installed package, carrying
their provenance, counting freshly generated scenes, and the main job's report path end to end.

Under ``scripts/test.sh`` (bare ``pytest``) ``lavae_fast`` is the installed package, so these tests
fail if the model files are not shipped with it (setup.py's package_data).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import lavae_fast
from lavae_fast import BetaVAE, LAVAE, pretrained
from lavae_fast.data.runs import generate_split
from lavae_fast.evaluate import evaluate_split

NAME = "multi-dsprites"
NAME_64 = "multi-dsprites-64"  # trained at 64×64 (LAVAE only: no baseline was trained there)
SEED = 2026  # fresh scenes: the shipped models' data used seed 0


def _fresh(n, canvas, split):
    return generate_split(NAME, n, SEED, canvas, split)


@pytest.mark.parametrize("name", [NAME, "multi-mnist-10k"])
def test_the_models_are_shipped_in_the_package_with_their_provenance(name):
    assert ("lavae", name) in pretrained.shipped() and ("baseline", name) in pretrained.shipped()
    here = os.path.dirname(lavae_fast.__file__)
    for kind in ("lavae", "baseline"):
        path = pretrained.model_file(kind, name)
        assert os.path.dirname(os.path.dirname(path)) == here  # in the package that is imported
        state = torch.load(path, weights_only=True)
        assert set(state) >= {"model", "model_config", "provenance"} and "optimizer" not in state
        prov = state["provenance"]
        assert prov["command"].startswith("python -m lavae_fast.train") and prov["step"] == state["step"] > 0
        assert prov["metrics"]["meta"]["K"] == 100 and prov["metrics"]["results"]["test"]["nll_bound"]["mean"] > 0
        assert state["args"]["dataset"] == name
        if kind == "lavae":  # both location accuracies, under the names the evaluator uses today
            for r in prov["metrics"]["results"].values():
                assert 0 <= r["location_accuracy_draws"] <= r["location_accuracy"] <= 1, r
    model, base = LAVAE.from_pretrained(name), BetaVAE.from_pretrained(name)
    assert not any(m.training for m in [*model.modules(), *base.modules()])
    assert tuple(model.canvas) == tuple(base.canvas) == (48, 48)


@torch.no_grad()
def test_the_shipped_dsprites_model_counts_fresh_scenes():
    # Measured on 256 fresh scenes (seed 2026): 0.99 of the 0–3-object ones. The 7-object scenes at
    # 48×48 are crowded (objects touch) and are counted right only about half the time: the README
    # says so; this test guards what the shipped model does reach. Location accuracy on 500 fresh
    # scenes: 0.981 at the counted peaks, 0.851 at the mode of the draws (blunt peaks, README).
    model = LAVAE.from_pretrained(NAME)
    r = evaluate_split(model, _fresh(200, (48, 48), "test"), K=0)
    assert r["count_accuracy"] >= 0.95, r
    assert r["location_accuracy"] >= 0.95 and r["location_accuracy_draws"] >= 0.7, r


@torch.no_grad()
def test_the_shipped_mnist_model_counts_fresh_scenes():
    # Measured on 500 fresh scenes (seed 2026): 0.876 of the 0–3-object ones (0.896 with a 5×5
    # counting window); the multi-MNIST model is the weaker of the two (README, Results).
    model = LAVAE.from_pretrained("multi-mnist-10k")
    data = generate_split("multi-mnist-10k", 200, SEED, (48, 48), "test")
    assert evaluate_split(model, data, K=0)["count_accuracy"] >= 0.8
    model.count_window = 5
    assert evaluate_split(model, data, K=0)["count_accuracy"] >= 0.8


@torch.no_grad()
def test_the_shipped_model_runs_on_the_papers_64x64_canvas():
    # γ = ½ ln D follows the canvas, so the nets trained at 48×48 run at 64×64 unchanged. Measured
    # (seed 2026, 128 scenes): 1.00 of the 0–3-object and 0.88 of the 7-object scenes counted right.
    model = LAVAE.from_pretrained(NAME, canvas=64)
    assert tuple(model.canvas) == (64, 64)
    r7 = evaluate_split(model, _fresh(200, (64, 64), "test7"), K=0)
    assert r7["count_accuracy"] >= 0.75, r7


@torch.no_grad()
def test_the_model_trained_at_64x64_counts_fresh_7_object_scenes():
    # The paper's canvas, where seven objects leave room between them. Measured on fresh scenes
    # (seed 2026): see the README's results table and the model's provenance.
    model = LAVAE.from_pretrained(NAME_64)
    assert tuple(model.canvas) == (64, 64) and model.count_window == 5
    assert ("lavae", NAME_64) in pretrained.shipped()
    prov = torch.load(pretrained.model_file("lavae", NAME_64), weights_only=True)["provenance"]
    assert prov["data"]["canvas"] == [64, 64] and "--warmup-peak 3" in prov["command"], prov
    assert prov["metrics"]["meta"]["K"] == 100 and prov["metrics"]["results"]["test7"]["count_accuracy"] >= 0.95
    r7 = evaluate_split(model, _fresh(200, (64, 64), "test7"), K=0)
    assert r7["count_accuracy"] >= 0.95 and r7["location_accuracy"] >= 0.95, r7
    r = evaluate_split(model, _fresh(200, (64, 64), "test"), K=0)
    assert r["count_accuracy"] >= 0.98 and r["location_accuracy"] >= 0.95, r


def test_the_main_job_reports_on_fresh_scenes(tmp_path, capsys):
    from lavae_fast import demo

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--n", "12", "--n7", "4", "--K", "2", "--n-bound", "3", "--no-figures"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == NAME and report["canvas"] == [48, 48]
    for split, n in (("test", 12), ("test7", 4)):
        r = report["results"][split]
        assert r["images"] == n and r["bound_images"] == 3 and 0 <= r["count_accuracy"] <= 1
        assert r["nll_bound"]["mean"] > 0 and r["baseline_nll_bound"]["mean"] > 0 and r["images_per_second"] > 0
        assert report["results_64x64"][split]["images"] == n
        assert report["results_trained_64x64"][split]["images"] == n
    assert report["results_trained_64x64"]["name"] == NAME_64
    assert report["provenance"]["command"].startswith("python -m lavae_fast.train")
    printed = capsys.readouterr().out
    assert "count acc" in printed and "images/s" in printed and "64×64" in printed and NAME_64 in printed


def test_figures_of_a_shipped_model(tmp_path):
    from lavae_fast import figures

    out = tmp_path / "figs"
    assert figures.main([NAME, "--baseline", NAME, "--out", str(out), "--num", "2"]) == 0
    names = sorted(os.listdir(out))
    assert "reconstructions_test.png" in names and "reconstructions_test7.png" in names and "samples.png" in names
    for name in names:
        with Image.open(out / name) as im:
            w, h = im.size
            px = np.asarray(im.convert("L"))
        # Labelled images: room for titles around the tiles, and not blank.
        assert w >= 300 and h >= 150 and px.std() > 5, name
