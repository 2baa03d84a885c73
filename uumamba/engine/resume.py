"""Exact resume: the loop state a checkpoint carries, building and restoring it, and which
run a fold continues.

- :class:`LoopState` (with the epoch in progress, :class:`_EpochAccumulator`): everything the
  loop carries from one iteration to the next, all of it checkpointed;
- :func:`checkpoint_state` / :func:`restore_from_checkpoint`: the checkpoint dict (the
  contract of :data:`uumamba.engine.checkpoint.CHECKPOINT_KEYS` plus what the exact
  continuation of a partial epoch needs) and its inverse;
- :func:`open_run`: the checkpoint ``--resume`` continues (or none), refusing to overwrite a
  run without ``--resume``;
- :func:`resume_config`: the checkpoint's configuration rules; only :data:`RUNTIME_KEYS` of
  the given one are taken.

Resume semantics (``--resume``)
    The checkpoint's configuration defines the run; of the given configuration only
    ``train.time_limit_minutes``, ``train.num_workers`` and ``train.cache`` are taken (other
    differences are reported and ignored). A finished run (all epochs done or time limit
    reached) is reported as finished and nothing is trained. Without a checkpoint,
    ``--resume`` starts a new run (as nnU-Net's ``--c`` does). Without ``--resume``, an
    existing ``checkpoint_latest.pt`` is never overwritten: that is an error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uumamba.config import Config, config_from_dict
from uumamba.engine.checkpoint import LATEST, capture_rng_state, load_checkpoint, restore_rng_state
from uumamba.errors import UserError

if TYPE_CHECKING:
    from uumamba.engine.components import Components
    from uumamba.engine.prepare import Prepared

log = logging.getLogger(__name__)

#: Settings of ``train`` that may change on ``--resume`` without changing the trajectory.
RUNTIME_KEYS = ("time_limit_minutes", "num_workers", "cache")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> ``{"section.key": value}`` (string-keyed dicts are descended)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_config(given: Config, saved: dict[str, Any]) -> Config:
    """The checkpoint's configuration with the run-time keys (:data:`RUNTIME_KEYS`) of
    ``given``; other differences are logged (INFO) and ignored.

    Raises:
        ConfigError: the checkpoint's configuration is not valid.
    """
    cfg = config_from_dict(saved, "checkpoint config")
    old = _flatten(cfg.model_dump(mode="json"))
    new = _flatten(given.model_dump(mode="json"))
    runtime = {f"train.{k}" for k in RUNTIME_KEYS}
    ignored = sorted(k for k in new if k not in runtime and new.get(k) != old.get(k))
    if ignored:
        log.info("note: --resume continues with the checkpoint's settings; ignoring "
                 f"changed {', '.join(ignored)}")
    for k in RUNTIME_KEYS:
        setattr(cfg.train, k, getattr(given.train, k))
    return cfg


def open_run(cfg: Config, fold_dir: Path, resume: bool,
             world_size: int = 1) -> tuple[Config, dict[str, Any] | None]:
    """Resume bookkeeping: the checkpoint to continue from (or None) and the config to use.

    Logs (INFO) the resumed iteration, ignored settings, a missing checkpoint under
    ``resume`` and a changed number of processes (``world_size``).

    Raises:
        UserError: a checkpoint exists and ``resume`` is False.
        DataError: the checkpoint cannot be read.
    """
    latest = fold_dir / LATEST
    if resume and latest.is_file():
        saved = load_checkpoint(latest)
        if not saved["finished"]:
            log.info(f"resuming {fold_dir} at iteration {saved['iteration']}")
            cfg = resume_config(cfg, saved["config"])
        if int(saved.get("world_size", 1)) != world_size:
            log.info(f"note: the checkpoint was written by {saved.get('world_size', 1)} "
                     f"process(es), this run has {world_size}: the ranks will draw "
                     "other patches than the interrupted run would have")
        return cfg, saved
    if resume:
        log.info(f"note: {latest} not found; --resume starts a new run")
    elif latest.is_file():
        raise UserError(f"{latest} exists; pass --resume to continue that run, or choose "
                        "another --output")
    return cfg, None


@dataclass
class _EpochAccumulator:
    """Running statistics of the epoch in progress (saved in checkpoints)."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    nonfinite: int = 0
    seconds: float = 0.0

    def state(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "nonfinite": self.nonfinite, "seconds": self.seconds}

    @classmethod
    def from_state(cls, es: dict[str, Any]) -> _EpochAccumulator:
        """Inverse of :meth:`state` (missing keys: an empty epoch)."""
        return cls(list(es.get("losses", [])), list(es.get("grad_norms", [])),
                   int(es.get("nonfinite", 0)), float(es.get("seconds", 0.0)))

    def means(self) -> tuple[float, float]:
        """Mean of the finite losses and of the finite gradient norms (NaN when none)."""
        finite = [x for x in self.losses if math.isfinite(x)]
        norms = [x for x in self.grad_norms if math.isfinite(x)]
        return (float(np.mean(finite)) if finite else float("nan"),
                float(np.mean(norms)) if norms else float("nan"))


