"""uumamba.inference.score: several models predict the same cases interleaved (case by case,
the order rotated, after an untimed warm-up) and each is scored raw and postprocessed against
the references, as bench_acdc compares UU-Mamba with the DynUNet."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import torch

from uumamba.data.layouts import Case
from uumamba.data.plan import ChannelNormalization, Plans
from uumamba.inference.predict import Predictor
from uumamba.inference.score import predict_and_score, predict_and_score_side_by_side

LABELS = {0: "background", 1: "blob"}


def _plans() -> Plans:
    return Plans(spatial_dims=3, modality="MRI", labels=LABELS, num_input_channels=1,
                 target_spacing=[1.0, 1.0, 2.0], slice_axis=2,
                 normalization=[ChannelNormalization(scheme="zscore")], patch_size=[16, 16, 8],
                 strides=[[1, 1, 1]], kernel_sizes=[[3, 3, 3]], batch_size=2)


def _threshold(sign: float) -> torch.nn.Module:
    """Class 1 where the z-scored intensity is above 0 (sign 1) or below it (sign -1)."""
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1] = 20.0 * sign
    return conv


class _Logged(Predictor):
    """A Predictor that appends (its name, the image's file name) to ``log`` per call and
    sleeps ``delay`` s per call, ``first_delay`` s more on its first (the warm-up's)."""

    def __init__(self, name: str, log: list, *args, delay: float = 0.0,
                 first_delay: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name, self.log, self.delay, self.first_delay = name, log, delay, first_delay

    def predict_file(self, paths, *args, **kwargs):
        self.log.append((self.name, paths[0].name))
        time.sleep(self.delay + (self.first_delay if len(self.log) <= 2 else 0.0))
        return super().predict_file(paths, *args, **kwargs)


def _cases(tmp_path, n: int) -> list[Case]:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    cases = []
    for i in range(n):
        image = np.zeros((20, 18, 8), np.float32)
        image[4 + i:12 + i, 5:13, 2:6] = 100.0
        nib.save(nib.Nifti1Image(image, affine), str(tmp_path / f"c{i}_0000.nii.gz"))
        nib.save(nib.Nifti1Image((image > 0).astype(np.uint8), affine),
                 str(tmp_path / f"c{i}.nii.gz"))
        cases.append(Case(id=f"c{i}", images=[tmp_path / f"c{i}_0000.nii.gz"],
                          label=tmp_path / f"c{i}.nii.gz", group=f"c{i}"))
    return cases


def test_models_predict_case_by_case_alternately_first_after_a_warmup(tmp_path):
    cases, log = _cases(tmp_path, 3), []
    # "right" sleeps 0.3 s more per prediction; both sleep 1 s more in the warm-up
    right = _Logged("right", log, [_threshold(1.0)], _plans(), device="cpu", delay=0.3,
                    first_delay=1.0)
    wrong = _Logged("wrong", log, [_threshold(-1.0)], _plans(), device="cpu", first_delay=1.0)
    out = {"right": tmp_path / "out" / "right", "wrong": tmp_path / "out" / "wrong"}
    scored = predict_and_score_side_by_side({"right": right, "wrong": wrong}, cases, out,
                                            LABELS, 1.0, warmup=True)
    assert log == [("right", "c0_0000.nii.gz"), ("wrong", "c0_0000.nii.gz"),  # warm-up
                   ("right", "c0_0000.nii.gz"), ("wrong", "c0_0000.nii.gz"),
                   ("wrong", "c1_0000.nii.gz"), ("right", "c1_0000.nii.gz"),
                   ("right", "c2_0000.nii.gz"), ("wrong", "c2_0000.nii.gz")]
    fast, slow = scored["wrong"]["predict_seconds"], scored["right"]["predict_seconds"]
    assert len(fast) == len(slow) == 3
    # each model's own seconds, case by case: the slow one's extra 0.3 s on every case, the
    # warm-up's 1 s on none
    assert all(s - f > 0.15 for s, f in zip(slow, fast, strict=True)), (slow, fast)
    assert max(fast) < 0.9 and max(slow) < 1.2, (slow, fast)
    for name in ("right", "wrong"):  # the warm-up's mask went to a scratch folder
        assert sorted(f.name for f in (out[name] / "raw").glob("c*")) == [
            f"c{i}{ext}" for i in range(3) for ext in (".nii.gz", "_volumes.json")]
    for name in ("right", "wrong"):
        assert (out[name] / "raw" / "c2.nii.gz").is_file()
        assert (out[name] / "postprocessed" / "c2.nii.gz").is_file()
    dice = {name: [c["metrics"]["1"]["Dice"] for c in scored[name]["raw"]["metric_per_case"]]
            for name in scored}
    assert dice["right"] == pytest.approx([1.0, 1.0, 1.0])
    assert dice["wrong"] == pytest.approx([0.0, 0.0, 0.0])  # the complement of each blob


def test_one_model_is_scored_as_before_and_names_must_match(tmp_path):
    cases, log = _cases(tmp_path, 2), []
    one = predict_and_score(_Logged("one", log, [_threshold(1.0)], _plans(), device="cpu"),
                            cases, tmp_path / "one", LABELS, 1.0)
    assert log == [("one", "c0_0000.nii.gz"), ("one", "c1_0000.nii.gz")]  # no warm-up
    assert [c["case"] for c in one["raw"]["metric_per_case"]] == ["c0", "c1"]
    assert len(one["predict_seconds"]) == 2 and one["postprocessing"] is not None
    with pytest.raises(ValueError, match="out_dirs"):
        predict_and_score_side_by_side({"a": Predictor([_threshold(1.0)], _plans(),
                                                       device="cpu")},
                                       cases, {"b": tmp_path}, LABELS, 1.0)
    two = {k: Predictor([_threshold(1.0)], _plans(), device="cpu") for k in "ab"}
    with pytest.raises(ValueError, match="own folder"):
        predict_and_score_side_by_side(two, cases, {"a": tmp_path / "x", "b": tmp_path / "x"},
                                       LABELS, 1.0)
