"""No lost work: training killed with SIGKILL at random moments and resumed reaches the parameters
of an uninterrupted run; truncated or corrupt checkpoints are detected and the previous one is
used; an interrupted data generation leaves nothing the loader would read."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import lavae_fast
from lavae_fast.checkpoint import (CheckpointError, load_checkpoint, load_run_checkpoint, previous_path,
                                   remove_stale_temporaries, save_checkpoint, state_digest)
from lavae_fast.data import MultiObjectDataset
from lavae_fast.data.storage import DataFormatError, read_meta
from lavae_fast.train import main as train_main
from lavae_fast.train import truncate_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(lavae_fast.__file__)))

TINY = ["--dataset", "multi-dsprites", "--canvas", "32", "--n-train", "64", "--n-test", "16", "--n-test7", "8",
        "--batch-size", "4", "--width", "6", "--sprite-width", "36", "--threads", "1", "--no-progress",
        "--log-every", "1", "--eval-every", "0"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train_cmd(out, steps, *extra):
    return [sys.executable, "-m", "lavae_fast.train", *TINY, "--steps", str(steps), "--ckpt-every", "1",
            "--out", str(out), *extra]


def _assert_same_state(a, b):
    assert a["step"] == b["step"]
    for name in ("model", "aux"):
        assert list(a[name]) == list(b[name])
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])), (i, k)


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments, for real
# ---------------------------------------------------------------------------------------------


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 12
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    env = _env()
    full, part = tmp_path / "full", tmp_path / "part"
    # The uninterrupted run, in a subprocess like the others (same thread count: 1).
    subprocess.run(_train_cmd(full, steps), cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)

    ckpt = part / "checkpoint.pt"
    killed = []  # (step of the checkpoint left behind, a write was cut short)
    for _ in range(3):
        stamp = lambda: (os.stat(ckpt).st_ino, os.stat(ckpt).st_mtime_ns) if ckpt.exists() else None  # noqa: E731
        before = stamp()
        proc = subprocess.Popen(_train_cmd(part, steps, "--resume"), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # After this session's first checkpoint (it has made progress), at a random moment.
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:
                if stamp() not in (None, before):  # every save is a new file (a new inode)
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.5))
            alive = proc.poll() is None
            if alive:
                proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        if not alive:  # the run finished before the kill: nothing left to interrupt
            break
        assert proc.returncode == -signal.SIGKILL
        torn = any(n.startswith(".tmp-") for n in os.listdir(part))
        killed.append((load_checkpoint(str(part))["step"], torn))
    assert killed and killed[0][0] < steps, f"no kill landed mid-run (seed {seed})"

    rest = subprocess.run(_train_cmd(part, steps, "--resume"), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert rest.returncode == 0, rest.stderr[-3000:]
    print(f"kill seed {seed}: killed with checkpoints at steps {[k for k, _ in killed]} "
          f"(a checkpoint write cut short: {[t for _, t in killed]}); resumed to step {steps}")
    a, b = load_checkpoint(str(full)), load_checkpoint(str(part))
    _assert_same_state(a, b)
    assert not [n for n in os.listdir(part) if n.startswith(".tmp-")]  # stale temporaries cleaned
    # the log holds every step once, in order, as the uninterrupted one
    steps_logged = [json.loads(line)["step"] for line in open(part / "metrics.jsonl")]
    assert steps_logged == list(range(1, steps + 1))


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run of 4 steps (checkpoints at 2 and 4) and an uninterrupted reference run of 4 steps."""
    root = tmp_path_factory.mktemp("ckpts")
    run = str(root / "run")
    train_main(TINY + ["--steps", "4", "--ckpt-every", "2", "--out", run])
    return run


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_the_previous_checkpoint_is_kept(two_checkpoints):
    cur = load_checkpoint(os.path.join(two_checkpoints, "checkpoint.pt"))
    prev = load_checkpoint(previous_path(os.path.join(two_checkpoints, "checkpoint.pt")))
    assert (cur["step"], prev["step"]) == (4, 2)
    assert cur["sha256"] == state_digest(cur) and cur["sha256"] != prev["sha256"]


def _flip_a_parameter_byte(path):
    """Flip one byte inside the stored bytes of the largest tensor: torch.load still succeeds."""
    state = torch.load(path, weights_only=False)
    name, t = max(state["model"].items(), key=lambda kv: kv[1].numel())
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    data = bytearray(open(path, "rb").read())
    at = data.find(raw[:64])
    assert at >= 0
    data[at + 17] ^= 0x40
    open(path, "wb").write(bytes(data))
    return name


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "missing_key", "deleted"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(two_checkpoints, tmp_path, damage):
    run = _copy_run(two_checkpoints, tmp_path / "run")
    path = os.path.join(run, "checkpoint.pt")
    if damage == "truncate":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        match = "could not read checkpoint"
    elif damage == "flip":
        _flip_a_parameter_byte(path)
        torch.load(path, weights_only=False)  # unreadable it is not: only the digest can tell
        match = "corrupt: its contents do not match the stored SHA-256"
    elif damage == "garbage":
        open(path, "wb").write(os.urandom(1000))
        match = "could not read checkpoint"
    elif damage == "missing_key":
        state = torch.load(path, weights_only=False)
        del state["optimizer"]
        save_checkpoint(path, state, keep_previous=False)
        match = "incomplete: missing optimizer"
    else:
        os.remove(path)
        match = "missing"
    if damage != "deleted":
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path, required=("optimizer",))
    with pytest.warns(RuntimeWarning, match=match):
        state, used = load_run_checkpoint(run, required=("optimizer",))
    assert used.endswith("checkpoint.prev.pt") and state["step"] == 2


