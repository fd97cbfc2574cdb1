"""Triton kernels for CUDA tensors, shipped as ``lavae_fast.kernels`` (SPEC §9).

Each launcher below has the signature and outputs of one op schema in :mod:`lavae_fast.ops`;
it allocates the outputs and launches the kernels of its module (``place``, ``gumbel``,
``count``, ``gather``; each module documents its kernels' minimum memory traffic). The package
imports nothing of lavae_fast: :func:`lavae_fast.ops.register_triton_kernels` registers the
launchers as the ops' CUDA implementations (which :mod:`lavae_fast.ops` does on import when CUDA
and Triton are present) and adds what the op contract asks beyond a kernel — rows too long for
one program (``gumbel.MAX_D``) run on the reference, and the gradient to h_app takes h_app's memory
layout. Autograd, fake tensors and input checks stay in :mod:`lavae_fast.ops`; the backward passes
are ops of their own, with launchers here as well. The same launchers run on CPU tensors under
``TRITON_INTERPRET=1``: see :mod:`lavae_fast.kernels.testing`.

All kernels support float32 and float64 (contractions use ``tl.dot`` in IEEE precision).
"""

from __future__ import annotations

from .count import count_objects
from .gather import gather_appearance, gather_appearance_backward
from .gumbel import gumbel_topk_relaxed, gumbel_topk_relaxed_backward
from .place import place_loglik, place_loglik_backward

__all__ = ["LAUNCHERS"]

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
