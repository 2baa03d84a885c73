"""Loggers the training loop calls: progress bar, metrics.jsonl, TensorBoard, pictures.

The loop (:mod:`uumamba.engine.loop`) calls every callback's hooks in order (through a
:class:`CallbackList`); a callback only reads what it is given. The built-in ones (:func:`default_callbacks`) run on rank 0 only and
write into the fold folder:

- :class:`RichProgress`: live bar with loss, σ values, learning rate and iterations/s; one
  summary line per epoch.
- :class:`MetricsJsonl`: ``metrics.jsonl``, one JSON object per epoch (see
  :mod:`uumamba.engine.loop` for the fields), rewritten atomically from the run's history
  so a resumed run never duplicates lines.
- :class:`TensorBoardLogger`: ``tensorboard/`` event files (per-iteration loss, lr, σ;
  per-epoch validation Dice). A resumed run purges events after its start iteration.
- :class:`ProgressPlot`: ``progress.png``, training loss and validation Dice per epoch.
- :class:`ValidationOverlay`: ``validation_overlay.png``, image / reference / prediction on
  a slice of one validation case.

Pictures are drawn with matplotlib's object API on the Agg canvas (no display, no global
pyplot state) and saved through :func:`uumamba.utils.atomic_path`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from uumamba.utils import atomic_path, json_safe


@dataclass
class RunContext:
    """What callbacks may read about the run (set once at the start).

    Attributes:
        fold_dir: the fold folder (``MODEL/fold_K``).
        rank / world_size: this process's rank and the number of processes.
        start_iteration: iterations already done (non-zero on resume).
        total_iterations: epochs × iterations_per_epoch.
        iterations_per_epoch: iterations in one epoch.
        labels: label value -> name from the plan.
        model / loss: the unwrapped network and loss module (read-only for callbacks).
    """

    fold_dir: Path
    rank: int
    world_size: int
    start_iteration: int
    total_iterations: int
    iterations_per_epoch: int
    labels: dict[int, str]
    model: nn.Module | None = None
    loss: nn.Module | None = None


@dataclass
class IterationLog:
    """One training iteration as the loop saw it.

    Attributes:
        iteration: iterations completed, counting this one (1-based, over the whole run).
        epoch: the epoch this iteration belongs to (1-based).
        loss: training loss (float; NaN / inf when non-finite).
        finite: False when the step was skipped for a non-finite loss or gradient.
        lr: learning rate of the first parameter group after the scheduler step.
        sigmas: the loss's learned σ values by term name (empty for fixed-weight losses).
        grad_norm: global gradient norm before clipping.
    """

    iteration: int
    epoch: int
    loss: float
    finite: bool
    lr: float
    sigmas: dict[str, float] = field(default_factory=dict)
    grad_norm: float = float("nan")


class Callback:
    """Base class: every hook does nothing; subclasses override the ones they need."""

    def on_train_start(self, ctx: RunContext) -> None:
        """Called once before the first iteration (after a resume: before the next one)."""

    def on_iteration_end(self, ctx: RunContext, log: IterationLog) -> None:
        """Called after every optimisation step."""

    def on_validation_end(self, ctx: RunContext, result: Any) -> None:
        """Called with a :class:`uumamba.engine.validate.ValidationResult`."""

    def on_epoch_end(self, ctx: RunContext, record: dict[str, Any],
                     history: list[dict[str, Any]]) -> None:
        """Called with this epoch's record and the whole history (records so far)."""

    def on_train_end(self, ctx: RunContext, finished: bool, reason: str) -> None:
        """Called once when the loop ends (``reason``: completed, time_limit, signal, ...)."""


class CallbackList:
    """Calls a list of callbacks in order: ``CallbackList(items).on_epoch_end(...)`` calls
    every item's ``on_epoch_end(...)``."""

    def __init__(self, items: Sequence[Callback]) -> None:
        self.items = list(items)

    def __getattr__(self, hook: str) -> Any:
        def call(*args: Any) -> None:
            for cb in self.items:
                getattr(cb, hook)(*args)
        return call


