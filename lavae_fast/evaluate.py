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

What a model measures is its evaluator's, found by the model's class (:func:`register_evaluator`,
:func:`evaluator_class`): :class:`LAVAEEvaluator` and :class:`BetaVAEEvaluator` here, and for any
other model :class:`Evaluator`, the −ELBO of its output's ``neg_elbo`` and, where it has a
``log_likelihood``, the bound. The evaluation itself (:func:`evaluate_split`) knows no kind of model.

From Python, :func:`evaluate_run` is this CLI without its parser: it loads and checks a run,
evaluates it and returns :class:`RunResults` (``summary()`` is the printed table, ``save()``
writes the file); errors are :class:`EvaluationError`, naming what cannot be used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch

from . import _cli
from ._cli import nonneg_int, odd_positive_int, positive_int
from ._io import atomic_write
from .baseline import BetaVAE
from .metrics import draws_on_objects, index_rows_cols, location_accuracy, peak_distances
from .model import LAVAE

__all__ = ["evaluate_split", "evaluate_run", "RunResults", "EvaluationError", "Evaluator", "LAVAEEvaluator",
           "BetaVAEEvaluator", "EVALUATORS", "register_evaluator", "evaluator_class", "format_table", "main"]


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


class Evaluator:
    """What one kind of model measures on a split, batch by batch; :func:`evaluate_split` drives it.

    For each batch — images ``x`` [B, C, H, W] on the device, their true object counts [B] (an
    int64 tensor on the CPU) and object centres [B, M, 2] (numpy, (row, col) in pixels, -1 past the
    count) — the driver calls :meth:`forward` (the one-sample pass), records the output's
    ``neg_elbo`` [B] (nats per image) and each per-image term [B] named in :attr:`terms`, calls
    :meth:`observe`, then :meth:`bound` on the batch's images that get the K-sample bound. At the
    end, :meth:`results` adds the kind's own metrics to the driver's.

    This base class is the evaluator of any model without one of its own: one whose ``model(x)``
    returns an object with ``neg_elbo`` [B], and whose ``log_likelihood(x, K=K, generator=g)`` [B]
    (log p(x) estimates, nats), if it has one, gives the bound. A kind with its own noise or
    metrics subclasses it and :func:`register_evaluator`'s the subclass for its model class.

    Every random number is drawn from ``generator``, one CPU ``torch.Generator`` that the passes and
    the bound share in batch order, so that an evaluation is reproducible from its seed.
    """

    # The output's per-image attributes [B] that add up to its neg_elbo (neg_elbo_terms).
    terms: Tuple[str, ...] = ()

    def __init__(self, model, *, generator: torch.Generator, device="cpu", K: int = 0):
        self.model, self.generator, self.device, self.K = model, generator, device, K

    @classmethod
    def has_bound(cls, model) -> bool:
        """Whether ``model`` gives the K-sample bound (:meth:`bound`)."""
        return callable(getattr(model, "log_likelihood", None))

    def forward(self, x: torch.Tensor):
        """The model's one-sample pass on ``x`` [B, C, H, W]: an object with ``neg_elbo`` [B]."""
        return self.model(x)

    def observe(self, x: torch.Tensor, out, counts: torch.Tensor, centres: np.ndarray) -> None:
        """Accumulate the kind's own metrics of a batch (nothing by default)."""

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """The K-sample upper bound on −log p(x) [B] (nats per image) of images ``x``."""
        return -self.model.log_likelihood(x, K=self.K, generator=self.generator)

    def results(self, nll: Sequence[float]) -> Dict:
        """The kind's own metrics, added after the driver's; ``nll``: the bound of each bounded
        image, in order (empty with K = 0)."""
        return {}


# The evaluator of each model class (and of its subclasses: looked up along the MRO).
EVALUATORS: Dict[type, Type[Evaluator]] = {}


def register_evaluator(model_class: type, evaluator: Type[Evaluator]) -> Type[Evaluator]:
    """Make ``evaluator`` (an :class:`Evaluator` subclass) the one :func:`evaluate_split` uses for
    ``model_class`` and its subclasses. Returns ``evaluator``."""
    if not isinstance(model_class, type):
        raise TypeError(f"register_evaluator: model_class must be a class, got {model_class!r}")
    if not (isinstance(evaluator, type) and issubclass(evaluator, Evaluator)):
        raise TypeError(f"register_evaluator: evaluator must be a lavae_fast.evaluate.Evaluator subclass, got "
                        f"{evaluator!r}")
    EVALUATORS[model_class] = evaluator
    return evaluator


