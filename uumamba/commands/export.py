"""``uumamba export-slicer``: write a mask as a 3D Slicer ``.seg.nrrd`` and say what was written."""

from __future__ import annotations

import sys
from pathlib import Path

from uumamba.export.slicer import export_mask


def export_from_cli(mask: str | Path, reference: str | Path, output: str | Path,
                    labels: str | None = None) -> Path:
    """:func:`uumamba.export.slicer.export_mask`, then one summary line; a warning on stderr
    when the mask header's grid differs slightly from the reference's (the reference's is used).

    Raises:
        UserError: as :func:`~uumamba.export.slicer.export_mask`.
    """
    result = export_mask(mask, reference, output, labels)
    if result.geometry_differs:
        print(f"warning: mask {mask} geometry differs from reference {reference} (voxel "
              f"centres up to {result.grid_offset_mm:.3g} mm apart); writing on the "
              "reference's grid", file=sys.stderr)
    print(f"wrote {result.path}: {len(result.segments)} segments "
          f"({', '.join(result.segments.values())})")
    return result.path
