"""Score predicted label maps against references: Dice, HD95, NSD and volumes per class.

Per case and per foreground class (values from 1):

- ``Dice`` = 2 TP / (2 TP + FP + FN), with voxel counts ``TP``, ``FP``, ``FN``;
- ``HD95``: 95th-percentile Hausdorff distance in mm between the mask surfaces, from the
  reference's voxel spacing (MONAI ``compute_hausdorff_distance``, percentile 95: the larger
  of the two directed 95th percentiles);
- ``NSD``: normalised surface distance (surface Dice) at a tolerance in mm (MONAI
  ``compute_surface_dice``; Nikolov et al., 2021): the fraction of both surfaces lying within
  the tolerance of the other;
- ``volume_pred_ml`` / ``volume_ref_ml``: voxel count x voxel volume (mm^3) / 1000.

Empty-mask policy (nnU-Net's convention for Dice, extended to the distances):

============================  =====  ====  ====  ========================================
case                          Dice   HD95  NSD   in the means
============================  =====  ====  ====  ========================================
both empty                    NaN    NaN   NaN   excluded from every mean (counted)
reference empty, pred. not    0      NaN   0     Dice / NSD included; HD95 excluded (counted)
prediction empty, ref. not    0      NaN   0     Dice / NSD included; HD95 excluded (counted)
============================  =====  ====  ====  ========================================

A distance to an empty surface is undefined, so HD95 is NaN there rather than an arbitrary
penalty; the summary counts such cases (``n_hd95_undefined``) so they are never silently lost,
and every mean stays finite. NaN values are written as ``null`` in ``summary.json`` and as
empty cells in ``metrics.csv``.

``summary.json`` follows nnU-Net's ``summary.json``: ``metric_per_case`` (one entry per case
with ``metrics`` keyed by label value), ``mean`` (per label: mean over cases, ignoring NaN),
``foreground_mean`` (mean over foreground labels of the per-label means).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uumamba.data.check import exact, label_values
from uumamba.data.io import Geometry, read_image
from uumamba.data.layouts import IMAGE_SUFFIXES, split_suffix
from uumamba.errors import DataError, UserError
from uumamba.evaluation.metrics import case_metrics, nan_mean
from uumamba.utils import atomic_path, json_safe

#: Metric names averaged in the summary, in output order.
MEAN_METRICS: tuple[str, ...] = ("Dice", "HD95", "NSD", "volume_pred_ml", "volume_ref_ml")
#: Per-class fields of a case, in CSV column order.
CASE_FIELDS: tuple[str, ...] = (
    "Dice", "HD95", "NSD", "TP", "FP", "FN", "n_pred", "n_ref", "volume_pred_ml", "volume_ref_ml",
)
#: Stem endings of prediction side outputs that are not label maps.
_SIDE_OUTPUT_TAGS = ("_probabilities", "_entropy", "_volumes")

EMPTY_POLICY = (
    "both empty: Dice/HD95/NSD undefined (null in JSON, empty in CSV), excluded from means; "
    "one empty: Dice 0, NSD 0, HD95 undefined (excluded from the HD95 mean, counted in "
    "n_hd95_undefined)"
)


_INT32, _INT64 = np.iinfo(np.int32), np.iinfo(np.int64)


def _read_labels(path: Path, labels: Collection[int] | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a label map; its values are checked in their own dtype before any conversion.

    Float maps are accepted when every value lies within 1e-3 of an integer (rounded). The
    distinct values (:func:`uumamba.data.check.label_values`, so no value is ever narrowed or
    used as an allocation size) must be among ``labels`` (0 always allowed) when given. The
    map is returned as int32 when its values fit, else int64 — never wrapped.

    Raises:
        DataError: the file is unreadable or not 3D; it holds NaN / Inf, non-integer values
            or a non-numeric dtype; a value is not a declared label, or (no labels given)
            lies outside the int64 range — the message names the file and the exact value.
    """
    array, geometry = read_image(path)
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3D label map, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise DataError(f"{path}: label map has {int((~finite).sum())} NaN / Inf voxel(s)")
        rounded = np.rint(array)
        off = ~np.isclose(array, rounded, rtol=1e-5, atol=1e-3)
        if off.any():
            raise DataError(f"{path}: label map has non-integer values, e.g. "
                            f"{exact(array[off][0])} (dtype {array.dtype})")
        array = rounded
    elif not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: label map of dtype {array.dtype}: expected integer values")
    values = [int(v) for v in label_values(array)]  # exact Python integers
    if labels is not None:
        allowed = {int(v) for v in labels} | {0}
        unknown = [v for v in values if v not in allowed]
        if unknown:
            more = f" (and {len(unknown) - 1} more undeclared value(s))" if len(unknown) > 1 else ""
            raise DataError(f"{path}: label value {unknown[0]} is not a declared label{more} "
                            f"(declared: {sorted(allowed)})")
    if values and (values[0] < _INT64.min or values[-1] > _INT64.max):
        bad = values[0] if values[0] < _INT64.min else values[-1]
        raise DataError(f"{path}: label value {bad} is outside the int64 range")
    fits_int32 = not values or (values[0] >= _INT32.min and values[-1] <= _INT32.max)
    return array.astype(np.int32 if fits_int32 else np.int64, copy=False), geometry


