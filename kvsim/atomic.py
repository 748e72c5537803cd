"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Each write goes to a temporary file in the target's own folder (so the final rename stays on one
filesystem), is flushed to disk, then renamed over the target with `os.replace`, which is atomic on
POSIX and on Windows. On any exception the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def _temp_path_for(path: Path) -> Path:
    # A leading dot keeps the temporary file out of casual listings and out of globs such as `*.png`.
    # The random part keeps two concurrent writers of the same target apart.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _fsync_file(path: Path) -> None:
    # Flush the data before the rename, so that a crash cannot leave an empty file under the final name.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` and rename it onto `path` when the block succeeds.

    The caller writes the temporary path (for example with `DataFrame.to_csv` or `Figure.savefig`).
    If the block raises, the temporary file is deleted and `path` keeps its old content.
    Raises FileNotFoundError when the block wrote nothing to the temporary path, and when the
    target's folder does not exist.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: the folder {target.parent} does not exist")
    temp = _temp_path_for(target)
    try:
        yield temp
        if not temp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file {temp} for {target}")
        _fsync_file(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically and return the path."""
    target = Path(path)
    with atomic_path(target) as temp:
        # Mode "xb" creates the file with the usual umask-derived permissions, unlike mkstemp's 0600,
        # so a report folder stays readable by a web server after the rename.
        with open(temp, "xb") as handle:
            handle.write(data)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically, without newline translation, and return the path."""
    return atomic_write_bytes(path, text.encode(encoding))
