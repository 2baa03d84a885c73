"""Sliding-window softmax prediction of one preprocessed volume, with optional mirroring TTA.

The volume is tiled with windows of the plan's patch size (nnU-Net's sliding-window
inference; the window positions, the Gaussian importance map and the zero padding are
MONAI ``sliding_window_inference``'s): windows overlap by ``inference.overlap`` of their size,
each window's softmax is weighted by a Gaussian centred on the window (sigma = 1/8 of the
window size, nnU-Net's importance map) or uniformly, and the weighted windows are averaged.
Inputs smaller than a window are padded with zeros (the mean after z-score normalisation);
only the unpadded part of each window is kept, so the result always has the input's spatial
shape.

Memory: one (K, *spatial) float32 buffer per volume, and nothing else of that size. The
blending weights are known before the network runs (the sum of the importance maps over all
window positions), so each window is added to the buffer already divided by that sum — no
second buffer for the weights, no division pass, no copy to crop the padding. Mirrored TTA
passes and the folds of an ensemble add into the same buffer
(:func:`accumulate_window_probabilities`).

Defaults for the machine (:func:`resolve_window_settings`): ``inference.overlap`` and
``inference.sw_batch_size`` left unset (``None``) mean :data:`GPU_OVERLAP` / :data:`GPU_WINDOW_BATCH`
on a GPU and :data:`CPU_OVERLAP` / :data:`CPU_WINDOW_BATCH` on a CPU (on a CPU the network is
the whole cost and grows with the number of windows: 0.25 overlap needs about half the windows
of 0.5 for a volume of a few patches, and nnU-Net's own benchmarks show no Dice lost at 0.25
with Gaussian blending); explicit values are always used as given.

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
from typing import TYPE_CHECKING, Any, Protocol

import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from uumamba.device import native_bf16, precision_name
from uumamba.utils import plain_tensor

if TYPE_CHECKING:
    from uumamba.config import InferenceConfig
    from uumamba.data.plan import Plans

#: Gaussian importance-map sigma as a fraction of the window size (nnU-Net: 1/8).
GAUSSIAN_SIGMA_SCALE = 0.125

#: ``inference.overlap`` when the config leaves it unset: on a GPU (nnU-Net's) and on a CPU.
GPU_OVERLAP = 0.5
CPU_OVERLAP = 0.25

#: ``inference.sw_batch_size`` when the config leaves it unset: on a GPU and on a CPU (on 2
#: cores a batch of 4 windows of a small 3D U-Mamba costs about 10 % less CPU time per window
#: than a batch of 2).
GPU_WINDOW_BATCH = 2
CPU_WINDOW_BATCH = 4


class InferenceCancelled(Exception):
    """The ``cancel`` flag of :func:`sliding_window_probabilities` was set; the volume's
    prediction was abandoned between two window batches."""


class CancelFlag(Protocol):
    """Anything with ``is_set() -> bool`` (a :class:`threading.Event`, for one)."""

    def is_set(self) -> bool: ...


def resolve_window_settings(inference_cfg: Any, device: torch.device | str) -> tuple[float, int]:
    """``(overlap, windows per batch)`` that inference uses on ``device``.

    An unset (``None``) ``inference.overlap`` is :data:`GPU_OVERLAP` on a CUDA device and
    :data:`CPU_OVERLAP` elsewhere; an unset ``inference.sw_batch_size`` is
    :data:`GPU_WINDOW_BATCH` / :data:`CPU_WINDOW_BATCH`. Explicit values are returned as given.

    Raises:
        ValueError: ``overlap`` outside [0, 1) or a window batch below 1.
    """
    on_gpu = torch.device(device).type == "cuda"
    overlap = getattr(inference_cfg, "overlap", None)
    overlap = (GPU_OVERLAP if on_gpu else CPU_OVERLAP) if overlap is None else float(overlap)
    batch = getattr(inference_cfg, "sw_batch_size", None)
    batch = (GPU_WINDOW_BATCH if on_gpu else CPU_WINDOW_BATCH) if batch is None else int(batch)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"inference.overlap must be in [0, 1), got {overlap}")
    if batch < 1:
        raise ValueError(f"inference.sw_batch_size must be >= 1, got {batch}")
    return overlap, batch


def resolve_overlap(inference_cfg: Any, device: torch.device | str) -> float:
    """The overlap of :func:`resolve_window_settings`."""
    return resolve_window_settings(inference_cfg, device)[0]


def window_autocast(inference_cfg: Any, device: torch.device) -> Any:
    """The autocast context the windows run under (``inference.amp``): bf16 where
    :func:`uumamba.device.native_bf16` holds (a GPU of compute capability 8.0+, a CPU with
    AMX or AVX512-BF16), fp16 on an older GPU, none (float32) on other CPUs or with ``amp=off``. The
    selective scan and the normalisation statistics run in float32 inside it, and
    :func:`_softmax` takes the logits to float32. On 16 unseen ACDC volumes, the bf16 and
    float32 masks of the same trained U-Mamba agree to a mean Dice of 0.999 per class
    (benchmarks/README.md, "Prediction in bf16, ours against the DynUNet")."""
    dtype = _window_dtype(inference_cfg, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def window_precision(inference_cfg: Any, device: torch.device) -> str:
    """``bfloat16`` / ``float16`` / ``float32``: what :func:`window_autocast` computes in on
    ``device`` (the record of a prediction says it)."""
    return precision_name(_window_dtype(inference_cfg, device))


def _window_dtype(inference_cfg: Any, device: torch.device) -> torch.dtype | None:
    if getattr(inference_cfg, "amp", "auto") == "off" or device.type not in ("cuda", "cpu"):
        return None
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None


def _softmax(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Float32 softmax (N, K, *patch) of ``model`` on a window batch (N, C, *patch); a model
    that still returns a deep-supervision list contributes its first (full resolution)
    output."""
    logits = model(window)
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    return torch.softmax(logits.float(), dim=1)


