"""One segmentation request, start to finish: check the volume, predict, write the answer.

Runs in worker threads (never on the event loop). The predictor is
:class:`uumamba.inference.predict.Predictor`; image reading and mask writing are
:func:`uumamba.data.io.read_image` / :func:`uumamba.data.io.write_mask` and
:func:`uumamba.export.slicer.write_seg_nrrd`, so the returned mask has the upload's voxel grid,
spacing, origin and direction.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uumamba.errors import DataError, UserError
from uumamba.evaluation.metrics import voxel_volume_ml

from .models import OutputFormat, VolumeSummary

#: ``report(stage, progress)``: called as the request moves through its stages.
ProgressFn = Callable[[str, float], None]

MEDIA_TYPES: dict[OutputFormat, str] = {
    OutputFormat.nii_gz: "application/gzip",
    OutputFormat.seg_nrrd: "application/octet-stream",
    OutputFormat.json: "application/json",
}


@dataclass
class SegmentationOutput:
    """What one request produced.

    Attributes:
        format: the requested output format.
        path: the written file (``nii.gz`` / ``seg.nrrd``), ``None`` for ``json``.
        summary: per-class voxel counts and volumes (always computed).
    """

    format: OutputFormat
    path: Path | None
    summary: VolumeSummary


def check_volume(path: Path) -> tuple[int, ...]:
    """Read an uploaded image and refuse what the network cannot segment.

    Returns:
        The (x, y, z) shape.

    Raises:
        DataError: unreadable or truncated file (the reader's message), not 3D (2D or 4D;
            4D cine must be split into frames by the client), an empty axis, or non-finite
            (NaN / inf) intensities, with the count.
    """
    from uumamba.data.io import read_image

    try:
        array, _geometry = read_image(path)
        array = np.asarray(array)
    except DataError as exc:
        raise DataError(f"uploaded volume is unreadable: {_strip_path(str(exc), path)}") from None
    except Exception as exc:  # any reader failure on user bytes is the user's file, not a bug
        raise DataError(f"uploaded volume is unreadable or truncated: {type(exc).__name__}: "
                        f"{_strip_path(str(exc), path)}") from None
    shape = tuple(int(s) for s in array.shape)
    if array.ndim == 4:
        raise DataError(f"volume is 4D (shape {list(shape)}); upload one 3D frame")
    if array.ndim != 3:
        raise DataError(f"volume has {array.ndim} dimensions (shape {list(shape)}); a 3D volume is required")
    if min(shape) == 0:
        raise DataError(f"volume has an empty axis (shape {list(shape)})")
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad == array.size:
            raise DataError(f"volume is NaN-filled: all {n_bad} voxels are NaN or infinite")
        if n_bad:
            raise DataError(f"volume has {n_bad} NaN or infinite voxels of {array.size}; "
                            "replace them before segmenting")
    return shape


def _strip_path(message: str, path: Path) -> str:
    """Remove the server-side temporary path from a reader message."""
    return message.replace(str(path), "upload").replace(str(path.parent), "")


def volume_summary(prediction, tta: bool) -> VolumeSummary:
    """The JSON answer's per-class voxel counts and volumes, taken from the prediction.

    Args:
        prediction: a :class:`uumamba.inference.predict.Prediction`; its ``voxel_counts`` and
            ``volumes_ml`` (mL = voxels * prod(spacing mm) / 1000, every foreground label,
            absent ones 0) were computed by the predictor from the mask it returned.
        tta: whether mirroring test-time augmentation was used.
    """
    spacing = [float(s) for s in prediction.geometry.spacing]
    return VolumeSummary(
        shape=[int(s) for s in prediction.mask.shape],
        spacing_mm=spacing,
        voxel_volume_ml=voxel_volume_ml(spacing),
        voxel_counts=dict(prediction.voxel_counts),
        volumes_ml=dict(prediction.volumes_ml),
        tta=tta,
    )


def predict(predictor: Any, path: Path, tta: bool | None) -> Any:
    """``predictor.predict_file(path)``, passing ``tta`` when the request sets it.

    Raises:
        DataError: the predictor cannot honour a per-request ``tta`` (no ``tta`` keyword).
        UserError: the predictor refused the volume (message without the temporary path).
    """
    if tta is not None and "tta" not in inspect.signature(predictor.predict_file).parameters:
        raise DataError("this predictor cannot switch test-time augmentation per request; omit 'tta'")
    try:
        return predictor.predict_file(path) if tta is None else predictor.predict_file(path, tta=tta)
    except UserError as exc:  # same class, without the server's temporary path
        raise type(exc)(_strip_path(str(exc), path)) from None


def segment_file(predictor: Any, upload: Path, out_dir: Path, fmt: OutputFormat, tta: bool | None,
                 labels: dict[int, str], tta_default: bool, report: ProgressFn | None = None,
                 ) -> SegmentationOutput:
    """Segment ``upload`` and write the answer in ``fmt`` into ``out_dir``.

    Args:
        predictor: loaded predictor (``predict_file(path) -> Prediction``).
        upload: the uploaded volume, already accepted by :func:`check_volume` (its geometry
            is the reference of the output).
        out_dir: existing private folder for the result (``mask.nii.gz`` / ``mask.seg.nrrd``).
        fmt: output format.
        tta: per-request mirroring TTA; ``None`` uses the model's default ``tta_default``.
        labels: label value -> name for the Slicer segment names.
        report: progress callback, ``report(stage, fraction)``.

    Raises:
        UserError: the predictor refused the volume, or ``tta`` cannot be set per request.
    """
    report = report or (lambda stage, progress: None)
    report("predicting", 0.1)
    prediction = predict(predictor, upload, tta)
    report("writing", 0.9)
    mask = np.asarray(prediction.mask, dtype=np.uint8)
    summary = volume_summary(prediction, tta_default if tta is None else tta)
    out_path: Path | None = None
    if fmt is OutputFormat.nii_gz:
        from uumamba.data.io import write_mask

        out_path = out_dir / "mask.nii.gz"
        write_mask(mask, upload, out_path)
    elif fmt is OutputFormat.seg_nrrd:
        from uumamba.export.slicer import write_seg_nrrd

        out_path = out_dir / "mask.seg.nrrd"
        write_seg_nrrd(mask, upload, out_path, labels)
    report("done", 1.0)
    return SegmentationOutput(format=fmt, path=out_path, summary=summary)
