"""The Triton kernels, checked without a GPU.

The kernels themselves run under TRITON_INTERPRET=1, which must be set before triton is
imported: ``test_interpreted_suite`` runs ``tests/triton_interpret`` (and ``tests/test_cuda.py``
on CPU tensors at small shapes) in a fresh process with it, and with the C++ CPU kernels
disabled, so that the Triton launchers serve the ops' CPU tensors.
The other tests here check the contract between the launchers and the op schemas in-process.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements.txt)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interpreted_suite():
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["LAVAE_FAST_DISABLE_EXTENSION"] = "1"
    # The subprocess tests the Triton launchers, not the C++ extension this variable guards.
    env.pop("LAVAE_FAST_REQUIRE_EXT", None)
    # tests/test_cuda.py too, on CPU tensors with small shapes, so that it cannot rot unseen on
    # machines without a GPU.
    env["LAVAE_FAST_CUDA_TESTS_DEVICE"] = "cpu"
    cmd = [sys.executable, "-P", "-m", "pytest", "tests/triton_interpret", "tests/test_cuda.py", "-q",
           "-p", "no:cacheprovider"]
    # -P: import the same lavae_fast as this process (installed or editable), not ./lavae_fast.
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreted Triton suite failed (exit {proc.returncode}):\n{out[-20000:]}"
    # Guard against a run that collected nothing (exit 5 is already a failure above).
    assert " passed" in out and " failed" not in out, out[-5000:]


def test_launchers_match_op_schemas():
    from lavae_fast import _backends, ops  # noqa: F401  (ops defines the schemas)

    LAUNCHERS = _backends.kernels_package().LAUNCHERS

    for name, fn in LAUNCHERS.items():
        schema = getattr(torch.ops.lavae_fast, name).default._schema
        expected = [a.name for a in schema.arguments]
        assert list(inspect.signature(fn).parameters) == expected, name


def test_every_op_has_a_launcher():
    import lavae_fast.ops  # noqa: F401
    from lavae_fast import _backends

    LAUNCHERS = _backends.kernels_package().LAUNCHERS

    ops = {
        "place_loglik", "place_loglik_backward", "gumbel_topk_relaxed", "gumbel_topk_relaxed_backward",
        "count_objects", "gather_appearance", "gather_appearance_backward",
    }
    assert set(LAUNCHERS) == ops


def test_testing_entry_point_refuses_without_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the interpreter")
    from lavae_fast import _backends, ops

    testing = _backends.kernels_package("testing")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        testing.register_interpreter_kernels(ops.register_triton_kernels)


def test_cuda_registration_follows_the_device():
    from lavae_fast import _backends

    if torch.cuda.is_available():
        assert _backends.triton_kernels_loaded, _backends.triton_kernels_error
    else:
        assert not _backends.triton_kernels_loaded
        assert "no CUDA" in (_backends.triton_kernels_error or "")


def test_gpu_bench_closures_run_on_cpu(monkeypatch):
    # bench/gpu_bench.py only runs on a GPU; its op closures, byte counts and report are checked
    # here on CPU tensors with a timer that calls each function once.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gpu_bench
    finally:
        sys.path.pop(0)
    from lavae_fast import ops, reference

    calls = []

    def fake_time(fn, warmup_ms, rep_ms):
        fn()
        calls.append(fn)
        return 2.0, 1.0, 3.0

    monkeypatch.setattr(gpu_bench, "_time", fake_time)
    t = gpu_bench._inputs(2, 1, device="cpu")
    rows = []
    for op in gpu_bench.OPS:
        for pas in gpu_bench.PASSES:
            for name, mod in (("reference", reference), ("triton", ops)):
                timing = gpu_bench._measure(op, pas, name, mod, t, 1, 1)
                if timing is not None:
                    nbytes = gpu_bench._bytes(op, pas, t)
                    assert nbytes > 0
                    rows.append({"op": op, "pass": pas, "impl": name, "C": 1, "B": 2, "median_ms": 2.0,
                                 "p20_ms": 1.0, "p80_ms": 3.0, "gbps": nbytes / 2e-3 / 1e9, "frac_peak": 0.5,
                                 "peak_gbps": 1.0, "peak_source": "given", "speedup_vs_reference": 1.0, "error": None})
    assert len(rows) == 2 * (5 * 3 + 1)  # count_objects has no backward
    fake_time(gpu_bench._train_step(ops, t), 1, 1)
    assert "place_index" in gpu_bench.format_table(rows)
    assert any("target" in line for line in gpu_bench.targets(rows))


def _ptxas_available():
    if os.environ.get("TRITON_PTXAS_PATH"):
        return True
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled (not interpreted) kernels")
@pytest.mark.skipif(not _ptxas_available(), reason="triton's ptxas is missing: cannot compile for a GPU target")
def test_every_kernel_compiles_for_sm90_without_spills():
    # The interpreter cannot see compile errors or register spills; Triton's own ptxas can, on a
    # machine without a GPU. Every specialization the launchers take at the model's shapes
    # (64×64, M = 10, C = 1 with S = 17 and C = 3 with S = 21, K = 64; float32 and float64).
    sys.path.insert(0, os.path.join(ROOT, "tests", "triton_interpret"))
    try:
        from triton_cases import gumbel_case, one_hot_maps, place_case
    finally:
        sys.path.pop(0)
    from triton.runtime.jit import JITFunction

    from lavae_fast import _backends

    kernels = _backends.kernels_package()
    L, testing = kernels.LAUNCHERS, _backends.kernels_package("testing")
    count, gather, gumbel, place = kernels.count, kernels.gather, kernels.gumbel, kernels.place

    H = W = 64
    records = []
    for dt in (torch.float32, torch.float64):
        for C, S in ((1, 17), (3, 21)):
            x, sprites, n, index = place_case(2, 10, C, S, H, W, dtype=dt)
            loc = one_hot_maps(index, H, W, dt)
            canvas = torch.zeros(2, C, H, W, dtype=dt)
            for idx in (index, None):
                records += testing.record_launches(L["place_loglik"], x, sprites, loc, n, idx, 1e-4)
                records += testing.record_launches(
                    L["place_loglik_backward"], torch.ones(2, dtype=dt), canvas, x, sprites, loc, n, idx, canvas,
                    1e-4, True, True,
                )
        logits, g, n = gumbel_case(2, H * W, 10, dtype=dt)
        relaxed = torch.zeros(2, 10, H * W, dtype=dt)
        records += testing.record_launches(L["gumbel_topk_relaxed"], logits, n, 0.5, 10, g)
        records += testing.record_launches(
            L["gumbel_topk_relaxed_backward"], relaxed, n.to(dt), logits, torch.zeros(2, 10, dtype=torch.long),
            relaxed, n, 0.5,
        )
        for window in (3, 5):  # the default 3×3 counter and the 5×5 one (evaluate --count-window 5)
            records += testing.record_launches(L["count_objects"], logits.view(2, H, W), 1.0, 10, window)
        h_app = torch.zeros(2, 64, H, W, dtype=dt)
        for idx in (index, None):
            records += testing.record_launches(L["gather_appearance"], h_app, loc, n, idx)
            records += testing.record_launches(
                L["gather_appearance_backward"], torch.zeros(2, 10, 64, dtype=dt), h_app, loc, n, idx, True, True
            )
    results = testing.compile_for_target(records, arch=90)
    every_kernel = {
        name for module in (place, gumbel, count, gather)
        for name, obj in vars(module).items() if isinstance(obj, JITFunction) and name.endswith("_kernel")
    }
    assert {name for name, *_ in results} == every_kernel
    spilled = [(name, spec, regs, spill) for name, spec, regs, spill in results if spill]
    assert not spilled, f"register spills: {spilled}"
