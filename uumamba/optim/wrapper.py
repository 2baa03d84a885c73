"""A torch optimizer that drives a base optimizer over the same param groups.

SAM and its variants (:mod:`uumamba.optim.sam`, :mod:`uumamba.optim.looksam`,
:mod:`uumamba.optim.rst`) and the EMA-KL trajectory variant (:mod:`uumamba.optim.ema_kl`)
change which gradient reaches the base optimizer (SGD / AdamW) or what is done around its
step; the update rule itself stays the base optimizer's. This class owns what they share:

- the base optimizer adopts the wrapper's group dicts, so the two objects hold one list and
  an LR scheduler may act on either;
- ``state_dict()`` is ``{"format": <class format>, "base_optimizer": <base state_dict>, ...}``
  plus whatever the subclass adds in :meth:`_extra_state` (a stored direction, an EMA of the
  weights, a random generator's state), so a resumed run continues exactly;
- parameters are addressed in extra state by their position in the param groups (the order
  of ``model.parameters()`` and then the loss's, as :func:`uumamba.optim.param_groups`
  builds them), which is the same in the run that saved and the run that loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


class WrappedOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that wrap a base optimizer class (see the module docstring).

    Subclasses set ``state_format`` (a versioned string checked on load) and ``group_keys``
    (their own per-group settings, defaulted into groups added later).

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        base_optimizer: the base optimizer *class*, e.g. ``torch.optim.SGD``.
        defaults: the subclass's own per-group settings.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay ...).

    Raises:
        TypeError: ``base_optimizer`` is not a ``torch.optim.Optimizer`` subclass.
    """

    state_format = "uumamba.optim.WrappedOptimizer/1"
    group_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        **base_kwargs: Any,
    ) -> None:
        if not (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
        ):
            raise TypeError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, "
                f"got {base_optimizer!r}"
            )
        super().__init__(params, {**defaults, **base_kwargs})
        # The base optimizer adopts the same group dicts: one list, shared by both objects.
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to both this optimizer and the base optimizer (shared list)."""
        base = self.__dict__.get("base_optimizer")
        if base is None:  # called from Optimizer.__init__, before the base exists
            super().add_param_group(param_group)
            return
        for key in self.group_keys:
            param_group.setdefault(key, self.defaults[key])
        base.add_param_group(param_group)
        self.param_groups = base.param_groups

    def all_params(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """Every (group, parameter) in param-group order, with or without a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

    def _extra_state(self) -> dict[str, Any]:
        """What the subclass saves besides the base optimizer's state (default: nothing)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved (default: nothing)."""

    def _check_loadable(self) -> None:
        """Raise when the subclass is mid-step and may not load (default: always loadable)."""

    def state_dict(self) -> dict[str, Any]:
        """``{"format", "base_optimizer", **extra}``: the base state (moments, step counts,
        param groups incl. lr and the subclass's settings) and the subclass's own state."""
        return {
            "format": self.state_format,
            "base_optimizer": self.base_optimizer.state_dict(),
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`; param groups stay shared with the base.

        Raises:
            ValueError: the dict was not written by this class's ``state_dict()`` (another
                optimizer's, or another version's), naming the expected format.
            RuntimeError: the subclass is mid-step (e.g. SAM between its two passes).
        """
        if state_dict.get("format") != self.state_format or "base_optimizer" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: not a {type(self).__name__} state "
                f"dict (expected keys 'format' = {self.state_format!r} and 'base_optimizer'; "
                f"got keys {sorted(state_dict)})"
            )
        self._check_loadable()
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
        self._load_extra_state(state_dict)


def tensors_by_position(
    optimizer: WrappedOptimizer, key: str
) -> list[torch.Tensor | None]:
    """``optimizer.state[p][key]`` for every parameter in param-group order (None where absent),
    cloned, for a state dict."""
    return [
        optimizer.state[p][key].detach().clone() if key in optimizer.state.get(p, {}) else None
        for _, p in optimizer.all_params()
    ]


def load_by_position(
    optimizer: WrappedOptimizer, key: str, tensors: list[torch.Tensor | None]
) -> None:
    """Inverse of :func:`tensors_by_position`: put each saved tensor back under ``key`` on the
    parameter's device and dtype.

    Raises:
        ValueError: the saved list does not match the parameters (count or shape).
    """
    params = [p for _, p in optimizer.all_params()]
    if len(tensors) != len(params):
        raise ValueError(
            f"{type(optimizer).__name__}.load_state_dict: '{key}' holds {len(tensors)} tensors "
            f"for {len(params)} parameters"
        )
    for p, saved in zip(params, tensors, strict=True):
        if saved is None:
            optimizer.state[p].pop(key, None)
            continue
        if saved.shape != p.shape:
            raise ValueError(
                f"{type(optimizer).__name__}.load_state_dict: '{key}' of shape "
                f"{tuple(saved.shape)} for a parameter of shape {tuple(p.shape)}"
            )
        optimizer.state[p][key] = saved.to(device=p.device, dtype=p.dtype).clone()
