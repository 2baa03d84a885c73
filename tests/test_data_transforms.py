"""MONAI pipelines: shapes / dtypes, label values, foreground oversampling, exact inversion,
caching."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, Invertd

from uumamba.config import AugmentationConfig, TrainConfig
from uumamba.data.io import read_geometry, read_image, write_image, write_mask
from uumamba.data.layouts import Case
from uumamba.data.plan import ChannelNormalization, Plans
from uumamba.data.transforms import (
    inference_transforms,
    make_dataset,
    sampling_geometry,
    training_transforms,
    validation_transforms,
)

SHAPE = (9, 40, 33)  # voxel axes: 8 mm, 1.3 mm, 1.3 mm (the coarse axis stored first)


def _oblique_lps_affine() -> np.ndarray:
    """RAS affine of an oblique volume whose first voxel axis is the 8 mm slice axis (mostly
    left-right), with the second axis running posterior (an LPS-style flip)."""
    t = 0.35
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    columns = np.stack([[0.0, -1.3, 0.0], [-8.0, 0.0, 0.0], [0.0, 0.0, 1.3]], axis=1)
    columns = columns[:, [1, 0, 2]]
    affine = np.eye(4)
    affine[:3, :3] = rot @ columns
    affine[:3, 3] = [30.0, -12.0, 7.0]
    return affine


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vol")
    rng = np.random.default_rng(0)
    image = rng.normal(50.0, 10.0, size=SHAPE).astype(np.float32) + 10.0
    label = np.zeros(SHAPE, np.uint8)
    label[3:6, 10:25, 8:20] = 1
    label[4:6, 14:20, 12:16] = 2
    label[2, 30:33, 25:28] = 3  # a small class
    paths = root / "img.nii.gz", root / "lab.nii.gz"
    nib.save(nib.Nifti1Image(image, _oblique_lps_affine()), str(paths[0]))
    nib.save(nib.Nifti1Image(label, _oblique_lps_affine()), str(paths[1]))
    return paths


def _plans(target, patch, dims=3, slice_axis=0, channels=1) -> Plans:
    n = len(patch)
    return Plans(spatial_dims=dims, modality="MRI",
                 labels={0: "background", 1: "a", 2: "b", 3: "c"}, num_input_channels=channels,
                 target_spacing=target, slice_axis=slice_axis,
                 normalization=[ChannelNormalization(scheme="zscore")] * channels,
                 patch_size=patch, strides=[[1] * n, [2] * n], kernel_sizes=[[3] * n] * 2,
                 batch_size=2)


def _train_cfg(fg: float = 0.33, **aug) -> TrainConfig:
    return TrainConfig(foreground_oversample=fg, augmentation=AugmentationConfig(**aug))


def test_training_patches_3d(volume) -> None:
    plans = _plans([8.0, 1.3, 1.3], [8, 24, 24])
    tf = training_transforms(plans, _train_cfg(fg=1.0, p_spatial=1.0))
    tf.set_random_state(0)
    item = {"image": [str(volume[0])], "label": str(volume[1])}
    for _ in range(6):
        out = tf(item)
        assert out["image"].shape == (1, 8, 24, 24) and out["image"].dtype == torch.float32
        assert out["label"].shape == (1, 8, 24, 24) and out["label"].dtype == torch.uint8
        values = set(torch.unique(out["label"]).tolist())
        assert values <= {0, 1, 2, 3} and values != {0}  # foreground-centred every time
        assert torch.isfinite(out["image"]).all()
    # same seed, same patch
    a = training_transforms(plans, _train_cfg()).set_random_state(7)(item)
    b = training_transforms(plans, _train_cfg()).set_random_state(7)(item)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_foreground_oversampling_fraction(volume) -> None:
    plans = _plans([8.0, 1.3, 1.3], [2, 8, 8])
    item = {"image": [str(volume[0])], "label": str(volume[1])}
    no_aug = {"p_spatial": 0.0, "mirror": False}

    def fraction_with_class3(fg: float) -> float:
        tf = training_transforms(plans, _train_cfg(fg=fg, **no_aug)).set_random_state(1)
        return np.mean([3 in tf(item)["label"] for _ in range(40)])

    # class 3 covers 0.08% of the volume: only class-centred patches find it
    assert fraction_with_class3(0.0) < 0.1
    assert 0.15 < fraction_with_class3(1.0) < 0.6  # a random one of the 3 classes present


@pytest.mark.parametrize("dims", [2, 3])
def test_every_augmentation_runs(volume, dims: int) -> None:
    patch = [32, 24] if dims == 2 else [8, 24, 24]
    plans = _plans([8.0, 1.3, 1.3], patch, dims=dims, slice_axis=0)
    always = {k: 1.0 for k in ("p_spatial", "p_noise", "p_blur", "p_brightness", "p_contrast",
                               "p_gamma", "p_lowres")}
    tf = training_transforms(plans, _train_cfg(fg=0.5, elastic=True, **always))
    tf.set_random_state(5)
    out = tf({"image": [str(volume[0])], "label": str(volume[1])})
    assert out["image"].shape == (1, *patch) and torch.isfinite(out["image"]).all()
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2, 3}
    applied = [op["class"] for op in out["image"].applied_operations]
    assert {"RandAffined", "RandFlipd"} <= {name.split(".")[-1] for name in applied}


def test_training_patches_2d_along_slice_axis(volume) -> None:
    plans = _plans([8.0, 1.3, 1.3], [32, 24], dims=2, slice_axis=0)
    crop, squeeze = sampling_geometry(plans)
    assert crop == [1, 32, 24] and squeeze == 1
    tf = training_transforms(plans, _train_cfg(fg=0.5, p_spatial=0.5, elastic=True))
    tf.set_random_state(3)
    for _ in range(4):
        out = tf({"image": [str(volume[0])], "label": str(volume[1])})
        assert out["image"].shape == (1, 32, 24) and out["label"].shape == (1, 32, 24)
        assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2, 3}


def test_validation_volume_keeps_labels(volume) -> None:
    plans = _plans([8.0, 0.65, 1.3], [8, 8, 8])
    out = validation_transforms(plans)({"image": [str(volume[0])], "label": str(volume[1])})
    label, _ = read_image(volume[1])
    # RAS orientation puts the 8 mm axis first; 2x upsampling along the 1.3 mm "y" axis
    assert out["image"].shape == (1, 9, 79, 33) and out["label"].shape == (1, 9, 79, 33)
    assert out["label"].dtype == torch.uint8 and out["image"].dtype == torch.float32
    assert sorted(torch.unique(out["label"]).tolist()) == [0, 1, 2, 3]
    for k in (1, 2, 3):  # nearest resampling: twice the voxels of each class (±1 slice)
        ratio = int((out["label"] == k).sum()) / int((label == k).sum())
        assert 1.8 < ratio < 2.2
    assert abs(float(out["image"].mean())) < 1e-4 and abs(float(out["image"].std()) - 1) < 1e-3


@pytest.mark.parametrize("target", [[8.0, 1.3, 1.3], [4.0, 0.65, 1.3]])
@pytest.mark.parametrize("ext", ["nii.gz", "mha"])
def test_inference_chain_inverts_exactly(volume, tmp_path: Path, target, ext) -> None:
    image_path, label_path = volume
    if ext != "nii.gz":  # the same volume as MHA (LPS on disk), read by SimpleITKReader
        image_path = write_image(read_image(image_path)[0], image_path, tmp_path / f"img.{ext}")
        label_path = write_mask(read_image(label_path)[0], label_path, tmp_path / f"lab.{ext}")
    plans = _plans(target, [8, 8, 8])
    infer = inference_transforms(plans)
    data = infer({"image": [str(image_path)]})
    # a "prediction" on the preprocessed grid: the label preprocessed like the image
    label_chain = Compose([t for t in validation_transforms(plans).transforms
                           if type(t).__name__ != "CropForegroundd"])
    pre = label_chain({"image": [str(image_path)], "label": str(label_path)})
    assert pre["label"].shape[1:] == data["image"].shape[1:]
    data["pred"] = pre["label"].float()
    inverted = Invertd("pred", transform=infer, orig_keys="image", nearest_interp=True)(data)
    back = inverted["pred"][0].numpy().astype(np.uint8)
    original, geom = read_image(label_path)
    np.testing.assert_array_equal(back, original)
    written = write_mask(back, image_path, tmp_path / "pred")
    assert read_geometry(written).mismatch(geom) == []
    np.testing.assert_allclose(inverted["pred"].affine.numpy(), geom.affine_ras(), atol=1e-4)


def test_multichannel_and_dataset_caching(volume, tmp_path: Path) -> None:
    image, geom = read_image(volume[0])
    second = write_image(image * 3.0 + 5.0, volume[0], tmp_path / "img_0001.nii.gz")
    case = Case("c1", "c1", [volume[0], second], volume[1])
    plans = _plans([8.0, 1.3, 1.3], [8, 8, 8], channels=2)
    ds = make_dataset([case], validation_transforms(plans), cache="memory")
    item = ds[0]
    assert item["image"].shape[0] == 2 and item["case_id"] == "c1"
    # per-channel z-score: the affine-transformed second channel normalises identically
    torch.testing.assert_close(item["image"][0], item["image"][1], atol=1e-4, rtol=0)

    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    paths = [write_image(image, volume[0], copy_dir / "i.nii.gz"),
             write_mask(read_image(volume[1])[0], volume[1], copy_dir / "l.nii.gz")]
    one = Case("c2", "c2", [paths[0]], paths[1])
    single = _plans([8.0, 1.3, 1.3], [8, 8, 8])
    mem = make_dataset([one], validation_transforms(single), "memory")
    disk = make_dataset([one], validation_transforms(single), "disk", cache_dir=tmp_path / "cache")
    first = disk[0]
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1, "disk cache not written"
    # another pipeline (training) in the same cache folder keeps its own entries
    train = make_dataset([one], training_transforms(single, _train_cfg()), "disk",
                         cache_dir=tmp_path / "cache")
    assert train[0]["image"].shape == (1, 8, 8, 8)
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) == 2
    # a batch of one cached case (c2) and one not yet cached (c3) collates (the first epoch of
    # train.cache=disk): both come with the same key types
    from monai.data import list_data_collate

    both = make_dataset([one, Case("c3", "c3", [paths[0]], paths[1])],
                        training_transforms(single, _train_cfg()), "disk", cache_dir=tmp_path / "cache")
    assert list_data_collate([both[0], both[1]])["image"].shape == (2, 1, 8, 8, 8)
    for p in paths:  # cached datasets no longer read the files
        p.unlink()
    torch.testing.assert_close(mem[0]["label"], first["label"])
    torch.testing.assert_close(disk[0]["image"], first["image"])
    with pytest.raises(ValueError, match="cache_dir"):
        make_dataset([one], validation_transforms(plans), "disk")
    with pytest.raises(ValueError, match="cache='ram'"):
        make_dataset([one], validation_transforms(plans), "ram")


def test_real_acdc_case(acdc_dir: Path) -> None:
    case_dir = acdc_dir / "patient001"
    plans = _plans([1.5625, 1.5625, 10.0], [160, 160], dims=2, slice_axis=2)
    item = {"image": [str(case_dir / "patient001_frame01.nii.gz")],
            "label": str(case_dir / "patient001_frame01_gt.nii.gz")}
    val = validation_transforms(plans)(item)
    assert val["image"].shape[1:] == val["label"].shape[1:] and val["image"].shape[-1] == 10
    assert sorted(torch.unique(val["label"]).tolist()) == [0, 1, 2, 3]
    out = training_transforms(plans, _train_cfg(fg=1.0)).set_random_state(0)(item)
    assert out["image"].shape == (1, 160, 160) and out["label"].max() > 0


def test_training_patches_do_not_alias_the_memory_cache(volume) -> None:
    plans = _plans([8.0, 1.3, 1.3], [9, 40, 33])  # patch = whole volume: crop is a full view
    case = Case("c", "c", [volume[0]], volume[1])
    ds = make_dataset([case], training_transforms(plans, _train_cfg(p_spatial=0.0, mirror=False,
                                                                      p_noise=0.0, p_blur=0.0,
                                                                      p_brightness=0.0,
                                                                      p_contrast=0.0, p_gamma=0.0,
                                                                      p_lowres=0.0)), "memory")
    first = ds[0]
    reference = first["image"].clone()
    first["image"] += 1000.0  # a consumer writing into its batch
    torch.testing.assert_close(ds[0]["image"], reference)
