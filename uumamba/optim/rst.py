"""RST: randomized sharpness-aware training — a SAM step or a plain step, drawn per iteration.

Zhao, Zhang and Hu, "Randomized Sharpness-Aware Training for Boosting Computational Efficiency
in Deep Learning", 2022: at each iteration a Bernoulli trial with probability p decides between
SAM's two-pass update (:class:`uumamba.optim.SAM`) and the base optimizer's plain one-pass
update. Expected cost ``1 + p`` passes per update. The paper schedules p over training; here
p is a constant (``optim.sam_probability``; their constant schedule at 0.5 is the one that
halves SAM's extra cost).

The draws come from the optimizer's own ``torch.Generator`` (seeded from ``seed``, by default
``torch.initial_seed()``, i.e. the run's seed), whose state is saved in ``state_dict()``, so a
resumed run draws the same sequence. Distributed: rank 0's draw is broadcast, so every rank
takes the same kind of step (two backward all-reduces or one) and none waits forever.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from uumamba.optim.sam import SAM

DEFAULT_PROBABILITY = 0.5


class RandomSAM(SAM):
    """SAM on a random fraction ``p`` of the iterations (RST; see the module docstring).

    Args:
        params, base_optimizer, rho, adaptive, **base_kwargs: as :class:`uumamba.optim.SAM`.
        probability: chance of a SAM step per iteration (0: the base optimizer; 1: SAM).
        seed: the generator's seed; None: ``torch.initial_seed()``.

    Raises:
        ValueError: ``probability`` outside [0, 1] or invalid SAM arguments.
    """

    state_format = "uumamba.optim.RandomSAM/1"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float | None = None,
        adaptive: bool = False,
        probability: float = DEFAULT_PROBABILITY,
        seed: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"RST probability must be in [0, 1], got {probability}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **base_kwargs)
        self.probability = float(probability)
        self.generator = torch.Generator()
        self.generator.manual_seed(torch.initial_seed() if seed is None else int(seed))
        self.sam_steps = 0
        self.plain_steps = 0

    def perturb_this_step(self) -> bool:
        """One Bernoulli(p) draw (rank 0's, when distributed)."""
        draw = torch.rand((), generator=self.generator) < self.probability
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor(int(draw), dtype=torch.int32)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.broadcast(flag, src=0)
            draw = bool(flag.item())
        if draw:
            self.sam_steps += 1
        else:
            self.plain_steps += 1
        return bool(draw)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "sam_steps": self.sam_steps,
            "plain_steps": self.plain_steps,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.sam_steps = int(state["sam_steps"])
        self.plain_steps = int(state["plain_steps"])
