"""EMA-KL: sharpness-aware training from the weight trajectory, with one extra forward.

After "Sharpness-Aware Training for Free" (SAF; Du, Zhou, Feng, Tan and Zhou, NeurIPS 2022)
and its memory-efficient form MESA (same paper, Sec. 4.3). SAF replaces SAM's ascent step by
a trajectory loss: the KL divergence between the network's current outputs and the outputs it
gave the same samples some epochs earlier, which penalises the change of the loss along the
trajectory (their Eq. 7 - 9) and so the sharpness. SAF stores past outputs per training
sample; with random patch crops no two iterations see the same sample, so we use MESA's form:
the "past" outputs come from an exponential moving average (EMA) of the weights evaluated on
the current batch::

    L = L_task(f_w(x), y) + lambda * tau^2 * mean_voxels KL(softmax(f_ema(x) / tau) || softmax(f_w(x) / tau))
    ema <- decay * ema + (1 - decay) * w                 (after every base-optimizer update)

The teacher ``f_ema(x)`` is a forward without gradient; the KL's gradient flows through the
student ``f_w(x)`` only. Cost: one extra forward, no extra backward (about 1.3 passes).

Choices (ours, for 10^3-update CPU runs; MESA's ImageNet runs are 10^5+ updates):

- ``decay`` = 0.99 (half-life ~ 69 updates); MESA's 0.9995 would keep the EMA near the
  initial weights for a whole 20-minute CPU run.
- the KL term starts after ``start`` updates (default 100), once the EMA has left the random
  initialisation (MESA likewise starts it after a few epochs); the EMA is updated from the
  first update on.
- ``kl_weight`` (lambda) = 0.8 and temperature ``tau`` = 1 by default; the KL is over the
  finest deep-supervision output only (the one inference uses), averaged over voxels and
  batch, in float32 at least.
- the teacher forward runs in train mode (the same function as the student's; norm-layer
  running statistics are kept unchanged by the caller, as for SAM's second pass) with the
  EMA weights copied into the parameters and the current weights copied back after, bit for
  bit.

The EMA and the update counter are in ``state_dict()``, so a resumed run continues exactly. The
EMA covers every parameter in the optimizer (the loss's sigma too; it does not affect the
network's outputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from uumamba.optim.wrapper import WrappedOptimizer, load_by_position, tensors_by_position

DEFAULT_DECAY = 0.99
DEFAULT_KL_WEIGHT = 0.8
DEFAULT_TEMPERATURE = 1.0
DEFAULT_START = 100


class EMAKL(WrappedOptimizer):
    """A base optimizer plus an EMA of the weights that serves as the KL teacher.

    Args:
        params, base_optimizer, **base_kwargs: as for :class:`uumamba.optim.SAM`.
        decay: EMA decay per update, in [0, 1).
        kl_weight: lambda, the KL term's weight (>= 0; 0 is the base optimizer plus an EMA).
        temperature: tau > 0, dividing both sides' logits.
        start: updates before the KL term is added (the EMA is updated from the first).

    Usage (under :func:`uumamba.engine.step.training_step`)::

        if opt.kl_active():
            with torch.no_grad(), opt.averaged_weights():
                teacher = model(x)
        out = model(x)
        loss = loss_fn(out, y) + (opt.kl_term(out, teacher) if opt.kl_active() else 0)
        loss.backward(); opt.step()             # base step, then the EMA update

    Raises:
        ValueError: a setting outside its range.
        TypeError: ``base_optimizer`` is not an optimizer class.
    """

    state_format = "uumamba.optim.EMAKL/1"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        decay: float = DEFAULT_DECAY,
        kl_weight: float = DEFAULT_KL_WEIGHT,
        temperature: float = DEFAULT_TEMPERATURE,
        start: int = DEFAULT_START,
        **base_kwargs: Any,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA-KL decay must be in [0, 1), got {decay}")
        if kl_weight < 0:
            raise ValueError(f"EMA-KL kl_weight must be >= 0, got {kl_weight}")
        if not temperature > 0:
            raise ValueError(f"EMA-KL temperature must be > 0, got {temperature}")
        if int(start) != start or start < 0:
            raise ValueError(f"EMA-KL start must be an integer >= 0, got {start}")
        super().__init__(params, base_optimizer, {}, **base_kwargs)
        self.decay = float(decay)
        self.kl_weight = float(kl_weight)
        self.temperature = float(temperature)
        self.start = int(start)
        self.updates = 0
        with torch.no_grad():
            for _, p in self.all_params():
                self.state[p]["ema"] = p.detach().clone()
        self._stash: list[torch.Tensor] | None = None

    def kl_active(self) -> bool:
        """Whether this iteration adds the KL term (``updates >= start`` and lambda > 0)."""
        return self.kl_weight > 0 and self.updates >= self.start

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside the block the parameters hold the EMA weights; on exit the current weights
        are copied back (bit-identical), also when the block raises."""
        params = [p for _, p in self.all_params()]
        with torch.no_grad():
            if self._stash is None:
                self._stash = [p.detach().clone() for p in params]
            else:
                for s, p in zip(self._stash, params, strict=True):
                    s.copy_(p)
            for p in params:
                p.copy_(self.state[p]["ema"])
        try:
            yield
        finally:
            with torch.no_grad():
                for s, p in zip(self._stash, params, strict=True):
                    p.copy_(s)

    def kl_term(self, student: torch.Tensor | list[torch.Tensor],
                teacher: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``lambda * tau^2 * KL(softmax(t/tau) || softmax(s/tau))``, summed over classes
        (dim 1) and averaged over batch and voxels; a scalar in float32 (float64 for
        float64 logits).

        Args:
            student: logits (B, C, *S) with gradient, or the deep-supervision list (finest
                first; only the finest is used).
            teacher: the same from the EMA weights (no gradient needed; detached here).

        Raises:
            ValueError: the two logits differ in shape.
        """
        s = student[0] if isinstance(student, (list, tuple)) else student
        t = teacher[0] if isinstance(teacher, (list, tuple)) else teacher
        if s.shape != t.shape:
            raise ValueError(f"EMA-KL: student logits {tuple(s.shape)} and teacher logits "
                             f"{tuple(t.shape)} differ in shape")
        tau = self.temperature
        dtype = torch.promote_types(s.dtype, torch.float32)  # fp16 / bf16 logits: float32
        log_s = F.log_softmax(s.to(dtype) / tau, dim=1)
        log_t = F.log_softmax(t.detach().to(dtype) / tau, dim=1)
        kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1).mean()
        return self.kl_weight * tau * tau * kl

    def step(self, closure: Any = None) -> Any:
        """The base optimizer's step (``closure`` passed on), then the EMA update."""
        loss = self.base_optimizer.step(closure)
        with torch.no_grad():
            for _, p in self.all_params():
                self.state[p]["ema"].lerp_(p.detach(), 1.0 - self.decay)
        self.updates += 1
        return loss

    def _extra_state(self) -> dict[str, Any]:
        return {"updates": self.updates, "ema": tensors_by_position(self, "ema")}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        load_by_position(self, "ema", list(state["ema"]))
