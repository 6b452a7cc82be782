"""User-facing errors.

`LmdistillError` is for bad input a user can fix (a malformed record, an unknown flag value, mismatched
shapes). The CLI prints its message as one paragraph without a traceback and exits 1; library callers get
an ordinary exception. Messages say what was expected, what was found, and where (file:line, flag name).

`DiskWriteError` is a write that failed or could not fit (a full disk, a read-only or failing filesystem):
`guarded_write` turns the OS's or a writer's error into one that says what was written, where, why and how much
space is free, after removing the partial output; `check_space` refuses a write before its first byte.
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path


class LmdistillError(ValueError):
    """An error caused by the user's input, with a message meant to be read by that user."""


class DiskWriteError(LmdistillError):
    """A write that failed (full disk, read-only or failing filesystem) or would not fit; nothing partial is left."""


def free_bytes(folder: str | Path) -> int:
    """Free space of the filesystem that holds `folder` (or its nearest existing parent)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def write_failure(exc: BaseException) -> str:
    """Why a write failed, in words (errno for OSErrors; torch's zip writer reports a cut write as a RuntimeError)."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if code == errno.EROFS:
        return "the filesystem is read-only"
    if code == errno.EIO:
        return "an input/output error (a failing disk?)"
    text = " ".join(str(exc).split())
    if "unexpected pos" in text or "PytorchStreamWriter" in text or "file write failed" in text:
        return "the write was cut short (a full disk?)"
    return f"{type(exc).__name__}: {text[:120]}"


def remove_partial(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def guarded_write(partial: str | Path, what: str, where: str | Path, intact: str, advice: str):
    """Run a write of `what` into `partial` (a temporary file or folder under `where`); if it fails with an OSError
    or a writer's RuntimeError, remove the partial output and raise `DiskWriteError` saying what was written,
    where, why, how much space is free there, what is `intact` and what to do (`advice`)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, LmdistillError):
            raise
        remove_partial(Path(partial))
        raise DiskWriteError(f"writing {what} to '{where}' failed: {write_failure(exc)}; "
                             f"{size_text(free_bytes(where))} free there. The partial output was removed; {intact}. "
                             f"{advice}") from None


def check_space(where: str | Path, need: int, what: str, intact: str, advice: str) -> None:
    """Refuse a write of about `need` bytes that cannot fit in the free space of `where`'s filesystem."""
    free = free_bytes(where)
    if free < need:
        raise DiskWriteError(f"not enough space for {what} in '{where}': it needs about {size_text(need)}, "
                             f"{size_text(free)} free. Nothing was written; {intact}. {advice}")
