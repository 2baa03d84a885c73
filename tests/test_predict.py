"""Predictor: masks come back in the input's exact geometry (RAS, LPS, permuted, oblique NIfTI;
qform != sform; NRRD / MHA), resampled grids, 4D refusal and splitting, entropy and volumes,
model-folder loading with small inputs, and the folder CLI skipping a bad file."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nibabel.orientations import io_orientation

from uumamba.commands.predict import predict_from_cli
from uumamba.config import Config, save_config
from uumamba.data.io import read_geometry, read_image
from uumamba.data.plan import ChannelNormalization, Plans
from uumamba.engine.checkpoint import CHECKPOINT_KEYS
from uumamba.errors import UserError
from uumamba.inference.predict import Predictor
from uumamba.inference.writer import write_prediction
from uumamba.nn import build_network

SHAPE = (23, 19, 9)


def _rotation(a: float, b: float) -> np.ndarray:
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def _affine(kind: str, spacing=(1.2, 1.3, 3.0)) -> np.ndarray:
    """RAS voxel -> world affine of each test orientation."""
    a = np.eye(4)
    if kind == "ras":
        a[:3, :3] = np.diag(spacing)
    elif kind == "lps":  # voxel axes point to Left and Posterior (DICOM / ITK default)
        a[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
    elif kind == "permuted":  # voxel axis 0 -> A, 1 -> S, 2 -> R
        a[:3, :3] = np.array([[0, 0, spacing[2]], [spacing[0], 0, 0], [0, spacing[1], 0]])
    elif kind == "oblique":
        a[:3, :3] = _rotation(0.4, 0.3) @ np.diag(spacing)
    a[:3, 3] = [12.5, -20.0, 7.25]
    return a


def _phantom(shape=SHAPE) -> np.ndarray:
    """An off-centre ellipsoid (100) on 0: no mirror symmetry, so any axis mix-up shows."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    centre = (np.asarray(shape) - 1) / 2 * np.array([0.7, 1.2, 0.6])
    inside = (((idx - centre) / np.array([6.0, 4.0, 3.0])) ** 2).sum(-1) <= 1
    return inside.astype(np.float32) * 100


def _ras_spacing(affine: np.ndarray) -> list[float]:
    """Voxel spacing reordered to the RAS axes the pipeline reorients to."""
    ornt = io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out = [0.0] * 3
    for voxel_axis in range(3):
        out[int(ornt[voxel_axis, 0])] = float(spacing[voxel_axis])
    return out


def _plans(spatial_dims: int, target_spacing, labels=None, patch=None) -> Plans:
    patch = patch or ([16, 16, 8] if spatial_dims == 3 else [16, 16])
    return Plans(
        spatial_dims=spatial_dims, modality="MRI", labels=labels or {0: "background", 1: "blob"},
        num_input_channels=1, target_spacing=list(target_spacing),
        slice_axis=int(np.argmax(target_spacing)),
        normalization=[ChannelNormalization(scheme="zscore")], patch_size=patch,
        strides=[[1] * spatial_dims], kernel_sizes=[[3] * spatial_dims], batch_size=2,
    )


def _threshold_model(spatial_dims: int) -> torch.nn.Module:
    """Pointwise model: class 1 where the z-scored intensity is above 0 (the case mean)."""
    conv = (torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d)(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1] = 20.0
    return conv


def _expected(image: np.ndarray) -> np.ndarray:
    return (image > image.mean()).astype(np.uint8)


def _write_nifti(image, affine, path, qform=None):
    img = nib.Nifti1Image(image, affine)
    img.set_sform(affine, code=2)
    img.set_qform(affine if qform is None else qform, code=1)
    nib.save(img, str(path))


def _write_sitk(image, affine_ras, path):
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(image.transpose(2, 1, 0))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(img, str(path))


