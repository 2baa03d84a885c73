"""What a training checkpoint holds beyond the weights: the global RNG states.

The checkpoint *file* (names ``checkpoint_latest.pt`` / ``checkpoint_previous.pt`` /
``checkpoint_best.pt``, required keys, atomic and durable save, safe load) belongs to the
model folder, :mod:`uumamba.model_folder.checkpoints`; its names are re-exported here for the
engine's callers.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from uumamba.model_folder.checkpoints import (
    BEST,
    CHECKPOINT_KEYS,
    LATEST,
    PREVIOUS,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["BEST", "CHECKPOINT_KEYS", "LATEST", "PREVIOUS", "capture_rng_state", "load_checkpoint",
           "restore_rng_state", "save_checkpoint"]


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
