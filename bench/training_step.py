"""Whole-step benchmarks: a LAVAE training step (images/s) and the importance-sampled evaluation.

Used by ``bench/throughput.py --only step,eval`` (rows with ``pass = "step"`` / ``"eval"``).

Step: forward (negative ELBO with the training recipe's noise and forced-n coin), backward and one
Adamax update, B = 64, 64×64 and 32×32, C = 1, S = 17 (multi-MNIST's shapes). Implementations, all
from the same initial weights and timed round-robin in the same run:

* ``eager``: the plain PyTorch reference — reference ops, NCHW float32, no compilation, glibc's
  default allocator — in a fresh worker process (``python bench/training_step.py --worker``) that
  the benchmark drives step by step, interleaved with the others: once a process has grown its
  heap, switching the allocator setting back no longer restores the plain behaviour, so the plain
  eager step can only be timed in a process of its own;
* ``eager+allocator``: the same in this process, with the project's allocator setting, to show
  what that setting alone buys (any eager script gets it from lavae_fast.performance);
* ``default``: what ``python -m lavae_fast.train`` runs by default (fused ops, channels-last,
  the allocator setting, :meth:`LAVAE.accelerate` with its defaults);
* ``compile``: default + ``torch.compile`` of the nets;
* ``bf16``, ``bf16+compile``: bf16 autocast for the convolutions (optional path).

The float32 ceiling is the step's FLOP count (torch.utils.flop_counter, forward + backward) over
the sgemm rate measured in the same run; the conv rate of one of the nets' 3×3 convolutions,
measured in isolation, is printed too (oneDNN's convolutions beat MKL's sgemm on some CPUs).

Eval: ``log_likelihood(x, K=100)`` on 16 test-like images (n̂ = 1–3 per image, set by a hook on
the location head so that the work matches a trained model's), ``eager`` loop over the K samples
(reference ops, NCHW, one sample per iteration, default allocator) vs the default path (fused
ops, channels-last, samples batched), both in this process with the allocator setting on (which
favours the eager loop); the 10k-image figure is extrapolated.
"""

from __future__ import annotations

import copy
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench.common import time_interleaved
from lavae_fast import LAVAE
from lavae_fast.noise import draw_noise

B = 64
C, S = 1, 17


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, C, h, w, generator=g) < 0.15).float()


class _Timed:
    """``warm()`` runs the first step (compilation, oneDNN primitive creation) and keeps its time."""

    first_s = None

    def warm(self):
        t0 = time.perf_counter()
        self()
        self.first_s = time.perf_counter() - t0


class _Stepper(_Timed):
    """One implementation: its own model copy and optimiser; ``__call__`` runs one training step."""

    def __init__(self, base: LAVAE, x, *, ops, accelerate=None):
        self.model = copy.deepcopy(base)
        self.model.set_ops(ops)
        if accelerate is not None:
            self.model.accelerate(**accelerate)
        self.x = x  # the model makes its own layout (channels-last when accelerated)
        self.opt = torch.optim.Adamax(self.model.parameters(), lr=1e-3)
        self.ids = torch.arange(x.shape[0])
        self.step_no = 0

    def run(self, phase_ms=None):
        """One step; with ``phase_ms`` (a dict of lists), append the wall time (ms) of its forward,
        backward and optimizer phases."""
        H, W = self.x.shape[-2:]
        noise = draw_noise(0, self.step_no, self.ids, num_pixels=H * W, max_objects=self.model.max_objects,
                           latent_size=self.model.latent_size)
        t0 = time.perf_counter()
        out = self.model(self.x, noise=noise, tau=0.5, force_n_prob=0.5)
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        t3 = time.perf_counter()
        self.step_no += 1
        if phase_ms is not None:
            for k, t in zip(("forward", "backward", "optimizer"), (t1 - t0, t2 - t1, t3 - t2)):
                phase_ms.setdefault(k, []).append(t * 1e3)
        return out.loss.detach()

    def __call__(self):
        return self.run()


