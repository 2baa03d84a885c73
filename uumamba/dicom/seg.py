"""DICOM Segmentation (SEG) objects from a label map on a source series' grid (highdicom).

:func:`write_seg` writes a Segmentation IOD (PS3.3 §A.51) with highdicom's
:class:`highdicom.seg.Segmentation`:

- segmentation type BINARY (PS3.3 §C.8.20.2), one segment per foreground label, numbered
  1..N in increasing label value (the Segment Sequence requires consecutive numbers from 1);
- each segment carries its label name, the SNOMED CT category / type (and laterality type
  modifier) of :mod:`uumamba.export.terminology`, a CIELab display colour converted from the
  RGB colour of :func:`uumamba.export.colors.assign_colors` (the colours the Slicer export
  uses), algorithm type AUTOMATIC and the algorithm identification (name ``uumamba``,
  version = package version and model version; parameters hold the checkpoints' SHA-256);
- frames reference the source images frame by frame (Source Image Sequence / Derivation
  Image per frame: highdicom derives each frame's Plane Position from the source instance's
  ImagePositionPatient), share the source's Frame of Reference, and copy the Patient,
  General Study and Patient Study modules from the source (highdicom copies them);
- frames where a segment is empty are omitted (``omit_empty_frames``).

Mask convention (as :mod:`uumamba.data.dicom_series`): the mask is ``(x, y, z)`` = (column, row,
sorted slice), so slice ``k`` of the mask, transposed, is the ``(Rows, Columns)`` frame of
the ``k``-th source file in z order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uumamba.errors import UserError
from uumamba.utils import atomic_path


@dataclass(frozen=True)
class Algorithm:
    """What produced a segmentation (Algorithm Identification Sequence, PS3.3 §10.16).

    Attributes:
        model_name: model folder name (Manufacturer's Model Name).
        model_version: 12-hex-digit :meth:`uumamba.model_folder.ModelFolder.version`, or ""
            for a mask exported without its model.
        weights_sha256: fold name -> SHA-256 of the checkpoint (Algorithm Parameters).
    """

    model_name: str = "unknown"
    model_version: str = ""
    weights_sha256: Mapping[str, str] = field(default_factory=dict)


def _code(triplet):
    from highdicom.sr.coding import CodedConcept

    scheme, value, meaning = triplet
    return CodedConcept(value, scheme, meaning)


def segment_descriptions(labels: Mapping[int, str], algorithm: Algorithm):
    """One highdicom ``SegmentDescription`` per foreground label, numbered 1..N.

    Returns:
        ``(descriptions, value_to_number)``: the descriptions in segment-number order and
        label value -> segment number.

    Raises:
        ValueError: an empty label name.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import uumamba
    from uumamba.export.colors import assign_colors
    from uumamba.export.terminology import lookup_terminology

    colors = assign_colors(labels)
    version = uumamba.__version__ + (f" model {algorithm.model_version}" if algorithm.model_version else "")
    ident = hd.AlgorithmIdentificationSequence(
        name="uumamba", family=codes.cid7162.ArtificialIntelligence, version=version,
        source=algorithm.model_name,
        parameters={f"sha256 {fold}": digest for fold, digest in algorithm.weights_sha256.items()} or None)
    descriptions, numbers = [], {}
    for number, value in enumerate(sorted(v for v in labels if v != 0), start=1):
        name = str(labels[value]).strip()
        if not name:
            raise ValueError(f"label {value} has an empty name")
        term = lookup_terminology(name)
        r, g, b = (min(255.0, max(0.0, 255.0 * c)) for c in colors[value])
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=_code(term.category),
            segmented_property_type=_code(term.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=ident, tracking_id=name[:64],
            tracking_uid=hd.UID(), display_color=hd.color.CIELabColor.from_rgb(r, g, b))
        if term.type_modifier is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _code(term.type_modifier)]
        descriptions.append(desc)
        numbers[int(value)] = number
    return descriptions, numbers


