"""The whole chain on real ACDC data: train a few iterations on the two volumes (ED, ES) of one
patient, predict another patient's ED volume, evaluate; outputs keep the input's geometry and
Dice is computed.

Reads ``../shared/data/ACDC`` through symlinks in ``tmp_path`` (nothing is copied); skipped
when the data are absent. Fold ``all`` (no validation pass) and 128 x 128 windows keep it
within a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uumamba.commands.predict import predict_from_cli
from uumamba.config import load_config
from uumamba.engine.train import train_fold
from uumamba.evaluation.evaluate import evaluate_folders, write_summary

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def patients(acdc_dir, tmp_path):
    """(training folder with one patient, the other patient's folder)."""
    train_patient, test_patient = sorted(p for p in acdc_dir.glob("patient*") if p.is_dir())[:2]
    root = tmp_path / "acdc"
    (root / train_patient.name).mkdir(parents=True)
    for src in sorted(train_patient.glob("*.nii.gz")):
        (root / train_patient.name / src.name).symlink_to(src)
    return root, test_patient


def test_train_predict_evaluate_on_real_acdc(patients, tmp_path):
    data, test_patient = patients
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", [
        "train.epochs=1", "train.iterations_per_epoch=3",
        "train.time_limit_minutes=1.0", "dataset.layout=acdc", "plan.patch_size=[128, 128]",
        "inference.sw_batch_size=8",
    ])
    model = tmp_path / "model"
    fold_dir = train_fold(cfg, data, model, fold="all", device="cpu")
    assert (fold_dir / "checkpoint_latest.pt").is_file()
    assert json.loads((model / "dataset.json").read_text())["labels"]["3"] == "LV"

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image_path = test_patient / f"{test_patient.name}_frame01.nii.gz"
    (inputs / image_path.name).symlink_to(image_path)
    out = tmp_path / "pred"
    predict_from_cli(model, inputs, out, uncertainty=True, device="cpu")

    mask_img = nib.load(str(out / image_path.name))
    src = nib.load(str(image_path))
    assert mask_img.shape == src.shape
    np.testing.assert_allclose(mask_img.affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(mask_img.header.get_zooms(), src.header.get_zooms(), atol=1e-5)
    assert mask_img.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask_img.dataobj))) <= {0, 1, 2, 3}
    entropy = nib.load(str(out / f"{test_patient.name}_frame01_entropy.nii.gz"))
    assert entropy.shape == src.shape
    volumes = json.loads((out / f"{test_patient.name}_frame01_volumes.json").read_text())
    voxel_ml = float(np.prod(src.header.get_zooms()[:3])) / 1000
    for name, entry in volumes["labels"].items():
        assert entry["volume_ml"] == round(entry["voxels"] * voxel_ml, 2), name  # to 0.01 mL

    summary = evaluate_folders(out, test_patient, cfg.dataset.labels, 2.0)
    write_summary(summary, tmp_path / "eval")
    assert [c["case"] for c in summary["metric_per_case"]] == [f"{test_patient.name}_frame01"]
    # The ES frame's reference has no prediction: listed, not scored.
    assert len(summary["missing_predictions"]) == 1
    for value in ("1", "2", "3"):
        dice = summary["mean"][value]["Dice"]
        assert 0.0 <= dice <= 1.0 and math.isfinite(dice)
    assert (tmp_path / "eval" / "metrics.csv").is_file()