def _mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (the empty one first): the flips of mirroring TTA."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _scan_interval(size: Sequence[int], roi: Sequence[int], overlap: float) -> list[int]:
    """MONAI's window step per axis: ``int(roi * (1 - overlap))`` (at least 1), or the whole
    axis when the window spans it."""
    return [r if r == n else max(int(r * (1 - overlap)), 1) for n, r in zip(size, roi, strict=True)]


def _padding(size: Sequence[int], roi: Sequence[int]) -> list[int]:
    """Zeros added before each axis of an input smaller than the window (MONAI's split:
    half before, the rest after)."""
    return [max(r - n, 0) // 2 for n, r in zip(size, roi, strict=True)]


def _blend(model: torch.nn.Module, batch: torch.Tensor, target: Callable[[int], torch.Tensor],
           roi: Sequence[int], flip: tuple[int, ...], overlap: float, gaussian: bool,
           window_batch: int, scale: float, cancel: CancelFlag | None) -> None:
    """Add ``scale`` x the blended softmax of ``model`` over ``batch`` (N, C, *S), mirrored
    along ``flip`` (tensor dims) and mirrored back, in place into ``target(K)`` (N, K, *S; the
    buffer, asked for once the first window batch tells K).

    Windows tile the (padded, mirrored) input as MONAI's ``sliding_window_inference`` tiles
    it; each window's softmax times its importance map divided by the summed importance at
    those voxels is added, so one pass gives the normalised blend and no weight volume is
    kept. Only the unpadded part of a window is added.
    """
    n_batch = batch.shape[0]
    size = list(batch.shape[2:])
    roi = [int(r) for r in roi]
    x = torch.flip(batch, flip) if flip else batch
    pad = _padding(size, roi)
    padded = [max(n, r) for n, r in zip(size, roi, strict=True)]
    if any(p > n for p, n in zip(padded, size, strict=True)):
        spec: list[int] = []
        for n, r, lo in zip(reversed(size), reversed(roi), reversed(pad), strict=True):
            spec += [lo, max(r - n, 0) - lo]
        x = torch.nn.functional.pad(x, spec, mode="constant", value=0.0)
    slices = dense_patch_slices(padded, roi, _scan_interval(padded, roi, overlap))
    importance = compute_importance_map(tuple(roi), mode="gaussian" if gaussian else "constant",
                                        sigma_scale=GAUSSIAN_SIGMA_SCALE, device=x.device,
                                        dtype=torch.float32)
    total = torch.zeros(padded, dtype=torch.float32, device=x.device)
    for sl in slices:
        total[sl] += importance
    # weight of each window position: importance / summed importance there, times ``scale``
    jobs = [(n, sl) for n in range(n_batch) for sl in slices]
    for start in range(0, len(jobs), window_batch):
        if cancel is not None and cancel.is_set():
            raise InferenceCancelled("inference cancelled")
        chunk = jobs[start:start + window_batch]
        windows = torch.cat([x[(slice(n, n + 1), slice(None), *sl)] for n, sl in chunk])
        probs = _softmax(model, windows)
        out = target(probs.shape[1])
        for probs_n, (n, sl) in zip(probs, chunk, strict=True):
            weight = importance / total[sl]
            if scale != 1.0:
                weight = weight * scale
            src, dst = [slice(None)], [slice(None)]
            for d, s in enumerate(sl):
                lo, hi = max(s.start, pad[d]), min(s.stop, pad[d] + size[d])
                src.append(slice(lo - s.start, hi - s.start))
                lo, hi = lo - pad[d], hi - pad[d]
                if d + 2 in flip:  # mirrored back: the window lands mirrored, reversed
                    lo, hi = size[d] - hi, size[d] - lo
                dst.append(slice(lo, hi))
            contribution = probs_n[tuple(src)] * weight[tuple(src[1:])]
            if flip:
                contribution = torch.flip(contribution, [d - 1 for d in flip])
            out[n][tuple(dst)] += contribution


def _check(image: torch.Tensor, plans: Plans) -> tuple[int, list[int]]:
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, X, Y, Z), got shape {tuple(image.shape)}")
    spatial_dims = int(plans.spatial_dims)
    patch = [int(p) for p in plans.patch_size]
    if len(patch) != spatial_dims:
        raise ValueError(
            f"plans.patch_size {patch} has {len(patch)} values; spatial_dims is {spatial_dims}"
        )
    if spatial_dims == 2 and int(plans.slice_axis) not in (0, 1, 2):
        raise ValueError(f"plans.slice_axis must be 0, 1 or 2, got {plans.slice_axis}")
    return spatial_dims, patch


