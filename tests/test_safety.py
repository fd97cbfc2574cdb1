"""Never lose a run or a data set (issue 15): the run directory's ownership and policy, interrupts,
full disks, data identity; and the bad inputs that used to end in a raw traceback.

Full disks are real ones where the machine allows it: a 1-process mount namespace (``unshare -rm``)
with a small tmpfs, no root needed; those tests skip where user namespaces are unavailable. The
checkpoint writer's handling of torch's own full-disk error is also tested by injection."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lavae_fast import data
from lavae_fast.checkpoint import (CheckpointWriteError, load_checkpoint, previous_path, remove_stale_temporaries, save_checkpoint)
from lavae_fast.data import storage
from lavae_fast.data.__main__ import main as data_main
from lavae_fast.train import main as train_main

# The tiny run configuration and the subprocess environment of the kill-and-resume tests. Children
# run with cwd=tmp_path: from the repository root, `python -m`/`-c` would import the source folder
# (no _C after a plain install) instead of the package this process tests.
from test_resilience import TINY, _env  # noqa: E402


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _steps_logged(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if "loss" in line]


def _dead_pid():
    """A PID that no process has now (a child that has exited and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run") / "run")
    assert train_main(TINY + ["--steps", "3", "--ckpt-every", "1", "--out", run]) == 0
    return run


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------
# Lost work: the run directory
# ---------------------------------------------------------------------------------------------


def test_a_fresh_run_into_a_finished_run_is_refused_and_overwrite_is_explicit(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    before = {n: _bytes(os.path.join(run, n)) for n in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl")}
    with pytest.raises(SystemExit) as e:
        train_main(TINY + ["--steps", "2", "--out", run])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {n: _bytes(os.path.join(run, n)) for n in before} == before
    # --resume together with --overwrite is a contradiction, refused as such
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "2", "--out", run, "--resume", "--overwrite"])
    assert "pass one of them" in capsys.readouterr().err
    # --overwrite: the old run's files go, and the log holds this run's steps only
    assert train_main(TINY + ["--steps", "2", "--ckpt-every", "1", "--out", run, "--overwrite"]) == 0
    assert _steps_logged(run) == [1, 2]
    assert load_checkpoint(run)["step"] == 2 and load_checkpoint(previous_path(os.path.join(run, "checkpoint.pt")))["step"] == 1


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    before = _bytes(os.path.join(run, "checkpoint.pt"))
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "2", "--out", run, "--overwrite", "--data", str(tmp_path / "nowhere")])
    assert "does not exist" in capsys.readouterr().err
    assert _bytes(os.path.join(run, "checkpoint.pt")) == before


def test_a_metrics_log_without_a_checkpoint_is_not_mixed_into_a_new_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    log = '{"step": 1, "loss": 1}\n{"step": 2, "loss": 1}\n{"step": 3, "lo'
    (run / "metrics.jsonl").write_text(log)
    # A run killed before its first checkpoint: a new run without a word would truncate its log.
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "1", "--out", str(run)])
    assert (run / "metrics.jsonl").read_text() == log
    # --resume continues it from step 0 (nothing was saved): the unsaved steps are redone, their
    # lines replaced, not mixed with the new ones.
    assert train_main(TINY + ["--steps", "1", "--out", str(run), "--resume"]) == 0
    assert _steps_logged(str(run)) == [1]


