"""Exact resume: the loop state a checkpoint carries, building and restoring it, and which
run a fold continues.

- :class:`LoopState` (with the epoch in progress, :class:`_EpochAccumulator`): everything the
  loop carries from one iteration to the next, all of it checkpointed;
- :func:`checkpoint_state` / :func:`restore_from_checkpoint`: the checkpoint dict (the
  contract of :data:`uumamba.engine.checkpoint.CHECKPOINT_KEYS` plus what the exact
  continuation of a partial epoch needs) and its inverse;
- :func:`open_run`: the checkpoint ``--resume`` continues (or none), falling back to
  ``checkpoint_previous.pt`` when the latest cannot be read, refusing to overwrite a run
  without ``--resume``;
- :func:`resume_config`: the checkpoint's configuration rules; a given configuration that
  differs from it in any key other than :data:`RESUMABLE_KEYS` is refused.

Resume semantics (``--resume``)
    The checkpoint's configuration defines the run. The given configuration must agree with
    it except for :data:`RESUMABLE_KEYS` (they change how the run is carried out or when it
    ends, not the weights it computes), which are taken from the given one; any other
    difference is a :class:`~uumamba.errors.ConfigError` listing the keys with both values.
    ``train.epochs`` and ``train.iterations_per_epoch`` are *not* resumable: they set the
    length T of the poly schedule ``lr0 (1 - t/T)^0.9``, so changing them would make the
    learning rate jump at the resume and the run would match no uninterrupted run (train
    longer in a new run instead). A finished run (all epochs done or time budget spent) is
    reported as finished and nothing is trained; a changed setting is then refused too
    (none would take effect), except the resumable ones that only say how a run is carried
    out (``train.time_limit_minutes`` is refused: a larger budget does not reopen it). Without a checkpoint, ``--resume`` starts a new run
    (as nnU-Net's ``--c`` does). Without ``--resume``, an existing ``checkpoint_latest.pt``
    (or ``checkpoint_previous.pt``) is never overwritten: that is an error.

Fallback
    When ``checkpoint_latest.pt`` cannot be read (truncated, empty, not a checkpoint, keys
    missing, or absent while ``checkpoint_previous.pt`` exists), the run continues from
    ``checkpoint_previous.pt`` with a warning naming both files; the next save then replaces
    the unreadable latest without rotating it into ``checkpoint_previous.pt``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from uumamba.config import Config, config_from_dict
from uumamba.device import precision_name
from uumamba.engine.checkpoint import (
    LATEST,
    PREVIOUS,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from uumamba.errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    from uumamba.engine.components import Components
    from uumamba.engine.prepare import Prepared

log = logging.getLogger(__name__)

#: Dotted settings that may differ on ``--resume`` (taken from the given configuration):
#: ``train.time_limit_minutes`` (the total budget over all sessions; raise it to let an
#: unfinished run train longer; with ``train.schedule_by_time`` the decay follows the new
#: budget from where it stands, never backwards), ``train.num_workers``,
#: ``train.loader_nice`` and ``train.cache`` (how the same patches are loaded),
#: ``train.val_every`` (which epochs validate: metrics and the best checkpoint, not the
#: weights), ``train.checkpoint_every_minutes``,
#: ``train.max_nonfinite_steps`` (when to give up), ``inference.sw_batch_size`` (memory of
#: the validation's sliding window), ``inference.overlap`` (its window spacing; a run
#: saved before 0.4 holds 0.5 where the default is now "by device") and ``inference.amp``
#: (its precision; a run saved before it existed has none).
RESUMABLE_KEYS = (
    "train.time_limit_minutes", "train.num_workers", "train.loader_nice", "train.cache",
    "train.val_every", "train.checkpoint_every_minutes", "train.max_nonfinite_steps",
    "inference.sw_batch_size", "inference.overlap", "inference.amp",
)


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


def changed_settings(given: Config, saved: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved value, given value) for every setting that differs."""
    old = _flatten(saved.model_dump(mode="json"))
    new = _flatten(given.model_dump(mode="json"))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.items())


