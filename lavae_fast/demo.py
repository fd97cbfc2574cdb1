"""The main job: a shipped LAVAE counting fresh scenes, or (``--train``) training one from scratch.

    lavae-demo [--out runs/demo] [--dataset multi-dsprites] [--n 256] [--n7 128] [--seed 2026]
    lavae-demo --train [--out runs/demo-train] [--steps 300] [--canvas 48]

By default it loads the shipped models (:mod:`lavae_fast.pretrained`: LAVAE and the β-VAE baseline
trained on the same data set), generates fresh scenes in memory (the 0–3-object split and the
7-object split, with a seed of their own), runs inference, prints a report — count accuracy,
location accuracy, the importance-sampled bound with a small K beside the baseline's, images per
second — runs the same model on the paper's 64×64 canvas (γ = ½ ln D is meant to make the nets
canvas-independent) and, where one is shipped (``multi-dsprites-64``), the model trained at 64×64,
and writes the figures. ``report.json`` in ``--out`` holds the numbers.

With ``--train`` it trains LAVAE on an in-memory data set with the paper's schedule compressed into
``--steps`` (SPEC §5: every phase scales with the budget), then evaluates it and draws its figures;
it prints the expected wall time first. A short budget shows the pipeline end to end; counting needs
a few thousand steps (see the README for measured runs).

The demo is built on the library, not on the other CLIs: :class:`lavae_fast.Trainer` trains (with a
:class:`~lavae_fast.train_config.TrainConfig`), :func:`lavae_fast.evaluate.evaluate_run` evaluates and
:func:`lavae_fast.figures.draw_figures` draws; their errors end it with its own messages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Optional, Sequence

from . import _cli
from ._cli import nonneg_int, positive_int

DATASETS = ["multi-dsprites", "multi-mnist-1k", "multi-mnist-10k"]
PROG = "lavae-demo"
# The two modes write to folders of their own: the shipped models' report and figures, and a
# --train run with its evaluation and figures.
DEFAULT_OUT = {"shipped": os.path.join("runs", "demo"), "train": os.path.join("runs", "demo-train")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lavae-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help=f"output folder (default {DEFAULT_OUT['shipped']} for the shipped models' report and figures, "
                        f"{DEFAULT_OUT['train']} for a --train run, its results and figures; a folder holding the "
                        "other mode's output is refused, so that two models' numbers never share one folder)")
    p.add_argument("--dataset", default="multi-dsprites", choices=DATASETS)
    p.add_argument("--n", type=positive_int, default=256, help="fresh 0–3-object scenes to count")
    p.add_argument("--n7", type=nonneg_int, default=128, help="fresh 7-object scenes to count")
    p.add_argument("--seed", type=nonneg_int, default=2026,
                   help="seed of the fresh scenes (the shipped models' data used seed 0)")
    p.add_argument("--K", type=_cli.int_in(1, 10**5, " (importance samples per image)"), default=10, help="importance samples for the bound")
    p.add_argument("--n-bound", type=nonneg_int, default=32, help="images per split that get the bound")
    p.add_argument("--no-canvas-64", dest="canvas_64", action="store_false",
                   help="skip the 64×64 part: the shipped model on the paper's canvas, and the one trained there")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="skip the figures")
    p.add_argument("--train", action="store_true", help="train LAVAE from scratch instead of loading a shipped model")
    p.add_argument("--steps", type=positive_int, default=300, help="with --train: training steps")
    p.add_argument("--canvas", default="48", help="with --train: N or HxW; 48 still fits the 7-object test split")
    p.add_argument("--batch-size", type=_cli.batch_size, default=16, help="with --train")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        where = (f"; the run's last checkpoint is in {args.out} (run the same command again to continue it)"
                 if args.out and os.path.isfile(os.path.join(args.out, "checkpoint.pt")) else "")
        print(f"{PROG}: interrupted; every file written so far is complete (written all or nothing){where}",
              file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, the output folder removed meanwhile
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


def _main(args) -> int:
    mode = "train" if args.train else "shipped"
    if mode == "shipped":
        from .pretrained import REGISTRY, shipped

        if ("lavae", args.dataset) not in REGISTRY or ("lavae", args.dataset) not in shipped("lavae"):
            print(f"{PROG}: no LAVAE trained on {args.dataset} is shipped in this installation "
                  "(python -m lavae_fast.pretrained list); training one from scratch instead (--train)", file=sys.stderr)
            mode = "train"
    if args.out is None:
        args.out = DEFAULT_OUT[mode]
    problem = output_problem(args.out, mode)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    return _train(args) if mode == "train" else _shipped(args)


def output_problem(out: str, mode: str) -> Optional[str]:
    """Why ``out`` cannot take this ``mode``'s output (None if it can), checked before any work: it
    must be a writable folder with room for a file, and must not hold the other mode's output (a
    shipped-model report beside a trained run would mix two models' numbers and figures)."""
    from ._io import OutputLocationError, check_output_folder
    from .run_folder import run_contents

    if mode == "shipped":
        other = [n for n in run_contents(out) if n != "figures"]
        if other:
            return (f"--out {out} holds a trained run ({', '.join(other)}, from `{PROG} --train`): the shipped models' "
                    "report would sit beside another model's results; choose another --out")
    elif os.path.isfile(os.path.join(out, "report.json")):
        return (f"--out {out} holds the shipped models' report (report.json, from `{PROG}` without --train): a run "
                "there would mix two models' figures; choose another --out")
    try:
        check_output_folder(out)
    except OutputLocationError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# The shipped models on fresh scenes
