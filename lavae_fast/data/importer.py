"""Importing a user's images as a data set: ``python -m lavae_fast.data import SRC --out DIR``.

SRC is a folder of PNG / JPEG images (read with Pillow), a ``.npy`` / ``.npz`` array or an HDF5
file (h5py, optional). The result is a data set directory in the checked format of
:mod:`.storage` (format ``lavae_fast.data/2``: SHA-256 of every file, a fingerprint, atomic
writes, replacement by swap, a half-written set refused) with the splits train / val / test drawn
by a seeded permutation, read by :class:`~lavae_fast.data.MultiObjectDataset` like a generated set.

What happens to the pixels, in order (each image ends as C×H×W values in [0, 1]):

1. decoding: 8-bit images as they are; 16-bit ones scaled by 1/65535; 1-bit as 0/1; palette
   images through their palette; a uint8 array scaled by 1/255, a uint16 one by 1/65535, a float
   array taken as it is (it must lie in [0, 1], NaN refused), another integer array must be 0/1;
2. alpha (RGBA, LA, a palette or colour key with transparency, arrays with C = 2 or 4): the
   colour is multiplied by alpha, so a transparent pixel is empty background (value 0) — with
   ``--invert`` too, where the visible part is inverted and the transparent part stays 0;
3. ``--invert``: v → 1 − v (objects drawn dark on light become light on dark);
4. channels: ``--channels 1`` turns colour into grey (ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B,
   Pillow's), ``--channels 3`` repeats grey into R, G, B; without the flag every image must have
   the channels of the first (grey and colour mixed are refused, the first offender named);
5. size: every image must have the size of the first (the first offender is named), unless
   ``--crop HxW`` (the centre H×W) or ``--resize HxW`` (bilinear with antialiasing);
6. ``--threshold T``: v ≥ T → 1, else 0 (binary);
7. storage: when every value is 0 or 1 the images are stored bit-packed (``values`` "binary",
   exactly as the generated sets), otherwise as bytes, value = byte / 255 (``values`` "grey"; an
   8-bit source comes back bit for bit, a float or 16-bit one rounded to the nearest 1/255).

The likelihood is the same Bernoulli per pixel and channel (SPEC §1) for grey values: log p(x|λ)
= Σ x log λ + (1 − x) log(1 − λ) with x in [0, 1] is then a cross-entropy — largest where λ = x,
so the model still fits the intensities — but not a normalised density over continuous x: the
−ELBO of a grey set is not a bound on −log p(x) in the usual sense, and is comparable only between
models of the same set, not with a binary set's or with the paper's numbers.

Labels (optional): ``--labels CSV`` with rows ``file,count[,row,col,row,col,...]`` (the objects'
centre pixels, 0-based, row downwards; a header row ``file,...`` is skipped; every image needs a
row; coordinates follow ``--crop`` / ``--resize``), or for arrays the keys ``counts`` [N] and
``centres`` [N, K, 2] (−1 padded). Without labels the set is stored unlabelled (counts −1,
``meta["annotations"] == "none"``). No image may hold more than ``--max-objects`` (M, default 10,
the most objects the model counts) labelled objects.

The model's assumptions are checked (:mod:`.analysis`): a bright, grey or cluttered background
is refused with the reason (``--invert`` for dark objects on light), the objects' extents give
the suggested sprite side S, recorded in meta.json.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import analysis, storage
from .generator import parse_canvas

__all__ = ["import_images", "ImportDataError", "IMAGE_EXTENSIONS", "DEFAULT_SPLIT", "DEFAULT_MAX_OBJECTS",
           "MAX_OBJECTS_LIMIT", "parse_split"]

IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
ARRAY_EXTENSIONS = (".npy", ".npz")
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf")
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_MAX_OBJECTS = 10  # M of the paper and of the model's default
MAX_OBJECTS_LIMIT = 1024  # lavae_fast.ops.MAX_OBJECTS: the counting kernels' limit
MAX_SPRITE_SIZE = 127  # lavae_fast.model.MAX_SPRITE_SIZE
CHECK_SAMPLE = 2000  # images whose objects are found: the sprite size, the clutter rule
PROBE = 256  # images checked before the whole source is read
PROBE_REFUSE_SHARE = 0.25  # a probe refuses only what is clearly wrong; the whole set decides the rest
CHUNK = 256  # images converted and written together

_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImportDataError(ValueError):
    """The source cannot be imported as asked; the message names the file, row or value and what to do."""


def _default_warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def parse_split(text) -> Tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` (train, val, test fractions summing to 1) → a tuple of three floats."""
    if isinstance(text, str):
        try:
            vals = [float(t) for t in text.split(",")]
        except ValueError:
            raise ValueError(f"split: expected three fractions TRAIN,VAL,TEST such as 0.8,0.1,0.1, "
                             f"got {text!r}") from None
    else:
        vals = [float(t) for t in text]
    if len(vals) != 3 or not all(math.isfinite(v) and v >= 0 for v in vals):
        raise ValueError(f"split: expected three fractions >= 0 (train, val, test), got {text!r}")
    if abs(sum(vals) - 1.0) > 1e-6:
        raise ValueError(f"split: the fractions must sum to 1, got {text!r} (sum {sum(vals):g})")
    if vals[0] == 0:
        raise ValueError("split: the train fraction must be above 0")
    return tuple(vals)


def split_sizes(n: int, fractions: Sequence[float]) -> Dict[str, int]:
    """Images per split: val and test rounded from their fractions, train the rest. Refuses a set
    too small for a split whose fraction is above 0 to get an image."""
    def sizes_of(m: int) -> Dict[str, int]:
        val, test = (int(round(m * f)) for f in fractions[1:])
        return {"train": m - val - test, "val": val, "test": test}

    def short_of(m: int) -> List[str]:
        got = sizes_of(m)
        return [s for s, f in zip(SPLIT_NAMES, fractions) if f > 0 and got[s] < 1]

    sizes, short = sizes_of(n), short_of(n)
    if short:
        need = n + 1
        while short_of(need):
            need += 1
        raise ImportDataError(
            f"{n} image(s) are too few for the splits {','.join(f'{f:g}' for f in fractions)} (train, val, test): "
            f"{' and '.join(short)} would get no image; import at least {need} images, or pass --split with 0 for "
            f"{' and '.join(short)}")
    return sizes


# ---------------------------------------------------------------------------------------------
# Sources: each says how many images, their names, sizes and channels, and decodes one by one.