def resume_config(given: Config, saved: dict[str, Any], where: str = "the checkpoint") -> Config:
    """The checkpoint's configuration with the :data:`RESUMABLE_KEYS` of ``given``.

    Args:
        given: the configuration of this invocation.
        saved: the checkpoint's ``config`` dict.
        where: names the run in the error message (its checkpoint file).

    Raises:
        ConfigError: ``given`` differs from ``saved`` in keys outside :data:`RESUMABLE_KEYS`
            (all listed with both values), or the checkpoint's configuration is invalid.
    """
    cfg = config_from_dict(saved, "checkpoint config")
    refused = {k: v for k, v in changed_settings(given, cfg).items() if k not in RESUMABLE_KEYS}
    if refused:
        raise ConfigError(
            f"--resume: {where} was trained with other settings: {_describe(refused)}; a "
            "resumed run continues with its own settings (only "
            f"{', '.join(RESUMABLE_KEYS)} may change) - resume with the run's settings, or "
            "train into another --output")
    for key in RESUMABLE_KEYS:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, getattr(getattr(given, section), name))
    return cfg


@dataclass
class OpenedRun:
    """What :func:`open_run` found.

    Attributes:
        cfg: the configuration to run with.
        saved: the checkpoint to continue from (None: a new run).
        source: the file ``saved`` was read from.
        latest_readable: False when ``checkpoint_latest.pt`` was unreadable (the first save
            then replaces it instead of keeping it as ``checkpoint_previous.pt``).
    """

    cfg: Config
    saved: dict[str, Any] | None = None
    source: Path | None = None
    latest_readable: bool = True


def _load_with_fallback(fold_dir: Path) -> tuple[dict[str, Any], Path, bool]:
    """The latest checkpoint, else the previous one (warning naming both).

    Raises:
        DataError: neither can be read (both reasons in the message).
    """
    latest, previous = fold_dir / LATEST, fold_dir / PREVIOUS
    try:
        return load_checkpoint(latest), latest, True
    except DataError as exc:
        if not previous.is_file():
            raise
        problem = str(exc)
    try:
        saved = load_checkpoint(previous)
    except DataError as exc:
        raise DataError(f"cannot resume: {problem}; and {exc}") from None
    log.warning(f"warning: {problem}; resuming from {previous} (iteration "
                f"{saved['iteration']}) instead")
    return saved, previous, False


