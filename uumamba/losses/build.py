"""Build the training loss from the ``loss`` config section."""

from __future__ import annotations

from uumamba.config import LossConfig
from uumamba.errors import ConfigError
from uumamba.losses.deep_supervision import DeepSupervisionLoss
from uumamba.losses.uncertainty import UncertaintyWeightedLoss


def build_loss(
    loss_cfg: LossConfig, num_classes: int, ignore_label: int | None, n_outputs: int
) -> DeepSupervisionLoss:
    """:class:`DeepSupervisionLoss` over an :class:`UncertaintyWeightedLoss` built from config.

    Args:
        loss_cfg: ``loss`` section (name, focal_gamma, focal_alpha, batch_dice).
        num_classes: classes including background (``len(plans.labels)``).
        ignore_label: ``dataset.ignore_label`` (a label value scored by no term) or None.
        n_outputs: deep-supervision outputs of the network (1 without deep supervision).

    The learned sigma parameters are reachable via ``.parameters()`` / ``state_dict()`` of the
    returned module, and ``.sigmas()`` / ``.terms()`` forward to the inner loss.

    Raises:
        ConfigError: invalid values (e.g. ``loss.focal_alpha`` of the wrong length), naming
            the key.
    """
    try:
        inner = UncertaintyWeightedLoss(
            num_classes,
            name=loss_cfg.name,
            focal_gamma=loss_cfg.focal_gamma,
            focal_alpha=loss_cfg.focal_alpha,
            batch_dice=loss_cfg.batch_dice,
            ignore_index=ignore_label,
        )
        return DeepSupervisionLoss(inner, n_outputs)
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from None