def write_seg(mask: np.ndarray, source_files: Sequence[Path], out_path: Path,
              labels: Mapping[int, str], algorithm: Algorithm | None = None) -> Path:
    """Write ``mask`` as a BINARY DICOM SEG referencing ``source_files`` (in z order).

    Args:
        mask: ``(columns, rows, n_files)`` integer label map, values in ``labels`` (0 =
            background), on the grid of the sorted source series.
        source_files: the source instances, sorted along the normal as
            :func:`uumamba.data.dicom_series.series_geometry` sorts them.
        out_path: destination ``.dcm`` (written atomically).
        labels: label value -> name (every foreground label becomes a segment, present or not).
        algorithm: model identification (default: unknown model).

    Returns:
        ``out_path``.

    Raises:
        UserError: the mask's shape does not match the sources, or holds values that are no
            label; ValueError: an empty label name.
    """
    import highdicom as hd
    import pydicom

    import uumamba

    algorithm = algorithm or Algorithm()
    mask = np.asarray(mask)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_files]
    shape = (int(sources[0].Columns), int(sources[0].Rows), len(sources))
    if mask.shape != shape:
        raise UserError(f"{out_path}: mask shape {mask.shape} does not match the source series "
                        f"({shape[0]} columns x {shape[1]} rows x {shape[2]} slices)")
    values = set(np.unique(mask).tolist()) - {0}
    unknown = sorted(values - {int(v) for v in labels})
    if unknown:
        raise UserError(f"{out_path}: mask values {unknown} have no label name (--labels)")
    descriptions, numbers = segment_descriptions(labels, algorithm)
    lut = np.zeros(max([*numbers, *values, 0]) + 1, dtype=np.uint8)
    for value, number in numbers.items():
        lut[value] = number
    frames = lut[mask.astype(np.int64)].transpose(2, 1, 0)  # (slices, rows, columns)
    try:
        number = int(sources[0].get("SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        number = 1000
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(frames),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=min(number, 2**31 - 1), sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="uumamba", manufacturer_model_name=algorithm.model_name[:64] or "unknown",
        software_versions=uumamba.__version__,
        device_serial_number=algorithm.model_version or "unknown",
        content_label="UUMAMBA", content_description="uumamba automatic segmentation",
        series_description=f"uumamba {algorithm.model_name}"[:64],
        omit_empty_frames=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path, durable=True) as tmp:
        seg.save_as(tmp)
    return out_path


def write_seg_for_reference(mask: np.ndarray, reference: Path, out_path: Path,
                            labels: Mapping[int, str], algorithm: Algorithm | None = None) -> Path:
    """:func:`write_seg` for a case made by :func:`uumamba.dicom.cases.materialize_cases`.

    Raises:
        UserError: ``reference`` is not a DICOM series' copy (``--format dcm`` needs DICOM
            input), or as :func:`write_seg`.
    """
    from uumamba.dicom.cases import read_sidecar

    sidecar = read_sidecar(reference)
    if sidecar is None:
        raise UserError(f"{reference}: --format dcm needs a DICOM series as input (a DICOM SEG "
                        "references its source images); use export-dicom with --reference-series")
    return write_seg(mask, [Path(p) for p in sidecar["files"]], out_path, labels, algorithm)


def read_seg_mask(seg_path: Path, source_sop_instance_uids: Sequence[str]) -> np.ndarray:
    """Read a SEG back as a ``(columns, rows, n)`` uint8 map of segment numbers on the sources.

    Args:
        seg_path: a Segmentation file.
        source_sop_instance_uids: the source instances in z order (missing frames are empty).

    Returns:
        Segment numbers (0 = none) per voxel, highdicom ``combine_segments``.
    """
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(list(source_sop_instance_uids),
                                               combine_segments=True, skip_overlap_checks=True)
    return np.asarray(pixels, dtype=np.uint8).transpose(2, 1, 0)


def export_seg(mask_file: Path, reference_series: Path, output: Path,
               labels: str | None = None, algorithm: Algorithm | None = None) -> tuple[Path, dict[int, str]]:
    """``uumamba export-dicom``: a label-map file on a DICOM series' grid, as a DICOM SEG.

    Args:
        mask_file: NIfTI / NRRD / MHA label map (as ``predict`` writes for a DICOM input).
        reference_series: folder holding exactly one image series (the mask's source).
        output: destination ``.dcm``.
        labels: ``--labels`` (:func:`uumamba.export.labels.resolve_labels`).

    Returns:
        ``(path written, value -> name of the segments)``.

    Raises:
        UserError / DataError: the folder holds no or several series, the series is refused
            (:func:`uumamba.data.dicom_series.series_geometry`), the mask is unreadable, or its
            grid differs from the series' (shape, or voxel centres more than 1e-3 mm apart).
    """
    from uumamba.data.dicom_series import discover_series, series_geometry
    from uumamba.data.io import read_image
    from uumamba.export.labels import resolve_labels

    reference_series, mask_file = Path(reference_series), Path(mask_file)
    if not reference_series.is_dir():
        raise UserError(f"--reference-series {reference_series}: not a folder")
    series = discover_series(reference_series)
    if len(series) != 1:
        raise UserError(f"--reference-series {reference_series}: holds {len(series)} image series "
                        f"({', '.join(s.case for s in series)}); point it at one")
    plan = series_geometry(series[0])
    mask, geometry = read_image(mask_file)
    if mask.shape != plan.geometry.shape:
        raise UserError(f"mask {mask_file} has shape {mask.shape} but series {series[0].case} "
                        f"has {plan.geometry.shape}")
    corners = np.array([[i, j, k, 1.0] for i in (0, mask.shape[0] - 1)
                        for j in (0, mask.shape[1] - 1) for k in (0, mask.shape[2] - 1)])
    offset = float(np.max(np.linalg.norm((corners @ geometry.affine_lps().T
                                          - corners @ plan.geometry.affine_lps().T)[:, :3], axis=1)))
    if offset > 1e-3:
        raise UserError(f"mask {mask_file} does not lie on series {series[0].case}'s grid (voxel "
                        f"centres up to {offset:.3g} mm apart); is it the mask of another image?")
    if not np.issubdtype(mask.dtype, np.integer):
        if np.any(mask != np.round(mask)):
            raise UserError(f"mask {mask_file} has non-integer values")
        mask = mask.astype(np.int64)
    names = resolve_labels(labels, np.unique(mask).tolist())
    path = write_seg(mask, [s.path for s in plan.slices], Path(output), names, algorithm)
    return path, {v: n for v, n in names.items() if v != 0}
