"""Writes that are all-or-nothing, so an interrupted run never leaves a file that looks complete.

Shared by the data cache, the trainables and the report. Each write returns the size and sha256 of
what it wrote, so a reader can later tell a complete file from a truncated or altered one.
"""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


@dataclass(frozen=True)
class FileDigest:
    """Size in bytes and sha256 (hex) of a file's content."""

    size: int
    sha256: str


def write_chunks_atomic(path: str | os.PathLike, chunks: Iterable[bytes], size: int | None = None) -> FileDigest:
    """Stream ``chunks`` to ``path`` all-or-nothing, hashing them on the way (no second read of a large file).

    ``size``: the expected total, reserved up front so that a full disk fails at once with a clean
    ENOSPC instead of part-way through (or, written through a memory map, as SIGBUS).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    digest, written = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as handle:
            if size:
                _reserve(handle.fileno(), size)
            for chunk in chunks:
                digest.update(chunk)
                handle.write(chunk)
                written += len(chunk)
            handle.truncate(written)  # a reservation larger than the content must not leave a zero tail
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return FileDigest(written, digest.hexdigest())


def _reserve(fd: int, size: int) -> None:
    """posix_fallocate where the file system can; only a full disk (or quota) is an error, not a missing feature."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
    except AttributeError:  # pragma: no cover - not on macOS: the writes themselves then report ENOSPC
        pass


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> FileDigest:
    """Write via a temporary file in the same folder and ``os.replace`` (atomic on POSIX)."""
    return write_chunks_atomic(path, [data])


def file_digest(path: str | os.PathLike) -> FileDigest:
    """Size and sha256 of a file, read in chunks (constant memory whatever the file's size)."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
        return FileDigest(handle.tell(), digest.hexdigest())


def write_text_atomic(path: str | os.PathLike, text: str) -> FileDigest:
    """UTF-8 with '\\n' line endings, so re-runs are byte-identical on every platform."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_csv_atomic(frame, path: str | os.PathLike) -> FileDigest:
    """A pandas DataFrame without its index."""
    return write_text_atomic(path, frame.to_csv(index=False, lineterminator="\n"))


def write_via_temp_file(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """``write(tmp)`` then rename, for writers that only take a file name (ITK, ANTs, GDCM): readers never see a
    partial file. The temporary name is hidden and keeps the real suffix, because ITK picks its writer from it."""
    final = Path(path)
    suffix = ".nii.gz" if final.name.endswith(".nii.gz") else final.suffix
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
