"""uumamba.evaluation: Dice, HD95 (mm), NSD and volumes of predicted label maps.

Public API: :func:`evaluate_folders`, :func:`evaluate_pairs`, :func:`case_metrics`,
:func:`write_summary` (``summary.json`` + ``metrics.csv``) and :func:`evaluate_from_cli`
(module ``evaluate``; the empty-mask policy is in its docstring).
"""

from uumamba.evaluation.evaluate import (
    case_metrics,
    evaluate_folders,
    evaluate_from_cli,
    evaluate_pairs,
    write_summary,
)

__all__ = ["case_metrics", "evaluate_folders", "evaluate_from_cli", "evaluate_pairs", "write_summary"]
