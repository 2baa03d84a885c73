"""A MONAI image reader for NRRD and MetaImage files backed by SimpleITK.

MONAI's ``ITKReader`` needs the ``itk`` Python package, which uumamba does not depend on;
SimpleITK (already a dependency) reads the same formats. The reader returns what MONAI's
readers return — an ``(x, y, z)`` array (ITK index order, as ``ITKReader`` with
``reverse_indexing=True``) and a metadata dict with a RAS ``affine`` — so Orientation,
Spacing and Invertd treat NRRD / MHA and NIfTI alike. Geometry comes from
:func:`uumamba.data.io.read_image`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from uumamba.data.io import Geometry, read_image
from uumamba.data.layouts import split_suffix

SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


class SimpleITKReader(ImageReader):
    """Read ``.nrrd`` / ``.nhdr`` / ``.mha`` / ``.mhd`` for ``monai.transforms.LoadImage``.

    Several files (one per channel) are stacked on a new first axis, as MONAI's readers do;
    their affines must agree. Vector (multi-component) images keep components last and
    record ``original_channel_dim = -1``.
    """

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """True when every file name ends with a SimpleITK-read suffix."""
        return all(split_suffix(Path(f))[1] in SITK_SUFFIXES for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> list[tuple[np.ndarray, Geometry]]:
        """Read each file fully; returns ``(array (x, y, z[, c]), Geometry)`` per file."""
        return [read_image(f) for f in ensure_tuple(data)]

    def get_data(self, img: list[tuple[np.ndarray, Geometry]]) -> tuple[np.ndarray, dict]:
        """Stack the arrays and build MONAI metadata (RAS ``affine``, ``spatial_shape``)."""
        arrays, meta = [], {}
        for array, geom in img:
            affine = geom.affine_ras()
            spatial = geom.spatial_shape
            if meta and not np.allclose(meta[MetaKeys.AFFINE], affine, atol=1e-5):
                raise RuntimeError("channel files have different affines; cannot stack them")
            meta = {
                MetaKeys.AFFINE: affine,
                MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                MetaKeys.SPATIAL_SHAPE: np.asarray(spatial),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if array.ndim == len(spatial) else -1,
                "spacing": np.asarray(geom.spacing),
            }
            arrays.append(array)
        if len(arrays) == 1:
            return arrays[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta
