"""Process-level CPU settings for a fast training step: the memory allocator and threads.

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
import sys
from typing import Optional

import torch

__all__ = ["tune_allocator", "allocator_tuned", "set_threads"]

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
