"""A scene in LAVAE's terms: its latent description (:class:`Latents`), and the numbers of the
generative model that every part of LAVAE reads: the location scale γ and the count threshold
(SPEC §2), and the ε of the Bernoulli means (SPEC §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["Latents", "THRESHOLD_IN_GAMMAS", "location_gamma", "count_threshold", "EPS_LAMBDA"]

# The location scale and the count threshold (SPEC §2): h_loc is multiplied by γ = ½·ln D (D = H·W
# locations; the paper rounds it to 4 at 64×64, we keep the formula) and n̂ counts the local maxima
# of the scaled map above THRESHOLD_IN_GAMMAS·γ = 4γ. The one place either is computed.
THRESHOLD_IN_GAMMAS = 4.0


def location_gamma(D: int) -> float:
    """γ = ½·ln D for a canvas of D = H·W locations (SPEC §2)."""
    return 0.5 * math.log(D)


def count_threshold(D: int) -> float:
    """The count threshold 4γ on a canvas of D = H·W locations (SPEC §2)."""
    return THRESHOLD_IN_GAMMAS * location_gamma(D)


EPS_LAMBDA = 1e-4  # λ = ε + (1−2ε)·min(Σ, 1), SPEC §1


@dataclass
class Latents:
    """A scene's latent description: n [B], index [B,M] (−1 = absent), z_app [B,M,L].

    ``canvas`` is (H, W); :meth:`LAVAE.decode` renders it. The manipulation helpers of
    :class:`LAVAE` return modified copies.
    """

    n: Tensor
    index: Tensor
    z_app: Tensor
    canvas: Tuple[int, int]

    @property
    def rows(self) -> Tensor:
        return torch.where(self.index >= 0, self.index // self.canvas[1], -1)

    @property
    def cols(self) -> Tensor:
        return torch.where(self.index >= 0, self.index % self.canvas[1], -1)
