"""Which files of an input folder ``predict`` segments."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np

from uumamba.inference.inputs import input_cases


def test_reference_label_maps_beside_the_images_are_skipped_with_a_warning(tmp_path, caplog):
    for name in ("patient001_frame01", "patient001_frame01_gt", "patient001_frame12",
                 "patient001_frame12_gt", "scan_seg"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)),
                 str(tmp_path / f"{name}.nii.gz"))
    with caplog.at_level(logging.WARNING, logger="uumamba"):
        cases = input_cases(tmp_path, 1)
    assert [c for c, _ in cases] == ["patient001_frame01", "patient001_frame12"]
    assert any("skipping 3 label map(s)" in r.getMessage() for r in caplog.records)
