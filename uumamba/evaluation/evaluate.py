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
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from uumamba.data.io import read_image
from uumamba.data.layouts import IMAGE_SUFFIXES, split_suffix
from uumamba.errors import DataError, UserError
from uumamba.utils import atomic_path, check_output_folder

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
    """Metrics of one case for every foreground label (see the module docstring).

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
    out: dict[int, dict[str, float]] = {}
    for value in sorted(v for v in labels if v != 0):
        p, r = pred == value, ref == value
        tp = int(np.count_nonzero(p & r))
        n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(r))
        fp, fn = n_pred - tp, n_ref - tp
        if n_pred == 0 and n_ref == 0:
            dice = hd95 = nsd = math.nan
        elif n_pred == 0 or n_ref == 0:
            dice, hd95, nsd = 0.0, math.nan, 0.0
        else:
            dice = 2.0 * tp / (2.0 * tp + fp + fn)
            hd95, nsd = surface_metrics(p, r, spacing, nsd_tolerance_mm)
        out[value] = {
            "Dice": dice, "HD95": hd95, "NSD": nsd, "TP": tp, "FP": fp, "FN": fn,
            "n_pred": n_pred, "n_ref": n_ref,
            "volume_pred_ml": n_pred * voxel_ml, "volume_ref_ml": n_ref * voxel_ml,
        }
    return out


def _read_labels(path: Path) -> tuple[np.ndarray, Any]:
    array, geometry = read_image(path)
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3D label map, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.allclose(array, rounded, atol=1e-3):
            raise DataError(f"{path}: label map has non-integer values (dtype {array.dtype})")
        array = rounded
    return array.astype(np.int32), geometry


def _mean(values: Iterable[float]) -> tuple[float, int]:
    finite = [v for v in values if not math.isnan(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)


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
            entry[metric], entry[f"n_{metric}"] = _mean(r[metric] for r in rows)
        entry["n_both_empty"] = sum(1 for r in rows if r["n_pred"] == 0 and r["n_ref"] == 0)
        entry["n_hd95_undefined"] = sum(
            1 for r in rows if (r["n_pred"] == 0) != (r["n_ref"] == 0)
        )
        mean[str(value)] = entry
    foreground = {
        metric: _mean(m[metric] for m in mean.values())[0] for metric in ("Dice", "HD95", "NSD")
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
        DataError: a file is unreadable, not 3D, not integer-valued, or its geometry differs
            from its reference (names both files).
    """
    per_case = []
    for case_id, pred_path, ref_path in pairs:
        pred, pred_geom = _read_labels(Path(pred_path))
        ref, ref_geom = _read_labels(Path(ref_path))
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
    for path in files:
        stem, suffix = split_suffix(path)
        if suffix not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if stem.endswith(".seg") or stem.endswith(_SIDE_OUTPUT_TAGS):
            continue
        out[stem] = path
    if reference and any(s.endswith("_gt") for s in out):
        out = {s[: -len("_gt")]: p for s, p in out.items() if s.endswith("_gt")}
    return out


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    labels: dict[int, str] | None,
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, Any]:
    """Score every prediction in ``pred_dir`` against its reference in ``gt_dir``.

    Files pair by case name: the file name without its image ending (``.nii.gz``, ``.nii``,
    ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``). In ``pred_dir``, side outputs of
    ``uumamba predict`` (``CASE_probabilities``, ``CASE_entropy``, ``CASE_volumes.json``,
    ``CASE.seg.nrrd``) are ignored. In ``gt_dir``, when some names end in ``_gt`` (ACDC), only
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
                found.update(int(v) for v in np.unique(_read_labels(path)[0]))
        labels = {v: ("background" if v == 0 else f"label_{v}") for v in sorted(found | {0})}
    summary = evaluate_pairs(pairs, labels, nsd_tolerance_mm)
    summary["missing_predictions"] = sorted(set(refs) - set(preds))
    summary["unmatched_predictions"] = sorted(set(preds) - set(refs))
    return summary


def _json_safe(value: Any) -> Any:
    """Replace NaN / inf floats by None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(summary: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``metrics.csv`` (one row per case and label, then one
    ``mean`` row per label) into ``output_dir`` atomically; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output_dir / "summary.json", output_dir / "metrics.csv"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False))
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


