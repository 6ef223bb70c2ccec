"""Writes that are all-or-nothing, so an interrupted run never leaves a file that looks complete."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_csv(frame, path: str | os.PathLike) -> None:
    """Write a pandas DataFrame without an index, atomically."""
    atomic_write_text(path, frame.to_csv(index=False))
