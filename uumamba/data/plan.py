"""Experiment planning: dataset fingerprint -> ``plans.json`` (spacing, normalisation, patch,
network topology, batch size).

The rules follow nnU-Net v2's experiment planner (Isensee et al., Nature Methods 2021):

* fingerprint — voxel spacing and shape of every case in the plan's axes (its own voxel axes,
  the slice axis last; :mod:`uumamba.data.orientation`), and
  intensity statistics of foreground voxels (up to 10,000 sampled per case with a fixed seed);
* target spacing — per-axis median spacing; when the data are strongly anisotropic (largest
  median spacing > 3x the smallest, and that axis has < 1/3 the voxels of the largest other
  axis) the coarse axis takes the 10th percentile of its spacings instead (not below the
  in-plane spacing);
* normalisation — MRI: per-case z-score; CT: clip to the foreground 0.5 / 99.5 percentiles,
  then z-score with the foreground mean / std of the whole dataset;
* topology — starting from an isotropic-in-mm patch no larger than the median shape at target
  spacing, stages halve every axis whose feature map is still >= 8 voxels and whose spacing is
  < 2x the finest spacing of that stage (no pooling across coarse slices until the in-plane
  spacing has caught up); kernels are 3 along an axis once its spacing is within 2x of the
  finest and 1 before; the patch shrinks along its relatively largest axis until a batch of 2
  fits the activation-memory budget;
* 2D models plan in the plane orthogonal to ``slice_axis`` (the coarsest target-spacing axis).

CPU plans (``plan.target``: ``cpu``, or ``auto`` on a CPU). nnU-Net sizes its plan to GPU
memory; on a CPU time binds first (a GPU-sized 3D plan runs about a minute per iteration on 2
cores). The CPU plan therefore also fits a compute budget, ``plan.cpu_budget_s`` seconds per
training iteration by the deterministic cost model of :mod:`uumamba.data.cost` (counted from
the topology, never by timing the machine, so the plan is a function of the fingerprint, the
configuration and the budget). Only settings the configuration does not state are chosen
(pydantic's ``model_fields_set``: keys in the YAML file or ``--set``):

* ``model.spatial_dims``: 2 (slice-wise) when the target spacing is anisotropic (coarsest /
  finest > 3, :data:`ANISOTROPY_RATIO`), else 3;
* ``model.name``: ``umamba_bot`` (one Mamba layer at the bottleneck) instead of
  ``umamba_enc``;
* ``model.features``: base 16 doubling to at most 256 per stage (measured: fewer than 16
  channels per convolution is slower per operation on oneDNN, not faster);
* ``optim.name``: ``adamw`` (lr 2e-3, weight decay 1e-4 unless stated) instead of SAM /
  ASAM, whose second forward-backward pass halves the iterations a CPU can afford;
* patch and batch: 3D, the largest patch (shrunk from the median shape as for the GPU) whose
  batch of 2 fits the budget; 2D, the in-plane median shape and the largest batch (2 to 32,
  within nnU-Net's 5 %-of-the-data cap) that fits.

The choice, its reason and the estimated seconds per iteration are written to ``plans.json``
(``target``, ``decision``); :func:`apply_plan_decision` turns them into the run's
configuration. A ``plans.json`` without these fields (before 0.4) loads as a GPU plan.

Every planned value can be overridden from the ``plan`` config section. Planning is
deterministic: the same data and config give the same ``plans.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from uumamba.config import Config, DatasetConfig, ModelConfig, OptimConfig, PlanConfig
from uumamba.data.cost import iteration_cost, optimizer_passes
from uumamba.data.io import read_image
from uumamba.data.layouts import DatasetIndex
from uumamba.data.orientation import VOXEL_AXES, spacing_and_shape_in_plan_axes
from uumamba.errors import ConfigError, DataError
from uumamba.utils import atomic_path

MIN_FEATURE_MAP = 4  # smallest feature-map edge (voxels) at the bottleneck
MAX_STAGES = {2: 7, 3: 6}  # resolution stages (poolings + 1) when model.features is unset
INTENSITY_SAMPLES_PER_CASE = 10_000
ANISOTROPY_RATIO = 3.0
#: CPU plans: model and optimizer settings chosen when the configuration does not state them.
CPU_MODEL = {"name": "umamba_bot", "base_features": 16, "max_features": 256}
CPU_OPTIM = {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4}
CPU_BATCH_3D = 2
CPU_MIN_PATCH = 16  # smallest edge (voxels) the CPU plan shrinks a 3D patch axis to


class ChannelNormalization(BaseModel):
    """Intensity normalisation of one input channel.

    Attributes:
        scheme: ``zscore`` (per case: (x - mean_case) / std_case) or ``ct`` (clip to
            [clip_low, clip_high], then (x - mean) / std with dataset-wide values).
        clip_low, clip_high, mean, std: dataset statistics for ``ct``; ``None`` for ``zscore``.
    """

    model_config = ConfigDict(extra="forbid")

    scheme: Literal["zscore", "ct"]
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None


class IntensityStats(BaseModel):
    """Foreground intensity statistics of one channel (sampled voxels, all cases)."""

    model_config = ConfigDict(extra="forbid")

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


class Fingerprint(BaseModel):
    """What planning measured on the dataset (in the plan's axes, spacings in mm)."""

    model_config = ConfigDict(extra="forbid")

    case_ids: list[str]
    spacings: list[list[float]]
    shapes: list[list[int]]
    intensity: list[IntensityStats]
    median_shape_at_target: list[float]


class PlanDecision(BaseModel):
    """What the plan was sized for and what it chose beyond the preprocessing.

    Attributes:
        reason: one sentence: the target, why, and the choices (also logged).
        model: ``model`` settings the plan chose (``spatial_dims``, ``name``, ``features``);
            applied to the run's configuration by :func:`apply_plan_decision`.
        optim: ``optim`` settings the plan chose (``name``, ``lr``, ``weight_decay``).
        budget_seconds: ``plan.cpu_budget_s`` of a CPU plan (None for GPU plans).
        estimated_seconds_per_iteration: the cost model's estimate for the reference
            2-core machine (:mod:`uumamba.data.cost`).
    """

    model_config = ConfigDict(extra="forbid")

    reason: str
    model: dict[str, Any] = Field(default_factory=dict)
    optim: dict[str, Any] = Field(default_factory=dict)
    budget_seconds: float | None = None
    estimated_seconds_per_iteration: float | None = None


class Plans(BaseModel):
    """The preprocessing and network plan of a model (``plans.json``).

    Attributes:
        spatial_dims: 2 (slice-wise model) or 3.
        modality: ``MRI`` or ``CT``.
        labels: label value -> name, background (0) included.
        num_input_channels: image channels per case.
        axcodes: how every volume is reoriented before resampling: ``voxel`` (its own voxel
            axes, the slice axis last, no flips: :mod:`uumamba.data.orientation`; plans since
            0.2) or a MONAI axcodes string (``RAS``: plans of 0.1, kept for their networks).
        target_spacing: voxel spacing in mm along the reoriented axes 0, 1, 2 (``voxel``: the
            two in-plane axes, then the slice axis).
        slice_axis: axis (0, 1, 2 of the oriented volume) with the coarsest target spacing; 2D
            models see slices orthogonal to it.
        normalization: one entry per input channel.
        patch_size: training patch in voxels, ``spatial_dims`` values (2D: the two in-plane
            axes in increasing axis order).
        strides: per stage, the downsampling factor along each patch axis (stage 0: all 1).
        kernel_sizes: per stage, the convolution kernel size along each patch axis.
        batch_size: patches per iteration.
        fingerprint: the dataset measurements planning used.
        target: ``gpu`` (sized to memory) or ``cpu`` (also to a time budget); plans written
            before 0.4 have none and load as ``gpu``.
        decision: the reason and the model / optimizer choices (None in older plans).
    """

    model_config = ConfigDict(extra="forbid")

    spatial_dims: Literal[2, 3]
    modality: Literal["MRI", "CT"]
    labels: dict[int, str]
    num_input_channels: int = Field(ge=1)
    axcodes: str = "RAS"
    target_spacing: list[float] = Field(min_length=3, max_length=3)
    slice_axis: int = Field(ge=0, le=2)
    normalization: list[ChannelNormalization]
    patch_size: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    batch_size: int = Field(ge=1)
    fingerprint: Fingerprint | None = None
    target: Literal["gpu", "cpu"] = "gpu"
    decision: PlanDecision | None = None

    @property
    def num_classes(self) -> int:
        """Output channels of the network: highest label value + 1."""
        return max(self.labels) + 1

    @property
    def resampling_spacing(self) -> list[float]:
        """The spacing (mm, plan axes) the preprocessing resamples to: ``target_spacing`` for
        3D models; for 2D models the in-plane target with ``0.0`` along ``slice_axis``, which
        MONAI's ``Spacing`` reads as "keep the volume's own spacing" (a non-positive
        ``pixdim``). A 2D network never looks across slices, so its input keeps every slice
        the scanner acquired: a 1.4 mm isotropic volume is segmented on its own slices, not
        averaged onto the 10 mm training grid and copied back in blocks (nnU-Net's 2D
        configuration keeps the out-of-plane spacing the same way)."""
        if self.spatial_dims == 3:
            return list(self.target_spacing)
        return [0.0 if axis == self.slice_axis else float(t)
                for axis, t in enumerate(self.target_spacing)]

    @property
    def in_plane_axes(self) -> tuple[int, int]:
        """The two oriented-volume axes a 2D model sees (those other than ``slice_axis``)."""
        axes = tuple(a for a in range(3) if a != self.slice_axis)
        return axes[0], axes[1]

    def save(self, path: str | Path) -> None:
        """Write the plan as indented JSON, atomically."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plans:
        """Read a ``plans.json``.

        Raises:
            ConfigError: the file is missing, not JSON, or has unknown / invalid fields
                (the message names the file and the fields).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read plans: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"{path}: invalid plans: {fields}") from None