# ---------------------------------------------------------------------------------------------


def _images_per_second(model, data, batch_size: int = 64) -> float:
    """Inference throughput (``model.infer``: count, locate, read the appearance) over ``data``."""
    import numpy as np
    import torch

    N = len(data.counts)
    batches = [data.get_batch(np.arange(b, min(b + batch_size, N)))[0] for b in range(0, N, batch_size)]
    with torch.no_grad():
        model.infer(batches[0][:2])  # first-call costs (kernel choice, allocator) are not throughput
        t0 = time.perf_counter()
        for x in batches:
            model.infer(x)
    return N / (time.perf_counter() - t0)


def _count_fresh(model, args, splits: Dict[str, int]) -> Dict[str, Dict]:
    """Accuracies (no bound) of ``model`` on fresh scenes of its own canvas: {split: results} for
    each split with a non-zero count in ``splits``."""
    from .data.runs import generate_split
    from .evaluate import evaluate_split

    canvas = tuple(model.canvas)
    return {split: evaluate_split(model, generate_split(args.dataset, n, args.seed, canvas, split), K=0)
            for split, n in splits.items() if n}


def _shipped(args) -> int:
    import torch

    from . import BetaVAE, LAVAE
    from ._io import write_results
    from .pretrained import shipped

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = LAVAE.from_pretrained(args.dataset)
    baseline = BetaVAE.from_pretrained(args.dataset) if ("baseline", args.dataset) in shipped("baseline") else None
    canvas = tuple(model.canvas)
    print(f"== shipped LAVAE for {args.dataset} ({canvas[0]}×{canvas[1]}); fresh scenes, seed {args.seed}")
    splits = {"test": args.n, "test7": args.n7}
    results = _fresh_results(model, baseline, args, splits)
    report = {"dataset": args.dataset, "canvas": list(canvas), "seed": args.seed, "K": args.K, "results": results}
    if args.canvas_64:
        report.update(_results_64x64(args, canvas, splits))
    report["provenance"] = _provenance(args.dataset)
    if not write_results(os.path.join(args.out, "report.json"), report, PROG):
        return 1
    if args.figures:
        print("== drawing figures")
        _draw_figures(args.dataset, out=os.path.join(args.out, "figures"),
                      baseline=args.dataset if baseline is not None else None)
    print(f"done in {time.perf_counter() - t_start:.0f} s: {args.out}/report.json"
          + (f", {args.out}/figures/" if args.figures else ""))
    return 0


