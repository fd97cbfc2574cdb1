"""The warm-up auxiliary VAE (SPEC §5, paper appendix B "Training warm-up").

A small fully convolutional VAE is trained alongside LAVAE on its own ELBO (Bernoulli likelihood).
Its per-location KL map — KL(q(z|x)‖N(0,I)) summed over the 8 latent channels, in nats per latent
location — is a rough proxy for where the information (the objects) is (Nash et al., 2017). Resized
bilinearly to H×W and detached, it is where the early target of the location logits h_loc comes
from: blurred (:func:`smooth_target`), scaled against the count threshold
(:func:`auto_target_scale`), and turned into one cone per object it counts (:func:`peak_target`),
standing on the image's ink centroid near the detection (:func:`ink_anchors`);
``warmup_loss = Σ_pixels (h_loc − target)²`` per image (see :func:`warmup_loss` for why not the
mean over pixels), weighted by :func:`lavae_fast.schedules.warmup_weight`. Each step of that
transformation is a decision SPEC §5 leaves open ("the map's scale relative to the count
threshold is a choice to make"); each function's docstring gives the measurement behind it.

Architecture (the paper gives only "3 residual blocks with down-sampling between blocks, and a final
conv; latent 11×11×8 at 64×64"): stem conv C → 32, residual block, stride-2 conv, residual block,
stride-2 conv, residual block, conv 3×3 → 16 channels (μ and log σ² of 8 latent channels). Two
halvings give a latent of ⌈H/4⌉×⌈W/4⌉ (16×16 at 64×64, 12×12 at 48×48), inside SPEC's "about H/6 to
H/4 per side". The decoder mirrors it with bilinear up-sampling + conv in place of the strided convs,
so any canvas size comes back exactly to H×W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..engine.ops import counted_peaks
from .layers import ConvAct, ResBlock, gaussian_kl
from .scene import THRESHOLD_IN_GAMMAS

__all__ = ["AuxVAE", "AuxOutput", "warmup_loss", "auto_target_scale", "smooth_target", "auto_blur", "peak_target", "ink_anchors", "auto_radius"]

# Target peak height, in units of the count threshold 4γ, that the automatic scaling aims for.
AUTO_PEAK = 2.0
AUTO_SCALE_RANGE = (1.0, 10.0)


class _Down(nn.Sequential):
    def __init__(self, width: int):
        super().__init__(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.01), nn.BatchNorm2d(width))


class _Up(nn.Module):
    """Bilinear up-sampling to an exact size, then conv → LReLU → BN."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = ConvAct(width, width)

    def forward(self, h: Tensor, size) -> Tensor:
        return self.conv(F.interpolate(h, size=size, mode="bilinear", align_corners=False))


@dataclass
class AuxOutput:
    """loss: mean −ELBO (nats per image); neg_elbo, recon, kl: [B];
    kl_map: [B,1,h,w] KL per latent location (summed over channels), with gradient;
    target: [B,1,H,W] kl_map resized bilinearly to the canvas, detached (the h_loc target)."""

    loss: Tensor
    neg_elbo: Tensor
    recon: Tensor
    kl: Tensor
    kl_map: Tensor
    target: Tensor