def evaluator_class(model) -> Type[Evaluator]:
    """The evaluator registered for ``model``'s class or the nearest of its bases; :class:`Evaluator`
    if none is."""
    for cls in type(model).__mro__:
        if cls in EVALUATORS:
            return EVALUATORS[cls]
    return Evaluator


class BetaVAEEvaluator(Evaluator):
    """The β-VAE baseline: its latent noise drawn from the generator; −ELBO = recon + kl."""

    terms = ("recon", "kl")

    def forward(self, x):
        eps = torch.randn(x.shape[0], *self.model.latent_shape(*x.shape[-2:]), generator=self.generator)
        return self.model(x, eps=eps.to(self.device))


class LAVAEEvaluator(Evaluator):
    """LAVAE: besides the −ELBO (recon + kl_app + kl_n + kl_loc) and the bound, the counts and the
    locations (see :func:`evaluate_split`)."""

    terms = ("recon", "kl_app", "kl_n", "kl_loc")

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.images = self.correct = self.matched = self.matched_top = self.total = 0
        self.dup = self.later = self.missed = self.objects = 0
        self.right: List[bool] = []  # per image: counted right
        self.dists: List[float] = []

    def _gumbel(self, B: int, D: int) -> torch.Tensor:
        from .noise import gumbel_from_uniform

        return gumbel_from_uniform(torch.rand(B, D, generator=self.generator, dtype=torch.float64))

    def forward(self, x):
        from .noise import Noise

        B, _, H, W = x.shape
        model = self.model
        noise = Noise(gumbel=self._gumbel(B, H * W).float(),
                      eps=torch.randn(B, model.max_objects, model.latent_size, generator=self.generator),
                      coin=torch.ones(B))
        # τ only shapes the relaxed samples, which do not enter the −ELBO's value.
        return model(x, noise=noise, tau=0.02)

    def observe(self, x, out, counts, centres):
        model, (B, _, H, W) = self.model, x.shape
        self.images += B
        if counts is None:  # an unlabelled set: nothing to count against
            return
        ok = out.n_hat.cpu() == counts
        self.right.extend(ok.tolist())
        self.correct += int(ok.sum())
        if centres is None:  # counts without centres: nothing to locate against
            return
        for _ in range(DRAW_SAMPLES):
            index = model.draw_locations(out.h_loc.float(), out.n_hat, self._gumbel(B, H * W).to(self.device))
            d, n_later, m, n_obj = draws_on_objects(index, W, centres, counts)
            self.dup, self.later, self.missed, self.objects = (self.dup + d, self.later + n_later,
                                                               self.missed + m, self.objects + n_obj)
        # Where model.infer puts the objects, from this pass's h_loc (no second encoding): at the
        # counted peaks, and at the mode of q's draws.
        rows, cols = index_rows_cols(model.locate(out.h_loc, out.n_hat, "peaks"), W)
        m, t = location_accuracy(rows, cols, out.n_hat, centres, counts)
        self.matched, self.total = self.matched + m, self.total + t
        rows, cols = index_rows_cols(model.locate(out.h_loc, out.n_hat, "top"), W)
        self.matched_top += location_accuracy(rows, cols, out.n_hat, centres, counts)[0]
        self.dists.extend(peak_distances(out.h_loc, centres, counts, model.count_window).tolist())

    def results(self, nll):
        res = {}
        if self.K > 0 and nll:
            # The bound on the images the model counts right: how much of the gap to the baseline
            # is the miscounted images' (their bound carries missing or extra objects).
            sel = [v for v, ok in zip(nll, self.right) if ok]
            res["nll_bound_counted_right"] = _mean_sem(sel) if sel else None
            if not self.right:
                del res["nll_bound_counted_right"]
        total = self.total
        if not self.right:  # an unlabelled set (evaluate_split says so under "skipped")
            return res
        res["count_accuracy"] = self.correct / max(self.images, 1)
        res["location_accuracy"] = self.matched / total if total else float("nan")
        # Where q's draws put the objects (their mode, top-n̂ of h_loc): below the peaks' accuracy
        # while h_loc's peaks are blunt, and what the bound pays for (LAVAE.infer).
        res["location_accuracy_draws"] = self.matched_top / total if total else float("nan")
        res["near_duplicate_draws"] = self.dup / self.later if self.later else None  # None: no image had two draws
        res["objects_missed"] = self.missed / self.objects if self.objects else None  # None: no image had an object
        d = np.asarray(self.dists)
        res["median_peak_distance"] = float(np.median(d)) if len(d) else float("nan")
        return res


