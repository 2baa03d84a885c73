"""Polynomial ("poly") learning-rate decay with optional linear warm-up, per iteration.

nnU-Net's schedule: ``lr(t) = lr0 * (1 - t / T)^exponent`` with exponent 0.9, updated every
iteration. With ``W`` warm-up iterations the rate first rises linearly,
``lr(t) = lr0 * (t + 1) / W`` for t < W, and the poly decay then runs over the remaining
iterations, ``lr(t) = lr0 * (1 - (t - W) / (T - W))^exponent`` (so W = 0 is nnU-Net exactly).

Not a ``torch.optim.lr_scheduler.LRScheduler`` subclass on purpose: that base class wraps
``optimizer.step`` to warn about call order, and SAM updates through ``second_step``, which
would trigger a false warning.
"""

from __future__ import annotations

from typing import Any

import torch


class PolyLRScheduler:
    """Set every param group's ``lr`` from the poly schedule (see module docstring).

    Args:
        optimizer: any torch optimizer (including :class:`uumamba.optim.SAM`); each group's
            ``lr0`` is its ``initial_lr`` if set, else its current ``lr`` (then stored as
            ``initial_lr``, the torch convention).
        total_iters: T, total training iterations (epochs * iterations per epoch), >= 1.
        exponent: poly exponent (>= 0, default 0.9).
        warmup_iters: W, linear warm-up iterations, 0 <= W < T.

    Construction sets the rate of iteration 0; call :meth:`step` after each optimizer step.
    From t >= T on the rate is 0.

    Raises:
        ValueError: an argument outside the ranges above (names it).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_iters: int,
        exponent: float = 0.9,
        warmup_iters: int = 0,
    ) -> None:
        if total_iters < 1:
            raise ValueError(f"total_iters must be >= 1, got {total_iters}")
        if exponent < 0:
            raise ValueError(f"exponent must be >= 0, got {exponent}")
        if not 0 <= warmup_iters < total_iters:
            raise ValueError(
                f"warmup_iters must be in [0, total_iters={total_iters}), got {warmup_iters}"
            )
        self.optimizer = optimizer
        self.total_iters = int(total_iters)
        self.exponent = float(exponent)
        self.warmup_iters = int(warmup_iters)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [float(group["initial_lr"]) for group in optimizer.param_groups]
        self.last_iter = 0
        self.progress_floor = 0.0
        self._apply()

    def factor(self, t: int) -> float:
        """Multiplier of lr0 at iteration t (0-based).

        The decay's progress is ``max((t - W) / (T - W), progress_floor)``; the floor is 0
        unless :meth:`set_time_progress` raised it (time-budgeted runs).
        """
        if t < self.warmup_iters:
            return (t + 1) / self.warmup_iters
        progress = (t - self.warmup_iters) / (self.total_iters - self.warmup_iters)
        progress = max(progress, self.progress_floor)
        return max(0.0, 1.0 - progress) ** self.exponent

    def set_time_progress(self, fraction: float) -> None:
        """Let a wall-time budget drive the decay: progress is at least ``fraction`` of it.

        For runs bounded by ``train.time_limit_minutes``, so the learning rate reaches ~0 when
        the budget ends instead of stopping mid-schedule. Never moves progress backwards.
        """
        self.progress_floor = min(1.0, max(self.progress_floor, float(fraction)))
        if self.last_iter >= self.warmup_iters:
            self._apply()

    def _apply(self) -> None:
        factor = self.factor(self.last_iter)
        for group, lr0 in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = lr0 * factor

    def step(self) -> None:
        """Advance one iteration and set the new rates."""
        self.last_iter += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """Current lr of each param group."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Iteration counter, lr0 per group and the schedule's settings."""
        return {
            "last_iter": self.last_iter,
            "base_lrs": list(self.base_lrs),
            "total_iters": self.total_iters,
            "exponent": self.exponent,
            "warmup_iters": self.warmup_iters,
            "progress_floor": self.progress_floor,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the iteration counter and lr0 values, then re-apply the rate.

        ``total_iters``, ``exponent`` and ``warmup_iters`` keep the constructor's values (the
        current configuration), so a resumed run may be given a longer schedule; with the same
        configuration the resumed rates are identical.

        Raises:
            ValueError: the number of lr0 values differs from the optimizer's param groups.
        """
        base_lrs = list(state_dict["base_lrs"])
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"PolyLRScheduler.load_state_dict: {len(base_lrs)} saved groups, optimizer has "
                f"{len(self.optimizer.param_groups)}"
            )
        self.base_lrs = base_lrs
        self.last_iter = int(state_dict["last_iter"])
        self.progress_floor = float(state_dict.get("progress_floor", 0.0))
        self._apply()
