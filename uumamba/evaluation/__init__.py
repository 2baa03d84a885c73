"""uumamba.evaluation: Dice, HD95 (mm), NSD and volumes of predicted label maps.

- :mod:`~uumamba.evaluation.metrics`: the metrics themselves (Dice per class, NaN-skipping
  means, volumes in mL, HD95 / NSD, one case's metrics) — used by training validation, the
  postprocessing decision, ``evaluate`` and the service;
- :mod:`~uumamba.evaluation.evaluate`: folders of masks paired by case name, the summary
  (``summary.json`` + ``metrics.csv``, nnU-Net's layout) and the empty-mask policy.
"""

from uumamba.evaluation.evaluate import evaluate_folders, evaluate_pairs, write_summary
from uumamba.evaluation.metrics import case_metrics, dice_per_class, label_volumes

__all__ = ["case_metrics", "dice_per_class", "evaluate_folders", "evaluate_pairs",
           "label_volumes", "write_summary"]
