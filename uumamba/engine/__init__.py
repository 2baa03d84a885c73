"""Training engine: the step, the loop, checkpoints, validation, loggers and DDP.

Modules (one concern each): :mod:`~uumamba.engine.step` (one optimisation step, SAM / AMP /
clipping / non-finite skip), :mod:`~uumamba.engine.loop` (one fold's training loop:
``run_fold`` / ``train_fold``), :mod:`~uumamba.engine.prepare` (the model folder and the
fold's datasets), :mod:`~uumamba.engine.components` (network, loss, optimizer, schedule,
precision, seeding), :mod:`~uumamba.engine.sampling` (the seeded patch stream),
:mod:`~uumamba.engine.resume` (loop state, checkpoint state, ``--resume``),
:mod:`~uumamba.engine.signals` (SIGINT / SIGTERM), :mod:`~uumamba.engine.checkpoint`
(checkpoint files, RNG states), :mod:`~uumamba.engine.validate` (sliding-window validation
Dice), :mod:`~uumamba.engine.callbacks` (progress bar, metrics.jsonl, TensorBoard, pictures)
and :mod:`~uumamba.engine.distributed` (torchrun / DDP). :mod:`~uumamba.engine.train` keeps
the historical import path of the entry points.

The names below are imported on first use, so ``import uumamba.engine`` stays light.
"""
from __future__ import annotations

from uumamba.utils import lazy_exports

_EXPORTS = {
    "train_fold": "loop",
    "run_fold": "loop",
    "FoldResult": "loop",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "CHECKPOINT_KEYS": "checkpoint",
    "validate": "validate",
    "ValidationResult": "validate",
    "Callback": "callbacks",
    "training_step": "step",
    "StepResult": "step",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