class _Image:
    """One decoded image: ``data`` [H, W, Cs] (Cs = 1 grey, 2 grey+alpha, 3 colour, 4 colour+alpha),
    ``scale``: the value that means 1 (255, 65535, or 1 for bool and float)."""

    __slots__ = ("data", "scale")

    def __init__(self, data: np.ndarray, scale: float):
        self.data = data
        self.scale = scale


class _FolderSource:
    kind = "folder"

    def __init__(self, root: str, skip: Sequence[str] = ()):
        self.root = root
        skip = {os.path.realpath(p) for p in skip}
        names = []
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            if entry.startswith(".") or os.path.realpath(path) in skip:
                continue  # hidden files (.DS_Store, editors' swap files) and the label file
            if os.path.isdir(path):
                raise ImportDataError(f"{path} is a folder: import reads the image files directly in {root} "
                                      "(no sub-folders); move it out")
            ext = os.path.splitext(entry)[1].lower()
            if ext not in IMAGE_EXTENSIONS:
                hint = " (a label file goes to --labels)" if ext == ".csv" else ""
                raise ImportDataError(f"{path} is not a PNG or JPEG image (.png, .jpg, .jpeg){hint}: "
                                      f"the folder may hold only the images; move it out")
            names.append(entry)
        if not names:
            raise ImportDataError(f"{root} holds no PNG or JPEG images")
        self.names = names
        self.paths = [os.path.join(root, n) for n in names]

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return self.names[i]

    def headers(self, progress: bool):
        """(sizes int64 [N, 2] (H, W), colour bool [N], modes list[str]); reads only the headers."""
        from PIL import Image, UnidentifiedImageError

        n = len(self.paths)
        sizes = np.zeros((n, 2), np.int64)
        colour = np.zeros(n, bool)
        modes = []
        for i, path in enumerate(_bar(self.paths, progress, "reading headers")):
            try:
                with Image.open(path) as im:
                    fmt, mode, (w, h) = im.format, im.mode, im.size
                    if mode == "P":
                        pal = np.asarray(im.getpalette() or [], np.int64).reshape(-1, 3)
                        is_colour = bool((pal != pal[:, :1]).any())
                    else:
                        is_colour = mode not in _GREY_MODES
            except UnidentifiedImageError:
                raise ImportDataError(f"{path} is not an image Pillow can read (not a PNG or JPEG, or its header "
                                      "is damaged)") from None
            except (OSError, SyntaxError, ValueError) as e:
                raise ImportDataError(f"{path} cannot be read: {e}") from None
            want = IMAGE_EXTENSIONS[os.path.splitext(path)[1].lower()]
            if fmt not in ("PNG", "JPEG"):
                raise ImportDataError(f"{path} is a {fmt} image, not a PNG or JPEG: convert it first")
            if fmt != want:
                raise ImportDataError(f"{path} holds a {fmt} image under a {want} name: rename or convert it")
            sizes[i] = (h, w)
            colour[i] = is_colour
            modes.append(mode)
        return sizes, colour, modes

    def read(self, i: int) -> _Image:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im.load()
                return _from_pil(im, path)
        except ImportDataError:
            raise
        except Image.DecompressionBombError as e:
            raise ImportDataError(f"{path}: {e}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImportDataError(f"{path} is corrupt or truncated: {e}") from None

    peek = read  # one image out of order (the probe)


def _from_pil(im, path: str) -> _Image:
    mode = im.mode
    transparent = "transparency" in im.info
    if mode == "P":
        pal = np.asarray(im.getpalette() or [], np.int64).reshape(-1, 3)
        grey = not (pal != pal[:, :1]).any()
        im = im.convert(("LA" if grey else "RGBA") if transparent else ("L" if grey else "RGB"))
    elif mode in ("L", "RGB") and transparent:
        im = im.convert(mode[0] + "A" if mode == "L" else "RGBA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode in ("RGBa", "PA"):
        im = im.convert("RGBA")
    elif mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        im = im.convert("RGB")  # CMYK and YCbCr JPEGs
    mode = im.mode
    a = np.asarray(im)
    if mode == "1":
        return _Image(a[..., None], 1.0)
    if mode.startswith("I"):
        # 16-bit PNGs (Pillow's "I;16" or a 32-bit "I" holding 0..65535).
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImportDataError(f"{path}: {mode} values outside 0..65535")
        return _Image(a[..., None], 65535.0)
    return _Image(a if a.ndim == 3 else a[..., None], 255.0)


class _ArraySource:
    """An array of images: [N, H, W], [N, H, W, C] or [N, C, H, W] (``layout``), from memory, a
    memory-mapped .npy or an h5py dataset (read a chunk at a time)."""

    def __init__(self, array, where: str, layout: Optional[str]):
        shape = tuple(array.shape)
        self.array, self.where = array, where
        self.dtype = np.dtype(array.dtype)
        if self.dtype.kind not in "biuf":
            raise ImportDataError(f"{where}: images of dtype {self.dtype} are not numbers; expected bool, integers "
                                  "or floats in [0, 1]")
        if len(shape) == 3:
            self.layout = "NHW"
        elif len(shape) == 4:
            last, second = shape[3] in (1, 2, 3, 4), shape[1] in (1, 2, 3, 4)
            if layout is not None:
                self.layout = {"nhwc": "NHWC", "nchw": "NCHW"}[layout.lower()]
            elif last and second:
                raise ImportDataError(f"{where}: shape {shape} could be [N, H, W, C] or [N, C, H, W]; pass "
                                      "--layout nhwc or --layout nchw")
            elif last or second:
                self.layout = "NHWC" if last else "NCHW"
            else:
                raise ImportDataError(f"{where}: shape {shape} has no channel axis of 1, 3 (or 2, 4 with alpha) "
                                      "values: expected [N, H, W], [N, H, W, C] or [N, C, H, W]")
            c = shape[3] if self.layout == "NHWC" else shape[1]
            if c not in (1, 2, 3, 4):
                raise ImportDataError(f"{where}: {c} channels in layout {self.layout}; expected 1 or 3 "
                                      "(2 or 4 with alpha)")
        else:
            raise ImportDataError(f"{where}: shape {shape}; expected [N, H, W], [N, H, W, C] or [N, C, H, W]")
        if shape[0] == 0:
            raise ImportDataError(f"{where} holds no images (shape {shape})")
        self.n = shape[0]
        self.hw = (shape[2], shape[3]) if self.layout == "NCHW" else (shape[1], shape[2])
        self.cs = 1 if self.layout == "NHW" else (shape[3] if self.layout == "NHWC" else shape[1])
        if self.dtype == np.uint8:
            self.scale = 255.0
        elif self.dtype == np.uint16:
            self.scale = 65535.0
        else:
            self.scale = 1.0
        self._cache: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return f"image {i}"

    def headers(self, progress: bool):
        return (np.tile(np.asarray(self.hw, np.int64), (self.n, 1)), np.full(self.n, self.cs in (3, 4)),
                [f"{self.dtype}"] * self.n)

    def _chunk(self, start: int, stop: Optional[int] = None) -> np.ndarray:
        stop = min(start + CHUNK, self.n) if stop is None else stop
        try:
            a = np.asarray(self.array[start:stop])
        except (OSError, ValueError) as e:
            raise ImportDataError(f"{self.where}: images {start}..{stop - 1} cannot be read: {e}") from None
        if self.layout == "NHW":
            a = a[..., None]
        elif self.layout == "NCHW":
            a = a.transpose(0, 2, 3, 1)
        self._check_values(a, start)
        return a

    def _check_values(self, a: np.ndarray, start: int) -> None:
        kind = self.dtype.kind
        if kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                i, r, c, ch = np.argwhere(bad)[0]
                raise ImportDataError(f"{self.where}: image {start + i} has {a[i, r, c, ch]} at row {r}, col {c}"
                                      f"{f', channel {ch}' if a.shape[-1] > 1 else ''}: float images must be finite, "
                                      "in [0, 1]")
            bad = (a < 0) | (a > 1)
            what = "float images must lie in [0, 1] (scale them first, e.g. divide 0..255 values by 255)"
        elif kind in "iu" and self.dtype not in (np.uint8, np.uint16):
            bad = (a != 0) & (a != 1)
            what = ("integer images other than uint8 (0..255) and uint16 (0..65535) must be binary, 0 or 1: "
                    "cast levels to uint8 or to floats in [0, 1]")
        else:
            return
        if bad.any():
            i, r, c, ch = np.argwhere(bad)[0]
            raise ImportDataError(f"{self.where}: image {start + i} has the value {a[i, r, c, ch]} at row {r}, col {c}"
                                  f"{f', channel {ch}' if a.shape[-1] > 1 else ''}: {what}")

    def read(self, i: int) -> _Image:
        """Image ``i``, read with the CHUNK images around it (in order, each chunk is read once)."""
        start = (i // CHUNK) * CHUNK
        if self._cache[0] != start:
            self._cache = (start, self._chunk(start))
        return _Image(self._cache[1][i - start], self.scale)

    def peek(self, i: int) -> _Image:
        """Image ``i`` alone (the probe's scattered reads would otherwise read whole chunks)."""
        return _Image(self._chunk(i, i + 1)[0], self.scale)


def _open_arrays(src: str, images_key: Optional[str], counts_key: Optional[str], centres_key: Optional[str],
                 layout: Optional[str]):
    """(source, counts or None, centres or None, the keys used, closer) of an array file."""
    ext = os.path.splitext(src)[1].lower()
    keys_used = {}
    if ext == ".npy":
        if counts_key or centres_key or images_key:
            raise ImportDataError(f"{src} is a single array: --images-key, --counts-key and --centres-key apply to "
                                  ".npz and HDF5 files (labels for a .npy go in --labels, its rows named by index)")
        try:
            arr = np.load(src, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ImportDataError(f"{src} is not a readable .npy array: {e}") from None
        return _ArraySource(arr, src, layout), None, None, keys_used, lambda: None
    if ext == ".npz":
        try:
            z = np.load(src, allow_pickle=False)
            keys = list(z.keys())
        except (OSError, ValueError, EOFError) as e:
            raise ImportDataError(f"{src} is not a readable .npz archive: {e}") from None
        get = lambda k: z[k]  # noqa: E731
        closer = z.close
    else:
        try:
            import h5py
        except ImportError:
            raise ImportDataError(f"{src} is an HDF5 file; reading it needs h5py, which is not installed: "
                                  "pip install h5py") from None
        try:
            f = h5py.File(src, "r")
        except OSError as e:
            raise ImportDataError(f"{src} is not a readable HDF5 file: {e}") from None
        keys = []
        f.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset) else None)
        get = lambda k: f[k]  # noqa: E731
        closer = f.close
    try:
        if images_key is None:
            if "images" in keys:
                images_key = "images"
            elif len(keys) == 1:
                images_key = keys[0]
            else:
                raise ImportDataError(f"{src} holds {', '.join(keys) or 'no arrays'}: name the images with "
                                      "--images-key")
        for flag, key in (("--images-key", images_key), ("--counts-key", counts_key), ("--centres-key", centres_key)):
            if key is not None and key not in keys:
                raise ImportDataError(f"{flag} {key}: {src} has no array {key!r} (it holds {', '.join(keys)})")
        counts_key = counts_key or ("counts" if "counts" in keys else None)
        centres_key = centres_key or ("centres" if "centres" in keys else None)
        if centres_key and not counts_key:
            raise ImportDataError(f"{src}: centres ({centres_key!r}) without counts: name them with --counts-key")
        keys_used = {"images": images_key, "counts": counts_key, "centres": centres_key}
        source = _ArraySource(get(images_key), f"{src}[{images_key!r}]", layout)
        counts = np.asarray(get(counts_key)) if counts_key else None
        centres = np.asarray(get(centres_key)) if centres_key else None
    except BaseException:
        closer()
        raise
    return source, counts, centres, keys_used, closer


# ---------------------------------------------------------------------------------------------
# Labels


class _Labels:
    """counts int64 [N]; centres int64 [N, K, 2] (−1 padded) or None (counts only); ``where[i]``
    names image i's label (a CSV line) for messages."""

    def __init__(self, counts, centres, where, describe):
        self.counts, self.centres, self.where, self.describe = counts, centres, where, describe


def _read_label_csv(path: str, names: List[str], is_array: bool) -> _Labels:
    if not os.path.isfile(path):
        raise ImportDataError(f"--labels {path} does not exist")
    index = {n: i for i, n in enumerate(names)}
    n = len(names)
    counts = np.full(n, -1, np.int64)
    coords: List[Optional[np.ndarray]] = [None] * n
    line_of = np.zeros(n, np.int64)
    with_coords = without = None  # the first line of each kind, for the mixed-rows message
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ImportDataError(f"--labels {path} cannot be read as CSV: {e}") from None
    first = True
    for line, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        while cells and cells[-1] == "":
            cells.pop()
        if not cells:
            continue
        if first:
            first = False
            if cells[0].lower() in ("file", "filename", "image", "name", "index"):
                continue  # a header row
        where = f"{path}:{line}"
        if len(cells) < 2:
            raise ImportDataError(f"{where}: expected file,count[,row,col,...], got {','.join(row)!r}")
        name = cells[0]
        i = index.get(name)
        if i is None and not is_array:
            i = index.get(os.path.basename(name))
        if i is None:
            what = "an index of the array (0.." + str(n - 1) + ")" if is_array else "an image file in the source folder"
            raise ImportDataError(f"{where}: {name!r} is not {what}")
        if line_of[i]:
            raise ImportDataError(f"{where}: {name!r} is labelled twice (also on line {line_of[i]})")
        try:
            k = int(cells[1])
            if k < 0:
                raise ValueError
        except ValueError:
            raise ImportDataError(f"{where}: the count {cells[1]!r} is not a whole number >= 0") from None
        rest = cells[2:]
        if rest:
            if len(rest) != 2 * k:
                raise ImportDataError(f"{where}: {k} object(s) need {2 * k} coordinates (row,col per object), "
                                      f"got {len(rest)}")
            try:
                xy = np.array([float(v) for v in rest], np.float64).reshape(k, 2)
            except ValueError:
                bad = next(v for v in rest if not _is_float(v))
                raise ImportDataError(f"{where}: the coordinate {bad!r} is not a number") from None
            if not np.isfinite(xy).all():
                raise ImportDataError(f"{where}: the coordinates must be finite numbers")
            coords[i] = xy
            with_coords = with_coords or line
        elif k > 0:
            without = without or line
        counts[i] = k
        line_of[i] = line
    missing = np.flatnonzero(line_of == 0)
    if len(missing):
        raise ImportDataError(f"--labels {path} has no row for {len(missing)} of the {n} images, e.g. "
                              f"{names[missing[0]]!r}: label every image, or import without --labels")
    if with_coords and without:
        raise ImportDataError(f"{path}:{without} gives no coordinates for its objects but line {with_coords} does: "
                              "give every row its objects' centres, or none")
    centres = None
    if with_coords:
        kmax = int(counts.max())
        centres = np.full((n, kmax, 2), np.nan)
        for i, xy in enumerate(coords):
            if xy is not None and len(xy):
                centres[i, : len(xy)] = xy
    return _Labels(counts, centres, line_of, lambda i: f"{path}:{int(line_of[i])}")


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _array_labels(counts, centres, n: int, src: str, keys: dict) -> _Labels:
    ck = keys.get("counts")
    counts = np.asarray(counts)
    if counts.shape != (n,):
        raise ImportDataError(f"{src}[{ck!r}]: shape {counts.shape}, expected ({n},) — one count per image")
    if counts.dtype.kind == "f":
        if not np.isfinite(counts).all() or (counts != np.round(counts)).any():
            i = int(np.flatnonzero(~np.isfinite(counts) | (counts != np.round(counts)))[0])
            raise ImportDataError(f"{src}[{ck!r}]: count {counts[i]} of image {i} is not a whole number")
    elif counts.dtype.kind not in "iub":
        raise ImportDataError(f"{src}[{ck!r}]: dtype {counts.dtype}, expected integers")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        i = int(np.flatnonzero(counts < 0)[0])
        raise ImportDataError(f"{src}[{ck!r}]: image {i} has the count {counts[i]}; counts must be >= 0")
    cen = None
    if centres is not None:
        zk = keys.get("centres")
        centres = np.asarray(centres)
        if centres.ndim != 3 or centres.shape[0] != n or centres.shape[2] != 2 or centres.dtype.kind not in "iuf":
            raise ImportDataError(f"{src}[{zk!r}]: shape {centres.shape} {centres.dtype}, expected [{n}, K, 2] "
                                  "numbers (row, col), −1 padded")
        if centres.shape[1] < counts.max(initial=0):
            i = int(np.argmax(counts))
            raise ImportDataError(f"{src}[{zk!r}]: room for {centres.shape[1]} objects per image, but image {i} "
                                  f"counts {counts[i]}")
        kmax = int(counts.max(initial=0))
        cen = np.full((n, kmax, 2), np.nan)
        present = np.arange(kmax)[None, :] < counts[:, None]
        vals = centres[:, :kmax].astype(np.float64)
        if not np.isfinite(vals[present]).all():
            i = int(np.argwhere(present & ~np.isfinite(vals).all(axis=-1))[0, 0])
            raise ImportDataError(f"{src}[{zk!r}]: image {i} has a centre that is not a finite number")
        cen[present] = vals[present]
    return _Labels(counts, cen, np.arange(n), lambda i: f"{src} image {i}")


def _place_centres(labels: _Labels, sizes: np.ndarray, canvas, crop: bool, resize: bool,
                   names) -> Optional[np.ndarray]:
    """The labelled centres on the stored canvas (after --crop / --resize), rounded to the pixel;
    int64 [N, K, 2], −1 padded. Refuses a centre outside its image."""
    if labels.centres is None:
        return None
    cen = labels.centres.copy()
    h, w = canvas
    present = ~np.isnan(cen[..., 0])
    src_h, src_w = sizes[:, 0].astype(np.float64)[:, None], sizes[:, 1].astype(np.float64)[:, None]
    outside = present & ((cen[..., 0] < -0.5) | (cen[..., 1] < -0.5) | (cen[..., 0] >= src_h - 0.5)
                         | (cen[..., 1] >= src_w - 0.5))
    if outside.any():
        i, j = np.argwhere(outside)[0]
        raise ImportDataError(f"{labels.describe(i)}: object {j + 1} of {names[i]!r} at ({cen[i, j, 0]:g}, "
                              f"{cen[i, j, 1]:g}) lies outside the {int(sizes[i, 0])}×{int(sizes[i, 1])} image")
    if crop:
        cen[..., 0] -= ((sizes[:, 0] - h) // 2)[:, None]
        cen[..., 1] -= ((sizes[:, 1] - w) // 2)[:, None]
    elif resize:
        # The pixel that holds the centre point after scaling (pixel centres at +0.5).
        cen[..., 0] = (cen[..., 0] + 0.5) * (h / src_h) - 0.5
        cen[..., 1] = (cen[..., 1] + 0.5) * (w / src_w) - 0.5
    out = np.floor(np.where(present[..., None], cen, -1) + 0.5).astype(np.int64)
    out[~present] = -1
    lost = present & ((out[..., 0] < 0) | (out[..., 1] < 0) | (out[..., 0] >= h) | (out[..., 1] >= w))
    if lost.any():
        i, j = np.argwhere(lost)[0]
        raise ImportDataError(f"{labels.describe(i)}: object {j + 1} of {names[i]!r} at "
                              f"({labels.centres[i, j, 0]:g}, {labels.centres[i, j, 1]:g}) falls outside the {h}×{w} "
                              "crop; crop less or fix the label")
    return out


# ---------------------------------------------------------------------------------------------
# Pixels


class _Convert:
    """Per image: _Image → uint8 [C, H, W] levels (0..255), steps 2–6 of the module docstring."""

    def __init__(self, channels: int, canvas, crop: bool, resize: bool, threshold: Optional[float], invert: bool):
        self.c, self.canvas, self.crop, self.resize = channels, canvas, crop, resize
        self.threshold, self.invert = threshold, invert
        self.alpha_seen = self.deep_seen = 0

    def __call__(self, img: _Image) -> np.ndarray:
        a, cs = img.data, img.data.shape[-1]
        h, w = self.canvas
        alpha = cs in (2, 4)
        self.alpha_seen += alpha
        self.deep_seen += img.scale == 65535.0
        plain = (a.dtype == np.uint8 and img.scale == 255.0 and cs == self.c and not self.invert
                 and self.threshold is None and not self.resize and a.shape[:2] == (h, w))
        if plain:  # the usual 8-bit image: its bytes are the stored levels, nothing to compute
            return a.transpose(2, 0, 1)
        v = a.astype(np.float32)
        if img.scale != 1.0:
            v /= np.float32(img.scale)
        if alpha:
            col, al = v[..., :-1], v[..., -1:]
            v = al * (1.0 - col) if self.invert else al * col
        elif self.invert:
            v = 1.0 - v
        if v.shape[-1] == 3 and self.c == 1:
            v = v @ np.array([[0.299], [0.587], [0.114]], np.float32)
        elif v.shape[-1] == 1 and self.c == 3:
            v = np.repeat(v, 3, axis=-1)
        v = v.transpose(2, 0, 1)
        if self.crop:
            top, left = (v.shape[1] - h) // 2, (v.shape[2] - w) // 2
            v = v[:, top:top + h, left:left + w]
        elif self.resize and v.shape[1:] != (h, w):
            import torch

            t = torch.from_numpy(np.ascontiguousarray(v))[None]
            v = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False,
                                                antialias=True)[0].clamp_(0, 1).numpy()
        if self.threshold is not None:
            return np.where(v >= self.threshold, np.uint8(255), np.uint8(0))
        return np.rint(v * 255.0).astype(np.uint8)


def _bar(it, progress: bool, desc: str, total: Optional[int] = None):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="img", total=total, dynamic_ncols=True, mininterval=0.5)


# ---------------------------------------------------------------------------------------------
# The assumptions checked


def _describe_problem(p: dict, names: Sequence[str], levels: np.ndarray, n_checked: int, invert: bool,
                      mode: str) -> str:
    """What a problem of :func:`analysis.background_problems` means, the images named, and the fix
    (``mode`` "refuse"), or that it is tolerated (a few odd images) or ignored (the check is off)."""
    k = len(p["images"])
    eg = ", ".join(f"{names[i]!r}" + (f" (median {levels[i]:.2f})" if p["rule"] != "cluttered" else "")
                   for i in p["images"][:3])
    head = f"{k} of {n_checked} images checked ({k / n_checked:.1%}) {p['why']}, e.g. {eg}"
    if mode == "tolerate":
        return f"{head}: tolerated (up to {analysis.TOLERATED_SHARE:.0%} of a set may be), but look at them"
    if mode == "ignored":
        return f"{head}: imported anyway (--no-background-check); the model will spend sprites on the background"
    if p["rule"] == "bright":
        fix = ("The images were inverted (--invert): their own background is dark; drop --invert" if invert else
               "If the objects are dark on a light background, pass --invert")
    elif p["rule"] == "not dark":
        fix = "Crop or mask the background away, or binarise above it with --threshold T (T above the background level)"
    else:
        fix = ("Binarise above the noise with --threshold T, or pass --max-objects K if the scenes really hold that "
               "many objects")
    return (f"{head}. LAVAE adds sprites onto a dark, empty background (λ = ε + Σ sprites), which these images "
            f"do not have. {fix}. (--no-background-check imports them anyway.)")


def _check_assumptions(levels, objects, sample_levels, max_objects, refuse_share):
    """Problems (:func:`analysis.background_problems`): the level rules over ``levels`` (every image
    given), the clutter rule over ``objects`` found in a sample (of levels ``sample_levels``). A
    list of (problem, refuse?, images checked); a cluttered problem's indices are the sample's."""
    out = []
    for p in analysis.background_problems(levels, None, max_objects):
        out.append((p, len(p["images"]) > refuse_share * len(levels), len(levels)))
    for p in analysis.background_problems(sample_levels, objects, max_objects):
        if p["rule"] == "cluttered":
            out.append((p, len(p["images"]) > refuse_share * len(sample_levels), len(sample_levels)))
    return out


# ---------------------------------------------------------------------------------------------
# The import


def import_images(
    src,
    out,
    *,
    channels: Optional[int] = None,
    labels: Optional[str] = None,
    images_key: Optional[str] = None,
    counts_key: Optional[str] = None,
    centres_key: Optional[str] = None,
    layout: Optional[str] = None,
    resize=None,
    crop=None,
    threshold: Optional[float] = None,
    invert: bool = False,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    sprite_size: Optional[int] = None,
    split: Sequence[float] = DEFAULT_SPLIT,
    seed: int = 0,
    name: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    check_background: bool = True,
    warn: Callable[[str], None] = _default_warn,
) -> dict:
    """Import ``src`` (a folder of PNG / JPEG images, a .npy / .npz array or an HDF5 file) as the
    data set directory ``out``; returns its meta.json content. See the module docstring for what
    happens to the pixels and the labels, and :func:`lavae_fast.data.analysis.background_problems`
    for the checks. Raises :class:`ImportDataError` (a ValueError) naming the file, row or value
    for input it cannot import; nothing is left in ``out`` then (an existing set there is kept).
    """
    src = os.fspath(src)
    out = os.fspath(out)
    split = parse_split(split)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    if threshold is not None and not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold: expected a value in [0, 1], got {threshold!r}")
    if isinstance(max_objects, bool) or not isinstance(max_objects, (int, np.integer)) or \
            not 1 <= max_objects <= MAX_OBJECTS_LIMIT:
        raise ValueError(f"max_objects: expected an integer in 1..{MAX_OBJECTS_LIMIT}, got {max_objects!r}")
    if sprite_size is not None and (isinstance(sprite_size, bool) or not isinstance(sprite_size, (int, np.integer))
                                    or sprite_size < 1 or sprite_size % 2 == 0 or sprite_size > MAX_SPRITE_SIZE):
        raise ValueError(f"sprite_size: expected an odd integer in 1..{MAX_SPRITE_SIZE} (the sprite's centre pixel "
                         f"lands on the object's location), got {sprite_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    if resize is not None and crop is not None:
        raise ValueError("resize and crop: pass one of them, not both")
    if layout is not None and layout.lower() not in ("nhwc", "nchw"):
        raise ValueError(f"layout: expected nhwc or nchw, got {layout!r}")
    geometry = parse_canvas(resize) if resize is not None else parse_canvas(crop) if crop is not None else None
    if not os.path.exists(src):
        raise ImportDataError(f"{src} does not exist")
    if labels is not None and not os.path.isfile(labels):
        raise ImportDataError(f"--labels {labels} does not exist")
    abs_out = os.path.realpath(out)
    if os.path.isdir(src) and (abs_out + os.sep).startswith(os.path.realpath(src) + os.sep):
        raise ImportDataError(f"--out {out} lies inside the source folder {src}: choose a folder outside it")

    closer = lambda: None  # noqa: E731
    try:
        if os.path.isdir(src):
            source = _FolderSource(src, skip=[labels] if labels else [])
            array_counts = array_centres = None
            keys_used: dict = {}
            src_type = "folder"
        else:
            ext = os.path.splitext(src)[1].lower()
            if ext not in ARRAY_EXTENSIONS + HDF5_EXTENSIONS:
                raise ImportDataError(f"{src}: expected a folder of PNG / JPEG images, a .npy / .npz array or an "
                                      f"HDF5 file ({', '.join(HDF5_EXTENSIONS)})")
            source, array_counts, array_centres, keys_used, closer = _open_arrays(
                src, images_key, counts_key, centres_key, layout)
            src_type = "hdf5" if ext in HDF5_EXTENSIONS else ext[1:]
        if src_type == "folder" and (images_key or counts_key or centres_key or layout):
            raise ImportDataError("--images-key, --counts-key, --centres-key and --layout apply to array sources, "
                                  f"not to the folder {src}")
        if labels and (array_counts is not None):
            raise ImportDataError(f"--labels {labels} and the counts in {src}: give the labels one way")
        return _import(source, src, src_type, out, keys_used, array_counts, array_centres, channels=channels,
                       labels=labels, geometry=geometry, crop=crop is not None, resize=resize is not None,
                       threshold=None if threshold is None else float(threshold), invert=invert,
                       max_objects=int(max_objects), sprite_size=sprite_size, split=split, seed=int(seed),
                       name=name, overwrite=overwrite, progress=progress, check_background=check_background,
                       warn=warn)
    finally:
        closer()


class _Plan:
    """Which split each source image goes to, and where: a seeded permutation of the N images, cut
    into train, val and test in that order. A split is stored in permutation order, so its first
    images are a random sample (``head``, ``n_eval``, the checks below take them)."""

    def __init__(self, n: int, fractions, seed: int):
        self.sizes = split_sizes(n, fractions)
        self.order = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed))).permutation(n)
        bounds = np.cumsum([0] + [self.sizes[s] for s in SPLIT_NAMES])
        self.members = {s: self.order[bounds[k]:bounds[k + 1]] for k, s in enumerate(SPLIT_NAMES)}
        self.split_of = np.empty(n, np.int64)  # index into SPLIT_NAMES
        self.pos_of = np.empty(n, np.int64)  # row within the split
        for k, s in enumerate(SPLIT_NAMES):
            self.split_of[self.members[s]] = k
            self.pos_of[self.members[s]] = np.arange(len(self.members[s]))


