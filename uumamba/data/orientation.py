"""Which voxel axis is the slice axis: the image's own thick axis, never the world frame's.

Cardiac short-axis MRI is acquired double-oblique: its 8–10 mm slice axis can point anywhere in
the scanner's world frame. Reorienting such a volume to RAS and then taking "the z axis" as the
slice axis picks the wrong axis as soon as the slice normal is tilted more than 45° from the
body's z axis: the thick axis is resampled to in-plane spacing, an in-plane axis to 10 mm, and a
2D model segments the wrong plane.

uumamba therefore works in each image's own voxel axes, as nnU-Net does, with one
permutation-only reorientation (:func:`plan_axes_order`) that moves the slice axis last (axis 2,
the plan's slice axis for anisotropic data), keeps the other two in their order and flips
nothing. The slice axis is the voxel axis that is *clearly* the thickest (at least
:data:`STACK_AXIS_RATIO` × the second-largest spacing: 5-10 mm short-axis slices, LGE's 2×
anisotropy); else an axis of a few slices (a third or less of the voxels of each other axis);
else the axis across square pixels (equal spacings) when it differs from them by 5 % or more;
otherwise the last voxel axis, along which a DICOM series and its NIfTI conversion stack their
slices (:func:`slice_axis`). Taking "the thickest axis" in a thin-slice stack (1.56 × 1.56 mm
pixels, 1.0 or 1.43 mm slices) would slice it lengthwise. A near-isotropic volume of many
slices whose pixels are not square and whose axes were permuted is ambiguous from its header
alone: it keeps its last voxel axis.
The array then carries the canonical affine of its own axes (``diag(spacing)``), so
resampling happens in the voxel frame. Rotating an image's affine (its direction in the
world) therefore changes nothing the network sees, and the inverse puts the mask back on the
input's voxel grid, with the input's own affine, exactly.

Plans made before this rule (``plans.axcodes == "RAS"``) keep MONAI ``Orientationd("RAS")`` so
their networks see what they were trained on; new plans say ``"voxel"``
(``plan.reorientation``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Orientationd
from monai.utils import TraceKeys, convert_data_type

#: Spacings within this relative tolerance count as equal (square pixels).
SPACING_RTOL = 1e-3

#: Axis labels of the RAS convention (MONAI's default for non-LPS tensors), passed explicitly.
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: An axis is the slice axis by thickness alone when its spacing is at least this times the
#: second-largest: a stack's thick axis is 2x or more (short-axis cine 1.25-2 mm pixels vs 5-10
#: mm slices, LGE 0.625 vs 1.25-2.5 mm); thinner slices are found by the square pixels.
STACK_AXIS_RATIO = 1.5

#: An axis with at most 1 / this of the voxels of each other axis is the slice axis when the
#: spacings do not decide (``slice_axis`` rule 2): 10 slices of 256 x 256, 12 of 40 x 40.
FEW_SLICES_RATIO = 3

#: Square pixels decide only when the third spacing differs from them by this fraction or
#: more (``slice_axis`` rule 3): 1.43 mm slices under 1.5625 mm pixels differ by 8.5 %, a
#: near-isotropic 1.4844 x 1.5 x 1.5 mm volume by 1 %.
SQUARE_MARGIN = 0.05

#: Version of :func:`plan_axes_order`'s rule and of :class:`PlanAxes`' grid, part of the cache
#: signature (a cache made under an older rule may hold volumes sliced along another axis; 4:
#: the grid's spacing rounded to float32, :func:`canonical_spacing`).
AXES_RULE = 4

#: ``plans.axcodes`` value of the voxel-axis rule (anything else is a MONAI axcodes string).
VOXEL_AXES = "voxel"


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """(3,) spacing in mm of each voxel axis: the norms of the affine's first three columns."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def canonical_spacing(affine: np.ndarray) -> np.ndarray:
    """(3,) float64 spacing in mm of each voxel axis, :func:`voxel_spacing` rounded to the
    nearest float32: the spacing :class:`PlanAxes` gives the network grid.

    A NIfTI header stores its affine in float32, so the column norms of a rotated affine come
    out within about one float32 unit of the spacing written (1.5625 may read 1.56250012),
    where an axis-aligned one reads it exactly; resampling then interpolates the rotated copy
    on a grid 1e-7 apart from the straight one's (with the affine's roundoff, below: 8 of
    9.2 M mask voxels of six ACDC volumes rotated three ways differed in float32, 146 in bf16;
    none now). Rounded, all three spacings read the written values exactly in 97 % of 4 500
    random rotations of nine scanner spacings (0.68-10 mm; 99 % per axis,
    tests/test_oblique.py); the rest stay one float32 unit off, except for NIfTI, whose
    reader takes the spacing its header stores (``pixdim``) when the norm is within float32
    rounding of it (:meth:`uumamba.data.geometry.Geometry.from_affine_ras`).

    Spacings already in float32 (every axis-aligned NIfTI) are unchanged; a float64 one
    (NRRD, MetaImage, DICOM) moves by at most 6e-8 of itself, so the same scan as NIfTI or
    NRRD also gets the same grid. A spacing that float32 cannot hold (beyond 3.4e38 or below
    1.4e-45 mm: no scanner's, refused where inputs are checked) is kept as it is rather than
    made infinite or zero.
    """
    spacing = voxel_spacing(affine)
    with np.errstate(over="ignore", under="ignore"):
        rounded = spacing.astype(np.float32).astype(np.float64)
    return np.where(np.isfinite(rounded) & (rounded > 0), rounded, spacing)


