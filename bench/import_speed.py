"""How long `python -m lavae_fast.data import` takes on a folder of PNGs (issue 26: 10,000 64×64
PNGs in under 30 s).

Draws N random-shape scenes (lavae_fast.data.shapes: 0–3 coloured shapes of side canvas/4 on
black) into a temporary folder with their labels.csv, then runs the import as a user would — a
fresh `python -m lavae_fast.data import SRC --labels SRC/labels.csv --out DIR` process, start-up
included — and times it (wall clock, best of --repeat). The imported set is checked (image count,
splits, the suggested sprite size). Usage:

    python bench/import_speed.py                      # 10,000 64×64 PNGs
    python bench/import_speed.py --n 2000 --json bench/results/import_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_S = 30.0  # issue 26, for 10,000 64×64 PNGs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="PNGs (default 10000)")
    p.add_argument("--canvas", type=int, default=64)
    p.add_argument("--colours", choices=["saturated", "hue"], default="saturated")
    p.add_argument("--repeat", type=int, default=1, help="imports timed; the best is reported")
    p.add_argument("--tmp", default=None, help="folder for the scenes and the set (default: a temporary one)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the measurements here")
    a = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    from bench.common import cpu_model, load_average
    from lavae_fast.data import read_meta, write_scene_folder

    work = tempfile.mkdtemp(prefix="import_speed_", dir=a.tmp)
    try:
        src, out = os.path.join(work, "scenes"), os.path.join(work, "set")
        t0 = time.perf_counter()
        _, size = write_scene_folder(src, a.n, a.canvas, colours=a.colours, seed=0)
        draw_s = time.perf_counter() - t0
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "lavae_fast.data", "import", src, "--labels", os.path.join(src, "labels.csv"),
               "--out", out, "--no-progress", "--overwrite"]
        times = []
        load_start = load_average()
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                return 1
        meta = read_meta(out)
        assert meta["source"]["images"] == a.n and sum(s["n"] for s in meta["splits"].values()) == a.n
        best = min(times)
        result = {
            "n": a.n, "canvas": a.canvas, "shape_size": size, "colours": a.colours, "values": meta["values"],
            "draw_and_write_pngs_s": round(draw_s, 2), "import_s": [round(t, 2) for t in times],
            "import_best_s": round(best, 2), "images_per_s": round(a.n / best, 1),
            "suggested_sprite_size": meta["sprite_size"], "cpu": cpu_model(), "cpus": os.cpu_count(),
            "load_average_start": load_start, "load_average_end": load_average(),
            "target_s": TARGET_S if a.n == 10_000 and a.canvas == 64 else None,
        }
        print(f"wrote {a.n} {a.canvas}x{a.canvas} PNGs in {draw_s:.1f} s; import (a fresh process, start-up "
              f"included): {', '.join(f'{t:.1f}' for t in times)} s — {a.n / best:.0f} images/s; "
              f"suggested sprite size {meta['sprite_size']} for shapes of {size} px "
              f"(load average {load_start} → {result['load_average_end']})")
        if result["target_s"] is not None:
            print(f"target: under {TARGET_S:.0f} s — {'met' if best < TARGET_S else 'MISSED'}")
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