register_evaluator(LAVAE, LAVAEEvaluator)
register_evaluator(BetaVAE, BetaVAEEvaluator)


@torch.no_grad()
def evaluate_split(model, data, *, K: int = 100, batch_size: int = 32, n_eval: Optional[int] = None,
                   n_bound: Optional[int] = None, device="cpu", seed: int = 0, progress: bool = False) -> Dict:
    """Metrics of ``model`` on ``data`` (an object with ``get_batch``, ``counts``, ``centres``).

    The first ``n_eval`` images (default all) get the −ELBO and the model's own metrics; the first
    ``n_bound`` of them (default n_eval) also get the K-sample bound, the expensive part. What is
    measured beyond the −ELBO and the bound is the model's evaluator's (:func:`evaluator_class`;
    the default, :class:`Evaluator`, measures those two for any model whose output has
    ``neg_elbo``). A model without ``log_likelihood`` has no bound: K must then be 0 (ValueError).

    Where the −ELBO goes: ``neg_elbo_terms`` (the mean of each term: LAVAE's recon, kl_app, kl_n,
    kl_loc; the baseline's recon, kl) and ``neg_elbo_by_count`` (the mean −ELBO of the images with
    k objects, by the true k).

    LAVAE's (:class:`LAVAEEvaluator`): ``count_accuracy``; location accuracy, measured twice (see
    :meth:`lavae_fast.LAVAE.infer`): at the counted peaks (``location_accuracy``) and at the
    top-n̂ pixels of h_loc, the mode of q's draws (``location_accuracy_draws``); from
    DRAW_SAMPLES samples of q's hard draws per image (with the model's exclusion window),
    ``near_duplicate_draws``, the share of the later draws whose nearest true object an earlier
    draw already has, and ``objects_missed``, the share of true objects that no draw reaches within
    2 px (:func:`lavae_fast.metrics.draws_on_objects`); ``median_peak_distance``; and
    ``nll_bound_counted_right``, the bound on the images it counts right.
    """
    N = len(data.counts)
    n_eval = N if n_eval is None else min(n_eval, N)
    n_bound = n_eval if n_bound is None else min(n_bound, n_eval)
    evaluator_cls = evaluator_class(model)
    if K > 0 and n_bound > 0 and not evaluator_cls.has_bound(model):
        raise ValueError(f"K = {K}: a {type(model).__name__} has no log_likelihood(x, K, generator) for the "
                         "K-sample bound; evaluate it with K = 0")
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    evaluator = evaluator_cls(model, generator=gen, device=device, K=K)
    centres_all = np.asarray(data.centres)
    # An imported set may lack labels (counts −1: unknown) or centres: what needs them is skipped.
    labelled, has_centres = getattr(data, "labelled", True), getattr(data, "has_centres", True)
    nll, nelbo, terms, true_counts = [], [], {}, []
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
        out = evaluator.forward(x)
        nelbo.extend(out.neg_elbo.cpu().tolist())
        for k in evaluator.terms:
            terms.setdefault(k, []).extend(getattr(out, k).cpu().tolist())
        evaluator.observe(x, out, counts if labelled else None, centres_all[idx] if labelled and has_centres else None)
        nb = int(max(0, min(len(idx), n_bound - b0)))
        if nb > 0 and K > 0:
            nll.extend(evaluator.bound(x[:nb]).cpu().tolist())
    res = {"images": n_eval, "bound_images": n_bound, "K": K, **_elbo_results(nelbo, terms, true_counts)}
    if K > 0:
        res.update(_bound_results(nll, true_counts))
    res.update(evaluator.results(nll))
    if not labelled:
        res["neg_elbo_by_count"] = {}
        if K > 0:
            res["nll_bound_by_count"] = {}
        res["skipped"] = "count and location accuracy, and the results by true count: the data set has no labels"
    elif not has_centres:
        res["skipped"] = "location accuracy and q's draws against the objects: the data set has counts, not centres"
    return res


