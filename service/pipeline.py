"""One segmentation request, start to finish: check the volume, predict, write the answer.

Runs in worker threads (never on the event loop). The predictor is
:class:`uumamba.inference.predict.Predictor`; image reading and mask writing are
:func:`uumamba.data.io.read_image` / :func:`uumamba.data.io.write_mask` and
:func:`uumamba.export.slicer.write_seg_nrrd`, so the returned mask has the upload's voxel grid,
spacing, origin and direction.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uumamba.errors import DataError, GridError, UserError
from uumamba.evaluation.metrics import voxel_volume_ml

from .models import ClinicalSummary, OutputFormat, VolumeSummary

#: ``report(stage, progress)``: called as the request moves through its stages.
ProgressFn = Callable[[str, float], None]

MEDIA_TYPES: dict[OutputFormat, str] = {
    OutputFormat.nii_gz: "application/gzip",
    OutputFormat.seg_nrrd: "application/octet-stream",
    OutputFormat.json: "application/json",
    OutputFormat.dcm: "application/dicom",
}


def dicom_volume(path: Path) -> Path:
    """The volume to segment for an upload: ``path`` itself, or for a ``.zip`` of one DICOM
    series its NIfTI copy in ``path``'s folder (made on first call by
    :func:`uumamba.dicom.cases.materialize_upload`: archive caps, series refusals, messages
    naming "uploaded archive").

    Raises:
        DataError / VolumeTooLarge: the archive or the series is refused.
    """
    if not path.name.lower().endswith(".zip"):
        return path
    work = path.parent / (path.name[:-4] + "_dicom")
    volume = work / "series.nii"
    if not volume.is_file():
        from uumamba.dicom.cases import materialize_upload

        work.mkdir(exist_ok=True)
        materialize_upload(path, work)
    return volume


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


def check_volume(path: Path, target_spacing=None, limits=None, name: str = "uploaded volume"
                 ) -> tuple[int, ...]:
    """Check an uploaded image's header, then read it and refuse what cannot be segmented.

    The header is inspected first (:func:`uumamba.data.untrusted.check_image_header`:
    self-contained file, declared and resampled size under ``limits``, plausible spacing, 3D)
    so a hostile file is refused before any voxel is decoded.

    Args:
        path: the uploaded file (server-side name; never named in messages).
        target_spacing: the model's target spacing (x, y, z mm) for the resampled-size cap.
        limits: :class:`uumamba.data.untrusted.HeaderLimits` (default caps when ``None``).
        name: what the messages call the upload (the second phase of a two-phase upload is
            named as such).

    Returns:
        The (x, y, z) shape.

    Raises:
        VolumeTooLarge: the header declares too many voxels / bytes, or too many after
            resampling (the service answers 413).
        DataError: a refused header (detached data file, not 3D, implausible spacing, gzip
            bomb or truncated stream), unreadable or truncated file, an empty axis, or
            non-finite (NaN / inf) intensities, with the count. Messages start with ``name``
            and hold no server path and no reader text quoting file content.
    """
    from uumamba.data.io import read_image
    from uumamba.data.untrusted import check_image_header

    path = dicom_volume(path)  # a .zip of one DICOM series: its NIfTI copy
    check_image_header(path, target_spacing=target_spacing, limits=limits, name=name)
    try:
        array, _geometry = read_image(path)
        array = np.asarray(array)
    except GridError as exc:  # one of our geometry rules: its sentence, without the path
        raise DataError(f"{name}: {exc.rule}") from None
    except Exception as exc:  # any reader failure on user bytes is the user's file, not a bug
        raise DataError(f"{name} is unreadable or truncated ({_reader_cause(exc, path)})"
                        ) from None
    shape = tuple(int(s) for s in array.shape)
    if array.ndim == 4:
        raise DataError(f"{name}: volume is 4D (shape {list(shape)}); upload one 3D frame")
    if array.ndim != 3:
        raise DataError(f"{name}: volume has {array.ndim} dimensions (shape {list(shape)}); "
                        "a 3D volume is required")
    if min(shape) == 0:
        raise DataError(f"{name}: volume has an empty axis (shape {list(shape)})")
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad == array.size:
            raise DataError(f"{name}: volume is NaN-filled: all {n_bad} voxels are NaN or "
                            "infinite")
        if n_bad:
            raise DataError(f"{name}: volume has {n_bad} NaN or infinite voxels of "
                            f"{array.size}; replace them before segmenting")
    return shape


#: Absolute POSIX / Windows paths in a message (what readers quote: files, their own sources).
_PATH_RE = re.compile(r"(?:[A-Za-z]:)?[\\/](?:[^\s'\"()\[\]:,;]+[\\/])+[^\s'\"()\[\]:,;]*")


def _reader_cause(exc: BaseException, path: Path) -> str:
    """A short, safe cause for a reader failure: SimpleITK (NRRD / MetaImage) text is dropped
    (it quotes file content and paths); other readers' first line is kept, paths removed."""
    name = type(exc).__name__
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return "the NRRD / MetaImage reader failed"
    text = str(exc)
    if isinstance(exc, DataError):  # read_image's "<path>: cannot read image ...: <Type>: <text>"
        text = text.split(": ", 1)[-1]
    return _strip_path(text, path) or name


