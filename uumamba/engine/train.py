"""Compatibility module: the training entry points under their historical import path.

``uumamba train``'s loop lives in :mod:`uumamba.engine.loop` (its docstring documents the
flow, reproducibility, resume semantics, stopping, ``metrics.jsonl`` and distributed runs);
the pieces it calls are :mod:`~uumamba.engine.prepare` (model folder),
:mod:`~uumamba.engine.components`, :mod:`~uumamba.engine.sampling` (seeded patch stream),
:mod:`~uumamba.engine.resume` (loop state, checkpoints, ``--resume``) and
:mod:`~uumamba.engine.signals`. The command line itself is :mod:`uumamba.commands`.
"""

from uumamba.engine.loop import FoldResult, run_fold, train_fold
from uumamba.engine.prepare import prepare_model_folder
from uumamba.engine.resume import resume_config
from uumamba.engine.sampling import PatchBatchSampler, SeededPatchDataset, make_patch_loader

__all__ = ["FoldResult", "PatchBatchSampler", "SeededPatchDataset", "make_patch_loader",
           "prepare_model_folder", "resume_config", "run_fold", "train_fold"]
