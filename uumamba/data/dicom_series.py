"""DICOM series: discovery in a folder, slice geometry, refusals, and decoding into a volume.

A *series* is every DICOM Part 10 file (PS3.10 §7.1: 128-byte preamble, then ``DICM``) of one
SeriesInstanceUID (0020,000E) found under a folder, recursively. Headers are read first
(pydicom, ``stop_before_pixels``) and everything is decided from them before a voxel is
decoded: the SOP class is an image storage class read slice by slice, the transfer syntax can
be decoded here, the orientation is the same for every slice, the slices are evenly spaced
along the normal with no gap and no duplicate, and the voxel count and bytes fit
:class:`uumamba.data.untrusted.HeaderLimits`.

Geometry (PS3.3 §C.7.6.2, Image Plane Module), in LPS patient coordinates (the DICOM and ITK
convention :class:`uumamba.data.io.Geometry` uses):

- ImageOrientationPatient (0020,0037) holds the direction cosines of a *row* (the direction
  in which the column index grows) and of a *column* (the row index grows);
- PixelSpacing (0028,0030) is ``[spacing between rows, spacing between columns]`` in mm;
- ImagePositionPatient (0020,0032) is the centre of the first transmitted pixel, in mm.

The volume is indexed ``(x, y, z)`` as :mod:`uumamba.data.io` reads NIfTI / ITK images: x is
the column index (direction = row cosine, spacing = PixelSpacing[1]), y the row index
(direction = column cosine, spacing = PixelSpacing[0]), z the slice, sorted by increasing
position along the normal ``row x column`` (never by file name or InstanceNumber) — the order
and direction ITK's GDCM series reader (``gdcm::IPPSorter``) produces, so a mask written on
this grid sits exactly on the source slices. The slice spacing is the mean step between
consecutive positions (ImagePositionPatient), not SliceThickness or SpacingBetweenSlices.

Refused, each with a :class:`~uumamba.errors.DataError` naming the series (and a file) and
the rule: mixed orientations, non-orthonormal orientation, differing matrix or pixel spacing,
duplicated or unevenly spaced positions, missing slices (a step above 1.5 x the median, or a
whole multiple of the smallest step),
positions off the normal (gantry tilt / sheared stacks), multi-frame objects (Enhanced CT /
MR: NumberOfFrames > 1), non-image SOP classes, colour images, transfer syntaxes without an
available decoder, and 4D series (several temporal positions: TemporalPositionIdentifier or
TriggerTime) unless one frame is chosen.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uumamba.data.geometry import Geometry
from uumamba.data.untrusted import HeaderLimits, VolumeTooLarge
from uumamba.errors import DataError

log = logging.getLogger(__name__)

#: Image storage SOP classes read slice by slice (PS3.4 Annex B.5): CT, MR, PET.
IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}

#: Multi-frame ("enhanced") image classes: each instance is a whole stack with per-frame
#: functional groups (PS3.3 §C.7.6.16); not read here.
MULTIFRAME_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}

#: Objects a study also holds that carry no image to segment (segmentations, reports,
#: presentation states, key objects, RT structures); skipped beside image series.
NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
}

_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID",
    "SeriesNumber", "Modality", "Rows", "Columns", "PixelSpacing", "ImagePositionPatient",
    "ImageOrientationPatient", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
    "TemporalPositionIdentifier", "TriggerTime", "SliceThickness", "SpacingBetweenSlices",
    "FrameOfReferenceUID", "InstanceNumber", "SeriesDescription",
]

_ORIENTATION_ATOL = 1e-4   # direction cosines equal across slices (unitless)
_DUPLICATE_MM = 1e-3       # positions closer than this along the normal are the same slice
_GAP_FACTOR = 1.5          # a step above 1.5 x the median step means missing slices
_OFF_AXIS_MM = 0.02        # positions may stray this far from the line along the normal
_SLACK_BYTES = 16 << 20    # header, overlays, private data beside one slice's pixels
_MAX_ELEMENT_BYTES = 64 << 10  # a header element read here (strings, numbers) above this is refused
_MAX_POSITION_MM = 1e6     # |ImagePositionPatient| beyond 1 km is not a patient coordinate
_MAX_CASE_NAME = 100       # case names (file names) longer than this are cut, with a hash suffix


class HeaderError(DataError):
    """A file's header is refused; ``series_uid`` is its series when it could be read."""

    def __init__(self, message: str, series_uid: str = "") -> None:
        super().__init__(message)
        self.series_uid = series_uid


