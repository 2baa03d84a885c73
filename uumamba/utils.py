"""Small shared helpers: atomic (optionally durable) file writes and their stale temporary
files, bounded reads of regular files only, output-folder checks, strict JSON values, plain
tensors out of MONAI MetaTensors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from uumamba.errors import UserError

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)(\.[^/]*)?$")


#: Longest file name (bytes) of the file systems written to (ext4, XFS, APFS, NTFS: 255).
NAME_MAX = 255


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """At most ``max_bytes`` bytes from the start of the regular file ``path`` (symbolic links
    followed), never blocking: the file is opened non-blocking and checked with ``fstat`` on
    the open descriptor, so a FIFO, a device or a directory (also one swapped in after a
    check) is refused instead of hanging the reader or being read without end.

    Raises:
        OSError: ``path`` cannot be opened or read, or is not a regular file (``EINVAL``,
            "not a regular file").
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        chunks, left = [], max_bytes
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _temporary_name(path: Path, pid: int) -> Path:
    """``DIR/.STEM.tmp-<pid>SUFFIXES`` beside ``path`` (the name :func:`atomic_path` writes).

    When that is longer than :data:`NAME_MAX` bytes (a legal 247-byte output name gave
    ``File name too long``), ``DIR/.DIGEST.tmp-<pid>SUFFIXES`` instead: a digest of the name
    and its last two short suffixes (``.nii.gz``, the format writers infer from them)."""
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    name = f".{stem}.tmp-{pid}{suffix}"
    if len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX:
        return path.with_name(name)
    digest = hashlib.sha1(path.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    short = "".join(s for s in path.suffixes[-2:] if len(s) <= 16)
    return path.with_name(f".{digest}.tmp-{pid}{short}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def _keep_as_previous(path: Path, previous: Path) -> None:
    """Make the current ``path`` (if any) ``previous`` without a moment where ``path`` is
    missing: a hard link renamed onto ``previous``; a plain rename where links are not
    supported (then ``path`` is missing until the caller's rename)."""
    if not path.is_file():
        return
    link = _temporary_name(previous, os.getpid())
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        link.unlink(missing_ok=True)
        os.replace(path, previous)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = False,
                previous: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name keeps the file's suffixes (``.NAME.tmp-<pid>.nii.gz`` style) so writers
    that infer the format from the extension still work. On an exception the temporary file is
    removed and ``path`` is left untouched, so no half-written output or checkpoint remains.
    A process killed while writing (SIGKILL, power loss) leaves its temporary file behind:
    :func:`remove_stale_temporaries` deletes those of processes no longer alive.

    Args:
        path: the destination.
        durable: ``fsync`` the written file before the rename and the folder after it, so
            that after a power loss ``path`` is the old or the new file, complete (without it
            the rename may reach the disk before the data, leaving an empty file).
        previous: where the file at ``path`` goes before it is replaced (e.g.
            ``checkpoint_previous.pt``); ``path`` never disappears when the file system
            supports hard links. None: the old file is simply replaced.

    Raises:
        OSError: from writing, syncing or renaming (the temporary file is removed).
    """
    path = Path(path)
    tmp = _temporary_name(path, os.getpid())
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        if previous is not None:
            _keep_as_previous(path, Path(previous))
        os.replace(tmp, path)
        if durable:
            _fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` (not below it) when
    their writer was killed: names ``.NAME.tmp-<pid>...`` whose pid is not a live process.

    Files of live processes (including this one) are kept. Only meaningful where every writer
    into ``folder`` runs on this machine (a fold folder: only its run writes there).

    Returns:
        The removed paths (empty when ``folder`` does not exist).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        m = _TEMPORARY.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def check_output_folder(path: str | Path, flag: str = "--output") -> None:
    """Refuse an output folder path that exists as something other than a folder.

    Raises:
        UserError: ``"<flag> <path>: exists and is not a folder"``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder")


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / inf float replaced by None (strict JSON has no NaN), dict keys
    as strings, tuples as lists; used for ``summary.json``, ``metrics.jsonl`` and the
    postprocessing spec."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def plain_tensor(x: Any) -> Any:
    """A plain ``torch.Tensor`` from a MONAI ``MetaTensor``, a tensor or an array.

    MetaTensors carry their affine and applied-operations record into every operation; the
    network, the loss and NumPy conversions want the bare data. Returns the same storage
    where possible (no copy).
    """
    import torch

    if hasattr(x, "as_tensor"):
        return x.as_tensor()
    return torch.as_tensor(x)


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A PEP 562 module ``__getattr__`` for ``package`` that imports each public name from its
    submodule on first use (``exports``: name -> submodule, relative to ``package``), so that
    importing the package itself stays light.

    Raises (from the returned function):
        AttributeError: a name that is not in ``exports``.
    """
    import importlib

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
