"""The three loss terms of UU-Mamba on softmax probabilities: soft Dice, cross-entropy, focal.

Every function here takes the same prepared inputs (see :func:`prepare`):

- ``log_probs``: (B, C, *S) float32 log-softmax of the logits over the class axis 1;
- ``labels``: (B, 1, *S) int64 class indices in ``[0, C)`` (ignored voxels set to 0);
- ``valid``: (B, 1, *S) float32, 1 where the voxel counts and 0 where it carries the ignore
  label, so an ignored voxel contributes to no term and receives no gradient.

Each term is non-negative and finite for any finite logits, including classes absent from the
batch (smoothed Dice, log-softmax instead of log of a probability). Source: UU-Mamba (Tsai et
al. 2024, Sec. 2.2) — region (Dice), distribution (cross-entropy) and pixel (focal) terms;
Dice as in nnU-Net / MONAI ``DiceLoss`` (background excluded, smoothing 1e-5), focal loss as in
Lin et al. 2017 (Eq. 5, ``FL = -alpha_t (1 - p_t)^gamma log p_t``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DICE_SMOOTH = 1e-5


def prepare(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes and return ``(log_probs, labels, valid)`` as described in the module doc.

    Args:
        logits: (B, C, *S) float (any float dtype; the terms are computed in float32).
        target: (B, 1, *S) integer-valued labels, float or integer tensor.
        num_classes: C, the number of classes including background (>= 2).
        ignore_index: a label value excluded from every term, or None.

    Raises:
        ValueError: wrong number of channels, target shape not (B, 1, *S) matching the logits,
            or a label outside ``[0, C)`` that is not ``ignore_index`` (names the values).
    """
    if logits.ndim < 3 or logits.shape[1] != num_classes:
        raise ValueError(
            f"logits: expected shape (B, {num_classes}, *spatial), got {tuple(logits.shape)}"
        )
    expected = (logits.shape[0], 1, *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target: expected shape {expected} (B, 1, *spatial) matching the logits, "
            f"got {tuple(target.shape)}"
        )
    labels = target.round().long() if target.is_floating_point() else target.long()
    if ignore_index is None:
        valid_bool = torch.ones_like(labels, dtype=torch.bool)
    else:
        valid_bool = labels != ignore_index
    out_of_range = valid_bool & ((labels < 0) | (labels >= num_classes))
    if bool(out_of_range.any()):
        found = sorted(set(labels[out_of_range].unique().tolist()))[:10]
        raise ValueError(
            f"target: label values {found} outside [0, {num_classes - 1}] "
            f"(num_classes={num_classes}, ignore_index={ignore_index})"
        )
    labels = torch.where(valid_bool, labels, torch.zeros_like(labels))
    log_probs = torch.log_softmax(logits.float(), dim=1)
    return log_probs, labels, valid_bool.float()


def _mean_over_valid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, 1, *S) over valid voxels; 0 when no voxel is valid."""
    return (values * valid).sum() / valid.sum().clamp_min(1.0)


def cross_entropy(
    log_probs: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy ``-log p_t`` averaged over valid voxels; scalar float32, >= 0.

    Same value as ``torch.nn.functional.cross_entropy(logits, labels, ignore_index=...)``.
    """
    return _mean_over_valid(-log_probs.gather(1, labels), valid)


def focal_loss(
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    gamma: float = 2.0,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` averaged over valid voxels; scalar, >= 0.

    Args:
        gamma: focusing parameter (>= 0; 0 gives cross-entropy).
        alpha: optional (C,) float per-class weights; ``alpha_t`` is the weight of the voxel's
            true class. The mean is over voxels (not normalised by the alpha sum), as in
            Lin et al. 2017 Eq. 5 and MONAI ``FocalLoss`` with softmax.
    """
    log_pt = log_probs.gather(1, labels)
    # 1 - p_t is >= 0 because log_softmax <= 0; the floor keeps d/dp of (1-p)^gamma finite for
    # gamma < 1 when a voxel is classified with probability exactly 1.
    modulating = (1.0 - log_pt.exp()).clamp_min(1e-12).pow(gamma)
    values = -modulating * log_pt
    if alpha is not None:
        values = values * alpha.to(values.dtype)[labels]
    return _mean_over_valid(values, valid)


def soft_dice_loss(
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    batch_dice: bool = True,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """Soft Dice loss ``1 - mean Dice`` over the foreground classes 1..C-1; scalar in [0, 1].

    Per class, ``Dice = (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)`` with ``p`` the
    softmax probability and ``g`` the one-hot target, both zeroed at ignored voxels.

    Args:
        batch_dice: True: sums run over the batch and spatial axes, giving one Dice per class
            (nnU-Net "batch Dice"; stable when a class is absent from single patches).
            False: one Dice per (sample, class), then the mean over samples and classes.
        smooth: added to numerator and denominator (nnU-Net / MONAI use 1e-5); a class absent
            from target and prediction has Dice 1, and gradients stay finite.
    """
    probs = log_probs.exp() * valid
    one_hot = torch.zeros_like(probs).scatter_(1, labels, 1.0) * valid
    axes: Sequence[int] = (0, *range(2, probs.ndim)) if batch_dice else tuple(range(2, probs.ndim))
    intersection = (probs * one_hot).sum(dim=axes)
    denominator = probs.sum(dim=axes) + one_hot.sum(dim=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    foreground = dice[1:] if batch_dice else dice[:, 1:]
    return 1.0 - foreground.mean()
