"""GPU benchmark of the engine ops: eager reference vs torch.compile(reference) vs Triton.

Run on a machine with CUDA (``bash bench/gpu_check.sh`` runs the CUDA tests first):

    python bench/gpu_bench.py [--batch 1024] [--train-batch 64] [--channels 1 3] [--quick]
                              [--out bench/results] [--peak-gbps 3350]

``bench/throughput.py`` calls :func:`run_gpu_rows` with its own argparse namespace; every
attribute is optional (see :func:`_opt`). Each record has ``op``, ``pass`` (forward / backward /
full), ``impl`` (reference / compiled / triton), ``C``, ``B``, ``median_ms``, ``p20_ms``,
``p80_ms``, ``gbps`` (the op's minimum memory traffic, as documented in each kernel module,
divided by the median time — the same byte count for all three impls, so it compares them) and
``frac_peak`` (gbps over the device's peak bandwidth), plus ``speedup_vs_reference``.

Targets (to be measured on a real GPU; nothing here is a measured figure):
* placement + log-likelihood forward (index mode, the training path) at B = 1024: ≥ 70% of the
  device's peak memory bandwidth;
* the fused training-step ops (Gumbel top-k → appearance gather → placement + log-likelihood,
  forward and backward, B = 64, 64×64, M = 10) ≥ 5× faster than the eager reference.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Theoretical DRAM bandwidth by device name (GB/s). Used unless --peak-gbps is given; unknown
# devices fall back to a measured device-to-device copy (an achievable rather than spec figure).
PEAK_GBPS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-80GB": 1935.0,
    "A100-PCIE-40GB": 1555.0,
    "L40S": 864.0,
    "A10G": 600.0,
    "RTX 4090": 1008.0,
}

TARGET_PLACE_FRAC_PEAK = 0.70
TARGET_TRAIN_SPEEDUP = 5.0

H = W = 64
M = 10
L2 = 64  # 2L appearance features
SPRITE = {1: 17, 3: 21}  # multi-MNIST and multi-dSprites sprite sides
GAMMA = 0.5 * torch.log(torch.tensor(float(H * W))).item()


def _opt(args, name, default):
    value = getattr(args, name, None)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# Timing and bandwidth
# ---------------------------------------------------------------------------------------------


def _time(fn, warmup_ms: int, rep_ms: int):
    """(median, p20, p80) in ms with triton.testing.do_bench (L2 flushed between runs)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def peak_bandwidth(override: float | None = None):
    """(GB/s, where the figure comes from)."""
    if override:
        return float(override), "given"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value, f"spec sheet ({key})"
    # Unknown device: the bandwidth of a large copy (reads + writes).
    a = torch.empty(512 * 2**20 // 4, device="cuda")
    b = torch.empty_like(a)
    med, _, _ = _time(lambda: b.copy_(a), 25, 200)
    return 2 * a.numel() * 4 / (med * 1e-3) / 1e9, "measured copy"


# ---------------------------------------------------------------------------------------------
# Inputs and minimum traffic (bytes), per op: the figures each kernel module documents
# ---------------------------------------------------------------------------------------------


def _one_hot(index, D, dtype):
    oh = torch.nn.functional.one_hot(index.clamp(min=0), D).to(dtype)
    return oh * (index >= 0).to(dtype)[..., None]


def _inputs(B: int, C: int, seed: int = 0, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    D, S = H * W, SPRITE[C]
    dev = dict(device=device, dtype=torch.float32)
    n = torch.randint(0, 4, (B,), generator=g, device=device)  # 0–3 objects, as the data
    logits = torch.randn(B, D, generator=g, **dev) * GAMMA
    u = torch.rand(B, D, generator=g, **dev).clamp(1e-10, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    index = torch.stack([torch.randperm(D, device=device, generator=g)[:M] for _ in range(B)])
    index = torch.where(torch.arange(M, device=device)[None] < n[:, None], index, -1)
    return SimpleNamespace(
        B=B, C=C, S=S, D=D, n=n, index=index,
        x=(torch.rand(B, C, H, W, generator=g, **dev) < 0.2).float(),
        sprites=torch.rand(B, M, C, S, S, generator=g, **dev),
        loc_hard=_one_hot(index, D, torch.float32).view(B, M, H, W),
        loc_soft=torch.softmax(torch.randn(B, M, D, generator=g, **dev) * 3, -1).view(B, M, H, W),
        logits=logits, gumbel=gumbel, h_loc=logits.view(B, H, W),
        h_app=torch.randn(B, L2, H, W, generator=g, **dev),
    )


def _bytes(op: str, pas: str, t) -> float:
    f = 4
    B, C, S, D = t.B, t.C, t.S, t.D
    ntot = float(t.n.sum())
    fwd = bwd = 0.0
    if op.startswith("place"):
        fwd = B * 2 * C * D + ntot * C * S * S + B * M  # x in, Σ out, present sprites, index
        bwd = B * 2 * C * D + B * M * D + B * M * C * S * S + ntot * C * S * S  # x, Σ in; grads out
        if op == "place_dense":
            fwd += ntot * D
            bwd += ntot * D
    elif op == "gumbel_topk":
        fwd = B * (2 * D + M * D + M + 1)
        bwd = 2 * ntot * D + 2 * B * D
    elif op == "count_objects":
        fwd = B * D
    elif op.startswith("gather"):
        fwd = ntot * L2 + B * M * L2 if op == "gather_index" else ntot * D + B * L2 * D + B * M * L2
        bwd = B * M * L2 + B * L2 * D + B * M * D + B * L2 * D + (ntot * D if op == "gather_dense" else 0)
    return f * {"forward": fwd, "backward": bwd, "full": fwd + bwd}[pas]


# ---------------------------------------------------------------------------------------------
# The ops under test, as closures over one set of inputs
# ---------------------------------------------------------------------------------------------


def _impls(compile_reference: bool):
    from lavae_fast import ops, reference

    impls = {"reference": reference, "triton": ops}
    if compile_reference:
        impls["compiled"] = SimpleNamespace(
            place_and_loglik=torch.compile(reference.place_and_loglik, dynamic=False),
            gumbel_topk_relaxed=torch.compile(reference.gumbel_topk_relaxed, dynamic=False),
            count_objects=torch.compile(reference.count_objects, dynamic=False),
            gather_appearance=torch.compile(reference.gather_appearance, dynamic=False),
        )
    return impls


def _op_call(op: str, mod, t, with_grad: bool):
    """A function running the op's forward; with_grad: returns the scalar loss to differentiate."""
    leaves = []

    def leaf(v):
        if with_grad:
            v = v.detach().requires_grad_()
            leaves.append(v)
        return v

    if op in ("place_index", "place_dense"):
        sprites = leaf(t.sprites)
        loc = leaf(t.loc_hard if op == "place_index" else t.loc_soft)
        kw = {"index": t.index} if op == "place_index" else {}
        return (lambda: mod.place_and_loglik(t.x, sprites, loc, t.n, **kw).sum()), leaves
    if op == "gumbel_topk":
        logits = leaf(t.logits)

        def f():
            _, relaxed, log_q = mod.gumbel_topk_relaxed(logits, t.n, 0.5, M, t.gumbel)
            return (relaxed * 0.5).sum() + log_q.sum()

        return f, leaves
    if op == "count_objects":
        return (lambda: mod.count_objects(t.h_loc, 4 * GAMMA, M)), leaves
    if op in ("gather_index", "gather_dense"):
        h_app = leaf(t.h_app)
        loc = leaf(t.loc_hard if op == "gather_index" else t.loc_soft)
        kw = {"index": t.index} if op == "gather_index" else {}
        return (lambda: mod.gather_appearance(h_app, loc, t.n, **kw).square().sum()), leaves
    raise ValueError(op)


def _train_step(mod, t):
    """Gumbel top-k → straight-through maps → gather (index) → place + loglik (index), fwd + bwd."""
    logits = t.logits.detach().requires_grad_()
    h_app = t.h_app.detach().requires_grad_()
    sprites = t.sprites.detach().requires_grad_()

    def step():
        index, relaxed, log_q = mod.gumbel_topk_relaxed(logits, t.n, 0.5, M, t.gumbel)
        z = (_one_hot(index, t.D, relaxed.dtype) - relaxed.detach() + relaxed).view(t.B, M, H, W)
        app = mod.gather_appearance(h_app, z, t.n, index=index)
        ll = mod.place_and_loglik(t.x, sprites, z, t.n, index=index)
        loss = -(ll.sum() + log_q.sum()) + app.square().sum()
        loss.backward()
        logits.grad = h_app.grad = sprites.grad = None

    return step


def _measure(op, pas, impl_name, mod, t, warmup_ms, rep_ms):
    if op == "count_objects" and pas != "forward":
        return None
    if pas == "forward":
        f, _ = _op_call(op, mod, t, with_grad=False)
        with torch.no_grad():
            return _time(f, warmup_ms, rep_ms)
    f, leaves = _op_call(op, mod, t, with_grad=True)
    if pas == "full":

        def full():
            f().backward()
            for v in leaves:
                v.grad = None

        return _time(full, warmup_ms, rep_ms)
    loss = f()

    def backward():
        loss.backward(retain_graph=True)
        for v in leaves:
            v.grad = None

    return _time(backward, warmup_ms, rep_ms)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

OPS = ["place_index", "place_dense", "gumbel_topk", "count_objects", "gather_index", "gather_dense"]
PASSES = ["forward", "backward", "full"]


def run_gpu_rows(args=None) -> list[dict]:
    """Benchmark every op on the GPU; one dict per (op, pass, impl, C).

    Optional attributes of ``args``: ``batch`` (1024), ``train_batch`` (64), ``channels``
    ([1, 3]), ``ops`` (all), ``passes`` (all), ``quick`` (False: True skips torch.compile and
    shortens the timing), ``no_compile`` (False), ``warmup_ms`` (25), ``rep_ms`` (100),
    ``peak_gbps`` (from the device table).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench/gpu_bench.py needs a CUDA device")
    from lavae_fast import _backends

    if not _backends.triton_kernels_loaded:
        raise RuntimeError(f"the Triton kernels are not registered: {_backends.triton_kernels_error}")
    B = int(_opt(args, "batch", 1024))
    train_B = int(_opt(args, "train_batch", 64))
    channels = [int(c) for c in _opt(args, "channels", [1, 3])]
    op_list = list(_opt(args, "ops", OPS))
    passes = list(_opt(args, "passes", PASSES))
    quick = bool(_opt(args, "quick", False))
    compile_ref = not (quick or bool(_opt(args, "no_compile", False)))
    warmup_ms = int(_opt(args, "warmup_ms", 10 if quick else 25))
    rep_ms = int(_opt(args, "rep_ms", 30 if quick else 100))
    peak, peak_src = peak_bandwidth(_opt(args, "peak_gbps", None))
    device = torch.cuda.get_device_name()
    impls = _impls(compile_ref)
    torch.backends.cudnn.allow_tf32 = False  # the reference's convolutions in true float32
    torch.backends.cuda.matmul.allow_tf32 = False

    rows = []

    def record(op, pas, impl, C, batch, timing, nbytes, error=None):
        row = {"op": op, "pass": pas, "impl": impl, "C": C, "B": batch, "device": device,
               "median_ms": None, "p20_ms": None, "p80_ms": None, "gbps": None, "frac_peak": None,
               "peak_gbps": peak, "peak_source": peak_src, "speedup_vs_reference": None, "error": error}
        if timing is not None:
            med, p20, p80 = timing
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80)
            if nbytes:
                row["gbps"] = nbytes / (med * 1e-3) / 1e9
                row["frac_peak"] = row["gbps"] / peak
        rows.append(row)

    for C in channels:
        t = _inputs(B, C)
        for op in op_list:
            if C != channels[0] and not op.startswith("place"):
                continue  # only placement depends on C
            for pas in passes:
                for impl_name, mod in impls.items():
                    try:
                        timing = _measure(op, pas, impl_name, mod, t, warmup_ms, rep_ms)
                    except Exception as exc:  # a compile failure must not lose the other rows
                        record(op, pas, impl_name, C, B, None, 0, error=f"{type(exc).__name__}: {exc}"[:300])
                        continue
                    if timing is not None:
                        record(op, pas, impl_name, C, B, timing, _bytes(op, pas, t))
        del t
        torch.cuda.empty_cache()

        tt = _inputs(train_B, C, seed=1)
        for impl_name, mod in impls.items():
            try:
                timing = _time(_train_step(mod, tt), warmup_ms, rep_ms)
                record("train_step_ops", "full", impl_name, C, train_B, timing, 0)
            except Exception as exc:
                record("train_step_ops", "full", impl_name, C, train_B, None, 0, error=f"{type(exc).__name__}: {exc}"[:300])

    ref = {(r["op"], r["pass"], r["C"]): r["median_ms"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        base = ref.get((r["op"], r["pass"], r["C"]))
        if base and r["median_ms"]:
            r["speedup_vs_reference"] = base / r["median_ms"]
    return rows


def targets(rows) -> list[str]:
    """One line per stated target: met, missed, or not measured."""
    lines = []
    place = [r for r in rows if r["op"] == "place_index" and r["pass"] == "forward" and r["impl"] == "triton"
             and r["frac_peak"] is not None]
    for r in place:
        ok = r["frac_peak"] >= TARGET_PLACE_FRAC_PEAK
        lines.append(
            f"[{'met' if ok else 'MISSED'}] place+loglik forward, C={r['C']}, B={r['B']}: "
            f"{r['frac_peak']:.0%} of peak ({r['gbps']:.0f} of {r['peak_gbps']:.0f} GB/s, {r['peak_source']}); "
            f"target >= {TARGET_PLACE_FRAC_PEAK:.0%}"
        )
    train = [r for r in rows if r["op"] == "train_step_ops" and r["impl"] == "triton" and r["speedup_vs_reference"]]
    for r in train:
        ok = r["speedup_vs_reference"] >= TARGET_TRAIN_SPEEDUP
        lines.append(
            f"[{'met' if ok else 'MISSED'}] training-step ops, C={r['C']}, B={r['B']}: "
            f"{r['speedup_vs_reference']:.1f}x faster than eager; target >= {TARGET_TRAIN_SPEEDUP:.0f}x"
        )
    if not lines:
        lines.append("targets not measured (no Triton rows)")
    return lines


def format_table(rows) -> str:
    head = f"{'op':<15} {'pass':<9} {'impl':<9} {'C':>1} {'B':>5} {'median ms':>10} {'p20':>8} {'p80':>8} {'GB/s':>7} {'peak':>5} {'speedup':>7}"
    out = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            out.append(f"{r['op']:<15} {r['pass']:<9} {r['impl']:<9} {r['C']:>1} {r['B']:>5} error: {r['error'][:60]}")
            continue
        gbps = f"{r['gbps']:7.0f}" if r["gbps"] else f"{'':>7}"
        frac = f"{r['frac_peak']:5.0%}" if r["frac_peak"] else f"{'':>5}"
        sp = f"{r['speedup_vs_reference']:6.1f}x" if r["speedup_vs_reference"] else f"{'':>7}"
        out.append(
            f"{r['op']:<15} {r['pass']:<9} {r['impl']:<9} {r['C']:>1} {r['B']:>5} {r['median_ms']:10.3f} "
            f"{r['p20_ms']:8.3f} {r['p80_ms']:8.3f} {gbps} {frac} {sp}"
        )
    return "\n".join(out)


def environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1024, help="images per op call (default 1024)")
    p.add_argument("--train-batch", type=int, default=64, help="batch of the training-step row (default 64)")
    p.add_argument("--channels", type=int, nargs="+", default=[1, 3], choices=[1, 3])
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--passes", nargs="+", default=PASSES, choices=PASSES)
    p.add_argument("--quick", action="store_true", help="short timings, no torch.compile")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--peak-gbps", type=float, default=None, help="device peak bandwidth (GB/s)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="folder for CSV and JSON")
    args = p.parse_args(argv)
    rows = run_gpu_rows(args)
    env = environment()
    print(f"# {env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}")
    print(format_table(rows))
    print()
    for line in targets(rows):
        print(line)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "gpu_bench")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows, "targets": targets(rows)}, f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {stem}.json and {stem}.csv")


if __name__ == "__main__":
    main()
