"""LAVAE trained, resumed and evaluated from Python with lavae_fast.Trainer, no argument parser.

    python examples/train_with_trainer.py [--steps 20] [--out runs/trainer-example]

A TrainConfig holds the run's settings: the fields of ``python -m lavae_fast.train``'s options,
checked by the same validators. The Trainer runs them as the CLI does (checkpoints, metrics.jsonl,
the best checkpoint on the validation split, TensorBoard logs in the run folder). The first session
stops halfway, as an interruption would; the second resumes it to the end, reaching the parameters a
run without the stop reaches; then the best checkpoint is evaluated as ``python -m
lavae_fast.evaluate`` would. The settings are tiny (a 32×32 canvas, 64 training images, narrow
nets), so the example takes seconds; counting needs thousands of steps (examples/train_loop.py,
the README). A rerun starts the run afresh in the same folder.
"""

import argparse
import os

from lavae_fast import TrainConfig, Trainer
from lavae_fast.evaluate import evaluate_run

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--steps", type=int, default=20)
p.add_argument("--out", default=os.path.join("runs", "trainer-example"))
args = p.parse_args()
if args.steps < 2:  # the first session stops halfway, after at least one step
    p.error(f"--steps must be at least 2, got {args.steps}")

half = args.steps // 2
settings = dict(dataset="multi-dsprites", canvas=(32, 32), n_train=64, n_test=32, n_test7=0, n_val=16,
                steps=args.steps, batch_size=8, width=8, bf16="off", log_every=max(1, half // 2), ckpt_every=half,
                eval_every=half, eval_size=32, no_progress=True)

# Session 1: a new run (overwrite: a rerun of the example replaces the last one), stopped at `half`.
with Trainer(TrainConfig(out=args.out, overwrite=True, stop_at=half, **settings)) as trainer:
    result = trainer.setup().fit()
print(f"first session: stopped at step {result.step} of {args.steps}")

# Session 2: the same settings, resumed from the checkpoint the stop wrote.
with Trainer(TrainConfig(out=args.out, resume=True, **settings)) as trainer:
    trainer.setup()
    print(f"second session: resumed at step {trainer.start}")
    result = trainer.fit()
print(f"second session: done at step {result.step}")

# The checkpoint to ship is the best on the validation split; its results go beside it
# (checkpoint.best.eval.json), the file `python -m lavae_fast.pretrained export` asks for.
results = evaluate_run(os.path.join(args.out, "checkpoint.best.pt"), splits=["test"], K=10, n_bound=8)
print(results.summary())
results.save()
test = results.results["test"]
print(f"count accuracy on {test['images']} test images: {test['count_accuracy']:.3f}")