def _elbo_results(nelbo: List[float], terms: Dict[str, List[float]], true_counts: List[int]) -> Dict:
    """The −ELBO of each image [n] (nats), its terms' [n] and the true counts [n] as the results'
    ``neg_elbo`` (mean ± standard error), ``neg_elbo_terms`` and ``neg_elbo_by_count``."""
    tc, ne = np.asarray(true_counts), np.asarray(nelbo)
    return {"neg_elbo": _mean_sem(nelbo),
            "neg_elbo_terms": {k: float(np.mean(v)) if v else float("nan") for k, v in terms.items()},
            "neg_elbo_by_count": {str(k): float(ne[tc == k].mean()) for k in np.unique(tc)} if len(ne) else {}}


def _bound_results(nll: List[float], true_counts: List[int]) -> Dict:
    """The bound of the first images [m] (nats) as ``nll_bound`` and ``nll_bound_by_count`` (by the
    true count of those images, the first m of ``true_counts``)."""
    nb_counts = np.asarray(true_counts)[: len(nll)]
    return {"nll_bound": _mean_sem(nll),
            "nll_bound_by_count": {str(k): _mean_sem(np.asarray(nll)[nb_counts == k].tolist())
                                   for k in np.unique(nb_counts)} if nll else {}}


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
# What the CLI's table leaves to the results file: the sample sizes and the bound by true count.
FILE_ONLY_KEYS = ("bound_images", "K", "nll_bound_by_count")


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
    p.add_argument("--splits", default=None, help="comma-separated splits (default test,test7: those of them the "
                                                  "data holds; an imported set has no test7)")
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
SPLITS = ("train", "val", "test", "test7")


# ---------------------------------------------------------------------------------------------
# A run's evaluation, as the CLI makes it: load, check, evaluate, write
# ---------------------------------------------------------------------------------------------


class EvaluationError(ValueError):
    """A run, its data, a setting or an output location that the evaluation cannot use; the
    message names it (the CLI prints ``error: MESSAGE`` and exits with code 1)."""


@dataclass
class RunResults:
    """A run's evaluation (:func:`evaluate_run`): ``meta``, what was measured (the checkpoint, the
    data, K, the windows); ``results``, {split: :func:`evaluate_split`'s dict}; ``path``, the
    results file they go to (checked writable before the work)."""

    meta: Dict
    results: Dict[str, Dict]
    path: str

    @property
    def document(self) -> Dict:
        """The results file's content: {"meta": ..., "results": ...}."""
        return {"meta": self.meta, "results": self.results}

    def summary(self) -> str:
        """What the CLI prints: a line naming the model, the data and K, and the table of every
        split (:data:`DETAIL_KEYS`, then the metrics of a model's own evaluator)."""
        meta, data = self.meta, self.meta["data"]
        head = (f"{meta['model']} on {meta['dataset']} {meta['canvas']}, step {meta['step']}, K = {meta['K']}"
                + ("" if data["own"] else f" (data other than the run's: {data.get('path') or data['fingerprint']})"))
        own = [k for r in self.results.values() for k in r if k not in DETAIL_KEYS and k not in FILE_ONLY_KEYS]
        return head + "\n" + format_table(self.results, DETAIL_KEYS + tuple(dict.fromkeys(own)))

    def save(self, prog: str = PROG) -> bool:
        """Write :attr:`document` to :attr:`path` (atomically) and print ``wrote PATH``; if the
        write fails, print the results on standard output and why on standard error, naming
        ``prog``. Returns whether the file was written."""
        from ._io import write_results

        if not write_results(self.path, self.document, prog):
            return False
        print(f"wrote {self.path}")
        return True


DEFAULT_SPLITS = ("test", "test7")


