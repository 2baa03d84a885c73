"""Running an ablation: validate the whole request up front, write the shared split and plan,
and run every (cell, seed, fold) in a child process, resumably.

:func:`make_request` checks every flag and loads every cell's configuration (a bad grid,
value, fold, seed, reference, ``--jobs`` or a changed rerun fails here, before anything is
written or trained). :func:`run_ablation` then

1. checks the dataset once (:func:`uumamba.data.check.check_dataset`), makes the split
   (patient-grouped, from the base configuration's ``train.n_folds`` and ``train.seed``: not
   from the run's seed) and the plan (once, from the base configuration for the training
   device);
2. only when all of these succeeded, records the request in ``OUTPUT/grid.json`` (grid,
   budget, folds, seeds, the base configuration, the data folder) and writes
   ``OUTPUT/splits.json`` and ``OUTPUT/plans.json``. A later invocation into the same
   ``OUTPUT`` must agree with the record in all of these; a first invocation that failed
   before (bad data, too few patients for the folds, a plan that cannot be made) leaves no
   record, so it can be rerun with other arguments;
3. gives every run's model folder ``OUTPUT/cells/SLUG/seed_S/`` a copy of that
   ``splits.json`` (so every cell and seed trains and is scored on the same cases; a model
   folder holding another split is refused) and, unless the cell varies a setting the plan
   is made from (:data:`uumamba.ablation.grid.PLAN_KEYS`), of that ``plans.json`` (same
   spacing, patch, batch and topology for every cell);
4. runs each run whose ``fold_K/scores.json`` is missing as ``python -m
   uumamba.ablation.child`` (:mod:`uumamba.ablation.child`: train with ``resume=True``,
   predict, score), one after another or ``jobs`` at a time, each with ``threads`` OpenMP /
   MKL / OpenBLAS / numba / torch threads, its output appended to ``fold_K.log`` beside
   the fold folder.

A finished run is never rerun; an interrupted one resumes from its checkpoint, its time
budget summed over the sessions (:mod:`uumamba.engine.resume`). SIGINT / SIGTERM are passed
on to the running children once (each saves its checkpoint and stops); no further run
starts; a second SIGINT aborts them. Any other exception in the parent stops the running
children (SIGTERM) and waits for them before it propagates: no child outlives its parent's
error.

One invocation at a time: :func:`run_ablation` holds ``OUTPUT/.lock``
(:mod:`uumamba.ablation.lock`) throughout, and each child holds its run's ``fold_K.lock``,
so neither a second ``uumamba ablate`` into the same folder nor a child orphaned by a
killed parent can mix its runs with another's. Before anything is written, the cells that use
the shared plan have their network and loss built once on the ``meta`` device (no memory,
no compute), so a grid value the configuration accepts but the network or loss refuses
(``model.n_blocks_per_stage`` of the wrong length, ``loss.focal_alpha`` of the wrong
length) fails here, naming the cell. Every file is written atomically and durably
(:func:`uumamba.utils.atomic_path` with ``durable=True``); every JSON file read is bounded
(:func:`uumamba.ablation.scores.read_json`); a cached ``scores.json`` of other settings (or
of another run) is refused, naming the file (:func:`uumamba.ablation.scores.read_scores`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import typing
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uumamba.ablation.grid import (
    Axis,
    Cell,
    canonical,
    cells_of,
    find_reference,
    parse_folds,
    parse_grid,
    parse_seeds,
)
from uumamba.ablation.lock import FileLock, LockBusy
from uumamba.ablation.scores import (
    SCORES,
    check_json_size,
    config_digest,
    read_json,
    read_scores,
)
from uumamba.config import Config, load_config
from uumamba.errors import ConfigError, DataError, UserError
from uumamba.utils import atomic_path, check_output_folder

log = logging.getLogger(__name__)

#: The request's record in OUTPUT (what a rerun must agree with).
RECORD = "grid.json"
SPLITS = "splits.json"
PLANS = "plans.json"
#: The lock file :func:`run_ablation` holds in OUTPUT.
LOCK = ".lock"
#: Longest child error message kept in :class:`AblationOutcome` (and printed).
MAX_MESSAGE = 500
#: How much of the end of a child's log is searched for its error line.
LOG_TAIL_BYTES = 64 * 1024
#: A fold's latest checkpoint (:data:`uumamba.model_folder.checkpoints.LATEST`, not imported:
#: that module loads torch, and a request is validated without it).
CHECKPOINT = "checkpoint_latest.pt"
#: Environment variables that set the thread pools of a child (torch's OpenMP, MKL,
#: OpenBLAS, numba's CPU scan kernel).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMBA_NUM_THREADS")
#: torchrun's variables are not passed on: each child is one single-process training.
_DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                          "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK")
#: Record fields a rerun into the same OUTPUT must repeat, with the flag that sets each.
_RECORDED = {"grid": "--grid", "minutes": "--minutes", "folds": "--folds", "seeds": "--seeds",
             "settings": "--config / --set", "data": "--data"}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class AblationRequest:
    """A validated ablation (see :func:`make_request`).

    Attributes:
        config / overrides: the base configuration file and its ``--set`` overrides.
        data / output: the dataset folder and the ablation's folder.
        axes / cells: the grid and its cells (first axis slowest).
        reference: the cell the others are compared with.
        minutes: every run's ``train.time_limit_minutes`` (None: the configuration's).
        folds / seeds: the folds trained and scored; the ``train.seed`` of each run.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, for every run.
        jobs / threads: runs in parallel; threads of each run.
        base: the base configuration (``config`` + ``overrides``), validated.
        cell_configs: each cell's configuration (base, cell values, budget; no seed),
            validated, in ``cells`` order.
    """

    config: Path | None
    overrides: list[str]
    data: Path
    output: Path
    axes: list[Axis]
    cells: list[Cell]
    reference: Cell
    minutes: float | None
    folds: list[int]
    seeds: list[int]
    device: str
    jobs: int
    threads: int
    base: Config
    cell_configs: list[Config] = field(default_factory=list, repr=False)
    _digests: dict[tuple[str, int], str] = field(default_factory=dict, repr=False)

    def configs(self) -> list[Config]:
        """Each cell's configuration (base ``--set``, the cell's values, the budget), in
        ``cells`` order (:attr:`cell_configs`, loaded again when the request was built
        without them)."""
        if len(self.cell_configs) != len(self.cells):
            extra = [] if self.minutes is None else [f"train.time_limit_minutes={self.minutes}"]
            self.cell_configs = [load_config(self.config, [*self.overrides, *c.overrides(),
                                                           *extra]) for c in self.cells]
        return self.cell_configs

    def run_digest(self, cell: Cell, seed: int) -> str:
        """:func:`uumamba.ablation.scores.config_digest` of one run's full configuration (what
        its child loads: :meth:`run_overrides`), as its ``scores.json`` must record it.

        Raises:
            ConfigError: the configuration file became unreadable or invalid.
        """
        key = (cell.label, seed)
        if key not in self._digests:
            self._digests[key] = config_digest(load_config(self.config,
                                                           self.run_overrides(cell, seed)))
        return self._digests[key]

    def run_overrides(self, cell: Cell, seed: int) -> list[str]:
        """``--set`` overrides of one run: the base ones, the cell's, budget and seed."""
        extra = [] if self.minutes is None else [f"train.time_limit_minutes={self.minutes}"]
        return [*self.overrides, *cell.overrides(), *extra, f"train.seed={seed}"]

    def record(self) -> dict[str, Any]:
        """What ``OUTPUT/grid.json`` holds (JSON values)."""
        return json.loads(json.dumps({
            "version": 1,
            "grid": [{"key": a.key, "values": list(a.texts)} for a in self.axes],
            "cells": [c.label for c in self.cells],
            "minutes": self.minutes, "folds": self.folds, "seeds": self.seeds,
            "config": None if self.config is None else str(self.config),
            "config_resolved": None if self.config is None else str(self.config.resolve()),
            "set": list(self.overrides),
            "settings": self.base.model_dump(mode="json"),
            "data": str(Path(self.data).resolve()),
        }))


