"""Reading and writing volumes with their geometry (NIfTI, NRRD, MetaImage).

Axis convention: arrays are indexed ``(x, y, z)`` — the order of nibabel's ``get_fdata()``
and of the NIfTI / ITK index (i, j, k); this is ``SimpleITK.GetArrayFromImage`` transposed.
4D images read as ``(x, y, z, t)``, multi-component (vector) images as ``(x, y, z, c)``.

Geometry is reported in LPS world coordinates (the ITK / DICOM convention), whatever the
format: for NIfTI the RAS affine nibabel reports (sform when its code is set, else qform) is
converted by negating the first two world axes. NIfTI is read with nibabel (the reader MONAI's
``NibabelReader`` uses, so geometry and transforms agree); NRRD and MetaImage with SimpleITK.

A *folder* is read as one DICOM series (:func:`read_dicom_folder`, through
:mod:`uumamba.data.dicom_series`, loaded on first use): the grid is the one ``predict`` gives a
DICOM input (x = columns, y = rows, z = increasing position along the slice normal, origin =
the first slice's ImagePositionPatient), so a NIfTI label drawn on that series overlays it.

Writers take an array in a reference image's voxel grid and give it the reference's geometry:
NIfTI by copying the reference's header (qform and sform, codes included), NRRD / MHA by
setting the reference's origin, spacing and direction (what ``CopyInformation`` copies). Files
are written under a temporary name (:func:`uumamba.utils.atomic_path`), read back and compared
to the reference's geometry before they replace ``out_path``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from uumamba.data.geometry import Geometry, as_floats, grid_problem
from uumamba.data.layouts import split_suffix
from uumamba.errors import DataError, GridError, escape_quoted
from uumamba.utils import atomic_path

if TYPE_CHECKING:
    # SimpleITK loads on the first NRRD / MetaImage: a fifth of a second of every start-up
    import SimpleITK as sitk

    # uumamba.dicom imports this module; pydicom loads on first DICOM read
    from uumamba.data.dicom_series import DicomLimits, SeriesGeometry

#: Output formats accepted by the writers, with their file endings.
FORMATS: dict[str, str] = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha"}
_FORMAT_OF_SUFFIX = {".nii.gz": "nii.gz", ".nii": "nii", ".nrrd": "nrrd", ".nhdr": "nrrd",
                     ".mha": "mha", ".mhd": "mha"}


def is_nifti(path: str | Path) -> bool:
    """True for ``.nii`` / ``.nii.gz`` file names."""
    return split_suffix(Path(path))[1] in (".nii", ".nii.gz")


def format_of(path: str | Path) -> str:
    """Output format name (key of :data:`FORMATS`) matching a file's ending.

    Raises:
        ValueError: the ending is not a supported image ending.
    """
    suffix = split_suffix(Path(path))[1]
    if suffix not in _FORMAT_OF_SUFFIX:
        raise ValueError(f"{path}: unsupported image file ending (expected one of "
                         f"{', '.join(_FORMAT_OF_SUFFIX)})")
    return _FORMAT_OF_SUFFIX[suffix]


def _sitk_geometry(spacing, origin, direction, shape) -> Geometry:
    """Geometry from SimpleITK header values of any dimension (first 3 axes kept)."""
    dim = len(spacing)
    d3 = np.eye(3)
    full = np.asarray(direction, dtype=np.float64).reshape(dim, dim)
    k = min(dim, 3)
    d3[:k, :k] = full[:k, :k]
    sp = np.ones(3)
    sp[:k] = spacing[:k]
    org = np.zeros(3)
    org[:k] = origin[:k]
    return Geometry(tuple(int(s) for s in shape), as_floats(sp), as_floats(org),
                    tuple(as_floats(row) for row in d3))


def _sitk_xyz_shape(size: tuple[int, ...], components: int) -> tuple[int, ...]:
    return tuple(size) + ((components,) if components > 1 else ())


def _nifti_spacing_check(path: Path, img) -> None:
    """Refuse a NIfTI file whose voxel size along a spatial axis is not a positive number.

    nibabel silently replaces a zero ``pixdim`` by 1 mm and a negative one by its absolute
    value when it loads a header, so the header is read again as stored (``check=False``).
    The affine nibabel uses (sform or qform) is checked too: a zero column means spacing 0.

    Raises:
        GridError: names the file, the axis and the stored value.
        DataError: the header cannot be read again.
    """
    n_spatial = min(len(img.shape), 3)
    try:
        with nib.openers.ImageOpener(str(path)) as fobj:
            raw = type(img.header).from_fileobj(fobj, check=False)
    except Exception as exc:  # nibabel read this header a moment ago
        raise DataError(f"{path}: cannot read image header: {exc}") from None
    pixdim = np.asarray(raw["pixdim"], dtype=np.float64)
    for axis in range(n_spatial):
        value = pixdim[axis + 1]
        if not (np.isfinite(value) and value > 0):
            raise GridError(path, f"spacing along axis {axis} is {_mm(value)} mm "
                                  f"(pixdim[{axis + 1}] = {_mm(value)}); voxel sizes must be "
                                  "positive")
    columns = np.linalg.norm(np.asarray(img.affine, dtype=np.float64)[:3, :3], axis=0)
    for axis in range(n_spatial):
        if not (np.isfinite(columns[axis]) and columns[axis] > 0):
            form = "sform" if int(raw["sform_code"]) > 0 else "qform"
            raise GridError(path, f"spacing along axis {axis} is {_mm(columns[axis])} mm "
                                  f"(column {axis} of the {form} affine); voxel sizes must be "
                                  "positive")


def _checked(path: Path, geometry: Geometry) -> Geometry:
    """``geometry`` when its origin and axes describe a real grid (:func:`uumamba.data.
    geometry.grid_problem`), else a :class:`~uumamba.errors.GridError` naming the file and
    the rule."""
    problem = grid_problem(geometry.origin, geometry.direction)
    if problem:
        raise GridError(path, problem)
    return geometry


def _sitk_spacing_check(path: Path, spacing: tuple[float, ...]) -> None:
    """Refuse an NRRD / MetaImage header whose spacing along an axis is not positive.

    ITK refuses spacing 0 only when it reads the voxels (with a message about ITK internals)
    and silently flips a negative spacing into the direction, so the header's own values are
    checked first.

    Raises:
        GridError: names the file, the axis and the header's spacing.
    """
    for axis, value in enumerate(spacing):
        if not (np.isfinite(value) and value > 0):
            shown = ", ".join(_mm(v) for v in spacing)
            raise GridError(path, f"spacing along axis {axis} is {_mm(value)} mm (header "
                                  f"spacing ({shown})); voxel sizes must be positive")


def _mm(value: float) -> str:
    """A spacing for a message, exactly as stored (``0``, ``-1.5``, ``nan``)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _sitk_reader(path: Path) -> sitk.ImageFileReader:
    """A SimpleITK reader of ``path`` whose header is read and whose spacing is checked."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as exc:  # ITK raises RuntimeError for a broken header
        raise DataError(f"{path}: cannot read image header: {_reader_reason(exc, path=path)}"
                        ) from None
    _sitk_spacing_check(path, reader.GetSpacing())
    return reader


def read_geometry(path: str | Path) -> Geometry:
    """Read only the header of an image (or the headers of a DICOM series folder, no pixel
    decoded) and return its :class:`Geometry`.

    Raises:
        DataError: the file is missing, its header cannot be read, or its voxel size along a
            spatial axis is zero, negative or not a number (NIfTI ``pixdim``, NRRD / MHA
            spacing); the message names the file (and the axis). For a folder: the series
            refusals of :func:`read_dicom_folder`.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_folder(path, decode=False)[1].geometry
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    if not is_nifti(path):
        reader = _sitk_reader(path)
        shape = _sitk_xyz_shape(reader.GetSize(), reader.GetNumberOfComponents())
        return _checked(path, _sitk_geometry(reader.GetSpacing(), reader.GetOrigin(),
                                             reader.GetDirection(), shape))
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a broken header
        raise DataError(f"{path}: cannot read image header: {exc}") from None
    _nifti_spacing_check(path, img)
    return _checked(path, Geometry.from_affine_ras(img.affine, img.shape,
                                                   img.header.get_zooms()))


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a whole image (fully decompressed) and its geometry.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file, or a
            folder holding one DICOM series (:func:`read_dicom_folder`).

    Returns:
        ``(array, geometry)``: array indexed ``(x, y, z[, t|c])``; dtype as stored on disk,
        or floating point when a NIfTI ``scl_slope`` / ``scl_inter`` applies (so a scaled
        label map can read back as 0.999 — the integrity check reports that). A DICOM series
        gives ``(x, y, z)`` rescaled values (int16, int32 or float32).

    Raises:
        DataError: the file is missing, unreadable, or truncated, or its voxel size along a
            spatial axis is zero, negative or not a number (as :func:`read_geometry`); the
            message names the file (and the axis). For a folder: as :func:`read_dicom_folder`.
    """
    path = Path(path)
    if path.is_dir():
        array, plan = read_dicom_folder(path, decode=True)
        return array, plan.geometry
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    if not is_nifti(path):
        import SimpleITK as sitk

        reader = _sitk_reader(path)
        try:
            img = reader.Execute()
            array = sitk.GetArrayFromImage(img)
        except Exception as exc:  # RuntimeError for truncated files
            raise _unreadable(path, exc) from None
        components = img.GetNumberOfComponentsPerPixel()
        spatial = img.GetDimension()
        order = tuple(reversed(range(spatial))) + ((spatial,) if components > 1 else ())
        array = array.transpose(order)
        return array, _checked(path, _sitk_geometry(img.GetSpacing(), img.GetOrigin(),
                                                    img.GetDirection(), array.shape))
    try:
        img = nib.load(str(path), mmap=False)
    except Exception as exc:  # nibabel raises many types for a broken header
        raise _unreadable(path, exc) from None
    _nifti_spacing_check(path, img)
    geometry = _checked(path, Geometry.from_affine_ras(img.affine, img.shape,  # before decoding
                                                       img.header.get_zooms()))
    try:
        array = np.asarray(np.asanyarray(img.dataobj))  # reads and decompresses everything
    except Exception as exc:  # EOFError / zlib.error for truncated files
        raise _unreadable(path, exc) from None
    return array, replace(geometry, shape=tuple(int(s) for s in array.shape))


def read_dicom_folder(path: str | Path, decode: bool = True, limits: DicomLimits | None = None
                      ) -> tuple[np.ndarray | None, SeriesGeometry]:
    """Read a folder holding exactly one DICOM image series (searched recursively).

    Args:
        path: the folder.
        decode: decode the pixels (``False``: headers only, the array is ``None``).
        limits: :class:`uumamba.data.dicom_series.DicomLimits` (default caps: 20,000 files, 8 GiB,
            the :class:`~uumamba.data.untrusted.HeaderLimits` voxel / byte / spacing caps,
            checked from the headers before any pixel is decoded).

    Returns:
        ``(array, plan)``: array ``(x, y, z)`` of rescaled values (int16 / int32 / float32,
        see :func:`uumamba.data.dicom_series.read_series_volume`) or ``None``, and the
        :class:`uumamba.data.dicom_series.SeriesGeometry` whose ``geometry`` is the grid (LPS, mm).

    Raises:
        DataError: ``"{path}: DICOM series: {rule}"`` for every refusal of
            :func:`uumamba.data.dicom_series.series_geometry` (mixed orientations, uneven,
            duplicated or missing slices, tilt, multi-frame, non-image or colour objects,
            undecodable transfer syntax) and for a 4D series (several temporal positions:
            one 3D series per folder is needed); no DICOM file, non-image objects only, or
            more than one series in the folder; an undecodable slice.
            :class:`~uumamba.data.untrusted.VolumeTooLarge` (a DataError) for the size caps.
    """
    from uumamba.data.dicom_series import (
        Series4D,
        discover_series,
        read_series_volume,
        series_geometry,
    )
    from uumamba.data.untrusted import VolumeTooLarge

    path = Path(path)
    found = discover_series(path, limits)
    if len(found) != 1:
        names = ", ".join(s.case for s in found)
        raise DataError(f"{path}: holds {len(found)} DICOM image series ({names}); a case "
                        "folder must hold exactly one series")
    (series,) = found
    series.where = str(path)
    prefix = f"{series.label}: "
    try:
        plan = series_geometry(series, frame=None, limits=limits)
        array = read_series_volume(plan, series.label) if decode else None
    except Series4D as exc:
        raise DataError(f"{path}: DICOM series: 4D series with {exc.n_frames} temporal "
                        "positions (cine); a case folder must hold one 3D series") from None
    except DataError as exc:
        kind = VolumeTooLarge if isinstance(exc, VolumeTooLarge) else DataError
        raise kind(f"{path}: DICOM series: {str(exc).removeprefix(prefix)}") from None
    return array, plan


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path}: cannot read image (corrupt or truncated?): "
                     f"{type(exc).__name__}: {_reader_reason(exc, path=path)}")


_ITK_OBJECT = re.compile(r"\w+\(0x[0-9a-fA-F]+\):\s*")


def _reader_reason(exc: Exception, limit: int = 300, path: Path | None = None) -> str:
    """One line of a reader's error: ITK's is ten (its source file, an object address, then
    teem's ``[nrrd]`` trace whose last line is the reason); that last ``[nrrd]`` line, else the
    last ``ERROR:`` line without the object, else the first line, cut to ``limit``. A line
    break inside ``path``, where the message quotes it, is escaped first."""
    text = str(exc) if path is None else escape_quoted(str(exc), path)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    nrrd = [line for line in lines if line.startswith("[nrrd]")]
    errors = [line for line in lines if "ERROR:" in line]
    if nrrd:
        text = "NRRD: " + nrrd[-1].split(":", 1)[-1].strip()
    elif errors:
        text = _ITK_OBJECT.sub("", errors[-1].split("ERROR:", 1)[1]).strip()
    else:
        text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _resolve_output(reference_path: Path, out_path: Path, format: str | None) -> tuple[Path, str]:
    """Pick the output format and make ``out_path`` end with its suffix."""
    if format is None:
        has_suffix = split_suffix(out_path)[1] in _FORMAT_OF_SUFFIX
        fmt = format_of(out_path if has_suffix else reference_path)
    elif format.lstrip(".") in FORMATS:
        fmt = format.lstrip(".")
    else:
        raise ValueError(f"format={format!r}: expected one of {', '.join(FORMATS)}")
    stem, suffix = split_suffix(out_path)
    if not suffix:
        return out_path.with_name(out_path.name + FORMATS[fmt]), fmt
    if _FORMAT_OF_SUFFIX.get(suffix) != fmt or suffix in (".nhdr", ".mhd"):
        raise ValueError(f"out_path={out_path}: ending '{suffix}' does not match format '{fmt}'")
    return out_path, fmt


def _write(array: np.ndarray, dtype: np.dtype, reference_path: str | Path,
           out_path: str | Path, format: str | None) -> Path:
    """Shared writer of :func:`write_mask` and :func:`write_image`."""
    reference_path, out_path = Path(reference_path), Path(out_path)
    ref_geom = read_geometry(reference_path)
    if array.shape[:3] != ref_geom.spatial_shape or array.ndim not in (3, 4):
        raise ValueError(f"array shape {array.shape} does not match the voxel grid "
                         f"{ref_geom.spatial_shape} of {reference_path} (expected (x, y, z) "
                         "or (x, y, z, c))")
    out_path, fmt = _resolve_output(reference_path, out_path, format)
    data = np.ascontiguousarray(array.astype(dtype, copy=False))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        if fmt in ("nii", "nii.gz"):
            _write_nifti(data, reference_path, ref_geom, tmp)
        else:
            _write_sitk(data, ref_geom, tmp)
        written = read_geometry(tmp)
        bad = ref_geom.mismatch(written)
        if bad:
            raise RuntimeError(f"{out_path}: written {', '.join(bad)} differ from the reference "
                               f"{reference_path} ({written} vs {ref_geom})")
    return out_path


def _write_nifti(data: np.ndarray, reference_path: Path, ref_geom: Geometry, tmp: Path) -> None:
    if is_nifti(reference_path):
        header = nib.load(str(reference_path)).header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(None, None)  # no scaling: values are written as they are
        header["cal_min"], header["cal_max"] = 0, 0
        header.set_intent("none")
        # the input's own NIfTI version: a NIfTI-2 header put in a NIfTI-1 image is converted,
        # its float64 qform / sform rounded to float32 (and nibabel logs the sizeof_hdr fix)
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = klass(data, None, header=header)  # affine None keeps qform and sform
    else:
        img = nifti_on_grid(data, ref_geom)
    nib.save(img, str(tmp))


def nifti_on_grid(data: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
    """A NIfTI-1 image of ``data`` ((x, y, z[, c]) in ``geometry``'s voxel grid) whose qform and
    sform (both code 1, scanner) are ``geometry``'s RAS affine, units mm."""
    affine = geometry.affine_ras()
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _write_sitk(data: np.ndarray, ref_geom: Geometry, tmp: Path) -> None:
    import SimpleITK as sitk

    if data.ndim == 4:
        img = sitk.GetImageFromArray(data.transpose(2, 1, 0, 3), isVector=True)
    else:
        img = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    img.SetSpacing(ref_geom.spacing)
    img.SetOrigin(ref_geom.origin)
    img.SetDirection(tuple(np.asarray(ref_geom.direction).ravel().tolist()))
    sitk.WriteImage(img, str(tmp), useCompression=True)


def write_mask(mask: np.ndarray, reference_path: str | Path, out_path: str | Path,
               format: str | None = None) -> Path:
    """Write a label map in a reference image's voxel grid with the reference's geometry.

    Args:
        mask: ``(x, y, z)`` integer (or bool) array, values 0..255, in the reference's grid.
        reference_path: image whose geometry the mask takes (3D, or 4D: its first 3 axes).
        out_path: output file; the format's ending is appended when it has none.
        format: ``nii.gz`` | ``nii`` | ``nrrd`` | ``mha``; default: ``out_path``'s ending
            when it has an image ending, else the reference's format.

    Returns:
        The path written. NIfTI output copies the reference's header (qform and sform with
        their codes; datatype uint8; scl_slope / scl_inter reset); NRRD / MHA get the
        reference's origin, spacing and direction. Written atomically.

    Raises:
        ValueError: wrong shape, non-integer or out-of-range values, unknown format, or an
            ending that contradicts ``format``.
        DataError: the reference cannot be read.
        RuntimeError: the file read back has a different geometry from the reference.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (x, y, z); got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
            if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
                raise ValueError(f"mask has non-integer values (dtype {mask.dtype})")
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"mask values {mask.min()}..{mask.max()} do not fit uint8")
    return _write(mask, np.dtype(np.uint8), reference_path, out_path, format)


def write_image(array: np.ndarray, reference_path: str | Path, out_path: str | Path,
                dtype: np.dtype | type = np.float32, format: str | None = None) -> Path:
    """Write a float map (probabilities, entropy) in a reference image's voxel grid.

    Args:
        array: ``(x, y, z)`` or ``(x, y, z, c)`` (channel last: NIfTI 4D / ITK vector image).
        reference_path, out_path, format: as :func:`write_mask`.
        dtype: on-disk dtype (default float32).

    Returns:
        The path written (atomically; geometry verified as in :func:`write_mask`).

    Raises:
        ValueError, DataError, RuntimeError: as :func:`write_mask`.
    """
    return _write(np.asarray(array), np.dtype(dtype), reference_path, out_path, format)
