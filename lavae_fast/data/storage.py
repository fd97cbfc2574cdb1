"""On-disk format of a data set directory, written atomically and checked when read.

Layout of ``DIR`` (one directory per data set)::

    meta.json                 generation parameters, per split: n, count histogram, and for every
                              file its shape, dtype, size in bytes and SHA-256
    {split}.images.npy        uint8 [N, C, H, ceil(W/8)]: the binary images bit-packed along W
                              (numpy ``packbits``, big bit order, zero padding)
    {split}.counts.npy        int16 [N]
    {split}.centres.npy       int32 [N, K, 2] patch centre (row, col), −1 padded
    {split}.boxes.npy         int32 [N, K, 4] tight box (r0, c0, r1, c1), half-open, −1 padded
    {split}.{label}.npy       int32 [N, K] per-object labels, −1 padded
    pool_source_indices.npy   multi-MNIST only: the MNIST training indices of the digit pool

Imported sets (``python -m lavae_fast.data import``, :mod:`.importer`) have the splits train, val
and test, format ``lavae_fast.data/2``, and differ only in what /1 could not say:

    {split}.images.npy        as above when ``meta["values"] == "binary"`` (``bitpacked`` true);
                              uint8 [N, C, H, W] grey levels when ``"grey"`` (value = byte / 255)
    {split}.counts.npy        int16 [N]; −1 for every image when ``annotations`` is "none"
    {split}.centres.npy       int32 [N, K, 2]; all −1 unless ``annotations`` is "centres"
                              (K = 0 for an unlabelled set)
    {split}.boxes.npy         int32 [N, K, 4], all −1 (an import has no boxes)
    {split}.source_index.npy  int32 [N]: each image's position in the source (sorted file name
                              order of a folder, the row of an array)
    source_names.npy          unicode [S]: a folder's image file names, in source order

Format /1 (the generated sets) is unchanged; the loader reads both, and an older loader refuses
a /2 set by its format rather than misreading grey levels as bits or −1 as a count.

All ``.npy`` files can be memory-mapped. Each is written under a temporary name
(``NAME.tmp-PID``) and renamed with ``os.replace``; ``meta.json`` is written last, so an
interrupted run leaves a directory the loader refuses rather than half-written files it would
read. Regenerating over an existing set (``overwrite``) writes the new set into a directory beside
it and swaps the two only when the new one is complete (:func:`lavae_fast.data.generate`).

``meta.json`` carries ``meta_sha256``, a digest of its own content, so an edited meta.json (a
different width, say, which would crop the packed images) is refused; sets written before it
existed load without that check. :func:`fingerprint` identifies a set by its contents (the
files' SHA-256), whatever path it is reached by.

Disk space for the memory-mapped images is reserved up front (``posix_fallocate``), so a full
disk is an ``OSError`` naming the file, not a SIGBUS from a write into a mapping past its end.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .._io import atomic_write
from .._process import pid_alive

__all__ = ["FORMAT", "FORMAT_IMPORTED", "READABLE_FORMATS", "DataFormatError", "DatasetWriter", "read_meta",
           "load_split", "file_sha256",
           "remove_stale_temporaries", "fingerprint", "meta_digest", "is_generator_file", "staging_dir",
           "swap_in", "remove_stale_staging", "writing_set", "ANNOTATIONS"]

FORMAT = "lavae_fast.data/1"
FORMAT_IMPORTED = "lavae_fast.data/2"
READABLE_FORMATS = (FORMAT, FORMAT_IMPORTED)
META = "meta.json"
# What an imported set's labels say: nothing (counts −1), the counts, or counts and centres.
# A generated set has counts and centres (and boxes and per-object labels).
ANNOTATIONS = ("none", "counts", "centres")
_STORED_DTYPES = {"images": np.uint8, "counts": np.int16, "centres": np.int32, "boxes": np.int32}
_LABEL_DTYPE = np.int32


class DataFormatError(ValueError):
    """A data set directory or one of its files is missing, truncated or inconsistent."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


