"""Writes that are all-or-nothing, so an interrupted run never leaves a file that looks complete.

Shared by the data cache, the trainables and the report.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """UTF-8 with '\\n' line endings, so re-runs are byte-identical on every platform."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_csv_atomic(frame, path: str | os.PathLike) -> None:
    """A pandas DataFrame without its index."""
    write_text_atomic(path, frame.to_csv(index=False, lineterminator="\n"))