@pytest.mark.parametrize("kind", ["ras", "lps", "permuted", "oblique"])
@pytest.mark.parametrize("ext", ["nii.gz", "nrrd", "mha"])
def test_mask_overlays_input_exactly(tmp_path, kind, ext):
    affine = _affine(kind)
    image = _phantom()
    path = tmp_path / f"case.{ext}"
    (_write_nifti if ext == "nii.gz" else _write_sitk)(image, affine, path)
    spatial_dims = 3 if kind in ("ras", "oblique") else 2
    predictor = Predictor([_threshold_model(spatial_dims)], _plans(spatial_dims, _ras_spacing(affine)),
                          device="cpu")
    pred = predictor.predict_file(path)
    assert pred.mask.dtype == np.uint8 and pred.mask.shape == SHAPE
    np.testing.assert_array_equal(pred.mask, _expected(image))

    written = write_prediction(pred, "case", path, tmp_path / "out", predictor.labels)
    mask_path = tmp_path / "out" / f"case.{ext}"
    assert written[0] == mask_path
    mask, geometry = read_image(mask_path)
    np.testing.assert_array_equal(mask, _expected(image))
    assert geometry.mismatch(read_geometry(path), rtol=1e-6, atol=1e-6) == []
    assert mask.dtype == np.uint8


def test_nifti_qform_differs_from_sform(tmp_path):
    sform = _affine("oblique")
    qform = _affine("ras")
    image = _phantom()
    path = tmp_path / "q.nii.gz"
    _write_nifti(image, sform, path, qform=qform)
    predictor = Predictor([_threshold_model(3)], _plans(3, _ras_spacing(sform)), device="cpu")
    pred = predictor.predict_file(path)
    np.testing.assert_array_equal(pred.mask, _expected(image))
    write_prediction(pred, "q", path, tmp_path / "out", predictor.labels)
    src, out = nib.load(str(path)), nib.load(str(tmp_path / "out" / "q.nii.gz"))
    np.testing.assert_allclose(out.get_sform(), src.get_sform(), atol=1e-6)
    np.testing.assert_allclose(out.get_qform(), src.get_qform(), atol=1e-5)
    assert int(out.header["sform_code"]) == 2 and int(out.header["qform_code"]) == 1
    assert not np.allclose(out.get_qform(), out.get_sform())
    np.testing.assert_array_equal(np.asarray(out.dataobj), _expected(image))


def test_resampled_grid_maps_back(tmp_path):
    affine = _affine("oblique", spacing=(1.0, 1.0, 2.0))
    shape = (40, 36, 16)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    centre = (np.asarray(shape) - 1) / 2 * np.array([0.9, 1.1, 0.9])
    image = ((((idx - centre) / np.array([14.0, 11.0, 5.0])) ** 2).sum(-1) <= 1).astype(np.float32) * 100
    path = tmp_path / "r.nii.gz"
    _write_nifti(image, affine, path)
    coarse = [s * 1.6 for s in _ras_spacing(affine)]  # network grid coarser than the input
    predictor = Predictor([_threshold_model(3)], _plans(3, coarse), device="cpu")
    pred = predictor.predict_file(path, probabilities=True)
    assert pred.mask.shape == image.shape
    assert pred.probabilities.shape == (2, *image.shape)
    expected = image > 0
    got = pred.mask.astype(bool)
    dice = 2 * (got & expected).sum() / (got.sum() + expected.sum())
    assert dice > 0.9
    # No shift: the centroids agree to a fraction of a voxel.
    offset = np.argwhere(got).mean(0) - np.argwhere(expected).mean(0)
    assert np.abs(offset).max() < 0.25


def test_2d_model_segments_the_slices_of_a_thin_slice_volume(tmp_path):
    """A 2D model trained on 10 mm slices, given 1 mm slices (a 3D isotropic export), keeps
    every slice: the mask is the per-voxel threshold on all 40 of them (resampling the slice
    axis to 10 mm and back, as before, gave 4 averaged slices copied back in blocks)."""
    shape = (23, 19, 40)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    centre = (np.asarray(shape) - 1) / 2 * np.array([0.8, 1.1, 0.9])
    image = ((((idx - centre) / np.array([7.0, 5.0, 13.0])) ** 2).sum(-1) <= 1)
    image = image.astype(np.float32) * 100
    path = tmp_path / "thin.nii.gz"
    _write_nifti(image, _affine("oblique", spacing=(1.2, 1.3, 1.0)), path)
    plans = _plans(2, [1.2, 1.3, 10.0])
    assert plans.resampling_spacing == [1.2, 1.3, 0.0]
    predictor = Predictor([_threshold_model(2)], plans, device="cpu")
    pred = predictor.predict_file(path)
    np.testing.assert_array_equal(pred.mask, _expected(image))
    # a 3D model resamples every axis: the same volume on its 10 mm grid cannot be exact
    coarse = Predictor([_threshold_model(3)], _plans(3, [1.2, 1.3, 10.0]), device="cpu")
    assert (coarse.predict_file(path).mask != _expected(image)).sum() > 100


