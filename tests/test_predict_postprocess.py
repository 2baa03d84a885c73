"""Largest-connected-component postprocessing and the per-class decision (nnU-Net style)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from uumamba.inference.postprocess import (
    apply_postprocessing,
    determine_postprocessing,
    largest_component,
    pool_fold_decisions,
)
from uumamba.model_folder import ModelFolder, load_postprocessing, save_postprocessing

LABELS = {0: "background", 1: "A", 2: "B"}


def _ref():
    ref = np.zeros((24, 24, 6), np.uint8)
    ref[2:10, 2:10, 1:5] = 1  # one blob of A
    ref[14:20, 14:20, 1:5] = 2  # B: two separate real parts
    ref[2:6, 16:20, 1:5] = 2
    return ref


def test_largest_component_full_connectivity():
    m = np.zeros((6, 6, 3), bool)
    m[0:2, 0:2, 0] = True  # 4 voxels
    m[2, 2, 1] = True  # touches the first blob only diagonally (26-connectivity)
    m[4:6, 4:6, 2] = True  # 4 voxels, separate (diagonal gap of two)
    out = largest_component(m)
    assert out.sum() == 5 and out[2, 2, 1] and not out[5, 5, 2]
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_apply_removes_islands_only_for_listed_labels():
    pred = _ref()
    pred[20:22, 2:4, 3] = 1  # island of A
    out = apply_postprocessing(pred, {"largest_component_labels": [1]})
    assert out.dtype == pred.dtype
    assert (out[20:22, 2:4, 3] == 0).all()
    np.testing.assert_array_equal(out, _ref())  # B's two real parts untouched
    np.testing.assert_array_equal(apply_postprocessing(pred, None), pred)


def test_filtering_inside_the_bounding_box_equals_labelling_the_whole_array():
    """apply_postprocessing labels each class inside its bounding box only; on random masks
    with islands, ties and empty classes the result is that of labelling the whole array
    (scipy.ndimage.label, full connectivity, ties to the component first in C order)."""
    from scipy import ndimage

    def whole(mask, values):
        out = mask.copy()
        for v in values:
            b = out == v
            components, n = ndimage.label(b, ndimage.generate_binary_structure(b.ndim, b.ndim))
            if n > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                out[b & (components != int(np.argmax(sizes)))] = 0
        return out

    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 12, size=rng.integers(1, 4)))
        mask = ((rng.random(shape) < rng.random() * 0.5)
                * rng.integers(0, 4, size=shape)).astype(np.uint8)
        got = apply_postprocessing(mask, {"largest_component_labels": [1, 2, 3]})
        assert np.array_equal(got, whole(mask, [1, 2, 3]))
        assert np.array_equal(largest_component(mask == 2), whole(mask, [2]) == 2)


def test_determine_enables_where_dice_improves():
    refs, preds = [], []
    for k in range(3):
        ref = _ref()
        pred = ref.copy()
        pred[20 - k : 22, 2:4, 2:4] = 1  # false-positive islands of A
        refs.append(ref)
        preds.append(pred)
    spec = determine_postprocessing(preds, refs, LABELS)
    # A: removing the islands raises Dice; B: LCC would delete a real part, lowering Dice.
    assert spec["largest_component_labels"] == [1]
    assert spec["dice_after"]["A"] == pytest.approx(1.0)
    assert spec["dice_before"]["A"] < 1.0
    assert spec["dice_after"]["B"] < spec["dice_before"]["B"] == pytest.approx(1.0)
    assert spec["n_cases"] == 3
    with pytest.raises(ValueError, match="equally many"):
        determine_postprocessing(preds, refs[:2], LABELS)


def test_save_and_load_intersection_of_folds(tmp_path):
    f0, f1 = tmp_path / "fold_0", tmp_path / "fold_1"
    f0.mkdir()
    f1.mkdir()
    save_postprocessing({"largest_component_labels": [1, 2], "dice_before": {"A": float("nan")}}, f0)
    assert json.loads((f0 / "postprocessing.json").read_text())["dice_before"]["A"] is None
    save_postprocessing({"largest_component_labels": [2]}, f1)
    assert load_postprocessing(tmp_path, [f0])["largest_component_labels"] == [1, 2]
    assert load_postprocessing(tmp_path, [f0, f1])["largest_component_labels"] == [2]
    f2 = tmp_path / "fold_2"
    f2.mkdir()
    assert load_postprocessing(tmp_path, [f0, f2]) is None  # no file: nothing enabled
    (tmp_path / "postprocessing.json").write_text(json.dumps({"largest_component_labels": [1]}))
    assert load_postprocessing(tmp_path, [f0, f2])["largest_component_labels"] == [1]


def test_fold_all_decision_pools_the_folds_by_cases(tmp_path):
    labels = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
    # fold_0 (4 cases) gains on RV, fold_1 (12 cases) loses more: pooled, RV is not filtered,
    # though one fold alone would filter it. MYO gains in both. LV: NaN in fold_0 (absent),
    # so fold_1 alone decides it.
    folds = {
        "0": {"largest_component_labels": [1, 2], "n_cases": 4,
              "dice_before": {"RV": 0.60, "MYO": 0.70, "LV": float("nan")},
              "dice_after": {"RV": 0.70, "MYO": 0.72, "LV": float("nan")}},
        "1": {"largest_component_labels": [2, 3], "n_cases": 12,
              "dice_before": {"RV": 0.80, "MYO": 0.75, "LV": 0.90},
              "dice_after": {"RV": 0.75, "MYO": 0.76, "LV": 0.91}},
    }
    for k, spec in folds.items():
        (tmp_path / f"fold_{k}").mkdir()
        save_postprocessing(spec, tmp_path / f"fold_{k}")
    decisions = ModelFolder(tmp_path).cross_validation_decisions(n_folds=5)
    assert [name for name, _ in decisions] == ["fold_0", "fold_1"]
    spec = pool_fold_decisions(decisions, labels)
    assert spec["dice_before"]["RV"] == pytest.approx((4 * 0.60 + 12 * 0.80) / 16)
    assert spec["dice_after"]["RV"] == pytest.approx((4 * 0.70 + 12 * 0.75) / 16)
    assert spec["dice_before"]["LV"] == pytest.approx(0.90)
    assert spec["largest_component_labels"] == [2, 3] and spec["n_cases"] == 16
    assert "fold_0, fold_1" in spec["decided"]
    # What a fold_all model then applies:
    (tmp_path / "fold_all").mkdir()
    save_postprocessing(spec, tmp_path / "fold_all")
    assert load_postprocessing(tmp_path, [tmp_path / "fold_all"])["largest_component_labels"] \
        == [2, 3]


def test_fold_all_without_folds_is_none_decided(tmp_path):
    spec = pool_fold_decisions(ModelFolder(tmp_path).cross_validation_decisions(5),
                               {0: "background", 1: "A"})
    assert spec["largest_component_labels"] == [] and spec["decided"].startswith("none decided")
    (tmp_path / "fold_all").mkdir()
    save_postprocessing(spec, tmp_path / "fold_all")
    assert load_postprocessing(tmp_path, [tmp_path / "fold_all"]) is None