def _resolve_channels(channels, colour, modes, names) -> int:
    """--channels, or the channels every image has (grey and colour mixed are refused)."""
    if channels is not None:
        return channels
    odd = np.flatnonzero(colour != colour[0])
    if len(odd):
        i = odd[0]
        kind = lambda j: f"{'colour' if colour[j] else 'grey'} ({modes[j]})"  # noqa: E731
        raise ImportDataError(f"grey and colour images mixed: {names[i]!r} is {kind(i)} but {names[0]!r}, the first, "
                              f"is {kind(0)}; pass --channels 3 to read every image as colour, or --channels 1 to "
                              "turn colour into grey")
    return 3 if colour[0] else 1


def _resolve_canvas(sizes, names, geometry, crop) -> Tuple[int, int]:
    """The stored H×W: the images' one size, or --crop / --resize's (a crop larger than an image is refused)."""
    if geometry is None:
        odd = np.flatnonzero((sizes != sizes[0]).any(axis=1))
        if len(odd):
            i = odd[0]
            raise ImportDataError(f"images of different sizes: {names[i]!r} is {sizes[i, 0]}×{sizes[i, 1]} (H×W) but "
                                  f"{names[0]!r}, the first, is {sizes[0, 0]}×{sizes[0, 1]}; pass --resize HxW or "
                                  "--crop HxW to bring them to one size")
        return int(sizes[0, 0]), int(sizes[0, 1])
    if crop:
        small = np.flatnonzero((sizes[:, 0] < geometry[0]) | (sizes[:, 1] < geometry[1]))
        if len(small):
            i = small[0]
            raise ImportDataError(f"--crop {geometry[0]}x{geometry[1]}: {names[i]!r} is only {sizes[i, 0]}×"
                                  f"{sizes[i, 1]} (H×W); crop smaller or --resize")
    return geometry