# The names the generator writes (see the module docstring); temporaries are these plus .tmp-PID.
# Cleanup matches only these, never a user's own "results.tmp-4000000".
_DATA_FILE_RE = re.compile(r"^(?:(?:train|val|test|test7)\.[a-z_]+\.npy|(?:pool_source_indices|source_names)\.npy"
                           r"|meta\.json)$")
_TMP_RE = re.compile(r"^((?:train|val|test|test7)\.[a-z_]+\.npy|(?:pool_source_indices|source_names)\.npy"
                     r"|meta\.json)\.tmp-(\d+)$")


def is_generator_file(name: str) -> bool:
    """True for the names the data set writer creates (its files and their temporaries)."""
    return bool(_DATA_FILE_RE.match(name) or _TMP_RE.match(name))


def remove_stale_temporaries(out_dir: str) -> List[str]:
    """Delete the temporary files (``NAME.tmp-PID``, NAME one the writer writes) that a killed
    writer left in ``out_dir``; files of a writer that is still running, and any file whose name
    the writer would not have chosen, are left alone. Returns the names removed."""
    removed = []
    if not os.path.isdir(out_dir):
        return removed
    for name in os.listdir(out_dir):
        m = _TMP_RE.match(name)
        if m and not pid_alive(int(m.group(2))):
            try:
                os.remove(os.path.join(out_dir, name))
                removed.append(name)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
    return removed


def _full_disk_hint(exc: OSError, path: str) -> str:
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = f" ({shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        return f"not enough disk space for {path}{free}: {exc.strerror or exc}; free some space or choose another --out"
    return f"could not write {path}: {exc}"


def _disk_error(path: str):
    """atomic_write's ``write_error`` for the files of a set: an OSError says what failed, and how
    much room is left when the disk is full."""
    return lambda exc: OSError(exc.errno, _full_disk_hint(exc, path)) if isinstance(exc, OSError) else None


def _atomic_save(path: str, array: np.ndarray) -> None:
    with atomic_write(path, "wb", tmp=_tmp_name(path), write_error=_disk_error(path)) as f:
        np.save(f, array, allow_pickle=False)


def _reserve(path: str, shown: str) -> None:
    """Allocate the disk blocks of a (sparse) file now. A memory-mapped write into a block the
    disk cannot supply is a SIGBUS that kills the process; an allocation that fails here is an
    OSError the caller reports."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: no reservation, a full disk may still SIGBUS
        return
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return  # the file system cannot reserve; nothing more we can do
        raise OSError(exc.errno, _full_disk_hint(exc, shown)) from exc
    finally:
        os.close(fd)


def meta_digest(meta: dict) -> str:
    """SHA-256 of a meta.json's content without its own ``meta_sha256`` entry (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(meta: dict) -> str:
    """The identity of a data set's contents: a digest of its shape-defining fields and of every
    stored file's SHA-256 (not of its path, nor of where the generator found MNIST)."""
    ident = {k: meta.get(k) for k in ("format", "dataset", "channels", "height", "width", "labels")}
    ident["files"] = {split: {k: f.get("sha256") for k, f in sorted(info.get("files", {}).items())}
                      for split, info in sorted(meta.get("splits", {}).items())}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Replacing a data set: the new one is written beside the old one and swapped in last.


def staging_dir(out_dir: str) -> str:
    """Where a replacement for the set in ``out_dir`` is written: a hidden sibling directory (same
    file system, so the final swap is a rename)."""
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.new-{os.getpid()}")


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is
    not available (another OS, an old glibc, a file system without it)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def _discard_old(old: str, out_dir: str) -> None:
    """Move the entries of a replaced set's directory that the generator did not write (a user's
    own files) into ``out_dir``; delete the rest and the directory."""
    for name in os.listdir(old):
        src = os.path.join(old, name)
        if is_generator_file(name):
            if os.path.isfile(src) or os.path.islink(src):
                os.remove(src)
        elif not os.path.lexists(os.path.join(out_dir, name)):
            os.rename(src, os.path.join(out_dir, name))
    try:
        os.rmdir(old)
    except OSError:  # something we would not delete is left: say where it is
        import warnings

        warnings.warn(f"kept {old}: it holds files that are not part of the data set", RuntimeWarning, stacklevel=3)