def evaluate_run(run: str, *, splits: Optional[Sequence[str]] = None, K: int = 100, n_eval: Optional[int] = None,
                 n_bound: Optional[int] = None, batch_size: int = 32, data: Optional[str] = None,
                 out: Optional[str] = None, device="cpu", ops: Optional[str] = None,
                 count_window: Optional[int] = None, exclusion_window: Optional[int] = None, seed: int = 0,
                 progress: bool = False) -> RunResults:
    """Evaluate the model of ``run`` (a run directory or a checkpoint file) on ``splits`` of its
    data (``data``: another data set directory) with :func:`evaluate_split`: what
    ``python -m lavae_fast.evaluate`` does before printing and writing the results
    (:meth:`RunResults.summary`, :meth:`RunResults.save`).

    ``splits``: default :data:`DEFAULT_SPLITS`, those of them the data holds (an imported set has
    no "test7"); named splits must all be there.
    ``out``: the results file (default :func:`default_results_path`); ``ops``, ``count_window``,
    ``exclusion_window``: the engine and the windows to evaluate with (default the model's own;
    a window the model has none of is an error). Everything that can fail on the inputs — the
    checkpoint, the data, the settings, the output location — is checked before the work, raising
    :class:`EvaluationError` naming it."""
    model, ckpt, used = _load_run(run, device)
    train_args, identity, own = _run_data(ckpt, data)
    # Where the results go is checked (and its folder made) before the long work.
    path = _results_file(run, out, identity, own)
    _set_options(model, run, ckpt["model_config"]["kind"], ops, count_window, exclusion_window, K)
    if splits is None:
        splits = _held_splits(train_args)
    datas = _load_splits(model, ckpt, train_args, splits, explicit=bool(data))
    t0 = time.time()
    results = {split: evaluate_split(model, datas[split], K=K, batch_size=batch_size, n_eval=n_eval,
                                     n_bound=n_bound, device=device, seed=seed, progress=progress)
               for split in splits}
    # What was measured, so that the file cannot be attributed to another model or other data:
    # the checkpoint (file, step, digest), the data (path or generator settings, fingerprint,
    # whether it is the run's own), the proposal and counting settings, the sample sizes.
    meta = {"kind": RESULTS_KIND, "run_dir": os.path.abspath(run),
            "checkpoint": {"file": os.path.abspath(used), "step": int(ckpt["step"]), "sha256": ckpt.get("sha256")},
            "step": int(ckpt["step"]), "model": ckpt["model_config"]["kind"],
            "data": {**identity, "own": own}, "dataset": identity.get("dataset"), "canvas": identity.get("canvas"),
            "splits": list(splits), "K": K, "n_eval": n_eval, "n_bound": n_bound, "seed": seed,
            "count_window": getattr(model, "count_window", None),
            "exclusion_window": getattr(model, "exclusion_window", None),
            "seconds": round(time.time() - t0, 1)}
    return RunResults(meta, results, path)


