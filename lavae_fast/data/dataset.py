"""``MultiObjectDataset``: a stored split (or in-memory arrays) as a ``torch.utils.data.Dataset``."""

from __future__ import annotations

import copy
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from . import storage

__all__ = ["MultiObjectDataset"]

_CORE = ("counts", "centres", "boxes")


class MultiObjectDataset(torch.utils.data.Dataset):
    """One split of a multi-object data set.

    ``MultiObjectDataset(root, split)`` with split in {"train", "test", "test7"} (a generated
    set) or {"train", "val", "test"} (an imported one) memory-maps the files written by
    :func:`lavae_fast.data.generate` or :func:`lavae_fast.data.import_images` (``mmap=False``
    reads them into memory; ``verify=True`` checks their SHA-256). :meth:`from_arrays` wraps the
    output of :func:`lavae_fast.data.generate_arrays` without touching the disk.

    ``values`` says what the pixels are: "binary" (x in {0,1}; every generated set) or "grey"
    (an imported set of grey levels or colours: x in [0,1], in steps of 1/255). ``labelled`` is
    False for a set imported without labels: its counts are −1 and it has no centres (K = 0);
    ``has_centres`` says whether the centres are known (an import with counts only has −1 there).
    ``source_index`` (imported sets, else None): int64 [N], each image's position in the source.

    ``ds[i]`` → ``(x, target)``: x float32 [C, H, W] in [0,1]; target a dict of int64 tensors:
    ``count`` (scalar), ``centres`` [K, 2] (row, col), ``boxes`` [K, 4] (r0, c0, r1, c1 half-open)
    and one [K] tensor per label (``digit``, ``pool_index`` or ``shape``, ``scale``, ``angle``,
    ``colour``), −1 for absent objects; K is the split's largest count.

    Whole-split numpy arrays: ``counts`` [N], ``centres`` [N, K, 2], ``boxes`` [N, K, 4], ``labels``
    (dict of [N, K]). Training loops should use :meth:`get_batch`, which unpacks a batch at once.
    """

    def __init__(self, root, split: str = "train", *, mmap: bool = True, verify: bool = False):
        if not isinstance(split, str) or split not in ("train", "val", "test", "test7"):
            raise ValueError(f"split: expected 'train', 'val', 'test' or 'test7', got {split!r}")
        meta, arrays = storage.load_split(os.fspath(root), split, mmap=mmap, verify=verify)
        self._init(meta, arrays, split, os.fspath(root))

    @classmethod
    def from_arrays(cls, arrays: Dict[str, np.ndarray], split: str = "memory") -> "MultiObjectDataset":
        """Wrap ``generate_arrays`` output (images uint8 [N, C, H, W] in {0,1}); the images are
        bit-packed like stored ones so both paths share one code path."""
        for key in ("images", *_CORE):
            if key not in arrays:
                raise ValueError(f"arrays: missing {key!r} (expected the dict returned by generate_arrays)")
        images = np.asarray(arrays["images"])
        if images.ndim != 4 or images.dtype != np.uint8 or (images.size and images.max() > 1):
            raise ValueError(f"arrays['images']: expected uint8 [N, C, H, W] in {{0,1}}, got {images.dtype} {images.shape}")
        n, c, h, w = images.shape
        labels = [k for k in arrays if k not in ("images", *_CORE)]
        meta = {"dataset": None, "channels": c, "height": h, "width": w, "labels": labels}
        packed = {"images": np.packbits(images, axis=-1)}
        packed.update({k: np.asarray(arrays[k]) for k in (*_CORE, *labels)})
        k = packed["centres"].shape[1] if packed["centres"].ndim == 3 else -1
        for key in (*_CORE, *labels):
            if packed[key].shape[:1] != (n,) or (key != "counts" and packed[key].shape[1:2] != (k,)):
                raise ValueError(f"arrays[{key!r}]: shape {packed[key].shape} does not match {n} images of ≤ {k} objects")
        self = cls.__new__(cls)
        self._init(meta, packed, split, None)
        return self

    def _init(self, meta: dict, arrays: Dict[str, np.ndarray], split: str, root: Optional[str]) -> None:
        self.meta = meta
        self.split = split
        self.root = root
        self.dataset_name = meta.get("dataset")
        self.channels, self.height, self.width = int(meta["channels"]), int(meta["height"]), int(meta["width"])
        self.bitpacked = bool(meta.get("bitpacked", True))
        self.values = meta.get("values", "binary")
        annotations = meta.get("annotations", "centres")
        self.labelled = annotations != "none"
        self.has_centres = annotations == "centres"
        # uint8 [N, C, H, ceil(W/8)] bit-packed, or [N, C, H, W] grey levels (value = byte / 255)
        self.images = arrays["images"]
        self.source_index = np.asarray(arrays["source_index"]).astype(np.int64) if "source_index" in arrays else None
        self.counts = np.asarray(arrays["counts"]).astype(np.int64)
        self.centres = np.asarray(arrays["centres"]).astype(np.int64)
        self.boxes = np.asarray(arrays["boxes"]).astype(np.int64)
        self.labels = {k: np.asarray(arrays[k]).astype(np.int64) for k in meta["labels"]}
        self.max_count = self.centres.shape[1]

    def head(self, n: int) -> "MultiObjectDataset":
        """The first ``n`` images (all when the split has fewer), as views: nothing is copied or
        read. An imported split is stored in a seeded random order, so its head is a sample."""
        n = min(int(n), len(self))
        new = copy.copy(self)
        new.images = self.images[:n]
        new.counts, new.centres, new.boxes = self.counts[:n], self.centres[:n], self.boxes[:n]
        new.labels = {k: v[:n] for k, v in self.labels.items()}
        new.source_index = None if self.source_index is None else self.source_index[:n]
        new._limit = n
        return new

    def __getstate__(self):
        # A stored split travels to DataLoader workers (spawn) as its path, not as a copy of the
        # memory-mapped arrays; each worker maps the files again.
        if self.root is not None and isinstance(self.images, np.memmap):
            return {"_reopen": (self.root, self.split, getattr(self, "_limit", None))}
        return self.__dict__

    def __setstate__(self, state):
        if "_reopen" in state:
            root, split, *limit = state["_reopen"]
            meta, arrays = storage.load_split(root, split, mmap=True)
            self._init(meta, arrays, split, root)
            if limit and limit[0] is not None:
                self.__dict__.update(self.head(limit[0]).__dict__)
        else:
            self.__dict__.update(state)

    def __len__(self) -> int:
        return self.counts.shape[0]

    def __repr__(self) -> str:
        where = self.root if self.root is not None else "in memory"
        return (f"MultiObjectDataset({self.dataset_name or 'arrays'}, split={self.split!r}, n={len(self)}, "
                f"C×H×W={self.channels}×{self.height}×{self.width}, {where})")

    def _index(self, indices) -> np.ndarray:
        idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise TypeError(f"indices: expected a 1-D sequence of integers, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"indices: out of range for a split of {n} images")
        return np.where(idx < 0, idx + n, idx)

    def _unpack(self, packed: np.ndarray) -> np.ndarray:
        return np.unpackbits(packed, axis=-1, count=self.width) if self.bitpacked else packed

    def _to_float(self, stored: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(self._unpack(stored)).to(torch.float32)
        # Division (not a multiplication by 1/255) rounds k/255 correctly, so x·255 rounds back to
        # the stored byte: what was imported comes out bit for bit.
        return x if self.bitpacked else x.div_(255.0)

    def __getitem__(self, i) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if isinstance(i, torch.Tensor) and i.ndim == 0:
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index: expected an integer, got {type(i).__name__}; use get_batch for many images")
        (i,) = self._index([i])
        x = self._to_float(np.asarray(self.images[i]))
        target = {
            "count": torch.tensor(self.counts[i], dtype=torch.int64),
            "centres": torch.from_numpy(self.centres[i].copy()),
            "boxes": torch.from_numpy(self.boxes[i].copy()),
        }
        target.update({k: torch.from_numpy(v[i].copy()) for k, v in self.labels.items()})
        return x, target

    def get_batch(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x float32 [B, C, H, W] in [0,1] ({0,1} for a binary set), counts int64 [B], −1 where
        unknown) for integer ``indices`` [B]."""
        idx = self._index(indices)
        # Memory-mapped fancy indexing reads pages in index order; sorted reads are faster on disk.
        order = np.argsort(idx, kind="stable")
        packed = np.empty((len(idx), *self.images.shape[1:]), np.uint8)
        packed[order] = self.images[idx[order]]
        return self._to_float(packed), torch.from_numpy(self.counts[idx])

    def targets(self, indices) -> Dict[str, torch.Tensor]:
        """The targets of a batch: ``count`` [B], ``centres`` [B, K, 2], ``boxes`` [B, K, 4], labels [B, K]."""
        idx = self._index(indices)
        out = {"count": torch.from_numpy(self.counts[idx]), "centres": torch.from_numpy(self.centres[idx]),
               "boxes": torch.from_numpy(self.boxes[idx])}
        out.update({k: torch.from_numpy(v[idx]) for k, v in self.labels.items()})
        return out
