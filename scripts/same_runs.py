"""Fixed-seed training runs whose logs must not change across a refactoring (issue 25, step 5).

    python scripts/same_runs.py run OUT          # 4 short float32 runs into OUT/
    python scripts/same_runs.py compare A B      # their metrics.jsonl, key by key

Each model (LAVAE, the β-VAE baseline) trains 20 steps in one go and in two sessions (stopped at
step 10, then ``--resume``), in float32 on one thread, so that two code versions on one machine
log the same numbers bit for bit. The wall-clock keys (``sec_per_step``) are left out of the
comparison; everything else, evaluation records included, must be equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

COMMON = ["--steps", "20", "--batch-size", "8", "--canvas", "32", "--n-train", "200", "--n-test", "48",
          "--n-test7", "0", "--n-val", "32", "--log-every", "5", "--ckpt-every", "10", "--eval-every", "10",
          "--eval-size", "32", "--width", "16", "--bf16", "off", "--threads", "1", "--no-progress", "--seed", "3"]
RUNS = {"lavae": ["--model", "lavae"], "baseline": ["--model", "baseline"]}
TIMING_KEYS = {"sec_per_step"}


def _train(args):
    subprocess.run([sys.executable, "-m", "lavae_fast.train", *args], check=True)


def run(out: str) -> None:
    for name, extra in RUNS.items():
        _train([*COMMON, *extra, "--out", os.path.join(out, f"{name}-whole")])
        split = os.path.join(out, f"{name}-resumed")
        _train([*COMMON, *extra, "--out", split, "--stop-at", "10"])
        _train([*COMMON, *extra, "--out", split, "--resume"])


def _records(path: str):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


def compare(a: str, b: str) -> int:
    bad = 0
    for name in sorted(os.listdir(a)):
        ra, rb = _records(os.path.join(a, name)), _records(os.path.join(b, name))
        same = ra == rb
        keys = sorted({k for r in ra for k in r})
        print(f"{name}: {len(ra)} records, {len(keys)} keys: {'equal' if same else 'DIFFERENT'}")
        if not same:
            bad += 1
            for i, (x, y) in enumerate(zip(ra, rb)):
                for k in sorted(set(x) | set(y)):
                    if x.get(k) != y.get(k):
                        print(f"  record {i} {k}: {x.get(k)!r} != {y.get(k)!r}")
            if len(ra) != len(rb):
                print(f"  {len(ra)} records against {len(rb)}")
    # A resumed run must log what the uninterrupted one logs, in either version.
    for model in RUNS:
        whole, resumed = _records(os.path.join(a, f"{model}-whole")), _records(os.path.join(a, f"{model}-resumed"))
        print(f"{model}: resumed == whole in {a}: {whole == resumed}")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