def _resolve_labels(labels, array_counts, array_centres, names, src, src_type, keys_used, max_objects, sizes,
                    canvas, crop, resize):
    """(_Labels or None, centres int64 [N, K, 2] on the stored canvas or None)."""
    n = len(names)
    if labels:
        lab = _read_label_csv(labels, names if src_type == "folder" else [str(i) for i in range(n)],
                              is_array=src_type != "folder")
    elif array_counts is not None:
        lab = _array_labels(array_counts, array_centres, n, src, keys_used)
    else:
        return None, None
    over = np.flatnonzero(lab.counts > max_objects)
    if len(over):
        most = lab.counts[over].max()
        raise ImportDataError(f"{lab.describe(over[0])}: {names[over[0]]!r} has {lab.counts[over[0]]} objects, more "
                              f"than --max-objects {max_objects} (M, the most objects the model counts in an image; "
                              f"{len(over)} image(s) have more, up to {most}); pass --max-objects {most}")
    return lab, _place_centres(lab, sizes, canvas, crop, resize, names)


def _probe(source, plan: _Plan, convert: _Convert, names, max_objects: int, invert: bool, src: str) -> None:
    """Check PROBE random images before anything is written: a set that clearly breaks the model's
    assumptions (a white background, say) is refused in a second, before the whole source is read."""
    probe = np.sort(plan.order[:PROBE])
    imgs = np.stack([convert(source.peek(int(i))) for i in probe])
    lv = analysis.background_levels(imgs)
    objs = analysis.find_objects(imgs, lv)
    for p, bad, _ in _check_assumptions(lv, objs, lv, max_objects, PROBE_REFUSE_SHARE):
        if bad:
            raise ImportDataError(f"{src}: " + _describe_problem(p, [names[i] for i in probe], lv, len(probe), invert,
                                                                 "refuse"))
    convert.alpha_seen = convert.deep_seen = 0  # counted in the whole pass