@pytest.mark.parametrize(("axcodes", "factor", "permuted"), [
    ("voxel", 7, False), ("voxel", 10, False), ("voxel", 5, True), ("voxel", 10, True),
    ("RAS", 7, False),
])
def test_real_acdc_volume_resliced_thin_keeps_its_slices(acdc_dir, tmp_path, axcodes, factor,
                                                         permuted):
    """patient001's ED frame (1.5625 mm pixels, 10 mm slices) written as ``factor`` times as
    many slices (1.43, 1.0 or 2.0 mm), each original slice repeated over its own 10 mm (what a
    thin-slice export of the same stack looks like to the reader), with the slice axis last or
    written first (``permuted``): a 2D model's mask is the original's, slice for slice — in the
    plans' voxel axes (slices finer than the pixels are found by the square pixels, not taken
    for "the thickest": ``orientation.plan_axes_order``) and in 0.1's RAS axes."""
    src = nib.load(str(acdc_dir / "patient001" / "patient001_frame01.nii.gz"))
    image = np.asarray(src.dataobj, dtype=np.float32)
    thin_affine = src.affine.copy()
    thin_affine[:3, 2] /= factor
    thin_affine[:3, 3] += src.affine[:3, 2] * (-0.5 + 0.5 / factor)  # same slab, finer slices
    thin_image = np.repeat(image, factor, axis=2)
    if permuted:  # voxel axes (slice, x, y): the affine's columns follow the array's axes
        thin_image = np.ascontiguousarray(thin_image.transpose(2, 0, 1))
        thin_affine = thin_affine[:, [2, 0, 1, 3]]
    _write_nifti(image, src.affine, tmp_path / "thick.nii.gz")
    _write_nifti(thin_image, thin_affine, tmp_path / "thin.nii.gz")
    spacing = [float(v) for v in src.header.get_zooms()[:3]]
    plans = _plans(2, spacing).model_copy(update={"axcodes": axcodes})
    predictor = Predictor([_threshold_model(2)], plans, device="cpu")
    thick = predictor.predict_file(tmp_path / "thick.nii.gz").mask
    thin = predictor.predict_file(tmp_path / "thin.nii.gz").mask
    expected = np.repeat(thick, factor, axis=2)
    if permuted:
        expected = expected.transpose(2, 0, 1)
    assert thin.shape == thin_image.shape
    assert 0.2 < thick.mean() < 0.8  # the threshold splits the image: a real test
    mismatch = (thin != expected).mean()
    # resampled to 10 mm and back: 8 % of the voxels differed; sliced lengthwise: 14.5 %
    assert mismatch < 1e-4, mismatch


def test_4d_refused_or_split(tmp_path):
    affine = _affine("lps")
    frames = np.stack([_phantom(), np.roll(_phantom(), 3, axis=0)], axis=-1)
    path = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(frames, affine), str(path))
    predictor = Predictor([_threshold_model(3)], _plans(3, _ras_spacing(affine)), device="cpu")
    with pytest.raises(UserError, match=r"cine\.nii\.gz: 4D image .*2 frames.*--split-4d"):
        predictor.predict_file(path)
    preds = predictor.predict_file(path, split_4d=True)
    assert len(preds) == 2
    for t, pred in enumerate(preds):
        np.testing.assert_array_equal(pred.mask, _expected(frames[..., t]))
        assert pred.geometry.mismatch(read_geometry(path)) == []


