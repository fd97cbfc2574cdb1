"""The main job on an embedded default: generate data, train, evaluate, draw.

    lavae-demo [--out runs/demo] [--steps 300] [--dataset multi-dsprites] [--canvas 48]

Generates a small multi-object data set in memory (no files needed), trains LAVAE on the CPU with
the paper's schedule compressed into ``--steps`` (SPEC §5: every phase scales with the budget),
evaluates it (count and location accuracy, −log p(x) bound) on the 0–3-object and 7-object test
splits, and writes the figures. A short budget shows the pipeline end to end; counting needs a few
thousand steps to be learned well (see the README for measured runs).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="lavae-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="run directory")
    p.add_argument("--steps", type=int, default=300, help="training steps (the schedule scales with it)")
    p.add_argument("--dataset", default="multi-dsprites",
                   choices=["multi-dsprites", "multi-mnist-1k", "multi-mnist-10k"])
    p.add_argument("--canvas", default="48", help="N or HxW; 48 still fits the 7-object test split")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--K", type=int, default=20, help="importance samples for the bound")
    args = p.parse_args(argv)

    from . import evaluate, figures, train

    run = args.out
    resume = ["--resume"] if os.path.exists(os.path.join(run, "checkpoint.pt")) else []
    print(f"== training LAVAE on in-memory {args.dataset} ({args.canvas}), {args.steps} steps -> {run}")
    train.main(["--dataset", args.dataset, "--canvas", args.canvas, "--n-train", "4000", "--n-test", "256",
                "--n-test7", "128", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--out", run, *resume])
    print("== evaluating")
    evaluate.main([run, "--K", str(args.K), "--n-bound", "64"])
    print("== drawing figures")
    figures.main([run])
    print(f"done: {run}/eval.json, {run}/figures/, TensorBoard logs in {run}/tb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