def slice_axis(spacing, shape=None) -> int:
    """The slice axis of a volume of voxel ``spacing`` (3 values, mm) and ``shape`` (voxels;
    optional), by the first rule that decides:

    1. the axis at least :data:`STACK_AXIS_RATIO` × thicker than the second-thickest (a 5-10
       mm short-axis stack, LGE's 2× anisotropy);
    2. the axis with at most 1 / :data:`FEW_SLICES_RATIO` of the voxels of each other axis (a
       thin-slice stack of a few slices, a single slice written slice axis first);
    3. the odd one out when exactly two axes have equal spacing (square pixels, within
       :data:`SPACING_RTOL`) and the third differs from them by :data:`SQUARE_MARGIN` or more
       (1.0 or 1.43 mm slices under 1.5625 mm pixels);
    4. the last voxel axis, along which a DICOM series and its NIfTI conversion stack slices
       (a near-isotropic volume: 1.4844 × 1.5 × 1.5 mm).
    """
    spacing = np.asarray(spacing, dtype=float)[:3]
    second, largest = np.sort(spacing)[1:]
    if largest >= STACK_AXIS_RATIO * second:
        return int(np.argmax(spacing))
    if shape is not None:
        n = np.asarray(list(shape)[:3], dtype=float)
        for axis in range(3):
            others = n[[a for a in range(3) if a != axis]]
            if np.all(n[axis] * FEW_SLICES_RATIO <= others):
                return axis
    for axis, (a, b) in enumerate(((1, 2), (0, 2), (0, 1))):  # (a, b): the axes other than axis
        if np.isclose(spacing[a], spacing[b], rtol=SPACING_RTOL, atol=0) and \
                abs(spacing[axis] - spacing[a]) >= SQUARE_MARGIN * spacing[a]:
            return axis
    return 2


def plan_axes_order(affine: np.ndarray, shape=None) -> tuple[int, int, int]:
    """The voxel axes in plan order: the two in-plane axes in their own order, the slice axis
    (:func:`slice_axis`) last.

    Args:
        affine: (4, 4) voxel-to-world matrix (RAS or LPS: only column norms are used).
        shape: the spatial shape (3 voxel counts), or None (the spacing rules alone).

    Returns:
        ``order`` with ``order[k]`` = the input voxel axis that becomes plan axis ``k``;
        ``(0, 1, 2)`` when the slice axis is already last.
    """
    axis = slice_axis(voxel_spacing(affine), shape)
    return (*(a for a in range(3) if a != axis), axis)  # type: ignore[return-value]


