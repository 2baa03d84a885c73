"""DICOM series as training images: the ``folder`` layout, read_image / read_geometry on a
series folder, the MONAI reader, check-data rows for refused series, and a short training run.

Each series is written by tests/dicom_helpers.py from a synthetic case whose grid is known, and
its label is a NIfTI file written independently from that grid (not from the reader), so the
geometry comparison tests the reader's convention, not itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_helpers import rotation, write_series

from uumamba.config import load_config
from uumamba.data.check import check_dataset
from uumamba.data.io import read_geometry, read_image
from uumamba.data.layouts import discover
from uumamba.data.synthetic import SYNTHETIC_LABELS, make_synthetic_case
from uumamba.data.transforms import _reader_transform
from uumamba.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SPACING = (1.5, 1.5, 8.0)
SHAPE = (64, 64, 12)
#: Grids of the two DICOM cases (origin mm LPS, direction columns = row, column, normal).
GRIDS = {
    "dcmA": ((-40.0, -30.0, 12.5), np.eye(3)),
    "dcmB": ((10.0, -55.0, 80.0), rotation(0.4, 0.25)),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _nifti(array: np.ndarray, origin, direction, path: Path) -> Path:
    """Write ``array`` (x, y, z) as NIfTI on the LPS grid (origin, direction, SPACING)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction) * np.asarray(SPACING)[None, :]
    lps[:3, 3] = origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    img = nib.Nifti1Image(array, ras)
    img.header.set_qform(ras, code=1)
    img.header.set_sform(ras, code=1)
    nib.save(img, str(path))
    return path


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = make_synthetic_case(seed, shape=SHAPE, spacing=SPACING)
    return np.round(image).astype(np.int16), label


