"""Tests of the metrics (lavae_fast.metrics) and the evaluation CLI."""

import json
import os

import numpy as np
import pytest
import torch

from lavae_fast.evaluate import DETAIL_KEYS, format_table
from lavae_fast.evaluate import main as eval_main
from lavae_fast.metrics import (index_rows_cols, local_maxima, location_accuracy, max_matching,
                                draws_on_objects, peak_distances)
from lavae_fast.ops import peak_index
from lavae_fast.train import main as train_main

from test_train import TINY


def test_max_matching_is_maximum_not_greedy():
    # t0 can use p0 or p1, t1 only p0: a greedy t0→p0 would leave t1 unmatched.
    adj = np.array([[True, True], [True, False]])
    assert max_matching(adj) == 2
    assert max_matching(np.array([[True, True], [False, False]])) == 1
    assert max_matching(np.zeros((3, 0), dtype=bool)) == 0
    assert max_matching(np.ones((3, 2), dtype=bool)) == 2


def test_location_accuracy_one_to_one_and_radius():
    centres = np.array([[[10, 10], [10, 12], [-1, -1]], [[5, 5], [-1, -1], [-1, -1]]])
    counts = np.array([2, 1])
    # image 0: one prediction at (11,11), √2 px from both objects, serves only one of them;
    # image 1: (7,5) is exactly 2 px from (5,5), inside the radius.
    rows = torch.tensor([[11, -1], [7, -1]])
    cols = torch.tensor([[11, -1], [5, -1]])
    assert location_accuracy(rows, cols, torch.tensor([1, 1]), centres, counts) == (2, 3)
    # a smaller radius drops the 2-px match but keeps the √2 one
    assert location_accuracy(rows, cols, torch.tensor([1, 1]), centres, counts, radius=1.9) == (1, 3)
    # two predictions, one per object, match both
    rows2 = torch.tensor([[10, 10], [0, 0]])
    cols2 = torch.tensor([[10, 12], [0, 0]])
    assert location_accuracy(rows2, cols2, torch.tensor([2, 0]), centres, counts) == (2, 3)
    # slots at or past n are ignored even if they would match
    assert location_accuracy(rows2, cols2, torch.tensor([0, 0]), centres, counts) == (0, 3)


def test_location_accuracy_radius_edge():
    centres = np.array([[[10, 10]]])
    counts = np.array([1])
    for r, c, hit in [(12, 10, True), (13, 10, False), (11, 11, True), (12, 11, False)]:
        m, _ = location_accuracy(torch.tensor([[r]]), torch.tensor([[c]]), torch.tensor([1]), centres, counts)
        assert m == int(hit), (r, c)


def test_local_maxima_and_peak_distances():
    h = torch.zeros(2, 1, 8, 8)
    h[0, 0, 2, 2] = 5.0
    h[0, 0, 6, 5] = 3.0
    h[1, 0, 4, 4] = 1.0
    rows, cols = local_maxima(h - 1.0 * (h == 0), 2)  # background below the peaks
    assert rows[0].tolist() == [2, 6] and cols[0].tolist() == [2, 5]
    centres = np.array([[[2, 3], [6, 5]], [[0, 0], [-1, -1]]])
    d = peak_distances(h - 1.0 * (h == 0), centres, np.array([2, 1]))
    np.testing.assert_allclose(d, [1.0, 0.0, np.sqrt(32)])
    # a 9×9 window leaves (2, 2) the only maximum of image 0 (the peak at (6, 5) lies in its window)
    d9 = peak_distances(h - 1.0 * (h == 0), centres, np.array([2, 1]), window=9)
    np.testing.assert_allclose(d9, [1.0, np.sqrt(16 + 9), np.sqrt(32)])


def peak_locations(h, n, M, threshold, window=3):
    return index_rows_cols(peak_index(h, threshold, n, M, window), h.shape[-1])


def test_peak_locations_are_the_counted_peaks_highest_first():
    h = torch.zeros(3, 1, 6, 7)
    h[0, 0, 1, 1], h[0, 0, 1, 2] = 9.0, 8.5  # a blunt peak: its neighbour is no local maximum
    h[0, 0, 4, 5] = 6.0
    h[0, 0, 4, 0] = 4.5  # a local maximum below the threshold 5: not counted
    h[1, 0, 3, 3] = 7.0
    rows, cols = peak_locations(h, torch.tensor([2, 1, 0]), 4, 5.0)
    assert rows.tolist() == [[1, 4, -1, -1], [3, -1, -1, -1], [-1] * 4]
    assert cols.tolist() == [[1, 5, -1, -1], [3, -1, -1, -1], [-1] * 4]
    # The second peak of image 0 is 3 rows and 3 columns from the blunt peak's shoulder: a 5×5 window
    # keeps it, a 7×7 one does not.
    assert peak_locations(h, torch.tensor([2, 1, 0]), 4, 5.0, window=5)[0][0].tolist() == [1, 4, -1, -1]
    assert peak_locations(h, torch.tensor([1, 1, 0]), 4, 5.0, window=7)[0][0].tolist() == [1, -1, -1, -1]


