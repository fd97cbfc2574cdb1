"""Tests of the training schedules, checkpoints and the training CLI (tiny runs, end to end)."""

import argparse
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from lavae_fast import schedules
from lavae_fast import train as T
from lavae_fast.checkpoint import load_checkpoint, save_checkpoint
from lavae_fast.train import main as train_main
from lavae_fast.train_config import TrainConfig

# A tiny configuration: 32×32 multi-dSprites, narrow nets, a few steps. Still the full recipe.
TINY = ["--dataset", "multi-dsprites", "--canvas", "32", "--n-train", "64", "--n-test", "16", "--n-test7", "8",
        "--batch-size", "4", "--width", "6", "--sprite-width", "36", "--threads", "1", "--no-progress",
        "--log-every", "2", "--eval-every", "0"]


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def test_schedules_at_the_paper_milestones():
    S = 100_000
    assert schedules.tau(0, S) == pytest.approx(0.5)
    assert schedules.tau(S, S) == pytest.approx(0.02)
    assert schedules.tau(S // 2, S) == pytest.approx((0.5 * 0.02) ** 0.5)  # geometric midpoint
    assert schedules.tau(3 * S, S) == pytest.approx(0.02)  # holds past the horizon
    assert schedules.loc_lr_factor(0, S) == 1.0
    assert schedules.loc_lr_factor(S, S) == pytest.approx(0.01)
    assert schedules.loc_lr_factor(S // 2, S) == pytest.approx(0.1)
    assert schedules.loc_lr_factor(S, S, decay=10) == pytest.approx(0.1)
    assert schedules.loc_lr_factor(S // 2, S, decay=1) == 1.0
    for step, w, p in [(0, 1, 1), (29_999, 1, 1), (30_000, 1, 1), (45_000, 0.5, 0.55), (60_000, 0, 0.1),
                       (80_000, 0, 0.1)]:
        assert schedules.warmup_weight(step, S) == pytest.approx(w), step
        assert schedules.force_n_prob(step, S) == pytest.approx(p), step
    assert schedules.beta(0, S) == 0 and schedules.beta(S // 4, S) == pytest.approx(0.25)
    assert schedules.beta(2 * S, S) == 1.0


def test_schedules_scale_with_the_budget():
    for f in (schedules.tau, schedules.loc_lr_factor, schedules.warmup_weight, schedules.force_n_prob,
              schedules.beta):
        for frac in (0.0, 0.1, 0.3, 0.45, 0.6, 0.9, 1.0):
            assert f(frac * 1000, 1000) == pytest.approx(f(frac * 100_000, 100_000))
    with pytest.raises(ValueError, match="steps"):
        schedules.tau(0, 0)
    with pytest.raises(ValueError, match="step"):
        schedules.tau(-1, 10)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_atomicity(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 3, "model": {"w": torch.arange(4.0)}})
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.arange(4.0))
    assert load_checkpoint(str(tmp_path))["step"] == 3  # a run directory works too
    # a write that dies half-way leaves the previous checkpoint intact and no temp file behind
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 4, "model": {}})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 3
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------------------------
# The CLI, end to end
# ---------------------------------------------------------------------------------------------


def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_cli_runs_end_to_end(tmp_path):
    run = str(tmp_path / "run")
    assert train_main(TINY + ["--steps", "6", "--out", run, "--image-every", "3"]) == 0
    state = load_checkpoint(run)
    assert state["step"] == 6 and state["model_config"]["kind"] == "lavae" and state["aux"] is not None
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [2, 4, 6]
    r = rows[0]
    for key in ("loss", "recon", "kl_app", "kl_n", "kl_loc", "count_acc", "tau", "lr_location", "force_n_prob",
                "warmup_weight", "hloc_max_obj", "threshold", "warmup_loss", "target_scale", "loc_acc"):
        assert key in r, key
    # the schedule is the compressed paper schedule: step 0..1 of 6 is still in the warm-up
    assert r["force_n_prob"] == 1.0 and r["warmup_weight"] == 1.0
    # each row averages its interval: steps 2, 3 have weights 1 − (2/6 − 0.3)/0.3 and 1 − (3/6 − 0.3)/0.3
    expected = [schedules.warmup_weight(s, 6) for s in (2, 3)]
    assert rows[1]["warmup_weight"] == pytest.approx(sum(expected) / 2, abs=1e-5)
    assert rows[-1]["warmup_weight"] == 0.0 and "warmup_loss" not in rows[-1]  # aux VAE no longer run
    assert os.path.isdir(os.path.join(run, "tb")) and os.listdir(os.path.join(run, "tb"))
    assert json.load(open(os.path.join(run, "args.json")))["steps"] == 6
    assert not any(k.startswith("hgrad_") for r in rows for k in r)  # the probe is off by default