# --------------------------------------------------------------------------------------------
# fingerprint


def fingerprint_dataset(index: DatasetIndex, ignore_label: int | None = None,
                        axcodes: str = VOXEL_AXES) -> Fingerprint:
    """Measure spacings, shapes (in the plan's axes, see ``axcodes``) and foreground intensities
    of every case.

    Intensities: up to 10,000 foreground voxels (label > 0, ``ignore_label`` excluded) per case
    and channel, drawn with a generator seeded by the case's position, so the result is
    deterministic.

    Raises:
        DataError: an image is unreadable or not 3D (run the integrity check first).
    """
    spacings, shapes, samples = [], [], [[] for _ in range(index.num_channels)]
    for i, case in enumerate(index.cases):
        label, _ = read_image(case.label)
        foreground = label > 0
        if ignore_label is not None:
            foreground &= label != ignore_label
        for c, image_path in enumerate(case.images):
            image, geom = read_image(image_path)
            if image.ndim != 3:
                raise DataError(f"{image_path}: planning needs 3D images, got shape {image.shape}")
            if c == 0:
                spacing, shape = spacing_and_shape_in_plan_axes(geom.affine_ras(), geom.spacing,
                                                                image.shape, axcodes)
                spacings.append([float(s) for s in spacing])
                shapes.append([int(s) for s in shape])
            values = image[foreground] if foreground.shape == image.shape else image.ravel()
            rng = np.random.default_rng(i)
            if values.size > INTENSITY_SAMPLES_PER_CASE:
                values = rng.choice(values, INTENSITY_SAMPLES_PER_CASE, replace=False)
            samples[c].append(values.astype(np.float64))
    stats = []
    for channel_samples in samples:
        v = np.concatenate(channel_samples) if channel_samples else np.zeros(1)
        v = v if v.size else np.zeros(1)
        stats.append(IntensityStats(
            mean=float(v.mean()), std=float(v.std()), median=float(np.median(v)),
            min=float(v.min()), max=float(v.max()),
            percentile_00_5=float(np.percentile(v, 0.5)),
            percentile_99_5=float(np.percentile(v, 99.5)),
        ))
    return Fingerprint(case_ids=[c.id for c in index.cases], spacings=spacings, shapes=shapes,
                       intensity=stats, median_shape_at_target=[])