def accumulate_window_probabilities(
    model: torch.nn.Module,
    image: torch.Tensor,
    plans: Plans,
    inference_cfg: InferenceConfig,
    out: torch.Tensor | None = None,
    scale: float = 1.0,
    tta: bool = False,
    cancel: CancelFlag | None = None,
) -> torch.Tensor:
    """Add ``scale`` x the sliding-window softmax of ``model`` over ``image`` into ``out``.

    What :func:`sliding_window_probabilities` computes, added in place into a buffer the
    caller owns (a fold ensemble passes one buffer and ``scale = 1 / n_folds``: the mean of
    the folds without a second volume).

    Args:
        model, image, plans, inference_cfg, tta, cancel: as for
            :func:`sliding_window_probabilities`.
        out: (1, K, X, Y, Z) float32 tensor on the model's device, K = the model's output
            channels, X, Y, Z = ``image``'s; updated in place. None: a zero buffer is made
            once the first window batch gives K.
        scale: weight of this model's probabilities.

    Returns:
        ``out`` (or the new buffer).

    Raises:
        ValueError: as :func:`sliding_window_probabilities`, or ``out`` has another shape
            than (1, K, X, Y, Z).
    """
    spatial_dims, patch = _check(image, plans)
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = image.device
    overlap, window_batch = resolve_window_settings(inference_cfg, device)
    gaussian = bool(getattr(inference_cfg, "gaussian", True))
    volume = plain_tensor(image).to(device=device, dtype=torch.float32)
    holder = [None if out is None else plain_tensor(out)]

    def target(k: int) -> torch.Tensor:
        """The buffer as (N, K, *S) for the window loop: 2D, its slices as the batch (a view)."""
        if holder[0] is None:
            holder[0] = torch.zeros((1, k, *volume.shape[2:]), dtype=torch.float32, device=device)
        buf = holder[0]
        if buf.ndim != 5 or buf.shape[0] != 1 or buf.shape[1] != k \
                or tuple(buf.shape[2:]) != tuple(volume.shape[2:]):
            raise ValueError(f"out must be (1, {k}, {', '.join(map(str, volume.shape[2:]))}), "
                             f"got shape {tuple(buf.shape)}")
        return buf[0].movedim(int(plans.slice_axis) + 1, 0) if spatial_dims == 2 else buf

    if spatial_dims == 2:
        # (1, C, X, Y, Z) -> (S, C, A, B): the slices become the batch (a view, no copy)
        batch = volume[0].movedim(int(plans.slice_axis) + 1, 0)
        mirror_axes: tuple[int, ...] = (2, 3)
    else:
        batch = volume
        mirror_axes = (2, 3, 4)

    flips = _mirror_combinations(mirror_axes) if tta else [()]
    with torch.inference_mode(), window_autocast(inference_cfg, device):
        for dims in flips:
            _blend(model, batch, target, patch, dims, overlap, gaussian, window_batch,
                   scale / len(flips), cancel)
    if holder[0] is None:  # no window at all cannot happen (a volume has >= 1 window)
        raise RuntimeError("sliding window: no window was predicted")
    return out if out is not None else holder[0]


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
        inference_cfg: ``overlap`` (fraction in [0, 1); None: by device,
            :func:`resolve_window_settings`), ``gaussian`` (Gaussian vs constant blending),
            ``sw_batch_size`` (windows per forward pass; None: by device).
        tta: average over mirrored copies (see the module docstring).
        cancel: optional flag (``is_set() -> bool``, e.g. a :class:`threading.Event`)
            checked before every window batch; once set, the work stops within one batch.

    Returns:
        (1, K, X, Y, Z) float32 probabilities (sum 1 over K at each voxel) on the model's
        device, K = the model's output channels. Memory: this one buffer, plus one window
        batch.

    Raises:
        ValueError: ``image`` is not 5D with batch 1, ``plans.patch_size`` does not match
            ``plans.spatial_dims``, ``slice_axis`` is not 0-2, or ``overlap`` is outside [0, 1).
        InferenceCancelled: ``cancel`` was set before or during the prediction.

    Source: nnU-Net's sliding-window prediction with Gaussian weighting and mirroring
    (Isensee et al., Nature Methods 2021); window positions and importance map as MONAI's
    ``sliding_window_inference``.
    """
    _check(image, plans)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = image.device
    resolve_window_settings(inference_cfg, device)  # a bad overlap fails before the network
    return accumulate_window_probabilities(model, image, plans, inference_cfg, tta=tta,
                                           cancel=cancel)
