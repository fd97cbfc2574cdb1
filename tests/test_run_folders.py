"""Results that cannot be misattributed, and work that is never lost (issue 27, items 1–3):

* a run folder is any folder holding a run's files; nothing of it is deleted or truncated without
  ``--overwrite``, and ``--overwrite`` removes all of it or nothing;
* every results file names what it measured, ``evaluate --data OTHER`` writes beside the run's own
  results, JSON output is strict, a checkpoint without its digest is refused, the demo's two modes
  keep to their own folders;
* output locations are checked before the work, a failed final write keeps the results, Ctrl-C and
  a non-finite loss end every CLI with a message and an exit code (130, 1).

Each test failed on the code before these changes."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lavae_fast import _io
from lavae_fast.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from lavae_fast.evaluate import main as eval_main
from lavae_fast.train import discard_run, run_contents
from lavae_fast.train import main as train_main

from test_resilience import TINY, _env  # noqa: E402
from test_safety import _in_small_filesystem  # noqa: E402


def _strict(text: str):
    """json.loads that refuses NaN / Infinity, as strict parsers (jq, browsers) do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (3 steps, a checkpoint each step), copied fresh for each test."""
    run = str(tmp_path_factory.mktemp("trained") / "run")
    assert train_main(TINY + ["--steps", "3", "--ckpt-every", "1", "--out", run]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(trained, dst)
    return dst


def _snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name == ".lock":
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# ---------------------------------------------------------------------------------------------
# 1. Work lost
# ---------------------------------------------------------------------------------------------


def test_a_folder_holding_only_a_best_checkpoint_and_its_log_is_a_run(run):
    """The model kept to ship (checkpoint.best.pt) and its log, without checkpoint.pt: neither a new
    run nor --resume may delete the best checkpoint or truncate the log."""
    os.remove(os.path.join(run, "checkpoint.pt"))
    os.remove(os.path.join(run, "checkpoint.prev.pt"))
    save_checkpoint(os.path.join(run, "checkpoint.best.pt"), {"step": 3, "model": {"w": torch.ones(2)}})
    before = _snapshot(run)
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit):
            train_main(TINY + ["--steps", "3", "--out", run, *extra])
        assert _snapshot(run) == before, extra


def test_results_and_figures_alone_make_a_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text("{}")
    (run / "figures").mkdir()
    assert run_contents(str(run)) == ["eval.json", "figures"]
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "1", "--out", str(run)])
    assert (run / "eval.json").read_text() == "{}"


def test_overwrite_removes_every_file_of_the_old_run(run, capsys):
    assert eval_main([run, "--K", "0", "--n-eval", "2", "--splits", "test"]) == 0
    assert eval_main([os.path.join(run, "checkpoint.prev.pt"), "--K", "0", "--n-eval", "2", "--splits", "test"]) == 0
    assert os.path.isfile(os.path.join(run, "checkpoint.prev.eval.json"))
    os.makedirs(os.path.join(run, "figures"))
    with open(os.path.join(run, "figures", "old.png"), "wb") as f:
        f.write(b"old model")
    assert train_main(TINY + ["--steps", "1", "--out", run, "--overwrite"]) == 0
    left = sorted(n for n in os.listdir(run) if n != ".lock")
    # The new run's own files only: no result or figure of the discarded model survives.
    assert not any(n.endswith("eval.json") for n in left) and "figures" not in left, left
    assert load_checkpoint(os.path.join(run, CHECKPOINT_NAME))["step"] == 1
    assert not any(n.startswith(".discarded-") for n in left)


def test_overwrite_removes_all_or_nothing(run, monkeypatch):
    assert eval_main([run, "--K", "0", "--n-eval", "2", "--splits", "test"]) == 0
    before = _snapshot(run)
    real, calls = os.rename, []

    def failing(src, dst):
        calls.append(src)
        if len(calls) == 3:  # the third entry cannot be moved (a permission, a busy mount)
            raise PermissionError(errno.EACCES, "Permission denied", src)
        return real(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(PermissionError):
        discard_run(run)
    monkeypatch.undo()
    assert _snapshot(run) == before  # the entries moved before the failure are back
    assert not any(n.startswith(".discarded-") for n in os.listdir(run))


# ---------------------------------------------------------------------------------------------
# 2. Results attributed to the wrong model or data
# ---------------------------------------------------------------------------------------------


def test_a_results_file_names_the_checkpoint_the_data_K_and_the_windows(run):
    assert eval_main([run, "--K", "2", "--n-eval", "3", "--n-bound", "2", "--splits", "test",
                      "--exclusion-window", "1"]) == 0
    with open(os.path.join(run, "eval.json")) as f:
        meta = _strict(f.read())["meta"]
    state = load_checkpoint(os.path.join(run, CHECKPOINT_NAME))
    assert meta["checkpoint"] == {"file": os.path.abspath(os.path.join(run, CHECKPOINT_NAME)), "step": 3,
                                  "sha256": state["sha256"]}
    assert meta["data"]["own"] is True and meta["data"]["path"] is None
    assert meta["data"]["generated"]["dataset"] == "multi-dsprites" and meta["data"]["fingerprint"]
    assert (meta["K"], meta["n_bound"], meta["exclusion_window"], meta["count_window"]) == (2, 2, 1, 3)


def test_evaluate_on_other_data_writes_beside_the_runs_own_results(run, tmp_path):
    from lavae_fast.data import generate

    assert eval_main([run, "--K", "0", "--n-eval", "2", "--splits", "test"]) == 0
    own = open(os.path.join(run, "eval.json")).read()
    other = str(tmp_path / "other set")
    generate("multi-dsprites", other, n_train=2, n_test=4, n_test7=0, canvas=(32, 32), seed=9, progress=False)
    assert eval_main([run, "--K", "0", "--n-eval", "2", "--splits", "test", "--data", other]) == 0
    assert open(os.path.join(run, "eval.json")).read() == own
    beside = [n for n in os.listdir(run) if n.startswith("eval.data-")]
    assert len(beside) == 1 and beside[0].startswith("eval.data-other_set-"), beside
    meta = _strict(open(os.path.join(run, beside[0])).read())["meta"]
    assert meta["data"]["own"] is False and meta["data"]["path"] == os.path.abspath(other)


def test_results_are_strict_json_even_for_quantities_not_measured(run):
    # K = 0: no bound; one image: no standard error; these are null, not NaN.
    assert eval_main([run, "--K", "0", "--n-eval", "1", "--splits", "test"]) == 0
    results = _strict(open(os.path.join(run, "eval.json")).read())["results"]["test"]
    assert results["neg_elbo"]["sem"] is None
    for line in open(os.path.join(run, "metrics.jsonl")):
        _strict(line)
    assert _io.dumps_strict({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'


def test_a_checkpoint_stripped_of_its_digest_is_refused(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(2)}})
    state = torch.load(path, weights_only=True)
    del state["sha256"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="no SHA-256 digest"):
        load_checkpoint(path)


def test_the_demos_two_modes_keep_to_their_own_folders(run, tmp_path):
    from lavae_fast import demo

    assert demo.DEFAULT_OUT["shipped"] != demo.DEFAULT_OUT["train"]
    assert "trained run" in demo.output_problem(run, "shipped")  # a --train run's folder
    report = tmp_path / "shipped"
    report.mkdir()
    (report / "report.json").write_text("{}")
    (report / "figures").mkdir()
    assert "report.json" in demo.output_problem(str(report), "train")
    assert demo.output_problem(str(report), "shipped") is None  # its own output: replaced
    assert demo.output_problem(run, "train") is None
    assert demo.main(["--out", run, "--no-figures", "--n", "2", "--n7", "0"]) == 2


# ---------------------------------------------------------------------------------------------
# 3. Output locations, failed final writes, Ctrl-C, a non-finite loss
# ---------------------------------------------------------------------------------------------


def test_evaluate_checks_its_output_before_the_work(run, tmp_path, monkeypatch):
    import lavae_fast.evaluate as ev

    def no_work(*a, **k):
        raise AssertionError("evaluated before checking where the results go")

    monkeypatch.setattr(ev, "evaluate_split", no_work)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(SystemExit, match="not a directory|cannot create"):
        eval_main([run, "--out", str(afile / "eval.json")])
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(SystemExit, match="cannot write"):
            eval_main([run, "--out", str(ro / "eval.json")])


def test_a_failed_final_write_keeps_the_results(run, monkeypatch, capsys):
    def full(path, obj, indent=2):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(_io, "write_json", full)
    assert eval_main([run, "--K", "0", "--n-eval", "2", "--splits", "test"]) == 1
    out, err = capsys.readouterr()
    printed = _strict(out[out.index("{\n"):out.rindex("}") + 1])
    assert printed["results"]["test"]["images"] == 2  # the computed results, on standard output
    assert "the disk is full" in err and "printed above" in err and "Traceback" not in err


def test_evaluate_on_a_full_disk_stops_before_the_work(trained):
    cmd = (f"dd if=/dev/zero of=$FS/fill bs=64k 2>/dev/null; {sys.executable} -m lavae_fast.evaluate {trained} "
           "--K 0 --n-eval 2 --splits test --out $FS/eval.json; echo rc=$?")
    r = _in_small_filesystem("1m", cmd)
    assert "rc=1" in r.stdout, (r.stdout, r.stderr)
    assert "the disk is full" in r.stderr and "Traceback" not in r.stderr


def test_figures_that_cannot_be_written_end_with_a_message(run, monkeypatch, capsys):
    import lavae_fast.figures as figs

    real, calls = figs.save_figure, []

    def full_after_two(fig, path):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(fig, path)

    monkeypatch.setattr(figs, "save_figure", full_after_two)
    assert figs.main([run, "--num", "2"]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "written before it" in err and "Traceback" not in err


def test_demo_train_interrupted_during_evaluation_says_so_and_exits_130(tmp_path, monkeypatch, capsys):
    from lavae_fast import demo, evaluate

    def interrupted(*a, **k):  # Ctrl-C in the evaluation CLI's work (the training's own is not touched)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "format_table", interrupted)
    small = demo._train_argv  # the demo's run, on a tiny data set and net (later options win)
    monkeypatch.setattr(demo, "_train_argv", lambda a: small(a) + ["--n-train", "32", "--n-test", "8", "--n-test7", "4",
                                                                   "--n-val", "8", "--width", "6", "--sprite-width", "36"])
    out = str(tmp_path / "demo")
    rc = demo.main(["--train", "--steps", "1", "--batch-size", "2", "--out", out, "--no-figures"])
    assert rc == 130
    o = capsys.readouterr().out
    assert "== evaluating" in o and "done" not in o.split("== evaluating")[-1]
    assert not os.path.exists(os.path.join(out, "eval.json"))


def test_a_non_finite_loss_ends_training_with_exit_1_naming_the_last_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "lavae_fast.train", *TINY, "--steps", "6", "--ckpt-every", "1",
                        "--lr", "1e30", "--loc-lr", "1e30", "--out", out], env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "the loss became nan" in r.stderr
    step = load_checkpoint(os.path.join(out, CHECKPOINT_NAME))["step"]
    assert f"{os.path.join(out, CHECKPOINT_NAME)} (step {step})" in r.stderr
    assert all(torch.isfinite(v).all() for v in load_checkpoint(os.path.join(out, CHECKPOINT_NAME))["model"].values()
               if v.is_floating_point())


@pytest.mark.parametrize("cli", ["evaluate", "figures", "demo", "pretrained"])
def test_every_cli_turns_ctrl_c_into_a_message_and_130(trained, tmp_path, monkeypatch, capsys, cli):
    """Ctrl-C in the middle of each CLI's work: a line that says so and exit code 130."""
    import lavae_fast.evaluate as ev
    import lavae_fast.figures as figs
    import lavae_fast.pretrained.shipping as shipping

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    if cli == "evaluate":
        monkeypatch.setattr(ev, "evaluate_split", interrupted)
        rc = ev.main([trained, "--splits", "test", "--out", str(tmp_path / "e.json")])
    elif cli == "figures":
        monkeypatch.setattr(figs, "sample_figure", interrupted)
        rc = figs.main([trained, "--out", str(tmp_path / "f")])
    elif cli == "demo":
        from lavae_fast import demo

        monkeypatch.setattr(ev, "evaluate_split", interrupted)
        rc = demo.main(["--out", str(tmp_path / "d"), "--no-figures"])
    else:
        from lavae_fast.pretrained.__main__ import main as pretrained_main

        monkeypatch.setattr(shipping, "save_checkpoint", interrupted)
        rc = pretrained_main(["export", trained, "--out", str(tmp_path / "m.pt"), "--no-metrics"])
    assert rc == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_real_sigint_during_the_demo(tmp_path):
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "lavae_fast.demo", "--out", str(tmp_path / "d"), "--n", "4000",
                          "--n7", "0", "--no-figures"], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(10)  # past the imports, into the work (4000 scenes take far longer)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "d" / "report.json")


