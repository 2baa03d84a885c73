"""Sliding-window softmax prediction of one preprocessed volume, with optional mirroring TTA.

The volume is tiled with windows of the plan's patch size (nnU-Net's sliding-window
inference, run by :func:`monai.inferers.sliding_window_inference`): windows overlap by
``inference.overlap`` of their size, each window's softmax is weighted by a Gaussian centred
on the window (sigma = 1/8 of the window size, nnU-Net's importance map) or uniformly, and
the weighted windows are averaged. Inputs smaller than a window are padded with zeros (the
mean after z-score normalisation) and the output is cropped back, so the result always has
the input's spatial shape.

2D models (``plans.spatial_dims == 2``) see the volume slice by slice along
``plans.slice_axis``: the slices become the batch, and windows are tiled in-plane.

Test-time augmentation mirrors the input along every combination of the mirrored axes (3D:
all three spatial axes, 8 passes; 2D: the two in-plane axes, 4 passes), as nnU-Net does,
flips each softmax back and averages them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Protocol

import torch
from monai.inferers import sliding_window_inference

from uumamba.device import native_bf16
from uumamba.utils import plain_tensor

if TYPE_CHECKING:
    from uumamba.config import InferenceConfig
    from uumamba.data.plan import Plans

#: Gaussian importance-map sigma as a fraction of the window size (nnU-Net: 1/8).
GAUSSIAN_SIGMA_SCALE = 0.125


class InferenceCancelled(Exception):
    """The ``cancel`` flag of :func:`sliding_window_probabilities` was set; the volume's
    prediction was abandoned between two window batches."""


class CancelFlag(Protocol):
    """Anything with ``is_set() -> bool`` (a :class:`threading.Event`, for one)."""

    def is_set(self) -> bool: ...


def _cancellable(predictor: Callable[[torch.Tensor], torch.Tensor], cancel: CancelFlag | None
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predictor`` that raises :class:`InferenceCancelled` before a window batch once
    ``cancel.is_set()``."""
    if cancel is None:
        return predictor

    def predict(window: torch.Tensor) -> torch.Tensor:
        if cancel.is_set():
            raise InferenceCancelled("inference cancelled")
        return predictor(window)

    return predict


def _softmax_predictor(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``model`` so that a window batch (N, C, *patch) gives float32 softmax (N, K, *patch).

    A model that still returns a deep-supervision list contributes its first (full
    resolution) output.
    """

    def predict(window: torch.Tensor) -> torch.Tensor:
        logits = model(window)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        return torch.softmax(logits.float(), dim=1)

    return predict


def _mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (the empty one first): the flips of mirroring TTA."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _windows(
    batch: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    roi_size: Sequence[int],
    inference_cfg: InferenceConfig,
) -> torch.Tensor:
    """Blend window predictions over a (N, C, *spatial) batch -> (N, K, *spatial) float32."""
    return sliding_window_inference(
        inputs=batch,
        roi_size=tuple(int(s) for s in roi_size),
        sw_batch_size=int(inference_cfg.sw_batch_size),
        predictor=predictor,
        overlap=float(inference_cfg.overlap),
        mode="gaussian" if inference_cfg.gaussian else "constant",
        sigma_scale=GAUSSIAN_SIGMA_SCALE,
        padding_mode="constant",
        cval=0.0,
    )


def sliding_window_probabilities(
    model: torch.nn.Module,
    image: torch.Tensor,
    plans: Plans,
    inference_cfg: InferenceConfig,
    tta: bool = False,
    cancel: CancelFlag | None = None,
) -> torch.Tensor:
    """Softmax probabilities of ``model`` over a whole preprocessed volume.

    Args:
        model: a segmentation network (``uumamba.nn.UMamba`` or any module mapping
            (N, C, *patch) to logits (N, K, *patch)); put in eval mode here.
        image: (1, C, X, Y, Z) float32 tensor, preprocessed as in training (oriented,
            resampled, normalised). A MONAI MetaTensor is accepted; its metadata is dropped.
            Moved to the model's device.
        plans: the model's plan; uses ``spatial_dims``, ``patch_size`` (3 values for 3D, 2 for
            2D: the in-plane window) and, for 2D, ``slice_axis`` (0, 1 or 2: spatial axis
            the slices are taken along).
        inference_cfg: ``overlap`` (fraction in [0, 1)), ``gaussian`` (Gaussian vs constant
            blending), ``sw_batch_size`` (windows per forward pass).
        tta: average over mirrored copies (see the module docstring).
        cancel: optional flag (``is_set() -> bool``, e.g. a :class:`threading.Event`)
            checked before every window batch; once set, the work stops within one batch.

    Returns:
        (1, K, X, Y, Z) float32 probabilities (sum 1 over K at each voxel) on the model's
        device, K = the model's output channels.

    Raises:
        ValueError: ``image`` is not 5D with batch 1, ``plans.patch_size`` does not match
            ``plans.spatial_dims``, ``slice_axis`` is not 0-2, or ``overlap`` is outside [0, 1).
        InferenceCancelled: ``cancel`` was set before or during the prediction.

    Source: nnU-Net's sliding-window prediction with Gaussian weighting and mirroring
    (Isensee et al., Nature Methods 2021), implemented with MONAI's
    ``sliding_window_inference``.
    """
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, X, Y, Z), got shape {tuple(image.shape)}")
    if not 0.0 <= float(inference_cfg.overlap) < 1.0:
        raise ValueError(f"inference.overlap must be in [0, 1), got {inference_cfg.overlap}")
    spatial_dims = int(plans.spatial_dims)
    patch = [int(p) for p in plans.patch_size]
    if len(patch) != spatial_dims:
        raise ValueError(
            f"plans.patch_size {patch} has {len(patch)} values; spatial_dims is {spatial_dims}"
        )

    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = image.device
    volume = plain_tensor(image).to(device=device, dtype=torch.float32)

    if spatial_dims == 2:
        slice_axis = int(plans.slice_axis)
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"plans.slice_axis must be 0, 1 or 2, got {plans.slice_axis}")
        # (1, C, X, Y, Z) -> (S, C, A, B): the slices become the batch.
        batch = volume[0].movedim(slice_axis + 1, 0)
        mirror_axes = (2, 3)
    else:
        batch = volume
        mirror_axes = (2, 3, 4)

    predictor = _cancellable(_softmax_predictor(model), cancel)
    flips = _mirror_combinations(mirror_axes) if tta else [()]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16 if native_bf16(device) else torch.float16)
        if device.type == "cuda"
        else nullcontext()
    )
    total = None
    with torch.inference_mode(), autocast:
        for dims in flips:
            x = torch.flip(batch, dims) if dims else batch
            probs = _windows(x, predictor, patch, inference_cfg).float()
            if dims:
                probs = torch.flip(probs, dims)
            total = probs if total is None else total + probs
    probs = plain_tensor(total) / len(flips)

    if spatial_dims == 2:
        probs = probs.movedim(0, slice_axis + 1).unsqueeze(0)
    return probs.float()