@dataclass(frozen=True)
class RunTask:
    """One training of an ablation: a cell, a seed and a fold.

    Attributes:
        cell / seed / fold: what is trained.
        model_dir: ``OUTPUT/cells/SLUG/seed_S`` (the folds of one cell and seed share it).
    """

    cell: Cell
    seed: int
    fold: int
    model_dir: Path

    @property
    def fold_dir(self) -> Path:
        return self.model_dir / f"fold_{self.fold}"

    @property
    def scores_path(self) -> Path:
        """``fold_K/scores.json``: written last, so its presence means the run is done."""
        return self.fold_dir / SCORES

    @property
    def log_path(self) -> Path:
        """``fold_K.log`` beside the fold folder: the child's output, appended per session."""
        return self.model_dir / f"fold_{self.fold}.log"

    @property
    def name(self) -> str:
        return f"{self.cell.label} seed {self.seed} fold {self.fold}"


def tasks_of(request: AblationRequest) -> list[RunTask]:
    """Every run of the request: cells in grid order, then seeds, then folds."""
    return [RunTask(cell, seed, fold, request.output / "cells" / cell.slug / f"seed_{seed}")
            for cell in request.cells for seed in request.seeds for fold in request.folds]


def _set_keys(overrides: list[str]) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in overrides if "=" in item}


