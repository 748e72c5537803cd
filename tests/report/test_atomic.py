"""kvsim.atomic: whole files or nothing, and no temporary files left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvsim import atomic
from kvsim.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_text_creates_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    assert atomic_write_text(target, "{}\n") == target
    assert target.read_bytes() == b"{}\n"
    assert _leftovers(tmp_path) == []


def test_write_text_keeps_newlines(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    atomic_write_text(target, "a\r\nb\n")
    assert target.read_bytes() == b"a\r\nb\n"


def test_write_bytes_replaces_file(tmp_path: Path) -> None:
    target = tmp_path / "chart.png"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert _leftovers(tmp_path) == []


def test_new_file_follows_umask(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    atomic_write_text(target, "<html></html>")
    assert target.stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def test_exception_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "timeline.csv"
    target.write_text("old")
    with pytest.raises(ValueError, match="halfway"):
        with atomic_path(target) as temp:
            temp.write_text("partial")
            raise ValueError("failed halfway")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_exception_creates_no_file(tmp_path: Path) -> None:
    target = tmp_path / "new.csv"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temp:
            temp.write_text("partial")
            raise KeyboardInterrupt
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_failed_rename_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_nothing_written_raises(tmp_path: Path) -> None:
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(target):
            pass
    assert target.read_bytes() == b"old"


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_text(tmp_path / "absent" / "x.txt", "text")


def test_temp_path_in_same_folder(tmp_path: Path) -> None:
    target = tmp_path / "requests.csv"
    with atomic_path(target) as temp:
        assert temp.parent == tmp_path
        assert temp.name.startswith(".requests.csv.")
        assert not temp.exists()
        temp.write_text("ok")
    assert target.read_text() == "ok"