def summarise(
    per_case: list[dict[str, Any]], labels: dict[int, str], nsd_tolerance_mm: float
) -> dict[str, Any]:
    """Build the summary dict from per-case entries (``{"case", ..., "metrics"}``).

    ``mean[label]`` holds the NaN-ignoring mean of each metric in :data:`MEAN_METRICS`, the
    number of cases it averages (``n_Dice``, ``n_HD95``, ...), ``n_both_empty`` and
    ``n_hd95_undefined``. ``foreground_mean`` averages the per-label means over foreground
    labels (labels with no finite mean are skipped).
    """
    mean: dict[str, dict[str, Any]] = {}
    for value in sorted(v for v in labels if v != 0):
        rows = [c["metrics"][value] for c in per_case]
        entry: dict[str, Any] = {"name": labels[value]}
        for metric in MEAN_METRICS:
            entry[metric], entry[f"n_{metric}"] = nan_mean(r[metric] for r in rows)
        entry["n_both_empty"] = sum(1 for r in rows if r["n_pred"] == 0 and r["n_ref"] == 0)
        entry["n_hd95_undefined"] = sum(
            1 for r in rows if (r["n_pred"] == 0) != (r["n_ref"] == 0)
        )
        mean[str(value)] = entry
    foreground = {
        metric: nan_mean(m[metric] for m in mean.values())[0] for metric in ("Dice", "HD95", "NSD")
    }
    return {
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "empty_mask_policy": EMPTY_POLICY,
        "n_cases": len(per_case),
        "metric_per_case": [
            {**c, "metrics": {str(k): v for k, v in c["metrics"].items()}} for c in per_case
        ],
        "mean": mean,
        "foreground_mean": foreground,
    }


