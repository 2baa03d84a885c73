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

from __future__ import annotations

from uumamba.utils import lazy_exports

#: Public name -> submodule. Imported on first use (PEP 562), so that ``uumamba predict`` can
#: read inputs and refuse a bad file before torch and MONAI load.
_EXPORTS = {
    "OUTPUT_FORMATS": "writer",
    "Prediction": "predict",
    "Predictor": "predict",
    "apply_postprocessing": "postprocess",
    "check_output_dir": "inputs",
    "determine_postprocessing": "postprocess",
    "input_cases": "inputs",
    "sliding_window_probabilities": "sliding",
    "write_prediction": "writer",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
