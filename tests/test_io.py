"""lavae_fast._io.atomic_write, the one atomic-write routine (checkpoints, data files, logs, figures)."""

import os

import pytest

from lavae_fast._io import atomic_write


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "f.txt")
    for text in ("old", "new"):
        with atomic_write(path, "w") as f:
            f.write(text)
    assert open(path).read() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = str(tmp_path / "f.txt")
    with atomic_write(path, "w") as f:
        f.write("old")
    with pytest.raises(KeyError):
        with atomic_write(path, "w", tmp=str(tmp_path / "f.txt.tmp")) as f:
            f.write("half")
            raise KeyError("killed")
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_write_errors_can_be_translated_and_before_replace_runs_last(tmp_path):
    path = str(tmp_path / "f.bin")
    calls = []
    with atomic_write(path, before_replace=lambda: calls.append(os.path.exists(path))) as f:
        f.write(b"x")
    assert calls == [False]
    with pytest.raises(ValueError, match="disk full") as info:
        with atomic_write(path, write_error=lambda exc: ValueError(f"disk full: {exc}")) as f:
            raise OSError(28, "No space left on device")
    assert isinstance(info.value.__cause__, OSError)
    assert open(path, "rb").read() == b"x" and os.listdir(tmp_path) == ["f.bin"]
