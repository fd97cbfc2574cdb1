"""Whole-step benchmarks: a LAVAE training step (images/s) and the importance-sampled evaluation.

Used by ``bench/throughput.py --only step,eval`` (rows with ``pass = "step"`` / ``"eval"``).

Step: forward (negative ELBO with the training recipe's noise and forced-n coin), backward and one
Adamax update; by default B = 64, 64×64 and 32×32, C = 1, S = 17 (multi-MNIST's shapes), or as set
by ``--step-batch``, ``--step-sizes``, ``--step-channels`` (3: multi-dSprites, S = 21) and
``--step-impls``. Implementations, all from the same initial weights and timed round-robin in the
same run:

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

Yardsticks, measured in the same run: the float32 ceiling is the step's FLOP count
(torch.utils.flop_counter, forward + backward) over the sgemm rate; the **conv rate** is what the
step's own convolutions reach alone: every convolution of one default-path step (the model's layer
shapes, batch, layout, dtype and threads, with the same input gradients asked for), replayed
forward + backward without anything else, timed round-robin with the steps (``conv-only`` rows).
"X% of the conv rate" is conv-only time / step time: a step made of nothing but its convolutions,
each as fast as it runs alone, would be at 100%.

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
SPRITE = {1: 17, 3: 21}


def _images(b, h, w, seed=0, c=C):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, c, h, w, generator=g) < 0.15).float()


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

    def __init__(self, h, w, b=B, c=C):
        import os
        import subprocess
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, LAVAE_FAST_TUNE_ALLOCATOR="0", PYTHONPATH=root + os.pathsep + os.environ.get(
            "PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(h), str(w),
                                      str(torch.get_num_threads()), str(b), str(c)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
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


def _worker(h, w, threads, b=B, c=C):
    """Loop of the eager worker: one training step per 'step' line on stdin."""
    import sys

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    stepper = _Stepper(LAVAE(c, (h, w), SPRITE[c]), _images(b, h, w, c=c), ops="reference")
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


class _ConvReplay(_Timed):
    """Every convolution of one training step of ``stepper``'s model, replayed alone (see the module
    docstring): the same layer shapes, layout, dtype and input-gradient needs, forward + backward.
    ``flops``: their FLOP count (forward + backward)."""

    def __init__(self, stepper: _Stepper):
        model = copy.deepcopy(stepper.model)
        calls = []

        def hook(mod, inp, out):
            xi = inp[0]
            fmt = torch.channels_last if xi.dim() == 4 and not xi.is_contiguous() and xi.is_contiguous(
                memory_format=torch.channels_last) else torch.contiguous_format
            calls.append((mod, tuple(xi.shape), xi.dtype, fmt, xi.requires_grad, tuple(out.shape)))

        convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        handles = [m.register_forward_hook(hook) for m in convs]
        H, W = stepper.x.shape[-2:]
        noise = draw_noise(0, 0, stepper.ids, num_pixels=H * W, max_objects=model.max_objects,
                           latent_size=model.latent_size)
        out = model(stepper.x, noise=noise, tau=0.5, force_n_prob=0.5)
        out.loss.backward()
        for h in handles:
            h.remove()
        tensors = {}  # one input and one output gradient per distinct shape (the step's memory, not more)

        def tensor(shape, dtype, fmt):
            key = (shape, dtype, fmt)
            if key not in tensors:
                tensors[key] = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
            return tensors[key]

        self.items = []
        for mod, shape, dtype, fmt, needs_grad, out_shape in calls:
            xi = tensor(shape, dtype, fmt)
            xi = xi.detach().requires_grad_(needs_grad)
            self.items.append((mod, xi, tensor(out_shape, dtype, fmt)))
        counter = FlopCounterMode(display=False)
        with counter:
            self()
        self.flops = float(counter.get_total_flops())

    def __call__(self):
        for mod, xi, g in self.items:
            torch.autograd.backward(mod(xi), g)


def section_step(ctx):
    rows = []
    args = ctx.args
    b = args.step_batch
    c = args.step_channels
    s_ = SPRITE[c]
    sizes = args.step_sizes or ([(64, 64)] if ctx.quick else [(64, 64), (32, 32)])
    wanted = args.step_impls or (["eager", "default", "compile", "bf16+compile"] if ctx.quick else
                                 ["eager", "eager+allocator", "default", "compile", "bf16", "bf16+compile"])
    for (h, w) in sizes:
        torch.manual_seed(0)
        base = LAVAE(c, (h, w), s_)
        x = _images(b, h, w, c=c)
        make = {
            "eager": lambda: _WorkerStepper(h, w, b, c),
            "eager+allocator": lambda: _Stepper(base, x, ops="reference"),
            "default": lambda: _Stepper(base, x, ops="fused", accelerate={}),
            "compile": lambda: _Stepper(base, x, ops="fused", accelerate={"compile": True}),
            "bf16": lambda: _Stepper(base, x, ops="fused", accelerate={"bf16": True}),
            "bf16+compile": lambda: _Stepper(base, x, ops="fused", accelerate={"bf16": True, "compile": True}),
        }
        impls = {k: make[k]() for k in wanted}
        # The step's own convolutions alone, from a default-path model (float32, channels-last).
        impls["conv-only"] = _ConvReplay(impls["default"] if "default" in impls else make["default"]())
        for name, st in impls.items():  # first steps: compilation, oneDNN primitive creation
            st.warm()
            print(f"# step {h}x{w} B={b} C={c} {name}: first call {st.first_s:.1f} s", flush=True)
        res = time_interleaved({k: st for k, st in impls.items()}, reps=3 if ctx.quick else args.step_reps,
                               warmup=1, budget_s=60 if ctx.quick else args.step_budget)
        flops = step_flops(base, x)
        ceiling_ms = flops / ctx.rate * 1e3
        conv = res.pop("conv-only")
        conv_ms = conv["median_ms"]
        crate = impls["conv-only"].flops / (conv_ms * 1e-3)
        rows.append({"op": f"training_step_{h}x{w}", "pass": "step", "impl": "conv-only", "C": c, **conv, "H": h,
                     "W": w, "B": b, "S": s_, "conv_gflop": impls["conv-only"].flops / 1e9,
                     "conv_gflops_per_s": crate / 1e9})
        for name, t in res.items():
            extra = {"images_per_s": b / (t["median_ms"] * 1e-3), "first_step_s": impls[name].first_s,
                     "H": h, "W": w, "B": b, "S": s_, "step_gflop": flops / 1e9, "ceiling_sgemm_ms": ceiling_ms,
                     "conv_only_ms": conv_ms, "frac_conv_rate": conv_ms / t["median_ms"]}
            if "compile" in name:
                extra["compile_s"] = impls[name].first_s - t["median_ms"] * 1e-3
            rows.append({"op": f"training_step_{h}x{w}", "pass": "step", "impl": name, "C": c, **t, **extra})
        print(f"# step {h}x{w} B={b} C={c}: {flops / 1e9:.0f} GFLOP -> float32 ceiling {ceiling_ms / 1e3:.2f} s at the "
              f"sgemm rate ({ctx.rate / 1e9:.0f} GFLOP/s); its convolutions alone: {conv_ms / 1e3:.2f} s "
              f"[p20 {conv['p20_ms'] / 1e3:.2f}, p80 {conv['p80_ms'] / 1e3:.2f}] = {crate / 1e9:.0f} GFLOP/s "
              f"(the conv rate)")
        eager = res["eager"]["median_ms"] if "eager" in res else None
        for name, t in res.items():
            comp = f", compile {impls[name].first_s - t['median_ms'] * 1e-3:.0f} s" if "compile" in name else ""
            vs = f"{eager / t['median_ms']:.2f}x eager  " if eager else ""
            print(f"training_step {h}x{w} {name:<16} {t['median_ms'] / 1e3:7.2f} s [p20 {t['p20_ms'] / 1e3:.2f}, "
                  f"p80 {t['p80_ms'] / 1e3:.2f}, n={t['reps']}]  {b / (t['median_ms'] * 1e-3):6.1f} images/s  "
                  f"{vs}({100 * conv_ms / t['median_ms']:.0f}% of the conv rate, {100 * ceiling_ms / t['median_ms']:.0f}"
                  f"% of the sgemm ceiling){comp}", flush=True)
        if "default" in res:
            t = res["default"]["median_ms"]
            ctx.targets.append((f"training step {h}x{w} B={b} C={c}, default path (float32): >= 80% of the conv rate "
                                f"(its convolutions alone: {conv_ms / 1e3:.2f} s)", conv_ms / t >= 0.8,
                                f"{100 * conv_ms / t:.0f}% ({t / 1e3:.2f} s per step)"))
        if (h, w) == (64, 64) and eager and "default" in res:
            r = eager / res["default"]["median_ms"]
            ctx.targets.append((f"training step 64x64 B={b}, default path (float32): >= 2.5x the eager reference",
                                r >= 2.5, f"{r:.2f}x ({res['default']['median_ms'] / 1e3:.2f} s vs "
                                          f"{eager / 1e3:.2f} s; float32 ceiling {ceiling_ms / 1e3:.2f} s)"))
            best = min((k for k in res if k.startswith("bf16")), key=lambda k: res[k]["median_ms"], default=None)
            if best:
                r = eager / res[best]["median_ms"]
                ctx.targets.append((f"training step 64x64 B={b}, bf16 path ({best}): >= 5x the eager reference",
                                    r >= 5, f"{r:.2f}x ({res[best]['median_ms'] / 1e3:.2f} s)"))
        comp = [impls[k].first_s for k in impls if "compile" in k]
        if comp:
            ctx.targets.append(("compilation (first compiled step) under a minute", max(comp) < 60,
                                ", ".join(f"{k}: {impls[k].first_s:.0f} s" for k in impls if "compile" in k)))
        if "eager" in impls:
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
    """The default training step (B = 64, 64×64, C = 1 unless --step-batch/--step-sizes/
    --step-channels say otherwise; float32, fused ops, channels-last): wall time
    of forward / backward / optimizer, and the time of its operators grouped into categories, per
    step. Returns no timing rows (the step section has those); the breakdown goes to the JSON
    under "profile"."""
    h, w = (ctx.args.step_sizes or [(64, 64)])[0]
    b, c = ctx.args.step_batch, ctx.args.step_channels
    steps = 2 if ctx.quick else 4
    torch.manual_seed(0)
    x = _images(b, h, w, c=c)
    s = _Stepper(LAVAE(c, (h, w), SPRITE[c]), x, ops="fused", accelerate={})
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
    print(f"# default step {h}x{w}, B={b}, C={c}, float32, {torch.get_num_threads()} threads: {step_ms / 1e3:.2f} s "
          f"(median phases over {steps} steps: " + ", ".join(f"{k} {v / 1e3:.2f} s" for k, v in phase_ms.items())
          + ")")
    print(f"# operator time by category (timed steps: {timed_step_ms / 1e3:.2f} s per step):")
    for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<52} {ms:8.1f} ms  {100 * ms / timed_step_ms:5.1f}%")
    top = sorted(names_ms.items(), key=lambda kv: -kv[1])[:15]
    print("# top operators per step (ms, calls):")
    for name, ms in top:
        print(f"  {name:<52} {ms:8.1f} ms  {timer.calls[name] // steps:4d}")
    ctx.extra["profile"] = {"H": h, "W": w, "B": b, "C": c, "steps": steps, "phase_ms": phase_ms,
                            "timed_step_ms": timed_step_ms, "category_ms": cats, "top_ms": dict(top)}
    return []


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        _worker(*(int(a) for a in sys.argv[2:]))
    else:
        sys.exit("bench/training_step.py is driven by bench/throughput.py (--only step,eval,profile)")