def _read_all(source, writer, plan: _Plan, convert: _Convert, channels: int, canvas, progress: bool):
    """Convert every image into its split's working array (uint8 levels [n, C, H, W], memory-mapped
    in the set's folder). Returns (working arrays by split, background levels [N], haze [N] (nats),
    whether every value is 0 or 1)."""
    n = len(source)
    h, w = canvas
    work = {s: writer.open_array(f"{s}.unpacked.npy", (plan.sizes[s], channels, h, w), np.uint8) for s in SPLIT_NAMES}
    levels = np.zeros(n, np.float64)
    haze = np.zeros(n, np.float64)
    binary = True
    buf = np.empty((CHUNK, channels, h, w), np.uint8)
    bar = _bar(None, progress, "import", total=n) if progress else None
    try:
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            for i in range(start, stop):
                buf[i - start] = convert(source.read(i))
            chunk = buf[: stop - start]
            binary = binary and bool(((chunk == 0) | (chunk == 255)).all())
            levels[start:stop] = lv = analysis.background_levels(chunk)
            haze[start:stop] = analysis.haze_cost(chunk, lv)
            for k, s in enumerate(SPLIT_NAMES):
                sel = np.flatnonzero(plan.split_of[start:stop] == k)
                if len(sel):
                    work[s][plan.pos_of[start + sel]] = chunk[sel]
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
    return work, levels, haze, binary


