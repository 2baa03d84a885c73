"""Deep supervision: one loss per decoder output, weighted 1/2^i, the coarsest weighted 0.

Mirrors nnU-Net's deep-supervision wrapper: output i (0 = full resolution) gets weight
``1 / 2^i``, the lowest-resolution output gets 0, and the weights are normalised to sum to 1.
Targets are downsampled to each output's spatial size by nearest neighbour, so label values
(including an ignore label) are kept and never mixed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def deep_supervision_weights(n_outputs: int) -> tuple[float, ...]:
    """Normalised weights of ``n_outputs`` outputs, full resolution first.

    ``n_outputs = 1`` gives ``(1.0,)``; otherwise ``w_i = 2^-i`` for i < n-1, ``w_{n-1} = 0``,
    divided by their sum (e.g. n = 3 -> (2/3, 1/3, 0)).

    Raises:
        ValueError: ``n_outputs`` < 1.
    """
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be >= 1, got {n_outputs}")
    if n_outputs == 1:
        return (1.0,)
    raw = [0.5**i for i in range(n_outputs - 1)] + [0.0]
    total = sum(raw)
    return tuple(w / total for w in raw)


def downsample_target(target: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map (B, 1, *S) to (B, 1, *spatial_shape).

    Uses ``mode="nearest-exact"`` (sample centres aligned: for a factor-2 reduction output voxel
    i takes input voxel 2i + 1). Returns the input dtype; label values are copied, never
    interpolated. Returns ``target`` itself when the shape already matches.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if tuple(target.shape[2:]) == spatial_shape:
        return target
    resized = F.interpolate(target.float(), size=spatial_shape, mode="nearest-exact")
    return resized.to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over deep-supervision outputs.

    Args:
        loss: a module taking (logits (B, C, *S_i), target (B, 1, *S_i)) -> scalar, e.g.
            :class:`uumamba.losses.UncertaintyWeightedLoss` (its parameters stay reachable
            through this module's ``.parameters()``).
        n_outputs: number of network outputs (``model.n_deep_supervision_outputs``).

    Forward:
        outputs: list of logits, full resolution first, then each coarser level; or a single
        logits tensor (plain loss). target: (B, 1, *S) at full resolution, integer-valued.
        Returns a scalar float32.

    ``weights`` holds the normalised per-output weights (:func:`deep_supervision_weights`).
    Outputs with weight 0 (the coarsest) are not scored, but ``0 * output`` is added so every
    output head receives a (zero) gradient: DistributedDataParallel without
    ``find_unused_parameters`` requires each parameter used in forward to get one.

    Raises:
        ValueError: the list length differs from ``n_outputs``.
    """

    def __init__(self, loss: nn.Module, n_outputs: int) -> None:
        super().__init__()
        self.loss = loss
        self.n_outputs = n_outputs
        self.weights = deep_supervision_weights(n_outputs)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """Scalar loss; see the class docstring for shapes."""
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
            weights: Sequence[float] = (1.0,)
        else:
            outputs = list(outputs)
            if len(outputs) == 1:
                weights = (1.0,)
            elif len(outputs) != self.n_outputs:
                raise ValueError(
                    f"deep supervision: expected {self.n_outputs} outputs (full resolution "
                    f"first), got {len(outputs)}"
                )
            else:
                weights = self.weights
        total = target.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        for weight, logits in zip(weights, outputs, strict=True):
            if weight == 0.0:
                total = total + (logits * 0.0).sum().float()
                continue
            total = total + weight * self.loss(logits, downsample_target(target, logits.shape[2:]))
            for key, value in getattr(self.loss, "last_terms", {}).items():
                terms[key] = terms.get(key, 0.0) + weight * value
        self.last_terms = terms
        return total

    def sigmas(self) -> dict[str, float]:
        """The wrapped loss's ``sigmas()`` (``{}`` when it has none)."""
        sigmas = getattr(self.loss, "sigmas", None)
        return sigmas() if callable(sigmas) else {}

    def terms(self) -> dict[str, float]:
        """Deep-supervision-weighted term values of the most recent forward (for logging)."""
        return {k: float(v) for k, v in self.last_terms.items()}
