"""Evaluation: Dice / HD95 / NSD / volumes on hand-made masks with known values, the empty-mask
policy, folder pairing, and the summary.json / metrics.csv outputs."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from uumamba.commands.evaluate import evaluate_from_cli
from uumamba.config import Config
from uumamba.errors import UserError
from uumamba.evaluation.evaluate import case_metrics, evaluate_folders

SPACING = (0.8, 0.8, 5.0)
LABELS = {0: "background", 1: "A", 2: "B"}


def _plate(shape=(30, 30, 10), x0=10, z=5, value=1):
    m = np.zeros(shape, np.uint8)
    m[x0 : x0 + 10, 10:20, z] = value
    return m


def test_in_plane_shift_known_dice_hd95_nsd():
    # Two 10x10 one-voxel-thick plates, shifted by 2 voxels along x (0.8 mm each): every voxel
    # is a surface voxel; per direction 80 voxels at 0 mm, 10 at 0.8 mm, 10 at 1.6 mm.
    pred, ref = _plate(x0=12), _plate(x0=10)
    m = case_metrics(pred, ref, SPACING, {0: "bg", 1: "A"}, nsd_tolerance_mm=1.0)[1]
    assert m["TP"] == 80 and m["FP"] == 20 and m["FN"] == 20
    assert m["Dice"] == pytest.approx(2 * 80 / (2 * 80 + 40))
    assert m["HD95"] == pytest.approx(2 * 0.8)
    assert m["NSD"] == pytest.approx((90 + 90) / 200)  # 0.8 mm is within 1 mm, 1.6 mm is not
    voxel_ml = 0.8 * 0.8 * 5.0 / 1000
    assert m["volume_pred_ml"] == pytest.approx(100 * voxel_ml)
    assert m["volume_ref_ml"] == pytest.approx(100 * voxel_ml)


@pytest.mark.parametrize("k", [1, 2])
def test_through_plane_shift_uses_slice_spacing(k):
    pred, ref = _plate(z=5 + k), _plate(z=5)
    m = case_metrics(pred, ref, SPACING, {0: "bg", 1: "A"}, nsd_tolerance_mm=6.0)[1]
    assert m["Dice"] == 0.0
    assert m["HD95"] == pytest.approx(k * SPACING[2])
    assert m["NSD"] == pytest.approx(1.0 if k * SPACING[2] <= 6.0 else 0.0)


def test_identical_masks_are_perfect():
    ref = np.zeros((20, 20, 8), np.uint8)
    ref[4:12, 5:15, 2:6] = 1
    ref[12:16, 5:15, 2:6] = 2
    m = case_metrics(ref.copy(), ref, SPACING, LABELS)
    for value in (1, 2):
        assert m[value]["Dice"] == 1.0 and m[value]["HD95"] == 0.0 and m[value]["NSD"] == 1.0
        assert m[value]["FP"] == 0 and m[value]["FN"] == 0


def test_empty_mask_policy():
    ref = _plate()
    empty = np.zeros_like(ref)
    labels = {0: "bg", 1: "A"}
    both = case_metrics(empty, empty, SPACING, labels)[1]
    assert math.isnan(both["Dice"]) and math.isnan(both["HD95"]) and math.isnan(both["NSD"])
    ref_empty = case_metrics(ref, empty, SPACING, labels)[1]
    assert ref_empty["Dice"] == 0.0 and ref_empty["NSD"] == 0.0 and math.isnan(ref_empty["HD95"])
    assert ref_empty["FP"] == 100
    pred_empty = case_metrics(empty, ref, SPACING, labels)[1]
    assert pred_empty["Dice"] == 0.0 and pred_empty["NSD"] == 0.0 and math.isnan(pred_empty["HD95"])
    assert pred_empty["FN"] == 100


def _save(array, path, spacing=SPACING):
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))


@pytest.fixture()
def folders(tmp_path):
    """Three cases: c1 perfect, c2 label 2 predicted where the reference has none, c3 empty
    prediction of label 1, plus a missing prediction and a side output to ignore."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    a = _plate(value=1)
    b = _plate(x0=2, z=2, value=2)
    _save(a + b, gt_dir / "c1.nii.gz")
    _save(a + b, pred_dir / "c1.nii.gz")
    _save(a, gt_dir / "c2.nii.gz")
    _save(a + b, pred_dir / "c2.nii.gz")
    _save(a + b, gt_dir / "c3.nii.gz")
    _save(b, pred_dir / "c3.nii.gz")
    _save(a, gt_dir / "c4_missing.nii.gz")
    _save(a, pred_dir / "c1_entropy.nii.gz")  # side output: ignored
    (pred_dir / "c1_volumes.json").write_text("{}")
    return pred_dir, gt_dir


