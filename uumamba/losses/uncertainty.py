"""The uncertainty-aware composite loss of UU-Mamba (region + distribution + pixel terms).

Combination (UU-Mamba, Tsai et al. 2024, uncertainty-aware loss; after Kendall et al. 2018
with the ``ln(1 + sigma^2)`` regulariser of Liebel & Koerner 2018)::

    L = sum_i  L_i / (2 sigma_i^2)  +  ln(1 + sigma_i^2),      i in {dice, ce, focal}

Parameterisation: one learned ``log_sigma_sq`` v_i = ln(sigma_i^2) per term, initialised to 0
(sigma_i = 1). Then ``sigma_i^2 = exp(v_i) > 0`` for every real v_i and the regulariser is
``ln(1 + e^v) = softplus(v)``, evaluated stably.

Bounded below: every L_i >= 0 (1 - Dice, cross-entropy and focal loss are all non-negative),
so ``L >= sum_i softplus(v_i) > 0``. For a fixed L_i > 0 the term ``f(s) = L/(2s) + ln(1+s)``
in s = sigma^2 > 0 has ``f'(s) = -L/(2 s^2) + 1/(1+s)``, negative as s -> 0 and positive as
s -> inf, with the single root ``2 s^2 = L (1 + s)``, i.e.

    sigma*^2 = (L + sqrt(L^2 + 8 L)) / 4,

a finite global minimum (in v the stationarity condition is the same, multiplied by s). So a
learned sigma cannot drive the loss to -inf, unlike a combination with a negative Dice term.
(When L_i = 0 exactly the optimum is s -> 0, approached only slowly by v -> -inf.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from uumamba.losses import terms as T

LOSS_NAMES = ("uncertainty", "fixed", "dice_ce")
TERM_NAMES = ("dice", "ce", "focal")


def optimal_sigma_sq(term_value: float) -> float:
    """Closed-form minimiser over s = sigma^2 of ``L/(2s) + ln(1+s)`` for a term value L > 0.

    Returns ``(L + sqrt(L^2 + 8L)) / 4`` (derivation in the module docstring).

    Raises:
        ValueError: ``term_value`` is not > 0.
    """
    if not term_value > 0:
        raise ValueError(f"term_value must be > 0, got {term_value}")
    return (term_value + math.sqrt(term_value**2 + 8.0 * term_value)) / 4.0


class UncertaintyWeightedLoss(nn.Module):
    """Soft Dice + cross-entropy + focal loss, combined with learned uncertainty weights.

    Args:
        num_classes: C, classes including background (>= 2).
        name: ``"uncertainty"``: the paper's learned combination (module docstring);
            ``"fixed"``: ``dice + ce + focal`` with equal weights 1 and no parameters;
            ``"dice_ce"``: ``dice + ce`` (the nnU-Net objective), no parameters.
        focal_gamma: focal-loss focusing parameter (default 2.0, as in the paper).
        focal_alpha: optional per-class focal weights, length C.
        batch_dice: Dice over the whole batch per class (True, nnU-Net default) or per sample
            and class, then averaged (False). See :func:`uumamba.losses.terms.soft_dice_loss`.
        ignore_index: label value that contributes to no term (and gets no gradient).

    Forward:
        logits (B, C, *S) float (2D or 3D), target (B, 1, *S) integer-valued (float or int
        tensor) -> scalar float32 loss. All terms are computed in float32 on softmax
        probabilities, so the loss may be evaluated under autocast.

    Learned parameters (``"uncertainty"`` only): ``log_sigma_sq`` (3,) float32, the natural
    log of sigma^2 for (dice, ce, focal); they must be given to the optimizer (see
    :func:`uumamba.optim.build_optimizer`) and are saved with ``state_dict()``.

    Raises:
        ValueError: ``num_classes`` < 2, unknown ``name``, ``focal_gamma`` < 0, wrong
            ``focal_alpha`` length; at forward, shape or label-range errors.
    """

    def __init__(
        self,
        num_classes: int,
        name: str = "uncertainty",
        focal_gamma: float = 2.0,
        focal_alpha: Sequence[float] | None = None,
        batch_dice: bool = True,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + 1 class), got {num_classes}")
        if name not in LOSS_NAMES:
            raise ValueError(f"loss name must be one of {LOSS_NAMES}, got {name!r}")
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        self.num_classes = num_classes
        self.name = name
        self.focal_gamma = float(focal_gamma)
        self.batch_dice = batch_dice
        self.ignore_index = ignore_index
        if focal_alpha is not None:
            if len(focal_alpha) != num_classes:
                raise ValueError(
                    f"focal_alpha must have one weight per class ({num_classes}), "
                    f"got {len(focal_alpha)}: {list(focal_alpha)}"
                )
            alpha = torch.tensor([float(a) for a in focal_alpha], dtype=torch.float32)
            self.register_buffer("focal_alpha", alpha, persistent=False)
        else:
            self.focal_alpha = None
        if name == "uncertainty":
            self.log_sigma_sq = nn.Parameter(torch.zeros(len(TERM_NAMES)))
        else:
            self.register_parameter("log_sigma_sq", None)
        # Detached term values of the most recent forward, for logging (see terms()).
        self.last_terms: dict[str, torch.Tensor] = {}

    def term_values(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms as scalar float32 tensors: ``dice`` (1 - Dice), ``ce`` and
        (except for ``dice_ce``) ``focal``. Shapes as in :meth:`forward`."""
        log_probs, labels, valid = T.prepare(logits, target, self.num_classes, self.ignore_index)
        values = {
            "dice": T.soft_dice_loss(log_probs, labels, valid, batch_dice=self.batch_dice),
            "ce": T.cross_entropy(log_probs, labels, valid),
        }
        if self.name != "dice_ce":
            values["focal"] = T.focal_loss(
                log_probs, labels, valid, gamma=self.focal_gamma, alpha=self.focal_alpha
            )
        return values

    def combine(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Combine term values (as returned by :meth:`term_values`) into the scalar loss."""
        if self.log_sigma_sq is None:
            return sum(values.values())
        total = self.log_sigma_sq.new_zeros(())
        for i, key in enumerate(TERM_NAMES):
            v = self.log_sigma_sq[i]
            total = total + 0.5 * torch.exp(-v) * values[key] + F.softplus(v)
        return total

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar float32 loss for logits (B, C, *S) and target (B, 1, *S)."""
        values = self.term_values(logits, target)
        self.last_terms = {k: v.detach() for k, v in values.items()}
        return self.combine(values)

    def sigmas(self) -> dict[str, float]:
        """Current sigma_i = sqrt(exp(log_sigma_sq_i)) per term, e.g. ``{"dice": 1.0, "ce": 1.0,
        "focal": 1.0}`` at initialisation; ``{}`` for ``fixed`` / ``dice_ce`` (no learned
        weights). For logging (one host sync)."""
        if self.log_sigma_sq is None:
            return {}
        values = torch.exp(0.5 * self.log_sigma_sq.detach().float()).tolist()
        return dict(zip(TERM_NAMES, values, strict=True))

    def terms(self) -> dict[str, float]:
        """Unweighted term values of the most recent forward, for logging (``{}`` before the
        first). After a SAM ``training_step`` that is the second pass, at w + e."""
        return {k: float(v) for k, v in self.last_terms.items()}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, name={self.name!r}, focal_gamma={self.focal_gamma}, "
            f"batch_dice={self.batch_dice}, ignore_index={self.ignore_index}"
        )
