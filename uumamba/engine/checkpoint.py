"""Training checkpoints: one ``torch.save`` dict holding everything a run needs to continue.

A checkpoint is written through :func:`uumamba.utils.atomic_path` (temporary name, then
rename), so an interrupted save never leaves a truncated ``checkpoint_latest.pt`` behind.
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
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uumamba.errors import DataError
from uumamba.utils import atomic_path

LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"

CHECKPOINT_KEYS: tuple[str, ...] = (
    "model", "optimizer", "loss", "scaler", "scheduler", "epoch", "iteration", "rng", "config",
    "plans", "splits", "fold", "finished", "best_metric", "metric_history",
)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` with ``torch.save`` atomically (temporary file, then rename).

    Args:
        path: destination, e.g. ``fold_0/checkpoint_latest.pt``; parent folders are created.
        state: dict with at least :data:`CHECKPOINT_KEYS`; extra keys are kept.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: when a key of :data:`CHECKPOINT_KEYS` is missing (a programming error,
            caught before anything is written).
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"save_checkpoint({path}): state lacks keys {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
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


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global RNGs: Python ``random``, NumPy, torch CPU and (if present) CUDA.

    Returns:
        dict with ``python`` (``random.getstate()``), ``numpy`` (dict: ``keys`` int64 tensor of
        the 624 MT19937 words, ``pos``, ``has_gauss``, ``cached_gaussian``), ``torch`` (uint8
        tensor) and ``cuda`` (list of uint8 tensors, one per device, or None).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - legacy global RNG on purpose
    return {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNGs from :func:`capture_rng_state`'s dict.

    The CUDA states are restored only when CUDA is available and the number of devices
    matches; otherwise they are skipped (a CPU resume of a GPU run is still valid).
    """
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((  # noqa: NPY002 - legacy global RNG on purpose
        npst["name"], np.asarray(npst["keys"].cpu().numpy(), dtype=np.uint32), npst["pos"],
        npst["has_gauss"], npst["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
