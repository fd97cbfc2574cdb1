"""python -m lavae_fast.pretrained {list, info, export}: the shipped models, one model file's
provenance, and exporting a run as a model file to ship (see lavae_fast.pretrained.shipping)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import HERE, KINDS, REGISTRY, resolve, shipped
from .shipping import export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavae_fast.pretrained", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registered names and whether this installation ships their files")
    info = sub.add_parser("info", help="print a model file's configuration and provenance as JSON")
    info.add_argument("name_or_path")
    info.add_argument("--kind", choices=sorted(KINDS), default="lavae", help="for a name: which model (lavae)")
    ex = sub.add_parser("export", help="write a run's model (no optimiser) with its provenance as a file to ship")
    ex.add_argument("run", help="a run directory written by lavae_fast.train, or a checkpoint file")
    dest = ex.add_mutually_exclusive_group(required=True)
    dest.add_argument("--name", help=f"registered name: the file goes into {HERE}")
    dest.add_argument("--out", help="write to this file instead")
    ex.add_argument("--metrics", default=None, help="JSON of measured results (default: RUN/eval.json, or NAME.eval.json beside a checkpoint file NAME.pt)")
    ex.add_argument("--no-metrics", action="store_true", help="export without measured results")
    ex.add_argument("--train-commit", default=None, help="the commit the run was trained with (runs do not record it)")
    ex.add_argument("--note", default=None, help="free text kept in the provenance")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..runtime._io import dumps_strict
    from ..runtime.checkpoint import load_checkpoint

    try:
        if args.command == "list":
            have = set(shipped())
            for key in sorted(REGISTRY):
                print(f"{key[0]:9s} {key[1]:18s} {'shipped' if key in have else 'not shipped in this version'}")
        elif args.command == "info":
            state = load_checkpoint(resolve(args.name_or_path, args.kind))
            print(dumps_strict({"step": state.get("step"), "model_config": state["model_config"],
                                "provenance": state.get("provenance")}, indent=2, default=str))
        else:
            path = export(args.run, name=args.name, out=args.out, metrics=args.metrics, no_metrics=args.no_metrics,
                          train_commit=args.train_commit, note=args.note, overwrite=args.overwrite)
            print(f"wrote {path}")
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}")
    except KeyboardInterrupt:  # the model file is written all or nothing
        print("python -m lavae_fast.pretrained: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
