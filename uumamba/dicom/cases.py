"""DICOM series as ``predict`` cases: each series (or frame) becomes a NIfTI file in a work folder.

The prediction pipeline reads image files (:func:`uumamba.data.io.read_image`). A DICOM input
(folder, recursively, or ``.zip``) is turned into one uncompressed ``WORK/CASE.nii`` per
series — or per frame with ``split_4d`` (``CASE_frameNN``) — carrying the grid of
:func:`uumamba.data.dicom_series.series_geometry`, and a sidecar ``WORK/CASE.dicom.json`` listing
the source files in z order, which the ``dcm`` writer (:mod:`uumamba.dicom.seg`) reads to
reference them. The caller owns ``WORK`` (a temporary directory kept until every output is
written).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib

from uumamba.data.dicom_series import (
    DicomLimits,
    DicomSeries,
    Series4D,
    SeriesGeometry,
    discover_series,
    is_part10,
    read_series_volume,
    series_geometry,
)
from uumamba.data.io import nifti_on_grid, read_geometry
from uumamba.dicom.archive import ZipLimits, extract_zip, is_zip
from uumamba.errors import DataError, UserError

SIDECAR = ".dicom.json"


@dataclass
class DicomCases:
    """Result of :func:`materialize_cases`.

    Attributes:
        cases: ``(case, [WORK/CASE.nii])`` in the form :func:`uumamba.inference.inputs.input_cases`
            returns.
        refused: one-line reasons (naming series and file) for series that cannot be read.
    """

    cases: list[tuple[str, list[Path]]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def looks_like_dicom(path: Path) -> bool:
    """A ``.zip`` file, or a folder with DICOM Part 10 files (looked for when it holds no
    NIfTI / NRRD / MHA image directly)."""
    if is_zip(path):
        return True
    if not path.is_dir():
        return False
    import os

    for folder, _dirs, files in os.walk(path):
        if any(is_part10(Path(folder) / f) for f in sorted(files)[:50]):
            return True
    return False


def open_series(input_path: Path, work: Path, limits: DicomLimits | None = None,
                zip_limits: ZipLimits | None = None, refused: list[str] | None = None
                ) -> list[DicomSeries]:
    """The image series of a folder or a ``.zip`` (extracted into ``work/unzipped``; its
    members are named ``INPUT.zip/000000.dcm`` ... in archive order in messages, never by the
    temporary folder).

    Args:
        refused: when given, files refused from their header (series unknown) are listed
            here and skipped instead of raised.

    Raises:
        DataError: as :func:`uumamba.data.dicom_series.discover_series` and
            :func:`uumamba.dicom.archive.extract_zip`.
    """
    if not is_zip(input_path):
        return discover_series(input_path, limits, refused)
    root = work / "unzipped"
    root.mkdir(parents=True, exist_ok=True)
    found: list[str] = []
    try:
        extract_zip(input_path, root, zip_limits, name=str(input_path))
        series = discover_series(root, limits, None if refused is None else found)
    except DataError as exc:
        raise type(exc)(scrub(str(exc), root, input_path)) from None
    if refused is not None:
        refused.extend(scrub(m, root, input_path) for m in found)
    for s in series:  # messages name the archive, not the temporary folder
        s.where = str(input_path)
        s.problem = scrub(s.problem, root, input_path)
    return series


def scrub(message: str, root: Path, name: Path | str) -> str:
    """``message`` with the temporary folder ``root`` replaced by how the user names it."""
    return message.replace(str(root), str(name))


def write_volume(plan: SeriesGeometry, series: DicomSeries, path: Path, source: Path) -> Path:
    """Decode one frame (``plan``) of ``series`` and write it as ``path`` (``.nii``, sform and
    qform = the DICOM grid) with its sidecar.

    Raises:
        DataError: as :func:`uumamba.data.dicom_series.read_series_volume`.
        RuntimeError: the NIfTI read back has another grid (float32 sform rounding beyond
            1e-4 mm would be a bug).
    """
    geometry = plan.geometry
    nib.save(nifti_on_grid(read_series_volume(plan, series.label), geometry), str(path))
    bad = geometry.mismatch(read_geometry(path), rtol=1e-6, atol=1e-4)
    if bad:
        raise RuntimeError(f"{path}: NIfTI copy of {series.label} has another {', '.join(bad)}")
    sidecar = {"series_uid": series.uid, "case": series.case, "source": str(source),
               "files": [str(s.path) for s in plan.slices],
               "sop_instance_uids": [s.sop_instance_uid for s in plan.slices]}
    sidecar_path(path).write_text(json.dumps(sidecar, indent=1))
    return path


def sidecar_path(reference: Path) -> Path:
    """``WORK/CASE.dicom.json`` beside ``WORK/CASE.nii``."""
    name = reference.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return reference.with_name(name + SIDECAR)


def read_sidecar(reference: Path) -> dict | None:
    """The sidecar of a materialized case, or None when ``reference`` is no DICOM copy."""
    path = sidecar_path(Path(reference))
    return json.loads(path.read_text()) if path.is_file() else None


def materialize_cases(input_path: Path, work: Path, n_channels: int = 1, frame: int | None = None,
                      split_4d: bool = False, limits: DicomLimits | None = None) -> DicomCases:
    """Turn every image series of a DICOM input into NIfTI cases in ``work``.

    Args:
        input_path: folder (searched recursively) or ``.zip``.
        work: existing folder owned by the caller.
        n_channels: the model's input channels (DICOM series give one).
        frame: temporal position to take from 4D series (0-based).
        split_4d: one case per temporal position instead (``CASE_frameNN``).

    Returns:
        :class:`DicomCases`; a refused series is listed in ``refused``, not raised.

    Raises:
        UserError: a multi-channel model, ``frame`` with ``split_4d``, or nothing readable
            at all (no DICOM, only non-image objects, archive caps).
    """
    if n_channels != 1:
        raise UserError(f"{input_path}: the model takes {n_channels} channels; a DICOM series gives one")
    if frame is not None and split_4d:
        raise UserError("--frame and --split-4d exclude each other")
    result = DicomCases()
    for series in open_series(input_path, work, limits, refused=result.refused):
        try:
            try:
                frames = [(series.case, series_geometry(series, frame=frame, limits=limits))]
            except Series4D as exc:
                if not split_4d:
                    raise
                frames = ((f"{series.case}_frame{t:02d}",  # one frame at a time, as before
                           series_geometry(series, frame=t, limits=limits))
                          for t in range(exc.n_frames))
            for name, plan in frames:
                out = work / f"{name}.nii"
                write_volume(plan, series, out, input_path)
                result.cases.append((name, [out]))
        except DataError as exc:
            result.refused.append(scrub(str(exc), work, "(temporary folder)"))
    return result


#: Caps for a ``.zip`` uploaded to the service: one series, at most 2,000 files and 1 GiB.
UPLOAD_ZIP_LIMITS = ZipLimits(max_entries=2_000, max_total_bytes=1024**3)
UPLOAD_DICOM_LIMITS = DicomLimits(max_files=2_000, max_total_bytes=1024**3)


def materialize_upload(archive: Path, work: Path, frame: int | None = None,
                       name: str = "uploaded archive") -> Path:
    """The one series of an uploaded ``.zip`` as ``work/series.nii`` (+ sidecar), for the service.

    Hostile-input rules: :data:`UPLOAD_ZIP_LIMITS` / :data:`UPLOAD_DICOM_LIMITS` (entries,
    decompressed bytes, ratio; members written under generated names), the series refusals
    of :func:`uumamba.data.dicom_series.series_geometry`, and messages that name ``name`` and
    member numbers, never a server path.

    Returns:
        The NIfTI copy; :func:`uumamba.dicom.seg.write_seg_for_reference` accepts it as the
        reference of a ``dcm`` answer.

    Raises:
        DataError: archive caps or damage, no series / more than one series, or a refusal.
    """
    root = work / "unzipped"
    root.mkdir(parents=True, exist_ok=True)
    extract_zip(archive, root, UPLOAD_ZIP_LIMITS, name=name)
    try:
        series = discover_series(root, UPLOAD_DICOM_LIMITS)
    except DataError as exc:
        raise DataError(str(exc).replace(str(root), name)) from None
    if len(series) != 1:
        raise DataError(f"{name}: holds {len(series)} image series; send one series per request")
    (s,) = series
    s.where = name
    try:
        plan = series_geometry(s, frame=frame, limits=UPLOAD_DICOM_LIMITS)
        return write_volume(plan, s, work / "series.nii", Path(name))
    except DataError as exc:
        raise DataError(str(exc).replace(str(root) + "/", "").replace(str(root), name)) from None