def target_spacing_from(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Median spacing per axis, with nnU-Net's rule for the coarse axis of anisotropic data.

    Args:
        spacings: (n_cases, 3) mm. shapes: (n_cases, 3) voxels.

    Returns:
        (3,) target spacing in mm.
    """
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    median_shape = np.median(shapes, axis=0)
    anisotropic = target[coarse] > ANISOTROPY_RATIO * target[others].min()
    few_slices = median_shape[coarse] * ANISOTROPY_RATIO < median_shape[others].max()
    if anisotropic and few_slices:
        low = np.percentile(spacings[:, coarse], 10)
        target[coarse] = max(low, target[others].max() + 1e-5)
    return target


def choose_slice_axis(target_spacing: list[float] | np.ndarray) -> int:
    """The axis with the coarsest spacing (ties: the highest axis index, i.e. z for isotropic)."""
    spacing = np.asarray(target_spacing, dtype=float)
    return int(np.flatnonzero(spacing == spacing.max())[-1])


# --------------------------------------------------------------------------------------------
# topology and memory


def plan_topology(spacing: list[float], patch: list[int], n_stages: int | None,
                  fixed_patch: bool) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Strides and kernel sizes per stage for a patch (nnU-Net's anisotropy-aware pooling).

    Args:
        spacing: voxel spacing (mm) along each patch axis.
        patch: patch size (voxels) along each patch axis.
        n_stages: exact number of stages (``model.features`` length); ``None``: as many as
            the feature map allows, up to :data:`MAX_STAGES`.
        fixed_patch: the patch is user-given: only pool axes whose size stays integral; else
            the returned patch is rounded up so every axis divides by its total stride.

    Returns:
        ``(patch, strides, kernel_sizes)``. Stages beyond what the feature map allows (when
        ``n_stages`` asks for more) get stride 1 on every axis.
    """
    dims = len(spacing)
    max_stages = n_stages if n_stages is not None else MAX_STAGES[dims]
    cur_spacing = [float(s) for s in spacing]
    cur_size = [int(p) for p in patch]
    kernel = [1] * dims

    def update_kernel() -> list[int]:
        finest = min(cur_spacing)
        for a in range(dims):
            if cur_spacing[a] / finest < 2:
                kernel[a] = 3
        return list(kernel)

    strides, kernels = [[1] * dims], [update_kernel()]
    while len(strides) < max_stages:
        big_enough = [a for a in range(dims) if cur_size[a] >= 2 * MIN_FEATURE_MAP
                      and (not fixed_patch or cur_size[a] % 2 == 0)]
        finest = min((cur_spacing[a] for a in big_enough), default=0.0)
        pool = [a for a in big_enough if cur_spacing[a] / finest < 2]
        if not pool and n_stages is None:
            break
        stride = [2 if a in pool else 1 for a in range(dims)]
        for a in pool:
            cur_spacing[a] *= 2
            cur_size[a] = math.ceil(cur_size[a] / 2)
        strides.append(stride)
        kernels.append(update_kernel() if pool else list(kernel))
    total = np.prod(np.asarray(strides), axis=0)
    if not fixed_patch:
        patch = [int(math.ceil(p / t) * t) for p, t in zip(patch, total, strict=True)]
    return [int(p) for p in patch], strides, kernels


def stage_features(model_cfg: ModelConfig, n_stages: int) -> list[int]:
    """Channels per stage: ``model.features`` or min(base_features * 2^s, max_features)."""
    if model_cfg.features is not None:
        return list(model_cfg.features)
    return [min(model_cfg.base_features * 2**s, model_cfg.max_features) for s in range(n_stages)]


def estimate_memory_mb(patch: list[int], strides: list[list[int]], features: list[int],
                       model_cfg: ModelConfig, batch_size: int) -> float:
    """Rough activation memory (MB, float32) of one training forward/backward pass.

    Counts, per stage, the feature maps kept for the backward pass: about four tensors per
    convolution (conv, norm, activation, residual) in the encoder (two convolutions per block)
    and the decoder (plus upsampling and the skip concatenation), and for Mamba layers the
    expanded tokens and the scan's state (d_inner x d_state per token for the torch scan).
    It ranks candidate patches; it is not an allocator prediction.
    """
    voxels = float(np.prod(patch))
    blocks = model_cfg.n_blocks_per_stage
    total = 0.0
    for s, stride in enumerate(strides):
        voxels /= float(np.prod(stride))
        n_blocks = blocks[min(s, len(blocks) - 1)] if isinstance(blocks, list) else blocks
        per_voxel = 4 * 2 * n_blocks * features[s]
        if s < len(strides) - 1:
            per_voxel += (4 * model_cfg.n_conv_per_stage_decoder + 3) * features[s]
        mamba_here = (model_cfg.name == "umamba_enc"
                      or (model_cfg.name == "umamba_bot" and s == len(strides) - 1))
        if mamba_here:
            d_inner = model_cfg.expand * features[s]
            per_voxel += d_inner * (6 + model_cfg.d_state)
        total += voxels * per_voxel
    return total * batch_size * 4 / 2**20


# --------------------------------------------------------------------------------------------
# the planner


def _fit_patch(spacing: list[float], median_shape: np.ndarray, cap: list[int] | None,
               n_stages: int | None, model_cfg: ModelConfig, budget_mb: float,
               time_fits: Callable[[list[int], list[list[int]], list[list[int]], list[int]],
                                   bool] | None = None
               ) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Largest patch (<= median shape, <= cap) whose batch of 2 fits ``budget_mb`` (and, for
    CPU plans, ``time_fits(patch, strides, kernels, features)``)."""
    dims = len(spacing)
    inv = 1.0 / np.asarray(spacing)
    start_edge = 256 if dims == 3 else 2048
    patch = inv * (start_edge**dims / np.prod(inv)) ** (1.0 / dims)  # isotropic in mm
    patch = np.minimum(np.round(patch), np.ceil(median_shape)).astype(int)
    if cap is not None:
        patch = np.minimum(patch, cap)
    patch = np.maximum(patch, 1)
    while True:
        rounded, strides, kernels = plan_topology(spacing, list(patch), n_stages, False)
        if cap is not None and any(r > c for r, c in zip(rounded, cap, strict=True)):
            total = np.prod(np.asarray(strides), axis=0)
            rounded = [max(int(t), int(c // t * t)) for c, t in zip(cap, total, strict=True)]
        features = stage_features(model_cfg, len(strides))
        if len(features) < len(strides):
            raise ConfigError(f"model.features has {len(features)} stages; the plan needs "
                              f"{len(strides)}")
        if (estimate_memory_mb(rounded, strides, features, model_cfg, 2) <= budget_mb
                and (time_fits is None or time_fits(rounded, strides, kernels, features))):
            return rounded, strides, kernels
        # shrink the axis that is largest relative to the median shape by its total stride
        steps = np.prod(np.asarray(strides), axis=0)
        floor = steps if time_fits is None else np.maximum(steps, CPU_MIN_PATCH)
        shrinkable = patch > floor
        if not shrinkable.any():
            return rounded, strides, kernels  # smallest patch the topology allows
        ratio = np.where(shrinkable, patch / np.maximum(median_shape, 1), -np.inf)
        axis = int(np.argmax(ratio))
        patch[axis] = patch[axis] - int(steps[axis])


def _batch_size(patch: list[int], strides, features, model_cfg: ModelConfig, budget_mb: float,
                dataset_voxels: float, spatial_dims: int) -> int:
    """Patches per batch: as many as the budget allows, within nnU-Net's 5%-of-data cap."""
    per_sample = estimate_memory_mb(patch, strides, features, model_cfg, 1)
    by_budget = int(budget_mb // max(per_sample, 1e-6))
    by_data = int(0.05 * dataset_voxels / float(np.prod(patch)))
    low, high = (2, 32) if spatial_dims == 2 else (2, 16)
    return int(np.clip(min(by_budget, max(by_data, low)), low, high))


def _normalization(modality: str, override: str | None,
                   stats: list[IntensityStats]) -> list[ChannelNormalization]:
    scheme = override or ("ct" if modality == "CT" else "zscore")
    if scheme == "zscore":
        return [ChannelNormalization(scheme="zscore") for _ in stats]
    return [ChannelNormalization(scheme="ct", clip_low=s.percentile_00_5,
                                 clip_high=s.percentile_99_5, mean=s.mean,
                                 std=max(s.std, 1e-8)) for s in stats]


def resolve_target(target: str, device_type: str) -> Literal["gpu", "cpu"]:
    """``plan.target`` for a training device: ``auto`` is ``cpu`` on a CPU, else ``gpu``."""
    if target in ("gpu", "cpu"):
        return target  # type: ignore[return-value]
    return "cpu" if device_type == "cpu" else "gpu"


def _cpu_choices(model_cfg: ModelConfig, optim_cfg: OptimConfig,
                 target_spacing: np.ndarray, plan_cfg: PlanConfig | None = None,
                 ) -> tuple[ModelConfig, dict[str, Any], dict[str, Any], list[str]]:
    """The CPU plan's model and optimizer settings for what the configuration leaves open.

    A stated 3-value ``plan.patch_size`` / ``plan.max_patch_size`` states a 3D model (2D
    is then not chosen).

    Returns:
        ``(model_cfg to plan with, model choices, optimizer choices, reasons)``.
    """
    given_model, given_optim = model_cfg.model_fields_set, optim_cfg.model_fields_set
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    why: list[str] = []
    ratio = float(target_spacing.max() / target_spacing.min())
    patch_3d = plan_cfg is not None and any(
        value is not None and len(value) == 3
        for value in (getattr(plan_cfg, "patch_size", None), getattr(plan_cfg, "max_patch_size", None)))
    if "spatial_dims" not in given_model and patch_3d:
        model["spatial_dims"] = 3
        why.append("3D: the configuration states a 3-value patch")
    elif "spatial_dims" not in given_model:
        model["spatial_dims"] = 2 if ratio > ANISOTROPY_RATIO else 3
        why.append(f"{model['spatial_dims']}D: the target spacing is "
                   + (f"anisotropic (ratio {ratio:.1f} > {ANISOTROPY_RATIO:g}), slice-wise "
                      "training" if ratio > ANISOTROPY_RATIO
                      else f"near-isotropic (ratio {ratio:.1f}), a small 3D network"))
    if "name" not in given_model and model_cfg.name == "umamba_enc":
        model["name"] = "umamba_bot"
        why.append("umamba_bot instead of umamba_enc (one Mamba layer)")
    sizing = {k: v for k, v in CPU_MODEL.items() if k != "name" and k not in given_model}
    if "features" in given_model:
        sizing = {}
    planned = model_cfg.model_copy(update={**model, **sizing})
    if sizing:
        why.append(f"features from {planned.base_features} up to {planned.max_features}")
    if "name" not in given_optim and optim_cfg.name in ("sam", "asam"):
        optim = {k: v for k, v in CPU_OPTIM.items() if k == "name" or k not in given_optim}
        why.append(f"adamw instead of {optim_cfg.name} (one forward-backward pass per "
                   "iteration, not two)")
    return planned, model, optim, why


def plan_dataset(index: DatasetIndex, dataset_cfg: DatasetConfig, plan_cfg: PlanConfig,
                 model_cfg: ModelConfig, optim_cfg: OptimConfig | None = None,
                 device_type: str = "cuda") -> Plans:
    """Plan preprocessing and network topology for a dataset (see the module docstring).

    Labels: ``dataset.labels`` or the dataset's own metadata. Modality: ``dataset.modality``
    when the config sets it, else the layout's, else the config default.

    Args:
        index / dataset_cfg / plan_cfg / model_cfg: the dataset and the configuration.
        optim_cfg: the optimizer settings (a CPU plan replaces an unstated SAM by AdamW);
            None: the defaults.
        device_type: the training device's type (``cpu``, ``cuda``); decides
            ``plan.target: auto``.

    Raises:
        DataError: unreadable images, or no labels declared anywhere.
        ConfigError: an override has the wrong length, or ``model.features`` has fewer
            stages than a user-given patch size needs.
    """
    labels = dataset_cfg.labels or index.labels
    if not labels:
        raise DataError(f"{index.root}: the dataset declares no labels; set dataset.labels in "
                        "the config (e.g. {0: background, 1: LV})")
    if "modality" in dataset_cfg.model_fields_set or index.modality is None:
        modality = dataset_cfg.modality
    else:
        modality = index.modality
    optim_cfg = optim_cfg if optim_cfg is not None else OptimConfig()

    axcodes = VOXEL_AXES if plan_cfg.reorientation == "voxel" else "RAS"
    fp = fingerprint_dataset(index, dataset_cfg.ignore_label, axcodes)
    spacings, shapes = np.asarray(fp.spacings), np.asarray(fp.shapes)
    if plan_cfg.target_spacing is not None:
        if len(plan_cfg.target_spacing) != 3:
            raise ConfigError(f"plan.target_spacing: expected 3 values (x, y, z mm), got "
                              f"{plan_cfg.target_spacing}")
        target = np.asarray(plan_cfg.target_spacing, dtype=float)
    else:
        target = target_spacing_from(spacings, shapes)
    median_shape = np.median(shapes * spacings / target[None, :], axis=0)
    fp.median_shape_at_target = [round(float(s), 2) for s in median_shape]
    slice_axis = choose_slice_axis(target)
    dataset_voxels = float(np.sum(np.prod(shapes * spacings / target[None, :], axis=1)))

    kind = resolve_target(plan_cfg.target, device_type)
    model_choice: dict[str, Any] = {}
    optim_choice: dict[str, Any] = {}
    if kind == "cpu":
        model_cfg, model_choice, optim_choice, why = _cpu_choices(model_cfg, optim_cfg, target, plan_cfg)
        optim_name = optim_choice.get("name", optim_cfg.name)
    else:
        why, optim_name = [], optim_cfg.name
    dims = model_cfg.spatial_dims
    num_classes = max(labels) + 1

    def cost(patch: list[int], strides: list[list[int]], kernels: list[list[int]],
             features: list[int], batch: int) -> float:
        return iteration_cost(
            patch, strides, kernels, features, in_channels=index.num_channels,
            num_classes=num_classes, batch_size=batch, model_name=model_cfg.name,
            n_blocks=model_cfg.n_blocks_per_stage,
            n_conv_decoder=model_cfg.n_conv_per_stage_decoder, d_state=model_cfg.d_state,
            expand=model_cfg.expand, d_conv=model_cfg.d_conv,
            passes=optimizer_passes(optim_name, looksam_k=optim_cfg.looksam_k,
                                    sam_probability=optim_cfg.sam_probability)).seconds

    budget_s = plan_cfg.cpu_budget_s
    batch_fixed = plan_cfg.batch_size
    first_batch = batch_fixed or (CPU_BATCH_3D if dims == 3 else 2)

    def time_fits(patch: list[int], strides: list[list[int]], kernels: list[list[int]],
                  features: list[int]) -> bool:
        return cost(patch, strides, kernels, features, first_batch) <= budget_s

    axes = [a for a in range(3) if a != slice_axis] if dims == 2 else [0, 1, 2]
    spacing_p = [float(target[a]) for a in axes]
    median_p = median_shape[axes]
    n_stages = len(model_cfg.features) if model_cfg.features is not None else None
    cap = plan_cfg.max_patch_size
    if cap is not None and len(cap) != dims:
        raise ConfigError(f"plan.max_patch_size: expected {dims} values, got {cap}")

    if plan_cfg.patch_size is not None:
        if len(plan_cfg.patch_size) != dims:
            raise ConfigError(f"plan.patch_size: expected {dims} values for a {dims}D model, "
                              f"got {plan_cfg.patch_size}")
        patch, strides, kernels = plan_topology(spacing_p, list(plan_cfg.patch_size), n_stages,
                                                True)
    else:
        patch, strides, kernels = _fit_patch(spacing_p, median_p, cap, n_stages, model_cfg,
                                             plan_cfg.memory_budget_mb,
                                             time_fits if kind == "cpu" else None)
    features = stage_features(model_cfg, len(strides))
    if batch_fixed is not None:
        batch = batch_fixed
    else:
        batch = _batch_size(patch, strides, features, model_cfg, plan_cfg.memory_budget_mb,
                            dataset_voxels, dims)
        if kind == "cpu":
            fitting = [b for b in range(2, batch + 1)
                       if cost(patch, strides, kernels, features, b) <= budget_s]
            batch = fitting[-1] if fitting and dims == 2 else min(batch, first_batch)
    seconds = cost(patch, strides, kernels, features, batch)
    if kind == "cpu":
        if "features" not in model_cfg.model_fields_set:
            model_choice["features"] = features
        fits = "within" if seconds <= budget_s else (
            "over: plan.patch_size / batch_size are stated" if plan_cfg.patch_size or batch_fixed
            else "over: the smallest patch the topology allows")
        how = "auto: training on a CPU" if plan_cfg.target == "auto" else "asked"
        reason = (f"plan.target cpu ({how}): sized to {budget_s:g} s per iteration on the "
                  f"reference 2-core CPU, estimated {seconds:.2f} s ({fits}); {dims}D patch "
                  f"{patch}, batch {batch}" + ("; " + "; ".join(why) if why else ""))
    else:
        how = "auto: training on a GPU" if plan_cfg.target == "auto" else "asked"
        reason = (f"plan.target gpu ({how}): sized to {plan_cfg.memory_budget_mb:g} MB of "
                  "activation memory (nnU-Net's rules)")
    decision = PlanDecision(reason=reason, model=model_choice, optim=optim_choice,
                            budget_seconds=budget_s if kind == "cpu" else None,
                            estimated_seconds_per_iteration=round(seconds, 3))
    return Plans(
        spatial_dims=dims, modality=modality, labels=dict(sorted(labels.items())),
        num_input_channels=index.num_channels, axcodes=axcodes,
        target_spacing=[round(float(t), 6) for t in target], slice_axis=slice_axis,
        normalization=_normalization(modality, plan_cfg.normalization, fp.intensity),
        patch_size=patch, strides=strides, kernel_sizes=kernels, batch_size=int(batch),
        fingerprint=fp, target=kind, decision=decision,
    )


def apply_plan_decision(cfg: Config, plans: Plans) -> Config:
    """The run's configuration with the plan's model and optimizer choices
    (``plans.decision``) for every key ``cfg`` does not state itself.

    Idempotent, and a no-op for plans without a decision (GPU plans, plans before 0.4). A
    configuration that states a key differently from the plan keeps its own value (the model
    folder's ``config.yaml`` check then names the difference).
    """
    decision = plans.decision
    if decision is None or not (decision.model or decision.optim):
        return cfg
    update: dict[str, Any] = {}
    for section, chosen in (("model", decision.model), ("optim", decision.optim)):
        current = getattr(cfg, section)
        missing = {k: v for k, v in chosen.items() if k not in current.model_fields_set}
        if missing:
            update[section] = type(current).model_validate(
                {**current.model_dump(exclude_unset=True), **missing})
    return cfg.model_copy(update=update) if update else cfg
