"""Optimisation: SAM / ASAM (sharpness-aware), optimizer factory, poly LR schedule.

- :class:`SAM` — wrapper around a base optimizer class; ``adaptive=True`` is ASAM.
- :func:`build_optimizer` — sam | asam | sgd | adamw from the ``optim`` config section.
- :class:`PolyLRScheduler` — nnU-Net poly decay with optional linear warm-up.
"""

from uumamba.optim.build import build_optimizer, param_groups
from uumamba.optim.sam import DEFAULT_RHO_ASAM, DEFAULT_RHO_SAM, SAM
from uumamba.optim.schedule import PolyLRScheduler

__all__ = [
    "DEFAULT_RHO_ASAM",
    "DEFAULT_RHO_SAM",
    "SAM",
    "PolyLRScheduler",
    "build_optimizer",
    "param_groups",
]