def _strip_path(message: str, path: Path) -> str:
    """Remove server-side paths from a reader or predictor message: the upload's own path and
    folder, then every other absolute path; first line only, at most 200 characters."""
    message = message.replace(str(path), "upload").replace(str(path.parent), "")
    message = _PATH_RE.sub("<path>", message)
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return "".join(c for c in first if c.isprintable())[:200]


def volume_summary(prediction, tta: bool, precision: str | None = None) -> VolumeSummary:
    """The JSON answer's per-class voxel counts and volumes, taken from the prediction.

    Args:
        prediction: a :class:`uumamba.inference.predict.Prediction`; its ``voxel_counts`` and
            ``volumes_ml`` (mL = voxels * prod(spacing mm) / 1000, every foreground label,
            absent ones 0) were computed by the predictor from the mask it returned.
        tta: whether mirroring test-time augmentation was used.
        precision: what the windows computed in (the predictor's ``precision``), None when
            the predictor does not say.
    """
    spacing = [float(s) for s in prediction.geometry.spacing]
    return VolumeSummary(
        shape=[int(s) for s in prediction.mask.shape],
        spacing_mm=spacing,
        voxel_volume_ml=voxel_volume_ml(spacing),
        voxel_counts=dict(prediction.voxel_counts),
        volumes_ml=dict(prediction.volumes_ml),
        tta=tta,
        precision=precision,
        warnings=list(getattr(prediction, "warnings", [])),
    )


def predict(predictor: Any, path: Path, tta: bool | None, cancel: Any = None) -> Any:
    """``predictor.predict_file(path)``, passing ``tta`` when the request sets it and
    ``cancel`` (checked between window batches) when the predictor takes it.

    Raises:
        DataError: the predictor cannot honour a per-request ``tta`` (no ``tta`` keyword).
        UserError: the predictor refused the volume (message without the temporary path).
    """
    if tta is not None and "tta" not in inspect.signature(predictor.predict_file).parameters:
        raise DataError("this predictor cannot switch test-time augmentation per request; omit 'tta'")
    kwargs: dict[str, Any] = {} if tta is None else {"tta": tta}
    if cancel is not None and "cancel" in inspect.signature(predictor.predict_file).parameters:
        kwargs["cancel"] = cancel
    try:
        return predictor.predict_file(path, **kwargs)
    except UserError as exc:  # same class, without the server's temporary path
        raise type(exc)(_strip_path(str(exc), path)) from None


