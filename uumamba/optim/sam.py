"""Sharpness-aware minimisation (SAM) and adaptive SAM (ASAM) around any base optimizer.

SAM (Foret et al., ICLR 2021, Eq. 2): with g the gradient at w, step to the worst point of a
rho-ball, ``e = rho * g / ||g||``, take the gradient there and apply it at w with the base
optimizer. ASAM (Kwon et al., ICML 2021, Eq. 8): the ball is scaled element-wise by
``T_w = |w| + eta``, ``e = rho * T_w^2 g / ||T_w g||``, which makes the sharpness measure
invariant to rescaling of a filter's weights.

The API follows the popular PyTorch SAM implementation: ``SAM(params, base_optimizer_class,
rho, adaptive, **base_kwargs)`` with ``first_step()``, ``second_step()``, ``step(closure)``,
``base_optimizer`` and ``param_groups`` shared with it (so LR schedulers can act on either).
It differs where that implementation is wrong for long medical runs:

- ``state_dict()`` / ``load_state_dict()`` carry the base optimizer's state (momentum buffers,
  Adam moments, step counts) and the param groups (lr, rho, ...), so a resumed run continues
  exactly; the perturbation buffers are transient and not saved.
- Weights are restored by copying the saved w, not by subtracting e, so a skipped step
  leaves them bit-identical.
- A non-finite gradient norm in the first pass (no perturbation is applied) or in the
  second pass makes ``second_step()`` skip the base step: weights never become NaN.
- Parameters without a gradient are neither perturbed nor stepped.

Choices:

- ASAM scales only parameters with ``ndim >= 2`` (convolution / linear weights, which the
  scale-invariance argument is about); 1-D parameters (biases, norm-layer gains and shifts,
  the loss's log sigma^2) use ``T = 1`` (plain SAM), so zero-initialised biases are still
  perturbed. ``eta = 0.01`` as in the ASAM paper.
- Defaults: ``rho = 0.05`` for SAM (Foret et al.; sensible range 0.01-0.2, larger for larger
  batches / stronger regularisation); ``rho = 0.5`` for ASAM. ASAM's perturbation of a weight
  is about ``rho * |w|^2 g / ||T g||``, i.e. relative to the weight's magnitude, so it needs a
  rho an order of magnitude larger than SAM for a comparable loss increase; Kwon et al. use
  0.5 with SGD on CIFAR (sensible range 0.1-2.0). ``rho = 0`` reproduces the base optimizer
  exactly (at twice the cost).

Mixed precision: this class assumes the gradients it sees are unscaled. With a
``torch.amp.GradScaler`` use :func:`uumamba.engine.step.training_step`, which unscales before
the perturbation norm, routes non-finite passes through the scaler's back-off and clips the
second-pass gradients before :meth:`SAM.second_step`.

Distributed (DDP): both backward passes run through the DDP-wrapped model, whose backward
all-reduces (averages) the gradients; every rank therefore computes the same ||g||, the same
e, the same finiteness decision and the same base step, and parameters stay identical across
ranks without extra communication. Parameters outside the DDP module (the loss's sigma) must be
all-reduced by the caller after each backward (``training_step`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from uumamba.optim.wrapper import WrappedOptimizer

DEFAULT_RHO_SAM = 0.05
DEFAULT_RHO_ASAM = 0.5
DEFAULT_ETA = 0.01
_STATE_FORMAT = "uumamba.optim.SAM/1"


class SAM(WrappedOptimizer):
    """SAM / ASAM wrapper around a base optimizer class (see the module docstring).

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. Groups may set
            their own ``rho``, ``adaptive`` and ``eta``.
        base_optimizer: the base optimizer *class*, e.g. ``torch.optim.SGD``.
        rho: neighbourhood radius (L2, in parameter units for SAM, relative for ASAM);
            None: 0.05 for SAM, 0.5 for ASAM.
        adaptive: ASAM (element-wise scaling by ``|w| + eta`` of ``ndim >= 2`` parameters).
        eta: ASAM's offset so that zero weights are still perturbed (default 0.01).
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, nesterov, weight_decay ...).

    Usage (gradients unscaled, model in train mode)::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)        # w -> w + e
        loss_fn(model(x), y).backward()       # gradient at w + e (freeze BatchNorm stats)
        opt.second_step(zero_grad=True)       # w restored, base step with that gradient

    Raises:
        TypeError: ``base_optimizer`` is not a ``torch.optim.Optimizer`` subclass.
        ValueError: ``rho`` < 0 or ``eta`` < 0.
    """

    state_format = _STATE_FORMAT
    group_keys = ("rho", "adaptive", "eta")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float | None = None,
        adaptive: bool = False,
        eta: float = DEFAULT_ETA,
        **base_kwargs: Any,
    ) -> None:
        if rho is None:
            rho = DEFAULT_RHO_ASAM if adaptive else DEFAULT_RHO_SAM
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        defaults = dict(rho=float(rho), adaptive=bool(adaptive), eta=float(eta))
        super().__init__(params, base_optimizer, defaults, **base_kwargs)
        self._perturbed: list[torch.Tensor] = []
        self._skip_pending = False

    # Hooks of the variants that perturb on some steps only (LookSAM, RST): plain SAM perturbs
    # on every step and does nothing special on the others.

    def perturb_this_step(self) -> bool:
        """Whether this iteration takes the two-pass SAM step (always, for SAM). Called once
        per iteration, before its first backward has been used, by
        :func:`uumamba.engine.step.training_step`."""
        return True

    def prepare_plain_step(self) -> None:
        """On an iteration without perturbation, adjust the (unscaled, unclipped) plain
        gradients in place before clipping (SAM: never called; LookSAM adds its stored
        component)."""

    def plain_step(self) -> None:
        """The base optimizer's step with the gradients as they are (an iteration without
        perturbation)."""
        self.base_optimizer.step()
        self._after_update()

    def _after_update(self) -> None:
        """Called after every base-optimizer update (counters of the variants)."""

    @staticmethod
    def _scaled(
        group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, power: int
    ) -> torch.Tensor:
        """``T_w^power * grad`` (ASAM, ndim >= 2 only) or ``grad`` itself."""
        if group["adaptive"] and p.ndim >= 2:
            return grad * (p.abs() + group["eta"]).pow(power)
        return grad

    def _norm(self, adaptive_scaling: bool) -> torch.Tensor:
        """Global L2 norm of the gradients (``T_w g`` when adaptive_scaling), a scalar in
        float32 (float64 when a parameter is float64), on the first gradient's device."""
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._scaled(group, p, p.grad, 1) if adaptive_scaling else p.grad
                dtype = torch.promote_types(g.dtype, torch.float32)
                norms.append(torch.linalg.vector_norm(g, dtype=dtype))
        if not norms:
            return torch.zeros((), dtype=torch.float32)
        device = norms[0].device
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Move each parameter with a gradient from w to w + e (ascent step).

        Returns:
            True when the gradient norm is finite and the perturbation was applied; False
            otherwise (weights untouched, and the next :meth:`second_step` skips the update).

        Raises:
            RuntimeError: a perturbation from a previous ``first_step`` is still applied.
        """
        if self._perturbed:
            raise RuntimeError(
                "SAM.first_step() called twice; call second_step() or restore() first"
            )
        norm = self._norm(adaptive_scaling=True)
        finite = bool(torch.isfinite(norm))
        self._skip_pending = not finite
        if finite:
            for group in self.param_groups:
                scale = group["rho"] / (norm + 1e-12)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if "old_p" in state:
                        state["old_p"].copy_(p)
                    else:
                        state["old_p"] = p.detach().clone()
                    e = self._scaled(group, p, p.grad, 2) * scale.to(p.device, p.dtype)
                    p.add_(e)
                    self._perturbed.append(p)
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return finite

    @torch.no_grad()
    def restore(self, zero_grad: bool = False) -> None:
        """Copy the saved w back into every perturbed parameter (bit-identical), no update.

        Use it to abandon a step after :meth:`first_step`; also clears a pending skip.
        """
        for p in self._perturbed:
            p.copy_(self.state[p]["old_p"])
        self._perturbed = []
        self._skip_pending = False
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def second_step(self, zero_grad: bool = False) -> bool:
        """Restore w, then apply the base optimizer with the gradients taken at w + e.

        Clip those gradients (if wanted) before calling this. The base step is skipped when
        the first pass was non-finite or these gradients have a non-finite norm.

        Returns:
            True when the base optimizer stepped, False when the step was skipped.
        """
        skip = self._skip_pending
        self.restore()
        stepped = False
        if not skip and bool(torch.isfinite(self._norm(adaptive_scaling=False))):
            self.base_optimizer.step()
            self._after_update()
            stepped = True
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return stepped

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Closure form: ``first_step``, ``closure()`` (forward + backward at w + e), ``second_step``.

        As in the popular implementation, the first forward/backward must have been done
        before calling ``step``. Returns the closure's loss (at w + e).

        Raises:
            ValueError: no closure was given.
        """
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure that recomputes the loss and calls backward() "
                "(or call first_step() / second_step() yourself)"
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def _check_loadable(self) -> None:
        if self._perturbed:
            raise RuntimeError(f"{type(self).__name__}.load_state_dict() called while a "
                               "perturbation is applied")
