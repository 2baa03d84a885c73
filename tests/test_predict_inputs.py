"""Which files of an input folder ``predict`` segments."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from uumamba.errors import UserError
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


def _save(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(path))
    return path


def test_patient_sub_folders_are_searched_as_acdc_is_downloaded(tmp_path):
    """ACDC's layout, one patient per folder, a linked patient folder, a link loop and a
    hidden folder: the images of every patient, once each, without their label maps."""
    root = tmp_path / "testing"
    for name in ("patient001/patient001_frame01", "patient001/patient001_frame01_gt",
                 "patient002/patient002_frame01", ".cache/patient009_frame01"):
        _save(root / f"{name}.nii.gz")
    _save(tmp_path / "elsewhere" / "patient003_frame04.nii.gz")
    (root / "patient003").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "patient002" / "loop").symlink_to(root, target_is_directory=True)
    cases = input_cases(root, 1)
    assert [(c, [f.relative_to(root).as_posix() for f in files]) for c, files in cases] == [
        ("patient001_frame01", ["patient001/patient001_frame01.nii.gz"]),
        ("patient002_frame01", ["patient002/patient002_frame01.nii.gz"]),
        ("patient003_frame04", ["patient003/patient003_frame04.nii.gz"])]


def test_images_directly_in_the_folder_keep_sub_folders_out(tmp_path):
    _save(tmp_path / "a.nii.gz")
    _save(tmp_path / "old" / "b.nii.gz")
    assert [c for c, _ in input_cases(tmp_path, 1)] == ["a"]


def test_same_case_in_two_sub_folders_is_refused(tmp_path):
    _save(tmp_path / "x" / "scan.nii.gz")
    _save(tmp_path / "y" / "scan.nii.gz")
    with pytest.raises(UserError, match=r"would both be written as case 'scan'"):
        input_cases(tmp_path, 1)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match=r"empty: no image files .* in it or its sub-folders"):
        input_cases(empty, 1)


def test_acdc_cine_beside_its_frames_is_skipped_with_a_warning(tmp_path, caplog):
    for name in ("patient001/patient001_4d", "patient001/patient001_frame01",
                 "patient001/patient001_frame12", "other/other_4d"):
        _save(tmp_path / f"{name}.nii.gz")
    with caplog.at_level(logging.WARNING, logger="uumamba"):
        cases = input_cases(tmp_path, 1)
    # other_4d has no frames beside it: it is the user's to segment (or be told about 4D)
    assert [c for c, _ in cases] == ["other_4d", "patient001_frame01", "patient001_frame12"]
    assert any("skipping 1 cine series" in r.getMessage() and "patient001_4d.nii.gz"
               in r.getMessage() for r in caplog.records)
