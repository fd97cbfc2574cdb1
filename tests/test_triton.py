"""The Triton kernels, checked without a GPU.

The kernels themselves run under TRITON_INTERPRET=1, which must be set before triton is
imported: ``test_interpreted_suite`` runs ``tests/triton_interpret`` in a fresh process with it
(and with the C++ CPU kernels disabled, so that the Triton launchers serve the ops' CPU tensors).
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
    cmd = [sys.executable, "-P", "-m", "pytest", "tests/triton_interpret", "-q", "-p", "no:cacheprovider"]
    # -P: import the same lavae_fast as this process (installed or editable), not ./lavae_fast.
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreted Triton suite failed (exit {proc.returncode}):\n{out[-20000:]}"
    # Guard against a run that collected nothing (exit 5 is already a failure above).
    assert " passed" in out and " failed" not in out, out[-5000:]


def test_launchers_match_op_schemas():
    import lavae_fast.ops  # noqa: F401  (defines the schemas)
    from lavae_fast.kernels import LAUNCHERS

    for name, fn in LAUNCHERS.items():
        schema = getattr(torch.ops.lavae_fast, name).default._schema
        expected = [a.name for a in schema.arguments]
        assert list(inspect.signature(fn).parameters) == expected, name


def test_every_op_has_a_launcher():
    import lavae_fast.ops  # noqa: F401
    from lavae_fast.kernels import LAUNCHERS

    ops = {
        "place_loglik", "place_loglik_backward", "gumbel_topk_relaxed", "gumbel_topk_relaxed_backward",
        "count_objects", "gather_appearance", "gather_appearance_backward",
    }
    assert set(LAUNCHERS) == ops


def test_testing_entry_point_refuses_without_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the interpreter")
    from lavae_fast.kernels import testing

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        testing.register_interpreter_kernels()


def test_cuda_registration_follows_the_device():
    from lavae_fast import _backends

    if torch.cuda.is_available():
        assert _backends.triton_kernels_loaded, _backends.triton_kernels_error
    else:
        assert not _backends.triton_kernels_loaded
        assert "no CUDA" in (_backends.triton_kernels_error or "")