def test_entropy_and_volumes_json(tmp_path):
    affine = _affine("ras")
    image = _phantom()
    path = tmp_path / "v.nii.gz"
    _write_nifti(image, affine, path)
    predictor = Predictor([_threshold_model(3)], _plans(3, _ras_spacing(affine)), device="cpu")
    pred = predictor.predict_file(path, probabilities=True, entropy=True)
    p = pred.probabilities
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    expected_entropy = -(p * np.log(np.clip(p, 1e-12, 1))).sum(0)
    np.testing.assert_allclose(pred.entropy, expected_entropy, atol=1e-5)
    assert pred.entropy.min() >= 0 and pred.entropy.max() <= math.log(2) + 1e-6
    # Voxels near the threshold are uncertain, the others certain.
    z = (image - image.mean()) / image.std()
    assert pred.entropy[np.abs(z) < 1e-3].size == 0 or pred.entropy[np.abs(z) < 1e-3].min() > 0.5
    out = tmp_path / "out"
    write_prediction(pred, "v", path, out, predictor.labels)
    info = json.loads((out / "v_volumes.json").read_text())
    n = int(_expected(image).sum())
    assert info["labels"]["blob"]["voxels"] == n
    # Volumes are reported to 0.01 mL, without the float noise of n * voxel volume.
    assert info["labels"]["blob"]["volume_ml"] == round(n * 1.2 * 1.3 * 3.0 / 1000, 2)
    assert info["voxel_volume_ml"] == pytest.approx(1.2 * 1.3 * 3.0 / 1000)
    assert pred.volumes_ml["blob"] == round(n * 1.2 * 1.3 * 3.0 / 1000, 2)
    assert '"volume_ml": ' + repr(round(n * 1.2 * 1.3 * 3.0 / 1000, 2)) in (out / "v_volumes.json").read_text()


# ----------------------------------------------------------------------------------------
# model folder: a real (untrained) U-Mamba-Bot written as 'uumamba train' writes it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    cfg = Config.model_validate({
        "dataset": {"labels": {0: "background", 1: "RV", 2: "MYO", 3: "LV"}},
        "model": {"name": "umamba_bot", "spatial_dims": 2, "features": [4, 8, 16], "d_state": 4,
                  "expand": 1},
        "inference": {"sw_batch_size": 2},
    })
    plans = Plans(
        spatial_dims=2, modality="MRI", labels={0: "background", 1: "RV", 2: "MYO", 3: "LV"},
        num_input_channels=1, target_spacing=[1.5, 1.5, 8.0], slice_axis=2,
        normalization=[ChannelNormalization(scheme="zscore")], patch_size=[32, 32],
        strides=[[1, 1], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 3, batch_size=2,
    )
    save_config(cfg, root / "config.yaml")
    plans.save(root / "plans.json")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "RV",
                                                              "2": "MYO", "3": "LV"}}))
    torch.manual_seed(0)
    for fold in (0, 1):
        net = build_network(cfg.model, plans)
        state = dict.fromkeys(CHECKPOINT_KEYS)
        state["model"] = net.state_dict()
        (root / f"fold_{fold}").mkdir()
        torch.save(state, root / f"fold_{fold}" / ("checkpoint_best.pt" if fold == 0 else "checkpoint_latest.pt"))
    return root


def test_from_model_dir_small_input_padded(model_dir, tmp_path):
    path = tmp_path / "small.nii.gz"
    image = np.random.default_rng(0).normal(size=(12, 9, 3)).astype(np.float32)  # < 32 x 32 patch
    _write_nifti(image, np.diag([1.5, 1.5, 8.0, 1.0]), path)
    predictor = Predictor.from_model_dir(model_dir, device="cpu")
    assert predictor.fold_names == ["fold_0", "fold_1"] and len(predictor.networks) == 2
    pred = predictor.predict_file(path, probabilities=True)
    assert pred.mask.shape == (12, 9, 3) and pred.probabilities.shape == (4, 12, 9, 3)
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    assert set(pred.volumes_ml) == {"RV", "MYO", "LV"}
    single = Predictor.from_model_dir(model_dir, folds="1", device="cpu")
    assert single.fold_names == ["fold_1"]
    with pytest.raises(UserError, match="fold_7 has no checkpoint"):
        Predictor.from_model_dir(model_dir, folds=[7], device="cpu")