def _fmt(value: Any) -> str:
    """A geometry field for a message: numbers rounded to 4 significant digits."""
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def evaluate_pairs(
    pairs: Sequence[tuple[str, str | Path, str | Path]],
    labels: dict[int, str],
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, Any]:
    """Score ``(case_id, prediction_path, reference_path)`` triples; see :func:`summarise`.

    The spacing comes from the reference; the prediction must have the reference's shape,
    spacing, origin and direction (relative tolerance 1e-3).

    Raises:
        DataError: a file is unreadable, not 3D, not integer-valued, holds a value that is not
            among ``labels`` (background 0 always allowed; named exactly, never narrowed: a
            prediction value 2**32 + 3 is refused, not scored as label 3), or its geometry
            differs from its reference (names both files).
    """
    per_case = []
    for case_id, pred_path, ref_path in pairs:
        pred, pred_geom = _read_labels(Path(pred_path), labels)
        ref, ref_geom = _read_labels(Path(ref_path), labels)
        bad = ref_geom.mismatch(pred_geom, rtol=1e-3, atol=1e-3)
        if bad:
            shown = {"shape": "spatial_shape"}
            details = "; ".join(
                f"{field}: prediction {_fmt(getattr(pred_geom, shown.get(field, field)))}, "
                f"reference {_fmt(getattr(ref_geom, shown.get(field, field)))}"
                for field in bad)
            raise DataError(f"{pred_path}: its geometry differs from the reference {ref_path} "
                            f"({details})")
        metrics = case_metrics(pred, ref, ref_geom.spacing, labels, nsd_tolerance_mm)
        per_case.append({
            "case": case_id, "prediction_file": str(pred_path), "reference_file": str(ref_path),
            "metrics": metrics,
        })
    return summarise(per_case, labels, nsd_tolerance_mm)