def _check_record(output: Path, record: dict[str, Any]) -> None:
    """Refuse a request that differs from the one recorded in ``OUTPUT/grid.json``.

    Raises:
        UserError: naming the flags that differ; ``grid.json`` is there but not a regular
            file. DataError: an unreadable or too large record.
    """
    path = Path(output) / RECORD
    if not path.is_file():
        if os.path.lexists(path):
            raise UserError(f"--output {output}: {path} exists but is not a regular file; "
                            "remove it, or use another --output")
        return
    old = read_json(path)
    if not isinstance(old, dict):
        raise DataError(f"{path}: not an ablation record (expected a JSON object)")
    differ = [flag for key, flag in _RECORDED.items() if old.get(key) != record[key]]
    if differ:
        shown = "; ".join(
            f"{flag} {old.get(key)!r} -> {record[key]!r}" if key in ("minutes", "folds", "seeds")
            else f"other {flag}" for key, flag in _RECORDED.items() if flag in differ)
        started = any(Path(output).glob(f"cells/*/seed_*/fold_*/{SCORES}")) or \
            any(Path(output).glob(f"cells/*/seed_*/fold_*/{CHECKPOINT}"))
        fresh = "" if started else (f"; no run of it has trained yet, so deleting {output} "
                                    "and starting again loses nothing")
        raise UserError(f"--output {output}: holds an ablation made with other arguments "
                        f"({shown}); rerun with the arguments recorded in {path}, or use "
                        f"another --output{fresh}")


#: Optimizers that are themselves a base optimizer (``optim.base``'s choices); every other
#: ``optim.name`` wraps ``optim.base``.
PLAIN_OPTIMIZERS: tuple[str, ...] = typing.get_args(
    Config.model_fields["optim"].annotation.model_fields["base"].annotation)


def mixed_base_warning(cells: list[Cell], configs: list[Config], grid_keys: list[str]) -> str:
    """A warning line when wrapping-optimizer cells run over another base optimizer than the
    grid's plain-optimizer cells (``adamw`` vs ``looksam`` over the default ``sgd``: the
    comparison then mixes two changes); ``""`` when there is nothing to warn about.

    Args:
        cells / configs: the grid's cells and each one's loaded configuration.
        grid_keys: the grid's keys (a suggested ``--set optim.base`` must not be one).
    """
    plain = list(dict.fromkeys(c.optim.name for c in configs if c.optim.name in PLAIN_OPTIMIZERS))
    if not plain:
        return ""
    odd = [(cell, cfg.optim) for cell, cfg in zip(cells, configs, strict=True)
           if cfg.optim.name not in PLAIN_OPTIMIZERS and cfg.optim.base not in plain]
    if not odd:
        return ""
    shown = "; ".join(f"{cell.label} ({optim.name} over {optim.base})" for cell, optim in odd)
    if "optim.base" in grid_keys:
        advice = f"compare them with the cells of optim.base={plain[0]}"
    elif len(plain) == 1:
        advice = f"add --set optim.base={plain[0]} to compare optimizers over the same base"
    else:
        advice = (f"add --set optim.base={plain[0]} (or another of {', '.join(plain)}) to "
                  "compare optimizers over the same base")
    return (f"warning: wrapping-optimizer cell(s) {shown} run over optim.base "
            f"{', '.join(dict.fromkeys(o.base for _, o in odd))}, while the plain-optimizer "
            f"cell(s) use {', '.join(plain)}: their difference mixes the wrapper and the base "
            f"optimizer; {advice}")