def test_draws_on_objects_counts_duplicates_by_true_object_and_missed_objects():
    W = 10
    at = lambda r, c: r * W + c  # noqa: E731
    index = torch.tensor([
        [at(5, 5), at(6, 7), at(0, 0), -1],  # 2nd and 1st both nearest object 0: a duplicate
        [at(5, 5), at(8, 5), -1, -1],        # two draws on two objects: none
        [at(1, 1), -1, -1, -1],              # one draw: nothing later
        [at(2, 2), at(9, 9), at(3, 3), at(9, 8)],  # 3rd on object 0 again, 4th on object 1 again
        [at(4, 4), at(4, 4), -1, -1],        # no objects: counts in neither
    ])
    centres = torch.full((5, 3, 2), -1)
    centres[0, :2] = torch.tensor([[5, 5], [0, 9]])     # object 1 at (0,9): the draw at (0,0) is nearer to 0?
    centres[1, :2] = torch.tensor([[5, 5], [8, 5]])
    centres[2, :1] = torch.tensor([[1, 1]])
    centres[3, :3] = torch.tensor([[2, 2], [9, 9], [5, 0]])
    counts = torch.tensor([2, 2, 1, 3, 0])
    dup, later, missed, objects = draws_on_objects(index, W, centres, counts)
    # image 0: (6,7) → object 0 (dist 2.2) duplicate; (0,0) → object 0 (dist 7.1 vs 9) duplicate too
    assert (dup, later) == (2 + 0 + 0 + 2, 2 + 1 + 0 + 3)
    # missed: image 0 object 1 (no draw within 2 px); image 3 object 2 at (5,0)
    assert (missed, objects) == (2, 8)
    # A duplicate is a draw on an object already drawn, whatever the distance between the draws:
    # two draws 3 px apart on one broad object count, two draws 2 px apart on two objects do not.
    one = torch.tensor([[at(5, 2), at(5, 5)]])
    assert draws_on_objects(one, W, torch.tensor([[[5, 3], [0, 0]]]), torch.tensor([2]))[:2] == (1, 1)
    assert draws_on_objects(one, W, torch.tensor([[[5, 2], [5, 5]]]), torch.tensor([2]))[:2] == (0, 1)
    assert draws_on_objects(torch.full((2, 3), -1), W, torch.zeros(2, 1, 2), torch.tensor([1, 1])) == (0, 0, 2, 2)


def test_format_table():
    t = format_table({"test": {"images": 3, "count_accuracy": 0.5, "nll_bound": {"mean": 40.0, "sem": 1.0},
                               "neg_elbo_terms": {"recon": 12.25, "kl": 3.0}},
                      "test7": {"images": 3, "count_accuracy": 0.25}}, DETAIL_KEYS)
    assert "count acc" in t and "0.5000" in t and "40.00 ± 1.00" in t and "-" in t.splitlines()[-1] + "-"
    assert "recon 12.2, kl 3.0" in t or "recon 12.3, kl 3.0" in t