def test_resume_from_a_corrupt_checkpoint_falls_back_and_matches_the_uninterrupted_run(two_checkpoints, tmp_path,
                                                                                     capsys):
    run = _copy_run(two_checkpoints, tmp_path / "run")
    path = os.path.join(run, "checkpoint.pt")
    reference = load_checkpoint(path)
    _flip_a_parameter_byte(path)
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        train_main(TINY + ["--steps", "4", "--ckpt-every", "2", "--out", run, "--resume"])
    assert "at step 2" in capsys.readouterr().err
    _assert_same_state(load_checkpoint(run), reference)  # steps 3-4 redone, the same result


def test_resume_with_no_good_checkpoint_is_a_clear_error(two_checkpoints, tmp_path, capsys):
    run = _copy_run(two_checkpoints, tmp_path / "run")
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        with open(os.path.join(run, name), "r+b") as f:
            f.truncate(100)
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "4", "--out", run, "--resume"])
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "checkpoint.pt" in err and "checkpoint.prev.pt" in err
    # never silently starting again from scratch over a damaged run
    assert os.path.getsize(os.path.join(run, "checkpoint.pt")) == 100


def test_a_checkpoint_write_that_dies_keeps_both_files_and_leaves_a_temporary_that_is_cleaned(tmp_path,
                                                                                          monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 1, "model": {"w": torch.zeros(3)}})
    save_checkpoint(path, {"step": 2, "model": {"w": torch.ones(3)}})

    def dying_fsync(fd):  # the process "dies" after writing the temporary, before the renames
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 3, "model": {"w": torch.full((3,), 2.0)}})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(previous_path(path))["step"] == 1
    # a SIGKILL would have left the temporary behind; the next run removes such files
    (tmp_path / ".tmp-abc123.pt").write_bytes(b"half")
    assert remove_stale_temporaries(str(tmp_path)) == [".tmp-abc123.pt"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_truncate_metrics_drops_redone_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "eval": {}}\n{"step": 3, "loss": 2}\n{"step": 4, "lo')
    truncate_metrics(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Interrupted data generation
# ---------------------------------------------------------------------------------------------


def _generate_cmd(out, *extra):
    return [sys.executable, "-m", "lavae_fast.data", "generate", "--dataset", "multi-dsprites", "--out", str(out),
            "--n-train", "6000", "--n-test", "300", "--n-test7", "0", "--canvas", "32", "--seed", "4",
            "--no-progress", *extra]


def _kill_generation_midway(cmd, out, rng, cwd, max_delay=0.8):
    """Start a generation, SIGKILL it at a random moment after its first file appears, and check
    what it left: no meta.json and a directory the loader refuses, or (killed after writing
    meta.json, on its way out) a complete data set whose every file verifies. True in the first
    case (the kill interrupted the generation)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A replacement (--overwrite) is written to a staging directory beside `out` (storage.staging_dir).
    staged = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.new-{proc.pid}")
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if any(os.path.isdir(d) and any(".tmp-" in n for n in os.listdir(d)) for d in (out, staged)):
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, max_delay))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    if os.path.exists(os.path.join(out, "meta.json")):
        for split in ("train", "test"):
            MultiObjectDataset(str(out), split, verify=True)
        return False
    with pytest.raises(DataFormatError, match="meta.json.*interrupted"):
        read_meta(str(out))
    with pytest.raises(DataFormatError):
        MultiObjectDataset(str(out), "train")
    return True


def test_interrupted_generation_is_refused_and_a_rerun_completes_it(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    clean = tmp_path / "clean"
    subprocess.run(_generate_cmd(clean), cwd=tmp_path, env=_env(), check=True, capture_output=True, timeout=300)

    # A fresh directory, killed mid-way.
    out = tmp_path / "data"
    landed = [_kill_generation_midway(_generate_cmd(out), out, rng, tmp_path)]
    # On a fast machine the rest of a generation can take less than the random delay: try again in a
    # fresh directory with shorter delays until one kill lands mid-way.
    for attempt in range(1, 5):
        if landed[-1]:
            break
        shutil.rmtree(out)
        landed.append(_kill_generation_midway(_generate_cmd(out), out, rng, tmp_path,
                                              max_delay=0.8 / 4**attempt))
    assert landed[-1], f"no kill landed mid-generation (seed {seed}): {landed}"
    # Regenerating over a complete data set (--overwrite), killed mid-way: the new set is staged
    # beside it and swapped in last, so the old set stays whole and verifies.
    subprocess.run(_generate_cmd(out, "--overwrite"), cwd=tmp_path, env=_env(), check=True, capture_output=True,
                   timeout=300)
    assert MultiObjectDataset(str(out), "train", verify=True) is not None
    # (False: `out` keeps its meta.json and every file of the old set verifies.)
    assert not _kill_generation_midway(_generate_cmd(out, "--overwrite", "--seed", "5"), out, rng, tmp_path)
    print(f"generation kill seed {seed}: kills landed mid-run: {landed}; "
          f"temporaries left: {sorted(n for n in os.listdir(out) if '.tmp-' in n)}")

    # Re-running completes it: no temporaries left, every file verified, the same bytes as a clean run.
    done = subprocess.run(_generate_cmd(out, "--overwrite"), cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".data.")], "a killed replacement's staging is left"
    ds = MultiObjectDataset(str(out), "train", verify=True)
    ref = MultiObjectDataset(str(clean), "train")
    assert len(ds) == 6000 and np.array_equal(np.asarray(ds.images), np.asarray(ref.images))
    assert read_meta(str(out))["splits"] == read_meta(str(clean))["splits"]