def test_gradient_probe_logs_at_the_log_steps(tmp_path):
    run = str(tmp_path / "run")
    assert train_main(TINY + ["--steps", "6", "--out", run, "--probe-gradients"]) == 0
    rows = read_metrics(run)
    assert all(r["hgrad_recon"] > 0 and "hgrad_kl_loc" in r for r in rows)
    assert "hgrad_warmup" in rows[0] and "hgrad_warmup" not in rows[-1]  # no warm-up term at the end


def test_resume_reaches_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = TINY + ["--steps", "6", "--ckpt-every", "100"]
    train_main(args + ["--out", full])
    train_main(args + ["--out", part, "--stop-at", "3"])
    assert load_checkpoint(part)["step"] == 3
    train_main(args + ["--out", part, "--resume"])
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a["step"] == b["step"] == 6
    for name in ("model", "aux"):
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    # and it differs from a run with another seed (so the comparison above can fail)
    other = str(tmp_path / "other")
    train_main(TINY + ["--steps", "6", "--out", other, "--seed", "1"])
    c = load_checkpoint(other)
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"] if a["model"][k].is_floating_point())


def _scripted_evaluation(monkeypatch, val_accuracies):
    """Replace the trainer's evaluation by one whose validation count accuracies are given."""
    import lavae_fast.evaluate as E

    scores = iter(val_accuracies)

    def fake(model, data, **kw):
        acc = next(scores) if data.split == "val" else 0.0
        return {"images": len(data.counts), "bound_images": 0, "K": 0, "neg_elbo": {"mean": 1.0, "sem": 0.0},
                "count_accuracy": acc}

    monkeypatch.setattr(E, "evaluate_split", fake)


def test_validation_keeps_the_best_checkpoint(tmp_path, monkeypatch):
    args = TINY + ["--steps", "6", "--eval-every", "2", "--n-val", "8", "--ckpt-every", "100"]
    _scripted_evaluation(monkeypatch, [0.2, 0.6, 0.4])
    run = str(tmp_path / "run")
    assert train_main(args + ["--out", run]) == 0
    best = load_checkpoint(os.path.join(run, "checkpoint.best.pt"))
    assert best["step"] == 4 and best["validation"]["count_accuracy"] == 0.6
    assert [r["step"] for r in read_metrics(run) if r.get("eval", {}).get("val", {}).get("best")] == [2, 4]
    # the best checkpoint holds the model of step 4, not the last one
    _scripted_evaluation(monkeypatch, [0.0, 0.0])
    at4 = str(tmp_path / "at4")
    assert train_main(args + ["--out", at4, "--stop-at", "4"]) == 0
    last, four = load_checkpoint(run), load_checkpoint(at4)
    assert all(torch.equal(best["model"][k], four["model"][k]) for k in best["model"])
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"]
               if best["model"][k].is_floating_point())
    # it is what a run ships: the exporter and the loader take it
    from lavae_fast import LAVAE

    assert not LAVAE.from_pretrained(os.path.join(run, "checkpoint.best.pt")).training


