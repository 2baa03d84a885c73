"""The training loop of one fold (``uumamba train``): :func:`run_fold` / :func:`train_fold`.

The loop calls small pieces: the model folder's preparation (:mod:`~uumamba.engine.prepare`:
check, plan, splits), the components (:mod:`~uumamba.engine.components`: network, loss,
optimizer, poly schedule, precision), the seeded patch stream
(:mod:`~uumamba.engine.sampling`), :func:`uumamba.engine.step.training_step`,
:func:`uumamba.engine.validate.validate`, the checkpointed loop state
(:mod:`~uumamba.engine.resume`), :class:`~uumamba.engine.signals.StopSignals` and the loggers
of :mod:`uumamba.engine.callbacks`. Notes and warnings go to ``logging`` (rank 0 only).

Flow of :func:`train_fold`
    1. integrity check of every case (fatal problems: :class:`~uumamba.errors.DataError`
       listing them all; warnings are logged);
    2. ``MODEL/plans.json`` reused when present, else planned for ``plan.target`` (``auto``:
       the training device; a CPU plan is sized to a time budget) and saved; its model /
       optimizer choices become the run's settings; ``config.yaml``,
       ``dataset.json`` (``labels`` value -> name, ``modality``) and ``splits.json`` written;
    3. after 2 warm-up iterations, the next few are timed (:mod:`~uumamba.engine.estimate`)
       and the seconds per iteration, the planned total and what ``train.time_limit_minutes``
       allows are logged and written to ``fold_K/time_estimate.json``, with a warning naming
       cheaper options when the schedule would take over 10x the limit or a day;
    4. epochs × ``iterations_per_epoch`` training steps (SAM / ASAM / SGD / AdamW,
       uncertainty-weighted loss with deep supervision, poly learning rate with optional
       warm-up, gradient clipping; ``train.amp``: bf16 autocast where the device has bf16
       units (a GPU of compute capability 8.0+, a CPU with AMX or AVX512-BF16), fp16 with a
       GradScaler on an older GPU, float32 on other CPUs);
    5. every ``val_every`` epochs and at the end: full-volume sliding-window validation on the
       held-out fold (Dice per class and mean); fold ``all`` has no validation;
    6. ``checkpoint_latest.pt`` at every epoch's end — *before* that epoch's validation when
       one is due, and again after it — and every ``train.checkpoint_every_minutes`` within
       an epoch; ``checkpoint_best.pt`` when the mean Dice improves. Each save keeps the
       replaced latest as ``checkpoint_previous.pt`` (written durably, see
       :mod:`uumamba.model_folder.checkpoints`). Temporary files left by a killed process
       are removed at the start.

Reproducibility and exact resume
    Every training patch is a pure function of ``(train.seed, rank, iteration, position in
    the batch)``: the case is drawn with a NumPy generator seeded from those numbers, and the
    augmentation runs with the MONAI transforms' random state *and* the global Python / NumPy /
    torch generators seeded from a per-sample seed (the global states are restored
    afterwards). This holds with any number of DataLoader workers, so the checkpoint only needs
    the iteration counter (stored under ``rng["data"]``) besides the model, optimizer (with
    SAM's base momentum), loss σ, scaler, scheduler and global RNG states. A resumed CPU run
    therefore continues the same trajectory bit for bit, from any iteration, not only from
    epoch boundaries, where ``train.amp`` resolves to the precision it trained in (the
    checkpoint records it; a change is logged as a warning). (Different ``WORLD_SIZE`` on resume changes which patches each rank
    sees.) With ``train.deterministic`` the run also uses MONAI's ``set_determinism`` and, on
    CUDA, ``torch.use_deterministic_algorithms(True, warn_only=True)``. Bit-identity holds for
    a fixed torch thread count (float reductions depend on how work is split).

Resume semantics (``--resume``)
    The checkpoint's configuration defines the run; see :mod:`uumamba.engine.resume`.

Stopping
    SIGINT / SIGTERM (to the process or its whole group: DataLoader workers ignore them) set a
    flag: the current iteration finishes, ``checkpoint_latest.pt`` is saved (``finished``
    False) and the CLI exits with 128 + signal number (130 for SIGINT, 143 for SIGTERM), the
    shell convention. A signal during validation abandons it at the next sliding-window batch
    (the checkpoint saved just before it carries ``pending_end``, and a resume validates
    first). A second SIGINT aborts at once, except during a save, which it lets finish. What a
    stop loses: a signal, nothing but the current iteration's wait and the save (and a
    validation in progress, which is redone); a SIGKILL or power loss, the iterations since
    the last save, at most ``train.checkpoint_every_minutes`` or one epoch (whichever is
    shorter) plus the save's own duration.
    ``train.time_limit_minutes`` is the run's total budget: the wall time of every session
    since :func:`run_fold` was called, summed over resumes (``elapsed`` in the checkpoint;
    each session logs what is left). When it is spent the iteration finishes, validation
    runs, the checkpoint is saved with ``finished`` True, the log says how many of the
    planned iterations ran, exit status 0. More than ``train.max_nonfinite_steps`` consecutive
    non-finite losses (each skipped by the step) save the checkpoint and raise
    :class:`~uumamba.errors.UserError`.

``metrics.jsonl`` fields (one line per epoch)
    ``epoch`` (1-based), ``iteration`` (completed), ``train_loss`` (mean of the epoch's finite
    losses), ``sigmas`` (σ per loss term at epoch end), ``lr``, ``grad_norm`` (mean),
    ``val_dice`` (class name -> Dice, or null), ``val_mean_dice``, ``time`` (s, epoch incl.
    validation), ``elapsed`` (s since the first start, summed over resumes),
    ``nonfinite_steps``, ``partial`` (True for an epoch cut short by the time limit).
    ``elapsed`` counts each session from the :func:`run_fold` call (setup included).

Distributed
    Under ``torchrun`` every rank trains on its own patches (per-rank seeding), gradients of
    the network are averaged by DDP and those of the loss σ by ``training_step``, validation cases are shared out among
    the ranks and gathered, and only rank 0 writes files and logs (see
    :mod:`uumamba.engine.distributed`).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from uumamba.config import Config
from uumamba.data.plan import apply_plan_decision
from uumamba.engine import distributed as ddp
from uumamba.engine.callbacks import (
    Callback,
    CallbackList,
    IterationLog,
    RunContext,
    default_callbacks,
)
from uumamba.engine.checkpoint import BEST, LATEST, PREVIOUS, save_checkpoint
from uumamba.engine.components import Components, build_components, seed_everything
from uumamba.engine.estimate import (
    RateProbe,
    ScheduleEstimate,
    cheaper_options,
    estimate_schedule,
    schedule_warning,
)
from uumamba.engine.prepare import Prepared, prepare_everywhere
from uumamba.engine.resume import LoopState, checkpoint_state, open_run, restore_from_checkpoint
from uumamba.engine.sampling import make_patch_loader
from uumamba.engine.signals import StopSignals
from uumamba.engine.step import training_step
from uumamba.engine.validate import ValidationResult
from uumamba.engine.validate import validate as validate_cases
from uumamba.errors import ConfigError, UserError
from uumamba.evaluation.metrics import class_means
from uumamba.inference.postprocess import determine_postprocessing, pool_fold_decisions
from uumamba.logs import default_output
from uumamba.model_folder import ModelFolder
from uumamba.model_folder.folder import PLANS
from uumamba.utils import atomic_path, plain_tensor, remove_stale_temporaries

log = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """Outcome of :func:`run_fold`.

    Attributes:
        fold_dir: ``MODEL/fold_K`` or ``MODEL/fold_all``.
        finished: the run is complete (all epochs, or the time limit was reached).
        reason: ``completed`` | ``time_limit`` | ``signal`` | ``already_finished``.
        signal: the signal number that stopped the run, else None.
        iteration: iterations completed.
        best_metric: best validation mean Dice (None without validation).
    """

    fold_dir: Path
    finished: bool
    reason: str
    signal: int | None = None
    iteration: int = 0
    best_metric: float | None = None


def _dice(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def parse_fold(fold: str | int, n_folds: int) -> str:
    """Normalise ``fold`` to ``"0"`` .. ``"n_folds-1"`` or ``"all"``.

    Raises:
        UserError: not an integer in range and not ``all``.
    """
    text = str(fold).strip().lower()
    if text == "all":
        return text
    if text.isdigit() and 0 <= int(text) < n_folds:
        return str(int(text))
    raise UserError(f"--fold {fold!r}: expected 0..{n_folds - 1} (train.n_folds = {n_folds}) "
                    "or 'all'")


class _ValidationAbandoned(Exception):
    """A stop signal arrived during validation (raised from the network's forward)."""


class _StopAware(nn.Module):
    """The network, checking the stop flag before every forward pass (each sliding-window
    batch of a validation), so a signal abandons a validation within one window batch."""

    def __init__(self, model: nn.Module, signals: StopSignals) -> None:
        super().__init__()
        self.model = model
        self.signals = signals
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> Any:
        if self.signals.received is not None:
            raise _ValidationAbandoned
        return self.model(x)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60.0:.1f} min"


