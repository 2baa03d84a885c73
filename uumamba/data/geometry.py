"""The voxel grid of an image (:class:`Geometry`): shape, spacing, origin and direction in LPS
world coordinates, and the 4x4 affines of it.

Its own module so that readers of every kind — :mod:`uumamba.data.io` (NIfTI, NRRD,
MetaImage) and :mod:`uumamba.data.dicom_series` (DICOM series) — share it without importing each
other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


#: How far (relative) a spacing read from a float32 header may lie from the value written:
#: 8 float32 units. :meth:`Geometry.from_affine_ras` takes a stored spacing within it of the
#: affine's column norm; the header check's spacing limits hold to it
#: (:mod:`uumamba.data.untrusted`).
FLOAT32_RTOL = 8 * 2.0 ** -23


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of an image in LPS world coordinates (ITK convention).

    Attributes:
        shape: array shape in ``(x, y, z[, t or c])`` order (2D images: ``(x, y)``).
        spacing: voxel size in mm along x, y, z (3 values; 1.0 for a missing third axis).
        origin: world position (mm, LPS) of the centre of voxel (0, 0, 0).
        direction: 3x3 matrix whose columns are the LPS directions of the x, y, z axes.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The first (up to three) axes of ``shape``: the spatial grid."""
        return self.shape[:3]

    def affine_lps(self) -> np.ndarray:
        """4x4 voxel-index -> LPS-mm matrix (float64)."""
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(self.direction) * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    def affine_ras(self) -> np.ndarray:
        """4x4 voxel-index -> RAS-mm matrix (float64), as nibabel / MONAI use it."""
        return _LPS_FROM_RAS @ self.affine_lps()

    @classmethod
    def from_affine_ras(cls, affine: np.ndarray, shape: tuple[int, ...],
                        stored_spacing: Sequence[float] | None = None) -> Geometry:
        """Geometry from a 4x4 RAS affine (nibabel convention) and an array shape.

        ``stored_spacing`` (a NIfTI header's ``pixdim[1:4]``): the spacing written, taken for
        an axis whose column norm is within :data:`FLOAT32_RTOL` of it. A rotated
        float32 affine's norms miss the written spacing by about a float32 unit, and a grid
        that far apart resamples differently (a rotated copy's bf16 mask differed in 301 of
        553 k voxels); further apart, the affine's norm is kept. The direction is always the
        affine's columns over their norms.
        """
        lps = np.array(affine, dtype=np.float64)
        lps[:2] *= -1  # = _LPS_FROM_RAS @ affine, without 0 * inf spreading NaN
        norms = np.linalg.norm(lps[:3, :3], axis=0)
        norms = np.where(norms > 0, norms, 1.0)
        direction = lps[:3, :3] / norms[None, :]
        spacing = norms
        if stored_spacing is not None and len(stored_spacing) >= 3:
            stored = np.abs(np.asarray(list(stored_spacing)[:3], dtype=np.float64))
            close = np.isfinite(stored) & (np.abs(stored - norms) <= FLOAT32_RTOL * norms)
            spacing = np.where(close, stored, norms)
        return cls(tuple(int(s) for s in shape), as_floats(spacing), as_floats(lps[:3, 3]),
                   tuple(as_floats(row) for row in direction))

    def mismatch(self, other: Geometry, rtol: float = 1e-5, atol: float = 1e-5) -> list[str]:
        """Names of the fields (``shape``, ``spacing``, ``origin``, ``direction``) that differ.

        Spacing and origin compare with ``np.allclose(rtol, atol)`` (mm); direction with
        ``atol`` only (unitless); shape compares the spatial axes exactly.
        """
        out = []
        if self.spatial_shape != other.spatial_shape:
            out.append("shape")
        if not np.allclose(self.spacing, other.spacing, rtol=rtol, atol=atol):
            out.append("spacing")
        origin_tol = atol + rtol * max(1.0, float(np.max(np.abs(self.origin))))
        if not np.allclose(self.origin, other.origin, rtol=0, atol=origin_tol):
            out.append("origin")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=max(atol, rtol)):
            out.append("direction")
        return out


def as_floats(values) -> tuple[float, ...]:
    """The values as a tuple of Python floats."""
    return tuple(float(v) for v in values)


#: Farthest plausible origin from the scanner's isocentre, in mm (1 km): beyond it (or not
#: finite) the grid's world coordinates overflow what the resampling computes with (an origin
#: of 1e37 mm gave an empty mask without an error).
MAX_ORIGIN_MM = 1e6

#: Largest |cosine| between two voxel axes of an accepted grid (0.06° from perpendicular):
#: float32 rounding of a rotated affine stays far below it.
MAX_AXIS_COSINE = 1e-3


def grid_problem(origin, direction, frame: str = "LPS") -> str | None:
    """Why an origin (3 values, mm) and a (3, 3) direction (unit columns, one per voxel axis),
    both in world ``frame`` (named in the text), are not a scanner's grid, or None: an origin
    not finite or beyond :data:`MAX_ORIGIN_MM`; direction cosines not finite or not of unit
    length; voxel axes not perpendicular (a sheared grid, e.g. an uncorrected gantry tilt, or
    a singular affine, whose volumes in mL and slice planes would be wrong; DICOM series with
    a gantry tilt are refused the same way). The text names the rule and the values, never a
    path."""
    origin = np.asarray(origin, dtype=np.float64)
    if not np.all(np.isfinite(origin)) or np.max(np.abs(origin)) > MAX_ORIGIN_MM:
        shown = ", ".join(f"{v + 0.0:.7g}" for v in origin)  # + 0.0: no "-0"
        return (f"origin ({shown}) mm {frame} is not a position in a scanner (finite, within "
                f"{MAX_ORIGIN_MM:g} mm of the isocentre)")
    direction = np.asarray(direction, dtype=np.float64)
    if not np.all(np.isfinite(direction)):
        return "orientation (direction cosines) is not finite"
    for axis, length in enumerate(np.linalg.norm(direction, axis=0)):
        if abs(length - 1.0) > MAX_AXIS_COSINE:  # a MetaImage TransformMatrix of 2 I, or 0
            return (f"direction cosines of voxel axis {axis} have length {length:.4g}, not 1 "
                    "(the voxel size belongs in the spacing)")
    for a, b in ((0, 1), (0, 2), (1, 2)):
        cos = float(np.dot(direction[:, a], direction[:, b]))
        if abs(cos) > MAX_AXIS_COSINE:
            angle = float(np.degrees(np.arccos(min(abs(cos), 1.0))))
            return (f"voxel axes {a} and {b} meet at {angle:.1f}°, not 90° (a sheared or "
                    "singular grid); resample it to an orthogonal grid first")
    return None