def test_a_resume_forgets_a_best_checkpoint_from_the_steps_it_redoes(tmp_path, monkeypatch):
    args = TINY + ["--steps", "6", "--eval-every", "2", "--n-val", "8", "--ckpt-every", "100"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _scripted_evaluation(monkeypatch, [0.2, 0.6, 0.4])
    train_main(args + ["--out", full])
    _scripted_evaluation(monkeypatch, [0.5, 0.5])  # steps 2 and 3 (a run evaluates where it stops)
    train_main(args + ["--out", part, "--stop-at", "3"])
    assert load_checkpoint(os.path.join(part, "checkpoint.best.pt"))["step"] == 2
    # as if the run had been killed after its evaluation at step 4 and before a checkpoint there
    shutil.copy(os.path.join(full, "checkpoint.best.pt"), os.path.join(part, "checkpoint.best.pt"))
    _scripted_evaluation(monkeypatch, [0.3, 0.1])
    assert train_main(args + ["--out", part, "--resume"]) == 0
    best = load_checkpoint(os.path.join(part, "checkpoint.best.pt"))
    assert best["step"] == 4 and best["validation"]["count_accuracy"] == 0.3


def test_the_validation_split_is_its_own_reproducible_stream():
    from lavae_fast.data import load_run_split

    cfg = {"dataset": "multi-dsprites", "canvas": [32, 32], "data_seed": 0, "n_val": 12, "n_test": 12, "n_train": 12}
    val, test, train = (load_run_split(cfg, s) for s in ("val", "test", "train"))
    assert len(val.counts) == 12 and set(val.counts.tolist()) <= {0, 1, 2, 3}
    x = lambda d: d.get_batch(list(range(12)))[0]
    assert not torch.equal(x(val), x(test)) and not torch.equal(x(val), x(train))
    from lavae_fast.data.runs import _SPLIT_CACHE

    _SPLIT_CACHE.clear()
    assert torch.equal(x(load_run_split(cfg, "val")), x(val))


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    run = str(tmp_path / "run")
    train_main(TINY + ["--steps", "2", "--out", run])
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "2", "--out", run, "--resume", "--seed", "5"])
    assert "seed" in capsys.readouterr().err


def test_loc_kl_flag_reaches_the_model_and_defines_the_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_main(TINY + ["--steps", "2", "--out", run, "--location-mode", "relaxed", "--loc-kl", "relaxed",
                              "--log-every", "1"]) == 0
    state = load_checkpoint(run)
    assert state["model_config"]["loc_kl"] == "relaxed"
    from lavae_fast.loading import build_model

    assert build_model(state["model_config"]).loc_kl == "relaxed"
    cfg = dict(state["model_config"])
    del cfg["loc_kl"]  # a checkpoint from before the option builds what it was trained with
    assert build_model(cfg).loc_kl == "straight_through"
    rows = read_metrics(run)  # one step per row: the logged weighted term is weight × schedule × loss
    assert rows[0]["warmup_term"] == pytest.approx(1 * rows[0]["warmup_weight"] * rows[0]["warmup_loss"], rel=1e-4)
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "2", "--out", run, "--resume", "--location-mode", "relaxed", "--loc-kl", "hard"])
    assert "loc_kl" in capsys.readouterr().err


def test_resume_of_a_run_with_the_old_estimator_names_what_changed(tmp_path, capsys):
    """The default estimator changed (straight-through → relaxed): a run started the old way is
    refused on a plain --resume with the flags that continue it, and resumes with them."""
    run = str(tmp_path / "run")
    old = ["--location-mode", "straight_through", "--loc-kl", "straight_through"]
    assert train_main(TINY + ["--steps", "2", "--out", run, "--stop-at", "1"] + old) == 0
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "2", "--out", run, "--resume"])
    err = capsys.readouterr().err
    assert "location_mode='relaxed' (checkpoint: 'straight_through')" in err
    assert "--location-mode straight_through --loc-kl straight_through" in err
    assert train_main(TINY + ["--steps", "2", "--out", run, "--resume"] + old) == 0
    assert load_checkpoint(run)["step"] == 2


def test_count_window_flag_reaches_the_model_and_defines_the_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train_main(TINY + ["--steps", "2", "--out", run, "--stop-at", "1", "--count-window", "5"]) == 0
    state = load_checkpoint(run)
    assert state["model_config"]["count_window"] == 5 and state["args"]["count_window"] == 5
    from lavae_fast.loading import build_model

    assert build_model(state["model_config"]).count_window == 5
    with pytest.raises(SystemExit):  # the default (3) is another run
        train_main(TINY + ["--steps", "2", "--out", run, "--resume"])
    assert "count_window=3 (checkpoint: 5)" in capsys.readouterr().err
    assert train_main(TINY + ["--steps", "2", "--out", run, "--resume", "--count-window", "5"]) == 0
    assert load_checkpoint(run)["step"] == 2
    for bad in ("4", "0", "-1", "x"):
        with pytest.raises(SystemExit):
            train_main(TINY + ["--steps", "2", "--out", str(tmp_path / "bad"), "--count-window", bad])
        assert "--count-window: must be" in capsys.readouterr().err