def world_rotation(axis: int, degrees: float) -> np.ndarray:
    """(4, 4) rotation by ``degrees`` about world axis ``axis`` (0 x, 1 y, 2 z), to make oblique
    copies of a volume (``rotation @ affine``) in tests and benchmarks."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def destination_axes(affine_ras: np.ndarray, axcodes: str, shape=None) -> np.ndarray:
    """For each voxel axis, the axis it becomes after the plan's reorientation.

    Args:
        affine_ras: (4, 4) RAS voxel-to-world matrix.
        axcodes: ``"voxel"`` (plan order, slice axis last) or ``"RAS"`` (nearest RAS axis).
        shape: the spatial shape, for :func:`slice_axis` (None: spacing rules alone).

    Returns:
        (3,) int array ``dest`` with ``dest[i]`` = the reoriented axis of voxel axis ``i``.
    """
    if axcodes == VOXEL_AXES:
        order = plan_axes_order(affine_ras, shape)
        return np.array([order.index(i) for i in range(3)])
    return nib.orientations.io_orientation(affine_ras)[:, 0].astype(int)


def spacing_and_shape_in_plan_axes(affine_ras: np.ndarray, spacing, shape, axcodes: str
                                    ) -> tuple[np.ndarray, np.ndarray]:
    """A volume's per-axis spacing (mm) and shape (voxels), given in its voxel-axis order,
    moved to the plan's reoriented axes (:func:`destination_axes`).

    Returns:
        ((3,) float spacing, (3,) int shape) in plan order.
    """
    dest = destination_axes(affine_ras, axcodes, list(shape)[:3])
    out_spacing, out_shape = np.zeros(3), np.zeros(3, dtype=int)
    out_spacing[dest] = [float(v) for v in list(spacing)[:3]]
    out_shape[dest] = [int(v) for v in list(shape)[:3]]
    return out_spacing, out_shape


class PlanAxes(Orientation):
    """Permute a channel-first MetaTensor's spatial axes into plan order (:func:`plan_axes_order`)
    and give it the canonical affine ``diag(spacing)`` of those axes (:func:`canonical_spacing`).

    Input ``(C, X, Y, Z)`` with its affine in ``.affine``; output ``(C, *permuted)`` whose
    affine is ``diag(spacing[order], 1)``: no rotation, no origin. Everything after it
    (resampling to the target spacing, cropping) then works in the image's own voxel frame, so
    a rotated copy of the same voxels gives bit-identical network input — also when resampling
    is needed (MONAI's ``Spacing`` on an oblique affine interpolates differently). The inverse
    (through ``Invertd``) permutes back and restores the original affine exactly.
    """

    def __init__(self) -> None:
        super().__init__(axcodes="RAS", labels=_LABELS)

    def __call__(self, data_array: torch.Tensor, lazy: bool | None = None) -> torch.Tensor:
        if not isinstance(data_array, MetaTensor):
            raise TypeError("PlanAxes needs a MetaTensor (the affine decides the thick axis)")
        spatial = tuple(int(n) for n in data_array.peek_pending_shape())
        if len(spatial) != 3:
            raise ValueError(f"PlanAxes: expected 3 spatial axes, got shape {spatial}")
        affine, *_ = convert_data_type(data_array.peek_pending_affine(), np.ndarray)
        affine = np.asarray(affine, dtype=np.float64)
        order = plan_axes_order(affine, spatial)
        canonical = np.diag([*canonical_spacing(affine)[list(order)], 1.0])
        meta = self.track_transform_meta(
            data_array, sp_size=[spatial[o] for o in order],
            affine=np.linalg.solve(affine, canonical),  # new affine = old @ this = canonical
            extra_info={"original_affine": affine, "order": list(order)},
            orig_size=spatial, transform_info=self.get_transform_info(), lazy=False)
        out = MetaTensor(data_array.as_tensor().permute(0, *(1 + o for o in order)))
        out.copy_meta_from(meta)
        # exactly canonical: old @ solve(old, canonical) leaves ~1e-17 off the diagonal, which
        # moved a rotated copy's resampled grid (network input 1e-6 apart from the straight one)
        out.affine = torch.as_tensor(canonical, dtype=torch.float64)
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        info = transform[TraceKeys.EXTRA_INFO]
        inverse_order = np.argsort(info["order"])
        out = MetaTensor(data.as_tensor().permute(0, *(1 + int(i) for i in inverse_order)))
        out.copy_meta_from(data)
        out.affine = torch.as_tensor(np.asarray(info["original_affine"]), dtype=torch.float64)
        return out


class PlanAxesd(Orientationd):
    """Dictionary version of :class:`PlanAxes`: every key is permuted by the order of its own
    affine (image and label of a case share one grid, which the integrity check enforces)."""

    def __init__(self, keys, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, axcodes="RAS", labels=_LABELS, allow_missing_keys=allow_missing_keys)
        self.ornt_transform = PlanAxes()

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None
                 ) -> dict[Hashable, torch.Tensor]:
        return super().__call__(data, lazy)


def reorientation_transform(keys, axcodes: str) -> Orientationd:
    """``PlanAxesd`` for ``axcodes == "voxel"``, else MONAI ``Orientationd(axcodes)`` (plans made
    before the voxel-axis rule)."""
    if axcodes == VOXEL_AXES:
        return PlanAxesd(keys)
    return Orientationd(keys, axcodes=axcodes, labels=_LABELS)