@dataclass
class _FoldRun:
    """One fold's training: the run's fixed facts, its components (``parts``) and loop state
    (``state``), with the loop's steps as methods."""

    cfg: Config
    ctx: ddp.DistContext
    fold: str
    fold_dir: Path
    prepared: Prepared
    val_set: Any  # None: no validation (fold "all")
    val_case_ids: list[str]
    callbacks: CallbackList
    info: RunContext
    parts: Components
    state: LoopState
    t_call: float
    rotate_latest: bool = True  # False while checkpoint_latest.pt is unreadable
    signals: StopSignals = field(default_factory=StopSignals)
    last_save: float = 0.0
    probe: RateProbe = field(default_factory=RateProbe)
    estimate: ScheduleEstimate | None = None

    @property
    def total(self) -> int:
        return self.cfg.train.epochs * self.cfg.train.iterations_per_epoch

    def elapsed(self) -> float:
        """Seconds of the time budget spent: this session's since :func:`run_fold` was called
        plus the earlier sessions' (saved in the checkpoint)."""
        return self.state.elapsed_before + time.monotonic() - self.t_call

    def budget_left(self) -> float | None:
        """Seconds left of ``train.time_limit_minutes`` (None without a limit; may be < 0)."""
        limit = self.cfg.train.time_limit_minutes
        return None if limit is None else limit * 60.0 - self.elapsed()

    def save(self, finished: bool, best: bool = False) -> None:
        """Rank 0: ``checkpoint_best.pt`` (when ``best``), then ``checkpoint_latest.pt``
        (the one it replaces kept as ``checkpoint_previous.pt``). A second SIGINT during the
        save waits for it to finish."""
        self.last_save = time.monotonic()
        if not self.ctx.is_main:
            return
        state = checkpoint_state(self.parts, self.state, self.cfg, self.prepared, self.fold,
                                 self.ctx.rank, self.ctx.world_size, finished=finished,
                                 elapsed=self.elapsed())
        with self.signals.protect():
            if best:
                save_checkpoint(self.fold_dir / BEST, state)
            save_checkpoint(self.fold_dir / LATEST, state,
                            previous=self.fold_dir / PREVIOUS if self.rotate_latest else None)
        self.rotate_latest = True

    def validate(self, final: bool = False) -> ValidationResult:
        """Each rank validates its share of the cases; results are gathered on every rank.

        The final validation also decides the postprocessing (largest connected component per
        class where it raises the validation Dice, nnU-Net's rule) from the main rank's cases
        and writes ``postprocessing.json`` into the fold folder for the predictor.

        Raises:
            _ValidationAbandoned: a stop signal arrived (checked before every window batch).
        """
        ctx, plans, ignore = self.ctx, self.prepared.plans, self.cfg.dataset.ignore_label
        part = validate_cases(_StopAware(self.parts.model, self.signals), self.val_set,
                              self.val_case_ids, plans, self.cfg.inference, ctx.device,
                              ignore_label=ignore, overlay_case=0 if ctx.is_main else None,
                              keep_masks=final)
        per_case = {k: v for d in ddp.gather_objects(part.per_case, ctx) for k, v in d.items()}
        names = [name for k, name in sorted(self.info.labels.items()) if k not in (0, ignore)]
        dice, mean = class_means(per_case, names)
        if final and ctx.is_main and part.masks:
            preds, refs = zip(*part.masks.values(), strict=True)
            spec = determine_postprocessing(list(preds), list(refs), plans.labels)
            ModelFolder.save_postprocessing(spec, self.fold_dir)
        return ValidationResult(dice=dice, mean_dice=mean, per_case=per_case,
                                overlay=part.overlay, seconds=part.seconds)

    def decide_fold_all_postprocessing(self) -> None:
        """A run without validation cases (fold ``all``): its ``postprocessing.json`` is pooled
        from the cross-validation folds' decisions in the same model folder, or says "none
        decided" (:func:`uumamba.inference.postprocess.pool_fold_decisions`)."""
        folder = ModelFolder(self.fold_dir.parent)
        decisions = folder.cross_validation_decisions(self.cfg.train.n_folds)
        spec = pool_fold_decisions(decisions, self.prepared.plans.labels)
        ModelFolder.save_postprocessing(spec, self.fold_dir)
        log.info(f"postprocessing of fold all: {spec['decided']}; largest component kept for "
                 f"labels {spec['largest_component_labels'] or 'none'}")

    def validation_due(self, partial: bool, final: bool) -> bool:
        """The epoch ending at the current iteration is validated: every ``val_every``
        epochs, at the end of the run and when the time limit cuts an epoch short."""
        tc, it = self.cfg.train, self.state.iteration
        epoch = (it - 1) // tc.iterations_per_epoch + 1
        return self.val_set is not None and (epoch % tc.val_every == 0 or final or partial)

    def end_epoch(self, partial: bool, final: bool = False) -> bool:
        """Validate when due, append the epoch's record, call the loggers; True when the
        validation mean Dice improved on the best so far. ``final``: the run ends after this
        epoch (the validation then also decides the postprocessing).

        Raises:
            _ValidationAbandoned: a stop signal arrived during validation (nothing recorded).
        """
        tc, loop = self.cfg.train, self.state
        it = loop.iteration
        epoch = (it - 1) // tc.iterations_per_epoch + 1
        due = self.validation_due(partial, final)
        result = self.validate(final=final) if due else None
        train_loss, grad_norm = loop.epoch.means()
        record = {
            "epoch": epoch, "iteration": it, "train_loss": train_loss,
            "sigmas": self.parts.sigmas(), "lr": self.parts.lr(), "grad_norm": grad_norm,
            "val_dice": None if result is None else result.dice,
            "val_mean_dice": None if result is None else result.mean_dice,
            "time": loop.epoch.seconds + (0.0 if result is None else result.seconds),
            "elapsed": self.elapsed(), "nonfinite_steps": loop.epoch.nonfinite,
            "partial": partial,
        }
        loop.close_epoch(record)
        improved = (result is not None and math.isfinite(result.mean_dice)
                    and (loop.best_metric is None or result.mean_dice > loop.best_metric))
        if improved:
            loop.best_metric = result.mean_dice
        if result is not None:
            self.callbacks.on_validation_end(self.info, result)
        self.callbacks.on_epoch_end(self.info, record, loop.history)
        return improved

    def iteration(self, batch: dict[str, Any]) -> None:
        """One :func:`training_step` on ``batch``, the schedule step and the bookkeeping."""
        t0 = time.perf_counter()
        dev, parts, tc = self.ctx.device, self.parts, self.cfg.train
        images = plain_tensor(batch["image"]).to(dev, non_blocking=True).float()
        targets = plain_tensor(batch["label"]).to(dev, non_blocking=True).long()
        res = training_step(parts.train_model, parts.loss_fn, parts.optimizer, images, targets,
                            scaler=parts.scaler, autocast_dtype=parts.autocast_dtype,
                            grad_clip=self.cfg.optim.grad_clip, device_type=dev.type)
        parts.scheduler.step()
        if tc.time_limit_minutes and tc.schedule_by_time:
            parts.scheduler.set_time_progress(self.elapsed() / (tc.time_limit_minutes * 60.0))
        self.state.record_step(float(res.loss), float(res.grad_norm), bool(res.finite))
        self.state.epoch.seconds += time.perf_counter() - t0
        it = self.state.iteration
        self.callbacks.on_iteration_end(self.info, IterationLog(
            iteration=it, epoch=(it - 1) // tc.iterations_per_epoch + 1, loss=float(res.loss),
            finite=bool(res.finite), lr=parts.lr(), sigmas=parts.sigmas(),
            grad_norm=float(res.grad_norm)))

    def report_rate(self, seconds_per_iteration: float, measured: int) -> ScheduleEstimate:
        """Log the measured rate, the planned total and what the time limit allows (and the
        warning with cheaper options when the schedule is far too long); rank 0 writes it to
        ``time_estimate.json`` in the fold folder."""
        tc, plans = self.cfg.train, self.prepared.plans
        est = estimate_schedule(seconds_per_iteration, measured, self.total,
                                self.state.iteration, tc.time_limit_minutes, self.elapsed())
        self.estimate = est
        log.info(est.summary())
        planned = None if plans.decision is None else \
            plans.decision.estimated_seconds_per_iteration
        options = cheaper_options(est, device_type=self.ctx.device.type,
                                  plan_target=plans.target, spatial_dims=plans.spatial_dims,
                                  optim_name=self.cfg.optim.name,
                                  patch_size=list(plans.patch_size),
                                  iterations_per_epoch=tc.iterations_per_epoch,
                                  by_time=tc.schedule_by_time)
        warning = schedule_warning(est, options, by_time=tc.schedule_by_time)
        if warning is not None:
            log.warning(warning)
        if self.ctx.is_main:
            record = {**est.to_json(), "iteration": self.state.iteration,
                      "device": str(self.ctx.device), "plan_target": plans.target,
                      "plan_estimate_seconds_per_iteration": planned, "warning": warning}
            with atomic_path(self.fold_dir / "time_estimate.json") as tmp:
                tmp.write_text(json.dumps(record, indent=2) + "\n")
        return est

    def stopped(self) -> FoldResult:
        """The result of a run stopped by a signal (its checkpoint is saved)."""
        return FoldResult(self.fold_dir, False, "signal",
                          self.signals.received or signal.SIGTERM, self.state.iteration,
                          self.state.best_metric)

    def finish_epoch(self) -> FoldResult | None:
        """Do the pending epoch end (``state.pending_end``: validation, record), then save.

        Returns:
            The run's result when it ends here: stopped by a signal during the validation
            (the checkpoint saved before it stays, still pending), or the final epoch.
        """
        loop = self.state
        pending = loop.pending_end or {"partial": False, "final": False}
        try:
            improved = self.end_epoch(partial=pending["partial"], final=pending["final"])
        except _ValidationAbandoned:
            log.info(f"validation at iteration {loop.iteration} abandoned (stop signal); "
                     "it runs first on --resume")
            return self.stopped()
        loop.pending_end = None
        if pending["final"] and self.val_set is None and self.ctx.is_main:
            self.decide_fold_all_postprocessing()
        self.save(finished=pending["final"], best=improved)
        if not pending["final"]:
            return None
        it, total = loop.iteration, self.total
        if it >= total:
            return FoldResult(self.fold_dir, True, "completed", None, it, loop.best_metric)
        log.info(f"time limit of {self.cfg.train.time_limit_minutes} min reached after {it} "
                 f"of {total} planned iterations ({100.0 * it / total:.0f} %)")
        return FoldResult(self.fold_dir, True, "time_limit", None, it, loop.best_metric)

    def loop(self, loader: DataLoader, signals: StopSignals) -> FoldResult:
        """Iterate until all epochs are done, the time limit is reached, a signal arrives or
        too many non-finite losses occur (see the module docstring).

        Raises:
            UserError: more than ``train.max_nonfinite_steps`` consecutive non-finite losses
                (after saving the checkpoint).
        """
        self.signals = signals
        tc, loop = self.cfg.train, self.state
        every = tc.checkpoint_every_minutes
        self.last_save = time.monotonic()
        if loop.pending_end is not None:  # stopped before an epoch's validation
            result = self.finish_epoch()
            if result is not None:
                return result
        batches = iter(loader)
        try:
            while loop.iteration < self.total:
                t_batch = time.perf_counter()
                self.iteration(next(batches))
                rate = self.probe.add(time.perf_counter() - t_batch)
                if rate is not None:
                    self.report_rate(rate, self.probe.measured)
                it = loop.iteration
                left = self.budget_left()
                stop_signal, time_up, diverged = ddp.any_rank([
                    signals.received is not None, left is not None and left <= 0,
                    loop.consecutive_nonfinite > tc.max_nonfinite_steps], self.ctx)
                if diverged:
                    self.save(False)
                    raise UserError(
                        f"training stopped at iteration {it}: {loop.consecutive_nonfinite} "
                        f"consecutive non-finite losses (train.max_nonfinite_steps = "
                        f"{tc.max_nonfinite_steps}); lower optim.lr, check the data with `uumamba "
                        f"check-data`, or set train.amp=off. Checkpoint: {self.fold_dir / LATEST}")
                boundary = it % tc.iterations_per_epoch == 0
                final = it >= self.total or time_up
                if boundary or final:
                    loop.pending_end = {"partial": not boundary, "final": final}
                    if stop_signal or self.validation_due(not boundary, final):
                        self.save(False)  # before the validation: a signal during it loses nothing
                    if stop_signal:
                        return self.stopped()
                    result = self.finish_epoch()
                    if result is not None:
                        return result
                elif stop_signal:
                    self.save(False)
                    return self.stopped()
                elif every is not None and time.monotonic() - self.last_save >= every * 60.0:
                    self.save(False)
        except BaseException:
            # DataLoader workers ignore SIGTERM (engine.sampling), so multiprocessing's exit
            # handler, which terminates and then joins them, would wait forever for workers
            # still blocked on their index queue: tell them to exit first (torch's own
            # shutdown of the iterator, also what its __del__ runs)
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise
        return FoldResult(self.fold_dir, True, "completed", None, loop.iteration,
                          loop.best_metric)


