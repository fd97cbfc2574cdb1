"""The β-VAE baseline of SPEC §6 (paper appendix B, "Baseline implementation").

Fully convolutional: the latent is a 3-D tensor, 16 channels × (H/8) × (W/8) (d = 1024 at 64×64).

Encoder: conv 3×3 stride 2 (C → 64) → 2 residual blocks → conv stride 2 → 2 residual blocks →
conv stride 2 → conv 3×3 → 32 channels (μ and log σ² of the 16 latent channels). Three halvings in
all, so 64×64 reaches 64×8×8 as the paper says. Decoder (mirror): conv 16 → 64 → transposed conv
stride 2 → 2 residual blocks → transposed conv stride 2 → 2 residual blocks → bilinear up-sampling
to H×W + conv → C → sigmoid. Every conv is followed by Leaky ReLU + batch norm except the strided
ones *between* two residual blocks (as the paper says) and the output layers. ≈1.0M parameters.

**Decision — other canvas sizes:** the three halvings stay (each conv with padding 1 rounds up:
⌈H/8⌉), the latent keeps its 16 channels, so d = 16·⌈H/8⌉·⌈W/8⌉ (576 at 48×48); the decoder
up-samples to the encoder's recorded sizes, so odd canvases come back exactly.

β is annealed linearly 0 → 1 over the horizon (:func:`lavae_fast.schedules.beta`); the reported
−ELBO and the bound always use β = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..engine._common import check_device, check_real
from .inputs import as_dtype, check_canvas, check_images, check_size
from .layers import LEAK, ConvAct, EvalMode, ResBlock, gaussian_kl

__all__ = ["BetaVAE", "BetaVAEOutput"]


def _act(width: int):
    return [nn.LeakyReLU(LEAK), nn.BatchNorm2d(width)]


@dataclass
class BetaVAEOutput:
    """loss: mean over the batch of recon + β·KL; neg_elbo, recon, kl: [B] nats (β = 1 in neg_elbo);
    lam: [B,C,H,W] Bernoulli means; z, mu, logvar: [B,16,h,w]."""

    loss: Tensor
    neg_elbo: Tensor
    recon: Tensor
    kl: Tensor
    lam: Tensor
    z: Tensor
    mu: Tensor
    logvar: Tensor
    beta: float


class BetaVAE(nn.Module):
    """Args: channels C; canvas (H, W) (None: any); latent_channels (16); width (64)."""

    def __init__(self, channels: int = 1, canvas: Optional[Sequence[int]] = (64, 64), *, latent_channels: int = 16,
                 width: int = 64):
        super().__init__()
        channels = check_size("channels", channels)
        latent_channels = check_size("latent_channels", latent_channels)
        width = check_size("width", width)
        canvas = check_canvas(canvas)
        self.channels = channels
        self.canvas = canvas
        self.latent_channels = latent_channels
        w = width
        self.enc_in = nn.Sequential(nn.Conv2d(channels, w, 3, stride=2, padding=1), *_act(w))
        self.enc_a = nn.Sequential(ResBlock(w), ResBlock(w))
        self.enc_down = nn.Conv2d(w, w, 3, stride=2, padding=1)  # between two residual blocks: no act
        self.enc_b = nn.Sequential(ResBlock(w), ResBlock(w))
        self.enc_out = nn.Sequential(nn.Conv2d(w, w, 3, stride=2, padding=1), *_act(w))
        self.to_latent = nn.Conv2d(w, 2 * latent_channels, 3, padding=1)

        self.from_latent = ConvAct(latent_channels, w)
        self.dec_up1 = nn.ConvTranspose2d(w, w, 3, stride=2, padding=1)
        self.dec_up1_act = nn.Sequential(*_act(w))
        self.dec_a = nn.Sequential(ResBlock(w), ResBlock(w))
        self.dec_up2 = nn.ConvTranspose2d(w, w, 3, stride=2, padding=1)  # between two residual blocks
        self.dec_b = nn.Sequential(ResBlock(w), ResBlock(w))
        self.dec_out = nn.Conv2d(w, channels, 3, padding=1)

    @classmethod
    def from_pretrained(cls, name_or_path, *, canvas=None, device="cpu") -> "BetaVAE":
        """A trained β-VAE baseline in eval mode: the baseline trained on a shipped model's data set
        by name ("multi-dsprites", "multi-mnist-10k"), a run directory or a checkpoint file;
        ``canvas`` as in :meth:`lavae_fast.LAVAE.from_pretrained` (same checks and errors; a LAVAE
        checkpoint is refused)."""
        from ..hub.reader import read_model_checkpoint, restore_model

        device = check_device(device)  # before reading: a device this process lacks fails at once
        state, path = read_model_checkpoint(name_or_path, "baseline")
        return restore_model(cls, state, path, canvas=canvas, device=device)

    @staticmethod
    def _sizes(H: int, W: int):
        sizes = [(H, W)]
        for _ in range(3):
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        return sizes  # full, /2, /4, /8

    def latent_shape(self, H: int, W: int):
        return (self.latent_channels, *self._sizes(H, W)[3])

    def check_input(self, x: Tensor, name: str = "x") -> None:
        check_images(x, self.channels, self.canvas, name)

    def _input(self, x: Tensor, name: str = "x") -> Tensor:
        """``x`` checked and cast to the parameters' dtype (float16/bfloat16/float64 images too)."""
        self.check_input(x, name)
        return as_dtype(x, self.dec_out.weight.dtype)

    def encode(self, x: Tensor):
        """x [B,C,H,W] → (μ, log σ²), each [B,16,⌈H/8⌉,⌈W/8⌉]."""
        h = self.enc_out(self.enc_b(self.enc_down(self.enc_a(self.enc_in(x)))))
        return self.to_latent(h).chunk(2, dim=1)

    def decode_logits(self, z: Tensor, size) -> Tensor:
        sizes = self._sizes(*size)
        d = self.from_latent(z)
        d = self.dec_a(self.dec_up1_act(self.dec_up1(d, output_size=sizes[2])))
        d = self.dec_b(self.dec_up2(d, output_size=sizes[1]))
        d = F.interpolate(d, size=sizes[0], mode="bilinear", align_corners=False)
        return self.dec_out(d)

    @staticmethod
    def _loglik(logits: Tensor, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)

    def forward(self, x: Tensor, *, eps: Optional[Tensor] = None, beta: float = 1.0) -> BetaVAEOutput:
        """x [B,C,H,W] in [0,1]; eps: standard normal noise of the latent's shape (None: global RNG);
        beta: the KL's weight in ``loss``, finite and ≥ 0 (``neg_elbo`` always uses 1)."""
        x = self._input(x)
        beta = check_real(beta, "beta", minimum=0.0)
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        elif eps.shape != mu.shape:
            raise ValueError(f"eps must have the latent's shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
        z = mu + torch.exp(0.5 * logvar) * eps.to(mu)
        logits = self.decode_logits(z, x.shape[-2:])
        recon = -self._loglik(logits, x)
        kl = gaussian_kl(mu.flatten(1), logvar.flatten(1))
        loss = (recon + beta * kl).mean()
        return BetaVAEOutput(loss, recon + kl, recon, kl, torch.sigmoid(logits), z, mu, logvar, beta)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """λ [B,C,H,W] decoded from z = μ (batch norm in eval mode)."""
        x = self._input(x)
        with EvalMode(self):
            mu, _ = self.encode(x)
            return torch.sigmoid(self.decode_logits(mu, x.shape[-2:]))

    @torch.no_grad()
    def sample(self, num: int, *, canvas: Optional[Sequence[int]] = None, generator=None) -> Tensor:
        """λ [num,C,H,W] decoded from z ~ N(0, I)."""
        canvas = canvas or self.canvas
        if canvas is None:
            raise ValueError("this model accepts any canvas: pass canvas=(H, W) to sample")
        num = check_size("num", num)
        canvas = check_canvas(canvas)
        dev = next(self.parameters()).device
        z = torch.randn(num, *self.latent_shape(*canvas), generator=generator).to(dev)
        with EvalMode(self):
            return torch.sigmoid(self.decode_logits(z, tuple(canvas)))

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, K: int = 100, *, chunk: Optional[int] = None, generator=None) -> Tensor:
        """Importance-sampled estimate of log p(x) [B] (nats) with q(z|x) as proposal, K samples,
        batch norm in eval mode; ``chunk`` samples at a time (default: chunk·B ≤ 256)."""
        x = self._input(x)
        K = check_size("K", K)
        if chunk is not None:
            chunk = check_size("chunk", chunk)
        was = self.training
        self.eval()
        try:
            B = x.shape[0]
            mu, logvar = self.encode(x)
            chunk = chunk or max(1, min(K, 256 // B))
            out = []
            for k0 in range(0, K, chunk):
                k = min(chunk, K - k0)
                eps = torch.randn(k * B, *mu.shape[1:], generator=generator).to(mu)
                m, lv = mu.repeat(k, 1, 1, 1), logvar.repeat(k, 1, 1, 1)
                z = m + torch.exp(0.5 * lv) * eps
                ll = self._loglik(self.decode_logits(z, x.shape[-2:]), x.repeat(k, 1, 1, 1))
                # log N(z;0,I) − log N(z;μ,σ) = −½Σ(z² − ε² − log σ²)
                ratio = -0.5 * (z.pow(2) - eps.pow(2) - lv).flatten(1).sum(1)
                out.append((ll + ratio).view(k, B))
            return torch.logsumexp(torch.cat(out, 0), 0) - math.log(K)
        finally:
            self.train(was)
