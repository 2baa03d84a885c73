"""MONAI dictionary-transform pipelines for training, validation and inference.

Keys: ``image`` (list of paths, one per channel -> ``(C, *spatial)`` float32) and ``label``
(path -> ``(1, *spatial)`` uint8; cast to int64 in the training step for cross-entropy).

Shared preprocessing (deterministic, so ``CacheDataset`` / ``PersistentDataset`` cache it):
``LoadImaged`` (NibabelReader for NIfTI, :class:`~uumamba.data.readers.SimpleITKReader` for
NRRD / MHA, :class:`~uumamba.data.readers.DicomSeriesReader` for DICOM series folders) -> ``EnsureChannelFirstd`` -> the plan's reorientation
(:func:`uumamba.data.orientation.reorientation_transform`: the image's own voxel axes with the
slice axis last, or ``Orientationd("RAS")`` for older plans) -> ``Spacingd``
(``plans.resampling_spacing`` along those axes: the target spacing, except that 2D models keep
each volume's own slice spacing; direction kept; images bilinear, labels nearest) -> [``CropForegroundd`` to the
non-zero image box: training and validation only] -> :class:`NormalizeFromPlan` -> cast.

Training then pads to the sampling size, draws one patch with foreground oversampling
(:class:`ForegroundOversampledCropd`; a fraction ``train.foreground_oversample`` of patches is
centred on a voxel of a random foreground class present in the case, the rest anywhere),
and augments: rotation / scaling (``RandAffined``, optional elastic deformation) that also
crops the enlarged sample to ``plans.patch_size``, mirroring per axis, Gaussian noise, blur,
brightness, contrast (fixed mean), gamma and simulated low resolution — the augmentation
set of nnU-Net (Isensee et al., 2021) with MONAI transforms. For strongly anisotropic data
(coarsest spacing > 3x the finest) rotation and scaling stay in-plane, as nnU-Net does.

2D models: every patch is a single slice along ``plans.slice_axis`` — the crop has size 1
there (:func:`sampling_geometry`) and the axis is squeezed, giving ``(C, H, W)``.

Inference has no crop and only invertible spatial transforms, so ``monai.transforms.Invertd``
maps a prediction made on the preprocessed grid back to the input's grid (shape, spacing,
origin, direction).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import NibabelReader
from monai.transforms import (
    CastToTyped,
    CenterSpatialCropd,
    ClassesToIndicesd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    OneOf,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)

from uumamba.config import AugmentationConfig, TrainConfig
from uumamba.data.dataset import case_to_item, make_dataset
from uumamba.data.orientation import AXES_RULE, STACK_AXIS_RATIO, reorientation_transform
from uumamba.data.plan import ChannelNormalization, Plans
from uumamba.data.readers import DicomSeriesReader, SimpleITKReader
from uumamba.utils import plain_tensor

ANISOTROPY_RATIO = 3.0

__all__ = [
    "ForegroundOversampledCropd", "NormalizeFromPlan", "RecordIntensityStatisticsd",
    "case_to_item", "inference_transforms",
    "make_dataset", "sampling_geometry", "training_transforms", "validation_transforms",
]


# --------------------------------------------------------------------------------------------
# custom transforms


class NormalizeFromPlan(MapTransform):
    """Per-channel intensity normalisation as planned (nnU-Net's ZScore / CT schemes).

    ``zscore``: (x - mean(x)) / max(std(x), 1e-8) over the whole case and channel.
    ``ct``: clip to [clip_low, clip_high], then (x - mean) / max(std, 1e-8) with the plan's
    dataset-wide foreground statistics. Input and output ``(C, *spatial)`` float32.

    Raises:
        ValueError: the image has a different number of channels from the plan.
    """

    def __init__(self, keys: Sequence[str], normalization: Sequence[ChannelNormalization]):
        super().__init__(keys)
        self.normalization = list(normalization)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key].float()
            if image.shape[0] != len(self.normalization):
                raise ValueError(f"'{key}' has {image.shape[0]} channels; the plan normalises "
                                 f"{len(self.normalization)}")
            for c, norm in enumerate(self.normalization):
                x = image[c]
                if norm.scheme == "ct":
                    x = x.clamp(norm.clip_low, norm.clip_high)
                    mean, std = norm.mean, norm.std
                else:
                    mean, std = float(x.mean()), float(x.std(unbiased=False))
                image[c] = (x - mean) / max(std, 1e-8)
            d[key] = image
        return d


class RecordIntensityStatisticsd(MapTransform):
    """Store per-channel intensity statistics of ``key`` under ``key + "_statistics"``.

    Measured on the resampled, not yet normalised image (the scanner's own units), on at most
    :data:`STATISTICS_SAMPLES` voxels taken with a regular stride, so memory stays bounded:
    ``mean``, ``std``, ``min``, ``max``, ``p01`` / ``p99`` (percentiles 1 and 99),
    ``fraction_negative`` and ``neighbour_correlation`` (Pearson correlation of each voxel with
    its neighbour along axis 0 on a central block of at most 64³ voxels: about 0.9 for an MR or
    CT image, about 0 for pure noise, NaN for a constant image). Not invertible and changes
    nothing else, so ``Invertd`` passes over it. Used by
    :mod:`uumamba.inference.plausibility`.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_statistics"] = [_channel_statistics(c.float().numpy())
                                      for c in plain_tensor(d[key])]
        return d


#: Voxels sampled per channel for :class:`RecordIntensityStatisticsd`.
STATISTICS_SAMPLES = 1_000_000


def _channel_statistics(x: np.ndarray) -> dict[str, float]:
    step = max(1, int(math.ceil(x.size / STATISTICS_SAMPLES)))
    v = x.reshape(-1)[::step].astype(np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        finite = np.zeros(1)
    block = x[tuple(slice(max(0, n // 2 - 32), n // 2 + 32) for n in x.shape)].astype(np.float64)
    a, b = block[:-1].ravel(), block[1:].ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = float(np.corrcoef(a, b)[0, 1]) if a.size > 1 and a.std() > 0 and b.std() > 0 \
            else float("nan")
    p01, p99 = np.percentile(finite, [1.0, 99.0])
    return {"mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()),
            "max": float(finite.max()), "p01": float(p01), "p99": float(p99),
            "fraction_negative": float(np.mean(finite < 0)), "neighbour_correlation": corr}


class ForegroundOversampledCropd(Randomizable, MapTransform):
    """One patch per case: with probability ``fg_fraction`` centred on a random foreground
    class present in the label (``RandCropByLabelClassesd``), otherwise anywhere
    (``RandSpatialCropd``). nnU-Net's foreground oversampling, returning a single dict.

    Class locations come from ``indices_key`` (``ClassesToIndicesd`` output, computed once
    per case in the cached part of the pipeline); the key is removed from the output so
    batches collate.

    Args:
        keys: keys to crop (``image``, ``label``).
        indices_key: per-class flat voxel indices of the label map.
        spatial_size: patch size (voxels); images must be at least this large (pad first).
        num_classes: label values 0..num_classes-1 (background 0 is never chosen as centre).
        fg_fraction: probability of a foreground-centred patch (0..1).
        label_key: the label map key.

    Raises:
        ValueError: ``fg_fraction`` outside [0, 1].
    """

    def __init__(self, keys: Sequence[str], indices_key: str, spatial_size: Sequence[int],
                 num_classes: int, fg_fraction: float, label_key: str = "label"):
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction={fg_fraction}: expected a value in [0, 1]")
        self.indices_key = indices_key
        self.num_classes = num_classes
        self.fg_fraction = fg_fraction
        self.spatial_size = list(spatial_size)
        self.random_crop = RandSpatialCropd(keys, roi_size=self.spatial_size, random_size=False)
        self._foreground = False

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed this transform and its random crop."""
        super().set_random_state(seed, state)
        self.random_crop.set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:
        self._foreground = self.R.random_sample() < self.fg_fraction

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        self.randomize()
        indices = data[self.indices_key]
        present = [c for c in range(1, self.num_classes) if len(indices[c]) > 0]
        if self._foreground and present:
            ratios = [1.0 if c in present else 0.0 for c in range(self.num_classes)]
            crop = RandCropByLabelClassesd(
                self.keys, label_key=self.label_key, spatial_size=self.spatial_size,
                ratios=ratios, num_classes=self.num_classes, num_samples=1,
                indices_key=self.indices_key, warn=False,
            )
            crop.set_random_state(state=self.R)
            out = crop(data)[0]
        else:
            out = self.random_crop(data)
        out = dict(out)
        out.pop(self.indices_key, None)
        for key in self.key_iterator(out):  # crops are views: detach them from the cache
            out[key] = out[key].clone()
        return out


# --------------------------------------------------------------------------------------------
# helpers


def is_anisotropic(plans: Plans) -> bool:
    """True when the coarsest target spacing exceeds 3x the finest."""
    spacing = plans.target_spacing
    return max(spacing) > ANISOTROPY_RATIO * min(spacing)


def sampling_geometry(plans: Plans) -> tuple[list[int], int | None]:
    """The 3D crop size of a training patch and the axis to squeeze afterwards.

    3D models: ``(plans.patch_size, None)``. 2D models: the in-plane patch placed on
    ``plans.in_plane_axes`` with size 1 along ``plans.slice_axis``, and the channel-first
    tensor axis (``1 + slice_axis``) that ``SqueezeDimd`` removes to give ``(C, H, W)``.
    """
    if plans.spatial_dims == 3:
        return list(plans.patch_size), None
    size = [1, 1, 1]
    for axis, edge in zip(plans.in_plane_axes, plans.patch_size, strict=True):
        size[axis] = int(edge)
    return size, 1 + plans.slice_axis


def _rotation_axes(plans: Plans) -> list[int]:
    """Patch axes that rotations / scaling act on (all, or only the in-plane ones)."""
    if plans.spatial_dims == 2:
        return [0, 1]
    if is_anisotropic(plans):
        return list(plans.in_plane_axes)
    return [0, 1, 2]


def _enlarged(plans: Plans, aug: AugmentationConfig) -> list[int]:
    """Patch size enlarged where rotation can bring outside voxels into the patch."""
    if aug.p_spatial <= 0 or aug.rotate_deg <= 0:
        return list(plans.patch_size)
    theta = math.radians(min(aug.rotate_deg, 45.0))
    factor = math.cos(theta) + math.sin(theta)
    axes = _rotation_axes(plans)
    return [int(math.ceil(p * factor)) if a in axes else int(p)
            for a, p in enumerate(plans.patch_size)]


def _reader_transform(keys: list[str]) -> LoadImaged:
    # LoadImage tries readers in reverse order and picks the first whose suffix matches.
    return LoadImaged(keys, reader=[NibabelReader(), SimpleITKReader(), DicomSeriesReader()],
                      image_only=True)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return x != 0


def _signed(pipeline: Compose, kind: str, plans: Plans, **extra) -> Compose:
    """Attach ``cache_signature``: a digest of what the cached (deterministic) part of the
    pipeline depends on, so disk caches of different plans or pipelines never mix."""
    key = {"kind": kind, "plans": plans.model_dump(mode="json", exclude={"fingerprint"}),
           "resampling": plans.resampling_spacing, "stack_axis_ratio": STACK_AXIS_RATIO,
           "axes_rule": AXES_RULE, **extra}
    pipeline.cache_signature = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return pipeline


def _preprocessing(plans: Plans, with_label: bool, crop_foreground: bool,
                   record_statistics: bool = False) -> list:
    """Deterministic load -> orient -> resample -> (crop) -> [record statistics] -> normalise ->
    cast chain."""
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    chain = [
        _reader_transform(keys),
        EnsureChannelFirstd(keys),
        reorientation_transform(keys, plans.axcodes),
        Spacingd(keys, pixdim=plans.resampling_spacing, mode=modes),
    ]
    if crop_foreground:
        # no foreground_start/end_coord keys: nothing reads them, and PersistentDataset
        # returns them as numpy arrays on a cache miss but as tensors on a hit, so a batch
        # mixing fresh and cached cases could not be collated (train.cache=disk, first run)
        chain.append(CropForegroundd(keys, source_key="image", select_fn=_nonzero,
                                     allow_smaller=True, start_coord_key=None, end_coord_key=None))
    if record_statistics:
        chain.append(RecordIntensityStatisticsd("image"))
    chain.append(NormalizeFromPlan(["image"], plans.normalization))
    dtypes = [torch.float32, torch.uint8] if with_label else [torch.float32]
    chain.append(CastToTyped(keys, dtype=dtypes))
    return chain


def _augmentation(plans: Plans, aug: AugmentationConfig) -> list:
    """Spatial and intensity augmentation of a (possibly enlarged) patch -> patch_size."""
    keys = ["image", "label"]
    dims = plans.spatial_dims
    axes = _rotation_axes(plans)
    rot = math.radians(aug.rotate_deg)
    lo, hi = aug.scale_range
    if dims == 2:
        rotate_range: list = [(-rot, rot)]
    else:
        # MONAI's 3D angles: index i rotates in the plane orthogonal to axis i
        rotate_range = [(-rot, rot) if (len(axes) == 3 or i == plans.slice_axis) else (0.0, 0.0)
                        for i in range(3)]
    scale_range = [(lo - 1.0, hi - 1.0) if a in axes else (0.0, 0.0) for a in range(dims)]
    chain: list = []
    if aug.elastic:  # parameter values of MONAI's own 2D / 3D elastic examples
        if dims == 2:
            chain.append(Rand2DElasticd(keys, spacing=(30, 30), magnitude_range=(5, 6),
                                        prob=aug.p_spatial, mode=["bilinear", "nearest"],
                                        padding_mode="zeros"))
        else:
            chain.append(Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(100, 200),
                                        prob=aug.p_spatial, mode=["bilinear", "nearest"],
                                        padding_mode="zeros"))
    patch = list(plans.patch_size)
    affine = RandAffined(keys, spatial_size=patch, prob=1.0, rotate_range=rotate_range,
                         scale_range=scale_range, mode=["bilinear", "nearest"],
                         padding_mode="zeros")
    if aug.p_spatial >= 1.0:
        chain.append(affine)
    elif aug.p_spatial > 0.0:  # resample only when the affine fires; else a centre crop
        chain.append(OneOf([affine, CenterSpatialCropd(keys, roi_size=patch)],
                           weights=[aug.p_spatial, 1.0 - aug.p_spatial]))
    if aug.mirror:
        chain += [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(dims)]
    chain += [
        RandGaussianNoised(["image"], prob=aug.p_noise, mean=0.0, std=0.1),
        RandGaussianSmoothd(["image"], prob=aug.p_blur, sigma_x=(0.5, 1.0),
                            sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(["image"], factors=0.25, prob=aug.p_brightness),
        RandScaleIntensityFixedMeand(["image"], factors=0.25, prob=aug.p_contrast,
                                     preserve_range=True),
        RandAdjustContrastd(["image"], prob=aug.p_gamma, gamma=(0.7, 1.5)),
        RandSimulateLowResolutiond(["image"], prob=aug.p_lowres, zoom_range=(0.5, 1.0),
                                   upsample_mode="bilinear" if dims == 2 else "trilinear"),
    ]
    return chain


# --------------------------------------------------------------------------------------------
# public pipelines


def training_transforms(plans: Plans, train_cfg: TrainConfig) -> Compose:
    """Preprocessing + patch sampling + augmentation for training.

    Output per item: ``image`` ``(C, *plans.patch_size)`` float32 and ``label``
    ``(1, *plans.patch_size)`` uint8 (2D models: one slice along ``slice_axis``).
    """
    enlarged = _enlarged(plans, train_cfg.augmentation)
    crop_plan = plans.model_copy(update={"patch_size": enlarged})
    crop_size, squeeze_dim = sampling_geometry(crop_plan)
    keys = ["image", "label"]
    chain = _preprocessing(plans, with_label=True, crop_foreground=True)
    chain += [
        SpatialPadd(keys, spatial_size=crop_size),
        ClassesToIndicesd("label", indices_postfix="_cls_indices", num_classes=plans.num_classes,
                          max_samples_per_class=10_000),
        ForegroundOversampledCropd(keys, "label_cls_indices", crop_size, plans.num_classes,
                                   train_cfg.foreground_oversample),
    ]
    if squeeze_dim is not None:
        chain.append(SqueezeDimd(keys, dim=squeeze_dim))
    chain += _augmentation(plans, train_cfg.augmentation)
    chain.append(CastToTyped(keys, dtype=[torch.float32, torch.uint8]))
    pipeline = _signed(Compose(chain), "train", plans, crop=crop_size)
    pipeline.copies_cached_data = True  # the first random transform clones its output
    return pipeline


def validation_transforms(plans: Plans) -> Compose:
    """Whole preprocessed 3D volumes with labels: ``image`` ``(C, x, y, z)`` float32, ``label``
    ``(1, x, y, z)`` uint8, on the resampling grid (``plans.resampling_spacing``), cropped to
    the non-zero box."""
    return _signed(Compose(_preprocessing(plans, with_label=True, crop_foreground=True)),
                   "validation", plans)


def inference_transforms(plans: Plans, record_statistics: bool = False) -> Compose:
    """Image-only preprocessing, invertible with ``Invertd(orig_keys="image")``.

    Output: ``image`` ``(C, x, y, z)`` float32 MetaTensor on the resampling grid of the
    plan's axes (``plans.resampling_spacing``), carrying the applied operations that ``Invertd`` undoes (resampling,
    reorientation); with ``record_statistics`` also ``image_statistics``
    (:class:`RecordIntensityStatisticsd`, measured before normalisation).
    """
    chain = _preprocessing(plans, with_label=False, crop_foreground=False,
                           record_statistics=record_statistics)
    return _signed(Compose(chain), "inference", plans)
