"""The layers the models share: conv → Leaky ReLU → batch norm (the paper's order), residual blocks
and nets, LAVAE's heads and sprite decoder; batch norm held in eval mode; the Gaussian KL.

Used by :class:`~lavae_fast.models.lavae.LAVAE`, the β-VAE baseline
(:mod:`lavae_fast.models.baseline`) and the warm-up VAE (:mod:`lavae_fast.models.aux_vae`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LEAK", "ConvAct", "ResBlock", "ResidualNet", "HeadConv2d", "SpriteDecoder", "use_fused_norm", "EvalMode",
           "gaussian_kl"]

LEAK = 0.01  # Leaky ReLU slope (PyTorch's default; the paper gives none)


class EvalMode:
    """Batch norm in eval mode for the body of a ``with`` (restored after): inference, decoding
    and sampling must not change the running statistics of a model that is being trained."""

    def __init__(self, module: nn.Module):
        self.module, self.was = module, module.training

    def __enter__(self):
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        self.module.train(self.was)
        return False


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, diag e^logvar) ‖ N(0, I)) summed over the last dim: ½Σ(μ² + σ² − 1 − log σ²)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class HeadConv2d(nn.Conv2d):
    """A head's last convolution: in its parameters' dtype even under bf16 autocast.

    A bf16 h_loc is rounded to steps of ~0.06 nats near the peaks; on a broad peak neighbouring
    pixels then tie, and every tie is one more counted 3×3 local maximum. Measured on the shipped
    dSprites model (500 test images per split), counted right on the 0–3 / 7-object splits: 0.98 /
    0.33 with bf16 heads, 0.99 / 0.46 with float32 heads under bf16, 0.99 / 0.45 all in float32.
    The heads are a few % of the inference nets' FLOPs. Same parameters as nn.Conv2d (checkpoints
    are unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


class ConvAct(nn.Sequential):
    """conv 3×3 (same padding) → Leaky ReLU → batch norm (the paper's order).

    With ``fused_norm`` (set by :func:`use_fused_norm`) the Leaky ReLU and the batch norm run as one
    op (:func:`lavae_fast.norm.lrelu_batch_norm`: two passes over the activation forward and two
    backward, against ~2.5× that traffic for the framework's kernels); same math, same state."""

    fused_norm = False

    def __init__(self, cin: int, cout: int, norm: bool = True):
        layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(LEAK)]
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_norm and len(self) == 3:
            from ..engine.norm import lrelu_batch_norm

            return lrelu_batch_norm(self[0](x), self[2], self[1].negative_slope)
        return super().forward(x)


def use_fused_norm(module: nn.Module, enabled: bool = True) -> None:
    """Switch every :class:`ConvAct` inside ``module`` to (or back from) the fused Leaky ReLU +
    batch-norm op."""
    for m in module.modules():
        if isinstance(m, ConvAct):
            m.fused_norm = enabled


class ResBlock(nn.Module):
    """x + (conv → LReLU → BN → conv → LReLU → BN)(x); ``norm=False`` drops the batch norms."""

    def __init__(self, width: int, norm: bool = True):
        super().__init__()
        self.body = nn.Sequential(ConvAct(width, width, norm), ConvAct(width, width, norm))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResidualNet(nn.Sequential):
    """Stem conv C → width, then ``blocks`` residual blocks at full resolution (no down-sampling)."""

    def __init__(self, cin: int, width: int, blocks: int = 4):
        super().__init__(ConvAct(cin, width), *[ResBlock(width) for _ in range(blocks)])


class SpriteDecoder(nn.Module):
    """f_sprite: z_app [P,L] → sprites [P,C,S,S] in (0,1) (SPEC §1, appendix B).

    fc L → 64·4·4 → LReLU → BN → conv 64 → (width − L) → LReLU → BN → bilinear up-sampling to S×S
    → concat the broadcast z_app (L channels; width in all) → 3 residual blocks of 2 convs → conv →
    C → sigmoid. **Decisions:** the fc output is reshaped to 64×4×4 *before* its batch norm
    (BatchNorm2d), which normalises over the 16 positions as well, so that a batch holding a single
    present object still trains (BatchNorm1d refuses a batch of one); "no LReLU + BN in the last
    residual block" is read as: its convs keep the Leaky ReLU between them but have no batch norm,
    so the block stays non-linear while the output path is free of batch statistics.
    """

    def __init__(self, latent_size: int, channels: int, sprite_size: int, width: int = 48, seed_side: int = 4,
                 seed_channels: int = 64):
        super().__init__()
        if width <= latent_size:
            raise ValueError(f"sprite width must exceed latent_size={latent_size}, got {width}")
        self.sprite_size = sprite_size
        self.seed_shape = (seed_channels, seed_side, seed_side)
        self.fc = nn.Linear(latent_size, seed_channels * seed_side * seed_side)
        self.fc_post = nn.Sequential(nn.LeakyReLU(LEAK), nn.BatchNorm2d(seed_channels))
        self.conv = ConvAct(seed_channels, width - latent_size)
        self.blocks = nn.Sequential(ResBlock(width), ResBlock(width), ResBlock(width, norm=False))
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        P, L = z.shape
        S = self.sprite_size
        h = self.fc_post(self.fc(z).view(P, *self.seed_shape))
        h = F.interpolate(self.conv(h), size=(S, S), mode="bilinear", align_corners=False)
        h = torch.cat([h, z[:, :, None, None].expand(P, L, S, S)], dim=1)
        return torch.sigmoid(self.out(self.blocks(h)))
