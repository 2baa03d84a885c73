"""LookSAM: the SAM gradient every k steps, its stored sharpness direction reused in between.

Liu, Mai, Chen, Hsieh and You, "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022, Algorithm 1 (the global, not layer-wise, form). With ``g`` the plain gradient at w
and ``g_s`` the SAM gradient at w + e (:class:`uumamba.optim.SAM`'s two passes):

- every k-th update (counted from 0): take both passes, apply ``g_s`` and store the component
  of ``g_s`` orthogonal to ``g``::

      g_v = g_s - (<g, g_s> / ||g||^2) g          (= g_s - ||g_s|| cos(theta) g / ||g||)

- on the k - 1 updates in between: one pass only, and apply::

      g + alpha * (||g|| / ||g_v||) * g_v

  the plain gradient plus the stored direction rescaled to the current gradient's norm
  (``alpha`` = 0.7 in the paper).

Cost: ``1 + 1/k`` forward/backward passes per update (k = 5: 1.2 nominal). Norms and inner
products are global over every parameter with a gradient (the loss's sigma included, as SAM's
perturbation norm). ``g_v`` is stored per parameter (one extra copy of the weights) and saved
in ``state_dict()`` with the update counter, so a resumed run takes its SAM steps on the same
iterations and reuses the same direction. Clipping (done by the caller on the applied
gradients) scales ``g_s`` uniformly, which scales ``g_v`` but not its direction, and the
reuse step only uses its direction. When ``g_v`` is zero or non-finite the reuse step applies
``g`` unchanged. An update that is skipped (non-finite loss or gradient) does not advance the
counter: the next iteration is again a SAM iteration when this one was.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from uumamba.optim.sam import SAM
from uumamba.optim.wrapper import load_by_position, tensors_by_position

DEFAULT_K = 5
DEFAULT_ALPHA = 0.7


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Global inner product, accumulated in float64 (one scalar on the first tensor's device)."""
    device = a[0].device
    parts = [torch.sum(x * y, dtype=torch.float64).to(device) for x, y in zip(a, b, strict=True)]
    return torch.stack(parts).sum()


class LookSAM(SAM):
    """LookSAM around a base optimizer class (see the module docstring).

    Args:
        params, base_optimizer, rho, **base_kwargs: as :class:`uumamba.optim.SAM`
            (``adaptive`` is not offered: the paper's method is plain SAM's ball).
        k: take the SAM gradient every ``k`` updates (k = 1 is SAM; paper: 5).
        alpha: weight of the reused direction (paper: 0.7).

    Usage: as SAM under :func:`uumamba.engine.step.training_step`, which asks
    :meth:`perturb_this_step` each iteration and, on the other iterations, calls
    :meth:`prepare_plain_step` and :meth:`plain_step`.

    Raises:
        ValueError: ``k`` < 1, ``alpha`` < 0 or invalid SAM arguments.
    """

    state_format = "uumamba.optim.LookSAM/1"
    group_keys = ("rho", "adaptive", "eta")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float | None = None,
        k: int = DEFAULT_K,
        alpha: float = DEFAULT_ALPHA,
        **base_kwargs: Any,
    ) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"LookSAM k must be an integer >= 1, got {k}")
        if alpha < 0:
            raise ValueError(f"LookSAM alpha must be >= 0, got {alpha}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=False, **base_kwargs)
        self.k = int(k)
        self.alpha = float(alpha)
        self.updates = 0

    def perturb_this_step(self) -> bool:
        """True on updates 0, k, 2k, ... (and always while no direction is stored)."""
        has_direction = any("g_v" in self.state[p] for _, p in self.all_params())
        return self.updates % self.k == 0 or not has_direction

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Store the plain gradient g, then SAM's ascent step (see :meth:`SAM.first_step`)."""
        for _, p in self.all_params():
            if p.grad is not None:
                self.state[p]["g"] = p.grad.detach().clone()
        return super().first_step(zero_grad=zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """Store ``g_v`` from the stored g and the current gradients ``g_s``, then SAM's
        second step (restore w, base step with ``g_s``). ``g_v`` is kept only when the base
        step happened."""
        pairs = [
            (p, self.state[p].pop("g"), p.grad)
            for _, p in self.all_params()
            if p.grad is not None and "g" in self.state[p]
        ]
        stepped = super().second_step(zero_grad=False)
        if stepped and pairs:
            g = [pair[1] for pair in pairs]
            g_s = [pair[2] for pair in pairs]
            g_sq = _dot(g, g)
            coef = (_dot(g, g_s) / g_sq) if g_sq > 0 else torch.zeros_like(g_sq)
            for p, g_p, g_s_p in pairs:
                self.state[p]["g_v"] = g_s_p - coef.to(g_p.device, g_p.dtype) * g_p
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return stepped

    def restore(self, zero_grad: bool = False) -> None:
        """SAM's restore; an abandoned SAM step also drops the stored plain gradient."""
        for _, p in self.all_params():
            self.state[p].pop("g", None)
        super().restore(zero_grad=zero_grad)

    @torch.no_grad()
    def prepare_plain_step(self) -> None:
        """``grad <- g + alpha * (||g|| / ||g_v||) * g_v`` over the parameters with both."""
        pairs = [
            (p.grad, self.state[p]["g_v"])
            for _, p in self.all_params()
            if p.grad is not None and "g_v" in self.state[p]
        ]
        if not pairs:
            return
        g = [pair[0] for pair in pairs]
        g_v = [pair[1] for pair in pairs]
        g_norm = _dot(g, g).sqrt()
        v_norm = _dot(g_v, g_v).sqrt()
        if not (torch.isfinite(g_norm) and torch.isfinite(v_norm)) or v_norm == 0:
            return
        scale = self.alpha * g_norm / v_norm
        for grad, direction in pairs:
            grad.add_(direction, alpha=float(scale))

    def _after_update(self) -> None:
        self.updates += 1

    def _extra_state(self) -> dict[str, Any]:
        return {"updates": self.updates, "g_v": tensors_by_position(self, "g_v")}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        load_by_position(self, "g_v", list(state["g_v"]))
