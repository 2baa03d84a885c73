"""Planning: target spacing (median / anisotropic rule), topology, overrides, plans.json."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uumamba.config import DatasetConfig, ModelConfig, PlanConfig
from uumamba.data.layouts import discover
from uumamba.data.plan import Plans, estimate_memory_mb, plan_dataset, stage_features
from uumamba.errors import ConfigError

Z_SPACINGS = [4.0, 5.0, 5.0, 6.0, 8.0, 10.0]
LABELS = {0: "background", 1: "LV"}


def _write_case(root: Path, name: str, z_spacing: float, z_first: bool, rng) -> None:
    """A (64, 56, 12) RAS volume; ``z_first`` stores it with the slice axis first and an
    LPS-style flipped affine, which planning must undo by reorienting to RAS."""
    image = rng.normal(100.0, 20.0, size=(64, 56, 12)).astype(np.float32)
    label = np.zeros((64, 56, 12), np.uint8)
    label[20:40, 20:36, 3:9] = 1
    image[label == 1] += 300.0
    affine = np.diag([1.0, 1.0, z_spacing, 1.0])
    if z_first:
        image, label = image.transpose(2, 1, 0)[:, ::-1], label.transpose(2, 1, 0)[:, ::-1]
        affine = np.array([[0, 0, 1.0, 0], [0, -1.0, 0, 55.0], [z_spacing, 0, 0, 0], [0, 0, 0, 1]])
    for folder, data in (("images", image), ("labels", label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(root / folder / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aniso")
    rng = np.random.default_rng(0)
    for i, z in enumerate(Z_SPACINGS):
        _write_case(root, f"case{i}", z, z_first=i % 2 == 1, rng=rng)
    return root


def test_anisotropic_target_spacing_and_pooling(anisotropic: Path) -> None:
    index = discover(anisotropic)
    ras = plan_dataset(index, DatasetConfig(labels=LABELS), PlanConfig(reorientation="ras"),
                       ModelConfig())
    # reoriented to RAS (0.1 plans): every case is (64, 56, 12) with spacing (1, 1, z)
    assert ras.axcodes == "RAS" and ras.fingerprint.shapes == [[64, 56, 12]] * 6
    plans = plan_dataset(index, DatasetConfig(labels=LABELS), PlanConfig(), ModelConfig())
    # own voxel axes, thickest last: the z-first copies keep their in-plane order (56, 64)
    assert plans.axcodes == "voxel"
    assert plans.fingerprint.shapes == [[64, 56, 12], [56, 64, 12]] * 3
    assert [s[2] for s in plans.fingerprint.spacings] == Z_SPACINGS
    assert ras.target_spacing == plans.target_spacing and ras.slice_axis == plans.slice_axis == 2
    # in-plane: median; coarse axis: 10th percentile (4.5), since 5.5 > 3 x 1.0
    np.testing.assert_allclose(plans.target_spacing, [1.0, 1.0, np.percentile(Z_SPACINGS, 10)])
    assert plans.slice_axis == 2
    # no pooling along z while its spacing is >= 2x the finest; kernel 1 along z until then
    # (nnU-Net: once 3, a kernel stays 3 even if in-plane pooling continues alone)
    spacing, z_was_close = np.array(plans.target_spacing), False
    for stride, kernel in zip(plans.strides, plans.kernel_sizes, strict=True):
        if stride[2] == 2:
            assert spacing[2] / spacing[:2].min() < 2
        spacing = spacing * np.array(stride)
        z_was_close = z_was_close or spacing[2] / spacing.min() < 2
        assert kernel[2] == (3 if z_was_close else 1)
    assert z_was_close and any(s[2] == 2 for s in plans.strides)
    assert plans.strides[0] == [1, 1, 1] and plans.strides[1] == [2, 2, 1]
    assert plans.kernel_sizes[0] == [3, 3, 1]
    total = np.prod(np.array(plans.strides), axis=0)
    assert all(p % t == 0 for p, t in zip(plans.patch_size, total, strict=True))
    feats = stage_features(ModelConfig(), len(plans.strides))
    assert estimate_memory_mb(plans.patch_size, plans.strides, feats, ModelConfig(), 2) <= 2000
    assert plans.batch_size >= 2
    # the MRI default: per-case z-score, nothing stored
    assert plans.normalization[0].scheme == "zscore" and plans.normalization[0].mean is None


def test_deterministic_and_json_round_trip(anisotropic: Path, tmp_path: Path) -> None:
    index = discover(anisotropic)
    cfgs = (DatasetConfig(labels=LABELS), PlanConfig(), ModelConfig())
    a, b = plan_dataset(index, *cfgs), plan_dataset(index, *cfgs)
    assert a.model_dump() == b.model_dump()
    a.save(tmp_path / "plans.json")
    text = (tmp_path / "plans.json").read_text()
    assert text.startswith("{\n  ") and json.loads(text)["labels"] == {"0": "background", "1": "LV"}
    loaded = Plans.load(tmp_path / "plans.json")
    assert loaded == a and loaded.labels == LABELS
    bad = json.loads(text)
    bad["surprise"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="bad.json.*surprise"):
        Plans.load(tmp_path / "bad.json")


def test_ct_normalisation_and_overrides(anisotropic: Path) -> None:
    index = discover(anisotropic)
    plan_cfg = PlanConfig(target_spacing=[2.0, 2.0, 5.0], patch_size=[48, 40, 10], batch_size=3)
    plans = plan_dataset(index, DatasetConfig(labels=LABELS, modality="CT"), plan_cfg,
                         ModelConfig(features=[8, 16, 32, 64]))
    assert plans.modality == "CT" and plans.target_spacing == [2.0, 2.0, 5.0]
    assert plans.patch_size == [48, 40, 10] and plans.batch_size == 3
    assert len(plans.strides) == 4  # one stage per model.features entry
    total = np.prod(np.array(plans.strides), axis=0)
    assert all(p % t == 0 for p, t in zip(plans.patch_size, total, strict=True))
    norm = plans.normalization[0]
    stats = plans.fingerprint.intensity[0]
    assert norm.scheme == "ct"
    assert (norm.clip_low, norm.clip_high) == (stats.percentile_00_5, stats.percentile_99_5)
    # foreground voxels are ~N(400, 20): the statistics must see the foreground only
    assert 390 < stats.mean < 410 and 15 < stats.std < 25 and norm.mean == stats.mean
    with pytest.raises(ConfigError, match="plan.patch_size"):
        plan_dataset(index, DatasetConfig(labels=LABELS), PlanConfig(patch_size=[32, 32]), ModelConfig())


def test_2d_plan_and_budget(anisotropic: Path) -> None:
    index = discover(anisotropic)
    model = ModelConfig(spatial_dims=2, features=[8, 16, 32, 64])
    # RAS: the fixture's z-first copies are stored transposed in-plane as well
    plans = plan_dataset(index, DatasetConfig(labels=LABELS), PlanConfig(reorientation="ras"),
                         model)
    assert plans.spatial_dims == 2 and plans.slice_axis == 2 and plans.in_plane_axes == (0, 1)
    # in-plane median shape (64, 56) rounded up to the total stride (8)
    assert plans.patch_size == [64, 56] and len(plans.strides) == 4
    assert all(len(s) == 2 for s in plans.strides + plans.kernel_sizes)
    capped = plan_dataset(index, DatasetConfig(labels=LABELS),
                          PlanConfig(max_patch_size=[40, 40]), model)
    assert capped.patch_size == [40, 40]
    small = plan_dataset(index, DatasetConfig(labels=LABELS), PlanConfig(memory_budget_mb=30),
                         ModelConfig())
    large = plan_dataset(index, DatasetConfig(labels=LABELS), PlanConfig(), ModelConfig())
    assert np.prod(small.patch_size) < np.prod(large.patch_size)


def test_plan_real_acdc(acdc_dir: Path) -> None:
    index = discover(acdc_dir)
    labels = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
    plans = plan_dataset(index, DatasetConfig(labels=labels), PlanConfig(), ModelConfig())
    summary = plans.model_dump(exclude={"fingerprint"})
    print(json.dumps(summary, indent=1))
    spacings = np.array(plans.fingerprint.spacings)
    np.testing.assert_allclose(plans.target_spacing[:2], np.median(spacings[:, :2], axis=0))
    assert plans.target_spacing[2] == pytest.approx(np.percentile(spacings[:, 2], 10))
    assert plans.slice_axis == 2 and plans.modality == "MRI"
    assert plans.strides[1] == [2, 2, 1]  # 10 mm slices: no pooling across them first
    assert plans.kernel_sizes[0] == [3, 3, 1]
    plans_2d = plan_dataset(index, DatasetConfig(labels=labels), PlanConfig(),
                            ModelConfig(spatial_dims=2, features=[16, 32, 64, 128, 256]))
    print(json.dumps(plans_2d.model_dump(exclude={"fingerprint"}), indent=1))
    assert len(plans_2d.patch_size) == 2 and all(p % 16 == 0 for p in plans_2d.patch_size)
    assert plans_2d.batch_size >= 2