def test_cli_folder_skips_bad_file(model_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a_0000", "b_0000"):
        _write_nifti(rng.normal(size=(20, 18, 4)).astype(np.float32), _affine("lps", (1.5, 1.5, 8.0)),
                     inputs / f"{name}.nii.gz")
    good = (inputs / "a_0000.nii.gz").read_bytes()
    (inputs / "broken_0000.nii.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    with_nan = rng.normal(size=(20, 18, 4)).astype(np.float32)
    with_nan[3, 4, 1] = np.nan
    _write_nifti(with_nan, _affine("lps", (1.5, 1.5, 8.0)), inputs / "nan_0000.nii.gz")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"2 of 4 input\(s\) failed") as err:
        predict_from_cli(model_dir, inputs, out, folds="0", uncertainty=True, out_format="nrrd",
                         device="cpu")
    assert "broken_0000.nii.gz: " in str(err.value) and "corrupt or truncated" in str(err.value)
    assert "nan_0000.nii.gz: " in str(err.value) and "NaN" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == [
        "a.nrrd", "a_entropy.nrrd", "a_volumes.json", "b.nrrd", "b_entropy.nrrd", "b_volumes.json",
    ]
    mask, geometry = read_image(out / "a.nrrd")
    assert mask.shape == (20, 18, 4)
    assert geometry.mismatch(read_geometry(inputs / "a_0000.nii.gz")) == []


def test_the_case_record_names_the_precision_the_windows_ran_in(model_dir, tmp_path, monkeypatch):
    from uumamba.config import CPU_BF16_ENV

    path = tmp_path / "one.nii.gz"
    _write_nifti(np.random.default_rng(3).normal(size=(20, 18, 4)).astype(np.float32),
                 _affine("lps", (1.5, 1.5, 8.0)), path)
    masks = {}
    for bf16, amp, expected in (("1", None, "bfloat16"), ("1", "off", "float32"),
                                ("0", None, "float32")):
        monkeypatch.setenv(CPU_BF16_ENV, bf16)  # "1": a CPU with AMX or AVX512-BF16
        out = tmp_path / f"out_{bf16}_{amp}"
        predict_from_cli(model_dir, path, out, folds="0", device="cpu", amp=amp)
        assert json.loads((out / "one_volumes.json").read_text())["precision"] == expected
        masks[(bf16, amp)] = read_image(out / "one.nii.gz")[0]
    assert np.array_equal(masks[("1", "off")], masks[("0", None)])  # both float32


def test_cli_single_file_seg_nrrd_and_probabilities(model_dir, tmp_path):
    import nrrd

    path = tmp_path / "one.mha"
    _write_sitk(np.random.default_rng(2).normal(size=(20, 18, 4)).astype(np.float32),
                _affine("oblique", (1.5, 1.5, 8.0)), path)
    out = tmp_path / "out"
    predict_from_cli(model_dir, path, out, out_format="seg.nrrd", probabilities=True, device="cpu")
    seg, header = nrrd.read(str(out / "one.seg.nrrd"))
    assert seg.shape == (20, 18, 4)
    assert header["Segment0_Name"] == "RV"
    # Float maps beside a seg.nrrd are plain NRRD too (not NIfTI), on the same grid.
    assert not (out / "one_probabilities.nii.gz").exists()
    probs, probs_header = nrrd.read(str(out / "one_probabilities.nrrd"))
    channel_axis = [i for i, k in enumerate(probs_header["kinds"]) if k == "vector"]
    assert len(channel_axis) == 1 and probs.shape[channel_axis[0]] == 4
    np.testing.assert_allclose(probs.sum(channel_axis[0]), 1.0, atol=1e-4)
    assert np.moveaxis(probs, channel_axis[0], -1).shape == (20, 18, 4, 4)
    np.testing.assert_allclose(probs_header["space origin"], header["space origin"], atol=1e-4)
    with pytest.raises(UserError, match="--format"):
        predict_from_cli(model_dir, path, out, out_format="png", device="cpu")


def test_cli_refuses_to_write_into_the_input_folder(tmp_path):
    from uumamba.inference.inputs import check_output_dir as _check_output_dir

    images = tmp_path / "images"
    images.mkdir()
    scan = images / "a.nii.gz"
    scan.write_bytes(b"")
    with pytest.raises(UserError, match="is the input folder"):
        _check_output_dir(scan, images)
    with pytest.raises(UserError, match="is the input folder"):
        _check_output_dir(images, tmp_path / "images" / ".." / "images")
    with pytest.raises(UserError, match="not a folder"):
        _check_output_dir(images, scan)
    _check_output_dir(images, tmp_path / "pred")  # a separate folder is fine


def test_cases_with_colliding_names_are_refused(tmp_path):
    from uumamba.inference.inputs import input_cases as _input_cases

    for name in ("good.nrrd", "good.mha"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(UserError, match="both be written as case 'good'"):
        _input_cases(tmp_path, 1)


def test_device_names_are_checked_like_train():
    from uumamba.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