class MetricsJsonl(Callback):
    """Rewrites ``fold_dir/metrics.jsonl`` (one JSON object per epoch) atomically."""

    def __init__(self, fold_dir: Path) -> None:
        self.path = Path(fold_dir) / "metrics.jsonl"

    def on_epoch_end(self, ctx: RunContext, record: dict[str, Any],
                     history: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(json_safe(r)) + "\n" for r in history)
        with atomic_path(self.path) as tmp:
            tmp.write_text(lines)


class RichProgress(Callback):
    """Live rich progress bar (loss, σ, lr, it/s) plus a summary line per epoch.

    Args:
        console: the ``rich.console.Console`` to draw on; None: a new one on standard output.
            (Messages logged to standard output meanwhile appear above the bar.)
    """

    def __init__(self, console: Any = None) -> None:
        if console is None:
            from rich.console import Console

            console = Console(highlight=False)
        self.console = console
        self._progress = None
        self._task = None
        self._t0 = 0.0
        self._start = 0

    def on_train_start(self, ctx: RunContext) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            ctx.fold_dir.name, total=ctx.total_iterations, completed=ctx.start_iteration, info="")
        self._t0 = time.perf_counter()
        self._start = ctx.start_iteration

    def on_iteration_end(self, ctx: RunContext, log: IterationLog) -> None:
        if self._progress is None:
            return
        speed = (log.iteration - self._start) / max(time.perf_counter() - self._t0, 1e-9)
        sig = " σ " + " ".join(f"{k} {v:.3f}" for k, v in log.sigmas.items()) if log.sigmas else ""
        info = f"loss {log.loss:.4f}{sig} lr {log.lr:.1e} {speed:.2f} it/s"
        self._progress.update(self._task, completed=log.iteration, info=info)

    def on_epoch_end(self, ctx: RunContext, record: dict[str, Any],
                     history: list[dict[str, Any]]) -> None:
        dice = record.get("val_mean_dice")
        val = "" if dice is None else f"  val mean Dice {dice:.4f} " + " ".join(
            f"{k} {v:.3f}" for k, v in (record.get("val_dice") or {}).items())
        sig = ", σ " + " ".join(f"{k} {v:.3f}" for k, v in record["sigmas"].items()) \
            if record.get("sigmas") else ""
        msg = (f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}{sig}, "
               f"{record['time']:.1f} s{val}")
        if record.get("nonfinite_steps"):
            msg += f"  ({record['nonfinite_steps']} non-finite steps skipped)"
        # one line per epoch also when piped to a log file (no wrap at 80 columns)
        (self._progress.console if self._progress else self.console).print(msg, soft_wrap=True)

    def on_train_end(self, ctx: RunContext, finished: bool, reason: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class TensorBoardLogger(Callback):
    """TensorBoard event files in ``fold_dir/tensorboard`` (torch SummaryWriter)."""

    def __init__(self, fold_dir: Path) -> None:
        self.log_dir = Path(fold_dir) / "tensorboard"
        self._writer = None

    def on_train_start(self, ctx: RunContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir),
                                     purge_step=ctx.start_iteration or None)

    def on_iteration_end(self, ctx: RunContext, log: IterationLog) -> None:
        if self._writer is None:
            return
        step = log.iteration
        if log.finite:
            self._writer.add_scalar("train/loss", log.loss, step)
        self._writer.add_scalar("train/lr", log.lr, step)
        if math.isfinite(log.grad_norm):
            self._writer.add_scalar("train/grad_norm", log.grad_norm, step)
        for name, value in log.sigmas.items():
            self._writer.add_scalar(f"sigma/{name}", value, step)

    def on_epoch_end(self, ctx: RunContext, record: dict[str, Any],
                     history: list[dict[str, Any]]) -> None:
        if self._writer is None:
            return
        step = record["iteration"]
        if record.get("train_loss") is not None and math.isfinite(record["train_loss"]):
            self._writer.add_scalar("epoch/train_loss", record["train_loss"], step)
        if record.get("val_mean_dice") is not None:
            self._writer.add_scalar("val/mean_dice", record["val_mean_dice"], step)
            for name, value in (record.get("val_dice") or {}).items():
                if value is not None and math.isfinite(value):
                    self._writer.add_scalar(f"val/dice_{name}", value, step)
        self._writer.flush()

    def on_train_end(self, ctx: RunContext, finished: bool, reason: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


class ProgressPlot(Callback):
    """``fold_dir/progress.png``: training loss (left) and validation Dice (right) by epoch."""

    def __init__(self, fold_dir: Path) -> None:
        self.path = Path(fold_dir) / "progress.png"

    def on_epoch_end(self, ctx: RunContext, record: dict[str, Any],
                     history: list[dict[str, Any]]) -> None:
        fig = _new_figure(11, 4)
        ax_loss, ax_dice = fig.subplots(1, 2)
        epochs = [r["epoch"] for r in history]
        losses = [np.nan if r.get("train_loss") is None else r["train_loss"] for r in history]
        ax_loss.plot(epochs, losses, "o-", color="tab:blue", label="train loss")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.set_title("training loss")
        ax_loss.grid(alpha=0.3)
        val = [r for r in history if r.get("val_mean_dice") is not None]
        if val:
            ve = [r["epoch"] for r in val]
            ax_dice.plot(ve, [r["val_mean_dice"] for r in val], "o-", color="black",
                         label="mean", linewidth=2)
            for name in (val[-1].get("val_dice") or {}):
                ys = [np.nan if (r.get("val_dice") or {}).get(name) is None
                      else r["val_dice"][name] for r in val]
                ax_dice.plot(ve, ys, ".--", label=name)
            ax_dice.legend(loc="lower right", fontsize=8)
        from matplotlib.ticker import MaxNLocator

        for ax in (ax_loss, ax_dice):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_dice.set_ylim(0, 1)
        ax_dice.set_xlabel("epoch")
        ax_dice.set_ylabel("Dice")
        ax_dice.set_title("validation Dice (sliding window)")
        ax_dice.grid(alpha=0.3)
        fig.tight_layout()
        _save_figure(fig, self.path)


class ValidationOverlay(Callback):
    """``fold_dir/validation_overlay.png``: image, reference and prediction on one slice."""

    def __init__(self, fold_dir: Path) -> None:
        self.path = Path(fold_dir) / "validation_overlay.png"

    def on_validation_end(self, ctx: RunContext, result: Any) -> None:
        ov = getattr(result, "overlay", None)
        if ov is None:
            return
        from matplotlib import colormaps
        from matplotlib.colors import ListedColormap

        n = max(ctx.labels) + 1 if ctx.labels else int(max(ov.label.max(), ov.prediction.max())) + 1
        base = colormaps["tab10"].colors
        cmap = ListedColormap([(0, 0, 0, 0)] + [(*base[i % len(base)], 1.0) for i in range(n - 1)])
        fig = _new_figure(12, 4.4)
        axes = fig.subplots(1, 3)
        image = ov.image.T  # (x, y) -> rows y, columns x for display
        titles = [f"image ({ov.case_id}, axis {ov.axis} slice {ov.index})", "reference",
                  f"prediction (mean Dice {result.mean_dice:.3f})"]
        for ax, mask, title in zip(axes, (None, ov.label.T, ov.prediction.T), titles, strict=True):
            ax.imshow(image, cmap="gray", origin="lower")
            if mask is not None:
                ax.imshow(np.ma.masked_equal(mask, 0), cmap=cmap, vmin=0, vmax=max(n - 1, 1),
                          alpha=0.5, origin="lower", interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        from matplotlib.patches import Patch

        handles = [Patch(color=cmap(v), label=name) for v, name in sorted(ctx.labels.items())
                   if v != 0 and v < n]
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
                       frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        _save_figure(fig, self.path)


def default_callbacks(fold_dir: Path, progress: bool = True) -> list[Callback]:
    """The rank-0 loggers: progress bar (optional), metrics.jsonl, TensorBoard, pictures."""
    out: list[Callback] = [RichProgress()] if progress else []
    out += [MetricsJsonl(fold_dir), TensorBoardLogger(fold_dir), ProgressPlot(fold_dir),
            ValidationOverlay(fold_dir)]
    return out