def print_summary(summary: dict[str, Any], title: str = "Evaluation") -> None:
    """Print per-label mean Dice / HD95 / NSD / volumes and the foreground mean as a rich table."""
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float, digits: int = 3) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{v:.{digits}f}"

    table = Table(title=f"{title} ({summary['n_cases']} cases, NSD @ {summary['nsd_tolerance_mm']:g} mm)")
    for col in ("label", "Dice", "HD95 (mm)", "NSD", "pred mL", "ref mL"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for value, m in summary["mean"].items():
        table.add_row(
            f"{value} {m['name']}", fmt(m["Dice"]), fmt(m["HD95"], 2), fmt(m["NSD"]),
            fmt(m["volume_pred_ml"], 1), fmt(m["volume_ref_ml"], 1),
        )
    fg = summary["foreground_mean"]
    table.add_row("foreground mean", fmt(fg["Dice"]), fmt(fg["HD95"], 2), fmt(fg["NSD"]), "", "",
                  style="bold")
    Console().print(table)


def labels_from_dataset_json(path: str | Path) -> dict[int, str] | None:
    """Label map (value -> name) from a ``dataset.json``; ``None`` when it has none.

    Accepts nnU-Net v2's ``{"name": value}`` and MSD's ``{"value": "name"}`` forms; region
    labels (lists of values) are skipped.

    Raises:
        DataError: the file is not valid JSON.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text()).get("labels")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise DataError(f"{path}: cannot read labels from dataset.json: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        return None
    out: dict[int, str] = {}
    for k, v in raw.items():
        if str(k).lstrip("-").isdigit():
            out[int(k)] = str(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            out[v] = str(k)
    return out or None


def evaluate_from_cli(pred_dir: Path, gt_dir: Path, output_dir: Path | None, cfg) -> dict[str, Any]:
    """``uumamba evaluate``: score, write ``summary.json`` + ``metrics.csv``, print the means.

    Labels come from ``cfg.dataset.labels``, else a ``dataset.json`` in ``gt_dir`` or its
    parent, else the values found. The NSD tolerance is ``cfg.inference.nsd_tolerance_mm``.
    Outputs go to ``output_dir`` (default: ``pred_dir``). Missing predictions are listed on
    stderr (and in the summary) but do not fail the command.

    Raises:
        UserError / DataError: as :func:`evaluate_folders`; UserError when ``output_dir``
            exists and is not a folder (checked before any scoring).
    """
    labels = cfg.dataset.labels
    if labels is None:
        for candidate in (Path(gt_dir) / "dataset.json", Path(gt_dir).parent / "dataset.json"):
            if candidate.is_file():
                labels = labels_from_dataset_json(candidate)
                if labels:
                    break
    tolerance = cfg.inference.nsd_tolerance_mm
    if output_dir is not None:
        check_output_folder(output_dir)
    summary = evaluate_folders(pred_dir, gt_dir, labels, tolerance)
    json_path, csv_path = write_summary(summary, output_dir or pred_dir)
    print_summary(summary)
    import typer

    if summary.get("unmatched_predictions"):
        typer.echo(
            f"warning: {len(summary['unmatched_predictions'])} prediction(s) have no reference "
            f"and were not scored: {', '.join(summary['unmatched_predictions'][:10])}",
            err=True,
        )
    if summary["missing_predictions"]:
        typer.echo(
            f"warning: {len(summary['missing_predictions'])} reference case(s) have no prediction "
            f"and were not scored: {', '.join(summary['missing_predictions'][:10])}",
            err=True,
        )
    typer.echo(f"wrote {json_path} and {csv_path}")
    return summary
