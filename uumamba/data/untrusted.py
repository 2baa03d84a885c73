"""Header-first guard for image files that may be hostile: decide before any voxel is decoded.

:func:`check_image_header` reads at most :data:`HEADER_READ_BYTES` of an image's header (NRRD
and MetaImage parsed here as text, NIfTI-1/2 with nibabel's header classes on a bounded
buffer) and refuses, with a :class:`~uumamba.errors.DataError` that names the rule broken:

- a data file outside the file itself (NRRD ``data file:`` / ``datafile:``, detached
  ``.nhdr``, MetaImage ``ElementDataFile`` other than ``LOCAL``, NIfTI / Analyze
  ``.hdr`` + ``.img`` pairs). ``allow_detached=True`` (local CLI use) accepts one detached
  data file, but only a plain relative name inside the header's own folder (no ``..``, no
  absolute path, symbolic links resolved), never ``/dev`` or ``/proc``;
- a declared voxel count or byte size (voxels x item size) above :class:`HeaderLimits`;
- a voxel count after resampling to the model's target spacing above the limits;
- an implausible spacing (outside 0.05-50 mm by default, or not finite);
- an origin that is not finite or farther than 1 km from the isocentre (NIfTI affine, NRRD
  ``space origin``, MetaImage ``Offset`` / ``Origin`` / ``Position``, which ITK would read as
  0), and (NIfTI) voxel axes that are not perpendicular (sheared or singular:
  :func:`uumamba.data.geometry.grid_problem`; the readers apply the same rule to every format);
- anything but 3D (4D passes with ``allow_4d=True``, for the CLI's ``--split-4d``);
- for gzip NIfTI: decompressed content beyond vox_offset + the declared size + 64 KiB (a
  gzip bomb is refused once that much, plus at most one 1 MiB chunk, was inflated; nothing
  is kept), or a truncated stream.

Messages name the file as ``name`` (``"uploaded volume"`` for uploads) and never quote
another file's content or a server path. Too-large refusals are :class:`VolumeTooLarge`
(the service answers 413), the others plain :class:`DataError` (422).
"""

from __future__ import annotations

import io
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from uumamba.data.geometry import FLOAT32_RTOL, grid_problem
from uumamba.errors import DataError

#: Bytes of a text header (NRRD, MetaImage) read at most; a longer header is refused.
HEADER_READ_BYTES = 64 * 1024

#: 512 x 512 x 1000 voxels: a large CT.
_CT_VOXELS = 512 * 512 * 1000

_GZIP_CHUNK = 1 << 20  # decompressed bytes per step of the bomb check


#: Memory one voxel of the resampled grid costs during prediction (image, probabilities,
#: blending weights, inversion), bytes: 62 measured for a 4-class 2D model (the fixture
#: model, 4.6 M resampled voxels, peak RSS above start-up; 58 from an 89 M-voxel upload).
BYTES_PER_RESAMPLED_VOXEL = 64


def memory_bounded_voxels(fraction: float = 0.5) -> int:
    """Default cap on a volume's resampled voxels: what ``fraction`` of this machine's memory
    (physical, or the cgroup limit of a container when lower) holds at
    :data:`BYTES_PER_RESAMPLED_VOXEL`, at most twice 512 x 512 x 1000. On 24 GB: 1.9e8 voxels
    (a 512 x 512 x 700 CT at its own spacing); without it a 197 KB upload of 50 mm pixels
    resampled to 1.5 mm took 5.2 GB, and the old cap allowed 6x that."""
    import os

    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(int(limit), total or int(limit))
    except OSError:
        pass
    if not total:
        return 2 * _CT_VOXELS
    return max(1, min(2 * _CT_VOXELS, int(total * fraction / BYTES_PER_RESAMPLED_VOXEL)))


class VolumeTooLarge(DataError):
    """The header declares more voxels or bytes (or a larger resampled grid) than allowed."""