def clinical_summary(ed: VolumeSummary, es: VolumeSummary, labels: dict[int, str]
                     ) -> ClinicalSummary:
    """Clinical indices of a two-phase upload from the two summaries' volumes
    (:func:`uumamba.clinical.indices_from_volumes`; ``file`` = ED, ``file_es`` = ES).

    Raises:
        DataError: the model's labels have no LV cavity.
    """
    from uumamba.clinical import (
        INDEX_FIELDS,
        PAIRING_TEXT,
        indices_from_volumes,
        label_roles,
        phase_warnings,
    )

    out = indices_from_volumes(ed.volumes_ml, es.volumes_ml, label_roles(labels))
    # a phase's input warnings (blank, another modality ...) belong beside the indices too
    warnings = [*phase_warnings("'file'", "'file_es'",
                                {"'file'": ed.warnings, "'file_es'": es.warnings}),
                *out["warnings"]]
    # Two phases of one cine series share the grid; different grids mean two series (or two
    # patients), whose indices would mean nothing.
    if list(ed.shape) != list(es.shape) or any(
            abs(a - b) > 1e-3 * max(abs(a), 1.0) for a, b in zip(ed.spacing_mm, es.spacing_mm, strict=False)):
        warnings.append(f"ED and ES are on different grids (shape {list(ed.shape)} vs "
                        f"{list(es.shape)}, spacing {list(ed.spacing_mm)} vs {list(es.spacing_mm)} "
                        "mm): two phases of one cine series share the grid; another series or "
                        "patient?")
    return ClinicalSummary(pairing=PAIRING_TEXT["upload"],
                           indices={k: out[k] for k in INDEX_FIELDS},
                           undefined={k: v for k, v in out["undefined"].items() if k in INDEX_FIELDS},
                           warnings=warnings)


def segment_file(predictor: Any, upload: Path, out_dir: Path, fmt: OutputFormat, tta: bool | None,
                 labels: dict[int, str], tta_default: bool, report: ProgressFn | None = None,
                 cancel: Any = None, es_upload: Path | None = None) -> SegmentationOutput:
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
        cancel: optional flag (``is_set() -> bool``) that stops the inference between window
            batches (:class:`uumamba.inference.sliding.InferenceCancelled`).
        es_upload: a second volume (the ES phase; ``upload`` is then ED), already accepted by
            :func:`check_volume`: its summary goes in ``summary.es`` and the clinical indices
            in ``summary.clinical`` (``fmt`` must be ``json``).

    Raises:
        UserError: the predictor refused a volume, ``tta`` cannot be set per request, or a
            second phase was sent for a model whose labels have no LV / with a file format.
    """
    report = report or (lambda stage, progress: None)
    upload = dicom_volume(upload)  # a .zip of one DICOM series: its NIfTI copy (and sidecar)
    es_upload = dicom_volume(es_upload) if es_upload is not None else None
    if fmt is OutputFormat.dcm:
        from uumamba.dicom.cases import read_sidecar

        if read_sidecar(upload) is None:
            raise DataError("format=dcm answers a DICOM series: upload it as a .zip")
    if es_upload is not None:
        from uumamba.clinical import label_roles

        if fmt is not OutputFormat.json:
            raise DataError("a second phase ('file_es') is answered with clinical indices: "
                            "use format=json")
        label_roles(labels)  # refuse before any inference
    report("predicting", 0.1)
    prediction = predict(predictor, upload, tta, cancel)
    precision = getattr(predictor, "precision", None)
    summary = volume_summary(prediction, tta_default if tta is None else tta, precision)
    if es_upload is not None:
        report("predicting", 0.5)
        es_summary = volume_summary(predict(predictor, es_upload, tta, cancel),
                                    tta_default if tta is None else tta, precision)
        summary = summary.model_copy(update={
            "es": es_summary, "clinical": clinical_summary(summary, es_summary, labels)})
    report("writing", 0.9)
    mask = np.asarray(prediction.mask, dtype=np.uint8)
    out_path: Path | None = None
    if fmt is OutputFormat.nii_gz:
        from uumamba.data.io import write_mask

        out_path = out_dir / "mask.nii.gz"
        write_mask(mask, upload, out_path)
    elif fmt is OutputFormat.seg_nrrd:
        from uumamba.export.slicer import write_seg_nrrd

        out_path = out_dir / "mask.seg.nrrd"
        write_seg_nrrd(mask, upload, out_path, labels)
    elif fmt is OutputFormat.dcm:
        from uumamba.dicom.seg import write_seg_for_reference

        out_path = out_dir / "mask.dcm"
        write_seg_for_reference(mask, upload, out_path, labels)
    report("done", 1.0)
    return SegmentationOutput(format=fmt, path=out_path, summary=summary)