def swap_in(staged: str, out_dir: str) -> None:
    """Make the complete set in ``staged`` the set of ``out_dir``, then remove the old one.

    On Linux the two directories are exchanged in one atomic step, so at every moment ``out_dir``
    holds a complete set (the old or the new). Elsewhere it takes two renames, and a kill between
    them leaves the old set in ``.NAME.old-PID`` beside ``out_dir`` (never deleted automatically
    unless ``out_dir`` holds a complete set again)."""
    if _rename_exchange(staged, out_dir):
        old = staged
    else:
        old = os.path.join(os.path.dirname(os.path.abspath(out_dir)),
                           f".{os.path.basename(os.path.abspath(out_dir))}.old-{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(staged, out_dir)
    _discard_old(old, out_dir)


_STAGING_RE = re.compile(r"^\.(.+)\.(new|old)-(\d+)$")


def remove_stale_staging(out_dir: str) -> List[str]:
    """Remove the staging directories (``.NAME.new-PID`` / ``.NAME.old-PID``) that a killed
    replacement of ``out_dir`` left beside it: only the generator's own files in them are deleted
    (a user's files are moved into ``out_dir``), and an ``.old`` one only while ``out_dir`` holds a
    complete set. Returns the directories removed."""
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _STAGING_RE.match(name)
        if not m or m.group(1) != base or pid_alive(int(m.group(3))):
            continue
        path = os.path.join(parent, name)
        if not os.path.isdir(path):
            continue
        if m.group(2) == "old" and not os.path.isfile(os.path.join(out_dir, META)):
            continue  # possibly the only copy of a set: leave it to the user
        _discard_old(path, out_dir) if os.path.isdir(out_dir) else None
        if not os.path.exists(path):
            removed.append(path)
    return removed


@contextlib.contextmanager
def writing_set(out_dir, overwrite: bool = False) -> Iterator["DatasetWriter"]:
    """``with writing_set(out_dir) as writer:`` write a whole set (its meta.json last), all or
    nothing: a fresh ``out_dir`` gets the set directly, and any exception in the block (an
    interruption, a full disk, a check that fails half-way) removes everything written; an
    existing set (``overwrite``) is replaced only by a complete new one, written beside it and
    swapped in when the block ends (:func:`swap_in`), the old set unchanged otherwise."""
    out_dir = os.fspath(out_dir)
    if not out_dir:
        raise ValueError("out_dir: empty path")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"out_dir: {out_dir} exists and is not a directory")
    replacing = os.path.exists(os.path.join(out_dir, META))
    if replacing and not overwrite:
        raise FileExistsError(f"out_dir: {out_dir} already holds a data set ({META}); pass --overwrite "
                              "(overwrite=True) to replace it")
    remove_stale_temporaries(out_dir)
    real_out = os.path.realpath(out_dir)
    remove_stale_staging(real_out)
    # Staged beside the real directory (a symlinked out_dir keeps pointing at the set).
    target = staging_dir(real_out) if replacing else out_dir
    try:
        writer = DatasetWriter(target)
        try:
            yield writer
            if not os.path.isfile(os.path.join(target, META)):
                raise RuntimeError("internal: a set was written without its meta.json")
        except BaseException:
            writer.discard() if not replacing else writer.abort()
            raise
        if replacing:
            swap_in(target, real_out)
    except BaseException as exc:
        if replacing and os.path.isdir(target):
            shutil.rmtree(target, ignore_errors=True)  # ours alone, and incomplete: the old set stays
        if replacing and isinstance(exc, OSError) and "disk space" in str(exc):
            raise OSError(exc.errno, f"{exc} (the old set in {out_dir} is kept until the new one is complete, "
                                     "so replacing it needs room for both; it is unchanged)") from exc
        raise