def _start(cfg: Config, data_dir: Path, folder: ModelFolder, fold: str | int, resume: bool,
           ctx: ddp.DistContext, t_call: float, extra: list[Callback],
           progress: bool) -> FoldResult:
    """Open or resume the run, prepare data and components, run the loop, report the end."""
    fold = parse_fold(fold, cfg.train.n_folds)
    fold_dir = folder.fold_dir(fold)
    if ctx.is_main:
        for stale in remove_stale_temporaries(fold_dir):
            log.info(f"removed {stale.name}, left in {fold_dir} by a killed process")
    if folder.path(PLANS).is_file():  # a planned folder: its choices are the run's settings
        cfg = apply_plan_decision(cfg, folder.load_plans())
    opened = open_run(cfg, fold_dir, resume, ctx.world_size)
    cfg, saved = opened.cfg, opened.saved
    if saved is not None and saved["finished"]:
        log.info(f"{fold_dir}: training already finished at iteration {saved['iteration']} "
                 f"(best mean Dice {_dice(saved['best_metric'])}); nothing to do (train longer "
                 "into a new --output, or with more train.epochs in a new run)")
        return FoldResult(fold_dir, True, "already_finished", None, saved["iteration"],
                          saved["best_metric"])
    tc = cfg.train
    if tc.epochs < 1 or tc.iterations_per_epoch < 1 or tc.val_every < 1:
        raise ConfigError(f"train.epochs ({tc.epochs}), train.iterations_per_epoch "
                          f"({tc.iterations_per_epoch}) and train.val_every ({tc.val_every}) "
                          "must be >= 1")
    seed_everything(tc.seed, tc.deterministic, ctx.device)
    prepared = prepare_everywhere(cfg, data_dir, folder.root, fold, ctx, saved)
    plans = prepared.plans
    cfg = prepared.cfg if prepared.cfg is not None else cfg
    fold_dir.mkdir(parents=True, exist_ok=True)

    cache_dir = folder.path("preprocessed") if tc.cache == "disk" else None
    train_set, val_set, val_ids = prepared.datasets(tc, ctx.rank, ctx.world_size, cache_dir)
    total = tc.epochs * tc.iterations_per_epoch
    parts = build_components(cfg, plans, ctx.device, total)
    state = restore_from_checkpoint(parts, saved, total) if saved is not None else LoopState()
    parts.train_model = ddp.wrap_ddp(parts.model, ctx)
    loader = make_patch_loader(train_set, plans.batch_size, tc.seed, ctx.rank, state.iteration,
                               total, tc.num_workers, pin_memory=ctx.device.type == "cuda",
                               worker_nice=tc.loader_nice)
    if not loader.dataset.reproducible:
        log.warning("warning: the training transforms have no set_random_state; a resumed "
                    "run will not repeat the same augmentations")

    info = RunContext(fold_dir=fold_dir, rank=ctx.rank, world_size=ctx.world_size,
                      start_iteration=state.iteration, total_iterations=total,
                      iterations_per_epoch=tc.iterations_per_epoch,
                      labels={int(k): str(v) for k, v in plans.labels.items()},
                      model=parts.model, loss=parts.loss_fn)
    builtin = default_callbacks(fold_dir, progress) if ctx.is_main else []
    run = _FoldRun(cfg, ctx, fold, fold_dir, prepared, val_set, val_ids,
                   CallbackList([*builtin, *extra]), info, parts, state, t_call,
                   rotate_latest=opened.latest_readable)
    left = run.budget_left()
    if left is not None:
        log.info(f"time budget: {_minutes(run.elapsed())} of {tc.time_limit_minutes} min "
                 f"spent, {_minutes(max(left, 0.0))} left")

    result = FoldResult(fold_dir, False, "error", None, state.iteration, state.best_metric)
    run.callbacks.on_train_start(info)
    try:
        with StopSignals() as signals:
            result = run.loop(loader, signals)
        if run.estimate is None and run.probe.partial() is not None:  # a short session
            run.report_rate(run.probe.partial(), run.probe.measured)
    finally:
        run.callbacks.on_train_end(info, result.finished, result.reason)
    if result.signal is not None:
        left = run.budget_left()
        budget = "" if left is None else f"; {_minutes(max(left, 0.0))} of the time budget left"
        log.info(f"stopped by {signal.Signals(result.signal).name} at iteration "
                 f"{result.iteration}{budget}; continue with --resume ({fold_dir / LATEST})")
    elif result.finished:
        dice = "" if result.best_metric is None else \
            f", best validation mean Dice {result.best_metric:.4f}"
        log.info(f"{fold_dir}: finished after {result.iteration} iterations{dice}")
    return result


