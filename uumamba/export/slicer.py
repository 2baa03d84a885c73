"""3D Slicer segmentation export (``.seg.nrrd``) of a label mask, with names and terminology.

A ``.seg.nrrd`` is a NRRD label volume whose header also lists the segments (ID, name, colour,
label value, layer, extent, terminology tag); Slicer loads it as a Segmentation node, with every
segment named and coloured. The file is written with the slicerio library; the voxel grid is
the reference image's, in Slicer's LPS world convention (``space: left-posterior-superior``,
``space directions`` = the columns of the 3x3 direction x spacing matrix, ``space origin`` =
the physical position of voxel (0, 0, 0), in mm).

Geometry sources: NIfTI references (RAS world, nibabel's affine: sform when its code is set,
else qform) are converted with LPS = diag(-1, -1, 1) RAS; NRRD / MHA / other ITK formats are
read with SimpleITK, which reports LPS already.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uumamba.data.io import is_nifti, read_geometry
from uumamba.errors import UserError
from uumamba.export.colors import assign_colors
from uumamba.export.labels import resolve_labels
from uumamba.export.terminology import lookup_terminology
from uumamba.utils import atomic_path

SEG_SUFFIX = ".seg.nrrd"
GEOMETRY_TOLERANCE_MM = 1e-3
"""Largest voxel-centre offset (mm) between a mask and its reference accepted silently."""


def read_grid(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Voxel grid of an image file: spatial shape (x, y, z) and the 4x4 voxel -> LPS matrix.

    ``ijk_to_lps @ [i, j, k, 1]`` is the LPS position in mm of voxel (i, j, k)'s centre. Only
    the header is read (:func:`uumamba.data.io.read_geometry`). 4D images give their first
    three (spatial) axes.

    Raises:
        UserError: the file does not exist, cannot be read as an image, or has fewer than 3
            dimensions.
    """
    geometry = read_geometry(path)
    shape = geometry.shape
    if len(shape) < 3:
        raise UserError(f"image {path} has shape {shape}; a 3D volume is needed")
    return (shape[0], shape[1], shape[2]), geometry.affine_lps()


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label map as an integer (x, y, z) array (first index = NIfTI i = ITK x).

    Trailing singleton axes (x, y, z, 1) are dropped; float-stored masks are accepted when all
    values are whole numbers.

    Raises:
        UserError: the file is missing or unreadable, not 3D, or holds non-integer values or
            values outside 0..65535.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mask {path} does not exist")
    try:
        if is_nifti(path):
            import nibabel as nib

            array = np.asanyarray(nib.load(str(path)).dataobj)
        else:
            import SimpleITK as sitk

            image = sitk.ReadImage(str(path))
            if image.GetNumberOfComponentsPerPixel() != 1:
                raise UserError(f"mask {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a label map has 1")
            array = sitk.GetArrayFromImage(image)
            array = np.transpose(array, tuple(range(array.ndim - 1, -1, -1)))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read mask {path}: {exc}") from None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise UserError(f"mask {path} has shape {array.shape}; a 3D label map is needed")
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
            raise UserError(f"mask {path} holds non-integer values; a label map is needed")
        array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
        raise UserError(
            f"mask {path} has label values outside 0..65535 (min {array.min()}, max {array.max()})"
        )
    return np.asarray(array)


