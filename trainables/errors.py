"""Errors a trial raises when a retry cannot help (a missing file, bad input, a full disk), and their one-line text.

Two places need an error as one readable line: the trial itself (it has the live exception and its traceback)
and the driver, which gets Ray's wrapper (``Result.error``): a ``RayTaskError`` whose ``str`` starts with Ray's
header (``ray::ImplicitFunc.train() (pid=..., ip=...)``) and holds the worker's traceback as text, or a
``RayActorError`` when the worker process died. ``describe_exception`` serves the first, ``error_text`` the
second; both give ``Type: message (at file:line in function)``.
"""
from __future__ import annotations

import errno
import re
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The message part of an error line is cut here (a path list or a long Ray message would fill the console);
# a PermanentTrialError's message is this project's own (node, path and fix), so it may be longer.
MAX_MESSAGE_CHARS = 300
MAX_PERMANENT_CHARS = 1000
# errno values that the same trial would meet again on a retry: only a person can free the disk or fix a path.
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)')
# Python prints these between the tracebacks of chained exceptions; the last block is the final exception's.
_CHAIN_SEPARATORS = ("During handling of the above exception, another exception occurred:",
                     "The above exception was the direct cause of the following exception:")


class PermanentTrialError(RuntimeError):
    """Raised inside a trial for a fault that the same trial cannot recover from by running again.

    Tune retries crashes (``max_failures``); this error is not retried: the trial ends as failed, with this
    message, and the report lists it.
    """


def is_permanent(error: BaseException) -> bool:
    """Whether running the trial again, unchanged, would meet this error again.

    Missing or unreadable inputs (files, permissions, a full or read-only disk) and bad values (``ValueError``:
    a wrong option, a malformed table) are; crashes, out-of-memory and anything else are left to Tune's retry.
    ``KeyboardInterrupt`` and ``SystemExit`` (Tune stopping a trial) are never permanent.
    """
    if not isinstance(error, Exception):
        return False
    if isinstance(error, (PermanentTrialError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                          PermissionError, ValueError)):
        return True
    return isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Lines joined with " | ", colour codes and runs of blanks removed, cut to ``limit`` characters."""
    lines = [" ".join(line.split()) for line in _ANSI.sub("", str(text)).splitlines()]
    joined = " | ".join(line for line in lines if line)
    return joined if len(joined) <= limit else joined[:limit - 1].rstrip() + "…"


def short_path(path: str) -> str:
    """A frame's file relative to this repository, or to site-packages, so the line stays short."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except (ValueError, OSError):
        pass
    marker = "site-packages/"
    return path.split(marker, 1)[1] if marker in path else path


def _in_repo(path: str) -> bool:
    return not Path(short_path(path)).is_absolute() and "site-packages/" not in path and not path.startswith("<")


def _where(frames: list[tuple[str, int, str]]) -> str:
    """The innermost frame, and the innermost of this repository's when that one is in a library."""
    if not frames:
        return ""
    file, line, function = frames[-1]
    where = f"{short_path(file)}:{line} in {function}"
    if not _in_repo(file):
        own = [frame for frame in frames if _in_repo(frame[0])]
        if own:
            where += f", via {short_path(own[-1][0])}:{own[-1][1]} in {own[-1][2]}"
    return where


def _compose(kind: str, message: str, where: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    line = one_line(message, limit)
    text = f"{kind}: {line}" if line else kind
    return f"{text} (at {where})" if where else text


def describe_exception(error: BaseException) -> str:
    """``Type: message (at file:line in function)`` of a live exception (its traceback is still attached)."""
    frames = [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(error.__traceback__)]
    limit = MAX_PERMANENT_CHARS if isinstance(error, PermanentTrialError) else MAX_MESSAGE_CHARS
    return _compose(type(error).__name__, str(error), _where(frames), limit)


def _frames_of_last_traceback(text: str) -> list[tuple[str, int, str]]:
    last_block = text
    for separator in _CHAIN_SEPARATORS:
        last_block = last_block.rsplit(separator, 1)[-1]
    return [(m["file"], int(m["line"]), m["function"]) for m in _FRAME.finditer(last_block)]


def _actor_death(text: str) -> str:
    """Ray's long "actor died" message cut to what happened: the worker process, and how it exited."""
    pid, ip = re.search(r"pid: (\d+)", text), re.search(r"ip: (\S+)", text)
    exit_detail = re.search(r"(Worker exit type: .*?)(?: Some common causes| There are some potential|$)", text, re.S)
    where = ", ".join(p for p in (pid and f"pid {pid[1]}", ip and f"ip {ip[1]}") if p)
    parts = ["the trial's worker process died" + (f" ({where})" if where else "")]
    if exit_detail:
        parts.append(exit_detail[1])
    return ": ".join(parts)


def error_text(error: BaseException | None) -> str:
    """One line for the error of a Tune ``Result``: the trial's own exception, not Ray's header.

    ``RayTaskError`` keeps the exception raised in the worker as ``cause`` (its traceback only as text:
    the last ``File "...", line N, in f`` of the last traceback block is where it was raised). A trial that
    failed permanently raised ``PermanentTrialError`` whose message is already such a line. A dead worker
    (``RayActorError``) has no traceback: its message is cut to the process and how it exited.
    """
    if error is None:
        return ""
    cause = getattr(error, "cause", None)
    if isinstance(cause, PermanentTrialError):
        return one_line(str(cause), limit=MAX_PERMANENT_CHARS + MAX_MESSAGE_CHARS)
    text = _ANSI.sub("", str(error))
    if cause is not None:
        return _compose(type(cause).__name__, str(cause), _where(_frames_of_last_traceback(text)))
    if "The actor died" in text or "actor is dead" in text:
        return _compose(type(error).__name__, _actor_death(text), "")
    return _compose(type(error).__name__, text, _where(_frames_of_last_traceback(text)))


def is_permanent_result_error(error: BaseException | None) -> bool:
    """Whether a Tune ``Result.error`` is a trial's ``PermanentTrialError`` (Ray subclasses the cause's type)."""
    return isinstance(error, PermanentTrialError) or isinstance(getattr(error, "cause", None), PermanentTrialError)
