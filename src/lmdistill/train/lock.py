"""One run per folder: an exclusive OS lock (flock) on `OUTPUT_DIR/.lmdistill.lock` for the run's whole life.

    with RunLock(output_dir):    # refused at once, naming the holder, while another process holds it
        ...

The lock is the kernel's, not the file's existence: a run that crashed or was killed holds nothing, and the next run
takes the folder over with a notice (the file still names the old holder). The file records the holder's pid, host
and start time, for the message a second run gets. Under DDP only the main process takes it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from lmdistill.errors import LmdistillError

LOCK_FILE = ".lmdistill.lock"


class RunLock:
    def __init__(self, folder: str | Path, what: str = "--output_dir"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> "RunLock":
        import fcntl

        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LmdistillError(f"{self.what} '{self.folder}' is in use by another run ({_describe(holder)}); one "
                                 "folder holds one run. Wait for it to finish, stop it, or choose another "
                                 f"{self.what}.") from None
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            print(f"note: {self.what} '{self.folder}': the run that held it ({_describe(previous)}) is no longer "
                  "running; taking the folder over.")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self, remove_folder_if_empty: bool = False) -> None:
        """Let go of the lock (the file stays: it is harmless and names the last holder). A folder the lock created
        and that nothing else was written to is removed, so a failed start leaves nothing behind."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if remove_folder_if_empty and self._created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            self.folder.rmdir()

    def __del__(self) -> None:  # a Trainer dropped without close(): its folder is free again
        try:
            self.release()
        except OSError:
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(folder: str | Path, what: str = "--output_dir") -> None:
    """Refuse at once when another live process holds the folder's lock (writes nothing: a shared, non-blocking probe
    of an existing lock file). Pre-flight calls it before reading any checkpoint the holder may be rotating away."""
    import fcntl

    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LmdistillError(f"{what} '{folder}' is in use by another run ({_describe(_read_holder(fd))}); one folder "
                             f"holds one run. Wait for it to finish, stop it, or choose another {what}.") from None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
