"""Evaluation of a training run (SPEC §7, §8): ``python -m lavae_fast.evaluate RUN_DIR``.

For the 0–3-object test split and the 7-object split it reports

* the −log p(x) upper bound from K importance samples (default 100; mean ± standard error over the
  images, nats per image) and the one-sample −ELBO;
* count accuracy: share of images whose n̂ equals the true number of objects (LAVAE only);
* location accuracy: share of true objects that have an inferred location within 2 px (Euclidean)
  of their centre, under a one-to-one matching (a maximum bipartite matching, so one inferred
  location never serves two objects) — the inferred locations are the model's most probable ones,
  the top-n̂ of h_loc drawn without replacement (:meth:`LAVAE.infer`);
* the median distance from each true centre to the nearest of the top-(true count) local maxima
  of h_loc, whatever their height: SPEC §5's "peaks next to rather than on the objects" check.

The table is printed and written to ``RUN_DIR/eval.json`` (``NAME.eval.json`` beside a checkpoint
file; ``eval.data-NAME-FP.json`` beside it for ``--data`` other than the run's own), strict JSON
whose ``meta`` names what was measured: the checkpoint (file, step, SHA-256), the data (path or
generator settings, fingerprint, whether it is the run's own), K, the counting and exclusion
windows. ``python -m lavae_fast.pretrained export`` accepts only such a file, of the checkpoint it
exports. The output location is checked before the work; if the final write fails, the results
are printed on standard output instead (exit code 1). The metrics are defined in
:mod:`lavae_fast.metrics` (shared with the training loop's running diagnostics).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from . import _cli
from ._cli import nonneg_int, odd_positive_int, positive_int
from ._io import atomic_write
from .metrics import draws_on_objects, index_rows_cols, location_accuracy, peak_distances

__all__ = ["evaluate_split", "format_table", "main"]


# ---------------------------------------------------------------------------------------------
# Evaluation of a model on a split
# ---------------------------------------------------------------------------------------------


def _mean_sem(a) -> Dict[str, float]:
    a = np.asarray(a, dtype=np.float64)
    if len(a) == 0:
        return {"mean": float("nan"), "sem": float("nan")}
    sem = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
    return {"mean": float(a.mean()), "sem": sem}


# Samples of q's hard draws per image for near_duplicate_draws and objects_missed: the op alone on
# the pass's h_loc, so ten cost little beside the −ELBO's one pass.
DRAW_SAMPLES = 10


@torch.no_grad()
def evaluate_split(model, data, *, K: int = 100, batch_size: int = 32, n_eval: Optional[int] = None,
                   n_bound: Optional[int] = None, device="cpu", seed: int = 0, progress: bool = False) -> Dict:
    """Metrics of ``model`` on ``data`` (an object with ``get_batch``, ``counts``, ``centres``).

    The first ``n_eval`` images (default all) get count/location accuracy and the −ELBO; the first
    ``n_bound`` of them (default n_eval) also get the K-sample bound, the expensive part.
    Location accuracy is measured twice (see :meth:`lavae_fast.LAVAE.infer`): at the counted peaks
    (``location_accuracy``) and at the top-n̂ pixels of h_loc, the mode of q's draws
    (``location_accuracy_draws``).

    Where the −ELBO goes: ``neg_elbo_terms`` (the mean of each term: LAVAE's recon, kl_app, kl_n,
    kl_loc; the baseline's recon, kl) and ``neg_elbo_by_count`` (the mean −ELBO of the images with
    k objects, by the true k); for LAVAE also, from DRAW_SAMPLES samples of q's hard draws per
    image (with the model's exclusion window), ``near_duplicate_draws``, the share of the later
    draws whose nearest true object an earlier draw already has, and ``objects_missed``, the share
    of true objects that no draw reaches within 2 px (:func:`lavae_fast.metrics.draws_on_objects`).
    """
    from .baseline import BetaVAE

    is_baseline = isinstance(model, BetaVAE)
    N = len(data.counts)
    n_eval = N if n_eval is None else min(n_eval, N)
    n_bound = n_eval if n_bound is None else min(n_bound, n_eval)
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    centres_all = np.asarray(data.centres)
    res = {"images": n_eval, "bound_images": n_bound, "K": K}
    nll, nelbo, correct, matched, matched_top, total, dists = [], [], 0, 0, 0, 0, []
    terms, true_counts, dup, later, missed, objects = {}, [], 0, 0, 0, 0
    right = []  # per image: counted right (LAVAE)
    it = range(0, n_eval, batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="eval", leave=False)
    for b0 in it:
        idx = np.arange(b0, min(b0 + batch_size, n_eval))
        x, counts = data.get_batch(idx)
        x = x.to(device)
        counts = torch.as_tensor(counts)
        true_counts.extend(counts.tolist())
        if is_baseline:
            out = model(x, eps=torch.randn(x.shape[0], *model.latent_shape(*x.shape[-2:]), generator=gen).to(device))
            nelbo.extend(out.neg_elbo.cpu().tolist())
            for k in ("recon", "kl"):
                terms.setdefault(k, []).extend(getattr(out, k).cpu().tolist())
        else:
            from .noise import Noise, gumbel_from_uniform

            B, _, H, W = x.shape
            noise = Noise(
                gumbel=gumbel_from_uniform(torch.rand(B, H * W, generator=gen, dtype=torch.float64)).float(),
                eps=torch.randn(B, model.max_objects, model.latent_size, generator=gen),
                coin=torch.ones(B),
            )
            # τ only shapes the relaxed samples, which do not enter the −ELBO's value.
            out = model(x, noise=noise, tau=0.02)
            nelbo.extend(out.neg_elbo.cpu().tolist())
            for k in ("recon", "kl_app", "kl_n", "kl_loc"):
                terms.setdefault(k, []).extend(getattr(out, k).cpu().tolist())
            for _ in range(DRAW_SAMPLES):
                g = gumbel_from_uniform(torch.rand(B, H * W, generator=gen, dtype=torch.float64)).to(device)
                index = model.draw_locations(out.h_loc.float(), out.n_hat, g)
                d, n_later, m, n_obj = draws_on_objects(index, W, centres_all[idx], counts)
                dup, later, missed, objects = dup + d, later + n_later, missed + m, objects + n_obj
            ok = out.n_hat.cpu() == counts
            right.extend(ok.tolist())
            correct += int(ok.sum())
            # Where model.infer puts the objects, from this pass's h_loc (no second encoding): at the
            # counted peaks, and at the mode of q's draws.
            rows, cols = index_rows_cols(model.locate(out.h_loc, out.n_hat, "peaks"), W)
            m, t = location_accuracy(rows, cols, out.n_hat, centres_all[idx], counts)
            matched, total = matched + m, total + t
            rows, cols = index_rows_cols(model.locate(out.h_loc, out.n_hat, "top"), W)
            matched_top += location_accuracy(rows, cols, out.n_hat, centres_all[idx], counts)[0]
            dists.extend(peak_distances(out.h_loc, centres_all[idx], counts, model.count_window).tolist())
        nb = int(max(0, min(len(idx), n_bound - b0)))
        if nb > 0 and K > 0:
            nll.extend((-model.log_likelihood(x[:nb], K=K, generator=gen)).cpu().tolist())
    res["neg_elbo"] = _mean_sem(nelbo)
    res["neg_elbo_terms"] = {k: float(np.mean(v)) if v else float("nan") for k, v in terms.items()}
    tc, ne = np.asarray(true_counts), np.asarray(nelbo)
    res["neg_elbo_by_count"] = {str(k): float(ne[tc == k].mean()) for k in np.unique(tc)} if len(ne) else {}
    if K > 0:
        res["nll_bound"] = _mean_sem(nll)
        nb_counts = tc[: len(nll)]
        res["nll_bound_by_count"] = {str(k): _mean_sem(np.asarray(nll)[nb_counts == k].tolist())
                                     for k in np.unique(nb_counts)} if nll else {}
        if not is_baseline and nll:
            # The bound on the images the model counts right: how much of the gap to the baseline
            # is the miscounted images' (their bound carries missing or extra objects).
            sel = [v for v, ok in zip(nll, right) if ok]
            res["nll_bound_counted_right"] = _mean_sem(sel) if sel else None
    if not is_baseline:
        res["count_accuracy"] = correct / max(n_eval, 1)
        res["location_accuracy"] = matched / total if total else float("nan")
        # Where q's draws put the objects (their mode, top-n̂ of h_loc): below the peaks' accuracy
        # while h_loc's peaks are blunt, and what the bound pays for (LAVAE.infer).
        res["location_accuracy_draws"] = matched_top / total if total else float("nan")
        res["near_duplicate_draws"] = dup / later if later else None  # None: no image had two draws
        res["objects_missed"] = missed / objects if objects else None  # None: no image had an object
        d = np.asarray(dists)
        res["median_peak_distance"] = float(np.median(d)) if len(d) else float("nan")
    return res


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict) and set(v) == {"mean", "sem"}:
        return f"{v['mean']:.2f} ± {v['sem']:.2f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {x:.1f}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


# The short report (lavae-demo); the evaluation CLI adds where the −ELBO goes (DETAIL_KEYS).
SUMMARY_KEYS = ("images", "nll_bound", "nll_bound_counted_right", "neg_elbo", "count_accuracy", "location_accuracy",
                "location_accuracy_draws", "median_peak_distance")
DETAIL_KEYS = ("images", "nll_bound", "nll_bound_counted_right", "neg_elbo", "neg_elbo_terms", "neg_elbo_by_count",
               "count_accuracy", "location_accuracy", "location_accuracy_draws", "near_duplicate_draws", "objects_missed",
               "median_peak_distance")


def format_table(results: Dict[str, Dict], keys: Sequence[str] = SUMMARY_KEYS) -> str:
    """A text table of :func:`evaluate_split` results, one column per split, one row per key."""
    names = {"nll_bound": "−log p(x) ≤", "nll_bound_counted_right": "−log p(x) ≤, counted right", "neg_elbo": "−ELBO",
             "count_accuracy": "count acc", "location_accuracy": "location acc (peaks)",
             "location_accuracy_draws": "location acc (draws' mode)", "median_peak_distance": "median peak dist (px)",
             "neg_elbo_terms": "−ELBO terms", "neg_elbo_by_count": "−ELBO by true count",
             "near_duplicate_draws": "later draws on a drawn object", "objects_missed": "objects no draw reaches"}
    splits = list(results)
    rows = [["metric"] + splits]
    for k in keys:
        if any(k in results[s] for s in splits):
            rows.append([names.get(k, k)] + [_fmt(results[s].get(k, "-")) for s in splits])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavae_fast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory written by lavae_fast.train (its checkpoint.pt), or one of its "
                                   "checkpoint files (e.g. RUN_DIR/checkpoint.best.pt, the best on validation)")
    p.add_argument("--data", default=None, help="data set directory (default: the run's own data)")
    p.add_argument("--K", type=_cli.importance_samples, default=100, help="importance samples for the −log p(x) bound (0: skip)")
    p.add_argument("--n-eval", type=positive_int, default=None, help="images per split for accuracies (default all)")
    p.add_argument("--n-bound", type=nonneg_int, default=None, help="images per split that get the K-sample bound")
    p.add_argument("--batch-size", type=_cli.batch_size, default=32)
    p.add_argument("--splits", default="test,test7", help="comma-separated splits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ops", choices=["fused", "reference"], default=None, help="engine (default: the run's)")
    p.add_argument("--count-window", type=odd_positive_int, default=None, metavar="N",
                   help="LAVAE's counter neighbourhood N×N for n̂, N odd (default: the model's own, 3 for a "
                        "checkpoint that does not say; SPEC §2's 3×3)")
    p.add_argument("--exclusion-window", type=odd_positive_int, default=None, metavar="N",
                   help="q's exclusion window for LAVAE's location draws, N odd (default: the model's own, 1 for a "
                        "checkpoint that does not say; SPEC §2): an evaluation-time proposal. Any proposal q gives "
                        "a valid bound (E_q[p/q] counts only what q can draw, which is at most p(x)), so the "
                        "bound stays a bound on the same model; a better q makes it tighter")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the evaluation noise")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--out", default=None,
                   help="JSON path (default RUN_DIR/eval.json; for a checkpoint file NAME.pt, NAME.eval.json beside "
                        "it; with --data naming other data than the run's, eval.data-NAME-FINGERPRINT.json there, "
                        "beside the run's own results rather than over them)")
    return p


def default_results_path(run: str, data_tag: Optional[str] = None) -> str:
    """Where the results of evaluating ``run`` go by default: RUN_DIR/eval.json for a run directory,
    NAME.eval.json beside a checkpoint file NAME.pt (so the best and the last checkpoint of one run
    keep their own results). ``data_tag``: the results on other data than the run's own
    (:func:`data_tag`), written beside those as ``eval.data-TAG.json`` / ``NAME.eval.data-TAG.json``."""
    suffix = "eval.json" if data_tag is None else f"eval.data-{data_tag}.json"
    if os.path.isdir(run) or not run.endswith(".pt"):
        return os.path.join(run, suffix)
    return run[: -len(".pt")] + "." + suffix


def data_tag(identity: Dict) -> str:
    """A file-name-safe tag for other data than the run's: the data directory's name (or the
    generated data set's) and the first 8 characters of its fingerprint."""
    import re

    base = os.path.basename(identity["path"].rstrip(os.sep)) if identity.get("path") else str(identity.get("dataset"))
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:40] or "data"
    return f"{base}-{str(identity['fingerprint']).replace('generated-', '')[:8]}"


PROG = "python -m lavae_fast.evaluate"


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # nothing half-written: every output file is replaced atomically
        print(f"{PROG}: interrupted; nothing was written (results are written at the end, all or nothing)",
              file=sys.stderr)
        return 130


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    bad = [s for s in splits if s not in ("train", "val", "test", "test7")]
    if bad or not splits:
        parser.error(f"--splits must be a comma-separated subset of train,val,test,test7, got {args.splits!r}")
    try:
        torch.device(args.device)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ._io import OutputLocationError, check_output_file, write_results
    from .checkpoint import read_model_checkpoint, restore_model
    from .data import check_data_fits, data_identity, load_run_split, run_data_fingerprint
    from .loading import MODEL_CLASSES

    if not os.path.exists(args.run_dir):  # a run, not a shipped model's name (its results need a home)
        raise SystemExit(f"error: no checkpoint at {args.run_dir}")
    try:
        ckpt, used = read_model_checkpoint(args.run_dir)
        model = restore_model(MODEL_CLASSES[ckpt["model_config"]["kind"]], ckpt, used, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    train_args = dict(ckpt["args"])
    if args.data:
        train_args["data"] = args.data
    try:
        identity = data_identity(train_args)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: {'--data ' + args.data if args.data else 'the run' + chr(39) + 's data'}: {exc}")
    own = identity["fingerprint"] == run_data_fingerprint(ckpt)
    # Where the results go is checked (and its folder made) before the long work.
    out = args.out or default_results_path(args.run_dir, None if own else data_tag(identity))
    try:
        check_output_file(out, "--out" if args.out else "the results file")
    except OutputLocationError as exc:
        raise SystemExit(f"error: {exc}")
    if args.ops and hasattr(model, "set_ops"):
        model.set_ops(args.ops)
    if args.count_window is not None:
        if not hasattr(model, "set_count_window"):
            raise SystemExit(f"error: --count-window: {args.run_dir} holds a {ckpt['model_config']['kind']} model, "
                             "which does not count")
        try:
            model.set_count_window(args.count_window)
        except ValueError as exc:
            raise SystemExit(f"error: --count-window: {exc}")
    if args.exclusion_window is not None:
        if not hasattr(model, "set_exclusion_window"):
            raise SystemExit(f"error: --exclusion-window: {args.run_dir} holds a {ckpt['model_config']['kind']} "
                             "model, which draws no locations")
        try:
            model.set_exclusion_window(args.exclusion_window)
        except ValueError as exc:
            raise SystemExit(f"error: --exclusion-window: {exc}")
    datas = {}
    for split in splits:
        try:
            datas[split] = load_run_split(train_args, split)
        except (ValueError, OSError) as exc:  # a missing, damaged or (7 objects on 32×32) impossible split
            raise SystemExit(f"error: split {split!r}: {exc}")
        try:
            check_data_fits(ckpt, datas[split], explicit=bool(args.data))
        except ValueError as exc:
            raise SystemExit(f"error: split {split!r}: {exc}")
        if getattr(model, "exclusion_window", 1) != 1 and len(datas[split].counts):
            from .ops import check_exclusion

            H, W = datas[split].get_batch([0])[0].shape[-2:]
            try:
                check_exclusion(model.exclusion_window, (H, W), H * W, model.max_objects, "--exclusion-window")
            except ValueError as exc:
                raise SystemExit(f"error: split {split!r}: {exc}")
    results = {}
    t0 = time.time()
    for split in splits:
        results[split] = evaluate_split(model, datas[split], K=args.K, batch_size=args.batch_size, n_eval=args.n_eval,
                                        n_bound=args.n_bound, device=args.device, seed=args.seed,
                                        progress=sys.stderr.isatty())
    # What was measured, so that the file cannot be attributed to another model or other data:
    # the checkpoint (file, step, digest), the data (path or generator settings, fingerprint,
    # whether it is the run's own), the proposal and counting settings, the sample sizes.
    meta = {"kind": RESULTS_KIND, "run_dir": os.path.abspath(args.run_dir),
            "checkpoint": {"file": os.path.abspath(used), "step": int(ckpt["step"]), "sha256": ckpt.get("sha256")},
            "step": int(ckpt["step"]), "model": ckpt["model_config"]["kind"],
            "data": {**identity, "own": own}, "dataset": identity.get("dataset"), "canvas": identity.get("canvas"),
            "splits": splits, "K": args.K, "n_eval": args.n_eval, "n_bound": args.n_bound, "seed": args.seed,
            "count_window": getattr(model, "count_window", None),
            "exclusion_window": getattr(model, "exclusion_window", None),
            "seconds": round(time.time() - t0, 1)}
    print(f"{meta['model']} on {meta['dataset']} {meta['canvas']}, step {meta['step']}, K = {args.K}"
          + ("" if own else f" (data other than the run's: {identity.get('path') or identity['fingerprint']})"))
    print(format_table(results, DETAIL_KEYS))
    if not write_results(out, {"meta": meta, "results": results}, PROG):
        return 1
    print(f"wrote {out}")
    return 0


# meta["kind"] of a results file: what `pretrained export` accepts as measured metrics.
RESULTS_KIND = "lavae_fast.evaluate"


if __name__ == "__main__":
    sys.exit(main())
