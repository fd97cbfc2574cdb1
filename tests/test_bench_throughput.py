"""Smoke tests of bench/throughput.py: it runs, and its JSON has the documented records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "throughput.py")


def _run(tmp_path, *args):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, SCRIPT, "--quick", "--threads", "1", "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_scaling_section_writes_records(tmp_path):
    data, stdout = _run(tmp_path, "--only", "scaling")
    assert {"environment", "rows", "targets"} <= set(data)
    env = data["environment"]
    assert env["torch_threads"] == 1 and env["sgemm_gflops"] > 0
    rows = data["rows"]
    assert rows and all({"op", "pass", "impl", "C", "median_ms", "p20_ms", "p80_ms"} <= set(r) for r in rows)
    assert all(r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows)
    assert {r["scaling"] for r in rows} == {"canvas", "objects"}
    assert "FLOP bound" in stdout and "sgemm" in stdout


def test_bench_rejects_unknown_section(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--only", "nope"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "unknown section" in proc.stderr


@pytest.mark.slow
def test_bench_quick_ops_section(tmp_path):
    data, stdout = _run(tmp_path, "--only", "ops")
    ops = {(r["op"], r["pass"], r["impl"]) for r in data["rows"]}
    for op in ["place_and_loglik", "gumbel_topk_relaxed", "gather_appearance"]:
        for pas in ["fwd", "fwd+bwd"]:
            assert (op, pas, "fused") in ops and (op, pas, "reference") in ops
    assert ("count_objects", "fwd", "fused") in ops
    assert len(data["targets"]) >= 6 and all(isinstance(t["pass"], bool) for t in data["targets"])
    assert "PASS" in stdout or "FAIL" in stdout
    # the exclusion-window rows, the reference with the same window as the fused op
    for op in ["gumbel_topk_relaxed[w=5]", "gumbel_topk_relaxed[B=16,n=0-3]", "gumbel_topk_relaxed[B=16,n=0-3,w=5]"]:
        for pas in ["fwd", "fwd+bwd"]:
            assert (op, pas, "fused") in ops and (op, pas, "reference") in ops
        assert any(t["target"].startswith(op + " fwd+bwd") and ">= 10x" in t["target"] for t in data["targets"])
    assert all(r["agreement"]["index_equal"] for r in data["rows"] if r["op"].startswith("gumbel_topk_relaxed["))


@pytest.mark.slow
def test_bench_quick_step_and_eval_sections(tmp_path):
    data, stdout = _run(tmp_path, "--only", "step,eval")
    steps = {r["impl"]: r for r in data["rows"] if r["pass"] == "step"}
    assert {"eager", "default", "compile", "bf16+compile"} <= set(steps)
    assert all(r["images_per_s"] > 0 and r["step_gflop"] > 100 for r in steps.values())
    assert all("compile_s" in r for k, r in steps.items() if "compile" in k)
    evals = {r["impl"] for r in data["rows"] if r["pass"] == "eval"}
    assert evals == {"eager", "default"}
    names = " ".join(t["target"] for t in data["targets"])
    assert "training step" in names and "evaluation" in names
    assert "ceiling" in stdout


@pytest.mark.slow
def test_bench_quick_gumbel_section(tmp_path):
    """``--only gumbel`` at the real shapes: windows 1 and 5 at B = 64 and at the training shape
    (B = 16, n in 0..3), with the machine's load average and ISA in the record."""
    data, stdout = _run(tmp_path, "--only", "gumbel")
    rows = data["rows"]
    got = {(r["B"], r["window"], r["counts"], r["pass"], r["impl"]) for r in rows}
    want = {(b, w, c, p, i) for b, w, c in [(64, 1, "all"), (64, 5, "all"), (16, 1, "0-3"), (16, 5, "0-3")]
            for p in ("fwd", "fwd+bwd") for i in ("fused", "reference")}
    assert got == want
    assert all(r["median_ms"] > 0 and r["agreement"]["index_equal"] for r in rows)
    assert sum(">= 10x" in t["target"] for t in data["targets"]) == 4
    env = data["environment"]
    assert env["load_average_start"] and env["load_average_end"] and env["torch_cpu_capability"]
    assert "load average" in stdout and "ISA:" in stdout


def _throughput_module():
    sys.path.insert(0, ROOT)
    try:
        from bench import throughput
    finally:
        sys.path.remove(ROOT)
    return throughput