def test_exclusion_window_flag_reaches_the_model_defines_the_run_and_evaluate_records_it(tmp_path, capsys):
    from lavae_fast.evaluate import main as eval_main
    from lavae_fast.loading import build_model

    run = str(tmp_path / "run")
    assert train_main(TINY + ["--steps", "2", "--out", run, "--stop-at", "1", "--exclusion-window", "3"]) == 0
    state = load_checkpoint(run)
    assert state["model_config"]["exclusion_window"] == 3 and state["args"]["exclusion_window"] == 3
    assert build_model(state["model_config"]).exclusion_window == 3
    with pytest.raises(SystemExit):  # another window is another run
        train_main(TINY + ["--steps", "2", "--out", run, "--resume", "--exclusion-window", "1"])
    assert "exclusion_window=1 (checkpoint: 3)" in capsys.readouterr().err
    # without the flag a resumed run keeps its own window (not the default, 5)
    assert train_main(TINY + ["--steps", "2", "--out", run, "--resume", "--stop-at", "2"]) == 0
    assert load_checkpoint(run)["step"] == 2 and load_checkpoint(run)["args"]["exclusion_window"] == 3
    assert train_main(TINY + ["--steps", "2", "--out", run, "--resume", "--exclusion-window", "3"]) == 0
    for bad in ("4", "0", "-1", "x"):
        with pytest.raises(SystemExit):
            train_main(TINY + ["--steps", "2", "--out", str(tmp_path / "bad"), "--exclusion-window", bad])
        assert "--exclusion-window: must be" in capsys.readouterr().err
    # evaluate: the model's own window by default, --exclusion-window overrides it; eval.json's meta
    # records the one used (the bound's draws run with it: K > 0).
    args = [run, "--K", "2", "--n-eval", "4", "--n-bound", "2", "--batch-size", "4", "--threads", "1", "--splits",
            "test"]
    for flag, want in ((["--exclusion-window", "5"], 5), ([], 3), (["--exclusion-window", "1"], 1)):
        out = str(tmp_path / f"eval{want}.json")
        assert eval_main(args + flag + ["--out", out]) == 0
        res = json.load(open(out))
        assert res["meta"]["exclusion_window"] == want
        assert np.isfinite(res["results"]["test"]["nll_bound"]["mean"])
    with pytest.raises(SystemExit):
        eval_main(args + ["--exclusion-window", "4"])
    assert "--exclusion-window: must be an odd positive integer" in capsys.readouterr().err


def test_evaluate_records_the_exclusion_window_of_a_window_1_run(tmp_path):
    from lavae_fast.evaluate import main as eval_main

    run = str(tmp_path / "run")
    assert train_main(TINY + ["--steps", "1", "--out", run, "--exclusion-window", "1"]) == 0
    assert load_checkpoint(run)["model_config"]["exclusion_window"] == 1
    assert eval_main([run, "--K", "2", "--n-eval", "4", "--n-bound", "2", "--batch-size", "4", "--threads", "1",
                      "--splits", "test", "--exclusion-window", "3"]) == 0
    res = json.load(open(os.path.join(run, "eval.json")))
    assert res["meta"]["exclusion_window"] == 3