def _write_dataset(root: Path) -> dict[str, np.ndarray]:
    """3 labelled cases in the folder layout: 2 DICOM series folders and 1 NIfTI image."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    volumes = {}
    for seed, (name, (origin, direction)) in enumerate(GRIDS.items()):
        image, label = _case(seed)
        write_series(image, root / "images" / name, spacing=SPACING, origin=origin,
                     direction=direction, patient_id=f"P{seed}", seed=seed)
        _nifti(label, origin, direction, root / "labels" / f"{name}.nii.gz")
        volumes[name] = image
    image, label = _case(7)
    _nifti(image.astype(np.float32), (0.0, 0.0, 0.0), np.eye(3), root / "images" / "nii1.nii.gz")
    _nifti(label, (0.0, 0.0, 0.0), np.eye(3), root / "labels" / "nii1.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        {"labels": {str(k): v for k, v in SYNTHETIC_LABELS.items()}, "modality": {"0": "MRI"}}))
    return volumes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("dicom_layout")
    return root, _write_dataset(root)


def _dataset_cfg():
    return load_config(REPO / "configs/tiny.yaml").dataset


def test_discover_finds_series_folders_and_files(dataset, tmp_path):
    root, _ = dataset
    index = discover(root)
    assert index.layout == "folder"
    assert [c.id for c in index.cases] == ["dcmA", "dcmB", "nii1"]
    assert [c.images for c in index.cases] == [[root / "images" / "dcmA"],
                                               [root / "images" / "dcmB"],
                                               [root / "images" / "nii1.nii.gz"]]
    assert [c.label for c in index.cases] == [root / "labels" / f"{n}.nii.gz"
                                              for n in ("dcmA", "dcmB", "nii1")]
    assert index.test_images == [] and index.orphans == []
    # a series folder without a label is a test image; a folder without DICOM is no case
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.copytree(root / "images" / "dcmA", copy / "images" / "unlabelled")
    (copy / "images" / "notes").mkdir()
    (copy / "images" / "notes" / "readme.txt").write_text("not DICOM")
    index = discover(copy)
    assert [c.id for c in index.test_images] == ["unlabelled"]
    assert index.test_images[0].label is None and len(index.cases) == 3
    # a series folder and an image file of the same name are one case id twice
    _nifti(np.zeros(SHAPE, np.int16), (0, 0, 0), np.eye(3), copy / "images" / "dcmA.nii.gz")
    with pytest.raises(DataError, match="duplicate case id 'dcmA'"):
        discover(copy)


def test_nnunet_images_tr_may_hold_series_folders(dataset, tmp_path):
    root, _ = dataset
    nn = tmp_path / "Dataset001_Dicom"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    shutil.copytree(root / "images" / "dcmA", nn / "imagesTr" / "dcmA_0000")
    shutil.copy(root / "labels" / "dcmA.nii.gz", nn / "labelsTr" / "dcmA.nii.gz")
    shutil.copy(root / "images" / "nii1.nii.gz", nn / "imagesTr" / "nii1_0000.nii.gz")
    shutil.copy(root / "labels" / "nii1.nii.gz", nn / "labelsTr" / "nii1.nii.gz")
    (nn / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", "numTraining": 2,
        "labels": {v: k for k, v in SYNTHETIC_LABELS.items()}}))
    index = discover(nn)
    assert index.layout == "nnunet"
    assert [(c.id, c.images) for c in index.cases] == [
        ("dcmA", [nn / "imagesTr" / "dcmA_0000"]), ("nii1", [nn / "imagesTr" / "nii1_0000.nii.gz"])]
    assert check_dataset(index, _dataset_cfg(), spatial_dims=2).problems == []


def test_series_folder_geometry_and_values(dataset):
    root, volumes = dataset
    for name, (origin, direction) in GRIDS.items():
        folder = root / "images" / name
        geom = read_geometry(folder)
        assert geom.shape == SHAPE
        np.testing.assert_allclose(geom.spacing, SPACING, atol=1e-6)
        np.testing.assert_allclose(geom.origin, origin, atol=1e-5)
        np.testing.assert_allclose(geom.direction, direction, atol=1e-6)
        array, full = read_image(folder)
        assert full == geom and array.dtype == np.int16
        np.testing.assert_array_equal(array, volumes[name])  # slices sorted by position
        label_geom = read_geometry(root / "labels" / f"{name}.nii.gz")
        assert label_geom.mismatch(geom, rtol=1e-6, atol=1e-4) == []
    # the oblique series really differs from the axis-aligned one
    assert read_geometry(root / "images" / "dcmA").mismatch(
        read_geometry(root / "images" / "dcmB")) == ["origin", "direction"]


def test_monai_loader_reads_a_series_folder(dataset):
    root, volumes = dataset
    folder = root / "images" / "dcmB"
    out = _reader_transform(["image"])({"image": [str(folder)]})["image"]
    assert tuple(out.shape) == SHAPE
    np.testing.assert_array_equal(out.numpy(), volumes["dcmB"].astype(np.float32))
    np.testing.assert_allclose(out.affine.numpy(), read_geometry(folder).affine_ras(), atol=1e-5)
    assert out.meta["filename_or_obj"] == str(folder)


def test_check_data_passes_on_the_dicom_layout(dataset):
    root, _ = dataset
    report = check_dataset(discover(root), _dataset_cfg(), spatial_dims=2)
    assert report.errors == [] and report.warnings == []
    assert (report.n_cases, report.n_test_images) == (3, 0)


def test_check_data_lists_refused_series_with_the_other_problems(dataset, tmp_path):
    root, _ = dataset
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    slices = sorted((bad / "images" / "dcmA").iterdir())
    by_z = write_series(_case(0)[0], tmp_path / "scratch", spacing=SPACING,
                        origin=GRIDS["dcmA"][0], seed=0)
    assert [p.name for p in by_z] != [p.name for p in slices]  # files are not in z order
    # remove slice 5 (of 0..11) from dcmA: the same file names are written in the same order
    (bad / "images" / "dcmA" / by_z[5].name).unlink()
    # dcmB: a second series in the same folder
    write_series(_case(1)[0][:, :, :3], bad / "images" / "dcmB" / "extra", spacing=SPACING,
                 patient_id="P9", seed=3)
    # nii1: an undeclared label value
    label = np.asarray(nib.load(str(bad / "labels" / "nii1.nii.gz")).dataobj).copy()
    label[0, 0, 0] = 7
    _nifti(label, (0.0, 0.0, 0.0), np.eye(3), bad / "labels" / "nii1.nii.gz")

    report = check_dataset(discover(bad), _dataset_cfg(), spatial_dims=2)
    rows = {(p.severity, p.file): p.message for p in report.problems}
    assert set(rows) == {("error", str(bad / "images" / "dcmA")),
                         ("error", str(bad / "images" / "dcmB")),
                         ("error", str(bad / "labels" / "nii1.nii.gz"))}
    gap = rows[("error", str(bad / "images" / "dcmA"))]
    assert gap.startswith("DICOM series: missing slices: a gap of 16 mm between ")
    assert by_z[4].name in gap and by_z[6].name in gap
    assert "holds 2 DICOM image series (P1_3, P9_3)" in rows[("error", str(bad / "images" / "dcmB"))]
    assert "label values [7] are not declared" in rows[("error", str(bad / "labels" / "nii1.nii.gz"))]
    with pytest.raises(DataError, match=r"dcmA: DICOM series: missing slices"):
        read_image(bad / "images" / "dcmA")
    with pytest.raises(DataError, match=r"dcmA: DICOM series: missing slices"):
        read_geometry(bad / "images" / "dcmA")  # refused from the headers alone


def test_two_iterations_of_training_on_the_dicom_layout(dataset, tmp_path):
    from uumamba.engine.train import run_fold

    root, _ = dataset
    cfg = load_config(REPO / "configs/tiny.yaml", [
        "train.time_limit_minutes=null", "train.epochs=1", "train.iterations_per_epoch=2",
        "inference.sw_batch_size=16"])
    result = run_fold(cfg, root, tmp_path / "model", fold="0", device="cpu", progress=False)
    assert (result.finished, result.iteration) == (True, 2)
    records = [json.loads(x) for x in
               (tmp_path / "model" / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["iteration"] == 2
    assert set(records[-1]["val_dice"]) == {"RV", "MYO", "LV"}