def _fresh_results(model, baseline, args, splits: Dict[str, int]) -> Dict[str, Dict]:
    """The shipped LAVAE's results on fresh scenes of each split with a non-zero count in
    ``splits`` (with the bound, its throughput, and the baseline's bound beside it), printed."""
    import torch

    from .data.runs import generate_split
    from .evaluate import evaluate_split, format_table

    canvas = tuple(model.canvas)
    results: Dict[str, Dict] = {}
    for split, n in splits.items():
        if not n:
            continue
        data = generate_split(args.dataset, n, args.seed, canvas, split)
        r = evaluate_split(model, data, K=args.K, n_bound=args.n_bound, seed=args.seed)
        r["images_per_second"] = _images_per_second(model, data)
        if baseline is not None:
            b = evaluate_split(baseline, data, K=args.K, n_bound=args.n_bound, seed=args.seed)
            r["baseline_nll_bound"] = b["nll_bound"]
        results[split] = r
    print(format_table(results))
    for split, r in results.items():
        line = f"{split}: {r['images_per_second']:.0f} images/s (inference, {torch.get_num_threads()} threads)"
        if "baseline_nll_bound" in r:
            line += (f"; β-VAE baseline −log p(x) ≤ {r['baseline_nll_bound']['mean']:.1f} "
                     f"(K = {args.K}, {r['bound_images']} images)")
        print(line)
    return results


def _results_64x64(args, canvas, splits: Dict[str, int]) -> Dict[str, Dict]:
    """The report's entries of the paper's 64×64 canvas, printed: the shipped model run there
    (``results_64x64``, unless it was trained there) and the model trained there, where one is
    shipped (``results_trained_64x64``)."""
    from . import LAVAE
    from .evaluate import format_table
    from .pretrained import shipped

    report = {}
    if canvas != (64, 64):
        # The nets are convolutional and γ = ½ ln D follows the canvas, so the model runs at 64×64
        # unchanged; whether it still counts is measured here, not assumed.
        r64 = _count_fresh(LAVAE.from_pretrained(args.dataset, canvas=(64, 64)), args, splits)
        print(f"== the same model on the paper's 64×64 canvas (trained on {canvas[0]}×{canvas[1]})")
        print(format_table(r64))
        report["results_64x64"] = r64
    name64 = f"{args.dataset}-64"
    if ("lavae", name64) in shipped("lavae"):
        # The model trained on the paper's canvas, where the 7-object scenes are not crowded.
        m64 = LAVAE.from_pretrained(name64)
        c64 = tuple(m64.canvas)
        t64 = _count_fresh(m64, args, splits)
        print(f"== the shipped LAVAE trained on {c64[0]}×{c64[1]} ({name64}, {m64.count_window}×{m64.count_window} "
              "counter)")
        print(format_table(t64))
        report["results_trained_64x64"] = {"name": name64, **t64}
    return report


def _draw_figures(run_or_name: str, **kwargs) -> None:
    """:func:`lavae_fast.figures.draw_figures`, printing the files written as its CLI does; its
    errors end the demo as they end that CLI (``error: ...``, exit code 1)."""
    from .figures import FiguresError, draw_figures

    try:
        written = draw_figures(run_or_name, **kwargs)
    except FiguresError as exc:
        raise SystemExit(f"error: {exc}")
    for path in written:
        print(f"wrote {path}")


def _provenance(name: str) -> Optional[Dict]:
    from .checkpoint import load_checkpoint
    from .pretrained import model_file

    prov = load_checkpoint(model_file("lavae", name)).get("provenance") or {}
    return {k: prov.get(k) for k in ("command", "train_commit", "step", "note")}


# ---------------------------------------------------------------------------------------------
# --train: from scratch
# ---------------------------------------------------------------------------------------------