class Series4D(DataError):
    """A 4D series and no ``--frame``; ``n_frames`` says how many temporal positions it has."""

    def __init__(self, message: str, n_frames: int) -> None:
        super().__init__(message)
        self.n_frames = n_frames


@dataclass(frozen=True)
class DicomLimits:
    """Caps applied while looking for DICOM files and before decoding a series.

    Attributes:
        max_files: files inspected under one input folder (default 20,000).
        max_total_bytes: bytes of those files together (default 8 GiB).
        volume: voxel count, bytes (voxels x 4, the float32 the model reads) and spacing
            caps of one series (:class:`~uumamba.data.untrusted.HeaderLimits`).
    """

    max_files: int = 20_000
    max_total_bytes: int = 8 * 1024**3
    volume: HeaderLimits = field(default_factory=HeaderLimits)


@dataclass(frozen=True)
class SliceHeader:
    """What one DICOM file's header says (read without its pixel data).

    Attributes:
        path: the file.
        sop_class_uid / sop_instance_uid: the object's class and identity.
        rows / columns: matrix size (PS3.3 §C.7.6.3).
        pixel_spacing: (between rows, between columns) in mm; None when absent.
        position: ImagePositionPatient (mm, LPS); None when absent.
        orientation: ImageOrientationPatient (6 direction cosines); None when absent.
        frames: NumberOfFrames (1 when absent).
        samples: SamplesPerPixel.
        bits_stored / signed: BitsStored and PixelRepresentation == 1.
        slope / intercept: RescaleSlope / RescaleIntercept (1 / 0 when absent).
        temporal: TemporalPositionIdentifier, else TriggerTime (ms); None when neither.
        transfer_syntax: the file meta TransferSyntaxUID.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    frames: int
    samples: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    temporal: float | None
    transfer_syntax: str


@dataclass
class DicomSeries:
    """The files of one SeriesInstanceUID.

    Attributes:
        uid: SeriesInstanceUID.
        case: case name: ``PatientID_SeriesNumber`` (characters other than letters, digits,
            ``.``, ``_``, ``-`` replaced by ``_``), or the UID when either is missing or two
            series would share the name.
        slices: one header per file, in discovery order (not sorted).
        modality / description / patient_id / series_number: from the first file.
        where: how messages name the input holding it ("" = its first file's folder).
        problem: why a file of the series was refused from its header ("" = none); the
            series is then refused by :func:`series_geometry` with this message.
    """

    uid: str
    case: str
    slices: list[SliceHeader]
    modality: str = ""
    description: str = ""
    patient_id: str = ""
    series_number: str = ""
    where: str = ""
    problem: str = ""

    @property
    def label(self) -> str:
        """How messages name the series: case name and ``where`` (e.g. the ``.zip`` it came
        from), else the folder of its first file."""
        return f"series {self.case} ({self.where or self.slices[0].path.parent})"


@dataclass(frozen=True)
class SeriesGeometry:
    """One 3D frame of a series, sorted, with its voxel grid.

    Attributes:
        slices: the headers in z order (increasing position along the normal).
        geometry: the grid (shape (columns, rows, n), spacing mm, origin = first slice's
            ImagePositionPatient, direction columns = row cosine, column cosine, normal).
        n_frames: temporal positions the series holds (1 for 3D).
    """

    slices: tuple[SliceHeader, ...]
    geometry: Geometry
    n_frames: int = 1


# ----------------------------------------------------------------------------- discovery

def is_part10(path: Path) -> bool:
    """True when ``path`` is a regular file that starts with the 128-byte preamble and
    ``DICM`` (PS3.10 §7.1); a FIFO or a device is never opened for a blocking read."""
    from uumamba.utils import read_regular

    try:
        head = read_regular(path, 132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def find_dicom_files(root: Path, limits: DicomLimits | None = None) -> list[Path]:
    """DICOM Part 10 files under ``root`` (recursive, symbolic links not followed), sorted.

    DICOMDIR files and non-DICOM files are skipped.

    Raises:
        DataError: more than ``limits.max_files`` files or ``limits.max_total_bytes`` bytes
            under ``root`` (counted before any file is parsed).
    """
    limits = limits or DicomLimits()
    found: list[Path] = []
    n_files = total = 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_symlink() or name.upper() == "DICOMDIR":
                continue
            n_files += 1
            if n_files > limits.max_files:
                raise DataError(f"{root}: more than {limits.max_files} files; point --input at "
                                "one study or series folder")
            total += path.stat().st_size
            if total > limits.max_total_bytes:
                raise DataError(f"{root}: more than {limits.max_total_bytes / 1024**3:.3g} GiB of "
                                "files; point --input at one study or series folder")
            if is_part10(path):
                found.append(path)
    return found


def _floats(value, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in (value if isinstance(value, Iterable) else [value]))
    except (TypeError, ValueError, OverflowError):
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def _value(ds, keyword: str, default, kind, path: Path, uid: str):
    """``ds.keyword`` as a finite ``kind`` (int / float), ``default`` when absent or empty.

    Raises:
        HeaderError: the value is not a number, not finite, or not a whole number for an int.
    """
    try:
        raw = ds.get(keyword)
    except Exception:  # pydicom converts on access: 'abc' in an IS / DS element
        try:
            raw = bytes(ds.get_item(keyword).value or b"").decode("ascii", "replace").strip()
        except Exception:
            raw = "?"
    if raw is None or raw == "":
        return default
    try:
        number = float(raw)
        if not math.isfinite(number) or (kind is int and number != int(number)):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        text = str(raw)
        shown = text[:20] + ("..." if len(text) > 20 else "")
        rule = "a whole number" if kind is int else "a finite number"
        raise HeaderError(f"{path}: {keyword} {shown!r} is not {rule}", uid) from None
    return kind(number)


def read_slice_header(path: Path) -> tuple[SliceHeader, dict[str, str]]:
    """Read one file's header (no pixel data): the slice and its series identity.

    Elements above 64 KiB are left on disk while reading (pydicom ``defer_size``) and a wanted
    one that large is refused, so a crafted file cannot make the header pass load it.

    Returns:
        ``(header, identity)``; identity holds ``series_uid``, ``patient_id``,
        ``series_number``, ``modality``, ``description`` (empty strings when absent).

    Raises:
        HeaderError: the file is not readable DICOM, has no SeriesInstanceUID / SOP class, a
            header element above 64 KiB, or a non-numeric / non-finite number (names the
            file and the rule; ``series_uid`` set when it was read).
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS,
                             defer_size=_MAX_ELEMENT_BYTES)
        elements = list(getattr(ds, "_dict", {}).values())
    except Exception:  # pydicom raises InvalidDicomError, OSError, ValueError ...
        raise HeaderError(f"{path}: cannot read DICOM header (damaged or not DICOM)") from None
    known = ""  # the series, when its own element is small enough to read
    try:
        uid_elem = getattr(ds, "_dict", {}).get(0x0020000E)
        if uid_elem is not None and (getattr(uid_elem, "length", 0) or 0) <= 64:
            known = str(ds.get("SeriesInstanceUID", "") or "")
    except Exception:
        known = ""
    for elem in elements:
        length = getattr(elem, "length", 0) or 0
        if length > _MAX_ELEMENT_BYTES:
            raise HeaderError(f"{path}: header element {elem.tag} holds {length} bytes, above the "
                              f"limit of {_MAX_ELEMENT_BYTES} for header values", known)
    try:
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        sop_class = str(ds.get("SOPClassUID", "") or "")
        identity = {"series_uid": series_uid, "patient_id": str(ds.get("PatientID", "") or ""),
                    "series_number": str(ds.get("SeriesNumber", "") or ""),
                    "modality": str(ds.get("Modality", "") or ""),
                    "description": str(ds.get("SeriesDescription", "") or "")}
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else "")
        raw = {k: ds.get(k) for k in ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")}
        sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    except Exception:
        raise HeaderError(f"{path}: cannot read DICOM header (damaged identity or geometry "
                          "elements)") from None
    if not series_uid or not sop_class:
        raise HeaderError(f"{path}: DICOM file without SeriesInstanceUID or SOPClassUID")
    uid = series_uid

    def number(keyword, default, kind=float):
        return _value(ds, keyword, default, kind, path, uid)

    temporal = number("TemporalPositionIdentifier", None)
    if temporal is None:
        temporal = number("TriggerTime", None)
    header = SliceHeader(
        path=path, sop_class_uid=sop_class, sop_instance_uid=sop_instance,
        rows=number("Rows", 0, int), columns=number("Columns", 0, int),
        pixel_spacing=_floats(raw["PixelSpacing"], 2),
        position=_floats(raw["ImagePositionPatient"], 3),
        orientation=_floats(raw["ImageOrientationPatient"], 6),
        frames=number("NumberOfFrames", 1, int) or 1, samples=number("SamplesPerPixel", 1, int) or 1,
        bits_stored=number("BitsStored", 16, int) or 16,
        signed=number("PixelRepresentation", 0, int) == 1,
        slope=number("RescaleSlope", 1.0) or 1.0, intercept=number("RescaleIntercept", 0.0),
        temporal=temporal, transfer_syntax=transfer_syntax,
    )
    if not 1 <= header.bits_stored <= 32:
        raise HeaderError(f"{path}: BitsStored {header.bits_stored} is outside 1-32", uid)
    if header.position is not None and max(abs(v) for v in header.position) > _MAX_POSITION_MM:
        raise HeaderError(f"{path}: ImagePositionPatient {list(header.position)} is not a "
                          f"plausible position (beyond {_MAX_POSITION_MM:g} mm)", uid)
    return header, identity


def _safe_name(text: str) -> str:
    """Letters, digits, ``.``, ``_``, ``-``; cut to 100 characters with a hash of the whole
    text so long PatientIDs / UIDs stay unique and fit a file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    if len(name) > _MAX_CASE_NAME:
        digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:10]
        name = name[: _MAX_CASE_NAME - 11].rstrip("._") + "_" + digest
    return name


def group_series(paths: Sequence[Path], refused: list[str] | None = None) -> list[DicomSeries]:
    """Read every file's header and group the files by SeriesInstanceUID.

    A file refused from its header whose SeriesInstanceUID was read marks its series
    (:attr:`DicomSeries.problem`, refused later); one whose series is unknown is appended to
    ``refused`` (or raised when ``refused`` is None).

    Returns:
        Series sorted by case name; each case is named ``PatientID_SeriesNumber``, or by its
        SeriesInstanceUID when either is missing or the name is taken.

    Raises:
        DataError: a file's header is unreadable and ``refused`` is None (names the file).
    """
    by_uid: dict[str, DicomSeries] = {}
    problems: dict[str, tuple[str, Path]] = {}
    for path in paths:
        try:
            header, ident = read_slice_header(path)
        except HeaderError as exc:
            if exc.series_uid:  # the series label names the folder: the file by its name
                problems.setdefault(exc.series_uid, (str(exc).replace(str(path), path.name), path))
                continue
            if refused is None:
                raise
            refused.append(f"{exc}; file skipped")
            continue
        series = by_uid.get(ident["series_uid"])
        if series is None:
            series = by_uid[ident["series_uid"]] = DicomSeries(
                ident["series_uid"], "", [], ident["modality"], ident["description"],
                ident["patient_id"], ident["series_number"])
        series.slices.append(header)
    names: dict[str, int] = {}
    for s in by_uid.values():
        name = _safe_name(f"{s.patient_id}_{s.series_number}") if s.patient_id and s.series_number else ""
        s.case = name
        names[name] = names.get(name, 0) + 1
    for s in by_uid.values():
        if not s.case or names[s.case] > 1:
            s.case = _safe_name(s.uid)
        s.problem = problems.pop(s.uid, ("", None))[0]
    for uid, (message, path) in problems.items():  # every file of the series was refused
        message = f"series {_safe_name(uid)} ({path.parent}): {message}"
        if refused is None:
            raise DataError(message)
        refused.append(message)
    return sorted(by_uid.values(), key=lambda s: s.case)


def is_image_series(series: DicomSeries) -> bool:
    """False for series of known non-image objects (SEG, SR, presentation states ...)."""
    return not all(s.sop_class_uid in NON_IMAGE_SOP_CLASSES for s in series.slices)


def discover_series(root: Path, limits: DicomLimits | None = None,
                    refused: list[str] | None = None) -> list[DicomSeries]:
    """Image series under ``root``; series of non-image objects are skipped with a log note.

    Raises:
        DataError: no DICOM file under ``root``; only non-image objects (names their SOP
            classes); or a cap of :func:`find_dicom_files` / an unreadable header (only when
            ``refused`` is None; else the file is listed there and skipped).
    """
    files = find_dicom_files(root, limits)
    if not files:
        raise DataError(f"{root}: no DICOM files (Part 10, 'DICM' at byte 128)")
    series = group_series(files, refused)
    if not series and refused:
        raise DataError(f"{root}: no readable DICOM series: " + "; ".join(refused))
    images = [s for s in series if is_image_series(s)]
    skipped = [s for s in series if not is_image_series(s)]
    for s in skipped:
        log.warning(f"warning: {s.label}: skipping {len(s.slices)} non-image object(s) "
                    f"({_sop_name(s.slices[0].sop_class_uid)})")
    if not images:
        kinds = sorted({_sop_name(s.slices[0].sop_class_uid) for s in skipped})
        raise DataError(f"{root}: no image series to segment, only non-image objects "
                        f"({', '.join(kinds)})")
    return images


def _sop_name(uid: str) -> str:
    for table in (IMAGE_SOP_CLASSES, MULTIFRAME_SOP_CLASSES, NON_IMAGE_SOP_CLASSES):
        if uid in table:
            return table[uid]
    return f"SOP class {uid}"


# ----------------------------------------------------------------------------- geometry

def _check_objects(series: DicomSeries) -> None:
    """Refuse SOP classes, frame counts, colour and transfer syntaxes not read here."""
    from pydicom.pixels import get_decoder

    first = series.slices[0]
    classes = {s.sop_class_uid for s in series.slices}
    if len(classes) > 1:
        raise DataError(f"{series.label}: mixes SOP classes ({', '.join(sorted(map(_sop_name, classes)))})")
    if first.sop_class_uid in MULTIFRAME_SOP_CLASSES or any(s.frames > 1 for s in series.slices):
        raise DataError(f"{series.label}: {first.path.name} is a multi-frame object "
                        f"({_sop_name(first.sop_class_uid)}, {max(s.frames for s in series.slices)} "
                        "frames); only single-frame image series are supported")
    if first.sop_class_uid not in IMAGE_SOP_CLASSES:
        raise DataError(f"{series.label}: {_sop_name(first.sop_class_uid)} is not an image class "
                        f"read here (supported: {', '.join(IMAGE_SOP_CLASSES.values())})")
    for s in series.slices:
        if s.samples != 1:
            raise DataError(f"{series.label}: {s.path.name} is a colour image "
                            f"(SamplesPerPixel {s.samples}); grayscale images are required")
    for syntax in sorted({s.transfer_syntax for s in series.slices}):
        try:
            available = get_decoder(syntax).is_available
        except (NotImplementedError, ValueError, KeyError):
            available = False
        if not available:
            name = next(s.path.name for s in series.slices if s.transfer_syntax == syntax)
            raise DataError(f"{series.label}: {name}: transfer syntax {syntax} cannot be decoded "
                            "here (no decoder installed); send uncompressed or JPEG / RLE data")


def _temporal_frames(series: DicomSeries, slices: list[SliceHeader], normal: np.ndarray
                     ) -> list[list[SliceHeader]]:
    """Split slices into temporal frames when positions repeat (cine MRI); else one frame.

    Raises:
        DataError: positions repeat without distinct temporal positions (duplicates), or the
            frames hold different numbers of slices.
    """
    depth = np.array([np.dot(s.position, normal) for s in slices])
    # float keys: no integer overflow (positions are capped at 1e6 mm by the header check)
    keys = np.round(depth / _DUPLICATE_MM)
    if len(set(keys.tolist())) == len(slices):
        return [slices]
    times = [s.temporal for s in slices]
    if any(t is None for t in times) or len(set(times)) < 2:
        dup = _first_duplicate(slices, keys)
        raise DataError(f"{series.label}: duplicated slice positions ({dup[0].path.name} and "
                        f"{dup[1].path.name} lie at the same place); one image per position expected")
    frames: dict[float, list[SliceHeader]] = {}
    for s in slices:
        frames.setdefault(s.temporal, []).append(s)
    sizes = {len(v) for v in frames.values()}
    if len(sizes) > 1:
        raise DataError(f"{series.label}: 4D series with {len(frames)} temporal positions of "
                        f"unequal slice counts ({', '.join(map(str, sorted(sizes)))}); incomplete series")
    return [frames[t] for t in sorted(frames)]


def _first_duplicate(slices: list[SliceHeader], keys: np.ndarray) -> tuple[SliceHeader, SliceHeader]:
    seen: dict[float, SliceHeader] = {}
    for s, k in zip(slices, keys.tolist(), strict=True):
        if k in seen:
            return seen[k], s
        seen[k] = s
    raise AssertionError("no duplicate")


def series_geometry(series: DicomSeries, frame: int | None = None,
                    limits: DicomLimits | None = None) -> SeriesGeometry:
    """Sort one frame of a series along its normal and derive its voxel grid (no decoding).

    Args:
        series: from :func:`discover_series`.
        frame: temporal position (0-based, in increasing TemporalPositionIdentifier /
            TriggerTime) of a 4D series; required when the series is 4D, ignored for 3D
            series (a study mixes cine and 3D series).
        limits: caps (voxels x 4 bytes checked against ``limits.volume``).

    Returns:
        :class:`SeriesGeometry` (``n_frames`` > 1 for a 4D series).

    Raises:
        DataError: any refusal of the module docstring, naming the series, a file and the
            rule; :class:`Series4D` for a 4D series without ``frame``; ``VolumeTooLarge``
            for the size caps.
    """
    limits = limits or DicomLimits()
    if series.problem:
        raise DataError(f"{series.label}: {series.problem}")
    _check_objects(series)
    slices = list(series.slices)
    first = slices[0]
    for s in slices:
        if s.position is None or s.orientation is None or s.pixel_spacing is None:
            raise DataError(f"{series.label}: {s.path.name} lacks ImagePositionPatient, "
                            "ImageOrientationPatient or PixelSpacing; its geometry is unknown")
        if not np.allclose(s.orientation, first.orientation, rtol=0, atol=_ORIENTATION_ATOL):
            raise DataError(f"{series.label}: mixed orientations ({first.path.name} "
                            f"{list(first.orientation)}, {s.path.name} {list(s.orientation)}); "
                            "one stack per series expected")
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise DataError(f"{series.label}: {s.path.name} is {s.rows}x{s.columns}, "
                            f"{first.path.name} {first.rows}x{first.columns}; one matrix size expected")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):
            raise DataError(f"{series.label}: pixel spacing differs between {first.path.name} "
                            f"and {s.path.name}")
    row = np.asarray(first.orientation[:3], dtype=np.float64)
    col = np.asarray(first.orientation[3:], dtype=np.float64)
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(float(np.dot(row, col))) > 1e-3):
        raise DataError(f"{series.label}: ImageOrientationPatient {list(first.orientation)} is "
                        "not two orthogonal unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    frames = _temporal_frames(series, slices, normal)
    if len(frames) > 1:
        if frame is None:
            raise Series4D(f"{series.label}: 4D series with {len(frames)} temporal positions "
                           "(cine); choose one with --frame K (0-based) or split with --split-4d",
                           len(frames))
        if not 0 <= frame < len(frames):
            raise DataError(f"{series.label}: --frame {frame} is out of range (the series has "
                            f"{len(frames)} temporal positions, 0..{len(frames) - 1})")
        slices = frames[frame]
    depth = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(depth, kind="stable")
    slices = [slices[i] for i in order]
    depth = depth[order]
    n = len(slices)
    row_mm, col_mm = first.pixel_spacing  # between rows (y), between columns (x)
    if n > 1:
        steps = np.diff(depth)
        median = float(np.median(steps))
        big = int(np.argmax(steps))
        # With few slices the median includes the gap itself ([8, 16] has median 12): a
        # step that is a whole multiple (2x, 3x ... within 10 %) of the smallest is a gap too.
        multiple = steps[big] / max(float(steps.min()), _DUPLICATE_MM)
        whole = multiple >= 1.8 and abs(multiple - round(multiple)) < 0.1 * round(multiple)
        if steps[big] > _GAP_FACTOR * median or whole:
            raise DataError(f"{series.label}: missing slices: a gap of {steps[big]:.3g} mm between "
                            f"{slices[big].path.name} and {slices[big + 1].path.name} (median step "
                            f"{median:.3g} mm, more than {_GAP_FACTOR} x)")
        tolerance = max(0.01, 0.01 * median)
        worst = int(np.argmax(np.abs(steps - median)))
        if abs(steps[worst] - median) > tolerance:
            raise DataError(f"{series.label}: uneven slice spacing: {steps[worst]:.4g} mm between "
                            f"{slices[worst].path.name} and {slices[worst + 1].path.name}, median "
                            f"{median:.4g} mm")
        positions = np.array([s.position for s in slices])
        offsets = positions - positions[0]
        lateral = offsets - np.outer(offsets @ normal, normal)
        off = float(np.max(np.linalg.norm(lateral, axis=1)))
        if off > _OFF_AXIS_MM:
            raise DataError(f"{series.label}: slice positions stray {off:.3g} mm from the line "
                            "along the slice normal (gantry tilt or sheared stack); not supported")
        z_mm = float((depth[-1] - depth[0]) / (n - 1))
    else:
        z_mm = 1.0
    geometry = Geometry(
        shape=(first.columns, first.rows, n), spacing=(float(col_mm), float(row_mm), z_mm),
        origin=tuple(float(v) for v in slices[0].position),
        direction=tuple(tuple(float(v) for v in r) for r in np.stack([row, col, normal], axis=1)))
    _check_size(series, geometry, limits.volume)
    return SeriesGeometry(tuple(slices), geometry, len(frames))


def _check_size(series: DicomSeries, geometry: Geometry, caps: HeaderLimits) -> None:
    voxels = math.prod(geometry.shape)
    if voxels > caps.max_voxels or voxels * 4 > caps.max_bytes:
        raise VolumeTooLarge(f"{series.label}: {geometry.shape[0]}x{geometry.shape[1]}x"
                             f"{geometry.shape[2]} = {voxels} voxels is above the limit of "
                             f"{caps.max_voxels} voxels / {caps.max_bytes} bytes as float32")
    for axis, s in enumerate(geometry.spacing[: 3 if geometry.shape[2] > 1 else 2]):
        if not caps.min_spacing_mm <= s <= caps.max_spacing_mm:
            raise DataError(f"{series.label}: voxel spacing {s:g} mm along axis {axis} is "
                            f"implausible (allowed {caps.min_spacing_mm:g}-{caps.max_spacing_mm:g} mm)")


# ----------------------------------------------------------------------------- decoding

def _output_dtype(slices: Sequence[SliceHeader], label: str = "series") -> np.dtype:
    """The smallest of int16 / int32 / float32 that holds every rescaled stored value.

    Raises:
        DataError: a rescaled value would not be a finite float32 (RescaleSlope / Intercept
            too large), naming the file.
    """
    lo = hi = 0.0
    integral = True
    limit = float(np.finfo(np.float32).max)
    for s in slices:
        smin, smax = ((-(2 ** (s.bits_stored - 1)), 2 ** (s.bits_stored - 1) - 1) if s.signed
                      else (0, 2 ** s.bits_stored - 1))
        ends = [smin * s.slope + s.intercept, smax * s.slope + s.intercept]
        if not all(math.isfinite(e) and abs(e) <= limit for e in ends):
            raise DataError(f"{label}: {s.path.name}: RescaleSlope {s.slope:g} / RescaleIntercept "
                            f"{s.intercept:g} give values beyond the float32 range")
        integral = integral and s.slope == int(s.slope) and s.intercept == int(s.intercept)
        lo, hi = min(lo, *ends), max(hi, *ends)
    if not integral:
        return np.dtype(np.float32)
    if -(2 ** 15) <= lo and hi < 2 ** 15:
        return np.dtype(np.int16)
    if -(2 ** 31) <= lo and hi < 2 ** 31:
        return np.dtype(np.int32)
    return np.dtype(np.float32)


def read_series_volume(plan: SeriesGeometry, label: str = "series") -> np.ndarray:
    """Decode the sorted slices of ``plan`` into one ``(x, y, z)`` array.

    A file larger than 4 x its image's bytes + 16 MiB is refused before pydicom reads it
    (pydicom loads a whole element into memory).

    Stored values are rescaled (RescaleSlope / Intercept, PS3.3 §C.11.1.1.2 "Modality LUT")
    into int16 when every value fits, else int32, else float32. The array is allocated once
    (x * y * z of that dtype), so memory is bounded by what :func:`series_geometry` checked.

    Raises:
        DataError: a file is oversized, its pixel data cannot be decoded or has another shape
            than its header says (names the file).
    """
    import pydicom

    geometry = plan.geometry
    dtype = _output_dtype(plan.slices, label)
    out = np.empty(geometry.shape, dtype=dtype)
    for k, s in enumerate(plan.slices):
        pixel_bytes = s.rows * s.columns * max(1, (s.bits_stored + 7) // 8)
        size = s.path.stat().st_size
        if size > 4 * pixel_bytes + _SLACK_BYTES:
            raise DataError(f"{label}: {s.path.name} is {size} bytes, far more than its "
                            f"{s.rows}x{s.columns} image needs; refused before reading it")
        try:
            ds = pydicom.dcmread(s.path)
            pixels = ds.pixel_array
        except Exception:  # decoders raise many types for damaged data; their text is not shown
            raise DataError(f"{label}: {s.path.name}: cannot decode pixel data (transfer syntax "
                            f"{_syntax_name(s.transfer_syntax)})") from None
        if pixels.shape != (s.rows, s.columns):
            raise DataError(f"{label}: {s.path.name}: pixel data of shape {pixels.shape}, header "
                            f"says {s.rows}x{s.columns}")
        if s.slope == 1 and s.intercept == 0:
            out[:, :, k] = pixels.T
        elif dtype == np.float32:
            out[:, :, k] = (pixels.astype(np.float32) * np.float32(s.slope)
                            + np.float32(s.intercept)).T
        else:
            out[:, :, k] = (pixels.astype(np.int64) * int(s.slope) + int(s.intercept)).T
    return out


def _syntax_name(uid: str) -> str:
    """A transfer syntax's name (e.g. "JPEG 2000 Image Compression"), else its UID."""
    from pydicom.uid import UID

    try:
        name = UID(uid).name
    except Exception:
        name = ""
    return name if name and name != uid else (uid or "unknown")
