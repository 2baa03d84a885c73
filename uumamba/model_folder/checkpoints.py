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

import hashlib
import io
import os
import pickle
import stat
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


#: The largest checkpoint read (bytes), checked before reading: a 3D model's weights with its
#: optimizer state are some hundred MB.
MAX_CHECKPOINT_BYTES = 4 << 30
#: Entries of a zip checkpoint must be stored uncompressed (``torch.save`` never compresses:
#: a deflated entry is a crafted archive, a 2 MB file that unpacks to 2 GB) and at most this
#: many.
MAX_ENTRIES = 100_000
#: Tensor dtypes a checkpoint's ``model`` may hold (float8, complex and quantized ones are no
#: uumamba weights; complex would be cast to real silently, NaN included).
WEIGHT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64,
                           torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.bool})


def _check_archive(path: Path, data: bytes) -> None:
    """Refuse a zip checkpoint that Python's reader cannot read (torch's is more lenient, so a
    malformed directory could hide a deflated entry), with compressed or too many entries."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read checkpoint (its zip directory is damaged: "
                        f"{printable(exc)[:120]}); the file is truncated or corrupt - "
                        "restore it or delete it and train again") from None
    if len(entries) > MAX_ENTRIES:
        raise DataError(f"{path}: checkpoint has {len(entries)} entries, more than "
                        f"{MAX_ENTRIES}; refused")
    packed = [e for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise DataError(f"{path}: checkpoint entry {printable(packed[0].filename)[:80]} is "
                        "compressed (torch.save stores entries uncompressed); refused unpacked")


def _check_model(path: Path, model: object) -> None:
    """``model`` must map names to dense CPU tensors of :data:`WEIGHT_DTYPES`."""
    if not isinstance(model, dict):
        raise DataError(f"{path}: not a uumamba checkpoint ('model' is not a mapping of "
                        "parameter names to tensors)")
    for name, value in model.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise DataError(f"{path}: not a uumamba checkpoint ('model' is not a mapping of "
                            "parameter names to tensors)")
        if (type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter)) \
                or value.layout != torch.strided or value.is_meta or value.is_quantized \
                or value.is_nested or value.dtype not in WEIGHT_DTYPES:
            raise DataError(f"{path}: weights {printable(name)[:80]} are not a dense tensor of "
                            f"a real dtype ({printable(value.dtype)}, {printable(value.layout)})")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any], str, int]:
    """A checkpoint written by :func:`save_checkpoint`, with the SHA-256 (hex) and size (bytes)
    of the very bytes it was loaded from (a file replaced on disk afterwards changes nothing).

    The file (at most :data:`MAX_CHECKPOINT_BYTES`, checked before reading) is read once into
    memory; a zip archive (``torch.save``'s format) must be readable by Python's zip reader,
    its entries stored uncompressed (so nothing expands beyond the file) and at most
    :data:`MAX_ENTRIES`, before ``torch.load(weights_only=True)`` (no pickled code runs) unpacks
    it onto ``map_location``; ``model`` must map names to dense tensors of
    :data:`WEIGHT_DTYPES`.

    Raises:
        DataError: the file does not exist, is not a regular file, is empty or too large, is
            truncated or corrupt, has compressed or too many entries, holds objects the safe
            loader refuses or weights of another kind, is not a uumamba checkpoint or lacks
            keys of :data:`CHECKPOINT_KEYS` (the file named in one line; never any of its
            content beyond the loader's first line).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero never end
                raise DataError(f"{path}: checkpoint is not a regular file")
            if info.st_size > MAX_CHECKPOINT_BYTES:
                raise DataError(f"{path}: checkpoint is {info.st_size} bytes, more than "
                                f"{MAX_CHECKPOINT_BYTES} (the limit); refused unread")
            data = f.read(MAX_CHECKPOINT_BYTES + 1)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: checkpoint is not a regular file") from None
    except MemoryError:
        raise DataError(f"{path}: cannot read checkpoint (not enough memory)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from None
    if not data:
        raise DataError(f"{path}: cannot read checkpoint (empty file); the file is truncated "
                        "or corrupt - restore it or delete it and train again")
    if len(data) > MAX_CHECKPOINT_BYTES:  # grew while read
        raise DataError(f"{path}: checkpoint is more than {MAX_CHECKPOINT_BYTES} bytes; "
                        "refused")
    if data[:4] == b"PK\x03\x04" or zipfile.is_zipfile(io.BytesIO(data)):
        _check_archive(path, data)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except MemoryError:
        raise DataError(f"{path}: cannot read checkpoint (not enough memory)") from None
    except Exception as exc:  # noqa: BLE001 - the safe loader raises a dozen types on crafted bytes
        text = str(exc).strip()
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in text.lower() \
                or "Weights only load failed" in text:
            # torch's text advises weights_only=False: never to be repeated to a user
            reason = ("the safe loader refused it: not tensors and plain containers only"
                      if "unsupported global" in text.lower()
                      else "the safe loader refused its bytes")
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
    _check_model(path, state["model"])
    return state, digest, size


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`read_checkpoint`'s state alone. Raises DataError as it does."""
    return read_checkpoint(path, map_location)[0]