def run_fold(cfg: Config, data_dir: str | Path, output_dir: str | Path, fold: str | int = "0",
             resume: bool = False, device: str = "auto",
             callbacks: Sequence[Callback] | None = None, progress: bool = True) -> FoldResult:
    """Train one fold; the full flow is in the module docstring.

    Notes and warnings are logged (``uumamba.engine.*``, rank 0 only); when logging is not
    configured they are printed to standard output for the call
    (:func:`uumamba.logs.default_output`).

    Args:
        cfg: the whole configuration.
        data_dir: dataset folder (any layout :func:`uumamba.data.layouts.discover` knows).
        output_dir: model folder (``runs/NAME``); the fold goes to ``fold_K`` / ``fold_all``.
        fold: ``0`` .. ``n_folds - 1`` or ``all`` (all cases, no validation).
        resume: continue from ``fold_K/checkpoint_latest.pt``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        callbacks: extra callbacks, called on *every* rank after the built-in loggers (which
            run on rank 0 only).
        progress: show the rich progress bar (rank 0).

    Returns:
        :class:`FoldResult`.

    Raises:
        DataError: dataset problems, unreadable checkpoint.
        ConfigError: invalid settings; model folder created with other settings.
        UserError: bad fold or device; a checkpoint exists and ``resume`` is False; too many
            consecutive non-finite losses (after saving the checkpoint).
    """
    t_call = time.monotonic()
    with default_output():
        ctx = ddp.init_distributed(device)
        ok = False
        try:
            with ddp.main_rank_logs(ctx):
                result = _start(cfg, Path(data_dir), ModelFolder(output_dir), fold, resume, ctx,
                                t_call, list(callbacks or []), progress)
            ok = True
            return result
        finally:
            ddp.cleanup(ctx, wait=ok)


def train_fold(cfg: Config, data_dir: str | Path, output_dir: str | Path, fold: str | int = "0",
               resume: bool = False, device: str = "auto", **kwargs: Any) -> Path:
    """Train one fold and return its folder (``output_dir/fold_K`` or ``fold_all``).

    The contract of ``docs/architecture.md``; see :func:`run_fold` for the arguments
    (``callbacks`` and ``progress`` pass through ``kwargs``) and the raised errors.
    """
    return run_fold(cfg, data_dir, output_dir, fold, resume, device, **kwargs).fold_dir
