"""How long the planned schedule will take on this machine, from a few timed iterations.

At the start of every training session the loop (:mod:`uumamba.engine.loop`) runs its first
iterations as usual; after :data:`WARMUP_ITERATIONS` (allocator, oneDNN / cuDNN primitive
creation, first DataLoader batches) a :class:`RateProbe` times the next
:data:`MEASURED_ITERATIONS` iterations (waiting for the batch, step, schedule and logging
included; epoch ends, validation and saves are not), or as many as fit into
:data:`MEASURE_SECONDS`. These are real training iterations: nothing is spent on the
measurement itself. :func:`estimate_schedule` turns the
rate into the planned total time, and with ``train.time_limit_minutes`` how many iterations
the limit allows; :func:`schedule_warning` says plainly when the schedule would take more
than :data:`TOO_LONG_FACTOR` x the limit or more than a day, naming cheaper options.

Everything here is a pure function of its arguments (the probe only of the times it is
given), so it is tested without training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

WARMUP_ITERATIONS = 2
MEASURED_ITERATIONS = 5
MEASURE_SECONDS = 20.0
TOO_LONG_FACTOR = 10.0
ONE_DAY_S = 86_400.0


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``, ``16 days``: the unit a reader expects."""
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * ONE_DAY_S:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / ONE_DAY_S:.0f} days"