@dataclass
class LoopState:
    """What the loop carries from one iteration to the next (all of it checkpointed).

    Attributes:
        iteration: completed iterations.
        best_metric: best validation mean Dice so far (None: none yet).
        history: one record per finished epoch (``metrics.jsonl``).
        epoch: statistics of the epoch in progress.
        consecutive_nonfinite: non-finite steps in a row.
        pending_epoch_end: stopped by a signal right at an epoch boundary; the epoch's
            record and validation are done first on resume.
        elapsed_before: training seconds of earlier (interrupted) sessions.
    """

    iteration: int = 0
    best_metric: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: _EpochAccumulator = field(default_factory=_EpochAccumulator)
    consecutive_nonfinite: int = 0
    pending_epoch_end: bool = False
    elapsed_before: float = 0.0

    def record_step(self, loss: float, grad_norm: float, finite: bool) -> None:
        """Count one completed iteration and add its loss and gradient norm to the epoch."""
        self.iteration += 1
        self.epoch.losses.append(loss)
        self.epoch.grad_norms.append(grad_norm)
        if finite:
            self.consecutive_nonfinite = 0
        else:
            self.epoch.nonfinite += 1
            self.consecutive_nonfinite += 1

    def close_epoch(self, record: dict[str, Any]) -> None:
        """Append the finished epoch's ``metrics.jsonl`` record; start a new epoch."""
        self.history.append(record)
        self.epoch = _EpochAccumulator()


def checkpoint_state(parts: Components, loop: LoopState, cfg: Config, prepared: Prepared,
                     fold: str, rank: int, world_size: int, *, finished: bool, pending: bool,
                     elapsed: float) -> dict[str, Any]:
    """The checkpoint dict of the run at ``loop.iteration``.

    Args:
        parts / loop: the run's components and loop state.
        cfg / prepared / fold: the run's configuration, plans and splits, and fold name.
        rank / world_size: this process and the number of processes.
        finished: the run is complete; ``pending``: stopped right at an epoch's end.
        elapsed: training seconds so far, summed over resumes.

    Returns:
        The keys of :data:`~uumamba.engine.checkpoint.CHECKPOINT_KEYS` plus ``epoch_state``,
        ``consecutive_nonfinite``, ``pending_epoch_end``, ``world_size`` and ``elapsed``;
        ``rng["data"]`` names the patch stream's position.
    """
    it = loop.iteration
    rng = capture_rng_state()
    rng["data"] = {"seed": cfg.train.seed, "rank": rank, "next_iteration": it,
                   "scheme": "numpy default_rng([seed, rank, iteration]) per batch"}
    return {
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "loss": parts.loss_fn.state_dict(),
        "scaler": None if parts.scaler is None else parts.scaler.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "epoch": it // cfg.train.iterations_per_epoch, "iteration": it, "rng": rng,
        "config": cfg.model_dump(mode="json"),
        "plans": prepared.plans.model_dump(mode="json"), "splits": prepared.splits,
        "fold": fold, "finished": finished, "best_metric": loop.best_metric,
        "metric_history": loop.history,
        # beyond the contract: what exact continuation of a partial epoch needs
        "epoch_state": loop.epoch.state(), "consecutive_nonfinite": loop.consecutive_nonfinite,
        "pending_epoch_end": pending, "world_size": world_size, "elapsed": elapsed,
    }


def restore_from_checkpoint(parts: Components, saved: dict[str, Any]) -> LoopState:
    """Load model, loss σ, optimizer, schedule, scaler and global RNG states from ``saved``
    and return the loop state it was taken at."""
    parts.model.load_state_dict(saved["model"])
    parts.loss_fn.load_state_dict(saved["loss"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    if parts.scaler is not None and saved["scaler"] is not None:
        parts.scaler.load_state_dict(saved["scaler"])
    restore_rng_state(saved["rng"])
    return LoopState(
        iteration=int(saved["iteration"]), best_metric=saved["best_metric"],
        history=list(saved["metric_history"]),
        epoch=_EpochAccumulator.from_state(saved.get("epoch_state") or {}),
        consecutive_nonfinite=int(saved.get("consecutive_nonfinite", 0)),
        pending_epoch_end=bool(saved.get("pending_epoch_end", False)),
        elapsed_before=float(saved.get("elapsed", 0.0)),
    )
