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


def test_an_output_folder_in_a_searched_input_tree_is_refused(tmp_path):
    """Masks written into a patient folder replaced its scan (same name); in any sub-folder
    the next run took them for scans. A flat input folder may hold its output folder."""
    root = tmp_path / "root"
    _save(root / "p1" / "p1_frame01.nii.gz")
    _save(root / "p2" / "p2_frame01.nii.gz")
    for out in (root / "p1", root / "out", root):
        with pytest.raises(UserError, match=r"is inside --input .*choose a folder outside it"):
            input_cases(root, 1, output_dir=out)
    assert [c for c, _ in input_cases(root, 1, output_dir=tmp_path / "pred")] == [
        "p1_frame01", "p2_frame01"]
    flat = root / "p1"
    assert [c for c, _ in input_cases(flat, 1, output_dir=flat / "pred")] == ["p1_frame01"]


def test_a_case_named_like_another_cases_side_file_or_frame_is_refused(tmp_path):
    _save(tmp_path / "p1" / "a.nii.gz")
    _save(tmp_path / "p2" / "a_probabilities.nii.gz")
    with pytest.raises(UserError, match=r"case 'a_probabilities' would be overwritten by the "
                                        r"probabilities file of case 'a'"):
        input_cases(tmp_path, 1)
    other = tmp_path / "frames"
    _save(other / "x.nii.gz")
    _save(other / "x_frame01.nii.gz")
    assert len(input_cases(other, 1)) == 2
    with pytest.raises(UserError, match=r"case 'x_frame01' is also the name of a frame of 'x'"):
        input_cases(other, 1, split_4d=True)


def test_the_search_ends_in_deep_trees_and_stays_out_of_system_folders(tmp_path):
    deep = tmp_path / "deep"
    leaf = deep
    for _ in range(1100):  # os.walk recursed: a RecursionError at ~1000 levels
        leaf = leaf / "d"
        leaf.mkdir(parents=leaf.parent == deep)
    _save(leaf / "scan.nii.gz")
    (deep / "proc").symlink_to("/proc", target_is_directory=True)
    (deep / "dev").symlink_to("/dev", target_is_directory=True)
    try:
        assert [f for _, [f] in input_cases(deep, 1)] == [leaf / "scan.nii.gz"]
    finally:  # bottom-up: shutil.rmtree (pytest's clean-up) recurses and fails this deep
        (leaf / "scan.nii.gz").unlink()
        while leaf != deep:
            leaf.rmdir()
            leaf = leaf.parent


def test_listing_is_linear_in_the_number_of_files(tmp_path):
    """4000 files of cines and label maps were listed in ~100 s (a regex per pair)."""
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(3000):
        for name in (f"p{i}_4d.nii.gz", f"p{i}_frame01_gt.nii.gz", f"p{i}_frame01.nii.gz"):
            (folder / name).touch()
    start = time.perf_counter()
    cases = input_cases(folder, 1)
    assert len(cases) == 3000 and time.perf_counter() - start < 10
