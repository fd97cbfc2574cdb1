"""from_pretrained (by run directory, checkpoint file and name), the export round trip, and the
refusals: unknown name, a name not shipped, missing or damaged files, the other model's checkpoint,
and a pickle that carries code (refused without running it)."""

import json
import pytest
import torch

from lavae_fast import BetaVAE, LAVAE, pretrained
from lavae_fast.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from lavae_fast.pretrained import NotShipped
from lavae_fast.pretrained.shipping import export
from lavae_fast.pretrained.__main__ import main as cli

CANVAS = (24, 24)


def _lavae():
    m = LAVAE(channels=1, canvas=CANVAS, sprite_size=5, width=8, sprite_width=40)
    with torch.no_grad():  # weights that differ from a fresh model's, so loading is visible
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for b in m.buffers():
            if b.is_floating_point():
                b.add_(0.1)
    return m


def _train_args(run, model="lavae"):
    from lavae_fast.train import build_parser

    return vars(build_parser().parse_args(["--model", model, "--dataset", "multi-mnist-1k", "--canvas", "24",
                                           "--steps", "7", "--width", "8", "--out", str(run)]))


def _write_run(run, model, kind):
    cfg = {"kind": kind, "channels": 1, "canvas": CANVAS}
    if kind == "lavae":
        cfg.update(sprite_size=5, width=8, sprite_width=40)
    else:
        cfg.update(width=8)
    opt = torch.optim.Adamax(model.parameters())
    model(torch.rand(2, 1, *CANVAS).round()).loss.backward()
    opt.step()
    model.eval()
    save_checkpoint(str(run / CHECKPOINT_NAME), {
        "step": 7, "args": _train_args(run, kind), "model_config": cfg, "model": model.state_dict(), "aux": None,
        "optimizer": opt.state_dict(), "data_fingerprint": "f" * 64})
    return model


@pytest.fixture
def run(tmp_path):
    """A run directory holding a tiny LAVAE's checkpoint (with its optimiser), and the model."""
    d = tmp_path / "run"
    return d, _write_run(d, _lavae(), "lavae")


@pytest.fixture
def baseline_run(tmp_path):
    d = tmp_path / "baseline_run"
    return d, _write_run(d, BetaVAE(channels=1, canvas=CANVAS, width=8), "baseline")


@pytest.fixture
def package_dir(tmp_path, monkeypatch):
    """The package's model folder, redirected to an empty directory (so the test does not depend
    on which models this version ships, and export writes nothing into the source tree)."""
    d = tmp_path / "package"
    d.mkdir()
    monkeypatch.setattr(pretrained, "HERE", str(d))
    return d


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def _all_eval(m):
    return not any(mod.training for mod in m.modules())


@pytest.mark.parametrize("by", ["directory", "file"])
def test_loads_a_run_by_directory_and_by_checkpoint_file(run, by):
    d, model = run
    loaded = LAVAE.from_pretrained(str(d) if by == "directory" else str(d / CHECKPOINT_NAME))
    assert type(loaded) is LAVAE and _all_eval(loaded)
    _same_weights(loaded, model)
    x = torch.rand(3, 1, *CANVAS).round()
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x))


def test_count_window_from_the_checkpoint_and_overridden(run, tmp_path):
    d, model = run
    # The checkpoint's model_config does not name count_window (written before it existed): 3×3.
    assert "count_window" not in load_checkpoint(str(d / CHECKPOINT_NAME))["model_config"]
    assert LAVAE.from_pretrained(d).count_window == 3
    loaded = LAVAE.from_pretrained(d, count_window=5)
    assert loaded.count_window == 5
    _same_weights(loaded, model)
    with pytest.raises(ValueError, match="count_window"):
        LAVAE.from_pretrained(d, count_window=4)
    # A checkpoint that records it builds that counter.
    state = load_checkpoint(str(d / CHECKPOINT_NAME))
    state["model_config"] = dict(state["model_config"], count_window=7)
    other = tmp_path / "run7"
    save_checkpoint(str(other / CHECKPOINT_NAME), state)
    assert LAVAE.from_pretrained(other).count_window == 7
    assert LAVAE.from_pretrained(other, count_window=3).count_window == 3
    from lavae_fast.loading import build_model, load_model

    assert load_model(str(other))[0].count_window == 7
    assert build_model({k: v for k, v in state["model_config"].items() if k != "count_window"}).count_window == 3


def test_exclusion_window_from_the_checkpoint_and_overridden(run, tmp_path):
    d, model = run
    # The checkpoint's model_config does not name exclusion_window (written before it existed): the
    # paper's one-pixel exclusion.
    assert "exclusion_window" not in load_checkpoint(str(d / CHECKPOINT_NAME))["model_config"]
    assert LAVAE.from_pretrained(d).exclusion_window == 1
    loaded = LAVAE.from_pretrained(d, exclusion_window=5)
    assert loaded.exclusion_window == 5 and loaded.count_window == 3
    _same_weights(loaded, model)
    x = torch.rand(3, 1, *CANVAS).round()
    top = loaded.infer(x, locations="top")  # its draws use the window (24×24 holds 9·25 < 576)
    for b in range(3):
        ps = [int(p) for p in top.index[b, : int(top.n[b])]]
        for i, p in enumerate(ps):
            assert all(max(abs(p // CANVAS[1] - q // CANVAS[1]), abs(p % CANVAS[1] - q % CANVAS[1])) > 2
                       for q in ps[:i])
    assert torch.isfinite(loaded.log_likelihood(x, K=2)).all()
    for bad in (4, 0, True):
        with pytest.raises(ValueError, match="exclusion_window"):
            LAVAE.from_pretrained(d, exclusion_window=bad)
    # A checkpoint that records it builds that window; the argument still overrides it.
    state = load_checkpoint(str(d / CHECKPOINT_NAME))
    state["model_config"] = dict(state["model_config"], exclusion_window=3)
    other = tmp_path / "run3"
    save_checkpoint(str(other / CHECKPOINT_NAME), state)
    assert LAVAE.from_pretrained(other).exclusion_window == 3
    assert LAVAE.from_pretrained(other, exclusion_window=1).exclusion_window == 1
    from lavae_fast.loading import build_model, load_model

    assert load_model(str(other))[0].exclusion_window == 3
    assert build_model({k: v for k, v in state["model_config"].items() if k != "exclusion_window"}).exclusion_window == 1


def test_baseline_loads_in_eval_mode(baseline_run):
    d, model = baseline_run
    loaded = BetaVAE.from_pretrained(d)
    assert type(loaded) is BetaVAE and _all_eval(loaded)
    _same_weights(loaded, model)


def test_other_canvas(run, baseline_run):
    m = LAVAE.from_pretrained(run[0], canvas=(20, 28))
    assert m.canvas == (20, 28)
    assert m.reconstruct(torch.rand(2, 1, 20, 28).round()).shape == (2, 1, 20, 28)
    assert m.sample(2).shape == (2, 1, 20, 28)
    with pytest.raises(ValueError):  # the trained canvas is no longer the one it takes
        m.reconstruct(torch.rand(2, 1, *CANVAS))
    _same_weights(m, run[1])
    b = BetaVAE.from_pretrained(baseline_run[0], canvas=40)
    assert b.sample(2).shape == (2, 1, 40, 40)
    for bad in ((0, 5), (5,), "big", 2.5):
        with pytest.raises(ValueError, match="canvas"):
            LAVAE.from_pretrained(run[0], canvas=bad)


def _evaluate(target, *extra):
    """``python -m lavae_fast.evaluate`` on a tiny run, a few images of its test split; the results."""
    from lavae_fast.evaluate import main as evaluate

    assert evaluate([str(target), "--splits", "test", "--n-eval", "3", "--K", "2", "--n-bound", "2", *extra]) == 0


def test_export_round_trip(run, tmp_path):
    d, model = run
    _evaluate(d)
    results = json.loads((d / "eval.json").read_text())
    out = tmp_path / "shipped.pt"
    assert export(str(d), out=str(out), train_commit="abc123") == str(out)
    state = load_checkpoint(str(out))  # verified: the digest of the new file is right
    assert "optimizer" not in state and "aux" not in state
    assert state["step"] == 7 and state["model_config"]["kind"] == "lavae"
    prov = state["provenance"]
    assert prov["metrics"] == results and prov["train_commit"] == "abc123"
    assert prov["command"].startswith("python -m lavae_fast.train ")
    # Every setting that differs from the trainer's default, in the trainer's own spelling.
    for part in ("--dataset multi-mnist-1k", "--canvas 24x24", "--steps 7", "--width 8", "--out RUN_DIR"):
        assert part in prov["command"]
    # No path of the machine that trained or exported it (the metrics are the evaluation's record as
    # it was written, paths included).
    assert str(d) not in json.dumps({k: v for k, v in prov.items() if k != "metrics"})
    assert "--batch-size" not in prov["command"]  # left at its default
    assert prov["data"]["dataset"] == "multi-mnist-1k" and prov["data"]["fingerprint"] == "f" * 64
    # The config that trained it, without this machine's paths: `train --config` takes it back.
    assert prov["config"]["steps"] == 7 and prov["config"]["width"] == 8 and "out" not in prov["config"]
    assert prov["config"]["exclusion_window"] == state["args"]["exclusion_window"]
    assert prov["source"]["file"] == CHECKPOINT_NAME and prov["metrics_file"] == "eval.json"
    loaded = LAVAE.from_pretrained(str(out))
    _same_weights(loaded, model)
    assert _all_eval(loaded)
    assert out.stat().st_mode & 0o777 == 0o644  # package data: readable by every user
    # No optimiser state: the shipped file is smaller than the run's checkpoint.
    assert out.stat().st_size < (d / CHECKPOINT_NAME).stat().st_size


def test_export_refuses_metrics_of_another_checkpoint_data_or_window(run, tmp_path):
    """Shipping a model with another model's numbers: metrics that are not an evaluation result,
    that measured an earlier checkpoint, other data, or another proposal window are refused."""
    from lavae_fast.pretrained.shipping import MetricsMismatch

    d, model = run
    out = tmp_path / "m.pt"
    junk = tmp_path / "junk.json"
    for text in ('{"test": {"count_accuracy": 1.0}}', "[1, 2]", "not json"):
        junk.write_text(text)
        with pytest.raises(MetricsMismatch, match="not an evaluation result|not JSON"):
            export(str(d), out=str(out), metrics=str(junk))
    # An evaluation with another exclusion window than the model's: a valid bound, not its metrics.
    _evaluate(d, "--exclusion-window", "3")
    with pytest.raises(MetricsMismatch, match="exclusion window 3"):
        export(str(d), out=str(out))
    _evaluate(d)
    export(str(d), out=str(out))  # the model's own settings on its own data: accepted
    # The run moved on after its evaluation: eval.json measured the previous checkpoint.
    state = load_checkpoint(str(d / CHECKPOINT_NAME))
    state["step"] = 8
    save_checkpoint(str(d / CHECKPOINT_NAME), state)
    with pytest.raises(MetricsMismatch, match="another checkpoint .step 7"):
        export(str(d), out=str(out), overwrite=True)
    assert load_checkpoint(str(out))["step"] == 7  # the earlier export is untouched
    with pytest.raises(SystemExit, match="another checkpoint"):
        cli(["export", str(d), "--out", str(tmp_path / "cli.pt")])


def test_export_refuses_metrics_measured_on_other_data(run, tmp_path):
    from lavae_fast.data.generator import generate
    from lavae_fast.pretrained.shipping import MetricsMismatch

    d, model = run
    other = tmp_path / "other"
    generate("multi-mnist-1k", str(other), n_train=4, n_test=4, n_test7=0, seed=5, canvas=CANVAS, progress=False)
    _evaluate(d, "--data", str(other))
    written = [p.name for p in d.iterdir() if p.name.startswith("eval")]
    assert written and "eval.json" not in written  # beside the run's own results, not over them
    meta = json.loads((d / written[0]).read_text())["meta"]
    assert meta["data"]["own"] is False and meta["data"]["path"] == str(other)
    with pytest.raises(MetricsMismatch, match="other data"):
        export(str(d), out=str(tmp_path / "m.pt"), metrics=str(d / written[0]))


def test_export_needs_metrics_and_does_not_overwrite(run, tmp_path):
    d, _ = run
    out = tmp_path / "m.pt"
    with pytest.raises(FileNotFoundError, match="lavae_fast.evaluate"):
        export(str(d), out=str(out))
    assert not out.exists()
    export(str(d), out=str(out), no_metrics=True)
    assert load_checkpoint(str(out))["provenance"]["metrics"] is None
    with pytest.raises(FileExistsError):
        export(str(d), out=str(out), no_metrics=True)
    export(str(d), out=str(out), no_metrics=True, overwrite=True)


def test_export_by_name_then_load_by_name(run, baseline_run, package_dir, capsys):
    d, model = run
    with pytest.raises(NotShipped, match="not shipped in lavae_fast"):
        LAVAE.from_pretrained("multi-dsprites")
    assert cli(["export", str(d), "--name", "multi-dsprites", "--no-metrics"]) == 0
    assert (package_dir / pretrained.REGISTRY[("lavae", "multi-dsprites")]).is_file()
    _same_weights(LAVAE.from_pretrained("multi-dsprites"), model)
    # The name picks the file of the asking model's kind: no baseline was exported.
    with pytest.raises(NotShipped, match="not shipped"):
        BetaVAE.from_pretrained("multi-dsprites")
    assert cli(["export", str(baseline_run[0]), "--name", "multi-dsprites", "--no-metrics"]) == 0
    _same_weights(BetaVAE.from_pretrained("multi-dsprites"), baseline_run[1])
    assert pretrained.shipped() == [("baseline", "multi-dsprites"), ("lavae", "multi-dsprites")]
    capsys.readouterr()
    assert cli(["list"]) == 0
    listing = capsys.readouterr().out
    assert "multi-dsprites" in listing and "multi-mnist-10k" in listing and "not shipped" in listing
    with pytest.raises(SystemExit, match="unknown name 'cifar'"):
        cli(["export", str(d), "--name", "cifar", "--no-metrics"])


def test_unknown_name_and_missing_path(package_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown pretrained model name 'multi-cifar'.*multi-dsprites"):
        LAVAE.from_pretrained("multi-cifar")
    with pytest.raises(NotShipped, match="not shipped"):
        LAVAE.from_pretrained("multi-mnist-10k")
    with pytest.raises(FileNotFoundError, match="no run directory or checkpoint"):
        LAVAE.from_pretrained(str(tmp_path / "nowhere" / "checkpoint.pt"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        LAVAE.from_pretrained(str(empty))


def test_damaged_files_are_refused(run, tmp_path):
    d, _ = run
    good = (d / CHECKPOINT_NAME).read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # a flipped byte inside the tensor data
    truncated = good[: len(good) // 2]
    for name, data in (("flipped.pt", bytes(flipped)), ("truncated.pt", truncated), ("text.pt", b"not a model")):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            LAVAE.from_pretrained(str(p))


def test_the_other_models_checkpoint_is_refused(run, baseline_run):
    with pytest.raises(CheckpointError, match="baseline.*BetaVAE.from_pretrained"):
        LAVAE.from_pretrained(baseline_run[0])
    with pytest.raises(CheckpointError, match="LAVAE.*LAVAE.from_pretrained"):
        BetaVAE.from_pretrained(run[0])


class _Payload:
    """Unpickling this runs open(marker, "w"): the code a hostile file could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_code_is_not_executed(run, tmp_path):
    d, model = run
    marker = tmp_path / "executed"
    state = {"format": 1, "step": 1, "args": {}, "model": model.state_dict(), "payload": _Payload(str(marker)),
             "model_config": {"kind": "lavae", "channels": 1, "canvas": CANVAS}}
    evil = tmp_path / "evil.pt"
    torch.save(state, str(evil))
    with pytest.raises(CheckpointError, match="objects other than tensors.*nothing in it was executed"):
        LAVAE.from_pretrained(str(evil))
    assert not marker.exists()
    # The file really carries code: an unrestricted load runs it (so the refusal above is what kept
    # the marker from being written).
    loaded = torch.load(str(evil), weights_only=False)  # noqa: S614 — on purpose, to prove the payload
    loaded["payload"].close()
    assert marker.exists()


@pytest.mark.parametrize("argv", [
    ["--dataset", "multi-dsprites", "--canvas", "48", "--steps", "7000", "--width", "32", "--threads", "1"],
    ["--dataset", "multi-mnist-1k", "--no-bf16", "--location-mode", "straight_through", "--no-progress"],
    ["--model", "baseline", "--dataset", "multi-dsprites", "--bf16", "on", "--no-channels-last"],
])
def test_training_command_parses_back_to_the_same_settings(argv):
    # The provenance's command is what was run: parsed again it gives the recorded settings (a flag
    # that shares its setting with another, like --no-bf16 for --bf16 off, only when it was used).
    import shlex

    from lavae_fast.pretrained.shipping import training_command
    from lavae_fast.train import build_parser

    args = vars(build_parser().parse_args(argv + ["--out", "runs/x", "--data", "/home/me/data"]))
    cmd = shlex.split(training_command(args))
    assert cmd[:3] == ["python", "-m", "lavae_fast.train"]
    # The paths of the machine that ran it are placeholders: the rest is what was run.
    assert vars(build_parser().parse_args(cmd[3:])) == {**args, "out": "RUN_DIR", "data": "DATA_DIR"}
    assert ("--no-bf16" in cmd) == ("--no-bf16" in argv)
