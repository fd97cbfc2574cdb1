"""Counter-based noise: every random number is a function of (seed, step, global sample index).

SPEC §5: all randomness (Gumbel noise, z_app noise, the forced-n coin, data order) comes from
generators seeded from (seed, step), never from hidden global state inside an op. We go one step
further and key the per-image noise by the image's *global* position in the step's batch
(``step * batch_size + j``): an image gets the same noise whether the batch is processed whole, in
pieces, or split across processes, so a resumed or a distributed run draws exactly the noise of an
uninterrupted single-process one.

Implementation: a 64-bit key per (seed, step, sample, stream) is derived with the SplitMix64
finaliser (a bijective avalanche mix, so nearby triples give unrelated keys) and seeds one CPU
``torch.Generator`` per image and stream. That costs a few microseconds per image, negligible next
to a training step, and keeps the bits identical on every platform torch supports. Noise is drawn
on the CPU and moved to the model's device, so CPU and GPU runs see the same numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import check_int

__all__ = ["Noise", "mix", "draw_noise", "draw_normal", "data_indices", "gumbel_from_uniform", "check_sample_ids",
           "MAX_KEY"]

_MASK64 = (1 << 64) - 1
# The largest seed, step or sample id that keys the noise: each enters the hash as 64 bits, so a
# larger one would draw the noise of a smaller one.
MAX_KEY = _MASK64

# Stream identifiers: each kind of noise has its own generator, so adding a stream (or changing
# one's shape, e.g. the aux VAE's latent for another canvas) never shifts the numbers of the others.
STREAM_COIN = 1
STREAM_GUMBEL = 2
STREAM_EPS = 3
STREAM_AUX = 4
STREAM_DATA = 5
STREAM_BASELINE = 6


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix(*values: int) -> int:
    """Hash a tuple of non-negative ints to a 63-bit seed (order-sensitive)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1  # torch.Generator.manual_seed wants a value < 2**63 to be portable


def _gen(seed: int, step: int, sample: int, stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(mix(seed, step, sample, stream))
    return g


def gumbel_from_uniform(u: Tensor) -> Tensor:
    """Standard Gumbel samples −log(−log u), with u kept inside (0, 1) so both logs are finite."""
    tiny = torch.finfo(u.dtype).tiny
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(u.dtype).eps)
    return -torch.log(-torch.log(u))


@dataclass
class Noise:
    """All the noise of one LAVAE forward pass (B images).

    gumbel: [B,D] standard Gumbel noise for the location draws.
    eps:    [B,M,L] standard normal noise for z_app (slot i of image b uses eps[b,i]).
    coin:   [B] uniform in [0,1): image b has n forced to 1 when coin[b] < p_force.
    aux_eps: optional [B,8,h,w] standard normal noise for the warm-up VAE's latent.
    """

    gumbel: Tensor
    eps: Tensor
    coin: Tensor
    aux_eps: Optional[Tensor] = None

    def to(self, device=None, dtype=None) -> "Noise":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = None if v is None else v.to(device=device, dtype=dtype)
        return Noise(**out)

    @property
    def batch_size(self) -> int:
        return self.gumbel.shape[0]


def check_sample_ids(sample_ids, name: str = "sample_ids") -> list:
    """``sample_ids`` as a list of ints, or a TypeError/ValueError naming it (as ``name``): a 1-d
    integer tensor or a sequence of ints (a bool, a float or a float tensor is refused: the ids key
    the noise, and a truncated one would draw another image's), each in [0, MAX_KEY]."""
    if isinstance(sample_ids, Tensor):
        if sample_ids.dim() != 1 or sample_ids.dtype == torch.bool or sample_ids.is_floating_point() \
                or sample_ids.is_complex():
            raise TypeError(f"{name} must be a 1-d integer tensor or a sequence of ints, got a tensor of dtype "
                            f"{str(sample_ids.dtype).replace('torch.', '')} and shape {tuple(sample_ids.shape)}")
        ids = sample_ids.tolist()
    else:
        try:
            ids = list(sample_ids)
        except TypeError:
            raise TypeError(f"{name} must be a 1-d integer tensor or a sequence of ints, got "
                            f"{type(sample_ids).__name__}") from None
        ids = [check_int(i, f"{name}[{k}]") for k, i in enumerate(ids)]
    if ids and (min(ids) < 0 or max(ids) > MAX_KEY):
        raise ValueError(f"{name} must be non-negative and <= {MAX_KEY} (they key the noise), got values in "
                         f"[{min(ids)}, {max(ids)}]")
    return ids


