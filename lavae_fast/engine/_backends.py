"""Loading of the optional compiled backends: the C++ CPU kernels and the Triton CUDA kernels.

The op schemas live in :mod:`lavae_fast.ops` and exist without either backend. The C++ kernels
register themselves for CPU tensors when ``lavae_fast._C`` is imported; the Triton launchers
(:func:`kernels_package`, which imports nothing of lavae_fast) are registered for CUDA tensors by
:func:`lavae_fast.ops.register_triton_kernels`, passed to :func:`load_triton_kernels`. A missing
backend is never an import error: the op falls back to the plain-PyTorch reference, and we say so once.
"""

from __future__ import annotations

import importlib
import importlib.util
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
    stale = _stale_extension()
    if stale is not None:
        cpu_kernels_error = stale
        warnings.warn(f"lavae_fast: {stale}; CPU tensors use the slower PyTorch reference ops. To get the fused "
                      f"CPU kernels, {BUILD_HINT} again.", RuntimeWarning, stacklevel=3)
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


def _stale_extension() -> str | None:
    """Why the built ``lavae_fast._C`` must not be loaded, or None (also when there is none to find,
    which the import then reports): it was built from other op schemas than this package's."""
    from . import _schemas

    spec = importlib.util.find_spec("lavae_fast._C")
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    try:
        built = _schemas.extension_digest(spec.origin)
    except (OSError, ValueError) as exc:
        return f"the C++ extension lavae_fast._C ({spec.origin}) cannot be read ({exc})"
    want = _schemas.digest()
    if built != want:
        return (f"the C++ extension lavae_fast._C ({spec.origin}) was built from other op schemas than this package's "
                f"(a stale build: schema digest {built or 'absent'}, the package's {want}); loading it would "
                "abort the process")
    return None


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


def kernels_package(submodule: str | None = None):
    """The Triton kernels' package, or its module ``submodule`` ("testing", "gumbel", …):
    ``lavae_fast.kernels`` (an installation, an editable one
    included: setup.py maps the top-level kernels/ folder to that name), else — tests run from a
    source checkout on ``sys.path`` without an install — that checkout's own ``kernels`` folder,
    imported by its name when it is the folder beside this package. Raises ImportError otherwise
    (and when triton is missing)."""
    suffix = "" if submodule is None else f".{submodule}"
    try:
        return importlib.import_module("lavae_fast.kernels" + suffix)
    except ModuleNotFoundError as exc:
        if exc.name != "lavae_fast.kernels":
            raise
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkout = os.path.join(os.path.dirname(package), "kernels", "__init__.py")
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or not os.path.isfile(checkout) or not os.path.samefile(spec.origin, checkout):
        raise ModuleNotFoundError("lavae_fast.kernels is not installed: install the package (from a source "
                                  "checkout, `pip install -e . --no-build-isolation`)", name="lavae_fast.kernels")
    return importlib.import_module("kernels" + suffix)


def load_triton_kernels(register) -> bool:
    """Register the Triton kernels for CUDA tensors when CUDA and Triton are present:
    ``register(package)`` with the kernels' package (:func:`kernels_package`), ``register`` being
    :mod:`lavae_fast.ops`' registration. Warns once when they cannot be loaded."""
    global triton_kernels_loaded, triton_kernels_error
    if triton_kernels_loaded or triton_kernels_error is not None:
        return triton_kernels_loaded
    import torch

    if not torch.cuda.is_available():
        triton_kernels_error = "no CUDA device"
        return False
    try:
        register(kernels_package())
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
