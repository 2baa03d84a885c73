"""Unpacking a ``.zip`` of DICOM files that may be hostile.

Entry names are never used as paths: member ``k`` is written as ``DEST/NNNNNN.dcm`` (so
``../``, absolute names, drive letters and symbolic-link entries cannot place a file outside
``DEST``); names only appear in messages. Before anything is inflated the central directory is
checked against :class:`ZipLimits` (entry count, declared decompressed size, compression
ratio, encryption); while inflating, the bytes actually produced are counted again, because
the declared sizes of a crafted archive may lie (a zip bomb is stopped once the cap, plus at
most one 1 MiB chunk, has been inflated, and the partial output is removed).
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from uumamba.data.untrusted import VolumeTooLarge
from uumamba.errors import DataError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipLimits:
    """Caps of :func:`extract_zip`.

    Attributes:
        max_entries: members of the archive (directories included; default 20,000).
        max_total_bytes: decompressed bytes of all members together (default 4 GiB).
        max_ratio: decompressed / compressed size of one member above 1 MiB, and of all
            members together once they pass 1 MiB (default 200; DICOM pixel data deflates at
            most ~10x, a bomb at ~1000x). The total is counted while inflating, so many small
            members cannot add up to a bomb either.
    """

    max_entries: int = 20_000
    max_total_bytes: int = 4 * 1024**3
    max_ratio: float = 200.0


def is_zip(path: Path) -> bool:
    """True for an existing file ending in ``.zip`` (case-insensitive)."""
    return path.is_file() and path.name.lower().endswith(".zip")


def extract_zip(archive: Path, dest: Path, limits: ZipLimits | None = None,
                name: str | None = None) -> list[Path]:
    """Extract the regular-file members of ``archive`` into ``dest`` under sanitized names.

    Args:
        archive: the ``.zip`` file.
        dest: an existing, empty folder (e.g. a temporary directory).
        limits: caps (default :class:`ZipLimits`).
        name: how messages name the archive (default: its path).

    Returns:
        The files written, ``dest/000000.dcm`` ... in member order (directories and symbolic
        links skipped).

    Raises:
        DataError: not a zip, encrypted members, too many entries, a member whose ratio is
            above the cap; :class:`~uumamba.data.untrusted.VolumeTooLarge`: decompressed
            size above the cap (declared or counted). On any error ``dest``'s content is
            removed.
    """
    limits = limits or ZipLimits()
    label = name or str(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{label}: not a readable zip archive ({exc})") from None
    written: list[Path] = []
    try:
        with zf:
            infos = zf.infolist()
            if len(infos) > limits.max_entries:
                raise DataError(f"{label}: {len(infos)} entries, above the limit of {limits.max_entries}")
            members = []
            declared = 0
            for info in infos:
                mode = info.external_attr >> 16
                if info.is_dir() or stat.S_ISLNK(mode):
                    continue
                if info.flag_bits & 0x1:
                    raise DataError(f"{label}: entry {info.filename!r} is encrypted")
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > _CHUNK and ratio > limits.max_ratio:
                    raise DataError(f"{label}: entry {info.filename!r} compresses {ratio:.0f}:1, "
                                    f"above {limits.max_ratio:.0f}:1 (zip bomb?)")
                declared += info.file_size
                members.append(info)
            if declared > limits.max_total_bytes:
                raise VolumeTooLarge(f"{label}: {declared} bytes decompressed, above the limit "
                                     f"of {limits.max_total_bytes}")
            compressed = sum(info.compress_size for info in members)
            if declared > _CHUNK and declared / max(compressed, 1) > limits.max_ratio:
                raise DataError(f"{label}: members compress {declared / max(compressed, 1):.0f}:1 "
                                f"together, above {limits.max_ratio:.0f}:1 (zip bomb?)")
            archive_bytes = archive.stat().st_size
            total = read = 0
            for k, info in enumerate(members):
                out = dest / f"{k:06d}.dcm"
                # zipfile reads at most compress_size bytes of a member, and no more than
                # the archive holds: the compressed bytes consumed so far are bounded by both
                read = min(read + info.compress_size, archive_bytes)
                with zf.open(info) as src, open(out, "wb") as dst:
                    written.append(out)
                    while chunk := src.read(_CHUNK):
                        total += len(chunk)
                        if total > limits.max_total_bytes:
                            raise VolumeTooLarge(f"{label}: more than {limits.max_total_bytes} "
                                                 "bytes decompressed (sizes in the archive are wrong)")
                        if total > _CHUNK and total / max(read, 1) > limits.max_ratio:
                            raise DataError(f"{label}: members inflate more than "
                                            f"{limits.max_ratio:.0f}:1 together (zip bomb?)")
                        dst.write(chunk)
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        _clear(dest)
        raise DataError(f"{label}: damaged zip archive: {type(exc).__name__}: {exc}") from None
    except DataError:
        _clear(dest)
        raise
    return written


def _clear(dest: Path) -> None:
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