_HOLDER = textwrap.dedent("""
    import sys, time
    from lavae_fast.checkpoint import lock_run_directory
    lock = lock_run_directory(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_run_directory_is_owned_by_one_process_and_sigkill_releases_it(tmp_path, capsys):
    run = str(tmp_path / "run")
    os.makedirs(run)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, run], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            train_main(TINY + ["--steps", "1", "--out", run])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "in use by another process" in err and f"pid {holder.pid}" in err
        assert not os.path.exists(os.path.join(run, "metrics.jsonl"))  # the refused trainer wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the lock with the killed process
    assert train_main(TINY + ["--steps", "1", "--out", run]) == 0


def test_two_trainers_started_together_one_runs_one_is_refused(tmp_path):
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "lavae_fast.train", *TINY, "--steps", "3", "--out", run]
    procs = [subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = [err for rc, err in results if rc == 2][0]
    assert "in use by another process" in refused or "already holds a run" in refused
    assert _steps_logged(run) == [1, 2, 3]  # one run's log, not two interleaved


def test_cleanup_spares_a_live_writers_temporary(tmp_path):
    live = tmp_path / f".tmp-{os.getppid()}-abcd.pt"
    dead = tmp_path / f".tmp-{_dead_pid()}-abcd.pt"
    old_style = tmp_path / ".tmp-k3j4l5.pt"
    for p in (live, dead, old_style):
        p.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(str(tmp_path))) == sorted([dead.name, old_style.name])
    assert live.exists()


def test_checkpoint_temporaries_are_named_after_their_writer(tmp_path, monkeypatch):
    import tempfile

    seen = []
    real = tempfile.mkstemp

    def spy(*a, **k):
        fd, path = real(*a, **k)
        seen.append(os.path.basename(path))
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    save_checkpoint(str(tmp_path / "checkpoint.pt"), {"step": 1, "model": {}})
    assert seen and seen[0].startswith(f".tmp-{os.getpid()}-") and seen[0].endswith(".pt")


@pytest.mark.parametrize("make,needle", [
    (lambda run: os.makedirs(os.path.join(run, "checkpoint.pt")), "checkpoint.pt exists and is not a file"),
    (lambda run: os.makedirs(os.path.join(run, "metrics.jsonl")), "metrics.jsonl exists and is not a file"),
    (lambda run: open(os.path.join(run, "tb"), "w").close(), "tb exists and is not a directory"),
])
def test_output_paths_are_checked_before_any_step(tmp_path, capsys, make, needle):
    run = str(tmp_path / "run")
    os.makedirs(run)
    make(run)
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        train_main(TINY + ["--steps", "1000", "--out", run])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert time.time() - t0 < 10  # refused up front, not after the steps up to the first save


@pytest.mark.parametrize("out,needle", [("", "--out is empty"), ("FILE", "exists and is not a directory")])
def test_out_that_is_a_file_or_empty_is_refused(tmp_path, capsys, out, needle):
    if out == "FILE":
        out = str(tmp_path / "file")
        open(out, "w").close()
    with pytest.raises(SystemExit) as e:
        train_main(TINY + ["--steps", "1", "--out", out])
    assert e.value.code == 2 and needle in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Interrupts
# ---------------------------------------------------------------------------------------------


def _wait_for_step(run, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = os.path.join(run, "metrics.jsonl")
        if os.path.exists(path) and len([1 for line in open(path) if line.endswith("\n")]) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_save_a_checkpoint_and_exit_with_128_plus_the_signal(tmp_path, sig, code):
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "lavae_fast.train", *TINY, "--steps", "1000", "--ckpt-every", "500", "--out", run]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name}" in err
    ckpt = load_checkpoint(run)
    # the checkpoint is at the last step taken (the log's), not at the last --ckpt-every multiple
    assert ckpt["step"] == _steps_logged(run)[-1] >= 2
    # and it is the state an uninterrupted run has at that step
    ref = str(tmp_path / "ref")
    assert train_main(TINY + ["--steps", "1000", "--stop-at", str(ckpt["step"]), "--out", ref]) == 0
    want = load_checkpoint(ref)
    for k in want["model"]:
        assert torch.equal(ckpt["model"][k], want["model"][k]), k


_RANK = textwrap.dedent("""
    import os, sys
    import lavae_fast.train as T
    sys.exit(T.main(sys.argv[1:]))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_distributed_training_every_rank_stops_at_the_same_step(tmp_path):
    run = str(tmp_path / "run")
    port = _free_port()
    args = [*TINY, "--batch-size", "8", "--steps", "1000", "--ckpt-every", "500", "--out", run]
    procs = []
    for rank in range(2):
        env = _env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, *args], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _wait_for_step(run, 2, procs[0])
        procs[1].send_signal(signal.SIGTERM)  # only rank 1 is told: a node being preempted
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143, 143], [e for _, e in outs]
    assert load_checkpoint(run)["step"] == _steps_logged(run)[-1]


# ---------------------------------------------------------------------------------------------
# Full disks
# ---------------------------------------------------------------------------------------------


def _in_small_filesystem(size: str, script: str, timeout=240):
    """Run ``script`` (bash) with a fresh ``size`` tmpfs mounted at $FS, in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user/mount namespaces here: {probe.stderr.decode().strip()}")
    mnt = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lavae_fast_fs_{os.getpid()}")
    os.makedirs(mnt, exist_ok=True)
    try:
        wrapped = f"set -u; mount -t tmpfs -o size={size} none {mnt} && export FS={mnt} && cd $FS && {script}"
        return subprocess.run(["unshare", "-rm", "bash", "-c", wrapped], env=_env(), capture_output=True, text=True,
                              timeout=timeout)
    finally:
        os.rmdir(mnt)


def test_checkpoint_writer_turns_torchs_full_disk_error_into_a_clear_one_and_keeps_the_previous(tmp_path,
                                                                                               monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 1, "model": {"w": torch.zeros(3)}})
    save_checkpoint(path, {"step": 2, "model": {"w": torch.ones(3)}})

    def full(obj, f):  # what torch.save raises when the disk fills under its zip writer
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2240 vs 2154")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError, match="the disk looks full.*previous checkpoints .* are kept"):
        save_checkpoint(path, {"step": 3, "model": {"w": torch.full((3,), 2.0)}})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(previous_path(path))["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_training_on_a_full_disk_stops_with_a_message_and_keeps_its_checkpoints(tmp_path):
    # A checkpoint is ~3.5 MB; with .prev kept, the third save needs room for three: 9 MB holds two.
    cmd = " ".join([sys.executable, "-m", "lavae_fast.train", *TINY, "--steps", "6", "--ckpt-every", "1",
                    "--out", "$FS/run"])
    r = _in_small_filesystem("9m", f"{cmd}; echo rc=$?; {sys.executable} -c \"import sys; "
                             "from lavae_fast.checkpoint import load_checkpoint as L; "
                             "print('steps', L(sys.argv[1])['step'], L(sys.argv[2])['step'])\" "
                             "$FS/run/checkpoint.pt $FS/run/checkpoint.prev.pt; ls -a $FS/run")
    assert "rc=1" in r.stdout, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "the disk looks full" in r.stderr and "kept" in r.stderr
    cur, prev = (int(v) for v in r.stdout.split("steps")[1].split()[:2])
    assert cur == prev + 1 and cur >= 1
    assert ".tmp-" not in r.stdout  # no partial temporary left


def _generate_cmd(out, *extra):
    return " ".join([sys.executable, "-m", "lavae_fast.data", "generate", "--dataset", "multi-dsprites", "--out",
                     out, "--canvas", "32", "--n-test7", "0", "--no-progress", *extra])


def test_generation_on_a_full_disk_is_a_clear_error_that_leaves_no_partial_set_and_keeps_the_old_one(tmp_path):
    small = _generate_cmd("$FS/d", "--n-train", "200", "--n-test", "10")
    big = _generate_cmd("$FS/d", "--n-train", "20000", "--n-test", "10", "--overwrite")
    fresh = _generate_cmd("$FS/e", "--n-train", "20000", "--n-test", "10")
    show = f"{sys.executable} -c \"import sys; from lavae_fast.data import MultiObjectDataset as M; print('old set', len(M(sys.argv[1], 'train', verify=True)))\" $FS/d"
    r = _in_small_filesystem("400k", f"{small} && {big}; echo rc=$?; {fresh}; echo rc=$?; {show}; ls -a $FS $FS/d")
    assert r.stdout.count("rc=1") == 2, (r.stdout, r.stderr)  # no Bus error (rc 135)
    assert "Traceback" not in r.stderr and "not enough disk space" in r.stderr
    assert "old set 200" in r.stdout  # the replaced set is intact and verifies
    listing = r.stdout.split("old set 200")[1]
    assert ".tmp-" not in listing and ".new-" not in listing and " e\n" not in listing


# ---------------------------------------------------------------------------------------------
# Lost data: data generate --overwrite
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sets") / "d4")
    data.generate("multi-dsprites", root, n_train=24, n_test=8, n_test7=0, seed=4, canvas=(32, 32), progress=False)
    return root


def _snapshot(root):
    return {n: _bytes(os.path.join(root, n)) for n in sorted(os.listdir(root))}


@pytest.mark.parametrize("extra,needle", [
    (["--canvas", "8"], "does not fit"),
    (["--dataset", "multi-mnist-1k", "--mnist-dir", "/nonexistent/mnist"], "mnist"),
])
def test_overwrite_with_bad_settings_keeps_the_old_set(small_set, tmp_path, capsys, extra, needle):
    root = _copy(small_set, tmp_path / "d")
    before = _snapshot(root)
    argv = ["generate", "--dataset", "multi-dsprites", "--out", root, "--n-train", "8", "--no-progress",
            "--overwrite", *extra]
    assert data_main(argv) == 1
    assert needle in capsys.readouterr().err.lower()
    assert _snapshot(root) == before


def test_overwrite_swaps_in_the_new_set_and_keeps_a_users_own_files(small_set, tmp_path):
    root = _copy(small_set, tmp_path / "d")
    (tmp_path / "d" / "notes.txt").write_text("mine")
    data.generate("multi-dsprites", root, n_train=12, n_test=4, n_test7=0, seed=5, canvas=(32, 32), progress=False,
                  overwrite=True)
    assert len(data.MultiObjectDataset(root, "train", verify=True)) == 12
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no staging directory left


def test_stale_temporary_cleanup_matches_only_the_generators_names(tmp_path):
    dead = _dead_pid()
    mine = ["results.tmp-4000000", f"notes.tmp-{dead}", f"train.images.npy.tmp-{os.getppid()}"]
    stale = [f"train.images.npy.tmp-{dead}", f"meta.json.tmp-{dead}", f"pool_source_indices.npy.tmp-{dead}"]
    for n in mine + stale:
        (tmp_path / n).write_bytes(b"x")
    assert sorted(storage.remove_stale_temporaries(str(tmp_path))) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(mine)


# ---------------------------------------------------------------------------------------------
# Silently wrong: data identity
# ---------------------------------------------------------------------------------------------


def _train_on(root, out, *extra, steps=1):
    return train_main(TINY + ["--steps", str(steps), "--data", root, "--out", out, *extra])


def test_resume_compares_the_data_sets_content_not_its_path(small_set, tmp_path, capsys, monkeypatch):
    root = _copy(small_set, tmp_path / "d4")
    run = str(tmp_path / "run")
    assert _train_on(root, run, steps=3, *["--stop-at", "1"]) == 0
    # the same set spelled another way (relative, with ./) resumes
    monkeypatch.chdir(tmp_path)
    assert _train_on(os.path.join(".", "d4", "..", "d4"), run, "--resume", "--stop-at", "2", steps=3) == 0
    assert load_checkpoint(run)["step"] == 2
    # a copy elsewhere (same content) resumes too
    moved = _copy(root, tmp_path / "elsewhere")
    assert _train_on(moved, run, "--resume", "--stop-at", "3", steps=3) == 0
    # the set regenerated in place with another seed is refused
    data.generate("multi-dsprites", root, n_train=24, n_test=8, n_test7=0, seed=9, canvas=(32, 32), progress=False,
                  overwrite=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _train_on(root, run, "--resume", steps=3)
    assert e.value.code == 2
    assert "--resume on different data" in capsys.readouterr().err
    assert load_checkpoint(run)["step"] == 3


@pytest.mark.parametrize("name", ["train.images.npy", "train.counts.npy"])
def test_a_flipped_byte_in_the_training_data_is_refused(small_set, tmp_path, capsys, name):
    root = _copy(small_set, tmp_path / "d")
    path = os.path.join(root, name)
    raw = bytearray(_bytes(path))
    raw[-1] ^= 0x01
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(SystemExit) as e:
        _train_on(root, str(tmp_path / "run"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert name in err and "SHA-256" in err


def test_a_data_set_of_another_name_is_refused(small_set, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "1", "--data", small_set, "--out", str(tmp_path / "run"),
                           "--dataset", "multi-mnist-10k"])
    assert "holds 'multi-dsprites', not --dataset 'multi-mnist-10k'" in capsys.readouterr().err


def test_mnist_1k_set_as_mnist_10k_is_refused(tmp_path, capsys):
    root = str(tmp_path / "mm1k")
    data.generate("multi-mnist-1k", root, n_train=4, n_test=2, n_test7=0, canvas=(32, 32), progress=False)
    with pytest.raises(SystemExit):
        train_main(TINY + ["--steps", "1", "--data", root, "--out", str(tmp_path / "run"),
                           "--dataset", "multi-mnist-10k"])
    assert "holds 'multi-mnist-1k', not --dataset 'multi-mnist-10k'" in capsys.readouterr().err


def test_an_edited_meta_json_is_refused(small_set, tmp_path):
    root = _copy(small_set, tmp_path / "d")
    path = os.path.join(root, "meta.json")
    meta = json.loads(open(path).read())
    meta["width"] = 28  # the same packed byte count: the shape check alone would load cropped images
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(data.DataFormatError, match="edited"):
        data.MultiObjectDataset(root, "train")


def test_an_empty_training_split_is_refused_with_a_message(tmp_path, capsys):
    root = str(tmp_path / "empty")
    assert data_main(["generate", "--dataset", "multi-dsprites", "--out", root, "--n-train", "0", "--n-test", "4",
                      "--n-test7", "0", "--canvas", "32", "--no-progress"]) == 0
    with pytest.raises(SystemExit) as e:
        _train_on(root, str(tmp_path / "run"))
    assert e.value.code == 2 and "the train split holds no images" in capsys.readouterr().err


def test_checksums_are_verified_once_per_process(small_set, tmp_path, monkeypatch):
    root = _copy(small_set, tmp_path / "d")
    calls = []
    real = storage.file_sha256
    monkeypatch.setattr(storage, "file_sha256", lambda p: calls.append(p) or real(p))
    data.MultiObjectDataset(root, "train", verify=True)
    first = len(calls)
    data.MultiObjectDataset(root, "train", verify=True)
    assert first == 4 + len(data.read_meta(root)["labels"]) and len(calls) == first


# ---------------------------------------------------------------------------------------------
# evaluate and figures: output paths, the run's data, the model's input
# ---------------------------------------------------------------------------------------------


def test_evaluate_makes_its_output_folder_first_and_refuses_a_directory(finished_run, tmp_path, capsys):
    from lavae_fast.evaluate import main as eval_main

    out = tmp_path / "nodir" / "x" / "eval.json"
    assert eval_main([finished_run, "--K", "0", "--n-eval", "2", "--splits", "test", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["test"]["images"] == 2
    with pytest.raises(SystemExit, match="is a directory"):
        eval_main([finished_run, "--K", "0", "--n-eval", "2", "--splits", "test", "--out", str(tmp_path)])


def test_evaluate_refuses_data_of_another_shape(finished_run, tmp_path):
    from lavae_fast.evaluate import main as eval_main

    other = str(tmp_path / "wide")
    data.generate("multi-dsprites", other, n_train=2, n_test=2, n_test7=0, canvas=(40, 40), progress=False)
    with pytest.raises(SystemExit, match=r"3×40×40 \(C×H×W\), the model takes 3×32×32"):
        eval_main([finished_run, "--K", "0", "--splits", "test", "--data", other])
    mono = str(tmp_path / "mono")
    data.generate("multi-mnist-1k", mono, n_train=2, n_test=2, n_test7=0, canvas=(32, 32), progress=False)
    with pytest.raises(SystemExit, match=r"1×32×32 \(C×H×W\), the model takes 3×32×32"):
        eval_main([finished_run, "--K", "0", "--splits", "test", "--data", mono])


def test_evaluate_refuses_a_set_of_another_data_set(tmp_path):
    from lavae_fast.evaluate import main as eval_main

    sets = {}
    for name in ("multi-mnist-1k", "multi-mnist-10k"):
        sets[name] = str(tmp_path / name)
        data.generate(name, sets[name], n_train=4, n_test=2, n_test7=0, canvas=(32, 32), progress=False,
                      pool_size=20)
    run = str(tmp_path / "run")
    assert train_main(TINY + ["--steps", "1", "--dataset", "multi-mnist-10k", "--data", sets["multi-mnist-10k"],
                              "--out", run]) == 0
    with pytest.raises(SystemExit, match="the data set is 'multi-mnist-1k', the model was trained on 'multi-mnist-10k'"):
        eval_main([run, "--K", "0", "--splits", "test", "--data", sets["multi-mnist-1k"]])


def test_evaluate_refuses_the_runs_data_set_regenerated_since_training(small_set, tmp_path):
    from lavae_fast.evaluate import main as eval_main

    root = _copy(small_set, tmp_path / "d")
    run = str(tmp_path / "run")
    assert _train_on(root, run) == 0
    data.generate("multi-dsprites", root, n_train=24, n_test=8, n_test7=0, seed=11, canvas=(32, 32), progress=False,
                  overwrite=True)
    with pytest.raises(SystemExit, match="has changed since training"):
        eval_main([run, "--K", "0", "--splits", "test"])
    assert eval_main([run, "--K", "0", "--splits", "test", "--data", root]) == 0  # asked for explicitly


def test_figures_on_a_32x32_run_skip_the_7_object_split_with_a_message(finished_run, tmp_path, capsys):
    from lavae_fast.figures import main as fig_main

    out = tmp_path / "figs"
    assert fig_main([finished_run, "--out", str(out), "--num", "2"]) == 0
    err = capsys.readouterr().err
    assert "skipped the test7 split" in err and "cannot be placed" in err
    assert (out / "reconstructions_test.png").exists() and (out / "samples.png").exists()
    assert not (out / "reconstructions_test7.png").exists()


def test_figures_when_the_runs_data_is_gone(small_set, tmp_path):
    from lavae_fast.figures import main as fig_main

    root = _copy(small_set, tmp_path / "d")
    run = str(tmp_path / "run")
    assert _train_on(root, run) == 0
    shutil.rmtree(root)
    with pytest.raises(SystemExit, match="data set is gone.*does not exist"):
        fig_main([run, "--out", str(tmp_path / "f")])


def test_figures_refuse_a_lavae_run_as_baseline(finished_run, tmp_path):
    from lavae_fast.figures import main as fig_main

    with pytest.raises(SystemExit, match="--baseline .* holds a lavae model, not the β-VAE baseline"):
        fig_main([finished_run, "--baseline", finished_run, "--out", str(tmp_path / "f")])


# ---------------------------------------------------------------------------------------------
# API: silently wrong values and raw tracebacks
# ---------------------------------------------------------------------------------------------


def _lavae(**kw):
    from lavae_fast.model import LAVAE

    cfg = dict(max_objects=3, latent_size=4, width=4, sprite_width=8)
    cfg.update(kw)
    return LAVAE(1, (8, 8), 5, **cfg)


def _images(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 1, 8, 8, generator=g) > 0.6).float()


@pytest.mark.parametrize("tau", [1e-40, 1e-7, float("inf"), 0.0])
def test_a_tau_too_small_to_compute_is_refused(tau):
    m = _lavae()
    with pytest.raises(ValueError, match="tau must be > 0 and finite, and at least 1e-06"):
        m(_images(), tau=tau)
    out = m(_images(), tau=1e-6)  # the smallest accepted one computes a finite loss and gradient
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("model", ["lavae", "baseline"])
def test_inference_decoding_and_sampling_leave_batch_norm_statistics_alone(model):
    from lavae_fast.baseline import BetaVAE

    m = _lavae() if model == "lavae" else BetaVAE(1, (8, 8), latent_channels=2, width=4)
    m.train()
    m(_images())  # a training step's forward: the statistics are not all at their initial values
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    x = _images(4, seed=1)
    if model == "lavae":
        lat = m.infer(x)
        m.decode(lat)
        m.sample(3, generator=torch.Generator().manual_seed(0))
    else:
        m.reconstruct(x)
        m.sample(3, generator=torch.Generator().manual_seed(0))
    m.log_likelihood(x, K=2)
    assert m.training
    after = {k: v for k, v in m.state_dict().items() if k in before}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kw,match", [
    ({"width": 0}, "width must be >= 1"),
    ({"sprite_width": 0}, "sprite_width must be >= 1"),
    ({"width": 2.5}, "width must be an int"),
    ({"max_objects": 10**9}, "max_objects must be >= 1 and <= 1024"),
    ({"latent_size": True}, "latent_size must be an int"),
])
def test_lavae_refuses_absurd_sizes(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _lavae(**kw)


@pytest.mark.parametrize("S,match", [(10**6 + 1, "sprite_size must be <= 127"), (-3, "sprite_size must be >= 1"),
                                     (5.0, "sprite_size must be an int")])
def test_lavae_refuses_absurd_sprite_sizes(S, match):
    from lavae_fast.model import LAVAE

    with pytest.raises((ValueError, TypeError), match=match):
        LAVAE(1, (8, 8), S, width=4, sprite_width=8, latent_size=4)


def test_baseline_refuses_absurd_sizes():
    from lavae_fast.baseline import BetaVAE

    with pytest.raises(ValueError, match="width must be >= 1"):
        BetaVAE(1, (8, 8), width=0)
    with pytest.raises(ValueError, match="canvas W must be >= 1"):
        BetaVAE(1, (8, 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("model", ["lavae", "baseline"])
def test_half_and_double_images_are_cast_to_the_models_float32(dtype, model):
    from lavae_fast.baseline import BetaVAE

    m = (_lavae() if model == "lavae" else BetaVAE(1, (8, 8), latent_channels=2, width=4)).eval()
    x = _images()
    g = torch.Generator().manual_seed(3)
    ll32 = m.log_likelihood(x, K=2, generator=g)
    g = torch.Generator().manual_seed(3)
    ll = m.log_likelihood(x.to(dtype), K=2, generator=g)  # images in {0,1}: the cast is exact
    assert ll.dtype == torch.float32 and torch.equal(ll, ll32)
    if model == "lavae":
        assert torch.equal(m.infer(x.to(dtype)).index, m.infer(x).index)
    assert torch.isfinite(m(x.to(dtype)).loss)


@pytest.mark.parametrize("model", ["lavae", "baseline"])
@pytest.mark.parametrize("kw,match", [({"chunk": 0}, "chunk must be >= 1"), ({"chunk": -1}, "chunk must be >= 1"),
                                      ({"K": 2.5}, "K must be an int"), ({"K": 0}, "K must be >= 1")])
def test_log_likelihood_refuses_bad_k_and_chunk(model, kw, match):
    from lavae_fast.baseline import BetaVAE

    m = _lavae() if model == "lavae" else BetaVAE(1, (8, 8), latent_channels=2, width=4)
    with pytest.raises((ValueError, TypeError), match=match):
        m.log_likelihood(_images(), **kw)


def test_decode_takes_int32_indices_and_refuses_out_of_range_ones():
    from dataclasses import replace

    m = _lavae().eval()
    lat = m.infer(_images())
    lat = replace(lat, n=torch.tensor([2, 1]), index=torch.tensor([[3, 60, -1], [5, -1, -1]]))
    want = m.decode(lat)
    got = m.decode(replace(lat, n=lat.n.int(), index=lat.index.int()))
    assert torch.equal(got, want)
    for index, match in ((torch.tensor([[3, 64, -1], [5, -1, -1]]), r"index must lie in \[-1, 63\]"),
                         (torch.tensor([[3, -2, -1], [5, -1, -1]]), r"index must lie in \[-1, 63\]"),
                         (torch.tensor([[3, -1, -1], [5, -1, -1]]), "first n slots need locations"),
                         (torch.tensor([[3.0, 1, -1], [5, -1, -1]]), "must be an integer tensor")):
        with pytest.raises((ValueError, TypeError), match=match):
            m.decode(replace(lat, index=index))
    with pytest.raises(ValueError, match=r"n must lie in \[0, 3\]"):
        m.decode(replace(lat, n=torch.tensor([4, 1])))


def test_gumbel_topk_refuses_a_max_objects_beyond_its_limit():
    from lavae_fast import ops

    logits, g = torch.zeros(2, 16), torch.zeros(2, 16)
    with pytest.raises(ValueError, match="max_objects must be <= 1024"):
        ops.gumbel_topk_relaxed(logits, torch.tensor([1, 2]), 0.5, 10**9, g)
    index, relaxed, _ = ops.gumbel_topk_relaxed(logits, torch.tensor([1, 2]), 0.5, ops.MAX_OBJECTS, g)
    assert relaxed.shape == (2, ops.MAX_OBJECTS, 16)


def test_a_negative_learning_rate_in_scientific_notation_reaches_the_validator(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(TINY + ["--steps", "1", "--out", str(tmp_path / "r"), "--lr", "-1e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --lr: must be a positive finite number, got -1e-3" in err and "expected one argument" not in err
    assert not os.path.exists(tmp_path / "r")


def test_sigterm_during_an_overwrite_keeps_the_old_set_and_leaves_nothing_behind(small_set, tmp_path):
    root = _copy(small_set, tmp_path / "d")
    before = _snapshot(root)
    cmd = [sys.executable, "-m", "lavae_fast.data", "generate", "--dataset", "multi-dsprites", "--out", root,
           "--n-train", "200000", "--n-test", "10", "--n-test7", "0", "--canvas", "32", "--no-progress",
           "--overwrite"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = tmp_path / f".d.new-{proc.pid}"
    deadline = time.time() + 120
    while not staging.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert staging.exists(), proc.communicate()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err and "terminated (SIGTERM)" in err
    assert _snapshot(root) == before
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_figures_refuse_an_output_that_is_a_file(finished_run, tmp_path):
    from lavae_fast.figures import main as fig_main

    f = tmp_path / "f"
    f.write_text("mine")
    with pytest.raises(SystemExit, match="exists and is not a directory"):
        fig_main([finished_run, "--out", str(f)])
    assert f.read_text() == "mine"


def test_overwrite_through_a_symlink_keeps_the_link(small_set, tmp_path):
    root = _copy(small_set, tmp_path / "real")
    os.symlink(root, tmp_path / "link")
    data.generate("multi-dsprites", str(tmp_path / "link"), n_train=12, n_test=4, n_test7=0, seed=5,
                  canvas=(32, 32), progress=False, overwrite=True)
    assert os.path.islink(tmp_path / "link") and os.path.realpath(tmp_path / "link") == os.path.realpath(root)
    assert len(data.MultiObjectDataset(root, "train", verify=True)) == 12
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
