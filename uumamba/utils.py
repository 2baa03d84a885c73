"""Small shared helpers: atomic file writes, output-folder checks, strict JSON values,
plain tensors out of MONAI MetaTensors."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uumamba.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name keeps the file's suffixes (``.tmp-<pid>.nii.gz`` style) so writers that
    infer the format from the extension still work. On an exception the temporary file is
    removed and ``path`` is left untouched, so no half-written output or checkpoint remains.
    """
    path = Path(path)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
