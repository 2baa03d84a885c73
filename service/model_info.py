"""Describe a trained model folder: validation, metadata and SHA-256 of the weights.

Reads the model folder layout of ``docs/architecture.md`` (``plans.json``, ``config.yaml``,
``fold_K/checkpoint_{best,latest}.pt``) without loading any network, so a
missing or damaged folder is reported in one line before the server starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import uumamba
from uumamba.config import load_config
from uumamba.data.plan import Plans
from uumamba.errors import UserError

from .models import ModelInfo, WeightsFile


def fold_checkpoints(model_dir: Path, folds: list[str] | None = None) -> dict[str, Path]:
    """Fold folder name -> the checkpoint the predictor loads for it
    (:func:`uumamba.inference.predict.find_fold_checkpoints`: best, else latest).

    Raises:
        UserError: no fold has a checkpoint, or a requested fold has none.
    """
    from uumamba.inference.predict import find_fold_checkpoints

    return find_fold_checkpoints(model_dir, folds)


def validate_model_dir(model_dir: str | Path, folds: list[str] | None = None) -> Path:
    """Check that ``model_dir`` is a trained model folder; return it as a resolved ``Path``.

    Raises:
        UserError: one line naming the folder and what is missing (the folder, ``plans.json``,
            ``config.yaml`` or any ``fold_*/checkpoint_*.pt``), or that ``plans.json`` is not JSON.
            The message names the folder and the problem.
    """
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"model folder {path} does not exist (train one with 'uumamba train')")
    for name in ("plans.json", "config.yaml"):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a trained model folder: {name} is missing")
    _read_json(path / "plans.json")
    fold_checkpoints(path, folds)
    return path.resolve()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file, hex, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def describe_model(model_dir: str | Path, folds: list[str] | None = None) -> ModelInfo:
    """Build the ``GET /v1/model`` answer for a model folder (hashes every checkpoint used).

    Labels, modality, target spacing and patch size come from ``plans.json``
    (:class:`uumamba.data.plan.Plans`), architecture and TTA default from ``config.yaml``.

    Raises:
        UserError: the folder is not a valid model folder (see :func:`validate_model_dir`),
            or ``plans.json`` / ``config.yaml`` is invalid (ConfigError).
    """
    path = validate_model_dir(model_dir, folds)
    plans = Plans.load(path / "plans.json")
    cfg = load_config(path / "config.yaml")
    checkpoints = fold_checkpoints(path, folds)
    weights = [
        WeightsFile(fold=fold, file=ckpt.relative_to(path).as_posix(), sha256=sha256_file(ckpt),
                    size_bytes=ckpt.stat().st_size)
        for fold, ckpt in checkpoints.items()
    ]
    version = hashlib.sha256("".join(w.sha256 for w in weights).encode()).hexdigest()[:12]
    return ModelInfo(
        name=path.name,
        version=version,
        architecture=cfg.model.name,
        spatial_dims=plans.spatial_dims,
        labels=dict(sorted(plans.labels.items())),
        modality=plans.modality,
        target_spacing_mm=[float(s) for s in plans.target_spacing],
        patch_size=[int(s) for s in plans.patch_size],
        folds=list(checkpoints),
        weights=weights,
        tta_default=cfg.inference.tta,
        package_version=uumamba.__version__,
    )
