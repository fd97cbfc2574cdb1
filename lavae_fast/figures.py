"""The paper's figures from a trained model, each labelled so that it reads without the code.

    python -m lavae_fast.figures RUN_OR_NAME [--baseline RUN_OR_NAME] [--out DIR] [--num N]

``RUN_OR_NAME``: a run directory written by ``lavae_fast.train``, a checkpoint file, or a shipped
model's name (``python -m lavae_fast.pretrained list``). Writes PNG files into ``--out`` (default
``RUN_DIR/figures``; required for a name). Figure numbers are the paper's; the paper shows each
experiment on one data set, so a title cites the figure of the run's data set where the paper has
one, else the figure of the same experiment on another set ("as paper Fig. 1, multi-MNIST-10k"):

* ``reconstructions_<split>.png`` — inference on test images (paper Fig. 1 multi-MNIST-10k, Fig. 5
  multi-dSprites): per image, the input, the reconstruction, a black canvas with the inferred
  locations in white, and the sprite generated from each object's appearance; on the 0–3-object
  split ``test`` and the 7-object split ``test7``;
* ``samples.png`` — samples from LAVAE's learned prior p(z_loc|n) p(z_app|n) p(n), beside the
  baseline's prior samples p(z) with ``--baseline`` (paper Fig. 2, Fig. 4, Fig. 10);
* ``swap_<split>.png`` — objects 1 and 2 exchange locations, each keeping its appearance (Fig. 3 top
  right, Fig. 6, Fig. 11 top left);
* ``traverse_location_<split>.png`` — object 1 moved along its row of the canvas (Fig. 3 left,
  Fig. 7 left, Fig. 8 top, Fig. 11 top right);
* ``traverse_appearance_<split>.png`` — one appearance dimension of object 1 traversed per row (Fig. 3
  bottom right, Fig. 7 right, Fig. 8 bottom, Fig. 11 bottom);
* ``fixed_count.png`` — generation with p(n) replaced by the uniform distribution over {4, 5}
  (paper Fig. 9);
* ``training_curves.png`` — count accuracy and the bound (−ELBO) against the training step, read from
  the run's ``metrics.jsonl`` (not a paper figure; the paper reports final values in Table 1).

Every PNG also carries its title and labels as PNG text chunks ("Title", "Description").

From Python, :func:`draw_figures` is this CLI without its parser (it returns the files written;
its errors are :class:`FiguresError`); each figure is a function of the model and its inferences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import _cli
from ._cli import nonneg_int, positive_int
from ._io import OutputLocationError, atomic_write, check_output_folder, describe_os_error

__all__ = ["load_run", "tile", "reverse_locations", "paper_ref", "reconstruction_figure", "sample_figure",
           "swap_figure", "location_traversal_figure", "appearance_traversal_figure", "fixed_count_figure",
           "training_curves_figure", "read_metrics", "save_figure", "figure_texts", "grid_size", "draw_figures",
           "FiguresError", "main"]

GAP = 2  # pixels of grey between tiles
UPSCALE = 2  # nearest-neighbour zoom of every tile, so 64×64 canvases stay legible
DPI = 100
CELL = 1.1  # inches per image in a grid
LABEL_W = 1.5  # inches for the row labels (left)
TITLE_H, TITLE_LINE, TITLE_PT = 0.45, 0.16, 8  # inches for the column labels, per title line; title size

DATASET_NAMES = {"multi-mnist-1k": "multi-MNIST-1k", "multi-mnist-10k": "multi-MNIST-10k",
                 "multi-dsprites": "multi-dSprites"}
# Which paper figure shows each experiment, per data set (paper §3 and appendix C); the first entry
# is cited ("as paper Fig. …") for a data set the paper does not show it on.
PAPER_FIGURES = {
    "inference": {"multi-mnist-10k": "1", "multi-dsprites": "5"},
    "prior": {"multi-mnist-10k": "2", "multi-dsprites": "4", "multi-mnist-1k": "10"},
    "swap/test": {"multi-mnist-10k": "3 top right", "multi-dsprites": "6"},
    "swap/test7": {"multi-mnist-1k": "11 top left"},
    "location/test": {"multi-mnist-10k": "3 left", "multi-dsprites": "7 left"},
    "location/test7": {"multi-mnist-10k": "8 top", "multi-mnist-1k": "11 top right"},
    "appearance/test": {"multi-mnist-10k": "3 bottom right", "multi-dsprites": "7 right"},
    "appearance/test7": {"multi-mnist-10k": "8 bottom", "multi-mnist-1k": "11 bottom"},
    "fixed_count": {"multi-mnist-10k": "9", "multi-mnist-1k": "9", "multi-dsprites": "9"},
}
SPLIT_NAMES = {"test": "0–3-object test images", "test7": "7-object test images (more than in training)"}


def paper_ref(experiment: str, dataset: Optional[str]) -> str:
    """"paper Fig. 5" for (``experiment``, ``dataset``) when the paper shows it on that set, else
    "as paper Fig. 1 on multi-MNIST-10k"."""
    table = PAPER_FIGURES[experiment]
    if dataset in table:
        return f"paper Fig. {table[dataset]}"
    other, number = next(iter(table.items()))
    return f"as paper Fig. {number} on {DATASET_NAMES[other]}"


def load_run(run_or_name: str, device: str = "cpu", kind: Optional[str] = None):
    """(model in eval mode, checkpoint dict) from a run directory, a checkpoint file or a shipped
    model's name, through the one verified loader (:func:`lavae_fast.loading.load_model`)."""
    from .loading import load_model

    return load_model(run_or_name, kind, device=device)