@dataclass(frozen=True)
class HeaderLimits:
    """Caps applied by :func:`check_image_header`.

    Attributes:
        max_voxels: declared voxels (all axes, frames included), default 512 x 512 x 1000.
        max_bytes: declared voxels x item size in bytes (default 2 GiB: that CT as float64).
        max_resampled_voxels: voxels after resampling to the target spacing (physical extent
            / target voxel volume); default :func:`memory_bounded_voxels`, half this machine's
            memory at 64 B per voxel, at most twice 512 x 512 x 1000.
        min_spacing_mm / max_spacing_mm: plausible voxel size per axis, in mm.
    """

    max_voxels: int = _CT_VOXELS
    max_bytes: int = 2 * 1024**3
    max_resampled_voxels: int = field(default_factory=memory_bounded_voxels)
    min_spacing_mm: float = 0.05
    max_spacing_mm: float = 50.0


@dataclass(frozen=True)
class HeaderInfo:
    """What the header declares.

    Attributes:
        format: ``nifti``, ``nrrd`` or ``metaimage``.
        shape: declared array shape (x, y, z[, t|c]).
        spacing: voxel size in mm of the first three axes.
        item_bytes: bytes per voxel (all components).
        declared_bytes: voxels x item size.
    """

    format: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    item_bytes: int
    declared_bytes: int


# ----------------------------------------------------------------------------- entry points

def check_image_header(
    path: str | Path,
    *,
    target_spacing: Sequence[float] | None = None,
    limits: HeaderLimits | None = None,
    allow_detached: bool = False,
    allow_4d: bool = False,
    require_3d: bool = True,
    name: str | None = None,
) -> HeaderInfo | None:
    """Inspect ``path``'s header and refuse hostile or unsegmentable images before decoding.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, ``.hdr`` or
            ``.img`` file. Other endings are not inspected (``None`` is returned).
        target_spacing: the spacing (mm) the model resamples to, for the resampled-size cap
            (``Plans.resampling_spacing``); a value <= 0 is an axis kept at the volume's own
            spacing (a 2D model's slice axis), bounded by the finest spacing the header
            declares; ``None`` skips that cap.
        limits: caps (default :class:`HeaderLimits`).
        allow_detached: accept a detached data file inside the header's own folder (local
            files); uploads leave this ``False``.
        allow_4d: let a 4D header pass (size caps still apply to all frames).
        require_3d: refuse other than 3 (or 4 with ``allow_4d``) dimensions; ``False`` leaves
            that rule to the caller (``check-data`` reports it with its own words).
        name: how messages name the file (default: the path as given).

    Returns:
        The declared :class:`HeaderInfo`, or ``None`` for an ending not inspected.

    Raises:
        VolumeTooLarge: declared voxels / bytes or the resampled grid above the caps.
        DataError: missing file, unreadable or over-long header, detached data file, wrong
            number of dimensions, an empty axis, implausible spacing, truncated or
            over-long gzip stream. The message names ``name`` and the rule.
    """
    path = Path(path)
    label = name or str(path)
    limits = limits or HeaderLimits()
    lowered = path.name.lower()
    if not path.is_file():
        raise DataError(f"{label}: image file not found")
    if lowered.endswith((".nii", ".nii.gz")):
        info = _nifti(path, label, limits, gz=lowered.endswith(".gz"))
    elif lowered.endswith((".hdr", ".img")):
        if not allow_detached:
            raise DataError(f"{label}: NIfTI / Analyze .hdr + .img pairs are refused; "
                            "send one self-contained .nii or .nii.gz file")
        info = _nifti_pair(path, label, limits)
    elif lowered.endswith((".nrrd", ".nhdr")):
        if lowered.endswith(".nhdr") and not allow_detached:
            raise DataError(f"{label}: detached NRRD headers (.nhdr) are refused; "
                            "send one self-contained .nrrd file")
        info = _nrrd(path, label, allow_detached)
    elif lowered.endswith((".mha", ".mhd")):
        if lowered.endswith(".mhd") and not allow_detached:
            raise DataError(f"{label}: detached MetaImage headers (.mhd) are refused; "
                            "send one self-contained .mha file")
        info = _metaimage(path, label, allow_detached)
    else:
        return None
    _check_info(info, label, limits, target_spacing, allow_4d, require_3d)
    return info