class DatasetWriter:
    """Writes one data set directory; see the module docstring for the layout."""

    def __init__(self, out_dir: str, overwrite: bool = False):
        self.dir = out_dir
        meta = os.path.join(out_dir, META)
        if os.path.exists(meta):
            if not overwrite:
                raise FileExistsError(
                    f"out_dir: {out_dir} already holds a data set ({META}); pass --overwrite (overwrite=True) "
                    "to replace it"
                )
            # The old meta would describe the new, half-written files if we were interrupted.
            os.remove(meta)
        elif os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise NotADirectoryError(f"out_dir: {out_dir} exists and is not a directory")
        # A generation that was killed leaves its temporaries (possibly hundreds of MB): drop them.
        remove_stale_temporaries(out_dir)
        self._created = not os.path.exists(out_dir)
        self._open: Dict[str, Tuple[dict, str]] = {}
        self._memmaps: Dict[str, Tuple[np.ndarray, str]] = {}
        self._files: Dict[str, dict] = {}

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def split_sink(self, split: str):
        """A callable that allocates the split's arrays: the images straight into a memory-mapped
        temporary .npy (the largest set does not need to fit in memory twice)."""

        def sink(n: int, image_shape: Tuple[int, int, int], k: int, label_names: List[str]) -> dict:
            path = self._path(f"{split}.images.npy")
            tmp = _tmp_name(path)
            images = self._open_memmap(path, tmp, (n, *image_shape), np.uint8)
            res = {
                "images": images,
                "counts": np.zeros(n, np.int64),
                "centres": np.zeros((n, k, 2), np.int64),
                "boxes": np.zeros((n, k, 4), np.int64),
            }
            res.update({name: np.zeros((n, k), np.int64) for name in label_names})
            self._open[split] = (res, tmp)
            return res

        return sink

    def _open_memmap(self, path: str, tmp: str, shape, dtype) -> np.ndarray:
        os.makedirs(self.dir, exist_ok=True)
        try:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
            _reserve(tmp, path)
        except OSError as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            if "disk space" in str(exc):
                raise
            raise OSError(exc.errno, _full_disk_hint(exc, path)) from exc
        return arr

    def open_array(self, name: str, shape, dtype) -> np.ndarray:
        """A writable memory-mapped .npy of ``shape`` and ``dtype`` under a temporary name (disk
        reserved up front), for an array too large to build in memory first. ``name`` is a file of
        the set (``{split}.images.npy``); :meth:`close_array` puts it in place, or ``final`` (another
        file name of the set) when the array becomes that file. An unfinished one is removed by
        :meth:`abort`."""
        path = self._path(name)
        arr = self._open_memmap(path, _tmp_name(path), shape, dtype)
        self._memmaps[name] = (arr, _tmp_name(path))
        return arr

    def close_array(self, name: str, final: Optional[str] = None) -> dict:
        """Flush and fsync the array :meth:`open_array` made, rename it to ``final`` (default its
        own name) and record it; returns the file's entry for meta.json."""
        arr, tmp = self._memmaps.pop(name)
        final = name if final is None else final
        try:
            arr.flush()
            del arr
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            os.remove(tmp)
            raise OSError(exc.errno, _full_disk_hint(exc, self._path(final))) from exc
        os.replace(tmp, self._path(final))
        return self._record(final, final)

    def drop_array(self, name: str) -> None:
        """Remove an array of :meth:`open_array` that is not to be kept (a working copy)."""
        arr, tmp = self._memmaps.pop(name)
        del arr
        if os.path.exists(tmp):
            os.remove(tmp)

    def _record(self, key: str, name: str) -> dict:
        path = self._path(name)
        arr = np.load(path, mmap_mode="r")
        entry = {
            "file": name,
            "shape": list(arr.shape),
            "dtype": arr.dtype.str,
            "bytes": os.path.getsize(path),
            "sha256": file_sha256(path),
        }
        del arr
        self._files[name] = entry
        return entry

    def write_array(self, key: str, array: np.ndarray) -> dict:
        os.makedirs(self.dir, exist_ok=True)
        name = f"{key}.npy"
        _atomic_save(self._path(name), array)
        return self._record(key, name)

    def finish_split(self, split: str, min_objects: int, max_objects: int) -> dict:
        res, tmp = self._open.pop(split)
        images = res.pop("images")
        images.flush()
        n = images.shape[0]
        del images
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            os.remove(tmp)
            raise OSError(exc.errno, _full_disk_hint(exc, self._path(f"{split}.images.npy"))) from exc
        os.replace(tmp, self._path(f"{split}.images.npy"))
        files = {"images": self._record("images", f"{split}.images.npy")}
        for key, arr in res.items():
            dtype = _STORED_DTYPES.get(key, _LABEL_DTYPE)
            files[key] = self.write_array(f"{split}.{key}", arr.astype(dtype))
        hist = np.bincount(res["counts"], minlength=max_objects + 1)[min_objects:].tolist() if n else []
        return {
            "n": int(n),
            "min_objects": int(min_objects),
            "max_objects": int(max_objects),
            "max_count": int(res["centres"].shape[1]),
            "count_histogram": {str(min_objects + i): int(c) for i, c in enumerate(hist)},
            "files": files,
        }

    def abort(self) -> None:
        """Remove the temporary files of unfinished splits (finished ones stay, but without
        ``meta.json`` the loader refuses the directory)."""
        for res, tmp in self._open.values():
            res.pop("images", None)
            if os.path.exists(tmp):
                os.remove(tmp)
        self._open.clear()
        for name in list(self._memmaps):
            self.drop_array(name)

    def discard(self) -> None:
        """Remove everything this writer wrote (an incomplete set is not left behind)."""
        self.abort()
        for name in list(self._files) + [META]:
            path = self._path(name)
            if os.path.isfile(path):
                os.remove(path)
        self._files.clear()
        if self._created:
            try:
                os.rmdir(self.dir)
            except OSError:
                pass

    def write_meta(self, meta: dict) -> None:
        os.makedirs(self.dir, exist_ok=True)
        # A generated set says nothing of its format: /1, bit-packed. An import states its own.
        meta = dict(meta)
        for key, value in (("format", FORMAT), ("bitpacked", True), ("bitorder", "big")):
            meta.setdefault(key, value)
        meta["meta_sha256"] = meta_digest(meta)
        path = self._path(META)
        with atomic_write(path, "w", tmp=_tmp_name(path), write_error=_disk_error(path)) as f:
            json.dump(meta, f, indent=1)
            f.write("\n")


