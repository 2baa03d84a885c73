"""uumamba.ablation: the paper's ablation table on your data (``uumamba ablate``).

Every cell of a grid of configuration values (``--grid optim.name=adamw,sam --grid
loss.name=uncertainty,dice_ce``) is trained with the same budget, split, plan and inference
on each fold and seed asked for, its fold's validation cases are predicted and scored, and
the cells are compared with a reference cell.

- :mod:`~uumamba.ablation.grid`: ``--grid`` flags -> axes -> cells and their folder names;
  ``--folds``, ``--seeds``, ``--reference``;
- :mod:`~uumamba.ablation.run`: the validated request (every cell's configuration loaded up
  front), the shared split and plan, one child process per run, resumable;
- :mod:`~uumamba.ablation.child`: one run (train, predict, score, ``scores.json``), the
  child's entry point;
- :mod:`~uumamba.ablation.scores`: a run's ``scores.json``, checked for its run and its
  settings when read back; every JSON file of the ablation read with a size bound;
- :mod:`~uumamba.ablation.lock`: the ``flock`` locks that keep one invocation per OUTPUT
  and one child per run;
- :mod:`~uumamba.ablation.report`: ``ablation.csv``, ``ablation.md``, ``ablation.png``,
  ``ablation.json`` (statistics from :mod:`uumamba.evaluation.statistics`).

The names below are imported on first use, so ``import uumamba.ablation`` stays light.
"""

from __future__ import annotations

from uumamba.utils import lazy_exports

_EXPORTS = {
    "AblationRequest": "run",
    "AblationOutcome": "run",
    "make_request": "run",
    "run_ablation": "run",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
