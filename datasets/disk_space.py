"""Free space checked before big writes, and a full disk reported as a message instead of a crash.

A write that runs out of space otherwise ends as SIGBUS (through a memory map), as a bare
``[Errno 28]`` far from its cause, or as an unexplained RuntimeError inside ``torch.save``. Shared by
the preprocessing cache (datasets) and the checkpoints (trainables), which wrap the message in their
own error types.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# Quota exhaustion reads the same to the user: no room left for this write.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """Not enough free space for a write; the message names the folder, the space needed and free, and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC  # callers that test errno see a full disk, and str() stays the message


def human_bytes(count: float) -> str:
    """Binary units, as ``df -h`` and ``du -h`` print them, so the numbers can be compared directly."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int:
    """Free space for an unprivileged writer on the disk that holds ``path`` (or would, once created)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # a folder about to be made lives on its nearest existing parent's disk
    return shutil.disk_usage(folder).free


def space_message(path: str | os.PathLike, what: str, needed: int, free: int, fix: str) -> str:
    """The one wording of a full disk: where, for what, how much is needed and free, and what to do."""
    return f"Not enough disk space in {path}: {what} needs {human_bytes(needed)}, {human_bytes(free)} free. {fix}"


def require_free_space(path: str | os.PathLike, what: str, needed: int, fix: str) -> None:
    """Stop before a write of ``needed`` bytes that cannot fit, instead of failing half-way through it."""
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(space_message(path, what, needed, free, fix))


def is_disk_full(error: BaseException | None) -> bool:
    """True when ``error`` or anything it was raised from is ENOSPC/EDQUOT.

    torch.save wraps a failed write in a RuntimeError whose context holds the OSError, hence the walk.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False