def _rgb(img: torch.Tensor) -> np.ndarray:
    """[C,H,W] in [0,1] (C = 1 or 3) -> uint8 [H,W,3]."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def tile(rows: Sequence[Sequence[torch.Tensor]], gap: int = GAP, upscale: int = UPSCALE):
    """A PIL image of a grid: ``rows`` of [C,H,W] images in [0,1], all of one size (unlabelled; the
    figures below are labelled grids)."""
    from PIL import Image

    cells = [[_rgb(im).repeat(upscale, 0).repeat(upscale, 1) for im in row] for row in rows]
    h, w = cells[0][0].shape[:2]
    ncols = max(len(r) for r in cells)
    out = np.full((len(cells) * (h + gap) + gap, ncols * (w + gap) + gap, 3), 128, np.uint8)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            out[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = cell
    return Image.fromarray(out)


# ---------------------------------------------------------------------------------------------
# Labelled grids
# ---------------------------------------------------------------------------------------------


def _wrap_title(title: str, width_in: float) -> List[str]:
    # ~0.6 em per character at the title's 8 pt: lines that fit the figure, never clipped at its edges.
    return textwrap.wrap(title, max(20, int((width_in - 0.2) * 72 / (TITLE_PT * 0.6))))


def grid_size(nrows: int, ncols: int, title: str = ""):
    """(width, height) in inches of a labelled grid of ``nrows`` × ``ncols`` images under ``title``."""
    w = LABEL_W + ncols * CELL
    return w, TITLE_H + TITLE_LINE * len(_wrap_title(title, w)) + nrows * CELL


def _grid(rows, row_labels, col_labels, title, marks=None, corners=None):
    """A matplotlib Figure: ``rows`` of [C,H,W] images (None = an empty cell), a label left of each
    row, one above each column, ``title`` on top. ``marks[(r, c)]``: [(row, col, text, colour)]
    annotations drawn on that cell (pixel coordinates of the image); ``corners[(r, c)]``: a text in
    the cell's top-left corner."""
    from matplotlib import patheffects
    from matplotlib.figure import Figure

    nrows, ncols = len(rows), max(len(r) for r in rows)
    w, h = grid_size(nrows, ncols, title)
    lines = _wrap_title(title, w)
    fig = Figure(figsize=(w, h), dpi=DPI)
    top = TITLE_H + TITLE_LINE * len(lines)
    fig.subplots_adjust(left=LABEL_W / w, right=1 - 0.05 / w, top=1 - top / h, bottom=0.05 / h,
                        wspace=0.08, hspace=0.08)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = rows[r][c] if c < len(rows[r]) else None
            if img is None:
                ax.axis("off")
            else:
                ax.imshow(_rgb(img), interpolation="nearest")
                for (pr, pc, text, colour) in (marks or {}).get((r, c), []):
                    # A dark outline keeps the mark legible on a sprite of its own colour (cyan on white,
                    # green or yellow was hard to read).
                    ax.text(pc, pr, text, color=colour, fontsize=7, fontweight="bold", ha="center", va="center",
                            path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
                if (r, c) in (corners or {}):
                    ax.text(0.03, 0.97, corners[(r, c)], transform=ax.transAxes, color="yellow", fontsize=6,
                            ha="left", va="top")
            if r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=7)
            if c == 0:
                # On an axes that is switched off, a ylabel would not be drawn: use a text instead.
                ax.text(-0.08, 0.5, row_labels[r], transform=ax.transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle("\n".join(lines), fontsize=TITLE_PT, y=1 - 0.08 / h, va="top")
    return fig


def figure_texts(fig) -> List[str]:
    """Every visible text of a matplotlib Figure (title, axes titles and labels, annotations)."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def save_figure(fig, path: str) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically (a temporary name, then a rename), with its
    title and labels as PNG text chunks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    texts = figure_texts(fig)
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    folder, name = os.path.split(path)
    with atomic_write(path, "wb", tmp=os.path.join(folder, f".{name}.tmp-{os.getpid()}")) as f:
        # No bbox_inches="tight": the size stays grid_size() × DPI, which callers can rely on.
        fig.savefig(f, format="png", dpi=DPI, metadata={"Title": title, "Description": " | ".join(texts)})


def _title(what: str, ref: str, dataset: Optional[str]) -> str:
    on = f" — {DATASET_NAMES.get(dataset, dataset)}" if dataset else ""
    return f"{what}{on} ({ref})"


# ---------------------------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------------------------


def _locations_canvas(lat, b: int, channels: int) -> torch.Tensor:
    """The paper's summary of inferred locations: a black canvas, white at each inferred location
    (a 3×3 dot, so that a single pixel stays visible at figure size)."""
    H, W = lat.canvas
    out = torch.zeros(channels, H, W)
    for r, c in zip(lat.rows[b, : int(lat.n[b])].tolist(), lat.cols[b, : int(lat.n[b])].tolist()):
        out[:, max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = 1.0
    return out


def reconstruction_figure(model, x: torch.Tensor, counts: Optional[Sequence[int]] = None, *,
                          dataset: Optional[str] = None, split: str = "test"):
    """Inference on test images (paper Fig. 1 / Fig. 5): one row per image — input, reconstruction,
    inferred locations, then the sprite generated from each object's inferred appearance."""
    lat = model.infer(x)
    lam = model.decode(lat)
    with torch.no_grad():
        sprites = model._decode_present(lat.z_app, lat.n)  # [B,M,C,S,S], eval mode (decode set it)
    k_max = int(lat.n.max()) if lat.n.numel() else 0
    rows, labels = [], []
    for b in range(x.shape[0]):
        k = int(lat.n[b])
        rows.append([x[b], lam[b], _locations_canvas(lat, b, x.shape[1])] + [sprites[b, i] for i in range(k)]
                    + [None] * (k_max - k))
        true = f"true n = {int(counts[b])}, " if counts is not None else ""
        labels.append(f"image {b + 1}\n{true}inferred n̂ = {k}")
    S = model.sprite_size
    # Short column labels: a tile is ~100 px wide, and longer ones run into their neighbours.
    cols = ["input", "reconstruction", "inferred locations"] + [f"sprite {i + 1}" for i in range(k_max)]
    none = (f" ({S}×{S}, enlarged)" if k_max else
            " (no object was inferred in these images, so there are no sprites)")
    title = _title(f"Inference on {SPLIT_NAMES.get(split, split)}: input, reconstruction, inferred locations "
                   f"(white), and the sprite generated from each object's appearance z_app{none}",
                   paper_ref("inference", dataset), dataset)
    return _grid(rows, labels, cols, title)


def sample_figure(model, num: int = 16, baseline=None, seed: int = 0, per_row: int = 8, *,
                  dataset: Optional[str] = None):
    """Samples from LAVAE's learned prior (left block) beside the baseline's prior samples (right
    block; paper Fig. 2 / Fig. 4 / Fig. 10), each LAVAE sample labelled with its drawn n."""
    gen = torch.Generator().manual_seed(seed)
    imgs, lat = model.sample(num, generator=gen, return_latents=True)
    nrows = -(-num // per_row)
    rows = [list(imgs[r * per_row : (r + 1) * per_row]) + [None] * max(0, (r + 1) * per_row - num)
            for r in range(nrows)]
    cols = ["LAVAE"] * per_row
    corners = {(r, c): f"n={int(lat.n[r * per_row + c])}" for r in range(nrows) for c in range(per_row)
               if r * per_row + c < num}
    if baseline is not None:
        base = baseline.sample(num, canvas=tuple(lat.canvas), generator=torch.Generator().manual_seed(seed))
        rows = [row + [None] + list(base[r * per_row : (r + 1) * per_row]) for r, row in enumerate(rows)]
        cols += ["", *["β-VAE baseline"] * per_row]  # an empty column between the two blocks
    labels = [f"samples {r * per_row + 1}–{min((r + 1) * per_row, num)}" for r in range(nrows)]
    pn = model.prior_log_probs().exp().tolist()
    what = "left: LAVAE, p(z_loc|n) p(z_app|n) p(n), p(n) learned (each sample's n in its corner)" + (
        "; right: β-VAE baseline, p(z)" if baseline is not None else "; no baseline given (--baseline)")
    shown = ", ".join(f"p({i}) = {p:.2f}" for i, p in enumerate(pn[:4])) + f", p(≥4) = {sum(pn[4:]):.2f}"
    title = _title(f"Samples from the prior — {what}. Learned {shown}", paper_ref("prior", dataset), dataset)
    return _grid(rows, labels, cols, title, corners=corners)


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


def _above(row: int, sprite_size: int) -> int:
    """Where a marker pointing at an object at ``row`` goes: above its sprite, or inside it at the top
    of the canvas."""
    return max(row - sprite_size // 2 - 3, 1)


def _split_ref(experiment: str, split: str, dataset: Optional[str]) -> str:
    return paper_ref(f"{experiment}/{'test7' if split == 'test7' else 'test'}", dataset)


def swap_figure(model, lat, *, dataset: Optional[str] = None, split: str = "test"):
    """Object swap: reconstructions (top row) and the same scenes with objects 1 and 2 exchanging
    locations (bottom row), each keeping its appearance; the two are marked 1 and 2.

    ``lat``: :class:`lavae_fast.model.Latents` (e.g. ``model.infer(x)``); scenes with fewer than
    two objects are left out."""
    keep = lat.n >= 2
    if not bool(keep.any()):
        raise ValueError("swap_figure needs scenes with at least two objects")
    lat = _select(lat, keep)
    swapped = model.swap_objects(lat, 0, 1)
    marks = {}
    for b in range(lat.n.shape[0]):
        for r, one in ((0, lat), (1, swapped)):
            marks[(r, b)] = [(int(one.rows[b, i]), int(one.cols[b, i]), str(i + 1), "cyan") for i in (0, 1)]
    title = _title(f"Object swap on {SPLIT_NAMES.get(split, split)}: objects 1 and 2 exchange their location "
                   "variables z_loc and keep their appearance z_app", _split_ref("swap", split, dataset), dataset)
    cols = [f"scene {b + 1} (n̂ = {int(lat.n[b])})" for b in range(lat.n.shape[0])]
    return _grid([list(model.decode(lat)), list(model.decode(swapped))],
                 ["reconstruction", "objects 1 and 2\nswapped"], cols, title, marks)


def location_traversal_figure(model, lat, steps: int = 8, obj: int = 0, *, dataset: Optional[str] = None,
                              split: str = "test"):
    """Each row: one scene's object ``obj`` moved along its own row of the canvas, left to right
    (its appearance and the other objects unchanged)."""
    keep = lat.n > obj
    if not bool(keep.any()):
        raise ValueError(f"location_traversal_figure needs scenes with more than {obj} objects")
    lat = _select(lat, keep)
    W = lat.canvas[1]
    cols = np.linspace(0, W - 1, steps).round().astype(int)
    rows, labels, marks = [], [], {}
    for b in range(lat.n.shape[0]):
        one = _select(lat, torch.arange(lat.n.shape[0]) == b)
        r = int(one.rows[0, obj])
        rows.append([model.decode(model.move_object(one, obj, r, int(c)))[0] for c in cols])
        labels.append(f"scene {b + 1} (n̂ = {int(lat.n[b])})\nobject {obj + 1} on row {r}")
        for j, c in enumerate(cols):
            marks[(b, j)] = [(_above(r, model.sprite_size), int(c), "▼", "cyan")]
    title = _title(f"Location traversal on {SPLIT_NAMES.get(split, split)}: object {obj + 1}'s location z_loc moved "
                   "along its row (▼), everything else fixed", _split_ref("location", split, dataset), dataset)
    return _grid(rows, labels, [f"column {int(c)}" for c in cols], title, marks)


def appearance_traversal_figure(model, lat, dims: Sequence[int] = (0, 1, 2), steps: int = 8,
                                obj: int = 0, span: float = 2.0, *, dataset: Optional[str] = None,
                                split: str = "test"):
    """For the first scene with an object ``obj``: one row per appearance dimension of that object,
    its value set from −span to span (the other dimensions, objects and locations unchanged)."""
    found = (lat.n > obj).nonzero().flatten()
    if found.numel() == 0:
        raise ValueError(f"appearance_traversal_figure needs a scene with more than {obj} objects")
    one = _select(lat, torch.arange(lat.n.shape[0]) == int(found[0]))
    values = np.linspace(-span, span, steps)
    r, c = int(one.rows[0, obj]), int(one.cols[0, obj])
    rows = [[model.decode(model.change_appearance(one, obj, d, float(v)))[0] for v in values] for d in dims]
    marks = {(i, j): [(_above(r, model.sprite_size), c, "▼", "cyan")]
             for i in range(len(dims)) for j in range(steps)}
    title = _title(f"Appearance traversal on {SPLIT_NAMES.get(split, split)} (scene with n̂ = {int(one.n[0])}): "
                   f"one dimension of object {obj + 1}'s appearance z_app (▼, at row {r}, column {c}) per row",
                   _split_ref("appearance", split, dataset), dataset)
    return _grid(rows, [f"z_app dimension {d}" for d in dims], [f"value {v:+.2f}" for v in values], title, marks)


def fixed_count_figure(model, num: int = 16, seed: int = 0, per_row: int = 8, *, dataset: Optional[str] = None,
                       counts: Sequence[int] = (4, 5)):
    """Generation with p(n) replaced by the uniform distribution over ``counts`` (paper Fig. 9)."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.as_tensor(counts)[torch.randint(len(counts), (num,), generator=gen)]
    imgs = model.sample(num, n=n, generator=gen)
    nrows = -(-num // per_row)
    rows = [list(imgs[r * per_row : (r + 1) * per_row]) for r in range(nrows)]
    corners = {(r, c): f"n={int(n[r * per_row + c])}" for r in range(nrows) for c in range(len(rows[r]))}
    labels = [f"samples {r * per_row + 1}–{min((r + 1) * per_row, num)}" for r in range(nrows)]
    title = _title(f"Generation with p(n) replaced by the uniform distribution over {{{', '.join(map(str, counts))}}} "
                   "(each image's n in its corner)", paper_ref("fixed_count", dataset), dataset)
    return _grid(rows, labels, ["LAVAE"] * per_row, title, corners=corners)


def read_metrics(path: str) -> List[Dict]:
    """The records of a run's ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _neg_elbo(rec: Dict) -> Optional[float]:
    """A training record's −ELBO: its four terms' sum (``loss`` can include other terms)."""
    parts = [rec.get(k) for k in ("recon", "kl_app", "kl_n", "kl_loc")]
    return sum(parts) if all(isinstance(p, (int, float)) for p in parts) else None


def training_curves_figure(records: Sequence[Dict], *, dataset: Optional[str] = None, threshold_note: str = ""):
    """Count accuracy (left) and the bound −ELBO in nats per image (right) against the training step:
    training batches, and the periodic evaluations on the test splits when the run made them."""
    from matplotlib.figure import Figure

    train = [r for r in records if "eval" not in r]
    evals = [r for r in records if "eval" in r]
    fig = Figure(figsize=(10, 3.8), dpi=DPI)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.8, bottom=0.14, wspace=0.25)
    acc, bound = fig.subplots(1, 2)
    # A quantity that was not measured is null in the log (strict JSON): its points are left out.
    pts = [(r["step"], r["count_acc"]) for r in train if r.get("count_acc") is not None]
    if pts:
        acc.plot(*zip(*pts), "--", color="grey", label="training batches")
    pts = [(r["step"], _neg_elbo(r)) for r in train if _neg_elbo(r) is not None]
    if pts:
        bound.plot(*zip(*pts), "--", color="grey", label="training batches, −ELBO (1 sample)")
    for split, colour in (("test", "C0"), ("test7", "C1")):
        e = [(r["step"], r["eval"][split]) for r in evals if split in r["eval"]]
        if not e:
            continue
        a = [(s, v["count_accuracy"]) for s, v in e if v.get("count_accuracy") is not None]
        if a:
            acc.plot(*zip(*a), "o-", color=colour, label=f"evaluation, {SPLIT_NAMES[split]}")
        for key, style, what in (("neg_elbo", "o-", "−ELBO"), ("nll_bound", "s:", "−log p(x) bound")):
            b = [(s, v[key]["mean"]) for s, v in e if isinstance(v.get(key), dict) and v[key].get("mean") is not None]
            if b:
                bound.plot(*zip(*b), style, color=colour, label=f"evaluation {what}, {split}")
    acc.set(xlabel="training step", ylabel="count accuracy (share of images)", ylim=(-0.02, 1.02),
            title="Count accuracy")
    bound.set(xlabel="training step", ylabel="nats per image (lower is better)",
              title="Bound: −ELBO / −log p(x) ≤")
    ys = [y for line in bound.get_lines() for y in line.get_ydata()]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        bound.set_yscale("log")  # early steps can be orders of magnitude above the end
    for ax in (acc, bound):
        if ax.get_lines():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not in this run's metrics.jsonl", transform=ax.transAxes, ha="center")
    on = f" — {DATASET_NAMES.get(dataset, dataset)}" if dataset else ""
    fig.suptitle(f"Training curves from metrics.jsonl{on} (not a paper figure; the paper's Table 1 gives the "
                 f"final values){threshold_note}", fontsize=9)
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavae_fast.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_OR_NAME",
                   help="a LAVAE run directory written by lavae_fast.train, a checkpoint file, "
                        "or a shipped model's name")
    p.add_argument("--baseline", default=None, metavar="RUN_OR_NAME",
                   help="a β-VAE baseline run directory, checkpoint or name, for its prior samples (Fig. 2)")
    p.add_argument("--out", default=None,
                   help="output folder (default RUN_DIR/figures, or beside a checkpoint file; required for a name)")
    p.add_argument("--num", type=_cli.int_in(1, 256, " (images per row of a figure)"), default=8, help="images per row")
    p.add_argument("--seed", type=nonneg_int, default=0)
    return p


PROG = "python -m lavae_fast.figures"


class _FigureWriteError(OSError):
    """A figure that could not be written (names it and the figures written before it)."""


class FiguresError(ValueError):
    """A model, its data or an output folder that the figures cannot use; the message names it
    (the CLI prints ``error: MESSAGE`` and exits with code 1)."""


# ---------------------------------------------------------------------------------------------
# A run's figures, as the CLI draws them
# ---------------------------------------------------------------------------------------------


def draw_figures(run_or_name: str, *, baseline: Optional[str] = None, out: Optional[str] = None, num: int = 8,
                 seed: int = 0) -> List[str]:
    """Draw every figure of a LAVAE (a run directory, a checkpoint file or a shipped model's name)
    into ``out`` (default ``RUN_DIR/figures``, or beside a checkpoint file; required for a name):
    what ``python -m lavae_fast.figures`` does before printing the written files. ``baseline``: a
    β-VAE baseline (run, file or name) whose prior samples go beside LAVAE's; ``num``: images per
    row (1–256); ``seed``: of the samples. Returns the files written, in order.

    The model, the data and the folder are checked before the work (:class:`FiguresError` naming
    the problem); a figure that the model's inferences cannot give (a swap without two objects)
    or a split that cannot exist is skipped with a note on standard error; an OSError names a
    figure that could not be written and those written before it."""
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 256:
        raise FiguresError(f"num (images per row) must be an integer in [1, 256], got {num!r}")
    model, ckpt, base = _load_models(run_or_name, baseline)
    is_run = os.path.isdir(run_or_name)
    is_name = not os.path.exists(run_or_name)
    folder = _figures_folder(run_or_name, out, is_run, is_name)
    train_args = dict(ckpt["args"])
    dataset = train_args.get("dataset")
    if is_name:
        # A shipped model comes without its data: draw a few test images of its data set in memory
        # (same generator, canvas and seed as the run's in-memory sets).
        train_args.update(data=None, n_test=max(16, num), n_test7=max(16, num))
    written: List[str] = []
    save = _saver(folder, written)
    data = _figure_splits(ckpt, train_args)
    with torch.no_grad():
        _draw_model_figures(model, base, data, dataset, num, seed, save)
    metrics = os.path.join(run_or_name, "metrics.jsonl") if is_run else None
    records = read_metrics(metrics) if metrics and os.path.isfile(metrics) else []
    if records:
        save(training_curves_figure(records, dataset=dataset), "training_curves.png")
    else:
        print("skipped training_curves.png: no metrics.jsonl (a run directory has one)", file=sys.stderr)
    return written


def _load_models(run_or_name: str, baseline: Optional[str]):
    """(LAVAE, its checkpoint, the baseline or None), refusing a model of the wrong kind: these are
    LAVAE's figures, with the β-VAE baseline's prior samples beside its own."""
    try:
        model, ckpt = load_run(run_or_name)
        base = None
        if baseline:
            base, bckpt = load_run(baseline, kind=None if os.path.exists(baseline) else "baseline")
            if bckpt["model_config"]["kind"] != "baseline":
                raise FiguresError(f"--baseline {baseline} holds a {bckpt['model_config']['kind']} model, "
                                   "not the β-VAE baseline (train one with --model baseline)")
    except FiguresError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise FiguresError(str(exc)) from exc
    if ckpt["model_config"]["kind"] != "lavae":
        raise FiguresError(f"{run_or_name} holds a {ckpt['model_config']['kind']} model; figures need LAVAE")
    return model, ckpt, base


def _figures_folder(run_or_name: str, out: Optional[str], is_run: bool, is_name: bool) -> str:
    """The output folder (``out``, or the run's ``figures/``), made and checked writable."""
    folder = out
    if folder is None:
        if is_name:
            raise FiguresError(f"give --out DIR for the figures of the shipped model {run_or_name!r}")
        folder = os.path.join(run_or_name if is_run else os.path.dirname(os.path.abspath(run_or_name)), "figures")
    try:  # before the work: a folder, writable, with room for a figure
        check_output_folder(folder, "--out" if out else "the figures folder")
    except OutputLocationError as exc:
        raise FiguresError(str(exc)) from exc
    return folder


def _saver(folder: str, written: List[str]):
    """save(fig, name): write ``fig`` as ``folder/name`` and append the path to ``written``; a
    failure raises an OSError naming the figure and those written before it."""

    def save(fig, name):
        path = os.path.join(folder, name)
        try:
            save_figure(fig, path)
        except OSError as exc:
            done = f"; written before it: {', '.join(os.path.basename(p) for p in written)}" if written else ""
            raise _FigureWriteError(f"could not write {path} ({describe_os_error(exc)}){done}") from None
        written.append(path)

    return save


def _figure_splits(ckpt: Dict, train_args: Dict) -> Dict:
    """{split: data} of the test splits the figures can use. A run whose data is gone is an error; a
    split that cannot exist (7 objects on 32×32) or holds no image only costs its figures, as in
    training's evaluation."""
    from .data import check_data_fits, load_run_split

    data = {}
    for split in ("test", "test7"):
        try:
            d = load_run_split(train_args, split)
            check_data_fits(ckpt, d)
        except (FileNotFoundError, OSError) as exc:
            raise FiguresError(f"the run's {split} split: {exc}") from exc
        except ValueError as exc:
            if train_args.get("data") and not os.path.isdir(str(train_args["data"])):
                raise FiguresError(f"the run's data set is gone: {exc}") from exc
            print(f"skipped the {split} split: {exc}", file=sys.stderr)
            continue
        if not len(d.counts):
            print(f"skipped the {split} split: it holds no images", file=sys.stderr)
            continue
        data[split] = d
    if not data:
        raise FiguresError("neither the test nor the test7 split of the run's data can be used")
    return data


def _draw_model_figures(model, baseline, data: Dict, dataset: Optional[str], num: int, seed: int, save) -> None:
    """The reconstructions of each split, the prior samples, the fixed-count samples, then the
    swap and the traversals of each split's most crowded scenes, each through ``save``."""
    for split, d in data.items():
        pick = np.arange(min(num, len(d)))
        x, _ = d.get_batch(pick)
        save(reconstruction_figure(model, x, np.asarray(d.counts)[pick], dataset=dataset, split=split),
             f"reconstructions_{split}.png")
    save(sample_figure(model, 2 * num, baseline=baseline, seed=seed, per_row=num, dataset=dataset), "samples.png")
    save(fixed_count_figure(model, 2 * num, seed=seed, per_row=num, dataset=dataset), "fixed_count.png")
    for split, d in data.items():
        # The scenes with the most objects, so that the swap has two objects to exchange.
        pick = np.sort(np.argsort(-np.asarray(d.counts), kind="stable")[: min(num, 4)])
        x, _ = d.get_batch(pick)
        lat = model.infer(x)
        kw = {"dataset": dataset, "split": split}
        for name, make in (
                ("swap", lambda: swap_figure(model, lat, **kw)),
                ("traverse_location", lambda: location_traversal_figure(model, lat, steps=num, **kw)),
                ("traverse_appearance", lambda: appearance_traversal_figure(model, lat, steps=num, **kw))):
            try:
                save(make(), f"{name}_{split}.png")
            except ValueError as exc:  # e.g. an untrained model that finds no objects
                print(f"skipped {name}_{split}.png: {exc}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The CLI: parse, draw_figures, print what was written
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # nothing half-written: every output file is replaced atomically
        print(f"{PROG}: interrupted; the figures written so far are complete (each is written all or nothing)",
              file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, the folder removed meanwhile
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = draw_figures(args.run_dir, baseline=args.baseline, out=args.out, num=args.num, seed=args.seed)
    except FiguresError as exc:
        raise SystemExit(f"error: {exc}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