def _sample_ids(seed, step, sample_ids):
    ids = check_sample_ids(sample_ids)
    if int(seed) < 0 or int(step) < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    return ids


def draw_noise(
    seed: int,
    step: int,
    sample_ids: Sequence[int] | Tensor,
    *,
    num_pixels: int,
    max_objects: int,
    latent_size: int,
    aux_shape: Optional[Sequence[int]] = None,
    device=None,
    dtype=torch.float32,
) -> Noise:
    """Noise for the images with global indices ``sample_ids`` at training step ``step``.

    Args:
        seed, step: the run's seed and the optimisation step.
        sample_ids: global index of each image in the step's batch (``step*B + j`` in training).
        num_pixels: D = H·W; max_objects: M; latent_size: L.
        aux_shape: (8, h, w) of the warm-up VAE's latent, or None to skip that stream.
    """
    ids = _sample_ids(seed, step, sample_ids)
    B = len(ids)
    gumbel = torch.empty(B, num_pixels, dtype=torch.float64)
    eps = torch.empty(B, max_objects, latent_size, dtype=torch.float64)
    coin = torch.empty(B, dtype=torch.float64)
    aux = None if aux_shape is None else torch.empty(B, *aux_shape, dtype=torch.float64)
    for j, sid in enumerate(ids):
        coin[j] = torch.rand((), generator=_gen(seed, step, sid, STREAM_COIN), dtype=torch.float64)
        u = torch.rand(num_pixels, generator=_gen(seed, step, sid, STREAM_GUMBEL), dtype=torch.float64)
        gumbel[j] = gumbel_from_uniform(u)
        eps[j] = torch.randn(max_objects, latent_size, generator=_gen(seed, step, sid, STREAM_EPS), dtype=torch.float64)
        if aux is not None:
            aux[j] = torch.randn(*aux_shape, generator=_gen(seed, step, sid, STREAM_AUX), dtype=torch.float64)
    return Noise(gumbel, eps, coin, aux).to(device=device, dtype=dtype)


def draw_normal(seed: int, step: int, sample_ids, shape: Sequence[int], *, stream: int = STREAM_BASELINE,
                device=None, dtype=torch.float32) -> Tensor:
    """[B, *shape] standard normal noise keyed like :func:`draw_noise` (used by the baseline)."""
    ids = _sample_ids(seed, step, sample_ids)
    out = torch.empty(len(ids), *shape, dtype=torch.float64)
    for j, sid in enumerate(ids):
        out[j] = torch.randn(*shape, generator=_gen(seed, step, sid, stream), dtype=torch.float64)
    return out.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_items: int) -> Tensor:
    gen = torch.Generator()
    gen.manual_seed(mix(seed, epoch, 0, STREAM_DATA))
    return torch.randperm(num_items, generator=gen)


def data_indices(seed: int, step: int, batch_size: int, num_items: int) -> Tensor:
    """Data-set indices of the ``batch_size`` images of step ``step`` ([B] int64).

    The global sample stream ``g = step*B + j`` walks through one seeded permutation per epoch
    (``epoch = g // N``), so the data order is a pure function of (seed, step, B, N): a resumed run
    reads exactly the batches an uninterrupted one would. Batches may straddle an epoch boundary.
    """
    if num_items <= 0:
        raise ValueError(f"the data set is empty (num_items={num_items})")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    start = step * batch_size
    g = torch.arange(start, start + batch_size)
    epochs = g // num_items
    out = torch.empty(batch_size, dtype=torch.long)
    for e in torch.unique(epochs).tolist():
        perm = _epoch_permutation(int(seed), int(e), int(num_items))
        sel = epochs == e
        out[sel] = perm[g[sel] % num_items]
    return out