@pytest.mark.parametrize("model", ["lavae", "baseline"])
def test_evaluate_cli_on_a_tiny_run(tmp_path, capsys, model):
    run = str(tmp_path / model)
    train_main(TINY + ["--model", model, "--steps", "2", "--out", run, "--canvas", "48", "--n-test7", "4"])
    capsys.readouterr()
    assert eval_main([run, "--K", "3", "--n-eval", "6", "--n-bound", "4", "--batch-size", "4", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    res = json.load(open(os.path.join(run, "eval.json")))
    assert res["meta"]["step"] == 2 and res["meta"]["model"] == model
    for split in ("test", "test7"):
        r = res["results"][split]
        assert r["images"] == (6 if split == "test" else 4) and r["bound_images"] == 4
        assert np.isfinite(r["nll_bound"]["mean"]) and r["nll_bound"]["mean"] > 0
        if model == "lavae":
            assert 0 <= r["count_accuracy"] <= 1 and 0 <= r["location_accuracy"] <= 1
            assert 0 <= r["location_accuracy_draws"] <= 1
            assert r["near_duplicate_draws"] is None or 0 <= r["near_duplicate_draws"] <= 1
            assert r["objects_missed"] is None or 0 <= r["objects_missed"] <= 1
            assert res["meta"]["exclusion_window"] == 5  # the default, which a 48×48 canvas holds
            assert set(r["neg_elbo_terms"]) == {"recon", "kl_app", "kl_n", "kl_loc"}
        else:
            assert set(r["neg_elbo_terms"]) == {"recon", "kl"}
            assert "count_accuracy" not in r and "location_accuracy_draws" not in r
    assert "−log p(x)" in printed and "−ELBO terms" in printed
    assert res["meta"]["count_window"] == (3 if model == "lavae" else None)  # the model's own
    args = [run, "--K", "0", "--n-eval", "6", "--batch-size", "4", "--threads", "1", "--splits", "test"]
    if model == "lavae":
        assert eval_main(args + ["--count-window", "5", "--out", str(tmp_path / "w5.json")]) == 0
        assert json.load(open(tmp_path / "w5.json"))["meta"]["count_window"] == 5
    else:
        with pytest.raises(SystemExit, match="count-window"):
            eval_main(args + ["--count-window", "5"])
    with pytest.raises(SystemExit):
        eval_main(args + ["--count-window", "4"])
    assert "--count-window: must be an odd positive integer" in capsys.readouterr().err


def test_evaluate_cli_on_a_checkpoint_file_writes_beside_it_and_the_exporter_finds_it(tmp_path, capsys):
    run = str(tmp_path / "run")
    train_main(TINY + ["--steps", "2", "--out", run, "--eval-every", "2", "--n-val", "6"])
    best = os.path.join(run, "checkpoint.best.pt")
    assert eval_main([best, "--K", "0", "--splits", "val,test", "--batch-size", "4", "--threads", "1"]) == 0
    res = json.load(open(os.path.join(run, "checkpoint.best.eval.json")))
    assert res["results"]["val"]["images"] == 6 and not os.path.exists(os.path.join(run, "eval.json"))
    from lavae_fast.pretrained.shipping import export

    shipped = export(best, out=str(tmp_path / "m.pt"))
    assert torch.load(shipped, weights_only=True)["provenance"]["metrics"] == res


def test_evaluate_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        eval_main([str(tmp_path)])


def test_bound_on_the_images_counted_right_averages_exactly_those(monkeypatch):
    """nll_bound_counted_right is the mean bound over the bound images whose n̂ equals the count."""
    from lavae_fast import LAVAE
    from lavae_fast.data import MultiObjectDataset, generate_arrays
    from lavae_fast.evaluate import evaluate_split

    torch.manual_seed(0)
    model = LAVAE(channels=3, canvas=(32, 32), sprite_size=21, width=6, sprite_width=36).eval()
    data = MultiObjectDataset.from_arrays(generate_arrays("multi-dsprites", 12, 5, canvas=(32, 32), counts=(0, 3)))
    x, counts = data.get_batch(range(12))
    with torch.no_grad():
        n_hat = model.encode(x)[2]
    right = (n_hat == torch.as_tensor(counts)).numpy()[:10]
    assert 0 < right.sum() < 10, "the case must mix right and wrong counts (an untrained net counts 0)"
    calls = []

    def fake_ll(xb, K, generator=None):  # −log p(x) of image j in call order: 100 + j
        start = sum(len(c) for c in calls)
        calls.append(range(start, start + xb.shape[0]))
        return -(100.0 + torch.arange(start, start + xb.shape[0], dtype=torch.float32))

    monkeypatch.setattr(model, "log_likelihood", fake_ll)
    res = evaluate_split(model, data, K=2, batch_size=4, n_bound=10)
    bounds = 100.0 + np.arange(10)
    assert res["nll_bound"]["mean"] == pytest.approx(bounds.mean())
    assert res["nll_bound_counted_right"]["mean"] == pytest.approx(bounds[right].mean())
    # Where the −ELBO goes: its terms add up to it, and the per-count means average back to it.
    assert sum(res["neg_elbo_terms"].values()) == pytest.approx(res["neg_elbo"]["mean"], rel=1e-6)
    c = np.asarray(counts)
    by = res["neg_elbo_by_count"]
    assert set(by) == {str(k) for k in np.unique(c)}
    assert sum(by[str(k)] * (c == k).sum() for k in np.unique(c)) / len(c) == pytest.approx(res["neg_elbo"]["mean"],
                                                                                           rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Evaluators by model class: the evaluation knows no kind of model
# ---------------------------------------------------------------------------------------------


class _Ink(torch.nn.Module):
    """A model the evaluation has never heard of: its −ELBO is the image's ink, in two terms."""

    def forward(self, x):
        from types import SimpleNamespace

        ink = x.flatten(1).sum(1)
        return SimpleNamespace(neg_elbo=ink, a=0.25 * ink, b=0.75 * ink)


def _scenes(n):
    from lavae_fast.data import MultiObjectDataset, generate_arrays

    return MultiObjectDataset.from_arrays(generate_arrays("multi-dsprites", n, 3, canvas=(32, 32), counts=(0, 3)))


def test_the_evaluator_of_a_model_is_found_by_its_class_and_bases():
    from lavae_fast import BetaVAE, LAVAE
    from lavae_fast.evaluate import (EVALUATORS, BetaVAEEvaluator, Evaluator, LAVAEEvaluator, evaluator_class,
                                     register_evaluator)

    class Wider(BetaVAE):
        pass

    assert evaluator_class(LAVAE(channels=3, canvas=(32, 32), sprite_size=21, width=6, sprite_width=36)) \
        is LAVAEEvaluator
    assert evaluator_class(Wider(channels=3, canvas=(32, 32), width=8)) is BetaVAEEvaluator  # along the MRO
    assert evaluator_class(_Ink()) is Evaluator  # the default

    class InkEvaluator(Evaluator):
        terms = ("a", "b")

    try:
        assert register_evaluator(_Ink, InkEvaluator) is InkEvaluator and evaluator_class(_Ink()) is InkEvaluator
    finally:
        EVALUATORS.pop(_Ink)
    with pytest.raises(TypeError, match="Evaluator subclass"):
        register_evaluator(_Ink, lambda model: None)
    with pytest.raises(TypeError, match="model_class must be a class"):
        register_evaluator(_Ink(), InkEvaluator)


def test_the_default_evaluator_measures_any_model_with_a_neg_elbo(monkeypatch):
    from lavae_fast.evaluate import EVALUATORS, Evaluator, evaluate_split

    data = _scenes(10)
    x, counts = data.get_batch(range(10))
    ink = x.flatten(1).sum(1).double().numpy()
    res = evaluate_split(_Ink(), data, K=0, batch_size=4)
    assert list(res) == ["images", "bound_images", "K", "neg_elbo", "neg_elbo_terms", "neg_elbo_by_count"]
    assert res["neg_elbo"]["mean"] == pytest.approx(ink.mean()) and res["neg_elbo_terms"] == {}
    assert res["neg_elbo_by_count"] == {str(k): pytest.approx(ink[counts == k].mean()) for k in np.unique(counts)}
    with pytest.raises(ValueError, match="_Ink has no log_likelihood"):
        evaluate_split(_Ink(), data, K=5)

    class InkEvaluator(Evaluator):
        terms = ("a", "b")

        def results(self, nll):
            return {"bounded": len(nll)}

    monkeypatch.setitem(EVALUATORS, _Ink, InkEvaluator)
    model = _Ink()
    draws = []

    def log_likelihood(xb, K, generator):  # the bound draws from the evaluation's generator
        draws.append(torch.rand(1, generator=generator).item())
        return -xb.flatten(1).sum(1) - K

    model.log_likelihood = log_likelihood
    res = evaluate_split(model, data, K=5, batch_size=4, n_bound=6, seed=3)
    assert res["neg_elbo_terms"] == {"a": pytest.approx(0.25 * ink.mean()), "b": pytest.approx(0.75 * ink.mean())}
    assert res["nll_bound"]["mean"] == pytest.approx(ink[:6].mean() + 5) and res["bounded"] == 6
    assert list(res)[-1] == "bounded"  # the evaluator's own results come last
    g = torch.Generator().manual_seed(3)
    assert draws == [torch.rand(1, generator=g).item() for _ in range(2)]  # 2 batches hold the 6 bounded images


def test_the_printed_table_shows_an_evaluators_own_metrics():
    from lavae_fast.evaluate import RunResults

    meta = {"model": "ink", "dataset": "multi-dsprites", "canvas": [32, 32], "step": 4, "K": 0,
            "data": {"own": True, "path": None, "fingerprint": "f"}}
    results = {"test": {"images": 3, "bound_images": 3, "K": 0, "neg_elbo": {"mean": 5.0, "sem": 1.0},
                        "neg_elbo_terms": {}, "neg_elbo_by_count": {"1": 5.0}, "ink_share": 0.125}}
    text = RunResults(meta, results, "unused.json").summary()
    assert text.splitlines()[0] == "ink on multi-dsprites [32, 32], step 4, K = 0"
    rows = [ln.split()[0] for ln in text.splitlines()[1:] if not ln.startswith("-")]
    assert rows == ["metric", "images", "−ELBO", "−ELBO", "−ELBO", "ink_share"]  # the sizes stay in the file
    assert "0.1250" in text.splitlines()[-1]
