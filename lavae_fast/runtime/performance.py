"""Process-level settings for a fast training step: the memory allocator, threads, and whether
the device computes bf16 natively (:func:`bf16_native`).

The model-level switches (channels-last, ``torch.compile``, bf16 autocast) live on the model
(:meth:`lavae_fast.LAVAE.accelerate`); this module holds what applies to the whole process.

Why the allocator matters (measured, issue 5): at B = 64, 64×64 one activation of the inference
nets is [64, 44, 64, 64] float32 = 46 MB. glibc's malloc serves any block above 32 MB with a fresh
``mmap`` and unmaps it on ``free``, so each of the ~200 such tensors of a training step is
page-faulted in and zeroed by the kernel again, every step: an eager step spends ~40% of its time
there (9.6 s → 5.7 s with the setting below). Turning off malloc's use of ``mmap`` and its
trimming of the heap keeps freed blocks in the process for the next step, as a caching allocator
would. The cost: memory freed by the step is not returned to the OS until exit (the peak of one
step stays resident, which a training process would touch again at the next step anyway).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from typing import Optional, Tuple

import torch

__all__ = ["tune_allocator", "allocator_tuned", "set_threads", "bf16_native", "bf16_native_from_cpu_flags",
           "BF16_EMULATED_SLOWDOWN"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX_DEFAULT = 65536
_GLIBC_TRIM_THRESHOLD_DEFAULT = 128 * 1024

_tuned = False


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 — musl and other libcs have no mallopt
        libc.gnu_get_libc_version  # noqa: B018 — glibc only: its mallopt has the meaning we rely on
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator(enable: bool = True) -> bool:
    """Keep large freed blocks in the process (glibc: no ``mmap`` for big blocks, no heap trim).

    ``enable=False`` restores glibc's defaults for later allocations (a heap that has already grown
    keeps serving big blocks from its free memory, so this does not make a process behave like a
    fresh one again). Returns True when the setting took effect; False on
    a platform without glibc (macOS, Windows, musl), where nothing changes. The environment
    variable ``LAVAE_FAST_TUNE_ALLOCATOR=0`` turns the tuning off everywhere.
    """
    global _tuned
    if enable and os.environ.get("LAVAE_FAST_TUNE_ALLOCATOR", "1") == "0":
        return False
    libc = _libc()
    if libc is None:
        return False
    if enable:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    else:
        ok = (libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD_DEFAULT) == 1)
    _tuned = bool(enable and ok)
    return ok


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` is in effect."""
    return _tuned


def set_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads (default: the CPUs this process may run on). Returns it."""
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------------------------------------
# bf16: native or emulated
# ---------------------------------------------------------------------------------------------

# x86 flags (Linux /proc/cpuinfo names) of the instructions that compute bf16 dot products:
# AVX-512 BF16 (vdpbf16ps; Cooper Lake, Sapphire Rapids, Zen 4 and later) and AMX-BF16 (tiles;
# Sapphire Rapids and later). Without either, oneDNN runs a bf16 convolution by converting to
# float32 and back around float32 arithmetic: slower than plain float32, not faster.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

# Reported from the CI's AVX2-only machines: bf16 training (tests/test_speed.py's 200-step curve)
# ~9× slower than on an AVX-512 BF16 one. Measured here (AVX-512 BF16 CPU, one thread, a 44-channel
# 3×3 convolution on [8, 44, 48, 48], forward and backward): 31 ms in bf16 against 51 ms in
# float32; with oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) 251 ms in bf16, capped to AVX-512
# without BF16 (AVX512_CORE) 129 ms. ATEN_CPU_CAPABILITY=avx2 alone leaves oneDNN's choice alone.
BF16_EMULATED_SLOWDOWN = 9

# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) that still include native bf16; any
# other cap (SSE41, AVX2, AVX2_VNNI, AVX512_CORE, AVX512_CORE_VNNI, ...) makes its bf16 emulated
# even on a CPU that has the instructions (measured: the AVX512_CORE cap, above).
_ONEDNN_BF16_ISA = re.compile(r"BF16|FP16|AMX|AVX10|^ALL$|^DEFAULT$")


def bf16_native_from_cpu_flags(flags: str) -> Tuple[bool, str]:
    """Whether a CPU with these flags computes bf16 natively, and why: ``flags`` is the flags line
    of Linux's /proc/cpuinfo (``"fpu vme ... avx512_bf16 ..."``; a leading ``"flags :"`` and the
    whole file are accepted too, the first flags line is read)."""
    for line in flags.splitlines():
        if line.startswith("flags") and ":" in line:
            flags = line.split(":", 1)[1]
            break
    have = set(flags.split())
    found = [f for f in _BF16_CPU_FLAGS if f in have]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    isa = "AVX-512" if "avx512f" in have else "AVX2" if "avx2" in have else "this x86 ISA" if have else "no flags"
    return False, (f"the CPU has neither {' nor '.join(_BF16_CPU_FLAGS)} ({isa}): bf16 would be emulated, "
                   f"~{BF16_EMULATED_SLOWDOWN}x slower than on a CPU with them and slower than float32")


def _read_cpuinfo() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def bf16_native(device="cpu") -> Tuple[bool, str]:
    """Whether ``device`` computes bf16 natively (so that bf16 autocast is a speed-up), and why.

    CPU: read from the CPU's own flags (:func:`bf16_native_from_cpu_flags` on /proc/cpuinfo), not
    from a library's answer: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` says True on any
    AVX-512 CPU, where bf16 is emulated. A oneDNN ISA cap in the environment (ONEDNN_MAX_CPU_ISA or
    DNNL_MAX_CPU_ISA below AVX512_CORE_BF16) makes it emulated too and is honoured. Anywhere the
    flags cannot be read (macOS, Windows, a non-x86 Linux): not native — float32 is the safe choice.
    CUDA: ``torch.cuda.is_bf16_supported()``. Other devices: not native.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        name = torch.cuda.get_device_name(dev)
        if torch.cuda.is_bf16_supported():
            return True, f"{name} supports bf16 (torch.cuda.is_bf16_supported())"
        return False, f"{name} does not support bf16 natively (torch.cuda.is_bf16_supported() is False)"
    if dev.type != "cpu":
        return False, f"no bf16 detection for device type {dev.type!r}: assuming emulated"
    if not sys.platform.startswith("linux"):
        return False, f"cannot read the CPU's flags on {sys.platform} (Linux /proc/cpuinfo only): assuming emulated"
    info = _read_cpuinfo()
    if info is None or "flags" not in info:
        return False, "no x86 flags in /proc/cpuinfo (not an x86 CPU, or unreadable): assuming emulated"
    native, why = bf16_native_from_cpu_flags(info)
    if native:
        for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            cap = os.environ.get(var, "").strip().upper()
            if cap and not _ONEDNN_BF16_ISA.search(cap):
                return False, f"{why}, but {var}={cap} caps oneDNN below AVX512_CORE_BF16: bf16 would be emulated"
    return native, why
