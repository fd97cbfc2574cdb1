"""Triton kernels for CUDA tensors, shipped as ``lavae_fast.kernels`` (SPEC §9).

Each launcher below has the signature and outputs of one op schema in :mod:`lavae_fast.ops`;
it allocates the outputs and launches the kernels of its module (``place``, ``gumbel``,
``count``, ``gather``; each module documents its kernels' minimum memory traffic).
:func:`register_cuda_kernels` registers them as the ops' CUDA implementations, which
:mod:`lavae_fast._backends` does when CUDA is available. Autograd, fake tensors and input
checks stay in :mod:`lavae_fast.ops`; the backward passes are ops of their own, registered here
as well. The same launchers run on CPU tensors under ``TRITON_INTERPRET=1``: see
:mod:`lavae_fast.kernels.testing`.

All kernels support float32 and float64 (contractions use ``tl.dot`` in IEEE precision).
"""

from __future__ import annotations

from .count import count_objects
from .gather import gather_appearance, gather_appearance_backward
from .gumbel import gumbel_topk_relaxed, gumbel_topk_relaxed_backward
from .place import place_loglik, place_loglik_backward

__all__ = ["LAUNCHERS", "register_cuda_kernels", "register_kernels"]

# op name in the lavae_fast namespace -> launcher
LAUNCHERS = {
    "place_loglik": place_loglik,
    "place_loglik_backward": place_loglik_backward,
    "gumbel_topk_relaxed": gumbel_topk_relaxed,
    "gumbel_topk_relaxed_backward": gumbel_topk_relaxed_backward,
    "count_objects": count_objects,
    "gather_appearance": gather_appearance,
    "gather_appearance_backward": gather_appearance_backward,
}

_registered: set[str] = set()


def register_kernels(device_type: str) -> None:
    """Register every launcher as the implementation of its op for ``device_type`` (once)."""
    import torch

    import lavae_fast.ops  # noqa: F401  (defines the op schemas)

    if device_type in _registered:
        return
    for name, fn in LAUNCHERS.items():
        torch.library.register_kernel(f"lavae_fast::{name}", device_type, fn)
    _registered.add(device_type)


def register_cuda_kernels() -> None:
    """Make the Triton launchers the CUDA implementations of the lavae_fast ops."""
    register_kernels("cuda")