def check_local_inputs(path: str | Path | Sequence[str | Path],
                       target_spacing: Sequence[float] | None = None,
                       limits: HeaderLimits | None = None) -> None:
    """:func:`check_image_header` for local files given as ``Predictor.predict_file`` takes
    them (one path or one per channel): detached data files allowed inside their header's
    folder, 4D allowed (the predictor refuses or splits it).

    Raises:
        VolumeTooLarge / DataError: as :func:`check_image_header`, naming the file.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    for p in paths:
        check_image_header(p, target_spacing=target_spacing, limits=limits,
                           allow_detached=True, allow_4d=True)


# ----------------------------------------------------------------------------- shared rules

def _check_info(info: HeaderInfo, label: str, limits: HeaderLimits,
                target_spacing: Sequence[float] | None, allow_4d: bool,
                require_3d: bool = True) -> None:
    shape = info.shape
    ndim = len(shape)
    if ndim == 4 and not allow_4d and require_3d:
        raise DataError(f"{label}: volume is 4D (shape {list(shape)}); upload one 3D frame")
    if ndim not in (3, 4) and require_3d:
        raise DataError(f"{label}: volume has {ndim} dimensions (shape {list(shape)}); "
                        "a 3D volume is required")
    _check_info_sizes(info, label, limits)
    spacing = info.spacing[:3]
    # the limits hold to float32's rounding: a rotated float32 affine's column norm of a
    # 0.05 mm grid reads 0.0499999 (it was refused, the straight copy accepted)
    low = limits.min_spacing_mm * (1 - FLOAT32_RTOL)
    high = limits.max_spacing_mm * (1 + FLOAT32_RTOL)
    for axis, s in enumerate(spacing):
        if not math.isfinite(s) or not low <= s <= high:
            raise DataError(f"{label}: voxel spacing {s:.7g} mm along axis {axis} is implausible "
                            f"(allowed {limits.min_spacing_mm:g}-{limits.max_spacing_mm:g} mm)")
    if target_spacing is not None:
        # Which voxel axis becomes a kept (native) axis depends on the affine, which this
        # header-only check does not have: the finest declared spacing bounds its count.
        target = [float(t) if t > 0 else min(spacing) for t in list(target_spacing)[:3]]
        extent = math.prod(n * s for n, s in zip(shape[:3], spacing, strict=True))
        resampled = extent / math.prod(target) * (shape[3] if ndim == 4 else 1)
        if resampled > limits.max_resampled_voxels:
            grid = " x ".join(f"{t:g}" if t > 0 else "own" for t in list(target_spacing)[:3])
            raise VolumeTooLarge(
                f"{label}: resampled to the model's spacing ({grid} mm) the volume would have "
                f"about {resampled:.3g} voxels, above the limit of {limits.max_resampled_voxels}")


def _read_head(path: Path, n: int = HEADER_READ_BYTES) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _check_detached(data_file: str, header: Path, label: str, field: str) -> None:
    """A local detached data file: a plain relative name resolving inside the header's folder."""
    value = data_file.strip()
    parts = PurePosixPath(value.replace("\\", "/")).parts
    if (not value or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value)
            or ".." in parts or value.upper() == "LIST" or len(value.split()) > 1):
        raise DataError(f"{label}: {field} must be one file name inside the header's folder "
                        "(no absolute path, no '..', no file list or pattern)")
    folder = header.parent.resolve()
    target = (folder / value).resolve()
    if (folder not in target.parents or str(target).startswith(("/dev/", "/proc/", "/sys/"))
            or not target.is_file()):
        raise DataError(f"{label}: {field} must name an existing regular file inside the "
                        "header's folder")


# ----------------------------------------------------------------------------- NIfTI

def _nifti_header(head: bytes, label: str):
    """nibabel Nifti1Header / Nifti2Header from the first bytes; refuses a bad sizeof_hdr."""
    import nibabel as nib

    if len(head) < 348:
        raise DataError(f"{label}: corrupt or truncated NIfTI: only {len(head)} header bytes")
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    if 348 in sizes:
        klass, n = nib.Nifti1Header, 348
    elif 540 in sizes:
        klass, n = nib.Nifti2Header, 540
    else:
        raise DataError(f"{label}: not a NIfTI header (sizeof_hdr is neither 348 nor 540)")
    if len(head) < n:
        raise DataError(f"{label}: corrupt or truncated NIfTI: only {len(head)} header bytes")
    try:
        return klass.from_fileobj(io.BytesIO(head[:n]), check=False)
    except Exception as exc:  # nibabel raises several types for a broken header
        raise DataError(f"{label}: NIfTI header is invalid ({type(exc).__name__})") from None


