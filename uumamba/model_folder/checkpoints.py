"""Checkpoint files of a model folder: one ``torch.save`` dict holding everything a run needs to
continue (and everything the predictor needs to rebuild a fold's network).

A checkpoint is written through :func:`uumamba.utils.atomic_path` with ``durable=True``
(temporary name, ``fsync`` of the file, rename, ``fsync`` of the folder), so neither an
interrupted save nor a power loss leaves a truncated or empty checkpoint behind. Saving
``checkpoint_latest.pt`` keeps the one it replaces as ``checkpoint_previous.pt`` (the
fallback when the latest cannot be read, see :func:`uumamba.engine.resume.open_run`).
Its keys are the contract of ``docs/architecture.md``:

``model``, ``optimizer`` (SAM / ASAM state including the base optimizer's momentum buffers),
``loss`` (the learned σ), ``scaler`` (GradScaler or None), ``scheduler``, ``epoch``
(completed epochs), ``iteration`` (completed iterations), ``rng``, ``config`` (the run's
configuration as a JSON-compatible dict), ``plans`` (dict), ``splits``, ``fold``,
``finished``, ``best_metric`` (best validation mean Dice or None), ``metric_history``
(one dict per epoch, as in ``metrics.jsonl``).

Everything stored is a tensor or a plain Python container (the NumPy RNG state is converted to
a tensor), so checkpoints load with ``torch.load(weights_only=True)``: opening a checkpoint
never executes pickled code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from uumamba.errors import DataError, printable
from uumamba.utils import atomic_path

LATEST = "checkpoint_latest.pt"
PREVIOUS = "checkpoint_previous.pt"
BEST = "checkpoint_best.pt"

CHECKPOINT_KEYS: tuple[str, ...] = (
    "model", "optimizer", "loss", "scaler", "scheduler", "epoch", "iteration", "rng", "config",
    "plans", "splits", "fold", "finished", "best_metric", "metric_history",
)


def save_checkpoint(path: str | Path, state: dict[str, Any],
                    previous: str | Path | None = None) -> Path:
    """Write ``state`` with ``torch.save`` atomically and durably (temporary file, fsync,
    rename, fsync of the folder).

    Args:
        path: destination, e.g. ``fold_0/checkpoint_latest.pt``; parent folders are created.
        state: dict with at least :data:`CHECKPOINT_KEYS`; extra keys are kept.
        previous: where the checkpoint being replaced goes (``fold_0/checkpoint_previous.pt``);
            None: it is replaced.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: when a key of :data:`CHECKPOINT_KEYS` is missing (a programming error,
            caught before anything is written).
        OSError: writing failed (disk full...); ``path`` and ``previous`` are unchanged.
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"save_checkpoint({path}): state lacks keys {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=True, previous=previous) as tmp:
        torch.save(state, tmp)
    return path


#: Stored entries of a checkpoint may expand to at most this many times the file's size (plus
#: :data:`EXPANSION_SLACK_BYTES`): ``torch.save`` stores them uncompressed, so a larger total is
#: a crafted archive (a 2 MB file that unpacks to 2.4 GB), refused before it is unpacked.
MAX_EXPANSION = 2
EXPANSION_SLACK_BYTES = 1 << 20


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any], str, int]:
    """A checkpoint written by :func:`save_checkpoint`, with the SHA-256 (hex) and size (bytes)
    of the very bytes it was loaded from (a file replaced on disk afterwards changes nothing).

    The file is read once into memory; a zip archive (``torch.save``'s format) whose entries
    would expand beyond :data:`MAX_EXPANSION` times its size is refused before unpacking; the
    rest is ``torch.load(weights_only=True)`` (no pickled code runs) onto ``map_location``.

    Raises:
        DataError: the file does not exist or is not a regular file, is empty, truncated or
            corrupt, expands too far, holds objects the safe loader refuses, is not a uumamba
            checkpoint or lacks keys of :data:`CHECKPOINT_KEYS` (the file named in one line;
            never any of its content beyond the loader's first line).
    """
    import hashlib
    import io
    import stat

    path = Path(path)
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero never end
                raise DataError(f"{path}: checkpoint is not a regular file")
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: checkpoint is not a regular file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from None
    if not data:
        raise DataError(f"{path}: cannot read checkpoint (empty file); the file is truncated "
                        "or corrupt - restore it or delete it and train again")
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                unpacked = sum(entry.file_size for entry in archive.infolist())
        except (zipfile.BadZipFile, ValueError, OSError):
            unpacked = 0  # torch.load names the damage below
        if unpacked > MAX_EXPANSION * len(data) + EXPANSION_SLACK_BYTES:
            raise DataError(f"{path}: checkpoint entries would expand to {unpacked} bytes from "
                            f"{len(data)} (torch.save stores them uncompressed); refused")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the safe loader raises a dozen types on crafted bytes
        text = str(exc).strip()
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in text:
            reason = "it holds objects other than tensors and plain containers, refused unread"
        else:
            first = text.splitlines()[0] if text else ""
            reason = f"{type(exc).__name__}: {printable(first)[:200]}"
        raise DataError(f"{path}: cannot read checkpoint ({reason}); the file is truncated or "
                        "corrupt - restore it or delete it and train again") from None
    digest, size = hashlib.sha256(data).hexdigest(), len(data)
    del data
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a uumamba checkpoint (top level is {type(state).__name__})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise DataError(f"{path}: not a complete uumamba checkpoint; missing keys {missing}")
    model = state["model"]
    if not isinstance(model, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise DataError(f"{path}: not a uumamba checkpoint ('model' is not a mapping of "
                        "parameter names to tensors)")
    return state, digest, size


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`read_checkpoint`'s state alone. Raises DataError as it does."""
    return read_checkpoint(path, map_location)[0]