class AuxVAE(nn.Module):
    def __init__(self, channels: int, width: int = 32, latent_channels: int = 8):
        super().__init__()
        self.latent_channels = latent_channels
        self.stem = ConvAct(channels, width)
        self.enc1, self.down1 = ResBlock(width), _Down(width)
        self.enc2, self.down2 = ResBlock(width), _Down(width)
        self.enc3 = ResBlock(width)
        self.to_latent = nn.Conv2d(width, 2 * latent_channels, 3, padding=1)
        self.from_latent = ConvAct(latent_channels, width)
        self.dec3, self.up2 = ResBlock(width), _Up(width)
        self.dec2, self.up1 = ResBlock(width), _Up(width)
        self.dec1 = ResBlock(width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    @staticmethod
    def latent_shape(H: int, W: int, latent_channels: int = 8):
        """(8, h, w) of the latent for an H×W canvas (two stride-2 convs with padding 1)."""
        h, w = H, W
        for _ in range(2):
            h, w = (h + 1) // 2, (w + 1) // 2
        return (latent_channels, h, w)

    def forward(self, x: Tensor, eps: Optional[Tensor] = None) -> AuxOutput:
        """x [B,C,H,W] in [0,1]; eps [B,8,h,w] standard normal noise (None: torch's global RNG)."""
        H, W = x.shape[-2:]
        h1 = self.enc1(self.stem(x))
        h2 = self.enc2(self.down1(h1))
        h3 = self.enc3(self.down2(h2))
        mu, logvar = self.to_latent(h3).chunk(2, dim=1)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps.to(mu)
        d = self.dec3(self.from_latent(z))
        d = self.dec2(self.up2(d, h2.shape[-2:]))
        d = self.dec1(self.up1(d, (H, W)))
        logits = self.out(d)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl_map = gaussian_kl(mu.movedim(1, -1), logvar.movedim(1, -1))[:, None]  # [B,1,h,w]
        kl = kl_map.flatten(1).sum(1)
        target = F.interpolate(kl_map.detach(), size=(H, W), mode="bilinear", align_corners=False)
        neg_elbo = recon + kl
        return AuxOutput(neg_elbo.mean(), neg_elbo, recon, kl, kl_map, target)


def auto_blur(sprite_size: int) -> float:
    """Default σ (pixels) of :func:`smooth_target`: sprite_size / 7 (3 px for dSprites' S = 21,
    ≈ 2.4 px for MNIST's S = 17), about a third of an object's radius."""
    return sprite_size / 7.0


def smooth_target(target: Tensor, sigma: float) -> Tensor:
    """The KL-map target [B,1,H,W] blurred by a Gaussian of ``sigma`` pixels (separable, edges
    replicated; sigma = 0 returns it unchanged).

    **Decision (SPEC §5 leaves the target's form to us; measured).** The bilinearly resized KL map
    has one bump per *latent cell* an object covers, so its 3×3 local maxima over-count: the aux VAE
    of a 5.4k-step multi-dSprites 48×48 run, its map scaled so that object peaks sit at 2·4γ, counts
    54% of the test images right (n̂ 2.35 against 1.5 true), and an h_loc that learns to mimic it
    inherits that (a run trained on it over-counted, n̂ 3–6, through its whole warm-up). Blurred by
    σ = 3 px (≈ S/7) first, the same map has one peak per object and counts 98.6% right (σ = 2: 83%,
    σ = 4: 97%). Blurring moves no peak far: a peak of the blurred map is a weighted centre of the
    object's KL mass, which is what h_loc should learn to point at."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return target
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=target.dtype, device=target.device).pow(2) / (2 * sigma * sigma))
    k = k / k.sum()
    t = target.detach()
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def ink_anchors(impulses: Tensor, x: Tensor, half: int) -> Tensor:
    """Move each detection [B,1,H,W] (0/1) to the ink centroid of x [B,C,H,W] in the
    (2·half+1)² window around it (rounded; a window without ink leaves it in place)."""
    H, W = impulses.shape[-2:]
    ink = x.detach().to(impulses.dtype).sum(1, keepdim=True)
    yy = torch.arange(H, dtype=ink.dtype, device=ink.device).view(1, 1, H, 1).expand_as(ink)
    xx = torch.arange(W, dtype=ink.dtype, device=ink.device).view(1, 1, 1, W).expand_as(ink)
    k = 2 * half + 1
    box = torch.ones(1, 1, k, k, dtype=ink.dtype, device=ink.device)
    m0, my, mx = (F.conv2d(v, box, padding=half) for v in (ink, ink * yy, ink * xx))
    b, _, r, c = impulses.nonzero(as_tuple=True)
    mass = m0[b, 0, r, c]
    has = mass > 0
    r2 = torch.where(has, (my[b, 0, r, c] / mass.clamp(min=1e-12)).round().long(), r)
    c2 = torch.where(has, (mx[b, 0, r, c] / mass.clamp(min=1e-12)).round().long(), c)
    out = torch.zeros_like(impulses)
    out[b, 0, r2.clamp(0, H - 1), c2.clamp(0, W - 1)] = 1.0
    return out


def peak_target(target: Tensor, threshold: float, height: float, radius: float,
                x: Optional[Tensor] = None, half: int = 0) -> Tensor:
    """One cone per detected object: [B,1,H,W] → [B,1,H,W].

    The points of ``target`` (the smoothed, scaled KL map) that are 3×3 local maxima above
    ``threshold`` — the count rule of SPEC §2 applied to the target — each become the apex of a
    cone ``height``·max(0, 1 − r/``radius``) (r: Euclidean distance in pixels); where cones
    overlap the higher value wins; everything else is 0.

    **Decision (measured, multi-dSprites 48×48, batch 16).** A target that counts right is not
    enough: h_loc must also count right when it imitates it, to within its fitting error (an RMS
    of ~2 nats per pixel after the first few hundred steps).
    * The blurred map itself (98% of test images counted right) has flat-topped bumps ~10 px wide
      above the threshold; h_loc reached their height, but its fitting error left several 3×3
      local maxima on each top: n̂ 6.7 against 1.5 true through the whole warm-up.
    * Narrow Gaussian bumps (σ = 1 and 1.5 px) leave one maximum per object, but the detected
      peak moves by a pixel or two from step to step (the aux VAE trains alongside), so the
      squared loss teaches their blur by that jitter: h_loc's peaks stalled at 0.4–0.5 of the
      target's height, at the threshold, and n̂ fell to 0.7–0.9.
    * A cone has no flat top: its slope, height/radius ≈ 6 nats per pixel, is larger than the
      fitting error, so points on its flank are not local maxima (with N(0, 2²) noise added per
      pixel, cones of radius 5.25 px still count 89% of the test images right, the blurred map
      26%). Alone, the location net fits it in a few hundred steps (peaks 24–26 of 31). Under the
      straight-through estimator it did so inside the full objective only with the warm-up loss
      weighted ×300 (the estimator's 1/ε push on h_loc, SPEC §3); in relaxed mode weight 1 does
      as well as ×300.
    * Relaxed mode, 1500-step runs (multi-dSprites 48×48, B = 16, width 32, weight 300, 300 test
      images): cones counted 0.76 of the 0–3 test images right at the end (7-object 0.28,
      location accuracy 0.56); the blurred map itself as the target 0.47 (0.00, 0.50) — its
      n̂ never left the over-counted plateau tops (docs/recipe.md)."""
    hm = target.detach()
    impulses = counted_peaks(hm, threshold).to(hm.dtype)
    if x is not None and half > 0:
        impulses = ink_anchors(impulses, x, half)
    H, W = hm.shape[-2:]
    r = max(1, int(math.floor(radius)))
    padded = F.pad(impulses, (r, r, r, r))
    # Grey-scale dilation of the impulse map by the cone, one shifted copy per offset (no
    # [B, (2r+1)², H·W] window tensor: 127 MB at B = 64, 64×64, r = 5).
    out = torch.zeros_like(hm)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            c = 1.0 - math.hypot(dy, dx) / radius
            if c > 0:
                out = torch.maximum(out, c * padded[..., r + dy:r + dy + H, r + dx:r + dx + W])
    return height * out


def auto_radius(sprite_size: int) -> float:
    """Default cone radius (pixels) of :func:`peak_target`: sprite_size / 4 (5.25 px for dSprites'
    S = 21, 4.25 px for MNIST's S = 17), about half an object's size. Measured on a trained aux
    VAE's targets with N(0, 2²) noise added per pixel (the fitting error of h_loc): cones of radius
    3, 4, 5.25 and 7 px still count 99%, 98%, 89% and 54% of the test images right, the blurred
    map 26%; a narrower cone is harder to fit (see above): in relaxed mode, 1500-step runs
    (multi-dSprites 48×48, weight 1) counted 0.46 of the 0–3 test images right with radius 3,
    0.77 with this default (docs/recipe.md)."""
    return sprite_size / 4.0


def auto_target_scale(target: Tensor, gamma: float, peak: float = AUTO_PEAK) -> float:
    """Multiplier that lifts the KL-map target's typical object peak to ``peak``·(4γ) (default 2).

    **Decision (SPEC §5 asks to check the raw map against 4γ and rescale if needed).** Measured on
    multi-dSprites at 48×48 (aux VAE alone, batch 16, 100–300 steps): the raw KL map peaks at a
    median of ≈ 10 nats per latent location on images with objects (min ≈ 3–4), ≈ 0.1 on empty
    ones, against 4γ ≈ 15.5 — so the raw map would teach h_loc to stay *below* the threshold and
    nothing would be counted. Scaled so that the median object peak sits at 2·4γ, the target alone
    counts 64–77% of the images right. The scale is a per-batch statistic (no state, so resuming is
    exact): the median of the per-image maxima over the images whose maximum exceeds 10% of the
    batch's largest (the images that hold anything; no labels used), clamped to [1, 10] so that a
    raw map already above the threshold is kept as is and an untrained aux VAE's near-zero map is
    not blown up.
    """
    peaks = target.detach().flatten(1).max(1).values
    top = float(peaks.max()) if peaks.numel() else 0.0
    if top <= 0:
        return AUTO_SCALE_RANGE[0]
    q = float(peaks[peaks > 0.1 * top].median())
    lo, hi = AUTO_SCALE_RANGE
    return min(max(peak * THRESHOLD_IN_GAMMAS * gamma / q, lo), hi)


def warmup_loss(h_loc: Tensor, target: Tensor, scale: float = 1.0, reduction: str = "sum") -> Tensor:
    """Squared distance between h_loc [B,1,H,W] (γ-scaled) and ``scale``·target [B,1,H,W] (detached).

    ``reduction="sum"`` (default): summed over the pixels of each image, averaged over the batch —
    the paper's "squared distance between h_loc and the KL map", on the same per-image footing as
    every ELBO term (nats summed over pixels). ``"mean"``: averaged over pixels too (SPEC §5's
    wording). **Decision (measured):** with "mean" the term is D times weaker than the ELBO's
    gradients on the same location net; in a multi-dSprites 48×48 run (batch 16, compressed 3k-step
    schedule) h_loc then stayed far below its target through the warm-up (object peaks ≈ 16–20
    against target peaks ≈ 30–50, warm-up MSE stuck at ≈ 18, count accuracy ≈ 0.35 while the
    target itself counted ≈ 0.75 right), so the counter never learned its threshold crossing.
    """
    if h_loc.shape != target.shape:
        raise ValueError(f"h_loc {tuple(h_loc.shape)} and target {tuple(target.shape)} must have the same shape")
    sq = (h_loc - scale * target.detach()).pow(2).flatten(1)
    if reduction == "sum":
        return sq.sum(1).mean()
    if reduction == "mean":
        return sq.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
