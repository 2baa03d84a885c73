"""Data layer: dataset layouts, image IO with geometry, integrity check, planning, MONAI
pipelines and cross-validation splits.

Modules (one concern each): :mod:`~uumamba.data.layouts` (find cases),
:mod:`~uumamba.data.io` (read / write volumes with their geometry),
:mod:`~uumamba.data.check` (integrity check), :mod:`~uumamba.data.plan` (``plans.json``),
:mod:`~uumamba.data.transforms` (MONAI pipelines), :mod:`~uumamba.data.dataset` (cached
datasets), :mod:`~uumamba.data.splits` (patient-grouped folds). The MONAI-heavy modules are
not imported here, so ``import uumamba.data`` stays light.
"""

from uumamba.data.io import Geometry, read_geometry, read_image, write_image, write_mask
from uumamba.data.layouts import Case, DatasetIndex, discover

__all__ = [
    "Case", "DatasetIndex", "Geometry", "discover", "read_geometry", "read_image",
    "write_image", "write_mask",
]