def _assess(work, plan: _Plan, levels, haze, lab, canvas, channels, names, max_objects, invert, check, src, note):
    """The model's assumptions over the whole set (background levels) and a sample (objects):
    refuse (ImportDataError) or warn (``note``). Returns (the sample's source indices, its objects'
    sprite-size suggestion or None, the share of sampled images whose components match the labels)."""
    h, w = canvas
    sample_src = plan.order[:CHECK_SAMPLE]
    sample = np.empty((len(sample_src), channels, h, w), np.uint8)
    for k, s in enumerate(SPLIT_NAMES):
        sel = np.flatnonzero(plan.split_of[sample_src] == k)
        if len(sel):
            sample[sel] = work[s][plan.pos_of[sample_src[sel]]]
    objects = analysis.find_objects(sample, levels[sample_src])
    for p, bad, n_checked in _check_assumptions(levels, objects, levels[sample_src], max_objects,
                                                analysis.TOLERATED_SHARE):
        if p["rule"] == "cluttered":  # its indices are the sample's
            p = dict(p, images=sample_src[p["images"]])
        mode = ("refuse" if check else "ignored") if bad else "tolerate"
        msg = _describe_problem(p, names, levels, n_checked, invert, mode)
        if mode == "refuse":
            raise ImportDataError(f"{src}: {msg}")
        note(msg)
    med_haze = float(np.median(haze))
    if med_haze > HAZE_WARN_NATS:
        note(f"the background is not quite empty: on the median image the pixels outside the objects add up to "
             f"{med_haze / analysis.NEG_LOG_EPS:.1f} (in units of a fully lit pixel), which costs the model "
             f"~{med_haze:.0f} nats per image wherever it draws nothing (λ = ε there); binarise with --threshold T "
             "to clear it")
    if lab is None:
        many = objects["per_image"] > max_objects
        if many.mean() > analysis.TOLERATED_SHARE:
            note(f"{many.mean():.1%} of the {len(sample_src)} images checked show more than --max-objects "
                 f"{max_objects} separate objects (ink components; up to {objects['per_image'].max()}); if they "
                 "are objects, pass --max-objects K")
    sample_counts = lab.counts[sample_src] if lab is not None else None
    suggestion = analysis.suggest_sprite_size(objects, canvas, sample_counts)
    if suggestion is None:
        note("no objects were found in the images checked: no sprite size can be suggested")
    agreement = None
    if lab is not None:
        agreement = float((objects["per_image"] == sample_counts).mean())
        if agreement < 0.5:
            note(f"the labelled counts match the separate ink components in only {agreement:.0%} of the images "
                 "checked: check that the labels belong to these images (or the objects touch or fall apart)")
    return sample_src, suggestion, agreement


def _store(writer, work, plan: _Plan, binary: bool, lab, centres, channels: int, canvas) -> Dict[str, dict]:
    """Write every split's files (images bit-packed when ``binary``); returns meta["splits"]."""
    h, w = canvas
    n = len(plan.order)
    counts_all = lab.counts if lab is not None else np.full(n, -1, np.int64)
    kmax = 0 if lab is None else int(lab.counts.max(initial=0))
    splits = {}
    for s in SPLIT_NAMES:
        files = {}
        if binary:
            packed = writer.open_array(f"{s}.images.npy", (plan.sizes[s], channels, h, (w + 7) // 8), np.uint8)
            for a in range(0, plan.sizes[s], 4096):
                packed[a:a + 4096] = np.packbits(work[s][a:a + 4096] >> 7, axis=-1)
            files["images"] = writer.close_array(f"{s}.images.npy")
            writer.drop_array(f"{s}.unpacked.npy")
        else:
            files["images"] = writer.close_array(f"{s}.unpacked.npy", final=f"{s}.images.npy")
        members = plan.members[s]
        cnt = counts_all[members]
        cen = centres[members] if centres is not None else np.full((len(members), kmax, 2), -1, np.int64)
        files["counts"] = writer.write_array(f"{s}.counts", cnt.astype(np.int16))
        files["centres"] = writer.write_array(f"{s}.centres", cen.astype(np.int32))
        files["boxes"] = writer.write_array(f"{s}.boxes", np.full((len(members), kmax, 4), -1, np.int32))
        files["source_index"] = writer.write_array(f"{s}.source_index", members.astype(np.int32))
        labelled = lab is not None and len(members) > 0
        hist = np.bincount(cnt, minlength=kmax + 1) if labelled else np.zeros(0, np.int64)
        splits[s] = {
            "n": int(len(members)),
            "min_objects": int(cnt.min()) if labelled else None,
            "max_objects": int(cnt.max()) if labelled else None,
            "max_count": kmax,
            "count_histogram": {str(c): int(v) for c, v in enumerate(hist) if v},
            "files": files,
        }
    return splits


def _import(source, src, src_type, out, keys_used, array_counts, array_centres, *, channels, labels, geometry, crop,
            resize, threshold, invert, max_objects, sprite_size, split, seed, name, overwrite, progress,
            check_background, warn) -> dict:
    # Everything that can be checked without the pixels is checked before anything is written.
    n = len(source)
    names = [source.name(i) for i in range(n)]
    sizes, colour, modes = source.headers(progress and src_type == "folder" and n >= 2000)
    channels = _resolve_channels(channels, colour, modes, names)
    canvas = _resolve_canvas(sizes, names, geometry, crop)
    h, w = canvas
    if sprite_size is not None and sprite_size > min(h, w):
        raise ImportDataError(f"--sprite-size {sprite_size} is larger than the {h}×{w} canvas")
    lab, centres = _resolve_labels(labels, array_counts, array_centres, names, src, src_type, keys_used, max_objects,
                                   sizes, canvas, crop, resize)
    plan = _Plan(n, split, seed)
    convert = _Convert(channels, canvas, crop, resize, threshold, invert)
    if check_background:
        _probe(source, plan, convert, names, max_objects, invert, src)

    meta_warnings: List[str] = []

    def note(msg: str) -> None:
        meta_warnings.append(msg)
        warn(msg)

    with storage.writing_set(out, overwrite) as writer:
        work, levels, haze, binary = _read_all(source, writer, plan, convert, channels, canvas, progress)
        sample_src, suggestion, agreement = _assess(work, plan, levels, haze, lab, canvas, channels, names,
                                                    max_objects, invert, check_background, src, note)
        splits = _store(writer, work, plan, binary, lab, centres, channels, canvas)
        del work
        if src_type == "folder":
            writer.write_array("source_names", np.asarray(names, dtype=str))
        if sprite_size is not None and suggestion is not None and abs(sprite_size - suggestion["sprite_size"]) > 2:
            note(f"--sprite-size {sprite_size} differs from the {suggestion['sprite_size']} the objects' extents "
                 f"suggest (95% of them span at most {suggestion['extent_p95']} px)")
        s_final = sprite_size if sprite_size is not None else (suggestion["sprite_size"] if suggestion else None)
        meta = {
            "dataset": IMPORTED,
            "kind": IMPORTED,
            "name": name or os.path.basename(os.path.abspath(out)),
            "format": storage.FORMAT_IMPORTED,
            "source": {
                "type": src_type,
                "path": os.path.abspath(src),
                "images": n,
                **({"keys": keys_used} if keys_used else {}),
                **({"layout": source.layout, "dtype": str(source.dtype)} if src_type != "folder" else {}),
                "modes": {m: int(c) for m, c in zip(*np.unique(np.asarray(modes), return_counts=True))},
                "sizes": {f"{a}x{b}": int(c) for (a, b), c in zip(*np.unique(sizes, axis=0, return_counts=True))},
            },
            "labels_source": (None if lab is None else {"type": "csv", "path": os.path.abspath(labels)} if labels
                              else {"type": "arrays", "counts": keys_used.get("counts"),
                                    "centres": keys_used.get("centres")}),
            "channels": channels,
            "height": h,
            "width": w,
            "values": "binary" if binary else "grey",
            "bitpacked": binary,
            "bitorder": "big",
            "conversion": {
                "threshold": threshold,
                "invert": bool(invert),
                "resize": list(canvas) if resize else None,
                "crop": list(canvas) if crop else None,
                "alpha_images": int(convert.alpha_seen),
                "alpha": "colour × alpha: transparent pixels are empty background (0), with --invert too",
                "sixteen_bit_images": int(convert.deep_seen),
                "grey_levels": "byte / 255 (8-bit sources exact; 16-bit and float sources rounded)",
            },
            "annotations": "none" if lab is None else ("centres" if centres is not None else "counts"),
            "labels": [],
            "max_objects": max_objects,
            "sprite_size": s_final,
            "sprite_size_origin": None if s_final is None else ("given" if sprite_size is not None else "suggested"),
            "objects": None if suggestion is None else dict(suggestion, label_agreement=agreement,
                                                            images_checked=int(len(sample_src))),
            "background": {
                "checked": bool(check_background),
                "level_median": float(np.median(levels)),
                "level_max": float(levels.max()),
                "haze_nats_median": float(np.median(haze)),
                "rules": {"dark": analysis.DARK, "bright": analysis.BRIGHT, "ink_delta": analysis.INK_DELTA,
                          "tolerated_share": analysis.TOLERATED_SHARE,
                          "clutter_per_object": analysis.CLUTTER_PER_OBJECT},
            },
            "warnings": meta_warnings,
            "split": {"seed": seed, "fractions": list(split), "sizes": plan.sizes},
            "splits": splits,
        }
        if src_type == "folder":
            meta["source_names_file"] = "source_names.npy"
        writer.write_meta(meta)
        return storage.read_meta(writer.dir)


IMPORTED = "imported"  # meta["dataset"] of every imported set; meta["name"] is the user's
HAZE_WARN_NATS = 10.0  # a fifth of the paper's whole bound per image (~40–60 nats)
