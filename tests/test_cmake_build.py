"""The CMake build of csrc/ (CMakeLists.txt) and its C++ test executable, so that they cannot rot.

The schema check runs by default (it parses tests/cpp/test_kernels.cpp, no build needed). The
builds take minutes on a 2-core machine and are marked slow:  pytest -m slow tests/test_cmake_build.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

import lavae_fast.ops  # noqa: F401  (defines the schemas)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SOURCE = os.path.join(ROOT, "tests", "cpp", "test_kernels.cpp")


def _normalise(schema: str) -> str:
    return str(torch._C.parse_schema(schema))


def _python_schemas() -> list[str]:
    names = ["place_loglik", "place_loglik_backward", "gumbel_topk_relaxed", "gumbel_topk_relaxed_backward",
             "count_objects", "gather_appearance", "gather_appearance_backward"]
    return [_normalise(str(getattr(torch.ops.lavae_fast, n).default._schema)) for n in names]


def test_cpp_test_schemas_match_python_definitions():
    # The C++ test defines the op schemas again (it runs without Python): they must be the ones
    # lavae_fast/ops.py defines, or the executable would test a different contract.
    src = open(TEST_SOURCE).read()
    block = re.search(r"kSchemas\[\]\s*=\s*\{(.*?)\};", src, re.S).group(1)
    schemas, current = [], ""
    # Adjacent string literals concatenate; a comma after a literal ends the entry.
    for literal, comma in re.findall(r'"((?:[^"\\]|\\.)*)"\s*(,?)', block):
        current += literal
        if comma:
            schemas.append(_normalise("lavae_fast::" + current))
            current = ""
    if current:
        schemas.append(_normalise("lavae_fast::" + current))
    assert schemas == _python_schemas()


def _build(tmp_path, sanitize: bool) -> str:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / ("asan" if sanitize else "release")
    cfg = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
           f"-DLAVAE_SANITIZE={'ON' if sanitize else 'OFF'}"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    jobs = os.environ.get("MAX_JOBS", "1")
    for cmd in [cfg, ["cmake", "--build", str(build), "-j", jobs]]:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-8000:]}"
    return str(build / "test_kernels")


def _run(exe: str, extra_env=None) -> str:
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.run([exe], capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "ALL OK" in out and " 0 failures" in out, out[-4000:]
    # Every kernel variant this CPU runs was exercised (each has its own vector width and tiles).
    from lavae_fast import _backends

    ran = re.findall(r"^variant (\S+): 0 failures$", out, re.M)
    assert ran, out[-4000:]
    if _backends.cpu_kernels_loaded:
        assert ran == _backends.available_cpu_capabilities(), (ran, out[-2000:])
    return out


@pytest.mark.slow
def test_cmake_build_and_run(tmp_path):
    exe = _build(tmp_path, sanitize=False)
    _run(exe)
    printed = subprocess.run([exe, "--print-schemas"], capture_output=True, text=True, check=True).stdout
    assert [_normalise(s) for s in printed.splitlines()] == _python_schemas()


@pytest.mark.slow
def test_cmake_sanitized_build_and_run(tmp_path):
    # AddressSanitizer + UndefinedBehaviorSanitizer over the same checks: any out-of-bounds read or
    # write in the kernels (tails, borders, sprites larger than the canvas) aborts the run.
    # libtorch itself is not instrumented and keeps allocations alive at exit: no leak check.
    exe = _build(tmp_path, sanitize=True)
    out = _run(exe, {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert "runtime error" not in out and "AddressSanitizer" not in out, out[-4000:]