def _nifti_info(header, label: str) -> HeaderInfo:
    import numpy as np

    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise DataError(f"{label}: NIfTI dim[0] = {dim[0]} is outside 1-7")
    shape = tuple(dim[1:dim[0] + 1])
    try:
        dtype = header.get_data_dtype()
    except Exception:
        raise DataError(f"{label}: NIfTI datatype code {int(header['datatype'])} is not "
                        "supported") from None
    if dtype.kind not in "biuf":  # complex (the imaginary part would be dropped), RGB(A)
        kind = "complex" if dtype.kind == "c" else "RGB / RGBA" if dtype.names else str(dtype)
        raise DataError(f"{label}: NIfTI datatype {kind} (code {int(header['datatype'])}) is "
                        "not supported: voxels must be real intensities, one value each")
    qfac = float(header["pixdim"][0])
    if qfac not in (-1.0, 1.0):
        # nibabel, which reads our NIfTI files, takes any other qfac (pixdim[0]) as 1; the
        # NIfTI-1 reference library (nifti1_io.c) and ITK take a negative one as -1. They
        # agree on 0, positive values and NaN; a negative one flips the qform's slice axis
        # in one of them, and a mask written with qfac 1 would not overlay its image there.
        if qfac < 0 and int(header["qform_code"]) > 0 and int(header["sform_code"]) <= 0:
            raise DataError(f"{label}: NIfTI qfac (pixdim[0]) is {qfac:.9g}, neither 1 nor -1, "
                            "and readers disagree on it (nibabel reads 1, ITK and the NIfTI-1 "
                            "reference library -1); store 1 or -1")
        header = header.copy()
        header["pixdim"][0] = 1.0
    try:
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
        norms = np.linalg.norm(affine[:3, :3], axis=0)
        spacing = tuple(float(v) for v in norms)
    except Exception:
        raise DataError(f"{label}: NIfTI orientation (qform / sform) is invalid") from None
    if np.all(np.isfinite(norms)) and np.all(norms > 0):  # else the spacing rule refuses it
        problem = grid_problem(affine[:3, 3], affine[:3, :3] / norms[None, :], "RAS")
        if problem:
            raise DataError(f"{label}: {problem}")
    item = int(dtype.itemsize)
    voxels = math.prod(max(s, 0) for s in shape)
    return HeaderInfo("nifti", shape, spacing, item, voxels * item)


def _nifti_checked(head: bytes, label: str, limits: HeaderLimits, what: str):
    """Header, magic and :class:`HeaderInfo` of a single-file NIfTI, size caps applied."""
    header = _nifti_header(head, label)
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic in (b"ni1", b"ni2"):
        raise DataError(f"{label}: NIfTI header declares a separate .img data file; "
                        f"a self-contained {what} is required")
    info = _nifti_info(header, label)
    _check_info_sizes(info, label, limits)
    return header, magic, info


def _nifti(path: Path, label: str, limits: HeaderLimits, gz: bool) -> HeaderInfo:
    if gz:
        return _nifti_gz(path, label, limits)
    return _nifti_checked(_read_head(path, 540), label, limits, ".nii")[2]


def _check_info_sizes(info: HeaderInfo, label: str, limits: HeaderLimits) -> None:
    """The size caps alone (before a gzip stream is inflated)."""
    if not info.shape or min(info.shape) <= 0:
        raise DataError(f"{label}: volume has an empty axis (shape {list(info.shape)})")
    voxels = math.prod(info.shape)
    if voxels > limits.max_voxels:
        raise VolumeTooLarge(f"{label}: header declares {voxels} voxels (shape "
                             f"{list(info.shape)}), above the limit of {limits.max_voxels}")
    if info.declared_bytes > limits.max_bytes:
        raise VolumeTooLarge(f"{label}: header declares {info.declared_bytes} bytes of voxel "
                             f"data, above the limit of {limits.max_bytes}")


