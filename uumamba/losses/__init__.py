"""Training objective: soft Dice, cross-entropy and focal terms, their uncertainty-weighted
combination (UU-Mamba) and the deep-supervision wrapper.

- :class:`UncertaintyWeightedLoss` — ``uncertainty`` | ``fixed`` | ``dice_ce``.
- :class:`DeepSupervisionLoss` — weights 1/2^i, coarsest 0, normalised.
- :func:`build_loss` — both, from the ``loss`` config section.
"""

from uumamba.losses.build import build_loss
from uumamba.losses.deep_supervision import (
    DeepSupervisionLoss,
    deep_supervision_weights,
    downsample_target,
)
from uumamba.losses.terms import cross_entropy, focal_loss, soft_dice_loss
from uumamba.losses.uncertainty import UncertaintyWeightedLoss, optimal_sigma_sq

__all__ = [
    "DeepSupervisionLoss",
    "UncertaintyWeightedLoss",
    "build_loss",
    "cross_entropy",
    "deep_supervision_weights",
    "downsample_target",
    "focal_loss",
    "optimal_sigma_sq",
    "soft_dice_loss",
]
