"""The model learns to count (slow: ~8 minutes on 2 cores; ``pytest -m slow tests/test_learning.py``).

Unit tests check that each piece computes what it should; this checks that the pieces together
still teach the location net to count — the property the whole recipe exists for. The default
recipe trains a small multi-dSprites configuration (48×48, batch 16, width 32, 1500 steps: the
side-by-side runs of docs/recipe.md) and its count accuracy on 300 held-out 0–3-object images is
read from the run's own final evaluation. Always answering one count scores 0.25 there.
"""

import json
import os

import pytest

from lavae_fast.train import main as train_main

pytestmark = pytest.mark.slow

STEPS = 1500
CONFIG = ["--dataset", "multi-dsprites", "--canvas", "48", "--n-train", "8000", "--n-test", "300",
          "--n-test7", "50", "--batch-size", "16", "--width", "32", "--seed", "0", "--steps", str(STEPS),
          "--eval-every", str(STEPS), "--eval-size", "300", "--log-every", "100", "--ckpt-every", str(STEPS),
          "--no-progress", "--threads", "2"]
# Measured on this configuration (Zen 4, bf16 native, one thread): the default recipe ends at
# 0.77 (0.76 with the old ×300 warm-up weight); the old straight-through default with the paper's
# weight 1 — the deliberately broken variant — ends at 0.31 (0.29–0.33 at every evaluation), so it fails here; see docs/recipe.md.
MIN_COUNT_ACCURACY = 0.6


def final_eval(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "eval" in r]
    assert evals and evals[-1]["step"] == STEPS, "the run must end with an evaluation"
    return evals[-1]["eval"]["test"]


def test_default_recipe_learns_to_count(tmp_path):
    run = str(tmp_path / "run")
    assert train_main(CONFIG + ["--out", run]) == 0
    test = final_eval(run)
    assert test["count_accuracy"] >= MIN_COUNT_ACCURACY, test