def make_request(*, data: Path, output: Path, grid: list[str], config: Path | None = None,
                 overrides: list[str] | None = None, minutes: float | None = None,
                 folds: str = "0", seeds: str | None = None, reference: str | None = None,
                 device: str = "auto", jobs: int = 1, threads: int | None = None,
                 cores: int | None = None) -> AblationRequest:
    """Parse and validate everything an ablation needs, before anything runs.

    Every cell's configuration (base ``--set`` overrides, the cell's values, budget and seed)
    is loaded and validated; nothing is written.

    Args:
        data / output: dataset folder; the ablation's folder.
        grid: the ``--grid KEY=V1,V2`` flags (:mod:`uumamba.ablation.grid`).
        config / overrides: base configuration file (None: the defaults) and ``--set`` items.
        minutes: each run's ``train.time_limit_minutes`` (None: the configuration's).
        folds: comma-separated folds (``0 .. train.n_folds - 1``).
        seeds: comma-separated ``train.seed`` values, one run each (None: the configuration's
            seed).
        reference: the cell to compare with (``key=value,...`` or its folder name; None: the
            first cell).
        device / jobs / threads: where and how many runs at a time, with how many threads
            each (None: ``cores // jobs``).
        cores: CPU cores to plan for (None: :func:`available_cores`).

    Raises:
        UserError: naming the flag and the rule: ``--output`` that is not a folder; a bad
            grid (see :func:`uumamba.ablation.grid.parse_axis`; more than
            :data:`~uumamba.ablation.grid.MAX_CELLS` cells), a grid value the configuration
            refuses (``--grid KEY=VALUE: ...``), two values of an axis or two cells that
            give the same validated configuration (``optim.lr=0.001,1e-3``), a cell the
            configuration refuses, bad ``--folds`` / ``--seeds`` (``0 .. 2**32 - 1``) /
            ``--minutes`` / ``--reference``, ``--jobs`` above the cores or < 1,
            ``--threads`` above the cores or < 1, ``--set`` of a grid key, or of the seed or
            budget next to ``--seeds`` / ``--minutes``, or an ``OUTPUT/grid.json`` made with
            other arguments (or that is not a regular file).
        ConfigError: the base configuration (file or ``--set``) is invalid.

    Logs a warning (and still returns the request) for a grid of one cell, and for
    wrapping-optimizer cells over another base than the plain-optimizer cells
    (:func:`mixed_base_warning`).
    """
    overrides = list(overrides or [])
    check_output_folder(output)
    axes = parse_grid(list(grid))
    cells = cells_of(axes)
    set_keys = _set_keys(overrides)
    both = [a.key for a in axes if a.key in set_keys]
    if both:
        raise UserError(f"--set {both[0]}: also a --grid axis; the grid gives its values, so "
                        "drop it from --set")
    if seeds is not None and "train.seed" in set_keys:
        raise UserError("--set train.seed: the seeds of an ablation are given by --seeds; "
                        "drop one of them")
    if minutes is not None and "train.time_limit_minutes" in set_keys:
        raise UserError("--set train.time_limit_minutes: the budget of an ablation is given by "
                        "--minutes; drop one of them")
    if minutes is not None and (not math.isfinite(minutes) or minutes <= 0):
        raise UserError(f"--minutes {minutes}: the training budget must be a positive number "
                        "of minutes")
    base = load_config(config, overrides)
    fold_list = parse_folds(folds, base.train.n_folds)
    seed_list = [base.train.seed] if seeds is None else parse_seeds(seeds)
    budget = [] if minutes is None else [f"train.time_limit_minutes={minutes}"]
    for axis in axes:  # each value on its own first: the message names the value
        same: dict[str, str] = {}
        for text in axis.texts:
            try:
                cfg = load_config(config, [*overrides, f"{axis.key}={text}"])
            except ConfigError as exc:
                raise UserError(f"--grid {axis.key}={text}: {exc}") from None
            other = same.setdefault(canonical(cfg.model_dump(mode="json")), text)
            if other != text:
                raise UserError(f"--grid {axis.key}: values {other!r} and {text!r} give the "
                                "same configuration; give each value once")
    cell_configs = []
    seen: dict[str, Cell] = {}
    for cell in cells:
        try:
            cfg = load_config(config, [*overrides, *cell.overrides(), *budget])
        except ConfigError as exc:
            raise UserError(f"--grid cell {cell.label}: {exc}") from None
        other = seen.setdefault(canonical(cfg.model_dump(mode="json")), cell)
        if other is not cell:
            raise UserError(f"--grid: cells {other.label} and {cell.label} give the same "
                            "configuration; give values that differ")
        cell_configs.append(cfg)
    ref = find_reference(cells, reference)
    cores = cores or available_cores()
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: must be at least 1")
    if jobs > cores:
        raise UserError(f"--jobs {jobs}: more parallel runs than the {cores} CPU core(s) of "
                        f"this machine; use --jobs {cores} or fewer")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    if threads is not None and threads > cores:
        raise UserError(f"--threads {threads}: more threads per run than the {cores} CPU "
                        f"core(s) of this machine; use --threads {cores} or fewer")
    threads = threads if threads is not None else max(1, cores // jobs)
    if jobs * threads > cores:
        log.warning(f"warning: --jobs {jobs} x --threads {threads} = {jobs * threads} threads "
                    f"on {cores} core(s): the runs slow each other down, and each gets fewer "
                    "iterations within its budget")
    request = AblationRequest(
        config=None if config is None else Path(config), overrides=overrides, data=Path(data),
        output=Path(output), axes=axes, cells=cells, reference=ref, minutes=minutes,
        folds=fold_list, seeds=seed_list, device=device, jobs=jobs, threads=threads, base=base,
        cell_configs=cell_configs)
    _check_record(request.output, request.record())
    if len(cells) == 1:
        log.warning(f"warning: the grid has one cell ({cells[0].label}): nothing to compare it "
                    "with; it is trained and scored alone (give a --grid axis two or more "
                    "values to compare)")
    mixed = mixed_base_warning(cells, cell_configs, [a.key for a in axes])
    if mixed:
        log.warning(mixed)
    return request


@dataclass
class AblationOutcome:
    """What :func:`run_ablation` did.

    Attributes:
        tasks: every run of the ablation.
        cached: runs already done before this invocation (``scores.json`` present).
        ran: runs done by this invocation.
        failed: ``(run, message)`` for each run whose child failed (the message is the
            child's error line and names its log).
        signal: the stop signal passed on to the children, else None.
    """

    tasks: list[RunTask]
    cached: list[RunTask] = field(default_factory=list)
    ran: list[RunTask] = field(default_factory=list)
    failed: list[tuple[RunTask, str]] = field(default_factory=list)
    signal: int | None = None


def _output_error(output: Path, verb: str, path: Path, exc: OSError) -> UserError:
    """``--output OUTPUT: cannot create/write PATH: <strerror>``."""
    return UserError(f"--output {output}: cannot {verb} {path}: {exc.strerror or exc}")


def _make_dirs(output: Path, path: Path) -> None:
    """``mkdir -p path``.

    Raises:
        UserError: naming ``--output`` and the system's reason (a file in the way, no
            permission, a full disk).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _output_error(output, "create", path, exc) from None


def _write_json(output: Path, path: Path, value: Any) -> None:
    """``value`` as indented JSON into ``path``, atomically and durably.

    Raises:
        UserError: naming ``--output`` and the system's reason.
    """
    try:
        with atomic_path(path, durable=True) as tmp:
            tmp.write_text(json.dumps(value, indent=2) + "\n")
    except OSError as exc:
        raise _output_error(output, "write", path, exc) from None


def read_splits(path: Path, n_folds: int, cases: Any = None) -> list[dict[str, list[str]]]:
    """An ablation's ``splits.json`` (size-bounded), with ``n_folds`` folds.

    Raises:
        DataError: too large, unreadable, inconsistent (:func:`uumamba.data.splits.load_splits`,
            which also checks the case ids against ``cases`` when given), or another number
            of folds.
    """
    from uumamba.data.splits import load_splits

    check_json_size(path)
    splits = load_splits(path, cases)
    if len(splits) != n_folds:
        raise DataError(f"{path}: {len(splits)} fold(s), but train.n_folds is {n_folds}")
    return splits


def _shared_split(request: AblationRequest, index: Any) -> list[dict[str, list[str]]]:
    """The ablation's split: ``OUTPUT/splits.json`` when it exists, else made from the base
    configuration (not written here: :func:`run_ablation` writes it with the record).

    Raises:
        DataError: too few patients for ``train.n_folds`` (naming the ``--set train.n_folds``
            that fits); an unreadable, too large or inconsistent file.
    """
    from uumamba.data.splits import make_splits

    path = request.output / SPLITS
    tc = request.base.train
    if os.path.lexists(path):
        return read_splits(path, tc.n_folds, index.cases)
    try:
        return make_splits(index.cases, tc.n_folds, tc.seed)
    except ValueError as exc:
        groups = len({case.group for case in index.cases})
        fix = (f"use --set train.n_folds={groups} or fewer" if groups >= 2
               else "at least 2 patients are needed to split into folds")
        raise DataError(f"{request.data}: cannot split into train.n_folds = {tc.n_folds} "
                        f"folds: {exc}; {fix}") from None


def _shared_plan(request: AblationRequest, index: Any, device_type: str) -> Any:
    """The ablation's plan: ``OUTPUT/plans.json`` when it exists, else planned from the base
    configuration (not written here: :func:`run_ablation` writes it with the record)."""
    from uumamba.data.plan import Plans, plan_dataset

    path = request.output / PLANS
    if os.path.lexists(path):
        check_json_size(path)
        return Plans.load(path)
    cfg = request.base
    plans = plan_dataset(index, cfg.dataset, cfg.plan, cfg.model, cfg.optim, device_type)
    if plans.decision is not None:
        log.info(f"shared plan: {plans.decision.reason}")
    return plans


def _build_once(cfg: Config, plans: Any, device: Any) -> None:
    import torch

    from uumamba.losses import build_loss
    from uumamba.nn import build_network

    with torch.device(device):
        network = build_network(cfg.model, plans)
        n_outputs = network.n_deep_supervision_outputs if cfg.model.deep_supervision else 1
        build_loss(cfg.loss, plans.num_classes, cfg.dataset.ignore_label, n_outputs)


def check_cells_build(cells: list[Cell], configs: list[Config], plans: Any) -> None:
    """Build each cell's network and loss once, as its training will, with the shared plan:
    on the ``meta`` device (shapes only: no memory, no compute), on the CPU where an
    operation has no meta implementation.

    Args:
        cells / configs: the cells (that use the shared plan) and their configurations.
        plans: the shared plan (:class:`uumamba.data.plan.Plans`).

    Raises:
        UserError: ``--grid cell LABEL: ...``: a value the configuration schema accepts but
            the network or the loss refuses (the first such cell).
    """
    from uumamba.data.plan import apply_plan_decision

    for cell, cfg in zip(cells, configs, strict=True):
        cfg = apply_plan_decision(cfg, plans)
        try:
            try:
                _build_once(cfg, plans, "meta")
            except (RuntimeError, NotImplementedError):  # an op without a meta kernel
                _build_once(cfg, plans, "cpu")
        except (ValueError, ConfigError) as exc:
            raise UserError(f"--grid cell {cell.label}: {exc}") from None


def _check_data(request: AblationRequest) -> Any:
    """Discover the dataset and run the integrity check once, before any run.

    Raises:
        DataError: the layout is not recognised, or fatal problems (the first ones listed).
    """
    from uumamba.data import layouts
    from uumamba.data.check import check_dataset

    cfg = request.base
    index = layouts.discover(request.data, layout=cfg.dataset.layout)
    report = check_dataset(index, cfg.dataset, cfg.model.spatial_dims)
    for p in report.warnings:
        log.warning(f"warning: {p.file}: {p.message}")
    if report.fatal:
        shown = "; ".join(f"{p.file}: {p.message}" for p in report.errors[:3])
        raise DataError(f"{request.data}: {len(report.errors)} problem(s) stop training "
                        f"(`uumamba check-data {request.data}` lists them all): {shown}")
    return index


def _prepare_model_folder(output: Path, task: RunTask, splits: list[dict[str, list[str]]],
                          plans: Any) -> None:
    """Give the run's model folder the shared ``splits.json`` (and ``plans.json``), creating
    the folder if needed (again before each child starts: it may have been deleted).

    Raises:
        UserError: the folder already holds another split; it cannot be created or written
            (naming ``--output`` and the reason); DataError: its ``splits.json`` is
            unreadable.
    """
    _make_dirs(output, task.model_dir)
    path = task.model_dir / SPLITS
    if not os.path.lexists(path):
        _write_json(output, path, splits)
    elif read_splits(path, len(splits)) != splits:
        raise UserError(f"{path}: differs from the ablation's {SPLITS}; every run must use "
                        "the same split (remove that model folder to retrain it)")
    if plans is not None and not task.cell.plans_itself and \
            not os.path.lexists(task.model_dir / PLANS):
        _write_json(output, task.model_dir / PLANS, plans.model_dump(mode="json"))


def _child_command(request: AblationRequest, task: RunTask) -> list[str]:
    cmd = [sys.executable, "-m", "uumamba.ablation.child",
           "--data", str(request.data.resolve()), "--model", str(task.model_dir.resolve()),
           "--fold", str(task.fold), "--device", request.device,
           "--threads", str(request.threads), "--cell", task.cell.label,
           "--seed", str(task.seed)]
    if request.config is not None:
        cmd += ["--config", str(request.config.resolve())]
    for item in request.run_overrides(task.cell, task.seed):
        cmd += ["--set", item]
    return cmd


def _child_environment(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_VARIABLES}
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    return env


def _short(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line, cut to ``limit`` characters (ending in ``...`` when cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _last_error(log_path: Path) -> str:
    """The child's ``error: ...`` line (else its last line) from the end of its log, at most
    :data:`MAX_MESSAGE` characters."""
    try:
        with log_path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            tail = fh.read(LOG_TAIL_BYTES).decode("utf-8", "replace")
    except OSError:
        return "no log"
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return _short((errors or lines or ["no output"])[-1])


def _scores_summary(path: Path) -> str:
    try:
        s = read_json(path)
        dice = s.get("foreground_mean_dice")
        return (f"{int(s['iterations'])} iterations in {float(s['seconds']):.0f} s, foreground "
                "Dice " + ("n/a" if dice is None else f"{float(dice):.3f}"))
    except (DataError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return "scores unreadable"


class _Children:
    """The running child processes (at most ``jobs``), their logs and outcomes."""

    def __init__(self, request: AblationRequest, outcome: AblationOutcome, total: int,
                 splits: list[dict[str, list[str]]], plans: Any) -> None:
        self.request, self.outcome, self.total = request, outcome, total
        self.splits, self.plans = splits, plans
        self.running: dict[subprocess.Popen, tuple[RunTask, Any]] = {}
        self.started = 0

    def _fail(self, task: RunTask, message: str) -> None:
        message = _short(message)
        self.outcome.failed.append((task, message))
        log.warning(f"{task.name}: failed: {message}")

    def start(self, task: RunTask) -> None:
        """Start the run's child; a model folder or log that cannot be (re)made, or a child
        that cannot be started, is a failed run (the others still run)."""
        self.started += 1
        try:
            _prepare_model_folder(self.request.output, task, self.splits, self.plans)
            handle = task.log_path.open("ab")
        except UserError as exc:
            self._fail(task, f"not started: {exc}")
            return
        except OSError as exc:
            self._fail(task, f"not started: cannot open {task.log_path}: "
                             f"{exc.strerror or exc}")
            return
        try:
            handle.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} uumamba ablate: "
                         f"{task.name} ==\n".encode())
            handle.flush()
            # its own session: a Ctrl-C in the terminal reaches this process only, which
            # passes it on once (a second SIGINT would abort the child's checkpoint save)
            proc = subprocess.Popen(_child_command(self.request, task), stdout=handle,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=_child_environment(self.request.threads),
                                    start_new_session=True)
        except OSError as exc:
            handle.close()
            self._fail(task, f"not started: {exc.strerror or exc} (log {task.log_path})")
            return
        except BaseException:
            handle.close()
            raise
        self.running[proc] = (task, handle)
        log.info(f"[{self.started}/{self.total}] {task.name}: started "
                 f"({self.request.threads} thread(s); log {task.log_path})")

    def reap(self) -> None:
        """Collect the children that have exited."""
        for proc in [p for p in self.running if p.poll() is not None]:
            task, handle = self.running.pop(proc)
            handle.close()
            code = proc.returncode
            if code == 0 and task.scores_path.is_file():
                self.outcome.ran.append(task)
                log.info(f"{task.name}: done, {_scores_summary(task.scores_path)}")
            elif code in (128 + signal.SIGINT, 128 + signal.SIGTERM) or code < 0:
                if (task.fold_dir / CHECKPOINT).is_file():
                    log.info(f"{task.name}: stopped (checkpoint saved; the next invocation "
                             "resumes it)")
                else:
                    log.info(f"{task.name}: stopped before its first checkpoint; it restarts "
                             "next time")
            else:
                self._fail(task, f"{_last_error(task.log_path)} (exit status {code}; log "
                                 f"{task.log_path})")

    def signal_all(self, signum: int) -> None:
        for proc in self.running:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signum)

    def wait_all(self) -> None:
        for proc in list(self.running):
            proc.wait()
        self.reap()

    def stop(self, signum: int) -> None:
        """Signal every running child, wait for all of them and close their logs (a Ctrl-C
        while waiting aborts them with SIGINT and waits again)."""
        self.signal_all(signum)
        try:
            for proc in list(self.running):
                proc.wait()
        except KeyboardInterrupt:
            self.signal_all(signal.SIGINT)
            for proc in list(self.running):
                proc.wait()
            raise
        finally:
            for _, handle in self.running.values():
                handle.close()


def _run_children(request: AblationRequest, todo: list[RunTask], outcome: AblationOutcome,
                  splits: list[dict[str, list[str]]], plans: Any) -> None:
    """Run ``todo``, ``request.jobs`` at a time (see the module docstring).

    Raises:
        KeyboardInterrupt: a second SIGINT (the children are aborted with SIGINT and waited
            for); any other exception, after the running children were sent SIGTERM (each
            saves its checkpoint and stops) and waited for.
    """
    from uumamba.engine.signals import StopSignals

    pending = deque(todo)
    children = _Children(request, outcome, len(todo), splits, plans)
    with StopSignals() as signals:
        try:
            while pending or children.running:
                if signals.received is not None and outcome.signal is None:
                    outcome.signal = signals.received
                    pending.clear()
                    log.info(f"{signal.Signals(outcome.signal).name}: stopping the running "
                             "run(s) after their checkpoint; no further run starts")
                    children.signal_all(outcome.signal)
                while pending and len(children.running) < request.jobs:
                    children.start(pending.popleft())
                time.sleep(0.2)
                children.reap()
        except KeyboardInterrupt:  # a second Ctrl-C: abort the children too
            children.stop(signal.SIGINT)
            raise
        except BaseException:  # never leave a child running without its parent
            children.stop(signal.SIGTERM)
            raise


def _write_record(request: AblationRequest) -> None:
    """``OUTPUT/grid.json``, unless it is there (then :func:`make_request` checked it)."""
    path = request.output / RECORD
    if not os.path.lexists(path):
        _make_dirs(request.output, request.output)
        _write_json(request.output, path, request.record())


def run_ablation(request: AblationRequest) -> AblationOutcome:
    """Run every run of ``request`` not done yet (see the module docstring), holding
    ``OUTPUT/.lock`` throughout.

    Writes (only after the data check, the split, the plan and the cells' network and loss
    succeeded):
        ``OUTPUT/grid.json`` (the request), ``OUTPUT/splits.json``, ``OUTPUT/plans.json``;
        per run ``OUTPUT/cells/SLUG/seed_S/`` (a model folder as ``uumamba train`` writes it)
        with ``fold_K/scores.json``, ``fold_K/predictions/``, ``fold_K.log`` and
        ``fold_K.lock``. A first invocation that fails before the record is written leaves
        no ``OUTPUT`` behind (when it made it).

    Returns:
        :class:`AblationOutcome` (failed runs are listed there, not raised: the others still
        run).

    Raises:
        UserError: another ``uumamba ablate`` runs into ``OUTPUT``; an unavailable
            ``--device``; ``OUTPUT`` cannot be created or written; it holds ``cells/`` but no
            ``grid.json``, or ``grid.json`` of other arguments (another invocation wrote it
            meanwhile); a cell whose network or loss cannot be built
            (:func:`check_cells_build`); a model folder holding another split.
        DataError: the dataset is unreadable, fails its integrity check or cannot be split;
            a finished run's ``scores.json`` is not that run's or was scored with other
            settings (:func:`uumamba.ablation.scores.read_scores`).
        ConfigError: the shared plan cannot be made with the base configuration.
        KeyboardInterrupt: a second SIGINT (the children are aborted and waited for).
    """
    from uumamba.device import resolve_device

    device_type = resolve_device(request.device).type
    output = request.output
    created = not os.path.lexists(output)
    _make_dirs(output, output)
    lock = FileLock(output / LOCK)
    try:
        lock.acquire()
    except LockBusy as busy:
        raise UserError(f"--output {output}: another uumamba ablate is running there "
                        f"({busy.holder})") from None
    except OSError as exc:
        raise _output_error(output, "create", lock.path, exc) from None
    try:
        return _run_locked(request, device_type)
    finally:
        # a first invocation that failed before its record leaves nothing behind
        fresh = created and not os.path.lexists(output / RECORD)
        lock.release(remove=fresh)
        if fresh:
            with contextlib.suppress(OSError):
                output.rmdir()


def _run_locked(request: AblationRequest, device_type: str) -> AblationOutcome:
    output = request.output
    _check_record(output, request.record())  # again: another invocation may have written it
    if not os.path.lexists(output / RECORD) and os.path.lexists(output / "cells"):
        raise UserError(f"--output {output}: holds cells/ but no {RECORD} (the record of the "
                        "arguments its runs were made with), so their settings cannot be "
                        f"checked; delete {output / 'cells'} to start again, or use another "
                        "--output")
    tasks = tasks_of(request)
    for t in tasks:  # a FIFO / folder / device in its place is refused, never trained over
        if os.path.lexists(t.scores_path) and not t.scores_path.is_file():
            raise UserError(f"{t.scores_path}: not a regular file; delete it to score the run "
                            "again")
    outcome = AblationOutcome(tasks=tasks)
    outcome.cached = [t for t in tasks if t.scores_path.is_file()]
    todo = [t for t in tasks if not t.scores_path.is_file()]
    log.info(f"ablation: {len(request.cells)} cell(s) x {len(request.seeds)} seed(s) x "
             f"{len(request.folds)} fold(s) = {len(tasks)} run(s); {len(outcome.cached)} done "
             f"before, {len(todo)} to run")
    if not todo:
        return outcome  # the report reads and checks every scores.json
    index = _check_data(request)
    splits = _shared_split(request, index)
    for task in outcome.cached:  # refused before anything trains, not after
        read_scores(task.scores_path, cell=task.cell.label, seed=task.seed, fold=task.fold,
                    config_hash=request.run_digest(task.cell, task.seed),
                    val_cases=splits[task.fold]["val"])
    shared = [t for t in todo if not t.cell.plans_itself]
    plans = _shared_plan(request, index, device_type) if shared else None
    if plans is not None:  # in memory, before anything is written
        wanted = {t.cell.label for t in shared}
        pairs = [(cell, cfg) for cell, cfg in zip(request.cells, request.configs(), strict=True)
                 if cell.label in wanted]
        check_cells_build([c for c, _ in pairs], [cfg for _, cfg in pairs], plans)
    # the record last: a first invocation that failed above can be rerun with other arguments
    if not os.path.lexists(output / SPLITS):
        _write_json(output, output / SPLITS, splits)
    if plans is not None and not os.path.lexists(output / PLANS):
        _write_json(output, output / PLANS, plans.model_dump(mode="json"))
    _write_record(request)
    for task in todo:
        _prepare_model_folder(output, task, splits, plans)
    _run_children(request, todo, outcome, splits, plans)
    return outcome
