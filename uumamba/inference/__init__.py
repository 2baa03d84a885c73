"""uumamba.inference: segment images with a trained model folder.

Public API (see docs/architecture.md):

- :class:`Predictor` (``Predictor.from_model_dir(model_dir, folds, device, tta)``,
  ``predict_file(path) -> Prediction``) — preprocessing, fold ensemble, inversion (``predict``);
- :func:`sliding_window_probabilities` — Gaussian-weighted sliding-window softmax with
  mirroring TTA (``sliding``);
- :func:`determine_postprocessing`, :func:`apply_postprocessing` — largest-component
  filtering where validation shows it helps (``postprocess``);
- :func:`input_cases` — the cases of an input file or folder (``inputs``);
- :func:`write_prediction` — mask, probabilities, entropy and volumes of one case (``writer``).

This package reads the model folder through :mod:`uumamba.model_folder` and never imports the
training engine.
"""

from uumamba.inference.inputs import check_output_dir, input_cases
from uumamba.inference.postprocess import apply_postprocessing, determine_postprocessing
from uumamba.inference.predict import Prediction, Predictor
from uumamba.inference.sliding import sliding_window_probabilities
from uumamba.inference.writer import OUTPUT_FORMATS, write_prediction

__all__ = [
    "OUTPUT_FORMATS",
    "Prediction",
    "Predictor",
    "apply_postprocessing",
    "check_output_dir",
    "determine_postprocessing",
    "input_cases",
    "sliding_window_probabilities",
    "write_prediction",
]
