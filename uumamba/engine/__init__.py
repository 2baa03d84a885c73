"""Training engine: the step, the loop, checkpoints, validation, loggers and DDP.

Modules (one concern each): :mod:`~uumamba.engine.step` (one optimisation step, SAM / AMP /
clipping / non-finite skip), :mod:`~uumamba.engine.train` (``uumamba train``: the loop and its
seeded patch stream), :mod:`~uumamba.engine.checkpoint` (atomic checkpoints, RNG states),
:mod:`~uumamba.engine.validate` (sliding-window validation Dice),
:mod:`~uumamba.engine.callbacks` (progress bar, metrics.jsonl, TensorBoard, pictures) and
:mod:`~uumamba.engine.distributed` (device selection, torchrun / DDP).

The names below are imported on first use, so ``import uumamba.engine`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train_fold": "uumamba.engine.train",
    "train_from_cli": "uumamba.engine.train",
    "run_fold": "uumamba.engine.train",
    "FoldResult": "uumamba.engine.train",
    "save_checkpoint": "uumamba.engine.checkpoint",
    "load_checkpoint": "uumamba.engine.checkpoint",
    "CHECKPOINT_KEYS": "uumamba.engine.checkpoint",
    "validate": "uumamba.engine.validate",
    "ValidationResult": "uumamba.engine.validate",
    "Callback": "uumamba.engine.callbacks",
    "training_step": "uumamba.engine.step",
    "StepResult": "uumamba.engine.step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'uumamba.engine' has no attribute {name!r}")
