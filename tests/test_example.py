"""examples/train_loop.py, the plain-PyTorch loop on lavae_fast.Recipe, runs as documented."""

import os
import subprocess
import sys

import lavae_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(lavae_fast.__file__)))


def test_train_loop_example_runs_a_few_steps(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_loop.py"), "--steps", "3",
                          "--canvas", "48", "--n-train", "64", "--n-test", "32"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("count accuracy on 32 held-out images: ")]
    assert line, res.stdout
    assert 0.0 <= float(line[0].rsplit(" ", 1)[1]) <= 1.0
