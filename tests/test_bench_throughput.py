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