def _case_files(folder: Path, reference: bool) -> dict[str, Path]:
    """Map case id -> label file in ``folder`` (see :func:`evaluate_folders` for naming)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    if reference and not any(split_suffix(p)[1] in IMAGE_SUFFIXES for p in files):
        files = sorted(p for p in folder.rglob("*") if p.is_file())  # e.g. ACDC patient folders
    out: dict[str, Path] = {}
    slicer: dict[str, Path] = {}
    for path in files:
        stem, suffix = split_suffix(path)
        if suffix not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if stem.endswith(_SIDE_OUTPUT_TAGS):
            continue
        if stem.endswith(".seg"):
            if not reference and suffix == ".nrrd":
                slicer[stem[: -len(".seg")]] = path
            continue
        out[stem] = path
    # `predict --format seg.nrrd` masks (a labelmap whose voxels are the label values) count
    # when no plain mask of the case is there.
    for stem, path in slicer.items():
        out.setdefault(stem, path)
    if reference and any(s.endswith("_gt") for s in out):
        out = {s[: -len("_gt")]: p for s, p in out.items() if s.endswith("_gt")}
    return out


def case_files(pred_dir: str | Path, gt_dir: str | Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(case id -> prediction file, case id -> reference file) of two folders, named and
    filtered as :func:`evaluate_folders` pairs them (used by ``evaluate --clinical``)."""
    return _case_files(Path(pred_dir), reference=False), _case_files(Path(gt_dir), reference=True)


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    labels: dict[int, str] | None,
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, Any]:
    """Score every prediction in ``pred_dir`` against its reference in ``gt_dir``.

    Files pair by case name: the file name without its image ending (``.nii.gz``, ``.nii``,
    ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``). In ``pred_dir``, side outputs of
    ``uumamba predict`` (``CASE_probabilities``, ``CASE_entropy``, ``CASE_volumes.json``) are
    ignored; a ``CASE.seg.nrrd`` (``--format seg.nrrd``) is the case's mask when no plain
    mask of the case is there. In ``gt_dir``, when some names end in ``_gt`` (ACDC), only
    those are references and the suffix is dropped; when ``gt_dir`` holds no image file
    directly, its sub-folders are searched (ACDC's ``patientXXX/``).

    Args:
        pred_dir, gt_dir: folders of label maps.
        labels: label value -> name (background included or not); ``None``: every value found
            in the references and predictions, named ``label_<v>``.
        nsd_tolerance_mm: NSD tolerance in mm.

    Returns:
        The summary (see :func:`summarise`) plus ``missing_predictions`` (reference cases
        without a prediction: listed, not scored) and ``unmatched_predictions``.

    Raises:
        UserError: a folder is missing, or no prediction matches a reference.
        DataError: as :func:`evaluate_pairs`.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for name, folder in (("pred_dir", pred_dir), ("gt_dir", gt_dir)):
        if not folder.is_dir():
            raise UserError(f"{name} {folder}: folder not found")
    preds, refs = _case_files(pred_dir, reference=False), _case_files(gt_dir, reference=True)
    common = sorted(set(preds) & set(refs))
    if not common:
        raise UserError(
            f"no prediction in {pred_dir} matches a reference in {gt_dir} by case name "
            f"(predictions: {sorted(preds)[:5]}, references: {sorted(refs)[:5]})"
        )
    pairs = [(c, preds[c], refs[c]) for c in common]
    if labels is None:
        found: set[int] = set()
        for _, p, r in pairs:
            for path in (p, r):
                found.update(int(v) for v in label_values(_read_labels(path)[0]))
        labels = {v: ("background" if v == 0 else f"label_{v}") for v in sorted(found | {0})}
    summary = evaluate_pairs(pairs, labels, nsd_tolerance_mm)
    summary["missing_predictions"] = sorted(set(refs) - set(preds))
    summary["unmatched_predictions"] = sorted(set(preds) - set(refs))
    return summary


def write_summary(summary: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``metrics.csv`` (one row per case and label, then one
    ``mean`` row per label) into ``output_dir`` atomically; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output_dir / "summary.json", output_dir / "metrics.csv"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    labels = summary["labels"]

    def cell(v: Any) -> Any:
        return "" if isinstance(v, float) and math.isnan(v) else v

    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "label", "name", *CASE_FIELDS])
        for case in summary["metric_per_case"]:
            for value, m in case["metrics"].items():
                writer.writerow([case["case"], value, labels[value], *(cell(m[f]) for f in CASE_FIELDS)])
        for value, m in summary["mean"].items():
            writer.writerow(["mean", value, m["name"], *(cell(m.get(f, "")) for f in CASE_FIELDS)])
    return json_path, csv_path


def find_reference_labels(gt_dir: str | Path) -> dict[int, str] | None:
    """Labels of a ``dataset.json`` in ``gt_dir`` or its parent (the first with labels), else None.

    Raises:
        DataError: such a file is not readable JSON or its labels are malformed.
    """
    from uumamba.data.labels import read_dataset_labels

    for candidate in (Path(gt_dir) / "dataset.json", Path(gt_dir).parent / "dataset.json"):
        if candidate.is_file():
            labels = read_dataset_labels(candidate)
            if labels:
                return labels
    return None


#: ``uumamba predict`` writes ``CASE_volumes.json`` beside each mask; at most this many (of
#: at most this many bytes each) are read to learn the label names of a prediction folder.
_VOLUMES_FILES_READ = 8
_VOLUMES_FILE_MAX_BYTES = 1 << 20


def find_prediction_labels(pred_dir: str | Path) -> dict[int, str] | None:
    """Labels recorded by ``uumamba predict`` in the ``CASE_volumes.json`` files of ``pred_dir``.

    Each such file lists ``labels: {name: {"value": int, ...}}`` (the model folder's labels);
    the first :data:`_VOLUMES_FILES_READ` files (sorted by name) are read and must agree.
    Files that are too large, not JSON or not in that shape are ignored (a prediction folder
    is not trusted to carry them).

    Returns:
        value -> name with ``0: "background"`` added, or None when no file gives labels or
        the files disagree.
    """
    found: dict[int, str] | None = None
    files = sorted(Path(pred_dir).glob("*_volumes.json"))[:_VOLUMES_FILES_READ]
    for path in files:
        try:
            if path.stat().st_size > _VOLUMES_FILE_MAX_BYTES:
                continue
            entries = json.loads(path.read_text()).get("labels")
            labels = {int(v["value"]): str(name) for name, v in entries.items()
                      if isinstance(v, dict) and isinstance(v.get("value"), int)
                      and 0 < v["value"] < 256}
        except (OSError, ValueError, AttributeError, TypeError):
            continue
        if not labels:
            continue
        labels = {0: "background", **labels}
        if found is not None and labels != found:
            return None
        found = labels
    return found