# ---------------------------------------------------------------------------------------------
# Reading.


def read_meta(root: str) -> dict:
    """The parsed ``meta.json`` of a data set directory, checked for the keys the loader needs."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataFormatError(f"root: data set directory {root} does not exist")
    path = os.path.join(root, META)
    if not os.path.isfile(path):
        raise DataFormatError(
            f"root: {root} has no {META}: not a data set directory, or its generation was interrupted. "
            "Generate it with `python -m lavae_fast.data generate --dataset NAME --out DIR`."
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path} is not valid JSON ({e}); regenerate the data set") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataFormatError(f"{path}: format {got!r}, this loader reads {' and '.join(map(repr, READABLE_FORMATS))}; "
                              "regenerate the data set")
    required = ("dataset", "channels", "height", "width", "labels", "splits")
    if meta["format"] == FORMAT_IMPORTED:
        required += ("values", "bitpacked", "annotations")
    for key in required:
        if key not in meta:
            raise DataFormatError(f"{path}: missing key {key!r}; regenerate the data set")
    if meta.get("bitpacked", True) not in (True, False) or meta.get("annotations", "centres") not in ANNOTATIONS:
        raise DataFormatError(f"{path}: bitpacked {meta.get('bitpacked')!r} / annotations {meta.get('annotations')!r} "
                              f"(expected true or false / one of {', '.join(ANNOTATIONS)}); re-import the data set")
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):
        raise DataFormatError(f"{path} was edited after generation (its content does not match its meta_sha256): "
                              "the sizes it states may not be those of the stored arrays; regenerate the data set")
    return meta


_VERIFIED: set = set()


def _load_file(root: str, entry: dict, mmap: bool, verify: bool) -> np.ndarray:
    try:
        name = entry["file"]
        shape, dtype, size = tuple(entry["shape"]), np.dtype(entry["dtype"]), int(entry["bytes"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataFormatError(f"{os.path.join(root, META)}: malformed file entry {entry!r} ({e})") from None
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise DataFormatError(f"{path} is missing; regenerate the data set")
    actual = os.path.getsize(path)
    if actual != size:
        raise DataFormatError(f"{path} has {actual} bytes, {META} says {size}: truncated or replaced; regenerate")
    if verify and "sha256" in entry:
        st = os.stat(path)
        # Once per process: a file already verified and not replaced since (same inode, size and
        # mtime) is not read again.
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, entry["sha256"])
        if key not in _VERIFIED:
            if file_sha256(path) != entry["sha256"]:
                raise DataFormatError(f"{path}: SHA-256 differs from {META}: the file is corrupt; regenerate the data set")
            _VERIFIED.add(key)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataFormatError(f"{path} is not a readable .npy file ({e}); regenerate the data set") from None
    if arr.shape != shape or arr.dtype != dtype:
        raise DataFormatError(f"{path}: {arr.dtype} {arr.shape}, {META} says {dtype} {shape}; regenerate")
    return arr


def load_split(root: str, split: str, mmap: bool = True, verify: bool = False,
               meta: Optional[dict] = None) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(meta, arrays) of one split: ``images`` (bit-packed, or grey levels where
    ``meta["bitpacked"]`` is false), ``counts`` (−1: unknown, in a set imported without labels),
    ``centres``, ``boxes`` and one array per label, as stored, plus ``source_index`` for an
    imported set. ``verify`` also checks every file's SHA-256 (reads it all)."""
    root = os.fspath(root)
    meta = read_meta(root) if meta is None else meta
    splits = meta["splits"]
    if split not in splits:
        raise DataFormatError(f"split: {root} has splits {', '.join(splits)}, not {split!r}")
    info = splits[split]
    keys = ["images", "counts", "centres", "boxes", *meta["labels"]]
    files = info.get("files", {})
    if "source_index" in files:
        keys.append("source_index")
    missing = [k for k in keys if k not in files]
    if missing:
        raise DataFormatError(f"{os.path.join(root, META)}: split {split!r} lists no file for {missing}")
    arrays = {k: _load_file(root, files[k], mmap, verify) for k in keys}
    n = arrays["counts"].shape[0]
    c, h, w = meta["channels"], meta["height"], meta["width"]
    packed = meta.get("bitpacked", True)
    want = {"images": (n, c, h, (w + 7) // 8 if packed else w), "centres": (n, info["max_count"], 2),
            "boxes": (n, info["max_count"], 4)}
    want.update({k: (n, info["max_count"]) for k in meta["labels"]})
    if "source_index" in arrays:
        want["source_index"] = (n,)
    for k, shape in want.items():
        if arrays[k].shape != shape:
            raise DataFormatError(f"{root}: {split}.{k} has shape {arrays[k].shape}, expected {shape}")
    counts = np.asarray(arrays["counts"])
    if meta.get("annotations") == "none":
        if n and (counts != -1).any():
            raise DataFormatError(f"{root}: {split}.counts of a set without labels must all be −1; re-import")
    elif n and (counts.min() < 0 or counts.max() > info["max_count"]):
        raise DataFormatError(f"{root}: {split}.counts outside 0..{info['max_count']}; regenerate")
    return meta, arrays