def test_an_exclusion_window_the_canvas_cannot_hold_is_refused_up_front(tmp_path, capsys):
    """32×32 and M = 10 hold windows up to 9 (1024 > 9·81) but not 11 (9·121 = 1089): train refuses
    --exclusion-window 11 as it refuses other bad settings — a SystemExit that names the flag, before
    the run directory is written — not with a ValueError from inside the first training step;
    evaluate likewise."""
    from lavae_fast.evaluate import main as eval_main

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train_main(TINY + ["--steps", "1", "--out", str(run), "--exclusion-window", "11"])
    assert "exclusion-window" in str(exc.value) + capsys.readouterr().err
    assert not (run / "args.json").exists() and not (run / "checkpoint.pt").exists()
    ok = str(tmp_path / "ok")
    assert train_main(TINY + ["--steps", "1", "--out", ok]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        eval_main([ok, "--K", "0", "--n-eval", "4", "--batch-size", "4", "--threads", "1", "--splits", "test",
                   "--exclusion-window", "11"])
    assert "exclusion-window" in str(exc.value) + capsys.readouterr().err


# The run-defining options as train.py listed them by hand before TrainConfig's metadata named them.
OLD_RUN_DEFINING = ["model", "dataset", "canvas", "steps", "batch_size", "seed", "data_seed", "n_train",
                    "width", "sprite_width", "location_mode", "loc_kl", "warmup_scale", "warmup_peak", "warmup_blur",
                    "warmup_target", "warmup_radius", "warmup_anchor", "warmup_weight", "lr", "loc_lr",
                    "loc_lr_decay"]
# Run-defining options added since, each with the value that runs written before it used
# (train.ADDED_SETTINGS): a run directory without the key resumes with that value.
ADDED_RUN_DEFINING = {"count_window": 3, "exclusion_window": 1, "sprite_size": None}  # None: the data set's S


def _parser_dests():
    """Each option's dest, once (--bf16 and --no-bf16 share one), in the parser's order."""
    dests = []
    for action in T.build_parser()._actions:
        # --config is where settings come from, not a setting: it has no field.
        if action.dest not in ("help", "config") and action.dest not in dests:
            dests.append(action.dest)
    return dests


def test_train_config_has_one_field_per_parser_option_in_its_order():
    # In order as well: args.json is written from to_dict() and keeps the namespace's key order.
    assert list(TrainConfig.cli_fields()) == _parser_dests()
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert fields == _parser_dests() + ["precision", "precision_reason"]  # the two the trainer records


def test_run_defining_is_derived_from_the_metadata_and_unchanged():
    expected = OLD_RUN_DEFINING + list(ADDED_RUN_DEFINING)
    assert set(T.RUN_DEFINING) == set(expected) and len(T.RUN_DEFINING) == len(expected)
    assert T.ADDED_SETTINGS == ADDED_RUN_DEFINING
    assert T.RUN_DEFINING == tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("run_defining"))


def test_train_config_round_trip():
    ns = T.build_parser().parse_args(TINY + ["--out", "r", "--seed", "3", "--bf16", "off", "--no-channels-last"])
    config = TrainConfig.from_args(ns)
    assert config.seed == 3 and config.bf16 == "off" and config.channels_last is False and config.precision is None
    d = config.to_dict()
    # the namespace's keys and values, in its order, then the recorded precision
    assert list(d.items()) == list(vars(ns).items()) + [("precision", None), ("precision_reason", None)]
    assert TrainConfig.from_args(argparse.Namespace(**d)) == config
    # an old args.json (a plain dict of the same keys) makes the same config
    assert TrainConfig.from_args(argparse.Namespace(**json.loads(json.dumps(d)))).to_dict() == json.loads(json.dumps(d))
    with pytest.raises(TypeError):  # an option without a field is an error, not silently dropped
        TrainConfig.from_args(argparse.Namespace(**d, no_such_option=1))
    missing = dict(d)
    del missing["seed"]
    with pytest.raises(TypeError):
        TrainConfig.from_args(argparse.Namespace(**missing))


