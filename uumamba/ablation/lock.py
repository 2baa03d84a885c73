"""Exclusive, non-blocking file locks (``fcntl.flock``) with the holder's pid in the file.

``uumamba ablate`` holds ``OUTPUT/.lock`` for the whole of
:func:`uumamba.ablation.run.run_ablation` (a second invocation into the same folder is
refused, so two parents never mix their runs), and each child holds ``fold_K.lock`` in its
run's model folder for its whole life (so a child orphaned by a killed parent and the child
of a rerun never train the same fold at once). The lock belongs to the open file, so the
kernel drops it when its process dies, however it dies (``kill -9`` included): a stale lock
file never blocks anyone. The file's descriptor is not inherited by child processes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockBusy(Exception):
    """Another process holds the lock.

    Attributes:
        path: the lock file.
        pid: the holder's pid as written in the file (None when unreadable).
    """

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path}: held by pid {pid if pid is not None else 'unknown'}")
        self.path, self.pid = path, pid

    @property
    def holder(self) -> str:
        """``pid N`` (or ``pid unknown``), for messages."""
        return f"pid {self.pid}" if self.pid is not None else "pid unknown"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() and len(text) < 12 else None


class FileLock:
    """An exclusive ``flock`` on one file, taken without waiting.

    Use as ``with FileLock(path): ...`` or :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create the file if needed, lock it and write this process's pid into it.

        Raises:
            LockBusy: another process holds it.
            OSError: the file cannot be created or opened.
        """
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise LockBusy(self.path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # the file may have been removed (release(remove=True)) between our open and
            # flock: then the lock is on a file nobody else will open; try again
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return
            os.close(fd)
        raise LockBusy(self.path, None)

    def release(self, remove: bool = False) -> None:
        """Drop the lock (``remove``: delete the file first, while still holding it)."""
        if self._fd is None:
            return
        if remove:
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
