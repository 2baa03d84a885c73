"""Optimisation: SAM and its cheaper sharpness-aware variants, optimizer factory, poly LR.

- :class:`SAM` — wrapper around a base optimizer class; ``adaptive=True`` is ASAM.
- :class:`LookSAM` — the SAM gradient every k updates, its sharpness direction reused between.
- :class:`RandomSAM` — RST: a SAM or a plain update, drawn per iteration.
- :class:`EMAKL` — one extra forward: KL to the outputs of an EMA of the weights (SAF / MESA).
- :func:`build_optimizer` — sam | asam | looksam | rst | ema_kl | sgd | adamw from the
  ``optim`` config section.
- :class:`PolyLRScheduler` — nnU-Net poly decay with optional linear warm-up.
"""

from uumamba.optim.build import build_optimizer, param_groups
from uumamba.optim.ema_kl import EMAKL
from uumamba.optim.looksam import LookSAM
from uumamba.optim.rst import RandomSAM
from uumamba.optim.sam import DEFAULT_RHO_ASAM, DEFAULT_RHO_SAM, SAM
from uumamba.optim.schedule import PolyLRScheduler

__all__ = [
    "DEFAULT_RHO_ASAM",
    "DEFAULT_RHO_SAM",
    "EMAKL",
    "SAM",
    "LookSAM",
    "PolyLRScheduler",
    "RandomSAM",
    "build_optimizer",
    "param_groups",
]
