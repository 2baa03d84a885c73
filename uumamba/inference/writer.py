"""Write one prediction: the mask in the input's format (or a 3D Slicer ``.seg.nrrd``), optional
probabilities and entropy, and ``CASE_volumes.json``; every file atomically.

The mask has the input's voxel grid and geometry (:func:`uumamba.data.io.write_mask` copies
the reference header and checks the written geometry); ``seg.nrrd`` goes through
:func:`uumamba.export.slicer.write_seg_nrrd`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uumamba.data.io import format_of, write_image, write_mask
from uumamba.errors import UserError
from uumamba.evaluation.metrics import voxel_volume_ml
from uumamba.utils import atomic_path

if TYPE_CHECKING:  # the writer stays light: ``uumamba predict`` checks --format before torch loads
    from uumamba.inference.predict import Prediction

#: Output formats of ``uumamba predict --format``.
OUTPUT_FORMATS: tuple[str, ...] = ("nii.gz", "nii", "nrrd", "mha", "seg.nrrd", "dcm")


def mask_suffix(reference: Path, out_format: str | None) -> tuple[str, str | None]:
    """(file ending of the mask, io format name or None for seg.nrrd and dcm)."""
    fmt = out_format or format_of(reference)
    if fmt not in OUTPUT_FORMATS:
        raise UserError(f"--format {out_format}: expected one of {', '.join(OUTPUT_FORMATS)}")
    return ("." + fmt, None) if fmt in ("seg.nrrd", "dcm") else ("." + fmt, fmt)


def write_prediction(prediction: Prediction, case: str, reference: Path, output_dir: Path,
                     labels: dict[int, str], out_format: str | None = None,
                     extra: dict[str, Any] | None = None) -> list[Path]:
    """Write a prediction's files into ``output_dir`` (all atomically); return their paths.

    ``CASE.<ext>`` (mask; input's format unless ``out_format``; ``seg.nrrd`` via the Slicer
    exporter; ``dcm``: a DICOM SEG via :func:`uumamba.dicom.seg.write_seg_for_reference`,
    for DICOM inputs only, with ``extra`` ``model`` / ``model_version`` / ``weights_sha256``), ``CASE_probabilities.<ext>`` (x, y, z, C float32; when present) and
    ``CASE_entropy.<ext>`` (float32 nats; when present) in the mask's format (plain NRRD when
    the mask is ``seg.nrrd``), ``CASE_volumes.json`` (per-label value, voxel count and mL (to
    0.01 mL), spacing and voxel volume, the ``warnings`` of
    :mod:`uumamba.inference.plausibility`, and ``timings_s``: the prediction's seconds per
    stage plus ``write``, the seconds of writing the images, which is also added to
    ``prediction.timings``).
    """
    start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    suffix, fmt = mask_suffix(reference, out_format)
    written = []
    mask_path = output_dir / f"{case}{suffix}"
    if suffix == ".dcm":  # DICOM SEG on the source series (input from uumamba.dicom.cases)
        from uumamba.dicom.seg import Algorithm, write_seg_for_reference

        extra = extra or {}
        algorithm = Algorithm(Path(str(extra.get("model", "unknown"))).name,
                              str(extra.get("model_version", "")),
                              dict(extra.get("weights_sha256", {})))
        written.append(write_seg_for_reference(prediction.mask, reference, mask_path, labels,
                                               algorithm))
    elif fmt is None:
        from uumamba.export.slicer import write_seg_nrrd

        written.append(write_seg_nrrd(prediction.mask, reference, mask_path, labels))
    else:
        written.append(write_mask(prediction.mask, reference, mask_path, format=fmt))
    # Float maps keep the mask's format; beside a seg.nrrd they are plain NRRD (what Slicer
    # loads as volumes on the same grid).
    map_fmt = fmt or "nrrd"
    if prediction.probabilities is not None:
        written.append(write_image(np.moveaxis(prediction.probabilities, 0, -1), reference,
                                   output_dir / f"{case}_probabilities.{map_fmt}", format=map_fmt))
    if prediction.entropy is not None:
        written.append(write_image(prediction.entropy, reference,
                                   output_dir / f"{case}_entropy.{map_fmt}", format=map_fmt))
    spacing = [float(s) for s in prediction.geometry.spacing]
    voxel_ml = voxel_volume_ml(spacing)
    names_to_value = {n: v for v, n in labels.items()}
    from uumamba.dicom.cases import read_sidecar

    dicom = read_sidecar(reference)  # a DICOM series' NIfTI copy: name the series instead
    info = {
        "case": case,
        "input": str(reference) if dicom is None else f"{dicom['source']} series {dicom['series_uid']}",
        "mask": str(mask_path),
        "spacing_mm": spacing,
        "voxel_volume_ml": voxel_ml,
        "labels": {
            name: {"value": int(names_to_value[name]), "voxels": prediction.voxel_counts[name],
                   "volume_ml": prediction.volumes_ml[name]}
            for name in prediction.volumes_ml
        },
        "warnings": list(prediction.warnings),
        **(extra or {}),
    }
    if prediction.timings:
        prediction.timings["write"] = round(time.perf_counter() - start, 3)
        info["timings_s"] = dict(prediction.timings)
    json_path = output_dir / f"{case}_volumes.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    written.append(json_path)
    return written
