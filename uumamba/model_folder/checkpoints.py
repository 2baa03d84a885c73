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

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from uumamba.errors import DataError
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Loads with ``weights_only=True`` (no arbitrary code runs) onto ``map_location``.

    Raises:
        DataError: the file does not exist, is truncated or corrupt, is not a uumamba
            checkpoint, or lacks keys of :data:`CHECKPOINT_KEYS` (all named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: cannot read checkpoint (empty file); the file is truncated "
                        "or corrupt - restore it or delete it and train again")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(
            f"{path}: cannot read checkpoint ({type(exc).__name__}: {first_line}); the file is "
            "truncated or corrupt - restore it or delete it and train again"
        ) from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a uumamba checkpoint (top level is {type(state).__name__})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise DataError(f"{path}: not a complete uumamba checkpoint; missing keys {missing}")
    return state