def _load_run(run: str, device):
    """(model in eval mode, its verified checkpoint, the file read) of a run directory or a
    checkpoint file; its class is the one its model_config's kind names."""
    from .checkpoint import read_model_checkpoint, restore_model
    from .loading import MODEL_CLASSES

    if not os.path.exists(run):  # a run, not a shipped model's name (its results need a home)
        raise EvaluationError(f"no checkpoint at {run}")
    try:
        ckpt, used = read_model_checkpoint(run)
        model = restore_model(MODEL_CLASSES[ckpt["model_config"]["kind"]], ckpt, used, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluationError(str(exc)) from exc
    return model, ckpt, used


def _run_data(ckpt: Dict, data: Optional[str]):
    """(the run's settings with ``data`` as its data set, the data's identity, whether it is the
    data the run was trained on)."""
    from .data import data_identity, run_data_fingerprint

    train_args = dict(ckpt["args"])
    if data:
        train_args["data"] = data
    try:
        identity = data_identity(train_args)
    except (OSError, ValueError, KeyError) as exc:
        raise EvaluationError(f"{'--data ' + data if data else 'the run' + chr(39) + 's data'}: {exc}") from exc
    return train_args, identity, identity["fingerprint"] == run_data_fingerprint(ckpt)


def _results_file(run: str, out: Optional[str], identity: Dict, own: bool) -> str:
    """The results file (``out``, or beside the run), its folder made and checked writable."""
    from ._io import OutputLocationError, check_output_file

    path = out or default_results_path(run, None if own else data_tag(identity))
    try:
        check_output_file(path, "--out" if out else "the results file")
    except OutputLocationError as exc:
        raise EvaluationError(str(exc)) from exc
    return path


def _set_options(model, run: str, kind: str, ops: Optional[str], count_window: Optional[int],
                 exclusion_window: Optional[int], K: int) -> None:
    """Apply the engine and the windows asked for, refusing those the model has no use for."""
    if ops and hasattr(model, "set_ops"):
        model.set_ops(ops)
    for option, value, setter, lacks in (("--count-window", count_window, "set_count_window", "does not count"),
                                         ("--exclusion-window", exclusion_window, "set_exclusion_window",
                                          "draws no locations")):
        if value is None:
            continue
        if not hasattr(model, setter):
            raise EvaluationError(f"{option}: {run} holds a {kind} model, which {lacks}")
        try:
            getattr(model, setter)(value)
        except ValueError as exc:
            raise EvaluationError(f"{option}: {exc}") from exc
    if K > 0 and not evaluator_class(model).has_bound(model):
        raise EvaluationError(f"--K {K}: {run} holds a {kind} model, which has no log_likelihood(x, K, generator) "
                              "for the K-sample bound: evaluate it with --K 0")


def _held_splits(train_args: Dict) -> Tuple[str, ...]:
    """:data:`DEFAULT_SPLITS`, less those the run's data directory does not hold (an imported set has
    no "test7"); generated data holds both."""
    root = train_args.get("data")
    if not root:
        return DEFAULT_SPLITS
    from .data.storage import read_meta

    try:
        held = read_meta(root).get("splits", {})
    except (ValueError, OSError):  # reported, with its reason, when the split is loaded
        return DEFAULT_SPLITS
    return tuple(s for s in DEFAULT_SPLITS if s in held) or DEFAULT_SPLITS


def _load_splits(model, ckpt: Dict, train_args: Dict, splits: Sequence[str], explicit: bool) -> Dict:
    """{split: its data}, each checked to fit the model (and, for the run's own data, to be the set
    it was trained on) and, for a model with an exclusion window, to hold that window."""
    from .data import check_data_fits, load_run_split

    datas = {}
    for split in splits:
        if split not in SPLITS:
            raise EvaluationError(f"unknown split {split!r}: the splits are {', '.join(SPLITS)}")
        try:
            datas[split] = load_run_split(train_args, split)
        except (ValueError, OSError) as exc:  # a missing, damaged or (7 objects on 32×32) impossible split
            raise EvaluationError(f"split {split!r}: {exc}") from exc
        try:
            check_data_fits(ckpt, datas[split], explicit=explicit)
        except ValueError as exc:
            raise EvaluationError(f"split {split!r}: {exc}") from exc
        if getattr(model, "exclusion_window", 1) != 1 and len(datas[split].counts):
            from .ops import check_exclusion

            H, W = datas[split].get_batch([0])[0].shape[-2:]
            try:
                check_exclusion(model.exclusion_window, (H, W), H * W, model.max_objects, "--exclusion-window")
            except ValueError as exc:
                raise EvaluationError(f"split {split!r}: {exc}") from exc
    return datas


# ---------------------------------------------------------------------------------------------
# The CLI: parse, evaluate_run, print, write
# ---------------------------------------------------------------------------------------------


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
    splits = None if args.splits is None else [s for s in args.splits.split(",") if s]
    bad = [] if splits is None else [s for s in splits if s not in SPLITS]
    if bad or splits == []:
        parser.error(f"--splits must be a comma-separated subset of train,val,test,test7, got {args.splits!r}")
    try:
        torch.device(args.device)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run = evaluate_run(args.run_dir, splits=splits, K=args.K, n_eval=args.n_eval, n_bound=args.n_bound,
                           batch_size=args.batch_size, data=args.data, out=args.out, device=args.device,
                           ops=args.ops, count_window=args.count_window, exclusion_window=args.exclusion_window,
                           seed=args.seed, progress=sys.stderr.isatty())
    except EvaluationError as exc:
        raise SystemExit(f"error: {exc}")
    print(run.summary())
    return 0 if run.save(PROG) else 1


# meta["kind"] of a results file: what `pretrained export` accepts as measured metrics.
RESULTS_KIND = "lavae_fast.evaluate"


if __name__ == "__main__":
    sys.exit(main())
