"""uumamba.export: 3D Slicer segmentation (.seg.nrrd) and colour-table export.

- :func:`write_seg_nrrd` — mask + reference image -> ``.seg.nrrd`` with segment names,
  colours, label values and DICOM / SNOMED CT terminology, on the reference's LPS grid.
- :func:`write_color_table` — Slicer ``.ctbl`` colour table for loading a mask as a labelmap.
- :func:`lookup_terminology` — label name (RV, MYO, LV, aorta, ...) -> terminology entry.
- :func:`export_mask` — a mask file + its reference image -> ``.seg.nrrd`` (``export-slicer``).
"""

from uumamba.export.colors import assign_colors, write_color_table
from uumamba.export.labels import resolve_labels
from uumamba.export.slicer import ExportResult, export_mask, read_grid, write_seg_nrrd
from uumamba.export.terminology import Terminology, lookup_terminology

__all__ = [
    "ExportResult",
    "Terminology",
    "assign_colors",
    "export_mask",
    "lookup_terminology",
    "read_grid",
    "resolve_labels",
    "write_color_table",
    "write_seg_nrrd",
]