def test_gumbel_window_rows_at_tiny_shapes():
    """The exclusion-window rows (bench/throughput.py's gumbel_window_rows), in-process at tiny
    shapes: each case gives fwd and fwd+bwd rows for fused and reference with positive times and
    its own window, distinct names per window, the fused op agreeing with the reference run with
    the same window (draws equal) on inputs where the window moves draws, and a >= 10x target."""
    from types import SimpleNamespace

    import torch

    tp = _throughput_module()
    from bench.common import time_interleaved

    ctx = SimpleNamespace(targets=[], time=lambda fns: time_interleaved(fns, reps=2, warmup=1, budget_s=1.0))
    cases = [(4, 16, True, 1), (4, 16, True, 5), (6, 16, False, 5)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: on a busy machine, waiting for a second thread would dominate
    try:
        rows = tp.gumbel_window_rows(ctx, cases, m=4)
    finally:
        torch.set_num_threads(threads)
    names = [tp.gumbel_op_name(b, side, tc, w, 4) for b, side, tc, w in cases]
    assert len(set(names)) == 3 and names[1] == "gumbel_topk_relaxed[B=4,16x16,M=4,n=0-3,w=5]"
    assert len(rows) == 3 * 2 * 2
    for (b, side, tc, w), name in zip(cases, names):
        mine = [r for r in rows if r["op"] == name]
        assert {(r["pass"], r["impl"]) for r in mine} == {(p, i) for p in ("fwd", "fwd+bwd")
                                                          for i in ("fused", "reference")}
        assert all(r["window"] == w and r["B"] == b and r["D"] == side * side and r["median_ms"] > 0
                   and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["load_average"] for r in mine)
        agree = mine[0]["agreement"]
        assert agree["index_equal"] and agree["log_q_maxdiff"] < 1e-4 and agree["grad_maxdiff"] < 1e-4
        if w > 1:
            # the timed inputs are ones where the window changes the draws, so a pair run at
            # different windows would show up as index_equal = False
            assert agree["draws_moved_by_window"] > 0
    assert len(ctx.targets) == 3
    assert all(">= 10x" in d and isinstance(ok, bool) for d, ok, _ in ctx.targets)
    # the default cases: both windows at the training shape of the 64×64 model, window 5 at B = 64
    assert [tp.gumbel_op_name(*c) for c in tp.GUMBEL_WINDOW_CASES] == [
        "gumbel_topk_relaxed[w=5]", "gumbel_topk_relaxed[B=16,n=0-3]", "gumbel_topk_relaxed[B=16,n=0-3,w=5]"]
    assert tp.gumbel_op_name(64, 64, False, 1) == "gumbel_topk_relaxed"
    assert tp.GUMBEL_WINDOW_CASES[1:] == [(16, 64, True, 1), (16, 64, True, 5)]


def test_gumbel_iid_inputs_are_the_ops_sections():
    """The gumbel section's window-1 row at B = 64 times the ops section's inputs (seed 1, the same
    draws from the generator in the same order)."""
    import math

    import torch

    tp = _throughput_module()
    logits, gumbel, n, w_r, w_q = tp.gumbel_inputs(tp.B, tp.H, tp.M, False)
    g = torch.Generator().manual_seed(1)
    D = tp.H * tp.W
    assert torch.equal(logits, torch.randn(tp.B, D, generator=g) * (0.5 * math.log(D)))
    assert torch.equal(gumbel, -torch.log(-torch.log(torch.rand(tp.B, D, generator=g).clamp(1e-12, 1 - 1e-12))))
    assert torch.equal(n, torch.full((tp.B,), tp.M))
    assert torch.equal(w_r, torch.randn(tp.B, tp.M, D, generator=g))
    assert torch.equal(w_q, torch.randn(tp.B, generator=g))
    peaks = tp.gumbel_inputs(16, 64, tp.M, True, field="peaks")
    assert 0 <= int(peaks[2].min()) and int(peaks[2].max()) <= 3


def _training_step_module():
    sys.path.insert(0, ROOT)
    try:
        from bench import training_step
    finally:
        sys.path.remove(ROOT)
    return training_step


def test_profile_categories_sum_and_first_match():
    ts = _training_step_module()
    names = {"aten.convolution_backward.default": 5.0, "aten.convolution.default": 2.0,
             "lavae_fast.gather_appearance_backward.default": 1.5, "lavae_fast.lrelu_batch_norm.default": 0.25,
             "aten.add.Tensor": 1.0, "aten.add_.Tensor": 0.5, "aten.nonsense.default": 3.0}
    cats = ts.profile_categories(names)
    assert cats["convolutions"] == 7.0
    assert cats["appearance gather (fused)"] == 1.5
    assert cats["Leaky ReLU + batch norm (fused)"] == 0.25
    assert cats["elementwise (incl. autograd's gradient sums)"] == 1.5
    assert cats["other operators"] == 3.0
    assert abs(sum(cats.values()) - sum(names.values())) < 1e-12


def test_op_timer_sees_forward_and_backward_operators():
    import torch

    ts = _training_step_module()
    conv = torch.nn.Conv2d(2, 3, 3)
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    timer = ts._OpTimer()
    with timer:
        conv(x).sum().backward()
    assert timer.calls["aten.convolution.default"] == 1
    assert timer.calls["aten.convolution_backward.default"] == 1
    assert all(ms >= 0 for ms in timer.ms.values()) and set(timer.ms) == set(timer.calls)


@pytest.mark.slow
def test_bench_quick_profile_section(tmp_path):
    data, stdout = _run(tmp_path, "--only", "profile")
    prof = data["profile"]
    assert set(prof["phase_ms"]) == {"forward", "backward", "optimizer"}
    cats = prof["category_ms"]
    assert cats["convolutions"] > 0 and cats["Leaky ReLU + batch norm (fused)"] > 0
    assert cats["appearance gather (fused)"] > 0
    assert "operator time by category" in stdout
