"""Validation during training: full-volume sliding-window inference on the held-out fold.

Each validation case arrives preprocessed (``validation_transforms``: resampled to the plan's
spacing, normalised, whole 3D volume). The network predicts it with
:func:`uumamba.inference.sliding.sliding_window_probabilities` (Gaussian-weighted windows of
the plan's patch size; 2D networks run slice by slice along ``plans.slice_axis``), the argmax
is compared with the label in that same grid, and Dice is reported per foreground class and as
the mean over classes. This mirrors nnU-Net's online validation, except that it uses whole
volumes rather than patches, so the number is close to the final evaluation.

Dice per case and class is ``2|P∩G| / (|P|+|G|)``; a class absent from both prediction and
reference gives NaN and is left out of the means (nnU-Net / MONAI ``ignore_empty``
convention). Class means are over cases, the overall mean over classes. Both come from
:mod:`uumamba.evaluation.metrics` (``dice_per_class``, ``class_means``), the implementation
``evaluate`` and the postprocessing decision use too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from uumamba.evaluation.metrics import class_means, dice_per_class
from uumamba.utils import plain_tensor


@dataclass
class OverlaySlice:
    """One 2D slice for the validation overlay picture.

    Attributes:
        case_id: the validation case shown.
        axis: the axis sliced (0, 1 or 2 of the preprocessed (x, y, z) volume).
        index: slice index along ``axis``.
        image: (H, W) float32, first input channel.
        label / prediction: (H, W) int arrays of label values.
    """

    case_id: str
    axis: int
    index: int
    image: np.ndarray
    label: np.ndarray
    prediction: np.ndarray


@dataclass
class ValidationResult:
    """Validation Dice of one epoch.

    Attributes:
        dice: foreground class name -> mean Dice over cases (NaN cases skipped).
        mean_dice: mean of ``dice`` over classes (NaN if no class had a defined value).
        per_case: case id -> class name -> Dice.
        overlay: a slice of the first case for the overlay picture (None without cases).
        seconds: wall time of the validation.
        masks: case id -> (prediction, reference) uint8 label maps in the preprocessed grid;
            filled only when :func:`validate` is asked to keep them (final validation, for the
            postprocessing decision).
    """

    dice: dict[str, float]
    mean_dice: float
    per_case: dict[str, dict[str, float]] = field(default_factory=dict)
    overlay: OverlaySlice | None = None
    seconds: float = 0.0
    masks: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _overlay_slice(case_id: str, image: torch.Tensor, label: np.ndarray, pred: np.ndarray,
                   axis: int) -> OverlaySlice:
    """The slice along ``axis`` in the middle of the reference foreground (or the volume)."""
    fg = np.nonzero(label > 0)
    if fg[0].size:
        lo, hi = int(fg[axis].min()), int(fg[axis].max())
        index = (lo + hi) // 2
    else:
        index = label.shape[axis] // 2
    img = image[0].float().cpu().numpy()
    return OverlaySlice(case_id, axis, index,
                        np.take(img, index, axis=axis).astype(np.float32),
                        np.take(label, index, axis=axis), np.take(pred, index, axis=axis))


@torch.no_grad()
def validate(model: nn.Module, dataset: Any, case_ids: Sequence[str], plans: Any,
             inference_cfg: Any, device: torch.device, *, ignore_label: int | None = None,
             overlay_case: int | None = 0, keep_masks: bool = False) -> ValidationResult:
    """Predict every case of ``dataset`` with sliding windows and score Dice per class.

    Args:
        model: the (unwrapped) network; put in eval mode here and restored afterwards.
        dataset: indexable, item ``i`` a dict with ``image`` (C, X, Y, Z) float32 and
            ``label`` (1, X, Y, Z) integer-valued, as ``validation_transforms`` gives.
        case_ids: id of each item, same order.
        plans: :class:`uumamba.data.plan.Plans` (labels, patch size, slice axis).
        inference_cfg: :class:`uumamba.config.InferenceConfig` (overlap, Gaussian weighting,
            sw_batch_size); test-time augmentation is off during training validation.
        device: where to run the network (its autocast is the sliding window's,
            ``inference.amp``: :func:`uumamba.inference.sliding.window_autocast`).
        ignore_label: reference value excluded from the scores.
        overlay_case: index of the case whose slice is returned for the overlay (None: none).
        keep_masks: also return every case's predicted and reference label maps.

    Returns:
        :class:`ValidationResult` (Dice per foreground class name, mean, per case).

    Raises:
        ValueError: ``case_ids`` and ``dataset`` lengths differ.
    """
    from uumamba.inference.sliding import sliding_window_probabilities

    if len(case_ids) != len(dataset):
        raise ValueError(f"validate: {len(case_ids)} case ids for {len(dataset)} dataset items")
    t0 = time.perf_counter()
    labels = {int(k): str(v) for k, v in plans.labels.items()}
    foreground = [k for k in sorted(labels) if k != 0 and k != ignore_label]
    names = [labels[k] for k in foreground]
    slice_axis = getattr(plans, "slice_axis", None)
    was_training = model.training
    model.eval()
    per_case: dict[str, dict[str, float]] = {}
    overlay = None
    masks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        for i, case_id in enumerate(case_ids):
            item = dataset[i]
            if isinstance(item, list):  # a transform chain that returns a list of one dict
                item = item[0]
            image = plain_tensor(item["image"]).float()
            label = plain_tensor(item["label"]).cpu().numpy()[0].round().astype(np.int64)
            x = image[None].to(device)
            probs = sliding_window_probabilities(model, x, plans, inference_cfg, tta=False)
            pred = probs[0].argmax(0).cpu().numpy().astype(np.int64)
            scores = dice_per_class(pred, label, foreground, ignore_label)
            per_case[str(case_id)] = {labels[k]: v for k, v in scores.items()}
            if keep_masks:
                masks[str(case_id)] = (pred.astype(np.uint8), label.astype(np.uint8))
            if overlay_case is not None and i == overlay_case:
                axis = int(slice_axis) if slice_axis is not None else int(np.argmin(label.shape))
                overlay = _overlay_slice(str(case_id), image, label, pred, axis)
    finally:
        model.train(was_training)
    dice, mean = class_means(per_case, names)
    return ValidationResult(dice=dice, mean_dice=mean, per_case=per_case, overlay=overlay,
                            seconds=time.perf_counter() - t0, masks=masks)
