"""Inputs a model cannot have been trained for: flag them instead of returning a confident mask.

A network always returns *some* segmentation: an all-zero volume gets a "heart" of a few
hundred millilitres. Before the masks are trusted, :func:`assess_input` compares one input with
what the model was trained on (the plan's fingerprint, :class:`uumamba.data.plan.Fingerprint`)
and returns one sentence per problem:

- **blank or constant**: the intensity spread (percentile 99 − percentile 1) is 0, or the
  standard deviation is below 1e-6 of the intensity scale;
- **no spatial structure**: the correlation of neighbouring voxels is below
  :data:`MIN_NEIGHBOUR_CORRELATION` (pure noise is about 0, MR and CT images about 0.9);
- **intensities of another modality**: an MRI model (z-score normalisation, non-negative
  training intensities) given more than 5 % negative voxels (a CT in Hounsfield units); a CT
  model given an image whose percentile-1 intensity is above −200 HU (no air: not HU) or whose
  percentile 99 is above 4000;
- **spacing** more than :data:`SPACING_FACTOR` times finer or coarser than every training
  case along an axis (in the plan's axes; for a 2D model only in-plane, since it keeps each
  volume's own slices: ``Plans.resampling_spacing``);
- **field of view** in-plane smaller than :data:`MIN_FOV_FRACTION` of the training median
  (it cannot hold the anatomy).

The thresholds are deliberately loose: each flags inputs that are wrong by a large factor,
not a scanner that differs a little. The predictor applies the result per
``inference.input_check`` (``warn``, ``refuse``, ``off``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from uumamba.data.io import Geometry
from uumamba.data.orientation import spacing_and_shape_in_plan_axes
from uumamba.data.plan import Plans

MIN_NEIGHBOUR_CORRELATION = 0.3
SPACING_FACTOR = 4.0
MIN_FOV_FRACTION = 0.25
MAX_NEGATIVE_FRACTION_MRI = 0.05
#: How the warning of an image without anatomy begins (:mod:`uumamba.clinical` leaves such
#: frames out of an LV volume curve).
BLANK_WARNING = "the image is blank or constant"


def _spread_is_zero(stats: dict[str, float]) -> bool:
    scale = max(1.0, abs(stats["mean"]), abs(stats["max"]), abs(stats["min"]))
    return stats["p99"] - stats["p01"] <= 0.0 or stats["std"] <= 1e-6 * scale


def _intensity_problems(stats: dict[str, float], channel: int, plans: Plans) -> list[str]:
    tag = f" (channel {channel})" if plans.num_input_channels > 1 else ""
    if _spread_is_zero(stats):
        return [f"{BLANK_WARNING}{tag} (intensities {stats['min']:g} to "
                f"{stats['max']:g}): there is no anatomy to segment"]
    problems = []
    corr = stats["neighbour_correlation"]
    if math.isfinite(corr) and corr < MIN_NEIGHBOUR_CORRELATION:
        problems.append(f"the image has no spatial structure{tag} (neighbouring voxels "
                        f"correlate r = {corr:.2f}; images have about 0.9): noise?")
    fp = plans.fingerprint
    trained = fp.intensity[channel] if fp is not None and channel < len(fp.intensity) else None
    scheme = plans.normalization[channel].scheme if channel < len(plans.normalization) else None
    if scheme == "zscore" and (trained is None or trained.min >= 0) \
            and stats["fraction_negative"] > MAX_NEGATIVE_FRACTION_MRI:
        problems.append(f"{100 * stats['fraction_negative']:.0f} % of the voxels are negative"
                        f"{tag}; the {plans.modality} training images had none (a CT in "
                        "Hounsfield units?)")
    if scheme == "ct" and (stats["p01"] > -200.0 or stats["p99"] > 4000.0):
        problems.append(f"intensities from {stats['p01']:g} to {stats['p99']:g} (percentiles "
                        f"1-99){tag} are not CT Hounsfield units (air is about -1000 HU)")
    return problems


def _geometry_problems(geometry: Geometry, plans: Plans) -> list[str]:
    fp = plans.fingerprint
    if fp is None or not fp.spacings:
        return []
    spacing, shape = spacing_and_shape_in_plan_axes(geometry.affine_ras(), geometry.spacing,
                                                    geometry.shape, plans.axcodes)
    train_spacing, train_shape = np.asarray(fp.spacings), np.asarray(fp.shapes)
    problems = []
    low, high = train_spacing.min(axis=0), train_spacing.max(axis=0)
    checked = range(3) if plans.spatial_dims == 3 else plans.in_plane_axes
    for axis in checked:
        if spacing[axis] < low[axis] / SPACING_FACTOR or spacing[axis] > high[axis] * SPACING_FACTOR:
            problems.append(f"spacing {spacing[axis]:g} mm along axis {axis} is far outside the "
                            f"training range {low[axis]:g}-{high[axis]:g} mm")
    fov = spacing * shape
    train_fov = np.median(train_spacing * train_shape, axis=0)
    in_plane = [a for a in range(3) if a != plans.slice_axis]
    if any(fov[a] < MIN_FOV_FRACTION * train_fov[a] for a in in_plane):
        problems.append(f"the field of view ({' x '.join(f'{fov[a]:.0f}' for a in in_plane)} mm "
                        "in-plane) is much smaller than the training images' (median "
                        f"{' x '.join(f'{train_fov[a]:.0f}' for a in in_plane)} mm): it cannot "
                        "hold the anatomy")
    return problems


def assess_input(statistics: Sequence[dict[str, Any]], geometry: Geometry, plans: Plans
                 ) -> list[str]:
    """Reasons why the model cannot have been trained for this input (empty when none).

    Args:
        statistics: per channel, as :class:`uumamba.data.transforms.RecordIntensityStatisticsd`
            records them (resampled, not normalised).
        geometry: the input's geometry (spacing in mm, shape, direction).
        plans: the model's plan (fingerprint, normalisation, axes).

    Returns:
        One sentence per problem (see the module docstring), in a stable order.
    """
    problems: list[str] = []
    for c, stats in enumerate(statistics):
        problems.extend(_intensity_problems(stats, c, plans))
    problems.extend(_geometry_problems(geometry, plans))
    return problems
