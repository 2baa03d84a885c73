"""Oblique and double-oblique inputs: the slice axis is the image's own thick voxel axis.

The same voxel array under rotated affines (0°–90° about each world axis, and a double-oblique
short-axis-like direction) must give the same network grid and the same mask in the input's
own grid, for 2D and 3D models; a dataset of rotated copies must plan like the unrotated one.
Under the 0.1 rule (reorientation to RAS) a tilt over 45° changes the slice axis: shown too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from uumamba.config import DatasetConfig, InferenceConfig, ModelConfig, PlanConfig
from uumamba.data.layouts import discover
from uumamba.data.orientation import (
    canonical_spacing,
    plan_axes_order,
    voxel_spacing,
    world_rotation,
)
from uumamba.data.plan import plan_dataset
from uumamba.data.synthetic import write_synthetic_dataset
from uumamba.inference import Predictor
from uumamba.nn import build_network

ANGLES = (0.0, 30.0, 44.0, 46.0, 60.0, 90.0)
LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}


rotation = world_rotation

DOUBLE_OBLIQUE = rotation(1, 35.0) @ rotation(0, 50.0)  # short-axis-like slice normal


def _rotated(path: Path, out: Path, r: np.ndarray) -> Path:
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), r @ img.affine), str(out))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("oblique") / "data", n_cases=3, seed=5,
                                   shape=(64, 64, 8), spacing=(1.5, 1.5, 8.0))


def _predictor(dataset: Path, dims: int, reorientation: str = "voxel") -> Predictor:
    model = ModelConfig(name="umamba_bot", spatial_dims=dims, features=[4, 8, 16], d_state=4,
                        expand=1, deep_supervision=False)
    plans = plan_dataset(discover(dataset), DatasetConfig(labels=LABELS),
                         PlanConfig(reorientation=reorientation, patch_size=[32, 32] if dims == 2
                                    else [32, 32, 8], batch_size=1), model)
    torch.manual_seed(0)
    net = build_network(model, plans)
    return Predictor([net], plans, InferenceConfig(sw_batch_size=8), device="cpu")


@pytest.mark.parametrize(("dims", "in_plane_mm"), [(2, 1.5), (2, 1.3), (3, 1.3)])
def test_rotated_affines_give_the_same_mask(dataset, tmp_path, dims, in_plane_mm):
    """1.5 mm is the planned spacing (no resampling); 1.3 mm is resampled to it."""
    predictor = _predictor(dataset, dims)
    source = dataset / "images" / "synth_000.nii.gz"
    if in_plane_mm != 1.5:
        img = nib.load(str(source))
        source = tmp_path / "resampled_source.nii.gz"
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj),
                                 np.diag([in_plane_mm, in_plane_mm, 8.0, 1.0])), str(source))
    reference = predictor.predict_file(source, probabilities=True)
    grid = tuple(predictor.transforms({"image": [str(source)]})["image"].shape)
    assert grid[3] == 8  # the 8 mm axis stays the slice axis, at the planned spacing
    directions = [(axis, angle) for axis in range(3) for angle in ANGLES[1:]] + [("sax", None)]
    for axis, angle in directions:
        r = DOUBLE_OBLIQUE if axis == "sax" else rotation(axis, angle)
        path = _rotated(source, tmp_path / f"r_{axis}_{angle}.nii.gz", r)
        assert tuple(predictor.transforms({"image": [str(path)]})["image"].shape) == grid
        pred = predictor.predict_file(path, probabilities=True)
        assert pred.mask.shape == reference.mask.shape == (64, 64, 8)
        np.testing.assert_array_equal(pred.probabilities, reference.probabilities,
                                      err_msg=f"rotation {angle} deg about {axis}")
        np.testing.assert_array_equal(pred.mask, reference.mask, err_msg=f"{angle} about {axis}")
        zooms = np.diag([1 / in_plane_mm, 1 / in_plane_mm, 1 / 8])
        np.testing.assert_allclose(pred.geometry.direction, nib.load(str(path)).affine[:3, :3]
                                   @ zooms * np.array([-1, -1, 1])[:, None], atol=1e-6)


def test_ras_rule_picks_the_wrong_plane_past_45_degrees(dataset, tmp_path):
    """What 0.1 did (kept for its plans): past 45° about x the 8 mm axis is resampled in-plane."""
    predictor = _predictor(dataset, 2, reorientation="ras")
    source = dataset / "images" / "synth_000.nii.gz"
    tilted = _rotated(source, tmp_path / "t50.nii.gz", rotation(0, 50.0))
    straight = tuple(predictor.transforms({"image": [str(source)]})["image"].shape)
    wrong = tuple(predictor.transforms({"image": [str(tilted)]})["image"].shape)
    assert straight[3] == 8 and wrong[3] != 8


def test_rotated_copies_plan_like_the_unrotated_dataset(dataset, tmp_path):
    rotated = tmp_path / "rotated"
    shutil.copytree(dataset, rotated)
    turns = [rotation(0, 46.0), rotation(2, 60.0), DOUBLE_OBLIQUE]
    for folder in ("images", "labels"):
        for path, r in zip(sorted((rotated / folder).glob("*.nii.gz")), turns, strict=True):
            _rotated(path, path, r)
    model = ModelConfig(spatial_dims=2, features=[8, 16, 32])
    a = plan_dataset(discover(dataset), DatasetConfig(labels=LABELS), PlanConfig(), model)
    b = plan_dataset(discover(rotated), DatasetConfig(labels=LABELS), PlanConfig(), model)
    assert a.model_dump(exclude={"fingerprint"}) == b.model_dump(exclude={"fingerprint"})
    np.testing.assert_allclose(a.fingerprint.spacings, b.fingerprint.spacings, rtol=1e-6)
    assert a.fingerprint.shapes == b.fingerprint.shapes


@pytest.mark.parametrize(("spacing", "order"), [
    ((1.5, 1.5, 10.0), (0, 1, 2)),      # short-axis stack as acquired
    ((10.0, 1.5, 1.5), (1, 2, 0)),      # the same stack written slice axis first
    ((1.5, 10.0, 1.5), (0, 2, 1)),
    ((0.625, 1.25, 0.625), (0, 2, 1)),  # LGE 2x anisotropy, permuted
    ((1.5625, 1.5625, 1.43), (0, 1, 2)),  # thin slices finer than the pixels: the stack axis
    ((1.0, 1.2, 0.9), (0, 1, 2)),       # near-isotropic: the stack axis
    ((1.0, 1.0, 1.0), (0, 1, 2)),
    ((1.5625, 1.5625, 1.0), (0, 1, 2)),  # 1 mm slices: the pixels are not "the thickest"
    ((1.25, 1.25, 0.8), (0, 1, 2)),
    ((2.0, 1.5625, 1.5625), (1, 2, 0)),  # 2 mm slices written first: the square pixels say so
    ((1.5625, 1.0, 1.5625), (0, 2, 1)),  # 1 mm slices written in the middle
    ((1.0, 1.2, 1.4), (0, 1, 2)),       # nothing says: the stack axis
    ((1.4844, 1.5, 1.5), (0, 1, 2)),    # near-isotropic, a rounded pixel: the stack axis
    ((1.4, 1.5, 1.5), (1, 2, 0)),       # 7 % off square pixels; the shape says otherwise below
])
def test_the_slice_axis_is_the_thick_axis_or_the_stack_axis(spacing, order):
    affine = DOUBLE_OBLIQUE @ np.diag([*spacing, 1.0])
    assert plan_axes_order(affine) == order


@pytest.mark.parametrize(("spacing", "shape", "order"), [
    ((1.4, 1.5, 1.5), (40, 40, 12), (0, 1, 2)),      # non-square pixels, 12 slices stacked last
    ((1.0, 1.0, 1.0), (1, 40, 40), (1, 2, 0)),       # one slice written slice axis first
    ((1.0, 1.0, 1.0), (40, 2, 40), (0, 2, 1)),
    ((1.0, 1.0, 1.0), (96, 96, 48), (0, 1, 2)),      # a 3D box: the stack axis
    ((1.0, 1.5625, 1.5625), (100, 216, 256), (1, 2, 0)),  # 100 thin slices first: square pixels
    ((10.0, 1.5, 1.5), (300, 4, 4), (1, 2, 0)),      # the spacing decides before the shape
])
def test_a_few_slices_make_the_slice_axis_when_the_spacing_does_not(spacing, shape, order):
    affine = DOUBLE_OBLIQUE @ np.diag([*spacing, 1.0])
    assert plan_axes_order(affine, shape) == order


def test_a_rotated_real_acdc_volume_gives_the_same_probabilities(acdc_dir, dataset, tmp_path):
    """patient007 (1.875 mm pixels, resampled to the plan's 1.5 mm) rotated about the slice
    normal and tilted: bit-identical probabilities. Before the network grid's spacing was
    rounded to float32 and its affine set exactly, 10-20 voxels of each such copy's mask
    differed (a trained model, bf16)."""
    predictor = _predictor(dataset, 2)
    source = acdc_dir / "patient007" / "patient007_frame01.nii.gz"
    reference = predictor.predict_file(source, probabilities=True)
    for axis, angle in ((2, 50.0), (0, 35.0)):
        path = _rotated(source, tmp_path / f"p7_{axis}.nii.gz", rotation(axis, angle))
        pred = predictor.predict_file(path, probabilities=True)
        np.testing.assert_array_equal(pred.probabilities, reference.probabilities,
                                      err_msg=f"{angle} deg about {axis}")


def test_the_network_grid_spacing_of_a_rotated_float32_header_is_the_spacing_written():
    """A NIfTI affine is float32: a rotated one's column norms miss the spacing by about one
    float32 unit, which moved the resampled grid (the probabilities of a rotated copy differed
    by up to 1e-5 in test_rotated_affines_give_the_same_mask); rounded to float32 they read
    the written value."""
    rng = np.random.default_rng(0)
    spacings = (0.68359375, 0.78125, 1.25, 1.3671875, 1.40625, 1.5625, 1.71875, 5.0, 10.0)
    exact = trials = 0
    for mm in spacings:
        for _ in range(500):
            q, r = np.linalg.qr(rng.normal(size=(3, 3)))
            affine = np.eye(4)
            affine[:3, :3] = ((q * np.sign(np.diag(r))) * mm).astype(np.float32)
            raw = voxel_spacing(affine)
            exact += int(np.all(canonical_spacing(affine) == mm))
            trials += 1
            assert np.all(np.abs(raw - mm) <= 2.5e-7 * mm)  # what the header holds
    assert exact / trials >= 0.95, exact / trials  # 0.971 with this seed
    straight = np.diag([np.float32(0.7), 1.5625, 8.0, 1.0])  # axis-aligned float32: unchanged
    assert list(canonical_spacing(straight)) == [float(np.float32(0.7)), 1.5625, 8.0]
    assert canonical_spacing(np.diag([0.7, 0.7, 5.0, 1.0]))[0] == float(np.float32(0.7))
    extreme = canonical_spacing(np.diag([1e39, 1e-46, 1.5, 1.0]))  # beyond float32: kept
    assert list(extreme) == [1e39, 1e-46, 1.5]


def test_a_rotated_nifti_reads_the_spacing_its_header_stores(tmp_path):
    """pixdim holds the spacing written; the float32 sform's column norms miss it by about a
    float32 unit, and rounding them alone came back one unit off in 3 % of rotations (a
    double-oblique bf16 mask of patient001 then differed in 301 voxels). Read through
    read_geometry, every rotation's network grid has the written spacing."""
    from uumamba.data.io import read_geometry

    rng = np.random.default_rng(4)
    spacing = (1.5625, 1.5625, 10.0)
    data = np.zeros((4, 4, 2), np.float32)
    for i in range(150):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        affine = np.eye(4)
        affine[:3, :3] = (q * np.sign(np.diag(r))) @ np.diag(spacing)
        path = tmp_path / f"r{i}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        geometry = read_geometry(path)
        assert canonical_spacing(geometry.affine_ras()).tolist() == list(spacing), i
        np.testing.assert_allclose(geometry.affine_ras(), nib.load(str(path)).affine, atol=1e-6)
    # a header whose pixdim disagrees with its affine beyond float32 rounding: the affine wins
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 10.0, 1.0]))
    img.header["pixdim"][1:4] = [1.5, 1.5, 10.0]
    nib.save(img, str(tmp_path / "odd.nii.gz"))
    assert read_geometry(tmp_path / "odd.nii.gz").spacing == (2.0, 2.0, 10.0)
