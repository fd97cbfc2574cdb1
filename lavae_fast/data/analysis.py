"""What LAVAE assumes of a data set's images, measured: a dark empty background, objects as blobs
of ink on it, and the objects' size (which sets the sprite side S).

LAVAE models an image as sprites added onto nothing: λ = ε + (1 − 2ε)·min(Σ sprites, 1) with
ε = 1e-4 (SPEC §1), a Bernoulli per pixel and channel. A background pixel of value v where no
sprite is drawn costs −v·log ε − (1 − v)·log(1 − ε) ≈ 9.2·v nats, and the warm-up's cones sit at
ink centroids: a bright or busy background is not something the model can explain, it is a wrong
input. These functions measure it, on images of values in [0, 1] stored as uint8 0..255:

* v = the brightest channel of each pixel (a pure red object is ink as much as a white one);
* an image's **background level** b = the median of v: the value of at least half its pixels;
* **ink** = pixels with v > b + :data:`INK_DELTA`; **objects** = 8-connected ink components
  (diagonal neighbours join, so a thin diagonal edge does not split a shape);
* an object's **extent** = the rows and columns its pixels span at half its peak above b (the
  half-maximum keeps anti-aliased or blurred edges from widening it by a pixel or two).

The rules built on them (thresholds and why) are in :func:`background_problems` and
:func:`suggest_sprite_size`.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

__all__ = ["DARK", "BRIGHT", "INK_DELTA", "TOLERATED_SHARE", "CLUTTER_PER_OBJECT", "NEG_LOG_EPS",
           "brightness", "background_levels", "label_components", "find_objects", "background_problems",
           "suggest_sprite_size", "haze_cost"]

# An image's background is dark when its median pixel is at most DARK (0.1: ~0.9 nats per pixel
# where λ = ε, already thousands of nats on a 64×64 canvas; JPEG noise around black stays far
# below it), and bright when above BRIGHT (most of the image is light: objects drawn dark on
# light, which --invert turns into the model's convention).
DARK = 0.1
BRIGHT = 0.5
# Ink: this much above the image's background level (0.1: above JPEG ringing and faint haze, below
# the dimmest colour a user would call an object).
INK_DELTA = 0.1
# A few odd images (a flash, a stray frame) do not make a set unusable: the set is refused when more
# than this share of the images checked break a rule; the rest are named in a warning.
TOLERATED_SHARE = 0.01
# More components than this many per allowed object (M) is texture or noise, not objects: digits
# and shapes rarely fall into more than two pieces.
CLUTTER_PER_OBJECT = 4
NEG_LOG_EPS = float(-np.log(1e-4))  # nats a unit of background value costs where λ = ε (SPEC §1)


def brightness(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W]: the brightest channel of each pixel of uint8 [B, C, H, W] images."""
    return images.max(axis=1)


def background_levels(images: np.ndarray) -> np.ndarray:
    """float64 [B] in [0, 1]: each image's background level, the median of its brightness."""
    v = brightness(images).reshape(images.shape[0], -1)
    return np.median(v, axis=1) / 255.0


