"""Segmentation metrics: one implementation for validation, postprocessing, ``evaluate`` and
the service.

- :func:`dice_per_class` — Dice ``2|P∩G| / (|P| + |G|)`` per label value, NaN where the label
  is absent from both maps (nnU-Net / MONAI ``ignore_empty`` convention);
- :func:`nan_mean` and :func:`class_means` — means that skip NaN (class means over cases,
  the overall mean over classes);
- :func:`voxel_volume_ml` and :func:`label_volumes` — voxel counts and volumes in mL
  (count × product of the spacing in mm / 1000);
- :func:`case_metrics` — Dice, HD95 (mm), NSD, TP / FP / FN and volumes of one case, with the
  empty-mask policy of :mod:`uumamba.evaluation.evaluate`;
- :func:`surface_metrics` — HD95 and NSD of two non-empty binary masks (MONAI).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int],
                   ignore_label: int | None = None) -> dict[int, float]:
    """Dice of each label value between two integer label maps of one shape.

    Args:
        prediction / reference: integer arrays of identical shape (any dimensionality).
        labels: label values to score (usually the foreground labels).
        ignore_label: voxels with this reference value are excluded from every class.

    Returns:
        label -> Dice in [0, 1], NaN where the label is absent from both maps.

    Raises:
        ValueError: when the shapes differ (names both shapes).
    """
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"dice_per_class: prediction shape {prediction.shape} != reference "
                         f"shape {reference.shape}")
    valid = None if ignore_label is None else reference != ignore_label
    out: dict[int, float] = {}
    for c in labels:
        p = prediction == c
        g = reference == c
        if valid is not None:
            p &= valid
            g &= valid
        denom = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
        out[int(c)] = float("nan") if denom == 0 else 2.0 * int(np.count_nonzero(p & g)) / denom
    return out


def nan_mean(values: Iterable[float]) -> tuple[float, int]:
    """Mean of the non-NaN values and how many there were; (NaN, 0) when none is finite."""
    finite = [float(v) for v in values if not math.isnan(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)


def class_means(per_case: dict[str, dict[str, float]], class_names: Sequence[str]
                ) -> tuple[dict[str, float], float]:
    """Class means over cases and the overall mean over classes (NaN entries skipped).

    Args:
        per_case: case id -> class name -> Dice (or any score).
        class_names: the classes to average, in output order.

    Returns:
        (class name -> mean over cases, mean of those means over classes).
    """
    dice = {name: nan_mean(case[name] for case in per_case.values() if name in case)[0]
            for name in class_names}
    return dice, nan_mean(dice.values())[0]


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mL: product of the first three spacings (mm) / 1000."""
    return float(np.prod([float(s) for s in list(spacing)[:3]])) / 1000.0


def label_volumes(mask: np.ndarray, spacing: Sequence[float], labels: dict[int, str]
                  ) -> tuple[dict[str, int], dict[str, float]]:
    """Voxel counts and volumes in mL of every foreground label of ``mask``.

    Only the declared labels are counted (one comparison each), so any integer mask works:
    values outside ``labels`` (negative, or as large as 2**40) are simply not counted, and
    nothing is allocated by value.

    Args:
        mask: integer label map (x, y, z), any integer dtype.
        spacing: voxel size in mm per axis.
        labels: value -> name; 0 (background) is skipped; labels absent from ``mask`` get 0.

    Returns:
        (name -> voxel count, name -> mL).
    """
    voxel_ml = voxel_volume_ml(spacing)
    mask = np.asarray(mask)
    voxel_counts = {name: int(np.count_nonzero(mask == v))
                    for v, name in sorted(labels.items()) if v != 0}
    return voxel_counts, {name: n * voxel_ml for name, n in voxel_counts.items()}


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> tuple[float, float]:
    """HD95 (mm) and NSD of two non-empty binary masks.

    Args:
        pred, ref: boolean arrays of one shape (2D or 3D), both with at least one voxel.
        spacing: voxel size in mm per axis.
        tolerance_mm: NSD tolerance in mm.

    Returns:
        ``(hd95_mm, nsd)``. Source: MONAI ``compute_hausdorff_distance(percentile=95)`` and
        ``compute_surface_dice`` on surface voxels (mask minus its erosion).
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    y_pred = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))[None, None]
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI deprecation chatter inside get_mask_edges
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=sp)
        nsd = compute_surface_dice(
            y_pred, y, class_thresholds=[float(tolerance_mm)], include_background=True, spacing=sp
        )
    return float(hd95.item()), float(nsd.item())


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: dict[int, str],
    nsd_tolerance_mm: float = 2.0,
) -> dict[int, dict[str, float]]:
    """Metrics of one case for every foreground label (policy in
    :mod:`uumamba.evaluation.evaluate`).

    Args:
        pred, ref: integer label maps of the same shape (x, y, z), in one voxel grid.
        spacing: voxel size in mm per axis (the reference's).
        labels: label value -> name; label 0 (background) is skipped.
        nsd_tolerance_mm: NSD tolerance in mm.

    Returns:
        ``{label value: {"Dice", "HD95", "NSD", "TP", "FP", "FN", "n_pred", "n_ref",
        "volume_pred_ml", "volume_ref_ml"}}``; NaN where the empty-mask policy says so.

    Raises:
        ValueError: the shapes differ or the spacing has the wrong length.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {ref.ndim}D mask")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    foreground = sorted(v for v in labels if v != 0)
    dice = dice_per_class(pred, ref, foreground)
    out: dict[int, dict[str, float]] = {}
    for value in foreground:
        p, r = pred == value, ref == value
        tp = int(np.count_nonzero(p & r))
        n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(r))
        if n_pred == 0 or n_ref == 0:  # both empty: NaN everywhere; one empty: Dice / NSD 0
            hd95, nsd = math.nan, (math.nan if n_pred == n_ref else 0.0)
        else:
            hd95, nsd = surface_metrics(p, r, spacing, nsd_tolerance_mm)
        out[value] = {
            "Dice": dice[value], "HD95": hd95, "NSD": nsd, "TP": tp, "FP": n_pred - tp,
            "FN": n_ref - tp, "n_pred": n_pred, "n_ref": n_ref,
            "volume_pred_ml": n_pred * voxel_ml, "volume_ref_ml": n_ref * voxel_ml,
        }
    return out
