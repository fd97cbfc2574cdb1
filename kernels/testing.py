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

Like the rest of the package this module imports nothing of lavae_fast: the registration is
:func:`lavae_fast.ops.register_triton_kernels`, passed in by the caller.
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


def register_interpreter_kernels(register) -> None:
    """Register the Triton launchers as the CPU implementations of the lavae_fast ops:
    ``register("cpu")`` once the interpreter is checked, ``register`` being
    :func:`lavae_fast.ops.register_triton_kernels` (which refuses while the C++ CPU kernels are loaded)."""
    _require_interpreter()
    register("cpu")


def launchers():
    """The launchers by op name, checked to run under the interpreter."""
    _require_interpreter()
    from . import LAUNCHERS

    return dict(LAUNCHERS)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU target, without a GPU
# ---------------------------------------------------------------------------------------------
#
# The interpreter checks what the kernels compute but not that they compile: types of loop-carried
# values, tl.dot shapes, register pressure. Triton ships ptxas, so every specialization the
# launchers would launch can be compiled to a cubin for, say, sm_90 on a CPU-only machine. The
# launchers are run on CPU tensors with each kernel replaced by a recorder (nothing is launched;
# the launchers' outputs are then meaningless), and each recorded launch is compiled.

_TORCH_TO_TRITON = {"float32": "fp32", "float64": "fp64", "int64": "i64", "int32": "i32", "bool": "i1"}


class _Recorder:
    def __init__(self, kernel, records):
        self.kernel = kernel
        self.records = records

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **kwargs):
            import torch

            kernel = self.kernel
            params = {p.name: p for p in kernel.params}
            values = dict(zip(kernel.arg_names, args))
            values.update(kwargs)
            signature, constexprs = {}, {}
            for name in kernel.arg_names:
                v = values[name]
                if params[name].is_constexpr:
                    signature[name] = "constexpr"
                    constexprs[name] = v
                elif isinstance(v, torch.Tensor):
                    signature[name] = "*" + _TORCH_TO_TRITON[str(v.dtype).replace("torch.", "")]
                elif isinstance(v, bool):
                    signature[name] = "i1"
                elif isinstance(v, int):
                    signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                elif isinstance(v, float):
                    signature[name] = "fp32"
                else:
                    raise TypeError(f"{kernel.__name__}: cannot type argument {name}={v!r}")
            self.records.append((kernel, signature, constexprs, num_warps))

        return launch


def record_launches(fn, *args, **kwargs):
    """Run a launcher with its kernels replaced by recorders: [(kernel, signature, constexprs, num_warps)]."""
    from triton.runtime.jit import JITFunction

    from . import count, gather, gumbel, place

    records = []
    patched = []
    try:
        for module in (place, gumbel, count, gather):
            for name, obj in list(vars(module).items()):
                if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                    patched.append((module, name, obj))
                    setattr(module, name, _Recorder(obj, records))
        fn(*args, **kwargs)
    finally:
        for module, name, obj in patched:
            setattr(module, name, obj)
    return records


def compile_for_target(records, arch: int = 90):
    """Compile recorded launches for CUDA sm_<arch>; [(kernel name, constexprs, registers, spilled bytes)].

    Registers and spills are read from the cubin with the cuobjdump that ships with Triton
    (None when it is missing).
    """
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    seen = set()
    out = []
    for kernel, signature, constexprs, num_warps in records:
        key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), num_warps)
        if key in seen:
            continue
        seen.add(key)
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        regs = spill = None
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+).*LOCAL:(\d+)", usage)
            if m:
                regs, spill = int(m.group(1)), int(m.group(2))
        out.append((kernel.__name__, dict(constexprs, num_warps=num_warps, dtype=signature.get("x_ptr") or next(
            (v for v in signature.values() if v.startswith("*fp")), "?")), regs, spill))
    return out
