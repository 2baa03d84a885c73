"""Integrity check of a dataset: read every case once and report every problem at once.

``uumamba check-data DIR`` and training both run :func:`check_dataset` before anything else,
so a truncated ``.nii.gz`` or a mislabelled volume fails in seconds, not hours into training.
Each file is read completely (full decompression). Problems found:

errors
    unreadable / truncated files; image-label shape mismatch; spacing, origin or direction
    mismatch beyond ``dataset.spatial_tolerance`` (relative); channels of a multi-channel case
    that disagree; label values that are not integers (float labels, or labels scaled by a
    NIfTI ``scl_slope`` that read back as 0.999) or not declared (``dataset.labels`` or the
    dataset's own metadata, ``ignore_label`` included); NaN / Inf voxels; 4D images (unless
    ``dataset.split_4d``); 2D images (training and prediction read 3D volumes, for 2D models
    too; single-slice volumes are an error for 3D models); voxel sizes that are zero or
    negative (NIfTI ``pixdim``, NRRD / MHA spacing); no labels declared at all; DICOM series
    folders refused by the series rules (:func:`uumamba.data.io.read_dicom_folder`: mixed
    orientations, uneven, duplicated or missing slices, 4D, non-image or compressed objects
    without a decoder, several series in one folder), one error naming the folder and the rule.
warnings
    empty label maps (background only); 4D images that will be split into frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from uumamba.config import DatasetConfig
from uumamba.data.io import Geometry, is_nifti, read_image
from uumamba.data.layouts import Case, DatasetIndex
from uumamba.data.untrusted import check_image_header
from uumamba.errors import DataError, ReportError, printable


@dataclass(frozen=True)
class Problem:
    """One finding of the check.

    Attributes:
        severity: ``error`` (training would fail or learn garbage) or ``warning``.
        file: the file (or folder) concerned.
        message: what is wrong, with the values found.
    """

    severity: Literal["error", "warning"]
    file: str
    message: str


@dataclass
class CheckReport:
    """All problems of a dataset, in the order found.

    Attributes:
        problems: every :class:`Problem`.
        n_cases: labelled cases checked. n_test_images: unlabelled images checked.
    """

    problems: list[Problem] = field(default_factory=list)
    n_cases: int = 0
    n_test_images: int = 0

    @property
    def errors(self) -> list[Problem]:
        """The problems of severity ``error``."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """The problems of severity ``warning``."""
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def fatal(self) -> bool:
        """True when at least one problem is an error."""
        return bool(self.errors)

    def summary(self) -> str:
        """One line: counts of cases, errors and warnings."""
        return (f"checked {self.n_cases} cases and {self.n_test_images} test images: "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")

    def format(self) -> str:
        """Plain-text report: one ``SEVERITY file: message`` line per problem, then the summary."""
        lines = [printable(f"{p.severity.upper():7s} {p.file}: {p.message}") for p in self.problems]
        return "\n".join(lines + [self.summary()])

    def raise_if_fatal(self) -> None:
        """Raise :class:`DataError` with the formatted report when there is an error."""
        if self.fatal:
            raise ReportError("dataset integrity check failed:\n" + self.format())


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, file: Path | str, message: str) -> None:
        self.problems.append(Problem("error", str(file), message))

    def warning(self, file: Path | str, message: str) -> None:
        self.problems.append(Problem("warning", str(file), message))


def _scl_note(path: Path) -> str:
    """Mention a NIfTI intensity scaling that explains non-integer label values."""
    if not is_nifti(path):
        return ""
    try:  # nibabel moves scl_slope / scl_inter from the header into the data proxy
        proxy = nib.load(str(path)).dataobj
        slope, inter = float(proxy.slope), float(proxy.inter)
    except Exception:  # the header was readable a moment ago; keep the main message
        return ""
    if slope != 1 or inter != 0:
        return f" (the header scales values: scl_slope={slope:g}, scl_inter={inter:g})"
    return ""


#: Largest value :func:`label_values` counts with ``np.bincount`` (beyond it: ``np.unique``).
_BINCOUNT_LIMIT = 1 << 16


def label_values(label: np.ndarray) -> np.ndarray:
    """Distinct values of a label map, sorted, whatever they are (never an allocation sized by
    a value).

    Non-negative integer maps whose maximum is below ``max(65536, label.size)`` are counted
    with ``np.bincount`` (fast); every other map (huge or negative values, floats) goes
    through ``np.unique`` and keeps its own dtype, so a value such as 2**40 or 2**32 + 3 is
    returned exactly.
    """
    label = np.asarray(label)
    if np.issubdtype(label.dtype, np.integer) and label.size and label.min() >= 0:
        if int(label.max()) < max(_BINCOUNT_LIMIT, label.size):
            return np.flatnonzero(np.bincount(label.ravel()))
    return np.unique(label)


def exact(value: object) -> str:
    """A voxel value for a message, exactly: integers in full, floats in the shortest form
    that reads back as the same number of their own dtype (``1.0000001``, not ``1``)."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value) if isinstance(value, np.generic) else repr(value)


def _check_geometry(out: _Collector, path: Path, geom: Geometry, ref: Geometry,
                    ref_name: str, tol: float) -> None:
    for name in geom.mismatch(ref, rtol=tol, atol=tol):
        if name == "shape":
            out.error(path, f"shape {geom.spatial_shape} differs from {ref_name} "
                            f"{ref.spatial_shape}")
        else:
            mine = np.round(np.asarray(getattr(geom, name)), 5).tolist()
            theirs = np.round(np.asarray(getattr(ref, name)), 5).tolist()
            out.error(path, f"{name} {mine} differs from {ref_name} {theirs} "
                            f"(tolerance {tol:g})")


