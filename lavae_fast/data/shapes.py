"""Random-shape scenes drawn outside the data set format: a folder of PNGs plus a labels CSV.

This is the smallest "your own images" source: coloured squares, discs, triangles and diamonds on
a black canvas, as another program would draw them. It serves the tests and the benchmark of
``python -m lavae_fast.data import`` and is a template for a user's own generator::

    python -m lavae_fast.data shapes --out scenes/ --n 5000 --canvas 64
    python -m lavae_fast.data import scenes/ --labels scenes/labels.csv --out data/scenes

Every shape fills a ``size``×``size`` box exactly (its ink extent is ``size`` rows and ``size``
columns), so the sprite side that ``stats`` suggests can be checked against the truth. Objects'
boxes keep at least one empty pixel between them, so 8-connected ink components are the objects.
Counts are stratified over ``counts`` (equal numbers of each, shuffled), as the generated sets'.
``labels.csv``: ``file,count,row,col,row,col,...`` with each object's centre pixel
(top-left + size // 2, the convention of the generated sets' patch centres).
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .dsprites import COLOURS as _SATURATED
from .generator import parse_canvas, stratified_counts
from .placement import PlacementError

__all__ = ["SHAPES", "shape_mask", "draw_scenes", "write_scene_folder", "LABELS_FILE"]

SHAPES = ("square", "disc", "triangle", "diamond")
LABELS_FILE = "labels.csv"
_TRIES = 100  # positions tried per object before the image is drawn again
_REDRAWS = 1000


def shape_mask(kind: str, size: int) -> np.ndarray:
    """bool [size, size]: the shape's ink, touching all four sides of its box."""
    if size < 3:
        raise ValueError(f"size: shapes need at least 3 pixels, got {size}")
    r, c = np.mgrid[0:size, 0:size].astype(np.float64)
    mid = (size - 1) / 2
    if kind == "square":
        return np.ones((size, size), bool)
    if kind == "disc":
        # Pixel centres within size/2 of the box centre: at the four side midpoints that is
        # exactly size/2 − 1/2 away, so the disc reaches every side.
        return (r - mid) ** 2 + (c - mid) ** 2 <= (size / 2) ** 2
    if kind == "triangle":
        # Apex at the top centre, base the whole bottom row.
        half = (r + 1) / size * (size / 2)
        return np.abs(c - mid) <= half
    if kind == "diamond":
        return np.abs(r - mid) + np.abs(c - mid) <= size / 2
    raise ValueError(f"kind: expected one of {', '.join(SHAPES)}, got {kind!r}")


def _hue_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """uint8 [n, 3]: fully saturated, fully bright colours of uniform hue (HSV with S = V = 1)."""
    h = rng.random(n) * 6.0
    x = 1.0 - np.abs(h % 2.0 - 1.0)
    sector = h.astype(np.int64) % 6
    z = np.zeros(n)
    o = np.ones(n)
    table = np.stack([np.stack(v, axis=1) for v in
                      ((o, x, z), (x, o, z), (z, o, x), (z, x, o), (x, z, o), (o, z, x))], axis=0)
    rgb = table[sector, np.arange(n)]
    return np.rint(rgb * 255).astype(np.uint8)