def _label_array(mask: np.ndarray) -> np.ndarray:
    """Validate the mask and store it in the smallest unsigned type Slicer reads (uint8/16)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 3:
        raise ValueError(f"mask must be a 3D numpy array (x, y, z), got {getattr(mask, 'shape', type(mask))}")
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must have an integer dtype, got {mask.dtype}")
    if mask.size and mask.min() < 0:
        raise ValueError(f"mask has negative label values (min {mask.min()})")
    top = int(mask.max()) if mask.size else 0
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"mask label value {top} exceeds 65535, the largest Slicer label type")
    return mask.astype(np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16, copy=False)


def _segment_names(labels: dict[int, str], present: np.ndarray) -> dict[int, str]:
    names = {int(v): str(n) for v, n in labels.items() if int(v) != 0}
    for value in present.tolist():
        if value != 0 and value not in names:
            names[int(value)] = f"label_{int(value)}"
    for value, name in names.items():
        if not name.strip():
            raise ValueError(f"label {value} has an empty name")
    return dict(sorted(names.items()))


def _check_written_geometry(path: Path, ijk_to_lps: np.ndarray) -> None:
    import nrrd

    header = nrrd.read_header(str(path))
    directions = np.asarray(header["space directions"], dtype=np.float64)[-3:]
    written = np.eye(4)
    written[:3, :3] = directions.T
    written[:3, 3] = np.asarray(header["space origin"], dtype=np.float64)
    if header.get("space") != "left-posterior-superior" or not np.allclose(
        written, ijk_to_lps, rtol=0, atol=1e-6
    ):
        raise RuntimeError(f"{path}: written geometry differs from the reference's (bug)")


def write_seg_nrrd(
    mask: np.ndarray,
    reference_path: str | Path,
    out_path: str | Path,
    labels: dict[int, str],
) -> Path:
    """Write a label mask as a 3D Slicer segmentation (``.seg.nrrd``) on the reference's grid.

    One segment per foreground label: ID ``Segment_<value>``, the given name, a distinct
    colour (:func:`uumamba.export.colors.assign_colors`), the label value (all segments share
    layer 0, so the voxel array is the mask itself) and a terminology entry
    (:func:`uumamba.export.terminology.lookup_terminology`; generic "Tissue" if the name is
    unknown). Labels absent from the mask are still written, as empty segments; mask values
    missing from ``labels`` become segments named ``label_<value>``. Segment extents are the
    full grid (what Slicer writes for shared layers).

    Args:
        mask: (x, y, z) integer (or bool) array in the reference image's voxel grid — index
            order as nibabel gives a NIfTI, i.e. the transpose of SimpleITK's (z, y, x) array.
            Values 0..65535; stored as uint8 when all values fit, else uint16.
        reference_path: the image the mask belongs to (NIfTI, NRRD, MHA, ...); its geometry
            (spacing, direction, origin) is copied, converted to LPS.
        out_path: destination; must end in ``.seg.nrrd`` (Slicer recognises segmentations by
            that suffix). Parent folders are created; written atomically.
        labels: label value -> name; value 0 (background) is ignored.

    Returns:
        ``out_path`` as a Path.

    Raises:
        UserError: ``out_path`` lacks the .seg.nrrd suffix, the reference is unreadable, or
            the mask shape differs from the reference's spatial shape.
        ValueError: the mask is not a 3D integer array with values in 0..65535, or a label
            name is empty.
    """
    out_path = Path(out_path)
    if not out_path.name.lower().endswith(SEG_SUFFIX):
        raise UserError(f"output {out_path} must end in {SEG_SUFFIX} for 3D Slicer to load it as a segmentation")
    voxels = _label_array(mask)
    shape, ijk_to_lps = read_grid(reference_path)
    if voxels.shape != shape:
        raise UserError(
            f"mask shape {voxels.shape} does not match reference {reference_path} shape {shape}"
        )
    names = _segment_names(labels, np.unique(voxels))
    colors = assign_colors(names)
    segments = []
    for value, name in names.items():
        segments.append({
            "id": f"Segment_{value}",
            "name": name,
            "nameAutoGenerated": False,
            "color": [round(float(c), 6) for c in colors[value]],
            "colorAutoGenerated": False,
            "labelValue": value,
            "layer": 0,
            "terminology": lookup_terminology(name).to_slicerio(),
        })
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }
    import slicerio

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation)
        _check_written_geometry(tmp, ijk_to_lps)
    return out_path


def _max_voxel_offset_mm(shape: tuple[int, int, int], a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance (mm) between the two grids' positions of the 8 corner voxels."""
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    ).T
    return float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))


@dataclass
class ExportResult:
    """What :func:`export_mask` wrote.

    Attributes:
        path: the ``.seg.nrrd`` written.
        segments: label value -> segment name, for the values present in the mask.
        grid_offset_mm: largest distance between the mask file's voxel centres and the
            reference's (0 for the same grid); the reference's grid is the one written.
    """

    path: Path
    segments: dict[int, str]
    grid_offset_mm: float

    @property
    def geometry_differs(self) -> bool:
        """The mask header places voxels more than :data:`GEOMETRY_TOLERANCE_MM` away (but at
        most half a voxel) from the reference's."""
        return self.grid_offset_mm > GEOMETRY_TOLERANCE_MM


def export_mask(
    mask: str | Path,
    reference: str | Path,
    output: str | Path,
    labels: str | None = None,
) -> ExportResult:
    """Read a mask file and write it as a Slicer ``.seg.nrrd`` on the reference's grid.

    Args:
        mask: label map file (NIfTI / NRRD / MHA) in the reference's voxel grid.
        reference: the image the mask was predicted from / drawn on.
        output: destination ``.seg.nrrd``.
        labels: ``"1=RV,2=MYO,3=LV"``, a model folder or dataset.json path, or None (values
            found in the mask, named ``label_N``). See :mod:`uumamba.export.labels`.

    Returns:
        :class:`ExportResult` (the caller reports ``geometry_differs``).

    Raises:
        UserError: a file is missing or unreadable (message names it), shapes differ, the
            mask's voxels lie more than half a voxel away from the reference's, or ``labels``
            is malformed.
    """
    mask_path, reference_path = Path(mask), Path(reference)
    array = read_mask(mask_path)
    shape, reference_grid = read_grid(reference_path)
    if array.shape != shape:
        raise UserError(
            f"mask {mask_path} has shape {array.shape} but reference {reference_path} has {shape}"
        )
    _, mask_grid = read_grid(mask_path)
    offset = _max_voxel_offset_mm(shape, mask_grid, reference_grid)
    half_voxel = 0.5 * float(min(np.linalg.norm(reference_grid[:3, :3], axis=0)))
    if offset > half_voxel:
        raise UserError(
            f"mask {mask_path} does not lie on the grid of reference {reference_path}: voxel "
            f"centres up to {offset:.3g} mm apart (more than half a voxel, {half_voxel:.3g} mm); "
            "is it the mask of another image?"
        )
    names = resolve_labels(labels, np.unique(array).tolist())
    try:
        path = write_seg_nrrd(array, reference_path, output, names)
    except ValueError as exc:  # e.g. an empty label name in a dataset.json
        raise UserError(f"cannot export mask {mask_path}: {exc}") from None
    return ExportResult(path, _segment_names(names, np.unique(array)), offset)
