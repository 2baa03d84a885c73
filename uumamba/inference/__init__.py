"""uumamba.inference: segment images with a trained model folder.

Public API (see docs/architecture.md):

- :class:`Predictor` (``Predictor.from_model_dir(model_dir, folds, device, tta)``,
  ``predict_file(path) -> Prediction``) and :func:`predict_from_cli` — ``predict``;
- :func:`sliding_window_probabilities` — Gaussian-weighted sliding-window softmax with
  mirroring TTA (``sliding``);
- :func:`determine_postprocessing`, :func:`apply_postprocessing` — largest-component
  filtering where validation shows it helps (``postprocess``).
"""

from uumamba.inference.postprocess import (
    apply_postprocessing,
    determine_postprocessing,
    load_postprocessing,
    save_postprocessing,
)
from uumamba.inference.predict import Prediction, Predictor, predict_from_cli
from uumamba.inference.sliding import sliding_window_probabilities

__all__ = [
    "Prediction",
    "Predictor",
    "apply_postprocessing",
    "determine_postprocessing",
    "load_postprocessing",
    "predict_from_cli",
    "save_postprocessing",
    "sliding_window_probabilities",
]