def haze_cost(images: np.ndarray, levels: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 [B]: nats the background costs an image under λ = ε: 9.2 × the sum, over channels and
    the pixels that are not ink, of their values (what a perfect model of the objects still pays)."""
    if levels is None:
        levels = background_levels(images)
    # In bytes: v ≤ level + INK_DELTA  ⇔  byte ≤ floor(255·(level + INK_DELTA)).
    limit = np.floor(255.0 * (levels + INK_DELTA) + 1e-9).astype(np.int64)
    not_ink = brightness(images) <= limit[:, None, None]
    total = np.where(not_ink[:, None], images, 0).sum(axis=(1, 2, 3), dtype=np.int64)
    return NEG_LOG_EPS * total / 255.0


def label_components(ink: np.ndarray):
    """8-connected components of bool [B, H, W] masks, numbered per batch.

    Returns (labels int32 [B, H, W] (int64 past 2³¹ ink pixels): −1 off the ink, else a component
    id in 0..K−1, components of image 0 first; image int64 [K]: the image of each component).
    Union-find over the ink pixels only (each joined to its right and three lower neighbours):
    rounds of hooking the larger root onto the smaller, then pointer jumping until every pixel
    points at its root; the work grows with the ink, not with B·H·W.
    """
    ink = np.asarray(ink, bool)
    if ink.ndim != 3:
        raise ValueError(f"ink: expected [B, H, W], got shape {ink.shape}")
    b, h, w = ink.shape
    img, rr, cc = np.nonzero(ink)
    n = len(img)
    labels = np.full((b, h, w), -1, np.int64 if n >= 2**31 else np.int32)
    if n == 0:
        return labels, np.zeros(0, np.int64)
    node = np.full((b, h + 1, w + 2), -1, labels.dtype)  # a border of −1 below and beside the canvas
    node[img, rr, cc + 1] = np.arange(n)
    us, vs = [], []
    for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):
        nb = node[img, rr + dr, cc + 1 + dc]
        ok = nb >= 0
        us.append(np.flatnonzero(ok))
        vs.append(nb[ok])
    u, v = np.concatenate(us), np.concatenate(vs)
    parent = np.arange(n)
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        u, v, pu, pv = u[differ], v[differ], pu[differ], pv[differ]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:  # every node straight to its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    # A root is its component's first pixel (hooking keeps the smaller index): numbered in pixel
    # order, image 0's components come first.
    is_root = parent == np.arange(n)
    labels[img, rr, cc] = (np.cumsum(is_root) - 1)[parent]
    return labels, img[is_root].astype(np.int64)


def find_objects(images: np.ndarray, levels: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """The ink components of uint8 [B, C, H, W] images, with their extents.

    Returns int64 arrays: ``per_image`` [B] number of components; and per component [K]:
    ``image``, ``pixels`` (ink pixels), ``height`` / ``width`` (extent at half its peak above the
    background), ``row`` / ``col`` (ink centroid, rounded), ``spans_canvas`` (1 when it touches all
    four edges of the canvas).
    """
    b, _, h, w = images.shape
    if levels is None:
        levels = background_levels(images)
    v = brightness(images).astype(np.float32) / 255.0
    base = levels.astype(np.float32)[:, None, None]
    labels, comp_image = label_components(v > base + INK_DELTA)
    k = len(comp_image)
    on = labels >= 0
    ids = labels[on]
    img_of, rows, cols = np.nonzero(on)
    vals = v[on]
    pixels = np.bincount(ids, minlength=k)
    peak = np.zeros(k, np.float32)
    np.maximum.at(peak, ids, vals)
    half = vals >= base[img_of, 0, 0] + 0.5 * (peak[ids] - base[img_of, 0, 0])
    r0 = np.full(k, h, np.int64)
    c0 = np.full(k, w, np.int64)
    r1 = np.full(k, -1, np.int64)
    c1 = np.full(k, -1, np.int64)
    np.minimum.at(r0, ids[half], rows[half])
    np.maximum.at(r1, ids[half], rows[half])
    np.minimum.at(c0, ids[half], cols[half])
    np.maximum.at(c1, ids[half], cols[half])
    lo_r = np.full(k, h, np.int64)
    hi_r = np.full(k, -1, np.int64)
    lo_c = np.full(k, w, np.int64)
    hi_c = np.full(k, -1, np.int64)
    np.minimum.at(lo_r, ids, rows)
    np.maximum.at(hi_r, ids, rows)
    np.minimum.at(lo_c, ids, cols)
    np.maximum.at(hi_c, ids, cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        row = np.rint(np.bincount(ids, weights=rows, minlength=k) / np.maximum(pixels, 1)).astype(np.int64)
        col = np.rint(np.bincount(ids, weights=cols, minlength=k) / np.maximum(pixels, 1)).astype(np.int64)
    return {
        "per_image": np.bincount(comp_image, minlength=b).astype(np.int64),
        "image": comp_image.astype(np.int64),
        "pixels": pixels.astype(np.int64),
        "height": (r1 - r0 + 1).astype(np.int64),
        "width": (c1 - c0 + 1).astype(np.int64),
        "row": row,
        "col": col,
        "spans_canvas": ((lo_r == 0) & (lo_c == 0) & (hi_r == h - 1) & (hi_c == w - 1)).astype(np.int64),
    }


def background_problems(levels: np.ndarray, objects: Optional[Dict[str, np.ndarray]], max_objects: int) -> List[dict]:
    """The rules an image breaks, per rule: a list of {"rule", "images" (int64 indices into the
    batch that was measured), "why" (what those images "have")}; empty when every image is fine.

    * ``bright``: background level > BRIGHT. Objects drawn dark on light: --invert fixes it.
    * ``not dark``: DARK < level ≤ BRIGHT. More than half of the image is grey or covered:
      a grey, textured or noisy background, or objects too big for the canvas.
    * ``cluttered`` (needs ``objects``): more than CLUTTER_PER_OBJECT × M ink components (texture,
      noise, speckle), or one component that touches all four edges (a frame, a grid, a gradient).
    The caller refuses a set when a rule's images exceed TOLERATED_SHARE of those measured.
    """
    out = []
    bright = np.flatnonzero(levels > BRIGHT)
    if len(bright):
        out.append({"rule": "bright", "images": bright,
                    "why": f"have a bright background (median pixel value above {BRIGHT})"})
    grey = np.flatnonzero((levels > DARK) & (levels <= BRIGHT))
    if len(grey):
        out.append({"rule": "not dark", "images": grey,
                    "why": f"have a background that is not dark (median pixel value between {DARK} and {BRIGHT}: "
                           "more than half of the image is grey, textured or covered)"})
    if objects is not None:
        many = objects["per_image"] > CLUTTER_PER_OBJECT * max_objects
        spanning = np.zeros(len(levels), bool)
        spanning[objects["image"][objects["spans_canvas"] == 1]] = True
        busy = np.flatnonzero(many | spanning)
        if len(busy):
            out.append({"rule": "cluttered", "images": busy,
                        "why": f"have a busy background (more than {CLUTTER_PER_OBJECT}×{max_objects} separate "
                               "specks of ink, or ink that touches all four edges: texture, noise, a frame)"})
    return out


def suggest_sprite_size(objects: Dict[str, np.ndarray], canvas, counts: Optional[np.ndarray] = None,
                        min_pixels: int = 4) -> Optional[dict]:
    """The sprite side S for objects of these extents, or None when no object was found.

    Rule: e = the 95th percentile (an extent that occurs, ``method="higher"``) of the objects'
    larger side at half maximum; S = the smallest odd number above e (e + 1 when e is even,
    e + 2 when odd). The centre pixel of an odd sprite lands on the object's location pixel; the
    extra pixel covers the half-pixel by which a centre pixel misses the middle of an even-sized
    object, and on odd-sized ones leaves a pixel of margin — the paper's 17 for MNIST's 15-pixel
    ink and 21 for dSprites' 19. The 95th percentile (not the largest) ignores the odd pair of
    objects that touch and read as one component. Specks under ``min_pixels`` are not objects.
    With per-image ``counts`` (labels), only images whose component count equals their label
    count are used (when they hold at least 20 objects): the components there are the objects.
    S is capped at the largest odd side the canvas holds.

    Returns {"sprite_size", "extent_p95", "extent_median", "extent_max", "objects", "images", "capped"}.
    """
    h, w = canvas
    keep = objects["pixels"] >= min_pixels
    if counts is not None:
        counts = np.asarray(counts)
        clean = objects["per_image"] == counts
        sel = keep & clean[objects["image"]]
        if sel.sum() >= 20:
            keep = sel
    extent = np.maximum(objects["height"], objects["width"])[keep]
    if extent.size == 0:
        return None
    e = int(np.percentile(extent, 95, method="higher"))
    s = e + 1 if e % 2 == 0 else e + 2
    cap = min(h, w) if min(h, w) % 2 else min(h, w) - 1
    return {"sprite_size": int(min(s, cap)), "extent_p95": e, "extent_median": float(np.median(extent)),
            "extent_max": int(extent.max()), "objects": int(extent.size),
            "images": int(len(np.unique(objects["image"][keep]))), "capped": bool(s > cap)}
