"""The C++ kernels' instruction-set variants (csrc/isa_*.cpp, csrc/dispatch.cpp).

One build holds a baseline, an AVX2 and an AVX-512 copy of every kernel, each with its own vector
width and register tiles, and picks one at run time. Every variant this CPU runs must agree with
the reference (values and gradients, odd shapes, edge cases); the choice must follow the CPU and
the ``LAVAE_FAST_CPU_CAPABILITY`` / ``ATEN_CPU_CAPABILITY`` caps; wide instructions must stay inside
their variant (a shared function compiled for AVX-512 would crash an AVX2 machine); and no C++ op
may be slower than the PyTorch fallback it replaces on the machine running the suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

from lavae_fast import _backends, ops
from lavae_fast import reference as ref
from test_ops import compare, one_hot_maps, place_case, run_with_grads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["default", "avx2", "avx512"]


def _available():
    return _backends.available_cpu_capabilities()


@pytest.fixture
def variant(request, ext):
    """Run the test under one kernel variant, restoring the previous one afterwards."""
    name = request.param
    if name not in _available():
        pytest.skip(f"this CPU or build cannot run the {name} kernels (available: {_available()})")
    before = _backends.cpu_capability()
    _backends.set_cpu_capability(name)
    yield name
    _backends.set_cpu_capability(before)


PLACE_SHAPES = [  # B, M, C, S, H, W: partial vectors, sprites larger than the canvas, > 12 objects
    (3, 4, 1, 5, 6, 7),
    (2, 13, 1, 9, 5, 3),
    (3, 3, 3, 21, 40, 37),
    (4, 10, 1, 17, 48, 48),
    (1, 2, 1, 3, 1, 1),
]


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["index", "dense"])
def test_place_and_loglik_matches_reference(variant, dtype, mode):
    for k, (B, M, C, S, H, W) in enumerate(PLACE_SHAPES):
        x, sprites, loc, n, index = place_case(B, M, C, S, H, W, seed=k, dtype=dtype,
                                               maps="onehot" if mode == "index" else "soft")
        idx = index if mode == "index" else None
        weights = [torch.randn(B, dtype=torch.float64)]

        def fused(s, l, x=x, n=n, idx=idx):
            return ops.place_and_loglik(x, s, l, n, index=idx)

        def reference(s, l, x=x, n=n, idx=idx):
            return ref.place_and_loglik(x, s, l, n, index=idx)

        got, g_got = run_with_grads(fused, [sprites, loc], [0, 1], weights)
        want, g_want = run_with_grads(reference, [sprites, loc], [0, 1], weights)
        want64, g_want64 = run_with_grads(reference, [sprites.double(), loc.double()], [0, 1], weights)
        tag = f"{variant} {mode} {tuple(PLACE_SHAPES[k])}"
        compare(f"{tag} loglik", dtype, got[0], want[0], want64[0])
        compare(f"{tag} grad sprites", dtype, g_got[0], g_want[0], g_want64[0])
        compare(f"{tag} grad loc", dtype, g_got[1], g_want[1], g_want64[1])


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gumbel_topk_relaxed_matches_reference(variant, dtype):
    g = torch.Generator().manual_seed(1)
    for B, D, M, tau in [(4, 37, 5, 0.3), (3, 3, 5, 0.5), (3, 70, 4, 0.02), (2, 4096, 10, 0.5)]:
        logits = (torch.randn(B, D, generator=g) * 4).to(dtype)
        gumbel = -torch.log(-torch.log(torch.rand(B, D, generator=g))).to(dtype)
        n = torch.randint(0, M + 1, (B,), generator=g)
        n[0] = M
        n = n.clamp(max=D)  # D = 3 < M = 5: one location per draw, the op refuses n > D
        weights = [None, torch.randn(B, M, D, dtype=torch.float64), torch.randn(B, dtype=torch.float64)]

        def fused(l, n=n, tau=tau, M=M, gumbel=gumbel):
            return ops.gumbel_topk_relaxed(l, n, tau, M, gumbel)

        def reference(l, n=n, tau=tau, M=M, gumbel=gumbel):
            return ref.gumbel_topk_relaxed(l, n, tau, M, gumbel.to(l.dtype))

        got, g_got = run_with_grads(fused, [logits], [0], weights)
        want, g_want = run_with_grads(reference, [logits], [0], weights)
        want64, g_want64 = run_with_grads(reference, [logits.double()], [0], weights)
        tag = f"{variant} B={B} D={D} M={M} tau={tau}"
        for o_got, o_want, o_want64, what in zip(got, want, want64, ["index", "relaxed", "log_q"]):
            if what == "index":
                assert torch.equal(o_got, o_want), f"{tag}: index differs"
            else:
                compare(f"{tag} {what}", dtype, o_got, o_want, o_want64)
        compare(f"{tag} grad logits", dtype, g_got[0], g_want[0], g_want64[0])


GUMBEL_WINDOW_CASES = [  # B, H, W, M, window, tau: partial vectors, one-row canvas, M > 12, low τ
    (4, 7, 9, 4, 3, 0.3),
    (3, 1, 37, 3, 3, 0.5),
    (3, 10, 7, 3, 5, 0.02),
    (2, 64, 64, 10, 5, 0.5),
    (3, 23, 29, 13, 3, 0.1),
    (2, 19, 21, 4, 7, 0.3),
]


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gumbel_topk_relaxed_with_a_window_matches_reference(variant, dtype):
    # q's exclusion window (SPEC §2): each variant's group-wise sums against the reference's loop.
    g = torch.Generator().manual_seed(11)
    for B, H, W, M, window, tau in GUMBEL_WINDOW_CASES:
        D = H * W
        logits = (torch.randn(B, D, generator=g) * 4).to(dtype)
        gumbel = -torch.log(-torch.log(torch.rand(B, D, generator=g))).to(dtype)
        logits[0, 0] = (logits[0] + gumbel[0]).max() + 1 - gumbel[0, 0]  # the first draw in the corner
        n = torch.randint(0, M + 1, (B,), generator=g)
        n[0], n[-1] = M, 0
        kw = {"window": window, "canvas": (H, W)}
        weights = [None, torch.randn(B, M, D, dtype=torch.float64), torch.randn(B, dtype=torch.float64)]

        def fused(l, n=n, tau=tau, M=M, gumbel=gumbel, kw=kw):
            return ops.gumbel_topk_relaxed(l, n, tau, M, gumbel, **kw)

        def reference(l, n=n, tau=tau, M=M, gumbel=gumbel, kw=kw):
            return ref.gumbel_topk_relaxed(l, n, tau, M, gumbel.to(l.dtype), **kw)

        got, g_got = run_with_grads(fused, [logits], [0], weights)
        want, g_want = run_with_grads(reference, [logits], [0], weights)
        want64, g_want64 = run_with_grads(reference, [logits.double()], [0], weights)
        tag = f"{variant} B={B} {H}x{W} M={M} window={window} tau={tau}"
        assert torch.equal(got[0], want64[0]), f"{tag}: index differs"
        assert got[0][0, 0] == 0, f"{tag}: the corner is drawn first (its window clipped)"
        excluded, cover = torch.zeros(B, M, D, dtype=torch.bool), torch.zeros(B, D, dtype=torch.bool)
        for i in range(M):
            excluded[:, i] = cover
            cover = cover | ref.exclusion_cover(got[0][:, i], window, (H, W))
        assert not got[1][excluded].any(), f"{tag}: mass inside an earlier draw's window"
        for o_got, o_want, o_want64, what in zip(got[1:], want[1:], want64[1:], ["relaxed", "log_q"]):
            compare(f"{tag} {what}", dtype, o_got, o_want, o_want64)
        compare(f"{tag} grad logits", dtype, g_got[0], g_want[0], g_want64[0])


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
def test_count_objects_matches_reference(variant):
    g = torch.Generator().manual_seed(2)
    for B, H, W in [(4, 7, 9), (2, 1, 1), (3, 64, 64), (2, 33, 17)]:
        h = torch.randn(B, H, W, generator=g) * 5
        h[0, 0, 0] = 100.0  # a peak in the corner
        for dtype in (torch.float32, torch.float64):
            got = ops.count_objects(h.to(dtype), 2.0, 10)
            want = ref.count_objects(h.to(dtype), 2.0, 10)
            assert torch.equal(got, want), f"{variant} {(B, H, W)} {dtype}: {got.tolist()} != {want.tolist()}"
            for window in (1, 5, 7):  # the counter's window (3×3 by default)
                got = ops.count_objects(h.to(dtype), 2.0, 10, window)
                want = ref.count_objects(h.to(dtype), 2.0, 10, window)
                assert torch.equal(got, want), f"{variant} {(B, H, W)} {dtype} window {window}"


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gather_appearance_matches_reference(variant, dtype, layout):
    g = torch.Generator().manual_seed(3)
    for B, M, K, H, W in [(3, 4, 5, 5, 7), (2, 13, 64, 6, 11), (2, 13, 37, 19, 23), (2, 10, 64, 48, 48)]:
        h_app = torch.randn(B, K, H, W, generator=g).to(dtype)
        if layout == "channels_last":
            h_app = h_app.contiguous(memory_format=torch.channels_last)
        _, _, loc, n, index = place_case(B, M, 1, 3, H, W, seed=B + M, dtype=dtype)
        weights = [torch.randn(B, M, K, dtype=torch.float64)]

        def fused(h, l, n=n, index=index):
            return ops.gather_appearance(h, l, n, index=index)

        def reference(h, l, n=n, index=index):
            return ref.gather_appearance(h, l, n, index=index)

        got, g_got = run_with_grads(fused, [h_app, loc], [0, 1], weights)
        want, g_want = run_with_grads(reference, [h_app, loc], [0, 1], weights)
        want64, g_want64 = run_with_grads(reference, [h_app.double(), loc.double()], [0, 1], weights)
        tag = f"{variant} {layout} {(B, M, K, H, W)}"
        compare(f"{tag} out", dtype, got[0], want[0], want64[0])
        compare(f"{tag} grad h_app", dtype, g_got[0], g_want[0], g_want64[0])
        compare(f"{tag} grad loc", dtype, g_got[1], g_want[1], g_want64[1])


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_lrelu_batch_norm_matches_reference(variant, dtype, layout):
    from lavae_fast import norm

    g = torch.Generator().manual_seed(4)
    for N, C, H, W in [(3, 44, 5, 7), (2, 3, 9, 11), (4, 64, 16, 16)]:
        y = (torch.randn(N, C, H, W, generator=g) * 2 + 0.5).to(dtype)
        if layout == "channels_last":
            y = y.contiguous(memory_format=torch.channels_last)
        w = torch.rand(C, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32) + 0.5
        b = torch.randn(C, generator=g).to(w.dtype)
        gout = torch.randn(N, C, H, W, generator=g).to(dtype)

        def run(y, w, b, fn):
            y, w, b = (t.detach().clone().requires_grad_(True) for t in (y, w, b))
            out = fn(y, w, b)
            grads = torch.autograd.grad((out.float() * gout.float()).sum(), [y, w, b])
            return [out.detach().double(), *(t.double() for t in grads)]

        fused = run(y, w, b, lambda y, w, b: torch.ops.lavae_fast.lrelu_batch_norm(y, w, b, 0.01, 1e-5)[0])
        want = run(y.double(), w.double(), b.double(), lambda y, w, b: norm.reference_forward(
            y, w, b, 0.01, 1e-5)[0])
        tol = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 5e-2}[dtype]
        for what, a, e in zip(["out", "grad y", "grad weight", "grad bias"], fused, want):
            scale = float(e.abs().max().clamp(min=1.0))
            err = float((a - e).abs().max())
            assert err <= tol * scale, f"{variant} {layout} {dtype} {(N, C, H, W)} {what}: {err:.3g}"


def test_variants_agree_bit_for_bit_on_counts_and_draws(ext):
    # The discrete outputs (counts, Gumbel draws) must not depend on the variant at all.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 4096, generator=g) * 4
    gumbel = -torch.log(-torch.log(torch.rand(8, 4096, generator=g)))
    n = torch.full((8,), 10)
    h = torch.randn(8, 64, 64, generator=g) * 5
    before = _backends.cpu_capability()
    results = {}
    try:
        for name in _available():
            _backends.set_cpu_capability(name)
            results[name] = (ops.gumbel_topk_relaxed(logits, n, 0.3, 10, gumbel)[0], ops.count_objects(h, 2.0, 10))
    finally:
        _backends.set_cpu_capability(before)
    first = next(iter(results.values()))
    for name, (idx, cnt) in results.items():
        assert torch.equal(idx, first[0]) and torch.equal(cnt, first[1]), name


def test_variants_agree_bit_for_bit_on_windowed_draws(ext):
    # The draws with an exclusion window (SPEC §2) do not depend on the variant either, and are the
    # reference's (ties included: integer-valued logits tie often).
    g = torch.Generator().manual_seed(8)
    logits = torch.randint(0, 6, (8, 4096), generator=g).float()
    gumbel = -torch.log(-torch.log(torch.rand(8, 4096, generator=g))).round()
    n = torch.full((8,), 10)
    before = _backends.cpu_capability()
    results = {}
    try:
        for name in _available():
            _backends.set_cpu_capability(name)
            results[name] = [ops.gumbel_topk_relaxed(logits, n, 0.3, 10, gumbel, window=w, canvas=(64, 64))[0]
                             for w in (3, 5, 7)]
    finally:
        _backends.set_cpu_capability(before)
    want = [ref.gumbel_topk_relaxed(logits, n, 0.3, 10, gumbel, window=w, canvas=(64, 64))[0] for w in (3, 5, 7)]
    for name, idx in results.items():
        for w, a, b in zip((3, 5, 7), idx, want):
            assert torch.equal(a, b), f"{name} window {w}"


# ---------------------------------------------------------------------------------------------
# Choosing the variant
# ---------------------------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_default_choice_is_the_best_variant_this_cpu_runs(ext):
    flags = _cpu_flags()
    if not flags or sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("needs /proc/cpuinfo on x86-64 Linux")
    expected = ["default"]
    if {"avx2", "fma", "bmi2", "f16c"} <= flags:
        expected.append("avx2")
        if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            expected.append("avx512")
    assert _available() == expected
    env = {k: v for k, v in os.environ.items() if k not in ("LAVAE_FAST_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    assert _capability_in_subprocess(env) == expected[-1]


def _child_env(env) -> dict:
    """``env`` with the tested package first on the path; children also run outside the checkout
    (cwd): from the repository root, `python -c` would import the source folder, which has no _C
    after a plain install."""
    import lavae_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(lavae_fast.__file__)))
    return dict(env, PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))


def _capability_in_subprocess(env) -> str:
    code = textwrap.dedent("""
        import torch
        from lavae_fast import _backends, ops
        ops.count_objects(torch.zeros(1, 3, 3), 1.0, 1)   # the first call chooses
        print("CAP", _backends.cpu_capability())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(env),
                          cwd=tempfile.gettempdir(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.search(r"CAP (\S+)", proc.stdout).group(1)


@pytest.mark.parametrize("var", ["LAVAE_FAST_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"])
def test_environment_caps_the_variant(ext, var):
    base = {k: v for k, v in os.environ.items() if k not in ("LAVAE_FAST_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    for name in _available():
        assert _capability_in_subprocess(dict(base, **{var: name})) == name
    # A cap above what the CPU runs gives the best it runs.
    assert _capability_in_subprocess(dict(base, **{var: "AVX512"})) == _available()[-1]


def test_unknown_capability_is_refused_with_its_name(ext):
    with pytest.raises(ValueError, match="unknown CPU capability 'avx9000'"):
        _backends.set_cpu_capability("avx9000")
    base = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = "import torch; from lavae_fast import ops; ops.count_objects(torch.zeros(1, 3, 3), 1.0, 1)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_child_env(dict(base, LAVAE_FAST_CPU_CAPABILITY="sse9")), cwd=tempfile.gettempdir())
    assert proc.returncode != 0
    assert "LAVAE_FAST_CPU_CAPABILITY=sse9 is not a known CPU capability" in proc.stderr


def test_backends_line_names_the_variant(ext):
    assert f"C++ kernels ({_backends.cpu_capability()})" in _backends.describe()


# ---------------------------------------------------------------------------------------------
# The instruction sets stay inside their variant
# ---------------------------------------------------------------------------------------------


def test_wide_instructions_only_inside_their_variant(ext):
    # Library code that the variants share (ATen inlines, std templates) is compiled in each
    # variant's translation unit and merged by the linker; if the copy kept were an AVX-512 one,
    # an AVX2 machine would die of SIGILL in it. So: zmm registers only in lavae_fast::avx512::,
    # VEX/EVEX-encoded instructions (v...) only in lavae_fast::avx2:: and lavae_fast::avx512::.
    if shutil.which("objdump") is None or os.uname().machine != "x86_64":
        pytest.skip("needs objdump on x86-64")
    import lavae_fast._C as C

    proc = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", C.__file__], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    current, bad, seen = None, [], {"avx2": 0, "avx512": 0}
    tile_fma = {"avx2": set(), "avx512": set()}  # register widths of the FMAs in the correlation tiles
    for line in proc.stdout.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            current = head.group(1)
            continue
        parts = line.split("\t")
        if current is None or len(parts) < 2:
            continue
        insn = parts[1].strip()
        in512 = "lavae_fast::avx512::" in current
        in2 = "lavae_fast::avx2::" in current
        if "%zmm" in insn:
            seen["avx512"] += 1
            if not in512:
                bad.append((current, insn))
        elif insn.startswith("v") and not (in512 or in2):
            bad.append((current, insn))
        elif "%ymm" in insn and in2:
            seen["avx2"] += 1
        if insn.startswith("vfmadd") and "::corr_tile<float" in current and (in2 or in512):
            tile_fma["avx512" if in512 else "avx2"].update(re.findall(r"%([xyz])mm", insn))
    assert not bad, f"{len(bad)} wide instructions outside their variant, e.g. {bad[:5]}"
    # The variants really compute at their width: the hot tile's FMAs are on ymm (AVX2) and zmm
    # (AVX-512) registers. (A build whose vector width came from __AVX2__/__AVX512F__, which GCC does
    # not define after `#pragma GCC target` in C++, ran every variant on 16-byte xmm vectors.)
    assert tile_fma == {"avx2": {"y"}, "avx512": {"z"}}, tile_fma
    assert seen["avx512"] > 1000 and seen["avx2"] > 1000, seen


# ---------------------------------------------------------------------------------------------
# Guard: the C++ kernels are never slower than the PyTorch fallback on this machine
# ---------------------------------------------------------------------------------------------


def _median_interleaved(fns, rounds=5):
    times = [[] for _ in fns]
    for f in fns:
        f()  # warm-up
    for _ in range(rounds):
        for k, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in times]


def _guard_cases():
    """name -> (C++ call, fallback call): each op's forward then its backward op, with the same
    arguments, through the registered C++ kernels and through the reference fallbacks that
    lavae_fast.ops registers for a build without them."""
    from lavae_fast import norm

    lib = torch.ops.lavae_fast
    g = torch.Generator().manual_seed(6)
    B, M, H, W, K = 16, 10, 48, 48, 64
    D = H * W
    eps = 1e-4
    nm = torch.full((B,), M)
    cases = {}

    def pair(fwd_cpp, bwd_cpp, fwd_ref, bwd_ref, bwd_args):
        def run(fwd, bwd):
            out = fwd()
            bwd(*bwd_args(out))
        return (lambda: run(fwd_cpp, bwd_cpp), lambda: run(fwd_ref, bwd_ref))

    for C, S in ((1, 17), (3, 21)):
        x = (torch.rand(B, C, H, W, generator=g) < 0.3).float()
        sprites = torch.rand(B, M, C, S, S, generator=g)
        index = torch.stack([torch.randperm(D, generator=g)[:M] for _ in range(B)])
        for mode in ("index", "dense"):
            loc = one_hot_maps(index, nm, H, W, torch.float32) if mode == "index" else \
                torch.rand(B, M, H, W, generator=g) / D
            idx = index if mode == "index" else None
            gl = torch.randn(B, generator=g)
            args = (x, sprites, loc, nm, idx, eps)

            def bwd_args(out, x=x, sprites=sprites, loc=loc, idx=idx, gl=gl):
                return (gl, None, x, sprites, loc, nm, idx, out[1], eps, True, True)

            cases[f"place_loglik {mode} C={C}"] = pair(
                lambda a=args: lib.place_loglik(*a), lib.place_loglik_backward,
                lambda a=args: ref._fallback_place_loglik(*a), ref._fallback_place_loglik_backward, bwd_args)

    logits = torch.randn(B, D, generator=g) * 4
    gumbel = -torch.log(-torch.log(torch.rand(B, D, generator=g)))
    gr, gq = torch.randn(B, M, D, generator=g), torch.randn(B, generator=g)
    cases["gumbel_topk_relaxed"] = pair(
        lambda: lib.gumbel_topk_relaxed(logits, nm, 0.3, M, gumbel), lib.gumbel_topk_relaxed_backward,
        lambda: ref._fallback_gumbel_topk_relaxed(logits, nm, 0.3, M, gumbel),
        ref._fallback_gumbel_topk_relaxed_backward,
        lambda out: (gr, gq, logits, out[2], out[0], nm, 0.3, 1, None, gumbel))  # the noise, as autograd passes it

    h = torch.randn(B, H, W, generator=g) * 5
    cases["count_objects"] = (lambda: lib.count_objects(h, 2.0, M), lambda: ref._fallback_count_objects(h, 2.0, M))

    h_app = torch.randn(B, K, H, W, generator=g)
    index = torch.stack([torch.randperm(D, generator=g)[:M] for _ in range(B)])
    maps = one_hot_maps(index, nm, H, W, torch.float32)
    go = torch.randn(B, M, K, generator=g)
    cases["gather_appearance index"] = pair(
        lambda: lib.gather_appearance(h_app, maps, nm, index), lib.gather_appearance_backward,
        lambda: ref._fallback_gather_appearance(h_app, maps, nm, index), ref._fallback_gather_appearance_backward,
        lambda out: (go, h_app, maps, nm, index, True, True))

    y = torch.randn(B, 44, H, W, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(44, generator=g) + 0.5, torch.randn(44, generator=g)
    gy = torch.randn(B, 44, H, W, generator=g).contiguous(memory_format=torch.channels_last)
    cases["lrelu_batch_norm"] = pair(
        lambda: lib.lrelu_batch_norm(y, w, b, 0.01, 1e-5), lib.lrelu_batch_norm_backward,
        lambda: norm.reference_forward(y, w, b, 0.01, 1e-5), norm.reference_backward,
        lambda out: (gy, y, w, out[1], out[2], 0.01, True, True, True))
    return cases


def test_cpp_ops_are_not_slower_than_the_pytorch_fallback(ext):
    # The issue this guards against: 64-byte vectors compiled for AVX2 ran the placement 4x
    # slower than the pure-PyTorch fallback. Medians of interleaved rounds; each op (forward, then its
    # backward op) must beat the fallback that would run without the extension.
    cases = _guard_cases()
    slow = []
    for name, (cpp, fallback_fn) in cases.items():
        fused, fallback = _median_interleaved([cpp, fallback_fn])
        print(f"{name}: C++ {fused * 1e3:.2f} ms, fallback {fallback * 1e3:.2f} ms")
        if fused >= fallback:
            slow.append(f"{name}: C++ {fused * 1e3:.2f} ms >= fallback {fallback * 1e3:.2f} ms")
    assert not slow, f"({_backends.cpu_capability()} kernels) " + "; ".join(slow)
