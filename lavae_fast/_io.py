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

__all__ = ["atomic_write", "fsync_dir"]


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