def _seconds_per_step(config) -> float:
    """A measured training step (the fastest of two after a warm one) of the model and recipe that
    ``--train`` builds from ``config`` (its :class:`~lavae_fast.train_config.TrainConfig`), for the
    wall-time estimate."""
    import torch

    from .data import DATASETS as REGISTRY
    from .loading import build_model
    from .performance import bf16_native
    from .recipe import recipe_class

    recipe_cls = recipe_class(config.model)
    channels = REGISTRY[config.dataset].channels
    model = build_model(recipe_cls.model_config(config, channels))
    model.accelerate(bf16=bf16_native()[0])  # what training's --bf16 auto picks
    recipe = recipe_cls.from_config(model, config)
    opt = recipe.optimizer()
    x = (torch.rand(config.batch_size, channels, *model.canvas) < 0.1).float()
    ids = torch.arange(config.batch_size)
    times = []
    for step in range(3):
        t0 = time.perf_counter()
        loss, _ = recipe.loss(x, step, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _train_argv(args):
    return ["--dataset", args.dataset, "--canvas", args.canvas, "--n-train", "4000", "--n-test", "256",
            "--n-test7", "128", "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--out", args.out]


def _train_config(args):
    """The :class:`~lavae_fast.train_config.TrainConfig` of the demo's run (:func:`_train_argv`'s
    settings), resuming the run that ``--out`` holds; ConfigError names a setting it refuses."""
    from .train_config import TrainConfig, build_parser

    resume = ["--resume"] if os.path.exists(os.path.join(args.out, "checkpoint.pt")) else []
    return TrainConfig.from_args(build_parser(raising=True).parse_args([*_train_argv(args), *resume]))


def _train(args) -> int:
    from . import evaluate
    from .train_config import ConfigError

    run = args.out
    try:
        config = _train_config(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        sec = _seconds_per_step(config)
        print(f"== expected wall time: ~{sec * args.steps / 60:.0f} min for {args.steps} steps "
              f"({sec:.2f} s a step measured here) plus evaluation")
    except Exception as exc:  # the estimate is a courtesy; training itself reports real errors
        print(f"(no wall-time estimate: {exc})", file=sys.stderr)
    print(f"== training LAVAE on in-memory {args.dataset} ({args.canvas}), {args.steps} steps -> {run}")
    rc = _fit(config)
    if rc:
        return rc
    print("== evaluating")
    try:
        results = evaluate.evaluate_run(run, K=args.K, n_bound=64, progress=sys.stderr.isatty())
    except evaluate.EvaluationError as exc:
        raise SystemExit(f"error: {exc}")
    print(results.summary())
    if not results.save(PROG):
        return 1
    if args.figures:
        print("== drawing figures")
        _draw_figures(run)
    print(f"done: {run}/eval.json" + (f", {run}/figures/" if args.figures else "") + f", TensorBoard logs in {run}/tb")
    return 0


def _fit(config) -> int:
    """Train the demo's run with :class:`lavae_fast.Trainer` (as ``python -m lavae_fast.train``
    would): 0, or 128 + the signal that stopped it (its checkpoint written), or, with a message,
    2 for settings or a run folder it refuses and 1 for a loss that stopped being finite or memory
    that ran out. A checkpoint that cannot be written (an OSError) ends the demo in :func:`main`."""
    from .checkpoint import RunDirectoryInUse
    from .run_folder import RunDirectoryError
    from .train_config import ConfigError
    from .trainer import NonFiniteLoss, Trainer

    try:
        with Trainer(config) as trainer:
            return trainer.setup().fit().exit_code
    except (ConfigError, RunDirectoryError, RunDirectoryInUse) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        kept = (f"the last good checkpoint is in {config.out} (step {exc.last_saved})" if exc.last_saved is not None
                else "no checkpoint was written before it")
        print(f"{PROG}: error: the loss became {exc.value} at step {exc.step}; training stopped before that step's "
              f"update; {kept}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        print(f"{PROG}: error: out of memory ({str(exc).splitlines()[0][:200]}): lower --batch-size; the run's "
              f"checkpoints in {config.out} are intact", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