def test_folder_summary_means_follow_policy(folders):
    pred_dir, gt_dir = folders
    s = evaluate_folders(pred_dir, gt_dir, LABELS, nsd_tolerance_mm=2.0)
    assert [c["case"] for c in s["metric_per_case"]] == ["c1", "c2", "c3"]
    assert s["missing_predictions"] == ["c4_missing"]
    assert s["unmatched_predictions"] == []
    m1, m2 = s["mean"]["1"], s["mean"]["2"]
    # Label 1: Dice 1, 1, 0 (c3 empty prediction); HD95 only from c1 and c2.
    assert m1["Dice"] == pytest.approx(2 / 3) and m1["n_Dice"] == 3
    assert m1["HD95"] == 0.0 and m1["n_HD95"] == 2 and m1["n_hd95_undefined"] == 1
    # Label 2: Dice 1 (c1), 0 (c2: reference empty), 1 (c3).
    assert m2["Dice"] == pytest.approx(2 / 3) and m2["n_hd95_undefined"] == 1
    assert s["foreground_mean"]["Dice"] == pytest.approx(2 / 3)


def test_both_empty_excluded_from_means(tmp_path):
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    pred_dir.mkdir()
    gt_dir.mkdir()
    a = _plate(value=1)
    _save(a, gt_dir / "x.nii.gz")
    _save(a, pred_dir / "x.nii.gz")
    b = _plate(x0=12, value=1)
    _save(b, gt_dir / "y.nii.gz")
    _save(a, pred_dir / "y.nii.gz")
    s = evaluate_folders(pred_dir, gt_dir, LABELS)
    assert s["mean"]["2"]["n_both_empty"] == 2 and s["mean"]["2"]["n_Dice"] == 0
    assert math.isnan(s["mean"]["2"]["Dice"])
    # The foreground mean skips label 2 (no finite mean) and stays finite.
    assert s["foreground_mean"]["Dice"] == pytest.approx((1.0 + 0.8) / 2)


def test_cli_writes_json_and_csv_with_labels_from_dataset_json(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "A": 1, "B": 2}}))
    out = tmp_path / "eval"
    evaluate_from_cli(pred_dir, gt_dir, out, Config())
    summary = json.loads((out / "summary.json").read_text())  # strict JSON: NaN -> null
    assert summary["labels"] == {"0": "background", "1": "A", "2": "B"}
    c2 = next(c for c in summary["metric_per_case"] if c["case"] == "c2")
    assert c2["metrics"]["2"]["HD95"] is None and c2["metrics"]["2"]["Dice"] == 0.0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 3 * 2 + 2  # cases x labels + mean rows
    row = next(r for r in rows if r["case"] == "c3" and r["label"] == "1")
    assert float(row["Dice"]) == 0.0 and row["HD95"] == "" and row["name"] == "A"
    assert "c4_missing" in capsys.readouterr().err