def _nifti_gz(path: Path, label: str, limits: HeaderLimits) -> HeaderInfo:
    """Parse the header from the first inflated bytes, then inflate the rest in bounded chunks
    (nothing kept) and refuse more than vox_offset + declared bytes, or a truncated stream."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":  # gzip's magic number (RFC 1952): a renamed file
            raise DataError(f"{label}: named .nii.gz but not gzip-compressed (not a NIfTI "
                            "file, or a .nii renamed)")
        f.seek(0)
        inflater = _Inflater(f, label)
        head = inflater.read(540)
        header, magic, info = _nifti_checked(head, label, limits, ".nii.gz")
        # single-file NIfTI: data starts at vox_offset, never inside the header (+ 4 bytes)
        offset = max(int(header["vox_offset"]), 352 if magic == b"n+1" else 544)
        expected = offset + info.declared_bytes
        allowed = expected + 64 * 1024  # trailing padding some writers add
        total = len(head)
        while True:
            chunk = inflater.read(_GZIP_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > allowed:
                raise VolumeTooLarge(f"{label}: gzip stream inflates beyond the declared size "
                                     f"of {expected} bytes (a compression bomb?)")
        if total < expected:
            raise DataError(f"{label}: corrupt or truncated NIfTI: gzip stream holds {total} of "
                            f"the {expected} bytes the header declares")
    return info


class _Inflater:
    """Bounded reads from a (multi-member) gzip file: never more than ``n`` bytes out per call."""

    def __init__(self, f, label: str) -> None:
        self._f = f
        self._label = label
        self._z = zlib.decompressobj(wbits=31)
        self._pending = b""
        self._eof = False

    def read(self, n: int) -> bytes:
        out = []
        got = 0
        try:
            while got < n:
                if self._z.eof:  # (after eof, unconsumed_tail repeats unused_data)
                    rest = self._z.unused_data
                    if not rest:
                        rest = self._f.read(65536)
                    if not rest or not rest.lstrip(b"\x00"):
                        break  # end of the last member (zero padding tolerated)
                    self._z = zlib.decompressobj(wbits=31)
                    data = rest
                elif self._z.unconsumed_tail:
                    data = self._z.unconsumed_tail
                else:
                    data = self._f.read(65536)
                    if not data:
                        if not self._z.eof:
                            raise DataError(f"{self._label}: gzip stream is corrupt or truncated (ends early)")
                        break
                piece = self._z.decompress(data, n - got)
                out.append(piece)
                got += len(piece)
        except zlib.error:
            raise DataError(f"{self._label}: gzip stream is corrupt or truncated") from None
        return b"".join(out)


def _nifti_pair(path: Path, label: str, limits: HeaderLimits) -> HeaderInfo:
    hdr = path.with_suffix(".hdr") if path.suffix.lower() == ".img" else path
    img = hdr.with_suffix(".img")
    if not hdr.is_file() or not img.is_file():
        raise DataError(f"{label}: a .hdr + .img pair needs both files in the same folder")
    info = _nifti_info(_nifti_header(_read_head(hdr, 540), label), label)
    _check_info_sizes(info, label, limits)
    return info


# ----------------------------------------------------------------------------- NRRD

_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
        "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
        "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int",
        "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
        "uint64", "uint64_t", "double"),
}
_NRRD_ITEM = {name: size for size, names in _NRRD_TYPES.items() for name in names}


def _text_header(path: Path, label: str, fmt: str, end: re.Pattern | None) -> str:
    head = _read_head(path, HEADER_READ_BYTES + 1)
    if end is not None:
        match = end.search(head)
        if match is None:
            if len(head) > HEADER_READ_BYTES:
                raise DataError(f"{label}: {fmt} header is longer than "
                                f"{HEADER_READ_BYTES // 1024} KiB")
            text = head  # a detached header is the whole file
        else:
            text = head[:match.start()]
    else:
        text = head[:HEADER_READ_BYTES]
    return text.decode("latin-1")


def _nrrd(path: Path, label: str, allow_detached: bool) -> HeaderInfo:
    text = _text_header(path, label, "NRRD", re.compile(rb"\r?\n\r?\n"))
    lines = text.splitlines()
    if not lines or not lines[0].startswith("NRRD000"):
        raise DataError(f"{label}: not an NRRD file (no NRRD000 magic line)")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if not line.strip() or line.startswith("#"):
            continue
        kv, colon = line.find(":="), line.find(":")
        if kv != -1 and kv == colon:
            continue  # a key/value pair ("key:=value"): free text, not a field
        key, sep, value = line.partition(":")
        if not sep:
            raise DataError(f"{label}: NRRD header line is not 'field: value'")
        key = " ".join(key.lower().split())
        if key in fields:
            raise DataError(f"{label}: NRRD header field '{key}' is given twice")
        fields[key] = value.strip()
    data_file = fields.get("data file", fields.get("datafile"))
    if "data file" in fields and "datafile" in fields:
        raise DataError(f"{label}: NRRD header names its data file twice")
    if data_file is not None:
        if not allow_detached:
            raise DataError(f"{label}: NRRD header has a 'data file' field: uploads must be "
                            "self-contained (detached data files are refused)")
        _check_detached(data_file, path, label, "NRRD 'data file'")
    elif path.name.lower().endswith(".nhdr"):
        raise DataError(f"{label}: .nhdr header has no 'data file' field")
    try:
        ndim = int(fields["dimension"])
        sizes = tuple(int(s) for s in fields["sizes"].split())
    except (KeyError, ValueError):
        raise DataError(f"{label}: NRRD header lacks a valid 'dimension' / 'sizes'") from None
    if len(sizes) != ndim:
        raise DataError(f"{label}: NRRD 'sizes' has {len(sizes)} values for dimension {ndim}")
    type_name = " ".join(fields.get("type", "").lower().split())
    if type_name not in _NRRD_ITEM:
        raise DataError(f"{label}: NRRD type '{type_name[:40]}' is not supported")
    item = _NRRD_ITEM[type_name]
    spacing = _nrrd_spacing(fields, ndim, label)
    if "space origin" in fields:  # "(x,y,z)"; ITK's own refusal names only its source line
        _check_origin(fields["space origin"].strip().strip("()").replace(",", " ").split(),
                      label, "NRRD 'space origin'")
    shape = sizes
    kinds = fields.get("kinds", "").lower().split()
    if ndim == 4 and kinds and kinds[0] in ("vector", "covariant-vector", "rgb-color",
                                            "rgba-color", "list", "point", "normal", "3-color"):
        shape = sizes[1:] + sizes[:1]  # components last, as read_image returns them
        spacing = spacing[1:] + spacing[:1]
    return HeaderInfo("nrrd", shape, spacing, item, math.prod(sizes) * item)


def _check_origin(values: list[str], label: str, field: str) -> None:
    """Refuse a text header's origin that is not numbers, not finite or farther than
    :data:`uumamba.data.geometry.MAX_ORIGIN_MM` (the rule the readers apply to every format)."""
    import numpy as np

    try:
        origin = [float(v) for v in values[:3]]
    except ValueError:
        raise DataError(f"{label}: {field} is not numbers") from None
    problem = grid_problem(origin, np.eye(3), "as written") if origin else None
    if problem:
        raise DataError(f"{label}: {field}: {problem}")


def _nrrd_spacing(fields: dict[str, str], ndim: int, label: str) -> tuple[float, ...]:
    """Per-axis spacing from ``space directions`` (vector lengths) or ``spacings``.

    ``none`` / ``nan`` mark an axis without a spacing; NRRD uses them for non-spatial axes (a
    vector's components, a cine's time) and they read as 1.0, but an image needs a known
    spacing on at least ``min(dimension, 3)`` axes: a 3D volume with an unknown one would be
    segmented and measured as if it were 1 mm (its volumes in mL off by that factor).

    Raises:
        DataError: values that are not numbers, a count that does not match ``dimension``,
            or fewer known spacings than spatial axes.
    """
    if "space directions" in fields:
        vectors = re.findall(r"\(([^)]*)\)|none", fields["space directions"])
        out: list[float] = []
        known = 0
        for vec in vectors:
            if not vec:
                out.append(1.0)
                continue
            try:
                # hypot: no overflow of the squares (1e200 is a length, refused by the range rule)
                out.append(math.hypot(*(float(v) for v in vec.split(","))))
            except (ValueError, OverflowError):
                raise DataError(f"{label}: NRRD 'space directions' are not numbers") from None
            known += 1
        field = "space directions"
    elif "spacings" in fields:
        values = fields["spacings"].split()
        try:
            parsed = [float(v) for v in values]
        except ValueError:
            raise DataError(f"{label}: NRRD 'spacings' are not numbers") from None
        known = sum(1 for v in parsed if math.isfinite(v))
        out = [abs(v) if math.isfinite(v) else 1.0 for v in parsed]
        field = "spacings"
    else:
        return (1.0,) * ndim
    if len(out) != ndim:
        raise DataError(f"{label}: NRRD '{field}' has {len(out)} entries for dimension {ndim}")
    if known < min(ndim, 3):
        raise DataError(f"{label}: NRRD '{field}' gives a spacing for {known} of the image's "
                        f"{min(ndim, 3)} spatial axes ('none' / 'nan' are for non-spatial "
                        "axes only): the voxel size is unknown")
    return tuple(out)


# ----------------------------------------------------------------------------- MetaImage

_MET_ITEM = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
             "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
             "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _metaimage(path: Path, label: str, allow_detached: bool) -> HeaderInfo:
    head = _read_head(path, HEADER_READ_BYTES + 1)
    match = re.search(rb"(?im)^[ \t]*ElementDataFile[ \t]*[=:][^\r\n]*(\r?\n|$)", head)
    if match is None:
        if len(head) > HEADER_READ_BYTES:
            raise DataError(f"{label}: MetaImage header is longer than "
                            f"{HEADER_READ_BYTES // 1024} KiB or has no ElementDataFile")
        raise DataError(f"{label}: MetaImage header has no ElementDataFile line")
    text = head[:match.end()].decode("latin-1")
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise DataError(f"{label}: MetaImage header line is not 'Key = Value'")
        key = key.strip().lower()
        if key in fields:
            raise DataError(f"{label}: MetaImage header key '{key[:40]}' is given twice")
        fields[key] = value.strip()
    data_file = fields["elementdatafile"]
    if data_file.upper() != "LOCAL":
        if not allow_detached:
            raise DataError(f"{label}: MetaImage ElementDataFile must be LOCAL: uploads must be "
                            "self-contained (detached data files are refused)")
        _check_detached(data_file, path, label, "MetaImage ElementDataFile")
    try:
        ndim = int(fields["ndims"])
        sizes = tuple(int(s) for s in fields["dimsize"].split())
    except (KeyError, ValueError):
        raise DataError(f"{label}: MetaImage header lacks a valid NDims / DimSize") from None
    if len(sizes) != ndim:
        raise DataError(f"{label}: MetaImage DimSize has {len(sizes)} values for NDims {ndim}")
    etype = fields.get("elementtype", "").upper()
    if etype not in _MET_ITEM:
        raise DataError(f"{label}: MetaImage ElementType '{etype[:40]}' is not supported")
    try:
        channels = int(fields.get("elementnumberofchannels", "1"))
        raw = fields.get("elementspacing", fields.get("elementsize", ""))
        spacing = tuple(abs(float(v)) for v in raw.split()) if raw else (1.0,) * ndim
    except ValueError:
        raise DataError(f"{label}: MetaImage ElementSpacing / channels are not numbers") from None
    if channels < 1:
        raise DataError(f"{label}: MetaImage ElementNumberOfChannels must be >= 1")
    if len(spacing) != ndim:
        raise DataError(f"{label}: MetaImage ElementSpacing has {len(spacing)} values for "
                        f"NDims {ndim}")
    for key in ("offset", "origin", "position"):  # ITK reads an inf or nan there as 0
        if key in fields:
            _check_origin(fields[key].split(), label, f"MetaImage {key.capitalize()}")
    shape = sizes + ((channels,) if channels > 1 else ())
    spacing = spacing + ((1.0,) if channels > 1 else ())
    item = _MET_ITEM[etype] * channels
    return HeaderInfo("metaimage", shape, spacing, item, math.prod(sizes) * item)
