"""Files that survive a crash: appends and replacements flushed to the disk.

A record appended with :func:`append_durably` is on the disk when the call returns. A file replaced
with :func:`write_atomic` holds either its old or its new content after a crash at any moment: the new
content is written beside it, flushed, renamed over it, and the directory is flushed. The trainer's
checkpoints (:mod:`qstar.checkpoint`) and logs (:mod:`qstar.metrics`) are written with these.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .faults import fault_point

__all__ = ["append_durably", "fsync", "remove", "write_atomic"]


def fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to the disk. A platform that cannot open a directory
    skips directories."""
    is_dir = Path(path).is_dir()
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, fault: str | None = None) -> None:
    """Make ``path`` hold ``data`` (text or bytes): a temporary file beside it, flushed, renamed over
    it, then the directory flushed. ``fault``: the :func:`~qstar.faults.fault_point` between the write
    and the rename (a testing aid)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if fault is not None:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def append_durably(path: Path, text: str) -> None:
    """Append ``text`` (whole records) to ``path`` in one write and flush it to the disk (and the
    directory too when the append creates the file)."""
    path = Path(path)
    created = not path.exists()
    with path.open("a", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync(path.parent)
