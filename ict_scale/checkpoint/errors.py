"""Failures of the run directory that a user can act on: each reads as one line that names the place."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil

from ict_scale.errors import UserError


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as asked (busy, full, or holding an unusable checkpoint)."""


class RunDirBusy(RunDirError):
    """Another live run holds the run directory."""


class IncompleteCheckpoint(RunDirError):
    """A checkpoint lacks a file it needs (so it must not be marked complete)."""


class NoSpaceLeft(RunDirError):
    """A write into the run directory ran out of space."""


_FULL = (errno.ENOSPC, errno.EDQUOT)
# What torch's own writers say when fwrite comes up short; they carry no errno.
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "unexpected pos", "file write failed")


def _causes(exc: BaseException):
    """`exc`, its causes and contexts, and the per-rank failures a DCP CheckpointException carries."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)


def is_out_of_space(exc: BaseException, local_path: str | None = None) -> bool:
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if isinstance(e, RuntimeError) and any(t in str(e) for t in _FULL_TEXT):
            # torch's "unexpected pos 704 vs 598": a short write; full only if the disk says so.
            return local_path is None or _free_bytes(local_path) < 1 << 20
    return False


def _free_bytes(path: str) -> int:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return 1 << 62


@contextlib.contextmanager
def out_of_space_as_error(url: str, what: str):
    """Turn a full disk (or quota) while writing `what` into `url` into one NoSpaceLeft line."""
    local = None if "://" in url and not url.startswith("file://") else url.removeprefix("file://")
    try:
        yield
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not is_out_of_space(e, local):
            raise
        free = f" ({_free_bytes(local)} bytes free)" if local else ""
        raise NoSpaceLeft(f"no space left on {url}{free}: {what} was not written; its partial files are removed "
                          "when the run starts again; free space there (or lower train.keep_last), then run "
                          "the same command again") from e