def draw_scenes(n: int, canvas=64, size: Optional[int] = None, counts: Sequence[int] = (0, 3),
                colours: str = "saturated", seed: int = 0) -> Dict[str, np.ndarray]:
    """Draw ``n`` scenes in memory.

    ``canvas`` 64 or (H, W); ``size`` the shapes' side in pixels (default canvas side // 4);
    ``counts`` (min, max) objects per scene; ``colours`` "saturated" (the 7 colours of
    multi-dSprites: every channel 0 or 255, so the images are binary) or "hue" (any hue at full
    saturation and brightness: grey levels). Returns numpy arrays:
      images  uint8 [n, H, W, 3] in 0..255 (black background)
      counts  int64 [n]
      centres int64 [n, K, 2] (row, col) of each shape's centre pixel, −1 padded (K = max count)
      shapes  int64 [n, K] index into :data:`SHAPES`, −1 padded
      colours uint8 [n, K, 3]
    """
    h, w = parse_canvas(canvas)
    size = max(3, min(h, w) // 4) if size is None else int(size)
    lo, hi = int(counts[0]), int(counts[1])
    if not 0 <= lo <= hi:
        raise ValueError(f"counts: expected 0 <= min <= max, got {counts}")
    if colours not in ("saturated", "hue"):
        raise ValueError(f"colours: expected 'saturated' or 'hue', got {colours!r}")
    if size > h or size > w:
        raise PlacementError(f"a {size}×{size} shape does not fit a {h}×{w} canvas")
    # Boxes grown by the one-pixel gap must fit side by side: a quick area bound.
    if hi * (size + 1) ** 2 > (h + 1) * (w + 1):
        raise PlacementError(f"{hi} shapes of {size}×{size} (with a 1-pixel gap) cannot fit a {h}×{w} canvas")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    masks = np.stack([shape_mask(k, size) for k in SHAPES])
    count = stratified_counts(n, lo, hi, rng)
    images = np.zeros((n, h, w, 3), np.uint8)
    centres = np.full((n, hi, 2), -1, np.int64)
    kinds = np.full((n, hi), -1, np.int64)
    cols = np.zeros((n, hi, 3), np.uint8)
    span = (h - size + 1, w - size + 1)
    gap = size + 1  # top-left corners this far apart (in rows or in columns) leave an empty pixel
    for i in range(n):
        k = int(count[i])
        for _ in range(_REDRAWS):
            corners = []
            for _ in range(k):
                cand = rng.integers(0, span, size=(_TRIES, 2))
                if corners:
                    prev = np.array(corners)
                    d = np.abs(cand[:, None, :] - prev[None, :, :])
                    ok = ((d[..., 0] >= gap) | (d[..., 1] >= gap)).all(axis=1)
                else:
                    ok = np.ones(_TRIES, bool)
                if not ok.any():
                    break
                corners.append(cand[ok.argmax()])
            if len(corners) == k:
                break
        else:
            raise PlacementError(f"{k} shapes of {size}×{size} could not be placed on a {h}×{w} canvas "
                                 f"in {_REDRAWS} draws; use a larger canvas, smaller shapes or fewer objects")
        if k == 0:
            continue
        which = rng.integers(0, len(SHAPES), size=k)
        colour = _SATURATED[rng.integers(0, len(_SATURATED), size=k)] * 255 if colours == "saturated" \
            else _hue_colours(rng, k)
        for j, (r0, c0) in enumerate(corners):
            patch = images[i, r0:r0 + size, c0:c0 + size]
            patch[masks[which[j]]] = colour[j]
            centres[i, j] = (r0 + size // 2, c0 + size // 2)
        kinds[i, :k] = which
        cols[i, :k] = colour
    return {"images": images, "counts": count.astype(np.int64), "centres": centres, "shapes": kinds,
            "colours": cols, "size": np.int64(size)}


def _labels_csv(names, counts, centres) -> str:
    lines = ["file,count,row,col,..."]
    for name, k, cen in zip(names, counts, centres):
        coords = ",".join(f"{r},{c}" for r, c in cen[: int(k)])
        lines.append(f"{name},{int(k)}" + (f",{coords}" if coords else ""))
    return "\n".join(lines) + "\n"


def _only_ours(folder: str) -> bool:
    return all(n.endswith(".png") or n == LABELS_FILE for n in os.listdir(folder))


def write_scene_folder(out: str, n: int, canvas=64, size: Optional[int] = None, counts: Sequence[int] = (0, 3),
                       colours: str = "saturated", seed: int = 0, *, overwrite: bool = False,
                       progress: bool = False, compress_level: int = 1) -> Tuple[str, int]:
    """Write ``n`` scenes (:func:`draw_scenes`) to ``out``/``scene_00000.png``... and
    ``out``/``labels.csv``. The folder appears complete or not at all: it is written beside
    ``out`` and renamed into place. An existing non-empty ``out`` is refused, or replaced with
    ``overwrite`` when it holds nothing but PNGs and a labels.csv. Returns (out, shape size)."""
    from PIL import Image

    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise NotADirectoryError(f"--out {out} exists and is not a folder")
        if os.listdir(out):
            if not overwrite:
                raise FileExistsError(f"--out {out} is not empty; choose an empty or new folder "
                                      "(or pass --overwrite to replace a folder of scenes)")
            if not _only_ours(out):
                raise FileExistsError(f"--out {out} holds files other than PNGs and {LABELS_FILE}; "
                                      "--overwrite replaces only a folder of scenes")
    scenes = draw_scenes(n, canvas, size, counts, colours, seed)
    digits = max(5, len(str(max(n - 1, 0))))
    names = [f"scene_{i:0{digits}d}.png" for i in range(n)]
    stage = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.scenes-{os.getpid()}")
    bar = None
    try:
        os.makedirs(stage)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc="shapes", unit="img", dynamic_ncols=True)
        for i, name in enumerate(names):
            Image.fromarray(scenes["images"][i]).save(os.path.join(stage, name), compress_level=compress_level)
            if bar is not None:
                bar.update(1)
        with open(os.path.join(stage, LABELS_FILE), "w") as f:
            f.write(_labels_csv(names, scenes["counts"], scenes["centres"]))
        if os.path.isdir(out):
            old = out + f".old-{os.getpid()}"
            os.rename(out, old)
            os.rename(stage, out)
            shutil.rmtree(old)
        else:
            os.rename(stage, out)
    finally:
        if bar is not None:
            bar.close()
        if os.path.isdir(stage):
            shutil.rmtree(stage, ignore_errors=True)
    return out, int(scenes["size"])
