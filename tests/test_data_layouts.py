"""Dataset layouts: every layout recognised from small volumes the tests write, and ACDC."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from uumamba.data.layouts import AORTASEG24_LABELS, detect_layout, discover
from uumamba.errors import DataError


def _nii(path: Path, shape=(6, 5, 4), dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype), np.eye(4)), str(path))
    return path


def _mha(path: Path, shape=(6, 5, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape[::-1], np.int16)), str(path))
    return path


def test_nnunet_v2_raw(tmp_path: Path) -> None:
    for case in ("heart_001", "heart_002"):
        for ch in range(2):
            _nii(tmp_path / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        _nii(tmp_path / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
    _nii(tmp_path / "imagesTs" / "heart_100_0000.nii.gz")
    _nii(tmp_path / "imagesTs" / "heart_100_0001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "LV": 1, "MYO": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    index = discover(tmp_path)
    assert index.layout == "nnunet"
    assert [c.id for c in index.cases] == ["heart_001", "heart_002"]
    assert [p.name for p in index.cases[0].images] == ["heart_001_0000.nii.gz", "heart_001_0001.nii.gz"]
    assert index.cases[1].label == tmp_path / "labelsTr" / "heart_002.nii.gz"
    assert index.labels == {0: "background", 1: "LV", 2: "MYO"}
    assert index.modality == "MRI" and index.num_channels == 2
    assert [c.id for c in index.test_images] == ["heart_100"] and index.test_images[0].label is None


def test_nnunet_missing_channel_and_count(tmp_path: Path) -> None:
    _nii(tmp_path / "imagesTr" / "a_0000.nii.gz")
    _nii(tmp_path / "labelsTr" / "a.nii.gz")
    meta = {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "x": 1},
            "numTraining": 1, "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="a_0001.nii.gz"):
        discover(tmp_path)
    meta["channel_names"] = {"0": "CT"}
    meta["numTraining"] = 3
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="numTraining is 3"):
        discover(tmp_path)
    meta["numTraining"] = 1
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert discover(tmp_path).modality == "CT"


def test_msd(tmp_path: Path) -> None:
    for i in (3, 4):
        _nii(tmp_path / "imagesTr" / f"la_{i:03d}.nii.gz")
        _nii(tmp_path / "labelsTr" / f"la_{i:03d}.nii.gz", dtype=np.uint8)
    _nii(tmp_path / "imagesTs" / "la_010.nii.gz")
    (tmp_path / "imagesTr" / "._la_003.nii.gz").write_bytes(b"mac resource fork")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
        "training": [{"image": f"./imagesTr/la_{i:03d}.nii.gz",
                      "label": f"./labelsTr/la_{i:03d}.nii.gz"} for i in (4, 3)],
        "test": ["./imagesTs/la_010.nii.gz"]}))
    index = discover(tmp_path)
    assert index.layout == "msd"
    assert [c.id for c in index.cases] == ["la_003", "la_004"]
    assert index.labels == {0: "background", 1: "left atrium"} and index.modality == "MRI"
    assert [c.id for c in index.test_images] == ["la_010"]


def test_acdc_layout_with_info_cfg(tmp_path: Path) -> None:
    for pid, frames in (("patient001", (1, 12)), ("patient002", (1, 9))):
        d = tmp_path / "training" / pid
        for f in frames:
            _nii(d / f"{pid}_frame{f:02d}.nii.gz")
            _nii(d / f"{pid}_frame{f:02d}_gt.nii.gz", dtype=np.uint8)
        _nii(d / f"{pid}_4d.nii.gz", shape=(6, 5, 4, 3))
        (d / "Info.cfg").write_text(f"ED: {frames[0]}\nES: {frames[1]}\nGroup: NOR\n")
    _nii(tmp_path / "testing" / "patient101" / "patient101_frame01.nii.gz")
    index = discover(tmp_path)
    assert index.layout == "acdc" and index.labels == {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
    assert [c.id for c in index.cases] == ["patient001_frame01", "patient001_frame12",
                                           "patient002_frame01", "patient002_frame09"]
    assert [c.group for c in index.cases] == ["patient001"] * 2 + ["patient002"] * 2
    assert [c.phase for c in index.cases] == ["ED", "ES", "ED", "ES"]
    assert all("_4d" not in p.name for c in index.cases for p in c.images)
    assert [c.id for c in index.test_images] == ["patient101_frame01"]


def test_imagecas_and_aortaseg24(tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    for n in (1, 2):
        _nii(cas / "1-200" / f"{n}.img.nii.gz")
        _nii(cas / "1-200" / f"{n}.label.nii.gz", dtype=np.uint8)
    index = discover(cas)
    assert index.layout == "imagecas" and index.modality == "CT"
    assert [c.id for c in index.cases] == ["1", "2"] and index.cases[0].label.name == "1.label.nii.gz"

    aorta = tmp_path / "aorta"
    for n in (1, 7):
        _mha(aorta / "images" / f"subject{n:03d}_CTA.mha")
        _mha(aorta / "masks" / f"subject{n:03d}_label.mha")
    assert detect_layout(aorta) == "aortaseg24"  # images/ exists but aortaseg24 is tried first
    index = discover(aorta)
    assert [c.id for c in index.cases] == ["subject001", "subject007"]
    assert index.cases[1].label == aorta / "masks" / "subject007_label.mha"
    assert len(index.labels) == 24 and index.labels == AORTASEG24_LABELS


def test_plain_folder_mixed_formats(tmp_path: Path) -> None:
    _nii(tmp_path / "images" / "a.nii.gz")
    _nii(tmp_path / "labels" / "a.nii.gz", dtype=np.uint8)
    _mha(tmp_path / "images" / "b.mha")
    _mha(tmp_path / "labels" / "b.mha")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(tmp_path / "images" / "c.nrrd"))
    _nii(tmp_path / "images" / "d.nii")
    index = discover(tmp_path, layout="folder")
    assert [c.id for c in index.cases] == ["a", "b"]
    assert [c.id for c in index.test_images] == ["c", "d"]
    assert index.labels is None and index.modality is None
    _nii(tmp_path / "labels" / "zz.nii.gz")
    index = discover(tmp_path)  # an orphan label is a problem to report, not a stop
    assert [(p.name, "without a matching image" in m) for p, m in index.orphans] == [
        ("zz.nii.gz", True)]
    from uumamba.config import DatasetConfig
    from uumamba.data.check import check_dataset

    report = check_dataset(index, DatasetConfig(labels={0: "bg", 1: "fg"}), 3)
    assert report.fatal
    assert any(p.file.endswith("zz.nii.gz") and p.severity == "error" for p in report.problems)


def test_unknown_folder_names_it(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match=str(tmp_path)):
        discover(tmp_path)
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "missing")
    with pytest.raises(ValueError, match="layout='acdcx'"):
        discover(tmp_path, layout="acdcx")


def test_real_acdc(acdc_dir: Path) -> None:
    index = discover(acdc_dir)
    assert index.layout == "acdc" and index.modality == "MRI"
    assert len(index.cases) == 40
    groups = {c.group for c in index.cases}
    assert len(groups) == 20
    for case in index.cases:
        assert case.label is not None and case.label.name == f"{case.id}_gt.nii.gz"
        assert case.id.startswith(case.group + "_frame")


@pytest.mark.parametrize("style", ["value_to_name", "name_to_value"])
def test_plain_folder_reads_optional_dataset_json(tmp_path: Path, style: str) -> None:
    _nii(tmp_path / "images" / "a.nii.gz")
    _nii(tmp_path / "labels" / "a.nii.gz", dtype=np.uint8)
    pairs = {0: "background", 1: "coronary artery"}
    labels = ({str(k): v for k, v in pairs.items()} if style == "value_to_name"
              else {v: k for k, v in pairs.items()})
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels,
                                                       "channel_names": {"0": "CT"}}))
    index = discover(tmp_path)
    assert index.layout == "folder"
    assert index.labels == pairs
    assert index.modality == "CT"
