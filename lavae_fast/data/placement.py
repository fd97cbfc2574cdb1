"""Placing objects on the canvas without overlap, vectorised over images (SPEC §8).

Rule, per image with k objects: each object's P×P patch lies fully inside the canvas, its top-left
corner uniform over the (H−P+1)·(W−P+1) valid positions; objects are placed one after another,
each with up to ``TRIES`` tries, and a position is accepted when the object's *tight* box (the
bounding box of its inked pixels) intersects no earlier object's tight box. When an object finds
no position, the whole image (objects and positions) is drawn again with the same count.

Vectorisation: the ``TRIES`` candidate positions of an object are drawn at once and the first
valid one is taken — the same distribution as trying them one by one. All images of a chunk that
share a count are processed together; the images that failed form the next round.

Never a hang: an impossible configuration is detected up front when the objects' smallest tight
boxes cannot fit by area (or the patch does not fit the canvas), and otherwise by the observed
success rate: below ``MIN_SUCCESS_RATE`` after ``MIN_ATTEMPTS`` image attempts it is an error
(crowded configurations would take ever longer), and no image is drawn more than ``MAX_REDRAWS``
times.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["PlacementError", "TRIES", "MAX_REDRAWS", "check_feasible", "place"]

TRIES = 100
MAX_REDRAWS = 2000
MIN_ATTEMPTS = 1000
# At this rate an image needs 50 draws on average; MAX_REDRAWS then fails with probability
# 0.98**2000 ≈ 3e-18 per image, so a configuration that passes the rate test never hits the bound.
MIN_SUCCESS_RATE = 0.02


class PlacementError(ValueError):
    """The objects cannot be placed on the canvas without overlap (or only very rarely)."""


def check_feasible(k: int, canvas: Tuple[int, int], patch: int, min_box_areas: np.ndarray, what: str) -> None:
    """Fail fast on configurations that obviously cannot be placed.

    ``min_box_areas``: the tight-box areas of all sprites, any order. Disjoint boxes need at least
    the sum of the k smallest areas (an object may repeat, so k times the smallest one).
    """
    h, w = canvas
    if k <= 0:
        return
    if patch > h or patch > w:
        raise PlacementError(f"{what}: the {patch}×{patch} object patch does not fit a {h}×{w} canvas")
    need = k * int(np.min(min_box_areas))
    if need > h * w:
        raise PlacementError(
            f"{what}: {k} objects cannot be placed without overlap on a {h}×{w} canvas: even the smallest "
            f"objects need {need} pixels of tight boxes, the canvas has {h * w}"
        )


def place(
    rng: np.random.Generator,
    n_images: int,
    k: int,
    canvas: Tuple[int, int],
    patch: int,
    boxes: np.ndarray,
    what: str,
    stats: Optional[dict] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Draw sprites and non-overlapping positions for ``n_images`` images of ``k`` objects each.

    ``boxes``: int [T, 4] tight box (r0, c0, r1, c1), half-open, of every sprite within its patch.
    Returns (ids int64 [n_images, k] sprite indices, corners int64 [n_images, k, 2] top-left
    (row, col) of each patch on the canvas). ``stats``, if given, receives the number of image
    ``attempts`` and ``successes``.
    """
    h, w = canvas
    ids = np.zeros((n_images, k), np.int64)
    corners = np.zeros((n_images, k, 2), np.int64)
    if n_images == 0 or k == 0:
        return ids, corners
    check_feasible(k, canvas, patch, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), what)
    n_sprites = boxes.shape[0]
    span = np.array([h - patch + 1, w - patch + 1], np.int64)
    pending = np.arange(n_images)
    attempts = successes = 0
    for _ in range(MAX_REDRAWS):
        m = len(pending)
        cand_ids = rng.integers(0, n_sprites, size=(m, k))
        pos = rng.integers(0, span, size=(m, k, TRIES, 2))
        sb = boxes[cand_ids]  # [m, k, 4]
        placed = np.zeros((m, k, 4), np.int64)  # absolute tight boxes of the objects placed so far
        chosen = np.zeros((m, k, 2), np.int64)
        alive = np.arange(m)  # images whose objects have all found a position so far
        for j in range(k):
            p = pos[alive, j]  # [a, TRIES, 2]
            b = sb[alive, j]  # [a, 4]
            cand = np.concatenate([p + b[:, None, :2], p + b[:, None, 2:]], axis=-1)  # [a, TRIES, 4]
            if j == 0:
                ok = np.ones(cand.shape[:2], bool)
            else:
                prev = placed[alive, :j][:, None, :, :]  # [a, 1, j, 4]
                c = cand[:, :, None, :]  # [a, TRIES, 1, 4]
                hit = (
                    (c[..., 0] < prev[..., 2])
                    & (prev[..., 0] < c[..., 2])
                    & (c[..., 1] < prev[..., 3])
                    & (prev[..., 1] < c[..., 3])
                )
                ok = ~hit.any(axis=2)
            first = ok.argmax(axis=1)
            good = ok[np.arange(len(alive)), first]
            sel = np.arange(len(alive))[good]
            alive = alive[good]
            placed[alive, j] = cand[sel, first[good]]
            chosen[alive, j] = p[sel, first[good]]
            if len(alive) == 0:
                break
        done = pending[alive]
        ids[done] = cand_ids[alive]
        corners[done] = chosen[alive]
        attempts += m
        successes += len(alive)
        keep = np.ones(m, bool)
        keep[alive] = False
        pending = pending[keep]
        if stats is not None:
            stats.update(attempts=attempts, successes=successes)
        if len(pending) == 0:
            return ids, corners
        if attempts >= MIN_ATTEMPTS and successes < MIN_SUCCESS_RATE * attempts:
            raise PlacementError(
                f"{what}: {k} objects ({patch}×{patch} patches) cannot be placed without overlapping "
                f"tight boxes on a {h}×{w} canvas: {successes} of {attempts} attempts succeeded "
                f"(at least {MIN_SUCCESS_RATE:.0%} needed, each object with {TRIES} tries). "
                "Use a larger canvas or fewer objects."
            )
    raise PlacementError(
        f"{what}: {len(pending)} image(s) of {k} objects still not placed after {MAX_REDRAWS} draws on a "
        f"{h}×{w} canvas. Use a larger canvas or fewer objects."
    )