class _WorkerStepper(_Timed):
    """The eager reference in a fresh process (see the module docstring): the same model (same
    seed), data and noise; ``__call__`` asks it for one step and waits for it."""

    def __init__(self, h, w):
        import os
        import subprocess
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, LAVAE_FAST_TUNE_ALLOCATOR="0", PYTHONPATH=root + os.pathsep + os.environ.get(
            "PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(h), str(w),
                                      str(torch.get_num_threads())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=root)

    def __call__(self):
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("ok"):
            raise RuntimeError(f"eager worker failed: {line!r}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _worker(h, w, threads):
    """Loop of the eager worker: one training step per 'step' line on stdin."""
    import sys

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    stepper = _Stepper(LAVAE(C, (h, w), S), _images(B, h, w), ops="reference")
    for line in sys.stdin:
        if line.strip() != "step":
            break
        stepper.run()
        print("ok", flush=True)


def step_flops(model: LAVAE, x) -> float:
    """FLOPs of one forward + backward (convolutions and matmuls, as torch's counter counts them)."""
    m = copy.deepcopy(model)
    m.set_ops("reference")
    counter = FlopCounterMode(display=False)
    with counter:
        out = m(x, tau=0.5, force_n_prob=0.5)
        out.loss.backward()
    return float(counter.get_total_flops())


def conv_rate(h, w, reps=5) -> float:
    """FLOP/s of one of the nets' 3×3 convolutions (44 → 44 channels, channels-last, B = 64),
    forward + backward, in isolation."""
    conv = torch.nn.Conv2d(44, 44, 3, padding=1).to(memory_format=torch.channels_last)
    xi = torch.randn(B, 44, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(B, 44, h, w).contiguous(memory_format=torch.channels_last)

    def f():
        torch.autograd.backward(conv(xi), g)

    t = time_interleaved({"conv": f}, reps=reps, warmup=2, budget_s=10)["conv"]["median_ms"] * 1e-3
    return 3 * 2.0 * B * 44 * 44 * 9 * h * w / t


def section_step(ctx):
    rows = []
    sizes = [(64, 64)] if ctx.quick else [(64, 64), (32, 32)]
    for (h, w) in sizes:
        torch.manual_seed(0)
        base = LAVAE(C, (h, w), S)
        x = _images(B, h, w)
        impls = {
            "eager": _WorkerStepper(h, w),
            "eager+allocator": _Stepper(base, x, ops="reference"),
            "default": _Stepper(base, x, ops="fused", accelerate={}),
            "compile": _Stepper(base, x, ops="fused", accelerate={"compile": True}),
            "bf16": _Stepper(base, x, ops="fused", accelerate={"bf16": True}),
            "bf16+compile": _Stepper(base, x, ops="fused", accelerate={"bf16": True, "compile": True}),
        }
        if ctx.quick:
            for k in ("eager+allocator", "bf16"):
                impls.pop(k)
        for name, s in impls.items():  # first steps: compilation, oneDNN primitive creation
            s.warm()
            print(f"# step {h}x{w} {name}: first step {s.first_s:.1f} s", flush=True)
        res = time_interleaved({k: s for k, s in impls.items()}, reps=3 if ctx.quick else ctx.args.step_reps,
                               warmup=1, budget_s=60 if ctx.quick else ctx.args.step_budget)
        flops = step_flops(base, x)
        ceiling_ms = flops / ctx.rate * 1e3
        crate = conv_rate(h, w)
        for name, t in res.items():
            extra = {"images_per_s": B / (t["median_ms"] * 1e-3), "first_step_s": impls[name].first_s,
                     "H": h, "W": w, "B": B, "S": S, "step_gflop": flops / 1e9,
                     "ceiling_sgemm_ms": ceiling_ms, "ceiling_conv_ms": flops / crate * 1e3}
            if "compile" in name:
                extra["compile_s"] = impls[name].first_s - t["median_ms"] * 1e-3
            rows.append({"op": f"training_step_{h}x{w}", "pass": "step", "impl": name, "C": C, **t, **extra})
        eager = res["eager"]["median_ms"]
        print(f"# step {h}x{w}: {flops / 1e9:.0f} GFLOP -> float32 ceiling {ceiling_ms / 1e3:.2f} s at the sgemm rate "
              f"({ctx.rate / 1e9:.0f} GFLOP/s), {flops / crate:.2f} s at the isolated conv rate ({crate / 1e9:.0f} GFLOP/s)")
        for name, t in res.items():
            comp = f", compile {impls[name].first_s - t['median_ms'] * 1e-3:.0f} s" if "compile" in name else ""
            print(f"training_step {h}x{w} {name:<16} {t['median_ms'] / 1e3:7.2f} s [p20 {t['p20_ms'] / 1e3:.2f}, "
                  f"p80 {t['p80_ms'] / 1e3:.2f}, n={t['reps']}]  {B / (t['median_ms'] * 1e-3):6.1f} images/s  "
                  f"{eager / t['median_ms']:.2f}x eager  ({100 * ceiling_ms / t['median_ms']:.0f}% of the sgemm "
                  f"ceiling){comp}", flush=True)
        if (h, w) == (64, 64):
            r = eager / res["default"]["median_ms"]
            ctx.targets.append(("training step 64x64 B=64, default path (float32): >= 2.5x the eager reference",
                                r >= 2.5, f"{r:.2f}x ({res['default']['median_ms'] / 1e3:.2f} s vs "
                                          f"{eager / 1e3:.2f} s; float32 ceiling {ceiling_ms / 1e3:.2f} s)"))
            best = min((k for k in res if k.startswith("bf16")), key=lambda k: res[k]["median_ms"], default=None)
            if best:
                r = eager / res[best]["median_ms"]
                ctx.targets.append((f"training step 64x64 B=64, bf16 path ({best}): >= 5x the eager reference",
                                    r >= 5, f"{r:.2f}x ({res[best]['median_ms'] / 1e3:.2f} s)"))
            comp = [impls[k].first_s for k in impls if "compile" in k]
            if comp:
                ctx.targets.append(("compilation (first compiled step) under a minute", max(comp) < 60,
                                    ", ".join(f"{k}: {impls[k].first_s:.0f} s" for k in impls if "compile" in k)))
        impls["eager"].close()
        del impls
    return rows


def _with_peaks(model: LAVAE, h, w, seed=1):
    """A forward hook on the location head that puts 1–3 peaks above 4γ per image (so n̂ and the
    decoding work match a trained model's on 0–3-object data)."""
    g = torch.Generator().manual_seed(seed)

    def hook(mod, inp, out):
        b = out.shape[0]
        counts = torch.randint(1, 4, (b,), generator=g)
        peaks = torch.full((b, 1, h, w), -2.0)
        for i in range(b):
            for k in range(int(counts[i])):
                peaks[i, 0, 8 + 20 * k, 10 + 17 * k] = 6.0
        return peaks.to(out.dtype) + 0 * out

    return model.loc_head.register_forward_hook(hook)


def section_eval(ctx):
    h = w = 64
    K = 100
    nb = 8 if ctx.quick else 16
    torch.manual_seed(0)
    base = LAVAE(C, (h, w), S)
    x = _images(nb, h, w, seed=3)
    eager = copy.deepcopy(base)
    eager.set_ops("reference")
    fast = copy.deepcopy(base).accelerate()
    _with_peaks(eager, h, w)
    _with_peaks(fast, h, w)

    def run_eager():
        return eager.log_likelihood(x, K, chunk=1, generator=torch.Generator().manual_seed(0))

    def run_fast():
        return fast.log_likelihood(x, K, generator=torch.Generator().manual_seed(0))

    res = time_interleaved({"eager": run_eager, "default": run_fast}, reps=3, warmup=1,
                           budget_s=30 if ctx.quick else 240)
    rows = []
    for name, t in res.items():
        per_image_s = t["median_ms"] * 1e-3 / nb
        rows.append({"op": "log_likelihood_K100", "pass": "eval", "impl": name, "C": C, **t, "images": nb, "K": K,
                     "projected_10k_s": per_image_s * 10_000})
        print(f"log_likelihood K={K} {name:<8} {t['median_ms'] / 1e3:7.2f} s for {nb} images [p20 "
              f"{t['p20_ms'] / 1e3:.2f}, p80 {t['p80_ms'] / 1e3:.2f}]  -> {per_image_s * 1e4 / 60:.1f} min per 10k "
              f"images", flush=True)
    r = res["eager"]["median_ms"] / res["default"]["median_ms"]
    ctx.targets.append(("evaluation log_likelihood K=100: >= 3x faster than an eager loop", r >= 3, f"{r:.2f}x"))
    return rows


# Profile of the default step: where its time goes. torch.profiler misleads here: with it on, the
# fused ops run several times slower than without (its records keep tensors alive, the heap grows
# and fresh pages fault in inside whichever op allocates), so each operator call is timed instead
# by a TorchDispatchMode around it (wall clock, below autograd: forward and backward kernels are
# separate operators; nested calls inside an operator are not counted twice). Categories match
# operator names, first match wins.
PROFILE_CATEGORIES = [
    ("placement + log-likelihood (fused)", ("lavae_fast.place_loglik",)),
    ("Gumbel top-M sampling (fused)", ("lavae_fast.gumbel_topk",)),
    ("appearance gather (fused)", ("lavae_fast.gather_appearance",)),
    ("counting (fused)", ("lavae_fast.count_objects",)),
    ("Leaky ReLU + batch norm (fused)", ("lavae_fast.lrelu_batch_norm", "batch_norm", "leaky_relu")),
    ("convolutions", ("conv",)),
    ("linear layers", ("addmm", "aten.mm", "aten.bmm", "linear")),
    ("optimizer (Adamax)", ("_foreach",)),
    ("elementwise (incl. autograd's gradient sums)", ("aten.add", "aten.mul", "aten.sub", "aten.div")),
    ("layout copies", ("aten.copy_", "aten.clone", "aten._to_copy")),
    ("allocation, zero fill", ("aten.empty", "aten.zero_", "aten.fill_", "aten.zeros")),
]


def profile_categories(names_ms: dict) -> dict:
    """{category: ms} from {operator name: ms}; unmatched operators go to "other operators"."""
    out = {c: 0.0 for c, _ in PROFILE_CATEGORIES}
    out["other operators"] = 0.0
    for name, ms in names_ms.items():
        for cat, keys in PROFILE_CATEGORIES:
            if any(k in name for k in keys):
                out[cat] += ms
                break
        else:
            out["other operators"] += ms
    return out


class _OpTimer(TorchDispatchMode):
    """Wall time and calls per operator (``str(func)``, e.g. ``aten.convolution_backward.default``)."""

    def __init__(self):
        super().__init__()
        self.ms, self.calls = {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = (time.perf_counter() - t0) * 1e3
        name = str(func)
        self.ms[name] = self.ms.get(name, 0.0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1
        return out


def section_profile(ctx):
    """The default training step (B = 64, 64×64, float32, fused ops, channels-last): wall time
    of forward / backward / optimizer, and the time of its operators grouped into categories, per
    step. Returns no timing rows (the step section has those); the breakdown goes to the JSON
    under "profile"."""
    h = w = 64
    steps = 2 if ctx.quick else 4
    torch.manual_seed(0)
    x = _images(B, h, w)
    s = _Stepper(LAVAE(C, (h, w), S), x, ops="fused", accelerate={})
    s.warm()
    s()
    phases = {}
    for _ in range(steps):
        s.run(phases)
    phase_ms = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
    step_ms = sum(phase_ms.values())
    timer = _OpTimer()
    t0 = time.perf_counter()
    with timer:
        for _ in range(steps):
            s()
    timed_step_ms = (time.perf_counter() - t0) * 1e3 / steps
    names_ms = {k: v / steps for k, v in timer.ms.items()}
    cats = profile_categories(names_ms)
    cats["outside operators (Python, autograd engine, timer)"] = max(timed_step_ms - sum(cats.values()), 0.0)
    print(f"# default step {h}x{w}, B={B}, float32, {torch.get_num_threads()} threads: {step_ms / 1e3:.2f} s "
          f"(median phases over {steps} steps: " + ", ".join(f"{k} {v / 1e3:.2f} s" for k, v in phase_ms.items())
          + ")")
    print(f"# operator time by category (timed steps: {timed_step_ms / 1e3:.2f} s per step):")
    for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<52} {ms:8.1f} ms  {100 * ms / timed_step_ms:5.1f}%")
    top = sorted(names_ms.items(), key=lambda kv: -kv[1])[:15]
    print("# top operators per step (ms, calls):")
    for name, ms in top:
        print(f"  {name:<52} {ms:8.1f} ms  {timer.calls[name] // steps:4d}")
    ctx.extra["profile"] = {"H": h, "W": w, "B": B, "steps": steps, "phase_ms": phase_ms,
                            "timed_step_ms": timed_step_ms, "category_ms": cats, "top_ms": dict(top)}
    return []


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("bench/training_step.py is driven by bench/throughput.py (--only step,eval,profile)")