@dataclass(frozen=True)
class ScheduleEstimate:
    """The planned schedule's duration at the measured rate.

    Attributes:
        seconds_per_iteration: measured wall time per training iteration.
        measured_iterations: how many iterations the rate is measured over.
        total_iterations: epochs x iterations_per_epoch (the whole run).
        remaining_iterations: iterations this session still has to run at the measurement.
        planned_seconds: the whole schedule at the measured rate (training only; validation
            is not included).
        remaining_seconds: the remaining iterations at the measured rate.
        time_limit_seconds: ``train.time_limit_minutes`` in seconds (None: no limit).
        iterations_in_limit: iterations the remaining time budget allows (None: no limit).
        too_long: the schedule would take more than ``TOO_LONG_FACTOR`` x the time limit,
            or more than a day.
    """

    seconds_per_iteration: float
    measured_iterations: int
    total_iterations: int
    remaining_iterations: int
    planned_seconds: float
    remaining_seconds: float
    time_limit_seconds: float | None
    iterations_in_limit: int | None
    too_long: bool

    def summary(self) -> str:
        """One line: rate, planned total and what the limit allows."""
        line = (f"time estimate: {self.seconds_per_iteration:.2f} s per iteration (measured "
                f"over {self.measured_iterations} after {WARMUP_ITERATIONS} warm-up); "
                f"{self.total_iterations} planned iterations take "
                f"{format_duration(self.planned_seconds)} (training only, validation "
                f"not included)")
        if 0 < self.remaining_iterations < self.total_iterations:
            line += f", {format_duration(self.remaining_seconds)} for the remaining " \
                    f"{self.remaining_iterations}"
        if self.time_limit_seconds is not None and self.iterations_in_limit is not None:
            share = 100.0 * min(self.iterations_in_limit, self.total_iterations) / max(
                self.total_iterations, 1)
            line += (f"; the time limit of {format_duration(self.time_limit_seconds)} allows "
                     f"about {self.iterations_in_limit} iterations ({share:.0f} % of the "
                     "schedule)")
        return line

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``time_estimate.json`` in the fold folder)."""
        return asdict(self)


def estimate_schedule(seconds_per_iteration: float, measured_iterations: int,
                      total_iterations: int, completed_iterations: int,
                      time_limit_minutes: float | None = None,
                      elapsed_seconds: float = 0.0) -> ScheduleEstimate:
    """The planned schedule at a measured rate.

    Args:
        seconds_per_iteration: measured wall time per iteration (> 0).
        measured_iterations: iterations the rate was measured over.
        total_iterations: epochs x iterations_per_epoch.
        completed_iterations: iterations done when the rate was measured (this session's
            and earlier sessions').
        time_limit_minutes: ``train.time_limit_minutes`` (None: no limit).
        elapsed_seconds: seconds of the time budget already spent (all sessions).

    Raises:
        ValueError: a non-positive rate or total.
    """
    if not seconds_per_iteration > 0 or total_iterations < 1:
        raise ValueError(f"need a positive rate and total, got {seconds_per_iteration} s and "
                         f"{total_iterations} iterations")
    remaining = max(total_iterations - completed_iterations, 0)
    planned = total_iterations * seconds_per_iteration
    limit_s = None if time_limit_minutes is None else 60.0 * float(time_limit_minutes)
    in_limit = None
    if limit_s is not None:
        left = max(limit_s - elapsed_seconds, 0.0)
        in_limit = completed_iterations + int(left // seconds_per_iteration)
    too_long = planned > ONE_DAY_S or (limit_s is not None and planned > TOO_LONG_FACTOR * limit_s)
    return ScheduleEstimate(
        seconds_per_iteration=float(seconds_per_iteration),
        measured_iterations=int(measured_iterations), total_iterations=int(total_iterations),
        remaining_iterations=int(remaining), planned_seconds=float(planned),
        remaining_seconds=float(remaining * seconds_per_iteration),
        time_limit_seconds=limit_s, iterations_in_limit=in_limit, too_long=bool(too_long))


#: With the learning rate annealed over the time limit, fewer iterations in it than this are
#: still worth a warning (the README's 3D-on-a-CPU example: 12 of 50 000).
ANNEALED_ENOUGH = 100

def cheaper_options(estimate: ScheduleEstimate, *, device_type: str, plan_target: str,
                    spatial_dims: int, optim_name: str, patch_size: list[int],
                    iterations_per_epoch: int, by_time: bool = False) -> list[str]:
    """What would make the run affordable, most effective first (for the warning); with
    ``by_time`` (the schedule follows the time limit) not fewer epochs or iterations."""
    options = []
    if device_type == "cpu" and plan_target != "cpu":
        options.append("--set plan.target=cpu (a plan sized to this CPU's speed; into a new "
                       "--output, the plan is part of the model)")
    if optim_name in ("sam", "asam", "rst"):
        options.append(f"--set optim.name=looksam or ema_kl ({optim_name} runs up to two "
                       "forward-backward passes per iteration; LookSAM about 1.2, EMA-KL 1.3), "
                       "or --set optim.name=adamw --set optim.lr=2e-3 (one pass, at the CPU "
                       "plan's learning rate)")
    if spatial_dims == 3:
        options.append("--set model.spatial_dims=2 (slice-wise 2D training)")
    smaller = [max(8, p // 2) if i == max(range(len(patch_size)), key=patch_size.__getitem__)
               else p for i, p in enumerate(patch_size)]
    options.append("a smaller patch, e.g. --set plan.patch_size="
                   + "[" + ",".join(str(p) for p in smaller) + "]")
    if by_time and estimate.time_limit_seconds is not None:
        return options
    budget = estimate.time_limit_seconds or ONE_DAY_S
    what = "the time limit" if estimate.time_limit_seconds else "a day"
    fit = max(1, int(budget // estimate.seconds_per_iteration))
    if fit >= iterations_per_epoch:
        options.append(f"fewer epochs: --set train.epochs={fit // iterations_per_epoch} fits "
                       f"{what}")
    else:
        options.append(f"fewer iterations: --set train.epochs=1 --set "
                       f"train.iterations_per_epoch={fit} fits {what}")
    return options


def schedule_warning(estimate: ScheduleEstimate, options: list[str], *,
                     by_time: bool = False) -> str | None:
    """The plain warning for a schedule that is too long (None when it is not).

    With ``by_time`` (``train.schedule_by_time``: the learning rate anneals over the time
    limit, as in ``configs/acdc_cpu.yaml``) the limit ends training by design, so a schedule
    longer than the limit is no warning while the limit still allows
    :data:`ANNEALED_ENOUGH` iterations; the estimate's own line says how many."""
    if not estimate.too_long:
        return None
    if (by_time and estimate.time_limit_seconds is not None
            and (estimate.iterations_in_limit or 0) >= ANNEALED_ENOUGH):
        return None
    planned = format_duration(estimate.planned_seconds)
    if estimate.time_limit_seconds is not None and estimate.iterations_in_limit is not None:
        done = min(estimate.iterations_in_limit, estimate.total_iterations)
        why = (f"the planned schedule needs {planned} on this machine, "
               f"{estimate.planned_seconds / estimate.time_limit_seconds:.0f} x the time limit "
               f"of {format_duration(estimate.time_limit_seconds)}: only about {done} of "
               f"{estimate.total_iterations} iterations will run")
    else:
        why = f"the planned schedule needs {planned} on this machine (more than a day)"
    return "warning: " + why + ". Cheaper options: " + "; ".join(options)


class RateProbe:
    """Measures seconds per iteration after a warm-up (see the module docstring).

    The loop calls :meth:`add` with each iteration's wall time (waiting for the batch, the
    step, the schedule and the per-iteration logging; epoch ends, validation and checkpoint
    saves are not part of it). The first ``warmup`` are skipped; :meth:`add` returns the mean
    of the next ones once ``iterations`` are measured or their sum reaches ``max_seconds``
    (once; None before and after). :meth:`partial` gives the mean over what was measured so
    far (a session that ends early), or None.
    """

    def __init__(self, warmup: int = WARMUP_ITERATIONS, iterations: int = MEASURED_ITERATIONS,
                 max_seconds: float = MEASURE_SECONDS) -> None:
        if warmup < 0 or iterations < 1:
            raise ValueError(f"RateProbe needs warmup >= 0 and iterations >= 1, got {warmup} "
                             f"and {iterations}")
        self.warmup, self.iterations, self.max_seconds = warmup, iterations, max_seconds
        self.seen = 0
        self.times: list[float] = []
        self.done = False

    @property
    def measured(self) -> int:
        """Iterations measured so far (warm-up excluded)."""
        return len(self.times)

    def add(self, seconds: float) -> float | None:
        """Record one iteration's wall time; the rate when the measurement completes."""
        if self.done:
            return None
        self.seen += 1
        if self.seen <= self.warmup:
            return None
        self.times.append(float(seconds))
        if len(self.times) >= self.iterations or sum(self.times) >= self.max_seconds:
            self.done = True
            return sum(self.times) / len(self.times)
        return None

    def partial(self) -> float | None:
        """Mean seconds per iteration over the iterations measured so far (None: none)."""
        return sum(self.times) / len(self.times) if self.times else None
