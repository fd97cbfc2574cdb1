"""The op schemas' one source (lavae_fast/op_schemas.inc), and the CMake build of csrc/
(CMakeLists.txt) with its C++ test executable, so that they cannot rot.

The schema checks run by default (no build needed). The builds take minutes on a 2-core machine
and are marked slow:  pytest -m slow tests/test_cmake_build.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

import lavae_fast.norm  # noqa: F401  (with lavae_fast.ops, defines every op of the namespace)
from lavae_fast import _backends, _schemas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SOURCE = os.path.join(ROOT, "tests", "cpp", "test_kernels.cpp")


def _normalise(schema: str) -> str:
    return str(torch._C.parse_schema(schema))


def _file_schemas() -> list[str]:
    return [_normalise("lavae_fast::" + s) for s in _schemas.SCHEMAS.values()]


def _defined_schemas() -> dict[str, str]:
    # Every op of the lavae_fast namespace that Python defined (lavae_fast.ops and lavae_fast.norm).
    return {s.name: _normalise(str(s)) for s in torch._C._jit_get_all_schemas() if s.name.startswith("lavae_fast::")}


def test_python_defines_exactly_the_schema_file():
    # engine/ops.py and engine/norm.py define their ops from lavae_fast/op_schemas.inc: every op of
    # the file, and no op that is not in it.
    defined = _defined_schemas()
    assert sorted(defined.values()) == sorted(_file_schemas())
    assert set(defined) == {"lavae_fast::" + n for n in _schemas.SCHEMAS}


def test_schema_file_is_strict(tmp_path):
    # A line the C++ driver would read differently (wrapped, without its comma, two literals) is an
    # error, not skipped; so is a repeated op name.
    for bad in ['"f(Tensor x) -> Tensor"', '"f(Tensor x)" " -> Tensor",', "f(Tensor x) -> Tensor,",
                '"f(Tensor x) -> Tensor",\n"f(Tensor y) -> Tensor",']:
        path = tmp_path / "s.inc"
        path.write_text("// comment\n\n" + bad + "\n")
        with pytest.raises(ValueError):
            _schemas.read(str(path))
    path.write_text('// c\n"f(Tensor x) -> Tensor",\n"g(Tensor x) -> Tensor",\n')
    assert _schemas.read(str(path)) == {"f": "f(Tensor x) -> Tensor", "g": "g(Tensor x) -> Tensor"}


def test_cpp_driver_reads_the_schema_file():
    # The C++ driver defines the ops from the same file (no second copy of any schema), and the
    # CMake build gives it the file's directory.
    src = open(TEST_SOURCE).read()
    assert re.search(r'kSchemas\[\]\s*=\s*\{\s*#include "op_schemas.inc"\s*\};', src)
    assert "check_registrations();" in src
    for name in _schemas.SCHEMAS:
        assert f'"{name}(' not in src, name
    assert "${CMAKE_CURRENT_SOURCE_DIR}/lavae_fast" in open(os.path.join(ROOT, "CMakeLists.txt")).read()


def test_every_schema_has_a_cpu_kernel_and_every_cpu_kernel_a_schema(ext):
    # What the C++ driver checks at start-up, checked here in the process Python runs.
    for name in _schemas.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lavae_fast::{name}", "CPU"), name
    dangling = [str(d) for d in torch._C._dispatch_find_dangling_impls()]
    assert not [d for d in dangling if "lavae_fast::" in d], dangling


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
    # The registrations of csrc/ were checked against the schema file, then every kernel variant
    # this CPU runs was exercised (each has its own vector width and tiles).
    assert re.search(rf"^registrations: {len(_schemas.SCHEMAS)} ops, 0 failures$", out, re.M), out[-4000:]
    ran = re.findall(r"^variant (\S+): 0 failures$", out, re.M)
    assert ran, out[-4000:]
    if _backends.cpu_kernels_loaded:
        assert ran == _backends.available_cpu_capabilities(), (ran, out[-2000:])
    return out


@pytest.mark.slow
def test_cmake_build_and_run(tmp_path):
    exe = _build(tmp_path, sanitize=False)
    _run(exe)
    # The schemas compiled into the driver are the ones Python defined.
    printed = subprocess.run([exe, "--print-schemas"], capture_output=True, text=True, check=True).stdout
    assert sorted(_normalise(s) for s in printed.splitlines()) == sorted(_defined_schemas().values())


@pytest.mark.slow
def test_cmake_sanitized_build_and_run(tmp_path):
    # AddressSanitizer + UndefinedBehaviorSanitizer over the same checks: any out-of-bounds read or
    # write in the kernels (tails, borders, sprites larger than the canvas) aborts the run.
    # libtorch itself is not instrumented and keeps allocations alive at exit: no leak check.
    exe = _build(tmp_path, sanitize=True)
    out = _run(exe, {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert "runtime error" not in out and "AddressSanitizer" not in out, out[-4000:]
