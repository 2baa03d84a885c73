"""The ``GET /v1/model`` answer: a trained model folder described as :class:`ModelInfo`.

The folder is read through its owner, :class:`uumamba.model_folder.ModelFolder` (validation,
``plans.json``, ``config.yaml``, labels, checkpoint digests, model version), without loading
any network, so a missing or damaged folder is reported in one line before the server starts.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import uumamba
from uumamba.model_folder import ModelFolder

from .models import ModelInfo, WeightsFile


def describe_model(model_dir: str | Path, folds: list[str] | None = None) -> ModelInfo:
    """Build the ``GET /v1/model`` answer for a model folder (hashes every checkpoint used).

    Labels (``dataset.json``'s names over the plan's), modality, target spacing and patch size
    come from the folder's plans and labels, architecture and TTA default from ``config.yaml``.

    Raises:
        UserError: the folder is not a trained model folder (:meth:`ModelFolder.require`), or
            ``plans.json`` / ``config.yaml`` / ``dataset.json`` is invalid.
    """
    folder = ModelFolder(model_dir).require(folds)
    plans = folder.load_plans()
    cfg = folder.load_config()
    digests = folder.digests(folds)
    return ModelInfo(
        name=folder.name,
        version=ModelFolder.version(digests),
        architecture=cfg.model.name,
        spatial_dims=plans.spatial_dims,
        labels=dict(sorted(folder.labels(plans).items())),
        modality=plans.modality,
        target_spacing_mm=[float(s) for s in plans.target_spacing],
        resampling_spacing_mm=[float(s) for s in plans.resampling_spacing],
        patch_size=[int(s) for s in plans.patch_size],
        folds=[d.fold for d in digests],
        weights=[WeightsFile(**asdict(d)) for d in digests],
        tta_default=cfg.inference.tta,
        package_version=uumamba.__version__,
    )


def load_predictor(model_dir: str | Path, folds: list[str] | None, device: str,
                   predictor: Any = None, info: ModelInfo | None = None) -> tuple[Any, ModelInfo]:
    """The predictor of a model folder (built unless given) and the folder's
    :class:`ModelInfo` (described unless given), whose labels are the names the predictor
    writes when it has them.

    One place for the API process (:mod:`uumamba_service.lifespan`) and both kinds of
    ``uumamba worker``.

    Raises:
        UserError: as :func:`describe_model`, or the predictor refuses the folder.
    """
    info = info if info is not None else describe_model(model_dir, folds)
    if predictor is None:
        from uumamba.inference.predict import Predictor

        predictor = Predictor.from_model_dir(model_dir, folds=[f.removeprefix("fold_") for f in info.folds],
                                             device=device)
    labels = getattr(predictor, "labels", None)
    if labels:  # the names the predictor writes win
        info = info.model_copy(update={"labels": dict(sorted(labels.items()))})
    return predictor, info
