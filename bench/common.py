"""Shared helpers for the CPU benchmarks: interleaved timing, machine description, sgemm rate."""

from __future__ import annotations

import gc
import glob
import os
import platform
import sys
import time

import torch

BUILD_HINT = ("install it (bash scripts/install.sh, or pip install --no-build-isolation .) or, in a source "
              "checkout, build it in place (python setup.py build_ext --inplace)")


def use_engine(root: str, require_cpu_kernels: bool = True):
    """Import the lavae_fast whose kernels the benchmark should measure, and return it.

    A source checkout with the C++ extension built in place (``python setup.py build_ext
    --inplace``) comes first, so a developer measures the code in front of them; otherwise the
    installed package (what ``bash scripts/install.sh`` built), not the source folder, which has no
    ``_C`` after a plain install and would time the PyTorch fallback under the name "fused". With
    ``require_cpu_kernels`` and no C++ kernels either way, exit with a message saying how to build.
    """
    if glob.glob(os.path.join(root, "lavae_fast", "_C*.so")) or glob.glob(os.path.join(root, "lavae_fast", "_C*.pyd")):
        sys.path.insert(0, root)
    elif root not in sys.path:
        sys.path.append(root)
    import lavae_fast
    from lavae_fast import _backends

    if require_cpu_kernels and not _backends.load_cpu_kernels():
        sys.exit(f"{os.path.basename(sys.argv[0])}: lavae_fast at {os.path.dirname(lavae_fast.__file__)} has no C++ "
                 f"kernels ({_backends.cpu_kernels_error}), so there is nothing to measure against the reference; "
                 f"{BUILD_HINT}.")
    return lavae_fast


def percentile(sorted_values, q):
    """The q-quantile (0..1) of an already sorted list, linearly interpolated."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_interleaved(fns: dict, reps: int = 20, warmup: int = 2, budget_s: float = 20.0) -> dict:
    """Time several callables round-robin: one call of each per round, `reps` rounds at most.

    Interleaving puts every implementation under the same machine load at the same moments
    (the benchmark machine is shared), so their ratio is far steadier than back-to-back runs.
    Stops early after `budget_s` seconds (at least 3 rounds). Python's cyclic garbage collector
    is paused while timing, as `timeit` does: otherwise a collection triggered by one
    implementation's allocations lands in whichever call happens to run next. Returns
    name -> dict(median_ms, p20_ms, p80_ms, reps).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for r in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
            if r >= 2 and time.perf_counter() - start > budget_s:
                break
    finally:
        if was_enabled:
            gc.enable()
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = {"median_ms": percentile(ts, 0.5), "p20_ms": percentile(ts, 0.2),
                     "p80_ms": percentile(ts, 0.8), "reps": len(ts)}
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The CPU flags that decide which kernels run and how fast: vector width (AVX2, AVX-512), and
# whether bf16 arithmetic is native (AVX-512-BF16, AMX) or emulated (~9x slower than float32).
RELEVANT_FLAGS = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
                  "amx_bf16"]


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return " ".join(f for f in RELEVANT_FLAGS if f in flags)
    except OSError:
        pass
    return ""


def bf16_native() -> str:
    """"yes"/"no" and why: whether this CPU computes bf16 natively (lavae_fast.performance decides)."""
    from lavae_fast import performance

    native, reason = performance.bf16_native("cpu")
    return f"{'yes' if native else 'no'} ({reason})"


# Settings that cap the instruction set of PyTorch's kernels (ATen, oneDNN, MKL) or ours: a run
# that imitates an AVX2 machine on an AVX-512 one sets them, and its figures must say so.
ISA_CAPS = ["LAVAE_FAST_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
            "MKL_ENABLE_INSTRUCTIONS"]


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def environment() -> dict:
    import numpy

    from lavae_fast import _backends

    return {
        "machine": platform.node(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernels": _backends.cpu_capability(),
        "bf16_native": bf16_native(),
        "isa_caps": {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)},
        "lavae_fast": os.path.dirname(__import__("lavae_fast").__file__),
        "backends": _backends.describe(),
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "load_average_start": load_average(),
    }


def sgemm_rate(n: int = 2048, reps: int = 7) -> float:
    """float32 matmul rate of this machine (FLOP/s) with the current thread count: the yardstick
    for compute-bound kernels, measured in the same run as they are."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    res = time_interleaved({"mm": lambda: torch.mm(a, b, out=c)}, reps=reps, warmup=2, budget_s=10)
    return 2 * n**3 / (res["mm"]["median_ms"] * 1e-3)
