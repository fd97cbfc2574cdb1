"""Metrics of a LAVAE's locations and counts, one definition each for training, evaluation and figures.

* :func:`location_accuracy`: the share of true objects with an inferred location within
  :data:`RADIUS` = 2 px (Euclidean) of their centre, under a one-to-one matching
  (:func:`max_matching`, a maximum bipartite matching, so one inferred location never serves two
  objects);
* :func:`draws_on_objects`: how q's sampled hard draws cover the true objects (draws on an object
  already drawn; objects no draw reaches);
* :func:`index_rows_cols`: flat pixel indices (e.g. :meth:`lavae_fast.LAVAE.locate`'s) as rows
  and columns;
* :func:`local_maxima` and :func:`peak_distances`: h_loc's 3×3 local maxima (``window`` × ``window``
  with :func:`local_maxima`'s ``window``), whatever their height, and the distance from each true
  centre to the nearest of the top-(true count) of them (SPEC §5's "peaks next to rather than on
  the objects" check). The rule is the counter's
  (:func:`lavae_fast.ops.local_maxima_mask`; :func:`lavae_fast.ops.count_objects` counts the maxima
  above its threshold, :func:`lavae_fast.ops.counted_peaks`).

Used by :mod:`lavae_fast.evaluate` (the tables) and the training loop's running diagnostics.
"""

from __future__ import annotations

import numpy as np
import torch

from .ops import local_maxima_mask

__all__ = ["RADIUS", "max_matching", "location_accuracy", "index_rows_cols", "local_maxima", "peak_distances",
           "draws_on_objects"]

RADIUS = 2.0


def max_matching(adjacency: np.ndarray) -> int:
    """Size of a maximum matching in a bipartite graph given as a bool matrix [T, P] (Kuhn's
    augmenting paths; T, P ≤ M = 10 here, so the O(T·P²) cost is nothing)."""
    T, P = adjacency.shape
    match_p = [-1] * P

    def augment(t, seen):
        for p in range(P):
            if adjacency[t, p] and not seen[p]:
                seen[p] = True
                if match_p[p] < 0 or augment(match_p[p], seen):
                    match_p[p] = t
                    return True
        return False

    return sum(augment(t, [False] * P) for t in range(T))


def _as_np(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def location_accuracy(pred_rows, pred_cols, pred_n, centres, counts, radius: float = RADIUS):
    """(matched, total): true objects within ``radius`` px of an inferred location, one-to-one.

    pred_rows, pred_cols: [B,M] (slots ≥ pred_n ignored); pred_n [B]; centres [B,K,2] (row, col),
    −1 padded; counts [B].
    """
    pr, pc, pn = _as_np(pred_rows), _as_np(pred_cols), _as_np(pred_n)
    cen, cnt = _as_np(centres), _as_np(counts)
    matched = total = 0
    for b in range(len(cnt)):
        t = cen[b, : int(cnt[b])].astype(np.float64)
        total += len(t)
        k = int(pn[b])
        if len(t) == 0 or k == 0:
            continue
        p = np.stack([pr[b, :k], pc[b, :k]], 1).astype(np.float64)
        d = np.sqrt(((t[:, None, :] - p[None, :, :]) ** 2).sum(-1))
        matched += max_matching(d <= radius)
    return matched, total


def local_maxima(h_loc: torch.Tensor, k: int, window: int = 3):
    """Rows, cols [B,k] of the k highest ``window`` × ``window`` (odd; 3×3 by default) local maxima
    of h_loc [B,1,H,W] (the counter's peaks, without its threshold); −1 where an image has fewer
    than k."""
    h = h_loc.detach().float()
    B, _, H, W = h.shape
    score = torch.where(local_maxima_mask(h, window), h, torch.full_like(h, float("-inf"))).flatten(1)
    k = min(k, H * W)
    vals, idx = score.topk(k, dim=1)
    ok = torch.isfinite(vals)
    rows = torch.where(ok, idx // W, -1)
    cols = torch.where(ok, idx % W, -1)
    return rows, cols


def peak_distances(h_loc: torch.Tensor, centres, counts, window: int = 3) -> np.ndarray:
    """Distance (px) from each true centre to the nearest of the top-(true count) ``window`` ×
    ``window`` local maxima of h_loc (the counter's window). Returns a flat array over all objects
    (empty if none)."""
    cen, cnt = _as_np(centres), _as_np(counts)
    kmax = int(cnt.max()) if len(cnt) else 0
    if kmax == 0:
        return np.zeros(0)
    rows, cols = local_maxima(h_loc, kmax, window)
    rows, cols = _as_np(rows), _as_np(cols)
    out = []
    for b in range(len(cnt)):
        c = int(cnt[b])
        if c == 0:
            continue
        p = np.stack([rows[b, :c], cols[b, :c]], 1).astype(np.float64)
        p = p[p[:, 0] >= 0]
        t = cen[b, :c].astype(np.float64)
        if len(p) == 0:
            out.extend([np.inf] * c)
            continue
        out.extend(np.sqrt(((t[:, None] - p[None]) ** 2).sum(-1)).min(1).tolist())
    return np.asarray(out)


def index_rows_cols(index: torch.Tensor, W: int):
    """Flat pixel indices [B,M] (−1 = absent) on a canvas W wide → rows, cols [B,M] on the CPU (−1
    where absent), e.g. of :meth:`lavae_fast.LAVAE.locate`."""
    idx = index.cpu()
    return torch.where(idx >= 0, idx // W, -1), torch.where(idx >= 0, idx % W, -1)


def draws_on_objects(index: torch.Tensor, W: int, centres, counts, radius: float = RADIUS):
    """Where q's hard draws land among the true objects: (near-duplicates, later draws, objects
    missed, objects).

    index: [B,M] flat pixels of the hard location draws in draw order (−1 = absent slot), on a
    canvas W wide; centres [B,K,2] (row, col), −1 padded; counts [B] true object counts. Each
    draw is assigned to its nearest true object (Euclidean). A draw after an image's first is a
    near-duplicate when its nearest object is an earlier draw's: the sprite lands on an object
    already covered and another is left out, at ~ln(1/ε) nats per ink pixel of the −ELBO (README,
    "Where the bound goes"). Defined on the true objects, not on the distance between draws, it
    means the same at every exclusion window (SPEC §2): a window only forbids draws close to each
    other, which two draws on one broad peak need not be. An object is missed when no draw lies
    within ``radius`` px of its centre. Images without objects count in neither."""
    rows, cols = (t.numpy() for t in index_rows_cols(index, W))
    cen, cnt = _as_np(centres), _as_np(counts)
    dup = later = missed = objects = 0
    for b in range(len(cnt)):
        c = int(cnt[b])
        if c == 0:
            continue
        present = rows[b] >= 0
        p = np.stack([rows[b][present], cols[b][present]], 1).astype(np.float64)
        t = cen[b, :c].astype(np.float64)
        objects += c
        if len(p) == 0:
            missed += c
            continue
        dist = np.sqrt(((p[:, None] - t[None]) ** 2).sum(-1))  # [draws, objects]
        nearest = dist.argmin(1)
        later += len(p) - 1
        dup += sum(int(nearest[i] in nearest[:i]) for i in range(1, len(p)))
        missed += int((dist.min(0) > radius).sum())
    return dup, later, missed, objects
