"""Test-only entry point: run the Triton launchers on CPU tensors under ``TRITON_INTERPRET=1``.

The interpreter executes each program instance in Python/NumPy, so the kernels' indexing,
masking and arithmetic can be checked on a machine without a GPU. ``TRITON_INTERPRET`` must be
set before ``triton`` is first imported; run such tests in a process of their own (the main
suite does: ``tests/test_triton.py`` runs ``tests/triton_interpret`` in a subprocess).

Two ways in:
* call the launchers directly (:data:`LAUNCHERS`, same signatures as the op schemas);
* :func:`register_interpreter_kernels` makes them the ops' CPU implementations, so that the
  public API of :mod:`lavae_fast.ops` (autograd, opcheck, gradcheck) runs through them. Start the
  process with ``LAVAE_FAST_DISABLE_EXTENSION=1`` so that the C++ CPU kernels are not loaded:
  the two would otherwise compete for the same dispatch key.
"""

from __future__ import annotations

import os


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _require_interpreter() -> None:
    if not interpreter_active():
        raise RuntimeError(
            "lavae_fast.kernels.testing needs TRITON_INTERPRET=1 set before triton is imported "
            "(run the interpreted tests in their own process: see tests/test_triton.py)"
        )
    from triton.runtime.interpreter import InterpretedFunction

    from .place import _place_fwd_index_kernel

    # The kernels were decorated when this package was first imported: if triton read the
    # variable only later, they are compiled functions and would fail obscurely on CPU tensors.
    if not isinstance(_place_fwd_index_kernel, InterpretedFunction):
        raise RuntimeError("lavae_fast.kernels was imported before TRITON_INTERPRET=1 was set in this process")


def register_interpreter_kernels() -> None:
    """Register the Triton launchers as the CPU implementations of the lavae_fast ops."""
    _require_interpreter()
    from lavae_fast import _backends

    if _backends.cpu_kernels_loaded:
        raise RuntimeError(
            "the C++ CPU kernels are loaded in this process; start it with LAVAE_FAST_DISABLE_EXTENSION=1"
        )
    from . import register_kernels

    register_kernels("cpu")


def launchers():
    """The launchers by op name, checked to run under the interpreter."""
    _require_interpreter()
    from . import LAUNCHERS

    return dict(LAUNCHERS)
