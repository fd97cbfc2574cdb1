"""LAVAE's importance-sampled bound on log p(x) (SPEC §7), the number evaluation reports.

:class:`ImportanceBoundMixin` holds :meth:`~ImportanceBoundMixin.log_likelihood` of
:class:`~lavae_fast.models.lavae.LAVAE`. It runs on the model's own pieces, which LAVAE defines:
``_input``, ``encode``, ``prior_log_probs``, ``_log_falling``, ``_draw_window``, ``_one_hot``,
``_decode_present``, the engine ``engine``, ``max_objects`` and ``latent_size``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..engine import ops as _ops_api
from ..engine.noise import gumbel_from_uniform
from .inputs import check_size
from .scene import EPS_LAMBDA

__all__ = ["ImportanceBoundMixin"]


class ImportanceBoundMixin:
    """LAVAE's importance-sampled bound (see the module); mixed into LAVAE."""

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, K: int = 100, *, chunk: Optional[int] = None,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """Importance-sampled estimate of log p(x) [B] in nats (a stochastic lower bound):
        log (1/K) Σ_k p(x, z_k)/q(z_k|x), with n = n̂, hard location draws (exact log q of the draws
        without replacement) and z_app ~ q. Batch norm runs in eval mode. ``chunk`` samples are
        processed together (default: as many as keep chunk·B ≤ 256 images)."""
        x = self._input(x)
        K = check_size("K", K)
        if chunk is not None:
            chunk = check_size("chunk", chunk)
        was_training = self.training
        self.eval()
        try:
            B, C, H, W = x.shape
            D, M, L = H * W, self.max_objects, self.latent_size
            h_app, h_loc, n_hat = self.encode(x, check=False)
            if chunk is None:
                chunk = max(1, min(K, 256 // B))
            log_pn = self.prior_log_probs()[n_hat]
            log_p_loc = -self._log_falling(D, n_hat, M, h_loc.dtype)
            logw = []
            for k0 in range(0, K, chunk):
                k = min(chunk, K - k0)
                rep = lambda t: t.repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731  [k·B, ...], sample-major
                xr, n = rep(x), rep(n_hat)
                logits = rep(h_loc.flatten(1))
                u = torch.rand(k * B, D, generator=generator, dtype=torch.float64)
                g = gumbel_from_uniform(u).to(logits)
                index, _, log_q = self.engine.gumbel_topk_relaxed(logits, n, 1.0, M, g, **self._draw_window(H, W))
                maps = self._one_hot(index, D, logits.dtype).view(k * B, M, H, W)
                app = self.engine.gather_appearance(rep(h_app), maps, n, index=index)
                mu, logvar = app.split(L, dim=-1)
                eps = torch.randn(k * B, M, L, generator=generator).to(mu)
                pres = _ops_api.object_mask(n, M).to(mu.dtype)
                z = (mu + torch.exp(0.5 * logvar) * eps) * pres[..., None]
                sprites = self._decode_present(z, n)
                loglik = self.engine.place_and_loglik(xr, sprites, maps, n, index=index, eps=EPS_LAMBDA)
                # log N(z;0,I) − log N(z;μ,σ) = −½Σ(z² − ε² − log σ²); the 2π terms cancel.
                app_ratio = (-0.5 * (z.pow(2) - eps.pow(2) - logvar) * pres[..., None]).sum((1, 2))
                lw = loglik + rep(log_pn) + rep(log_p_loc) + app_ratio - log_q
                logw.append(lw.view(k, B))
            logw = torch.cat(logw, 0)
            return torch.logsumexp(logw, 0) - math.log(K)
        finally:
            self.train(was_training)
