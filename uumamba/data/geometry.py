"""The voxel grid of an image (:class:`Geometry`): shape, spacing, origin and direction in LPS
world coordinates, and the 4x4 affines of it.

Its own module so that readers of every kind — :mod:`uumamba.data.io` (NIfTI, NRRD,
MetaImage) and :mod:`uumamba.data.dicom_series` (DICOM series) — share it without importing each
other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
    def from_affine_ras(cls, affine: np.ndarray, shape: tuple[int, ...]) -> Geometry:
        """Geometry from a 4x4 RAS affine (nibabel convention) and an array shape."""
        lps = _LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        spacing = np.where(spacing > 0, spacing, 1.0)
        direction = lps[:3, :3] / spacing[None, :]
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
