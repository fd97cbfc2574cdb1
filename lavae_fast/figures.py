"""The paper's figures from a trained run (reconstructions, prior samples, disentanglement).

    python -m lavae_fast.figures RUN_DIR [--baseline BASELINE_RUN_DIR] [--out DIR]

writes PNG files (one per figure) into ``RUN_DIR/figures`` by default:

* ``reconstructions_<split>.png`` — inputs (top) and reconstructions with the inferred locations
  marked (bottom), on the 0–3-object test split and on the 7-object split (paper figs. 3–4);
* ``samples.png`` — scenes drawn from LAVAE's prior p(z_loc|n) p(z_app|n) p(n) (and, with
  ``--baseline``, from the baseline's prior in a second block; paper fig. 10);
* ``swap.png`` — reconstructions (top) and the same scenes with the objects' locations reversed
  (bottom): each object keeps its appearance (paper fig. 11, top left);
* ``traverse_location.png`` — one object moved along a row of the canvas (fig. 11, top right);
* ``traverse_appearance.png`` — one object's appearance dimensions traversed from −2 to 2, one row
  per dimension (fig. 11, bottom).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["load_run", "tile", "reverse_locations", "reconstruction_figure", "sample_figure", "swap_figure",
           "location_traversal_figure", "appearance_traversal_figure", "main"]

GAP = 2  # pixels of grey between tiles
UPSCALE = 2  # nearest-neighbour zoom of every tile, so 64×64 canvases stay legible


def load_run(run_dir: str, device: str = "cpu"):
    """(model in eval mode, checkpoint dict) from a run directory written by ``lavae_fast.train``."""
    from .checkpoint import build_model, load_checkpoint

    ckpt = load_checkpoint(run_dir)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def _rgb(img: torch.Tensor) -> np.ndarray:
    """[C,H,W] in [0,1] (C = 1 or 3) -> uint8 [H,W,3]."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def tile(rows: Sequence[Sequence[torch.Tensor]], gap: int = GAP, upscale: int = UPSCALE):
    """A PIL image of a grid: ``rows`` of [C,H,W] images in [0,1], all of one size."""
    from PIL import Image

    cells = [[_rgb(im).repeat(upscale, 0).repeat(upscale, 1) for im in row] for row in rows]
    h, w = cells[0][0].shape[:2]
    ncols = max(len(r) for r in cells)
    out = np.full((len(cells) * (h + gap) + gap, ncols * (w + gap) + gap, 3), 128, np.uint8)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            out[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = cell
    return Image.fromarray(out)


def _mark(img: torch.Tensor, rows, cols) -> torch.Tensor:
    """A copy of [C,H,W] as RGB with a small red cross at each (row, col)."""
    out = img.detach().float().cpu().clone()
    if out.shape[0] == 1:
        out = out.expand(3, -1, -1).clone()
    H, W = out.shape[-2:]
    for r, c in zip(rows, cols):
        for dr, dc in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
            if 0 <= r + dr < H and 0 <= c + dc < W:
                out[:, r + dr, c + dc] = torch.tensor([1.0, 0.0, 0.0])
    return out


def reconstruction_figure(model, x: torch.Tensor):
    """Inputs on top, reconstructions with the inferred locations (red crosses) below."""
    lat = model.infer(x)
    lam = model.decode(lat)
    marked = []
    for b in range(x.shape[0]):
        k = int(lat.n[b])
        marked.append(_mark(lam[b], lat.rows[b, :k].tolist(), lat.cols[b, :k].tolist()))
    return tile([list(x), marked])


def sample_figure(model, num: int = 16, baseline=None, seed: int = 0, per_row: int = 8):
    """Prior samples of LAVAE (and, below them, of the baseline)."""
    gen = torch.Generator().manual_seed(seed)
    imgs = list(model.sample(num, generator=gen))
    rows = [imgs[i : i + per_row] for i in range(0, num, per_row)]
    if baseline is not None:
        canvas = model.canvas
        base = list(baseline.sample(num, canvas=canvas, generator=torch.Generator().manual_seed(seed)))
        rows += [base[i : i + per_row] for i in range(0, num, per_row)]
    return tile(rows)


def _select(lat, keep: torch.Tensor):
    """The scenes of ``lat`` where ``keep`` [B] is true."""
    return type(lat)(n=lat.n[keep], index=lat.index[keep], z_app=lat.z_app[keep], canvas=lat.canvas)


def reverse_locations(lat):
    """A copy of ``lat`` where each scene's present objects take their locations in reverse order
    (every object keeps its appearance)."""
    index = lat.index.clone()
    for b in range(index.shape[0]):
        k = int(lat.n[b])
        index[b, :k] = index[b, :k].flip(0)
    return type(lat)(n=lat.n, index=index, z_app=lat.z_app, canvas=lat.canvas)


def swap_figure(model, lat):
    """Scenes (top) and the same scenes with the order of their locations reversed (bottom).

    ``lat``: :class:`lavae_fast.model.Latents` (e.g. ``model.infer(x)``); scenes with fewer than
    two objects are left out."""
    keep = lat.n >= 2
    if not bool(keep.any()):
        raise ValueError("swap_figure needs scenes with at least two objects")
    lat = _select(lat, keep)
    return tile([list(model.decode(lat)), list(model.decode(reverse_locations(lat)))])


def location_traversal_figure(model, lat, steps: int = 8, obj: int = 0):
    """Each row: one scene's object ``obj`` moved along its own row of the canvas, left to right."""
    keep = lat.n > obj
    if not bool(keep.any()):
        raise ValueError(f"location_traversal_figure needs scenes with more than {obj} objects")
    lat = _select(lat, keep)
    W = lat.canvas[1]
    cols = np.linspace(0, W - 1, steps).round().astype(int)
    rows = []
    for b in range(lat.n.shape[0]):
        one = _select(lat, torch.arange(lat.n.shape[0]) == b)
        r = int(one.rows[0, obj])
        rows.append([model.decode(model.move_object(one, obj, r, int(c)))[0] for c in cols])
    return tile(rows)


def appearance_traversal_figure(model, lat, dims: Sequence[int] = (0, 1, 2), steps: int = 8,
                                obj: int = 0, span: float = 2.0):
    """For the first scene with an object ``obj``: one row per appearance dimension, −span..span."""
    found = (lat.n > obj).nonzero().flatten()
    if found.numel() == 0:
        raise ValueError(f"appearance_traversal_figure needs a scene with more than {obj} objects")
    one = _select(lat, torch.arange(lat.n.shape[0]) == int(found[0]))
    values = np.linspace(-span, span, steps)
    return tile([[model.decode(model.change_appearance(one, obj, d, float(v)))[0] for v in values] for d in dims])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavae_fast.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a LAVAE run directory written by lavae_fast.train")
    p.add_argument("--baseline", default=None, help="a baseline run directory, for its prior samples")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/figures)")
    p.add_argument("--num", type=_positive_int, default=8, help="images per row")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    return p


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # nothing half-written: every output file is replaced atomically
        print("python -m lavae_fast.figures: interrupted", file=sys.stderr)
        return 130


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .evaluate import check_data_fits
    from .train import load_split

    try:
        model, ckpt = load_run(args.run_dir)
        baseline = None
        if args.baseline:
            baseline, bckpt = load_run(args.baseline)
            if bckpt["model_config"]["kind"] != "baseline":
                raise SystemExit(f"error: --baseline {args.baseline} holds a {bckpt['model_config']['kind']} model, "
                                 "not the β-VAE baseline (train one with --model baseline)")
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    if ckpt["model_config"]["kind"] != "lavae":
        raise SystemExit(f"error: {args.run_dir} holds a {ckpt['model_config']['kind']} model; figures need LAVAE")
    out = args.out or os.path.join(args.run_dir, "figures")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"error: --out {out}: {exc}")
    written: List[str] = []

    def save(img, name):
        path = os.path.join(out, name)
        tmp = os.path.join(out, f".{name}.tmp-{os.getpid()}")
        try:
            img.save(tmp, format="PNG")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        written.append(path)

    # The splits first: a run whose data is gone is an error; a split that cannot exist (7 objects
    # on 32×32) or holds no image only costs its figures, as in training's evaluation.
    data = {}
    for split in ("test", "test7"):
        try:
            d = load_split(dict(ckpt["args"]), split)
            check_data_fits(ckpt, d)
        except (FileNotFoundError, OSError) as exc:
            raise SystemExit(f"error: the run's {split} split: {exc}")
        except ValueError as exc:
            if args.run_dir and ckpt["args"].get("data") and not os.path.isdir(str(ckpt["args"]["data"])):
                raise SystemExit(f"error: the run's data set is gone: {exc}")
            print(f"skipped the {split} split: {exc}", file=sys.stderr)
            continue
        if not len(d.counts):
            print(f"skipped the {split} split: it holds no images", file=sys.stderr)
            continue
        data[split] = d
    if not data:
        raise SystemExit("error: neither the test nor the test7 split of the run's data can be used")

    with torch.no_grad():
        for split, d in data.items():
            x, _ = d.get_batch(np.arange(min(args.num, len(d))))
            save(reconstruction_figure(model, x), f"reconstructions_{split}.png")
        save(sample_figure(model, 2 * args.num, baseline=baseline, seed=args.seed, per_row=args.num), "samples.png")
        # The 7-object split guarantees several objects per image for the manipulation figures;
        # without it, the test split's images with the most objects stand in.
        if "test7" in data:
            x7, _ = data["test7"].get_batch(np.arange(min(args.num, 4, len(data["test7"]))))
        else:
            d = data["test"]
            pick = np.argsort(-np.asarray(d.counts), kind="stable")[: min(args.num, 4)]
            x7, _ = d.get_batch(np.sort(pick))
        lat7 = model.infer(x7)
        for name, make in (("swap.png", lambda: swap_figure(model, lat7)),
                           ("traverse_location.png", lambda: location_traversal_figure(model, lat7, steps=args.num)),
                           ("traverse_appearance.png", lambda: appearance_traversal_figure(model, lat7, steps=args.num))):
            try:
                save(make(), name)
            except ValueError as exc:  # e.g. an untrained model that finds no objects
                print(f"skipped {name}: {exc}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
