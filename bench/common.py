"""Shared helpers for the CPU benchmarks: interleaved timing, machine description, sgemm rate."""

from __future__ import annotations

import gc
import os
import platform
import time

import torch


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


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return " ".join(f for f in ["avx2", "fma", "avx512f", "avx512bw", "avx512vl"] if f in flags)
    except OSError:
        pass
    return ""


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