def test_resume_refusal_reads_missing_keys_as_the_old_defaults():
    args = vars(T.build_parser().parse_args(TINY + ["--out", "unused"]))
    # main() fills the default exclusion window (None) before resuming: the run's own window on
    # --resume (1 for a run from before the setting), tested through the CLI in
    # test_exclusion_window_flag_reaches_the_model_defines_the_run_and_evaluate_records_it.
    args["exclusion_window"] = 1
    old = {k: args[k] for k in T.RUN_DEFINING if k not in ("location_mode", "loc_kl")}  # written before the options
    msg = T.resume_refusal(old, args)
    assert msg and "--location-mode straight_through --loc-kl straight_through" in msg
    assert T.resume_refusal(dict(old, location_mode="relaxed", loc_kl="relaxed"), args) is None
    assert "no longer has" in T.resume_refusal(dict(old, warmup_reduction="mean"), args)
    assert T.resume_refusal(dict(old, location_mode="relaxed", loc_kl="relaxed", warmup_reduction="sum"), args) is None
    # A run written before --count-window counted with 3×3: it resumes with the default, not with 5.
    current = dict(old, location_mode="relaxed", loc_kl="relaxed")
    del current["count_window"]
    assert T.resume_refusal(current, args) is None
    msg = T.resume_refusal(current, dict(args, count_window=5))
    assert msg and "count_window=5 (checkpoint: 3)" in msg and "estimator" not in msg
    # A run written before --exclusion-window excluded only the drawn pixel: it resumes as 1, not as 3.
    del current["exclusion_window"]
    assert T.resume_refusal(current, args) is None
    msg = T.resume_refusal(current, dict(args, exclusion_window=3))
    assert msg and "exclusion_window=3 (checkpoint: 1)" in msg and "estimator" not in msg
    assert T.resume_refusal(dict(current, exclusion_window=3), dict(args, exclusion_window=3)) is None
    assert "exclusion_window=1 (checkpoint: 3)" in T.resume_refusal(dict(current, exclusion_window=3), args)


def test_baseline_cli_runs(tmp_path):
    run = str(tmp_path / "base")
    assert train_main(TINY + ["--model", "baseline", "--steps", "4", "--out", run]) == 0
    state = load_checkpoint(run)
    assert state["model_config"]["kind"] == "baseline" and state["step"] == 4
    rows = read_metrics(run)
    assert rows[0]["beta"] == pytest.approx((0 + 0.25) / 2) and "kl" in rows[0]  # mean over steps 0, 1


@pytest.mark.parametrize("bad,match", [
    (["--steps", "0"], "positive"),
    (["--canvas", "axb"], "canvas"),
    (["--dataset", "cifar"], "invalid choice"),
    (["--warmup-scale", "-1"], "auto"),
    (["--warmup-blur", "-2"], "auto"),
    (["--warmup-blur", "nan"], "auto"),
    (["--warmup-target", "blobs"], "invalid choice"),
    (["--warmup-radius", "0"], "auto"),
    (["--warmup-anchor", "centre"], "invalid choice"),
    (["--sprite-width", "32"], "--sprite-width must exceed LAVAE's latent size 32"),
])
def test_bad_cli_arguments(tmp_path, capsys, bad, match):
    with pytest.raises(SystemExit):
        train_main(TINY + ["--out", str(tmp_path / "r")] + bad)
    assert match in capsys.readouterr().err


def test_meter_sums_tensors_on_the_device_as_it_summed_numbers():
    """The trainer's per-step values stay tensors until a log step; their sums are the float64
    sums of the Python numbers they used to be converted to, exactly, None and NaN skipped."""
    g = torch.Generator().manual_seed(0)
    values = torch.rand(500, generator=g, dtype=torch.float32) * 100  # float32 sums would differ
    values[[3, 77]] = float("nan")
    as_numbers, as_tensors = T._Meter(), T._Meter()
    for i, v in enumerate(values):
        as_numbers.add(a=v.item(), b=None, c=float("nan"), d=2.0 * i)
        as_tensors.add(a=v, b=None, c=torch.tensor(float("nan")), d=2.0 * i)
    sums, counts = as_tensors.totals()
    assert (sums, counts) == as_numbers.totals() == (as_numbers.sums, as_numbers.counts)
    assert counts == {"a": 498, "d": 500} and isinstance(sums["a"], float) and isinstance(counts["a"], int)
    assert sums["a"] != values.nan_to_num(0.0).sum().item()  # (the float32 sum, which it must not be)
    assert as_tensors.means() == as_numbers.means()


