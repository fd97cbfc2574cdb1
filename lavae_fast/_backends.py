"""Loading of the optional compiled backends: the C++ CPU kernels and the Triton CUDA kernels.

The op schemas live in :mod:`lavae_fast.ops` and exist without either backend; each backend only
registers implementations for its device when it is imported. A missing backend is never an
import error: the op falls back to the plain-PyTorch reference, and we say so once.
"""

from __future__ import annotations

import importlib
import os
import warnings

BUILD_HINT = "build it with `pip install --no-build-isolation .` from the repository root"

cpu_kernels_loaded = False
cpu_kernels_error: str | None = None
triton_kernels_loaded = False
triton_kernels_error: str | None = None


def load_cpu_kernels() -> bool:
    """Import ``lavae_fast._C`` (registers the CPU kernels). Warns once if it is absent."""
    global cpu_kernels_loaded, cpu_kernels_error
    if cpu_kernels_loaded or cpu_kernels_error is not None:
        return cpu_kernels_loaded
    if os.environ.get("LAVAE_FAST_DISABLE_EXTENSION") == "1":
        cpu_kernels_error = "disabled by LAVAE_FAST_DISABLE_EXTENSION=1"
        return False
    try:
        importlib.import_module("lavae_fast._C")
        cpu_kernels_loaded = True
    except ImportError as exc:  # not built, or built against another torch
        cpu_kernels_error = str(exc)
        warnings.warn(
            "lavae_fast: the C++ extension (lavae_fast._C) is not available "
            f"({exc}); CPU tensors use the slower PyTorch reference ops. To get the fused CPU "
            f"kernels, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return cpu_kernels_loaded


def cpu_capability() -> str | None:
    """The C++ kernel variant CPU tensors run ("default", "avx2" or "avx512"), or None without ``_C``.

    One build holds every variant; the best one this CPU runs is chosen at the first op call,
    capped by ``LAVAE_FAST_CPU_CAPABILITY`` (or else ``ATEN_CPU_CAPABILITY``, which caps PyTorch's
    own kernels the same way).
    """
    if not load_cpu_kernels():
        return None
    from lavae_fast import _C

    return _C.cpu_capability()


def available_cpu_capabilities() -> list[str]:
    """The C++ kernel variants built in and runnable on this CPU, in increasing order."""
    if not load_cpu_kernels():
        return []
    from lavae_fast import _C

    return list(_C.available_cpu_capabilities())


def set_cpu_capability(name: str) -> None:
    """Switch the C++ kernel variant (tests and benchmarks compare variants in one process).

    Raises ValueError for an unknown variant or one this CPU cannot run, RuntimeError without ``_C``.
    """
    if not load_cpu_kernels():
        raise RuntimeError(f"lavae_fast._C is not loaded ({cpu_kernels_error}); {BUILD_HINT}")
    from lavae_fast import _C

    _C.set_cpu_capability(name)


def load_triton_kernels() -> bool:
    """Import ``lavae_fast.kernels`` (registers the CUDA kernels) when CUDA and Triton are present."""
    global triton_kernels_loaded, triton_kernels_error
    if triton_kernels_loaded or triton_kernels_error is not None:
        return triton_kernels_loaded
    import torch

    if not torch.cuda.is_available():
        triton_kernels_error = "no CUDA device"
        return False
    try:
        module = importlib.import_module("lavae_fast.kernels")
        module.register_cuda_kernels()
        triton_kernels_loaded = True
    except Exception as exc:  # triton missing or too old: CUDA tensors use the reference
        triton_kernels_error = str(exc)
        warnings.warn(
            f"lavae_fast: Triton kernels unavailable ({exc}); CUDA tensors use the PyTorch "
            "reference ops. Install the pinned triton (see requirements.txt).",
            RuntimeWarning,
            stacklevel=3,
        )
    return triton_kernels_loaded


def describe() -> str:
    """One line saying which implementation serves each device."""
    cpu = f"C++ kernels ({cpu_capability()})" if cpu_kernels_loaded else f"reference ({cpu_kernels_error})"
    cuda = "Triton kernels" if triton_kernels_loaded else f"reference ({triton_kernels_error})"
    return f"CPU: {cpu}; CUDA: {cuda}"
