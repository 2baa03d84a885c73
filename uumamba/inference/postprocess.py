"""Largest-connected-component postprocessing and nnU-Net's rule for when to apply it.

Keeping only the largest connected component of a class removes spurious islands (a blob of
"LV" in the liver), but it can also delete real disconnected parts of a structure (a vessel
split by the field of view). nnU-Net therefore decides empirically: on the validation
predictions of a trained model, it keeps the postprocessing for a class only where it raises
that class's mean Dice. This module does the same, per class:

1. :func:`determine_postprocessing` compares the mean Dice of each foreground class on the
   validation cases without and with largest-component filtering of that class, and enables
   it where the mean Dice increases (strictly);
2. the decision is stored as ``postprocessing.json`` in the fold folder
   (:func:`save_postprocessing`);
3. the predictor loads it (:func:`load_postprocessing`) and applies it to every mask
   (:func:`apply_postprocessing`).

Connectivity is full (26-neighbourhood in 3D, 8 in 2D), as MONAI's
``KeepLargestConnectedComponent`` uses by default; removed voxels become background (0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from uumamba.errors import DataError
from uumamba.utils import atomic_path

POSTPROCESSING_FILE = "postprocessing.json"


def largest_component(binary: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest connected component (full connectivity) of ``binary``.

    Args:
        binary: boolean array (any number of dimensions).

    Returns:
        Boolean array of the same shape; all False when ``binary`` is empty. Ties keep the
        component found first in C order.
    """
    binary = np.asarray(binary, dtype=bool)
    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)
    components, n = ndimage.label(binary, structure=structure)
    if n <= 1:
        return binary.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def apply_postprocessing(mask: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """Keep only the largest connected component of each class listed in ``spec``.

    Args:
        mask: integer label map (x, y, z) (any integer dtype; returned with the same dtype).
        spec: ``{"largest_component_labels": [values...], ...}`` as written by
            :func:`determine_postprocessing`; ``None`` or an empty list leaves ``mask`` as is.

    Returns:
        A new label map; voxels of the removed components are set to 0.
    """
    out = np.array(mask, copy=True)
    for value in (spec or {}).get("largest_component_labels", []):
        binary = out == int(value)
        if binary.any():
            out[binary & ~largest_component(binary)] = 0
    return out


def _class_dice(pred: np.ndarray, ref: np.ndarray, value: int) -> float:
    p, r = pred == value, ref == value
    denom = int(p.sum()) + int(r.sum())
    return float("nan") if denom == 0 else 2.0 * float((p & r).sum()) / denom


def _mean_dice(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], value: int) -> float:
    values = [_class_dice(p, r, value) for p, r in zip(preds, refs, strict=True)]
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def determine_postprocessing(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: dict[int, str]
) -> dict[str, Any]:
    """Decide per class whether largest-component filtering improves validation Dice.

    Args:
        preds: predicted label maps of the validation cases (integer arrays).
        refs: the reference label maps, same order and shapes.
        labels: label value -> name; background (0) is never filtered.

    Returns:
        The spec saved as ``postprocessing.json``: ``largest_component_labels`` (values
        where it helps), ``dice_before`` / ``dice_after`` (per class name: mean Dice over the
        cases, NaN-ignoring, without / with filtering of that class alone), ``n_cases``,
        ``connectivity``.

    Raises:
        ValueError: the lists differ in length, are empty, or a pair differs in shape.

    Source: nnU-Net's postprocessing selection (Isensee et al., Nature Methods 2021), per
    class; the "all foreground as one region" step is not done.
    """
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"need equally many predictions and references, got {len(preds)} and {len(refs)}")
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        if p.shape != r.shape:
            raise ValueError(f"case {i}: prediction shape {p.shape} differs from reference {r.shape}")
    enabled: list[int] = []
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for value in sorted(v for v in labels if v != 0):
        name = labels[value]
        spec = {"largest_component_labels": [value]}
        before[name] = _mean_dice(preds, refs, value)
        after[name] = _mean_dice([apply_postprocessing(p, spec) for p in preds], refs, value)
        if after[name] > before[name]:
            enabled.append(value)
    return {
        "largest_component_labels": enabled,
        "dice_before": before,
        "dice_after": after,
        "n_cases": len(preds),
        "connectivity": "full",
    }


def save_postprocessing(spec: dict[str, Any], fold_dir: str | Path) -> Path:
    """Write ``spec`` to ``fold_dir/postprocessing.json`` atomically (NaN as null)."""
    path = Path(fold_dir) / POSTPROCESSING_FILE

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return None if isinstance(v, float) and np.isnan(v) else v

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(clean(spec), indent=2))
    return path


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
        labels = [int(v) for v in spec.get("largest_component_labels", [])]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: cannot read postprocessing spec: {exc}") from None
    return {**spec, "largest_component_labels": labels}


def load_postprocessing(model_dir: str | Path, fold_dirs: Sequence[str | Path]) -> dict[str, Any] | None:
    """The postprocessing the predictor applies for an ensemble of ``fold_dirs``.

    ``model_dir/postprocessing.json`` (e.g. decided on the whole cross-validation) wins when
    present. Otherwise each fold's ``postprocessing.json`` is read and a class is filtered
    only if every fold enabled it (a fold without the file enables nothing).

    Returns:
        A spec for :func:`apply_postprocessing`, or ``None`` when nothing is enabled.

    Raises:
        DataError: a ``postprocessing.json`` is not readable JSON of the expected form.
    """
    root_file = Path(model_dir) / POSTPROCESSING_FILE
    if root_file.is_file():
        spec = _read_spec(root_file)
        return spec if spec["largest_component_labels"] else None
    common: set[int] | None = None
    for fold_dir in fold_dirs:
        path = Path(fold_dir) / POSTPROCESSING_FILE
        labels = set(_read_spec(path)["largest_component_labels"]) if path.is_file() else set()
        common = labels if common is None else common & labels
    if not common:
        return None
    return {"largest_component_labels": sorted(common), "source": [str(f) for f in fold_dirs]}
