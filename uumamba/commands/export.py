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


def export_dicom_from_cli(mask: str | Path, reference_series: str | Path, output: str | Path,
                          labels: str | None = None) -> Path:
    """:func:`uumamba.dicom.seg.export_seg`, then one summary line.

    With ``--labels`` naming a model folder, the SEG's algorithm identification carries that
    model's version and checkpoint SHA-256s.

    Raises:
        UserError: as :func:`~uumamba.dicom.seg.export_seg`.
    """
    from uumamba.dicom.seg import Algorithm, export_seg

    algorithm = None
    if labels is not None and Path(labels).is_dir():
        from uumamba.model_folder import ModelFolder

        folder = ModelFolder(Path(labels))
        try:
            digests = folder.digests()
        except Exception:  # a labels-only folder without checkpoints: no model identity
            digests = []
        algorithm = Algorithm(folder.name, ModelFolder.version(digests) if digests else "",
                              {d.fold: d.sha256 for d in digests})
    path, segments = export_seg(Path(mask), Path(reference_series), Path(output), labels, algorithm)
    print(f"wrote {path}: DICOM SEG with {len(segments)} segments ({', '.join(segments.values())})")
    return path
