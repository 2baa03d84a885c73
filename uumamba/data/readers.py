"""MONAI image readers for NRRD / MetaImage files (SimpleITK) and DICOM series folders.

MONAI's ``ITKReader`` needs the ``itk`` Python package, which uumamba does not depend on;
SimpleITK (already a dependency) reads the same formats. :class:`DicomSeriesReader` reads a
series folder with the refusals and the grid of :mod:`uumamba.data.dicom_series` (the grid
``predict`` and ``check-data`` use), not with MONAI's own DICOM reader. Both
readers return what MONAI's readers return — an ``(x, y, z)`` array (ITK index order, as
``ITKReader`` with ``reverse_indexing=True``) and a metadata dict with a RAS ``affine`` — so
Orientation, Spacing and Invertd treat NRRD / MHA, DICOM and NIfTI alike. Arrays and geometry
come from :func:`uumamba.data.io.read_image`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from uumamba.data.io import Geometry, read_image
from uumamba.data.layouts import holds_dicom, split_suffix

SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


class _GeometryReader(ImageReader):
    """Shared part of the readers: :func:`read_image` per input, MONAI metadata from its
    :class:`Geometry`. Several inputs (one per channel) are stacked on a new first axis, as
    MONAI's readers do; their affines must agree."""

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> list[tuple[np.ndarray, Geometry]]:
        """Read each input fully; returns ``(array (x, y, z[, c]), Geometry)`` per input.

        Raises:
            DataError: as :func:`uumamba.data.io.read_image` (names the file or folder).
        """
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


class SimpleITKReader(_GeometryReader):
    """Read ``.nrrd`` / ``.nhdr`` / ``.mha`` / ``.mhd`` for ``monai.transforms.LoadImage``.

    Vector (multi-component) images keep components last and record
    ``original_channel_dim = -1``.
    """

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """True when every file name ends with a SimpleITK-read suffix."""
        return all(split_suffix(Path(f))[1] in SITK_SUFFIXES for f in ensure_tuple(filename))


class DicomSeriesReader(_GeometryReader):
    """Read a folder holding one DICOM series for ``monai.transforms.LoadImage``.

    The array is ``(x, y, z)`` with rescaled values (int16 / int32 / float32) on the grid of
    :func:`uumamba.data.dicom_series.series_geometry`; a folder refused by the series rules
    raises :class:`~uumamba.errors.DataError` naming the folder and the rule
    (:func:`uumamba.data.io.read_dicom_folder`).
    """

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """True when every input is a folder holding DICOM Part 10 files."""
        return all(Path(f).is_dir() and holds_dicom(Path(f)) for f in ensure_tuple(filename))