def test_a_discarded_run_left_by_a_killed_overwrite_is_removed_by_the_next_run(run):
    # --overwrite killed between setting the old run aside and deleting it.
    left = os.path.join(run, ".discarded-abc")
    os.makedirs(os.path.join(left, "tb"))
    with open(os.path.join(left, "metrics.jsonl"), "w") as f:
        f.write("{}\n")
    assert train_main(TINY + ["--steps", "3", "--ckpt-every", "1", "--out", run, "--resume"]) == 0  # nothing to do
    assert not os.path.exists(left)


@pytest.mark.parametrize("argv, option", [
    (["--batch-size", str(2**70)], "--batch-size"), (["--sprite-width", "99999999999"], "--sprite-width"),
    (["--steps", str(2**63 + 1)], "--steps"), (["--count-window", str(2**63 + 1)], "--count-window")])
def test_integers_too_large_for_the_work_are_usage_errors(tmp_path, capsys, argv, option):
    with pytest.raises(SystemExit) as e:
        train_main(TINY + ["--out", str(tmp_path / "r"), *argv])
    assert e.value.code == 2
    assert option in capsys.readouterr().err or option == "--count-window"


def test_evaluate_refuses_an_absurd_K_before_the_work(run, capsys):
    with pytest.raises(SystemExit) as e:
        eval_main([run, "--K", str(10**20)])
    assert e.value.code == 2 and "--K: must be at most" in capsys.readouterr().err