def test_labels_inferred_and_acdc_gt_naming(tmp_path):
    pred_dir, gt_root = tmp_path / "pred", tmp_path / "acdc"
    (gt_root / "patient001").mkdir(parents=True)
    pred_dir.mkdir()
    a = _plate(value=3)
    _save(a, gt_root / "patient001" / "patient001_frame01_gt.nii.gz")
    _save(a * 0 + 7, gt_root / "patient001" / "patient001_frame01.nii.gz")  # the image
    _save(a, pred_dir / "patient001_frame01.nii.gz")
    s = evaluate_folders(pred_dir, gt_root, labels=None)
    assert s["labels"] == {"0": "background", "3": "label_3"}
    assert s["mean"]["3"]["Dice"] == 1.0


def test_errors(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        evaluate_folders(tmp_path / "nope", tmp_path, LABELS)
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    _save(_plate(), tmp_path / "p" / "a.nii.gz")
    _save(_plate(), tmp_path / "g" / "b.nii.gz")
    with pytest.raises(UserError, match="matches a reference"):
        evaluate_folders(tmp_path / "p", tmp_path / "g", LABELS)
    _save(_plate(), tmp_path / "g" / "a.nii.gz", spacing=(1.0, 1.0, 5.0))
    with pytest.raises(UserError, match="spacing"):
        evaluate_folders(tmp_path / "p", tmp_path / "g", LABELS)


def test_cli_refuses_an_output_that_is_a_file_before_scoring(folders, tmp_path, monkeypatch):
    pred_dir, gt_dir = folders
    target = tmp_path / "summary.txt"
    target.write_text("keep me")
    scored = []
    monkeypatch.setattr("uumamba.evaluation.evaluate.evaluate_folders",
                        lambda *a, **k: scored.append(a))
    with pytest.raises(UserError, match="exists and is not a folder"):
        evaluate_from_cli(pred_dir, gt_dir, target, Config())
    assert scored == [] and target.read_text() == "keep me"


def test_labels_from_the_predictions_volumes_json(folders, tmp_path):
    """Without --config or a dataset.json, the names come from the CASE_volumes.json files
    that ``uumamba predict`` writes beside the masks; files that disagree or are not in that
    shape give no names (a prediction folder is not trusted)."""
    pred_dir, gt_dir = folders
    volumes = {"labels": {"RV": {"value": 1, "voxels": 3, "volume_ml": 0.1},
                          "MYO": {"value": 2, "voxels": 5, "volume_ml": 0.2}}}
    (pred_dir / "c1_volumes.json").write_text(json.dumps(volumes))
    (pred_dir / "c2_volumes.json").write_text(json.dumps(volumes))
    (pred_dir / "c3_volumes.json").write_text("not json")  # ignored
    out = tmp_path / "eval"
    evaluate_from_cli(pred_dir, gt_dir, out, Config())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == {"0": "background", "1": "RV", "2": "MYO"}
    # Two files that disagree: no names from the predictions (values only).
    (pred_dir / "c2_volumes.json").write_text(json.dumps({"labels": {"LV": {"value": 1}}}))
    evaluate_from_cli(pred_dir, gt_dir, out, Config())
    assert json.loads((out / "summary.json").read_text())["labels"]["1"] != "RV"


def test_seg_nrrd_predictions_are_scored(tmp_path):
    """``predict --format seg.nrrd`` output is evaluated like a plain mask (perfect here)."""
    from uumamba.export.slicer import write_seg_nrrd

    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    label = _plate(value=1) + _plate(x0=2, z=2, value=2)
    _save(label, gt_dir / "c1.nii.gz")
    write_seg_nrrd(label, gt_dir / "c1.nii.gz", pred_dir / "c1.seg.nrrd", {1: "A", 2: "B"})
    summary = evaluate_folders(pred_dir, gt_dir, {0: "background", 1: "A", 2: "B"})
    assert summary["n_cases"] == 1
    assert summary["mean"]["1"]["Dice"] == 1.0 and summary["mean"]["2"]["Dice"] == 1.0