def test_recipe_logs_as_tensors_are_its_logged_numbers():
    """Recipe.forward(as_tensors=True) leaves the device's values as detached tensors; read, they
    are exactly the floats of the default."""
    import copy

    from lavae_fast.aux_vae import AuxVAE
    from lavae_fast.data import load_run_split
    from lavae_fast.recipe import Recipe

    args = T.build_parser().parse_args(TINY + ["--out", "unused"])
    torch.manual_seed(0)
    model, aux = T.build_model(T.model_config(args, 3)), AuxVAE(3)
    model.train(), aux.train()
    data = load_run_split(vars(args), "train")
    counts_all = np.asarray(data.counts)
    pick = [int(np.flatnonzero(counts_all == 0)[0])] + [int(i) for i in np.flatnonzero(counts_all > 0)[:7]]
    x, counts = data.get_batch(pick)  # empty images and images with objects: both masked means
    ids = torch.arange(8)
    states = [copy.deepcopy(m.state_dict()) for m in (model, aux)]
    _, _, floats = Recipe.from_args(model, args, aux=aux).forward(x, 0, ids, counts)
    model.load_state_dict(states[0]), aux.load_state_dict(states[1])
    _, _, tensors = Recipe.from_args(model, args, aux=aux).forward(x, 0, ids, counts, as_tensors=True)
    assert list(tensors) == list(floats)
    on_device = [k for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    assert {"loss", "recon", "count_acc", "hloc_max_obj", "hloc_max_empty", "target_max_empty"} <= set(on_device)
    assert all(tensors[k].dim() == 0 and not tensors[k].requires_grad for k in on_device)
    assert all(isinstance(v, float) for v in floats.values())
    assert {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()} == floats


@pytest.mark.parametrize("target", ["map", "cones"])
def test_warmup_loss_enters_the_objective_with_its_weight(target):
    """The recipe's loss adds weight · schedule · warm-up loss; the target's variants all count and log."""
    import copy

    from lavae_fast.aux_vae import AuxVAE
    from lavae_fast.data import load_run_split
    from lavae_fast.recipe import Recipe

    args = T.build_parser().parse_args(TINY + ["--out", "unused", "--warmup-target", target,
                                               "--warmup-anchor", "ink", "--warmup-weight", "1"])
    torch.manual_seed(0)
    model = T.build_model(T.model_config(args, 3))
    aux = AuxVAE(3)
    model.train(), aux.train()
    data = load_run_split(vars(args), "train")
    x, counts = data.get_batch(list(range(4)))
    ids = torch.arange(4)
    heavy = copy.copy(args)
    heavy.warmup_weight = 3.0
    states = [copy.deepcopy(m.state_dict()) for m in (model, aux)]  # batch norm's running stats move
    loss1, _, log1 = Recipe.from_args(model, args, aux=aux).forward(x, 0, ids, counts, probe=True)
    model.load_state_dict(states[0]), aux.load_state_dict(states[1])
    loss3, _, log3 = Recipe.from_args(model, heavy, aux=aux).forward(x, 0, ids, counts, probe=True)
    assert log1["warmup_weight"] == 1.0 and log1["warmup_loss"] > 0
    assert log1["warmup_loss"] == pytest.approx(log3["warmup_loss"], rel=1e-5)
    assert (loss3 - loss1).item() == pytest.approx(2.0 * log1["warmup_loss"], rel=1e-4)
    assert 0.0 <= log1["target_count_acc"] <= 1.0
    # The gradient probe: every term present, the warm-up's push scales with its weight, the
    # others do not depend on it.
    for k in ("hgrad_recon", "hgrad_kl_loc", "hgrad_kl_app", "hgrad_warmup"):
        assert log1[k] >= 0 and math.isfinite(log1[k])
    assert log1["hgrad_warmup"] > 0 and log1["hgrad_recon"] > 0
    assert log3["hgrad_warmup"] == pytest.approx(3.0 * log1["hgrad_warmup"], rel=1e-4)
    assert log3["hgrad_recon"] == pytest.approx(log1["hgrad_recon"], rel=1e-4)


def test_probe_location_gradients_against_a_hand_computation():
    from types import SimpleNamespace

    from lavae_fast.recipe import probe_location_gradients

    h = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 4.0, -1.0, 2.0]], requires_grad=True)
    out = SimpleNamespace(h_loc=h)
    terms = {"sq": (h ** 2).sum() / 2, "free": torch.zeros((), requires_grad=True)}
    res = probe_location_gradients(out, terms, top=2)
    # d(Σh²/2)/dh = h: the top-2 |h| per row are (3, 2) and (4, 2).
    assert res["hgrad_sq"] == pytest.approx(((3 + 2) / 2 + (4 + 2) / 2) / 2)
    assert res["hgrad_free"] == 0.0