def _check_image(out: _Collector, path: Path, array: np.ndarray, dataset_cfg: DatasetConfig, spatial_dims: int) -> bool:
    """Dimension and finiteness checks of one image; False when it cannot be used further."""
    usable = True
    if array.ndim == 4:
        if dataset_cfg.split_4d:
            out.warning(path, f"4D image {array.shape}: will be split into "
                              f"{array.shape[3]} 3D frames")
        else:
            out.error(path, f"4D image {array.shape}; give 3D volumes or set "
                            "dataset.split_4d: true to split the frames")
            usable = False
    elif array.ndim not in (2, 3):
        out.error(path, f"unsupported image shape {array.shape} (expected 3D)")
        usable = False
    if spatial_dims == 3 and (array.ndim == 2 or (array.ndim >= 3 and 1 in array.shape[:3])):
        out.error(path, f"2D image {array.shape} given to a 3D model (model.spatial_dims: 3); "
                        "use a 2D model or 3D volumes")
    elif array.ndim == 2:  # planning and prediction read 3D volumes, also for 2D models
        out.error(path, f"2D image {array.shape}: training and prediction need 3D volumes "
                        "(a 2D model is trained on the slices of 3D volumes)")
    if np.issubdtype(array.dtype, np.floating):
        n_bad = int(np.count_nonzero(~np.isfinite(array)))
        if n_bad:
            out.error(path, f"{n_bad} NaN / Inf voxel(s)")
    return usable


def _listed(values: list, limit: int = 10) -> str:
    """``[v, ...]`` of the first ``limit`` values, exactly, and how many there are in all."""
    shown = ", ".join(exact(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]" + (
        f" ({len(values)} values)" if len(values) > limit else "")


def _check_label(out: _Collector, path: Path, label: np.ndarray, declared: set[int] | None) -> None:
    if not (np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating)
            or label.dtype == bool):
        out.error(path, f"label map of dtype {label.dtype}: expected integer values")
        return
    if np.issubdtype(label.dtype, np.floating):
        finite = np.isfinite(label)
        if not finite.all():
            out.error(path, f"{int((~finite).sum())} NaN / Inf voxel(s) in the label map")
            label = label[finite]
        fractional = label != np.round(label)
        if fractional.any():
            examples = list(np.unique(label[fractional])[:3])
            out.error(path, "label values are not integers, e.g. "
                            f"{', '.join(exact(v) for v in examples)}{_scl_note(path)}")
            return
    values = [int(v) for v in label_values(label)]  # exact: integers or integer-valued floats
    if declared is not None:
        unknown = [v for v in values if v not in declared]
        if unknown:
            out.error(path, f"label values {_listed(unknown)} are not declared (declared: "
                            f"{sorted(declared)})")
    if values and max(values) == 0:
        out.warning(path, "label map is empty (background only)")


def _read(path: Path) -> tuple[np.ndarray, Geometry]:
    """The header-first guard (:func:`uumamba.data.untrusted.check_image_header`: detached data
    files only inside the header's folder, size and spacing caps), then :func:`read_image`.
    A DICOM series folder gets the same caps from its slice headers, before any pixel is
    decoded (:func:`uumamba.data.io.read_dicom_folder`)."""
    if not path.is_dir():
        check_image_header(path, allow_detached=True, allow_4d=True, require_3d=False)
    return read_image(path)


def _check_case(out: _Collector, case: Case, dataset_cfg: DatasetConfig, spatial_dims: int,
                declared: set[int] | None) -> None:
    ref_geom: Geometry | None = None
    for c, image_path in enumerate(case.images):
        try:
            array, geom = _read(image_path)
        except DataError as exc:
            out.error(image_path, str(exc).removeprefix(f"{image_path}: "))
            continue
        if not _check_image(out, image_path, array, dataset_cfg, spatial_dims):
            continue
        if ref_geom is None:
            ref_geom = geom
        elif c > 0:
            _check_geometry(out, image_path, geom, ref_geom, f"channel 0 ({case.images[0].name})",
                            dataset_cfg.spatial_tolerance)
        del array
    if case.label is None:
        return
    try:
        label, label_geom = _read(case.label)
    except DataError as exc:
        out.error(case.label, str(exc).removeprefix(f"{case.label}: "))
        return
    _check_label(out, case.label, label, declared)
    if ref_geom is not None:
        _check_geometry(out, case.label, label_geom, ref_geom,
                        f"image {case.images[0].name}", dataset_cfg.spatial_tolerance)


def check_dataset(index: DatasetIndex, dataset_cfg: DatasetConfig, spatial_dims: int) -> CheckReport:
    """Read every case of ``index`` completely and collect all problems.

    Args:
        index: cases from :func:`uumamba.data.layouts.discover`.
        dataset_cfg: ``dataset`` config section (labels, tolerance, split_4d, ignore_label).
        spatial_dims: ``model.spatial_dims`` (single-slice volumes are an error for 3D
            models; 2D images are an error for both).

    Returns:
        A :class:`CheckReport`; it never raises for bad data.
    """
    out = _Collector()
    labels = dataset_cfg.labels or index.labels
    declared: set[int] | None = None
    if labels:
        declared = set(labels) | ({dataset_cfg.ignore_label} if dataset_cfg.ignore_label is not None else set())
    else:
        out.error(index.root, "no label names declared: set dataset.labels in the config "
                              "(the dataset has no dataset.json labels)")
    for path, message in index.orphans:
        out.error(path, message)
    for case in index.cases:
        _check_case(out, case, dataset_cfg, spatial_dims, declared)
    for case in index.test_images:
        _check_case(out, case, dataset_cfg, spatial_dims, declared)
    return CheckReport(out.problems, len(index.cases), len(index.test_images))