def open_run(cfg: Config, fold_dir: Path, resume: bool, world_size: int = 1) -> OpenedRun:
    """Resume bookkeeping: the checkpoint to continue from (or None) and the config to use.

    Logs (INFO) the resumed iteration, a missing checkpoint under ``resume`` and a changed
    number of processes (``world_size``); a fallback to ``checkpoint_previous.pt`` (WARNING).

    Raises:
        UserError: a checkpoint exists and ``resume`` is False.
        ConfigError: ``cfg`` differs from the run's settings (see :func:`resume_config`).
        DataError: neither the latest nor the previous checkpoint can be read.
    """
    latest, previous = fold_dir / LATEST, fold_dir / PREVIOUS
    exists = latest.is_file() or previous.is_file()
    if resume and exists:
        saved, source, readable = _load_with_fallback(fold_dir)
        if saved["finished"]:
            changes = {k: v for k, v in changed_settings(
                cfg, config_from_dict(saved["config"], "checkpoint config")).items()
                if k not in RESUMABLE_KEYS or k == "train.time_limit_minutes"}
            if changes:
                raise ConfigError(
                    f"--resume: {fold_dir} already finished training at iteration "
                    f"{saved['iteration']}; nothing is trained, so the changed settings "
                    f"{_describe(changes)} would have no effect - train with them into "
                    "another --output")
        else:
            cfg = resume_config(cfg, saved["config"], str(source))
            log.info(f"resuming {fold_dir} at iteration {saved['iteration']}")
        if int(saved.get("world_size", 1)) != world_size:
            log.info(f"note: the checkpoint was written by {saved.get('world_size', 1)} "
                     f"process(es), this run has {world_size}: the ranks will draw "
                     "other patches than the interrupted run would have")
        return OpenedRun(cfg, saved, source, readable)
    if resume:
        log.info(f"note: {latest} not found; --resume starts a new run")
    elif exists:
        raise UserError(f"{latest if latest.is_file() else previous} exists; pass --resume to "
                        "continue that run, or choose another --output")
    return OpenedRun(cfg)


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
        pending_end: set while an epoch's end (validation, record) is due but not done: the
            checkpoint saved just before it carries this, and a resume does that end first.
            ``{"partial": epoch cut short by the time limit, "final": the run ends with it}``;
            None otherwise.
        elapsed_before: seconds of the time budget spent by earlier sessions.
    """

    iteration: int = 0
    best_metric: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: _EpochAccumulator = field(default_factory=_EpochAccumulator)
    consecutive_nonfinite: int = 0
    pending_end: dict[str, bool] | None = None
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
                     fold: str, rank: int, world_size: int, *, finished: bool,
                     elapsed: float) -> dict[str, Any]:
    """The checkpoint dict of the run at ``loop.iteration``.

    Args:
        parts / loop: the run's components and loop state.
        cfg / prepared / fold: the run's configuration, plans and splits, and fold name.
        rank / world_size: this process and the number of processes.
        finished: the run is complete.
        elapsed: seconds of the time budget spent so far, summed over resumes.

    Returns:
        The keys of :data:`~uumamba.engine.checkpoint.CHECKPOINT_KEYS` plus ``epoch_state``,
        ``consecutive_nonfinite``, ``pending_end`` (see :class:`LoopState`),
        ``pending_epoch_end`` (bool, the same for older readers), ``world_size`` and
        ``elapsed``; ``rng["data"]`` names the patch stream's position.
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
        "pending_end": None if loop.pending_end is None else dict(loop.pending_end),
        "pending_epoch_end": loop.pending_end is not None, "world_size": world_size,
        "elapsed": elapsed,
        # what train.amp resolved to on the machine that trained (auto depends on the CPU)
        "precision": precision_name(parts.autocast_dtype),
    }


def _pending_end(saved: dict[str, Any], total: int) -> dict[str, bool] | None:
    """``pending_end`` of ``saved``; checkpoints of 0.1 only have the boolean
    ``pending_epoch_end`` (an epoch boundary reached by a signal)."""
    pending = saved.get("pending_end")
    if pending is not None:
        return {"partial": bool(pending["partial"]), "final": bool(pending["final"])}
    if saved.get("pending_epoch_end", False):
        return {"partial": False, "final": int(saved["iteration"]) >= total}
    return None


def restore_from_checkpoint(parts: Components, saved: dict[str, Any],
                            total: int) -> LoopState:
    """Load model, loss σ, optimizer, schedule, scaler and global RNG states from ``saved``
    and return the loop state it was taken at (``total``: the run's iterations)."""
    parts.model.load_state_dict(saved["model"])
    parts.loss_fn.load_state_dict(saved["loss"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    if parts.scaler is not None and saved["scaler"] is not None:
        parts.scaler.load_state_dict(saved["scaler"])
    restore_rng_state(saved["rng"])
    before, now = saved.get("precision"), precision_name(parts.autocast_dtype)
    if before is not None and before not in ("bfloat16", "float16", "float32"):
        before = "an unknown precision"  # a crafted checkpoint's value is never echoed
    if before is not None and before != now:
        log.warning(f"warning: this run trained in {before} and continues in {now} "
                    f"(train.amp={saved['config']['train']['amp']} resolves by device: "
                    "uumamba.device.native_bf16, UUMAMBA_CPU_BF16); the continuation is not "
                    "the one an uninterrupted run would have taken")
    return LoopState(
        iteration=int(saved["iteration"]), best_metric=saved["best_metric"],
        history=list(saved["metric_history"]),
        epoch=_EpochAccumulator.from_state(saved.get("epoch_state") or {}),
        consecutive_nonfinite=int(saved.get("consecutive_nonfinite", 0)),
        pending_end=_pending_end(saved, total),
        elapsed_before=float(saved.get("elapsed", 0.0)),
    )
