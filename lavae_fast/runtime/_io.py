"""Writing a file all or nothing: the one atomic-write routine of the package.

Checkpoints, data set files, ``metrics.jsonl`` rewrites, ``eval.json`` and figures are written
through :func:`atomic_write`: to a temporary name in the destination's folder, flushed and
fsync'ed, then renamed over the destination (``os.replace``, atomic on POSIX) and the folder
fsync'ed, so that a kill or a full disk at any moment leaves the old file or the new one, never a
part of one; a failed write removes its temporary.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

__all__ = ["atomic_write", "fsync_dir", "strict_json", "dumps_strict", "write_json", "write_results",
           "check_output_folder", "check_output_file", "OutputLocationError", "describe_os_error"]


def fsync_dir(directory: str) -> None:
    """Make renames in ``directory`` durable (its entries), where the platform allows it."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", *, tmp: Optional[str] = None,
                 before_replace: Optional[Callable[[], None]] = None,
                 write_error: Optional[Callable[[Exception], Optional[BaseException]]] = None) -> Iterator:
    """``with atomic_write(path) as f: ...`` writes ``path`` all or nothing.

    ``f`` is open (``mode``) at ``tmp`` (default ``PATH.tmp-PID``; it may exist already, e.g. made
    by ``tempfile.mkstemp``, and is then truncated, keeping its permissions). When the block ends,
    the file is flushed and fsync'ed, ``before_replace()`` is called (e.g. to keep the previous
    file), the file is renamed over ``path`` and the folder fsync'ed. On any exception the temporary
    is removed and the exception propagates; an exception of the writing phase (the block, the
    flush, the fsync) is first passed to ``write_error``, which may return another exception to
    raise in its place (e.g. one that says the disk is full), or None to keep it.
    """
    tmp = f"{path}.tmp-{os.getpid()}" if tmp is None else tmp
    try:
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except Exception as exc:
            better = write_error(exc) if write_error is not None else None
            if better is not None:
                raise better from exc
            raise
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------------------------------------
# Results files: strict JSON, output locations checked before the work, a failed write that keeps
# what was computed
# ---------------------------------------------------------------------------------------------

# What a probe write must fit: a results file or a figure is tens of kilobytes; a disk without
# this much room would fail the real write after minutes of work.
PROBE_BYTES = 64 * 1024


def strict_json(obj):
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, recursively (dicts, lists,
    tuples, numpy scalars): what JSON can say of a quantity that was not measured. ``json.dump``
    would otherwise write ``NaN``, which is not JSON (strict parsers, ``jq``, browsers refuse it)."""
    import math

    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return strict_json(item())
        except (TypeError, ValueError):
            pass
    return obj


def dumps_strict(obj, **kw) -> str:
    """``json.dumps`` of :func:`strict_json` (obj) with ``allow_nan=False``."""
    import json

    return json.dumps(strict_json(obj), allow_nan=False, **kw)


def write_json(path: str, obj, indent: int = 2) -> None:
    """Write ``obj`` as strict JSON (:func:`dumps_strict`) at ``path``, all or nothing."""
    text = dumps_strict(obj, indent=indent) + "\n"
    with atomic_write(path, "w") as f:
        f.write(text)


class OutputLocationError(OSError):
    """An output location that cannot take the results (names the path and why)."""


def check_output_folder(folder: str, what: str = "--out") -> None:
    """Check, before any long work, that ``folder`` is (or can be made) a writable folder with room
    for a small file: create it, write and remove a :data:`PROBE_BYTES` probe. Raises
    :class:`OutputLocationError` naming ``what`` and the folder."""
    if not folder:
        raise OutputLocationError(f"{what} is empty: name a folder")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise OutputLocationError(f"{what} {folder} exists and is not a directory")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputLocationError(f"{what} {folder}: cannot create the folder ({exc.strerror or exc})") from None
    probe = os.path.join(folder, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputLocationError(f"{what} {folder}: cannot write there ({describe_os_error(exc)})") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


def check_output_file(path: str, what: str = "--out") -> None:
    """:func:`check_output_folder` for the folder of the file ``path``, which must not be a folder."""
    if not path:
        raise OutputLocationError(f"{what} is empty: name a file")
    if os.path.isdir(path):
        raise OutputLocationError(f"{what} {path} is a directory; name a file")
    check_output_folder(os.path.dirname(os.path.abspath(path)), what)


def describe_os_error(exc: OSError) -> str:
    """A short reason for ``exc``: "the disk is full", "read-only file system", else its strerror."""
    import errno

    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if getattr(exc, "errno", None) == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


def write_results(path: str, obj, prog: str) -> bool:
    """Write the results ``obj`` at ``path`` (:func:`write_json`); if that fails (a full disk, the
    folder gone), keep them: print them as JSON on standard output and say on standard error why
    the file was not written. Returns whether the file was written."""
    import sys

    try:
        write_json(path, obj)
        return True
    except OSError as exc:
        print(dumps_strict(obj, indent=1))
        print(f"{prog}: error: could not write {path} ({describe_os_error(exc)}); the results are printed above "
              "(standard output): save them from there", file=sys.stderr)
        return False
