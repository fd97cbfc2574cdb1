"""The multi-dSprites sprites: every shape × scale × angle mask, rasterised once (SPEC §8).

Patch 19×19. Coordinates are measured from the centre of the patch's centre pixel (9, 9), in
pixels, x to the right (columns) and y downwards (rows); a pixel is inked when its centre lies
inside the shape. Square and triangle are the regular 4- and 3-gons inscribed in a circle of
radius scale·19/2 with a first vertex at the angle; the ellipse has semi-axes scale·19/2 (along
the angle) and scale·19/3. At scale 1 the circle touches the patch's outer edges, so every
shape fits its patch.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "PATCH",
    "SHAPES",
    "SCALES",
    "ANGLES",
    "COLOURS",
    "COLOUR_NAMES",
    "shape_masks",
    "sprite_table",
]

PATCH = 19
SHAPES = ("square", "triangle", "ellipse")
SCALES = np.linspace(0.6, 1.0, 6)
ANGLES = np.linspace(0.0, 2.0 * np.pi * (1.0 - 1.0 / 40.0), 40)
COLOUR_NAMES = ("white", "red", "green", "blue", "yellow", "magenta", "cyan")
# Saturated RGB: every channel 0 or 1, at least one 1 (paper §3.2).
COLOURS = np.array(
    [[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.uint8
)

# Pixel centres on the boundary of a shape are a matter of rounding; this slack makes the
# rasterisation independent of the last float bit (it is far below a pixel).
_EDGE_EPS = 1e-9


def _polygon_mask(x: np.ndarray, y: np.ndarray, k: int, radius: float, angle: float) -> np.ndarray:
    """Pixel centres inside the regular k-gon: on the inner side of each edge (convex polygon)."""
    t = angle + 2.0 * np.pi * np.arange(k) / k
    vx, vy = radius * np.cos(t), radius * np.sin(t)
    inside = np.ones(x.shape, dtype=bool)
    for i in range(k):
        ax, ay, bx, by = vx[i], vy[i], vx[(i + 1) % k], vy[(i + 1) % k]
        # Vertices go round counter-clockwise in (x, y), so the inside is to the left of each edge.
        cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
        inside &= cross >= -_EDGE_EPS
    return inside


def _ellipse_mask(x: np.ndarray, y: np.ndarray, a: float, b: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u = x * c + y * s  # along the major axis
    v = -x * s + y * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0 + _EDGE_EPS


@functools.lru_cache(maxsize=1)
def shape_masks() -> np.ndarray:
    """All masks: bool [3 shapes, 6 scales, 40 angles, 19, 19] (read-only, computed once)."""
    half = PATCH // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    out = np.zeros((len(SHAPES), len(SCALES), len(ANGLES), PATCH, PATCH), dtype=bool)
    for j, scale in enumerate(SCALES):
        r = scale * PATCH / 2.0
        for k, angle in enumerate(ANGLES):
            out[0, j, k] = _polygon_mask(xx, yy, 4, r, angle)
            out[1, j, k] = _polygon_mask(xx, yy, 3, r, angle)
            out[2, j, k] = _ellipse_mask(xx, yy, r, scale * PATCH / 3.0, angle)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def sprite_table():
    """Every coloured sprite, indexed by id = ((shape·6 + scale)·40 + angle)·7 + colour.

    Returns (sprites uint8 [5040, 3, 19, 19] in {0,1}, labels dict name → int64 [5040]).
    Attributes drawn independently and uniformly are a uniform id, so the generator draws ids.
    """
    masks = shape_masks().reshape(-1, PATCH, PATCH)  # [720, 19, 19]
    sprites = masks[:, None, None, :, :] & COLOURS.astype(bool)[None, :, :, None, None]  # [720, 7, 3, P, P]
    sprites = sprites.reshape(-1, 3, PATCH, PATCH).astype(np.uint8)
    ids = np.arange(sprites.shape[0])
    colour, rest = ids % len(COLOURS), ids // len(COLOURS)
    angle, rest = rest % len(ANGLES), rest // len(ANGLES)
    scale, shape = rest % len(SCALES), rest // len(SCALES)
    labels = {"shape": shape, "scale": scale, "angle": angle, "colour": colour}
    sprites.setflags(write=False)
    return sprites, labels
