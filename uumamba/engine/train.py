"""``uumamba train``: check, plan, split and train one fold of a dataset.

The loop is a plain function calling small pieces: the data layer (discover, check, plan,
transforms, splits), the network and loss builders, the optimizer and poly schedule,
:func:`uumamba.engine.step.training_step`, :func:`uumamba.engine.validate.validate`,
:mod:`uumamba.engine.checkpoint` and the loggers of :mod:`uumamba.engine.callbacks`.

Flow of :func:`train_fold`
    1. integrity check of every case (fatal problems: :class:`~uumamba.errors.DataError`
       listing them all; warnings are printed);
    2. ``MODEL/plans.json`` reused when present, else planned and saved; ``config.yaml``,
       ``dataset.json`` (``labels`` value -> name, ``modality``) and ``splits.json`` written;
    3. epochs × ``iterations_per_epoch`` training steps (SAM / ASAM / SGD / AdamW,
       uncertainty-weighted loss with deep supervision, poly learning rate with optional
       warm-up, gradient clipping; AMP on CUDA only: bf16 where supported else fp16 with a
       GradScaler, float32 on CPU);
    4. every ``val_every`` epochs and at the end: full-volume sliding-window validation on the
       held-out fold (Dice per class and mean); fold ``all`` has no validation;
    5. ``checkpoint_latest.pt`` after every epoch, ``checkpoint_best.pt`` when the mean Dice
       improves.

Reproducibility and exact resume
    Every training patch is a pure function of ``(train.seed, rank, iteration, position in
    the batch)``: the case is drawn with a NumPy generator seeded from those numbers, and the
    augmentation runs with the MONAI transforms' random state *and* the global Python / NumPy /
    torch generators seeded from a per-sample seed (the global states are restored
    afterwards). This holds with any number of DataLoader workers, so the checkpoint only needs
    the iteration counter (stored under ``rng["data"]``) besides the model, optimizer (with
    SAM's base momentum), loss σ, scaler, scheduler and global RNG states. A resumed CPU run
    therefore continues the same trajectory bit for bit, from any iteration, not only from
    epoch boundaries. (Different ``WORLD_SIZE`` on resume changes which patches each rank
    sees.) With ``train.deterministic`` the run also uses MONAI's ``set_determinism`` and, on
    CUDA, ``torch.use_deterministic_algorithms(True, warn_only=True)``. Bit-identity holds for
    a fixed torch thread count (float reductions depend on how work is split).

Resume semantics (``--resume``)
    The checkpoint's configuration defines the run; of the given configuration only
    ``train.time_limit_minutes``, ``train.num_workers`` and ``train.cache`` are taken (other
    differences are reported and ignored). A finished run (all epochs done or time limit
    reached) is reported as finished and nothing is trained. Without a checkpoint,
    ``--resume`` starts a new run (as nnU-Net's ``--c`` does). Without ``--resume``, an
    existing ``checkpoint_latest.pt`` is never overwritten: that is an error.

Stopping
    SIGINT / SIGTERM set a flag: the current iteration finishes, ``checkpoint_latest.pt`` is
    saved (``finished`` False) and the CLI exits with 128 + signal number (130 for SIGINT,
    143 for SIGTERM), the shell convention; a second SIGINT aborts at once.
    ``train.time_limit_minutes`` (wall time since :func:`train_fold` was called) ends the run
    cleanly: the iteration finishes, validation runs, the checkpoint is saved with
    ``finished`` True, exit status 0. More than ``train.max_nonfinite_steps`` consecutive
    non-finite losses (each skipped by the step) save the checkpoint and raise
    :class:`~uumamba.errors.UserError`.

``metrics.jsonl`` fields (one line per epoch)
    ``epoch`` (1-based), ``iteration`` (completed), ``train_loss`` (mean of the epoch's finite
    losses), ``sigmas`` (σ per loss term at epoch end), ``lr``, ``grad_norm`` (mean),
    ``val_dice`` (class name -> Dice, or null), ``val_mean_dice``, ``time`` (s, epoch incl.
    validation), ``elapsed`` (s since the first start, summed over resumes),
    ``nonfinite_steps``, ``partial`` (True for an epoch cut short by the time limit).

Distributed
    Under ``torchrun`` every rank trains on its own patches (per-rank seeding), gradients of
    the network are averaged by DDP and those of the loss σ by ``training_step``, validation cases are shared out among
    the ranks and gathered, and only rank 0 writes files (see
    :mod:`uumamba.engine.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from uumamba.config import Config, config_from_dict, load_config, save_config
from uumamba.data import check as data_check
from uumamba.data import layouts
from uumamba.data import splits as data_splits
from uumamba.data import transforms as data_transforms
from uumamba.data.plan import Plans, plan_dataset
from uumamba.engine import distributed as ddp
from uumamba.engine.callbacks import Callback, IterationLog, RunContext, default_callbacks
from uumamba.engine.checkpoint import (
    BEST,
    LATEST,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from uumamba.engine.step import training_step
from uumamba.engine.validate import ValidationResult, summarise, validate
from uumamba.errors import ConfigError, DataError, UserError
from uumamba.inference.postprocess import determine_postprocessing, save_postprocessing
from uumamba.losses import build_loss
from uumamba.nn import build_network
from uumamba.optim import PolyLRScheduler, build_optimizer
from uumamba.utils import atomic_path, check_output_folder

#: Settings of ``train`` that may change on ``--resume`` without changing the trajectory.
RUNTIME_KEYS = ("time_limit_minutes", "num_workers", "cache")


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


# --------------------------------------------------------------------------------------------
# fold, device, precision, seeding


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


def select_precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """Autocast dtype and GradScaler for ``train.amp`` on ``device``.

    CPU: always float32 (None, None). CUDA: ``auto`` -> bf16 when the GPU supports it (no
    scaler), else fp16 with :class:`torch.amp.GradScaler`; ``bf16`` / ``fp16`` force one;
    ``off`` -> float32.
    """
    if device.type != "cuda" or amp == "off":
        return None, None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed Python, NumPy and torch (MONAI ``set_determinism`` when ``deterministic``).

    On CUDA, ``deterministic`` also turns on deterministic algorithms (warn-only, so an op
    without a deterministic kernel warns instead of failing) and disables cuDNN benchmarking.
    CPU kernels are deterministic for a fixed thread count already (and
    ``torch.use_deterministic_algorithms`` costs seconds of import time), so it is not called
    there. mamba-ssm's CUDA backward uses atomic adds, so GPU runs are seeded but not
    bit-reproducible.
    """
    if deterministic:
        from monai.utils import set_determinism

        set_determinism(seed=seed)
        if device.type == "cuda":
            # cuBLAS needs a fixed workspace for reproducible GEMMs (set before its first use)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - legacy global RNG on purpose
        torch.manual_seed(seed)
        torch.backends.cudnn.benchmark = True


# --------------------------------------------------------------------------------------------
# model folder: check, plan, splits, config


@dataclass
class Prepared:
    """What every rank needs from the model folder's preparation."""

    plans: Plans
    splits: list[dict[str, list[str]]]
    train_cases: list[Any]
    val_cases: list[Any]


def _check(index: Any, cfg: Config, console: Any) -> None:
    """Run the integrity check; print warnings, raise on errors."""
    report = data_check.check_dataset(index, cfg.dataset, cfg.model.spatial_dims)
    for p in report.warnings:
        console.print(f"warning: {p.file}: {p.message}")
    if report.fatal:
        errors = report.errors
        shown = "\n".join(f"  {p.file}: {p.message}" for p in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        raise DataError(f"{index.root}: {len(errors)} problem(s) stop training "
                        f"(`uumamba check-data {index.root}` prints the full report):\n"
                        f"{shown}{more}")


_SHARED_SECTIONS = ("dataset", "plan", "model")


def _write_config(cfg: Config, output_dir: Path) -> None:
    """Save ``config.yaml``; refuse when the folder was made with other dataset / plan / model
    settings (folds of one model must share them, the predictor ensembles them)."""
    path = output_dir / "config.yaml"
    if path.is_file():
        old = load_config(path)
        differ = [s for s in _SHARED_SECTIONS
                  if getattr(old, s).model_dump() != getattr(cfg, s).model_dump()]
        if differ:
            raise ConfigError(f"{path}: this model folder was created with different "
                              f"{', '.join(differ)} settings; folds of one model must share "
                              "them - use another --output")
    save_config(cfg, path)


def _write_dataset_json(plans: Plans, output_dir: Path) -> None:
    """``dataset.json``: labels (value as a string -> name), modality, channels, dims."""
    info = {"labels": {str(k): v for k, v in sorted(plans.labels.items())},
            "modality": plans.modality, "num_input_channels": plans.num_input_channels,
            "spatial_dims": plans.spatial_dims}
    with atomic_path(output_dir / "dataset.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")


def _select_cases(cases: Sequence[Any], splits: list[dict[str, list[str]]], fold: str,
                  path: Path) -> tuple[list[Any], list[Any]]:
    if fold == "all":
        return list(cases), []
    k = int(fold)
    if k >= len(splits):
        raise UserError(f"{path}: has {len(splits)} folds; --fold {fold} does not exist")
    by_id = {c.id: c for c in cases}
    unknown = [i for i in splits[k]["train"] + splits[k]["val"] if i not in by_id]
    if unknown:
        raise DataError(f"{path}: fold {k} names cases not in the dataset: {unknown[:10]}")
    return [by_id[i] for i in splits[k]["train"]], [by_id[i] for i in splits[k]["val"]]


def prepare_model_folder(cfg: Config, data_dir: Path, output_dir: Path, fold: str,
                         console: Any, saved: dict[str, Any] | None = None) -> Prepared:
    """Check the dataset and write ``config.yaml``, ``plans.json``, ``dataset.json`` and
    ``splits.json`` into ``output_dir`` (reusing plans and splits already there).

    Args:
        saved: a checkpoint being resumed: its plans and splits are used as they are.

    Raises:
        DataError: fatal integrity problems (all listed), unknown case ids in the splits.
        ConfigError: ``config.yaml`` there was made with different settings.
        UserError: the fold does not exist in ``splits.json``.
    """
    index = layouts.discover(data_dir, layout=cfg.dataset.layout)
    _check(index, cfg, console)
    plans_path = output_dir / "plans.json"
    if saved is not None:
        plans = Plans.model_validate(saved["plans"])
    elif plans_path.is_file():
        plans = Plans.load(plans_path)
        console.print(f"using the existing plan {plans_path}")
    else:
        plans = plan_dataset(index, cfg.dataset, cfg.plan, cfg.model)
    output_dir.mkdir(parents=True, exist_ok=True)  # only once the plan stands: no empty folder
    if saved is None:
        _write_config(cfg, output_dir)
    if not plans_path.is_file():
        plans.save(plans_path)
    _write_dataset_json(plans, output_dir)
    splits_path = output_dir / "splits.json"
    if saved is not None:
        splits = saved["splits"]
    else:
        try:
            splits = data_splits.load_or_create_splits(splits_path, index.cases,
                                                       cfg.train.n_folds, cfg.train.seed)
        except ValueError as exc:
            if fold != "all":
                raise DataError(f"{data_dir}: cannot split into train.n_folds = "
                                f"{cfg.train.n_folds} folds: {exc}") from None
            splits = []  # fold "all" needs no split
    train_cases, val_cases = _select_cases(index.cases, splits, fold, splits_path)
    if not train_cases:
        raise DataError(f"{data_dir}: no training cases for fold {fold}")
    return Prepared(plans=plans, splits=splits, train_cases=train_cases, val_cases=val_cases)


# --------------------------------------------------------------------------------------------
# seeded patch stream


def _sample_rng(seed: int, rank: int, iteration: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, iteration])


class PatchBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(case index, sample seed)`` keys for iterations ``start`` .. ``stop - 1``.

    Iteration ``t`` of rank ``r`` draws ``batch_size`` cases uniformly with replacement (as
    nnU-Net's data loader does) and one augmentation seed per patch from
    ``numpy.random.default_rng([seed, r, t])``; nothing depends on earlier iterations.
    """

    def __init__(self, n_cases: int, batch_size: int, seed: int, rank: int, start: int,
                 stop: int) -> None:
        if n_cases < 1 or batch_size < 1:
            raise ValueError(f"PatchBatchSampler: n_cases={n_cases}, batch_size={batch_size}")
        self.n_cases, self.batch_size, self.seed, self.rank = n_cases, batch_size, seed, rank
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for t in range(self.start, self.stop):
            rng = _sample_rng(self.seed, self.rank, t)
            cases = rng.integers(0, self.n_cases, self.batch_size)
            seeds = rng.integers(0, 2**31 - 1, self.batch_size)
            yield [(int(c), int(s)) for c, s in zip(cases, seeds, strict=True)]


@contextlib.contextmanager
def _seeded_globals(seed: int) -> Iterator[None]:
    """Seed Python / NumPy / torch CPU generators with ``seed``; restore them afterwards."""
    py, th = random.getstate(), torch.get_rng_state()
    npst = np.random.get_state()  # noqa: NPY002 - legacy global RNG on purpose
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - legacy global RNG on purpose
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npst)  # noqa: NPY002 - legacy global RNG on purpose
        torch.set_rng_state(th)


class SeededPatchDataset(Dataset):
    """Wraps a training dataset so item ``(index, seed)`` is a pure function of both.

    Before reading item ``index`` of ``dataset`` the MONAI transform chain
    (``dataset.transform``) gets ``set_random_state(seed)`` and the global generators are
    seeded with ``seed`` (and restored after), so augmentation is reproducible in any worker.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.transform = getattr(dataset, "transform", None)

    @property
    def reproducible(self) -> bool:
        """False when the transform chain exposes no ``set_random_state``."""
        return self.transform is None or hasattr(self.transform, "set_random_state")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with _seeded_globals(seed):
            if self.transform is not None and hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=seed)
            return self.dataset[index]


def _ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process (which saves and stops)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_patch_loader(dataset: Any, batch_size: int, seed: int, rank: int, start: int,
                      stop: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding the batches of iterations ``start`` .. ``stop - 1``.

    Collation is MONAI's ``list_data_collate`` (flattens transforms that return lists of
    patches). The loader has its own generator, so creating it does not consume the global
    torch RNG.
    """
    from monai.data import list_data_collate

    sampler = PatchBatchSampler(len(dataset), batch_size, seed, rank, start, stop)
    return DataLoader(
        SeededPatchDataset(dataset), batch_sampler=sampler, num_workers=num_workers,
        collate_fn=list_data_collate, pin_memory=pin_memory,
        worker_init_fn=_ignore_sigint if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


# --------------------------------------------------------------------------------------------
# stopping


class StopSignals:
    """Context manager: SIGINT / SIGTERM set :attr:`received` instead of ending the process.

    A second SIGINT raises KeyboardInterrupt (abort without saving). Handlers are installed
    only in the main thread and the previous ones are restored on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------
# configuration on resume


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_config(given: Config, saved: dict[str, Any], console: Any) -> Config:
    """The checkpoint's configuration with the run-time keys (:data:`RUNTIME_KEYS`) of
    ``given``; other differences are printed and ignored."""
    cfg = config_from_dict(saved, "checkpoint config")
    old = _flatten(cfg.model_dump(mode="json"))
    new = _flatten(given.model_dump(mode="json"))
    runtime = {f"train.{k}" for k in RUNTIME_KEYS}
    ignored = sorted(k for k in new if k not in runtime and new.get(k) != old.get(k))
    if ignored:
        console.print("note: --resume continues with the checkpoint's settings; ignoring "
                      f"changed {', '.join(ignored)}")
    for k in RUNTIME_KEYS:
        setattr(cfg.train, k, getattr(given.train, k))
    return cfg


# --------------------------------------------------------------------------------------------
# components and loop state


@dataclass
class Components:
    """Network, objective and optimisation state of one run.

    Attributes:
        model: the unwrapped network; ``train_model`` is the same module, DDP-wrapped when
            distributed (what the step runs).
        loss_fn: deep-supervision wrapper over the configured loss (holds the σ).
        optimizer / scheduler: from :func:`uumamba.optim.build_optimizer` and
            :class:`uumamba.optim.PolyLRScheduler` (total = epochs × iterations per epoch).
        scaler / autocast_dtype: from :func:`select_precision`.
    """

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    autocast_dtype: torch.dtype | None
    train_model: torch.nn.Module | None = None


def build_components(cfg: Config, plans: Plans, device: torch.device,
                     total_iterations: int) -> Components:
    """Build network, loss (``n_outputs`` = deep-supervision outputs), optimizer (σ in their
    own group), poly schedule and AMP settings, all on ``device``.

    Raises:
        ConfigError: invalid optimizer / loss / schedule settings (naming the key).
    """
    model = build_network(cfg.model, plans).to(device)
    n_outputs = model.n_deep_supervision_outputs if cfg.model.deep_supervision else 1
    loss_fn = build_loss(cfg.loss, plans.num_classes, cfg.dataset.ignore_label, n_outputs)
    loss_fn = loss_fn.to(device)
    optimizer = build_optimizer(cfg.optim, model, loss_fn)
    try:
        scheduler = PolyLRScheduler(optimizer, total_iterations,
                                    exponent=cfg.optim.poly_exponent,
                                    warmup_iters=cfg.optim.warmup_iterations)
    except ValueError as exc:
        raise ConfigError(f"optim (poly schedule over {total_iterations} iterations): "
                          f"{exc}") from None
    autocast_dtype, scaler = select_precision(cfg.train.amp, device)
    return Components(model, loss_fn, optimizer, scheduler, scaler, autocast_dtype)


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


def restore_from_checkpoint(parts: Components, saved: dict[str, Any]) -> LoopState:
    """Load model, loss σ, optimizer, schedule, scaler and global RNG states from ``saved``
    and return the loop state it was taken at."""
    parts.model.load_state_dict(saved["model"])
    parts.loss_fn.load_state_dict(saved["loss"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    if parts.scaler is not None and saved["scaler"] is not None:
        parts.scaler.load_state_dict(saved["scaler"])
    es = saved.get("epoch_state") or {}
    restore_rng_state(saved["rng"])
    return LoopState(
        iteration=int(saved["iteration"]), best_metric=saved["best_metric"],
        history=list(saved["metric_history"]),
        epoch=_EpochAccumulator(list(es.get("losses", [])), list(es.get("grad_norms", [])),
                                int(es.get("nonfinite", 0)), float(es.get("seconds", 0.0))),
        consecutive_nonfinite=int(saved.get("consecutive_nonfinite", 0)),
        pending_epoch_end=bool(saved.get("pending_epoch_end", False)),
        elapsed_before=float(saved.get("elapsed", 0.0)),
    )


def _sigmas(loss_fn: torch.nn.Module) -> dict[str, float]:
    """σ values of an uncertainty-weighted loss (empty for fixed-weight losses)."""
    return {str(k): float(v) for k, v in loss_fn.sigmas().items()} if hasattr(
        loss_fn, "sigmas") else {}


class _Callbacks:
    """Calls a list of callbacks in order."""

    def __init__(self, items: Sequence[Callback]) -> None:
        self.items = list(items)

    def __getattr__(self, hook: str) -> Any:
        def call(*args: Any) -> None:
            for cb in self.items:
                getattr(cb, hook)(*args)
        return call


@dataclass
class _Run:
    """The fixed facts of a run that the loop's helpers read."""

    cfg: Config
    ctx: ddp.DistContext
    fold: str
    fold_dir: Path
    prepared: Prepared
    val_set: Any
    val_case_ids: list[str]
    console: Any
    callbacks: _Callbacks
    info: RunContext
    t_call: float
    t_start: float

    @property
    def total(self) -> int:
        return self.cfg.train.epochs * self.cfg.train.iterations_per_epoch

    def foreground_names(self) -> list[str]:
        ignore = self.cfg.dataset.ignore_label
        return [name for k, name in sorted(self.info.labels.items()) if k not in (0, ignore)]


# --------------------------------------------------------------------------------------------
# the loop's steps


def _checkpoint_state(run: _Run, parts: Components, loop: LoopState, finished: bool,
                      pending: bool) -> dict[str, Any]:
    it = loop.iteration
    rng = capture_rng_state()
    rng["data"] = {"seed": run.cfg.train.seed, "rank": run.ctx.rank, "next_iteration": it,
                   "scheme": "numpy default_rng([seed, rank, iteration]) per batch"}
    return {
        "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "loss": parts.loss_fn.state_dict(),
        "scaler": None if parts.scaler is None else parts.scaler.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "epoch": it // run.cfg.train.iterations_per_epoch, "iteration": it, "rng": rng,
        "config": run.cfg.model_dump(mode="json"),
        "plans": run.prepared.plans.model_dump(mode="json"), "splits": run.prepared.splits,
        "fold": run.fold, "finished": finished, "best_metric": loop.best_metric,
        "metric_history": loop.history,
        # beyond the contract: what exact continuation of a partial epoch needs
        "epoch_state": loop.epoch.state(), "consecutive_nonfinite": loop.consecutive_nonfinite,
        "pending_epoch_end": pending, "world_size": run.ctx.world_size,
        "elapsed": loop.elapsed_before + time.monotonic() - run.t_start,
    }


def _save(run: _Run, parts: Components, loop: LoopState, finished: bool,
          pending: bool = False, best: bool = False) -> None:
    """Rank 0: ``checkpoint_best.pt`` (when ``best``), then ``checkpoint_latest.pt``."""
    if not run.ctx.is_main:
        return
    state = _checkpoint_state(run, parts, loop, finished, pending)
    if best:
        save_checkpoint(run.fold_dir / BEST, state)
    save_checkpoint(run.fold_dir / LATEST, state)


def _validate(run: _Run, parts: Components, final: bool = False) -> ValidationResult:
    """Each rank validates its share of the cases; results are gathered on every rank.

    The final validation also decides the postprocessing (largest connected component per
    class where it raises the validation Dice, nnU-Net's rule) from the main rank's cases and
    writes ``postprocessing.json`` into the fold folder for the predictor.
    """
    part = validate(parts.model, run.val_set, run.val_case_ids, run.prepared.plans,
                    run.cfg.inference, run.ctx.device, ignore_label=run.cfg.dataset.ignore_label,
                    overlay_case=0 if run.ctx.is_main else None, keep_masks=final)
    per_case = {k: v for d in ddp.gather_objects(part.per_case, run.ctx) for k, v in d.items()}
    dice, mean = summarise(per_case, run.foreground_names())
    if final and run.ctx.is_main and part.masks:
        preds, refs = zip(*part.masks.values(), strict=True)
        spec = determine_postprocessing(list(preds), list(refs), run.prepared.plans.labels)
        save_postprocessing(spec, run.fold_dir)
    return ValidationResult(dice=dice, mean_dice=mean, per_case=per_case,
                            overlay=part.overlay, seconds=part.seconds)


def _end_epoch(run: _Run, parts: Components, loop: LoopState, partial: bool,
               final: bool = False) -> bool:
    """Validate when due, append the epoch's record, call the loggers; True when the
    validation mean Dice improved on the best so far. ``final``: the run ends after this
    epoch (the validation then also decides the postprocessing)."""
    tc = run.cfg.train
    it = loop.iteration
    epoch = (it - 1) // tc.iterations_per_epoch + 1
    due = run.val_set is not None and (epoch % tc.val_every == 0 or it >= run.total or partial)
    final = final or it >= run.total
    result = _validate(run, parts, final=final) if due else None
    finite = [x for x in loop.epoch.losses if math.isfinite(x)]
    norms = [x for x in loop.epoch.grad_norms if math.isfinite(x)]
    record = {
        "epoch": epoch, "iteration": it,
        "train_loss": float(np.mean(finite)) if finite else float("nan"),
        "sigmas": _sigmas(parts.loss_fn), "lr": float(parts.optimizer.param_groups[0]["lr"]),
        "grad_norm": float(np.mean(norms)) if norms else float("nan"),
        "val_dice": None if result is None else result.dice,
        "val_mean_dice": None if result is None else result.mean_dice,
        "time": loop.epoch.seconds + (0.0 if result is None else result.seconds),
        "elapsed": loop.elapsed_before + time.monotonic() - run.t_start,
        "nonfinite_steps": loop.epoch.nonfinite, "partial": partial,
    }
    loop.history.append(record)
    loop.epoch = _EpochAccumulator()
    improved = (result is not None and math.isfinite(result.mean_dice)
                and (loop.best_metric is None or result.mean_dice > loop.best_metric))
    if improved:
        loop.best_metric = result.mean_dice
    if result is not None:
        run.callbacks.on_validation_end(run.info, result)
    run.callbacks.on_epoch_end(run.info, record, loop.history)
    return improved


def _train_iteration(run: _Run, parts: Components, loop: LoopState, batch: dict[str, Any]) -> None:
    """One :func:`training_step` on ``batch``, the schedule step and the bookkeeping."""
    t0 = time.perf_counter()
    dev = run.ctx.device
    images = _plain(batch["image"]).to(dev, non_blocking=True).float()
    targets = _plain(batch["label"]).to(dev, non_blocking=True).long()
    res = training_step(parts.train_model, parts.loss_fn, parts.optimizer, images, targets,
                        scaler=parts.scaler, autocast_dtype=parts.autocast_dtype,
                        grad_clip=run.cfg.optim.grad_clip, device_type=dev.type)
    parts.scheduler.step()
    limit = run.cfg.train.time_limit_minutes
    if limit and run.cfg.train.schedule_by_time:
        parts.scheduler.set_time_progress((time.monotonic() - run.t_call) / (limit * 60.0))
    loop.iteration += 1
    loop.epoch.losses.append(float(res.loss))
    loop.epoch.grad_norms.append(float(res.grad_norm))
    if res.finite:
        loop.consecutive_nonfinite = 0
    else:
        loop.epoch.nonfinite += 1
        loop.consecutive_nonfinite += 1
    loop.epoch.seconds += time.perf_counter() - t0
    run.callbacks.on_iteration_end(run.info, IterationLog(
        iteration=loop.iteration,
        epoch=(loop.iteration - 1) // run.cfg.train.iterations_per_epoch + 1,
        loss=float(res.loss), finite=bool(res.finite),
        lr=float(parts.optimizer.param_groups[0]["lr"]), sigmas=_sigmas(parts.loss_fn),
        grad_norm=float(res.grad_norm)))


def _loop(run: _Run, parts: Components, loop: LoopState, loader: DataLoader,
          signals: StopSignals) -> FoldResult:
    """Iterate until all epochs are done, the time limit is reached, a signal arrives or too
    many non-finite losses occur (see the module docstring)."""
    tc = run.cfg.train
    limit = tc.time_limit_minutes
    if loop.pending_epoch_end:  # stopped by a signal right at an epoch's end
        loop.pending_epoch_end = False
        improved = _end_epoch(run, parts, loop, partial=False)
        _save(run, parts, loop, finished=loop.iteration >= run.total, best=improved)
    batches = iter(loader)
    while loop.iteration < run.total:
        _train_iteration(run, parts, loop, next(batches))
        it = loop.iteration
        stop_signal, time_up, diverged = ddp.any_rank([
            signals.received is not None,
            limit is not None and time.monotonic() - run.t_call >= limit * 60.0,
            loop.consecutive_nonfinite > tc.max_nonfinite_steps], run.ctx)
        boundary = it % tc.iterations_per_epoch == 0
        if diverged:
            _save(run, parts, loop, False)
            raise UserError(
                f"training stopped at iteration {it}: {loop.consecutive_nonfinite} consecutive "
                f"non-finite losses (train.max_nonfinite_steps = {tc.max_nonfinite_steps}); "
                "lower optim.lr, check the data with `uumamba check-data`, or set "
                f"train.amp=off. Checkpoint: {run.fold_dir / LATEST}")
        if stop_signal and it < run.total:
            _save(run, parts, loop, False, pending=boundary)
            return FoldResult(run.fold_dir, False, "signal", signals.received or signal.SIGTERM,
                              it, loop.best_metric)
        if boundary or time_up:
            stop_early = time_up and it < run.total
            improved = _end_epoch(run, parts, loop, partial=stop_early and not boundary,
                                  final=stop_early)
            _save(run, parts, loop, finished=it >= run.total or stop_early, best=improved)
            if stop_early:
                run.console.print(f"time limit of {limit} min reached at iteration {it}")
                return FoldResult(run.fold_dir, True, "time_limit", None, it, loop.best_metric)
    return FoldResult(run.fold_dir, True, "completed", None, loop.iteration, loop.best_metric)


# --------------------------------------------------------------------------------------------
# entry points


def _open_run(cfg: Config, fold_dir: Path, resume: bool,
              console: Any) -> tuple[Config, dict[str, Any] | None]:
    """Resume bookkeeping: the checkpoint to continue from (or None) and the config to use.

    Raises:
        UserError: a checkpoint exists and ``resume`` is False.
        DataError: the checkpoint cannot be read.
    """
    latest = fold_dir / LATEST
    if resume and latest.is_file():
        saved = load_checkpoint(latest)
        if not saved["finished"]:
            console.print(f"resuming {fold_dir} at iteration {saved['iteration']}")
            cfg = resume_config(cfg, saved["config"], console)
        return cfg, saved
    if resume:
        console.print(f"note: {latest} not found; --resume starts a new run")
    elif latest.is_file():
        raise UserError(f"{latest} exists; pass --resume to continue that run, or choose "
                        "another --output")
    return cfg, None


def _prepare_everywhere(cfg: Config, data_dir: Path, output_dir: Path, fold: str,
                        ctx: ddp.DistContext, console: Any,
                        saved: dict[str, Any] | None) -> Prepared:
    """Rank 0 prepares the model folder; the result (or its error) reaches every rank."""
    prepared, error = None, None
    if ctx.is_main:
        try:
            prepared = prepare_model_folder(cfg, data_dir, output_dir, fold, console, saved)
        except UserError as exc:
            error = exc
    prepared, text = ddp.broadcast_object((prepared, None if error is None else str(error)),
                                          ctx)
    if error is not None:
        raise error
    if text is not None:
        raise UserError(text)
    return prepared


def run_fold(cfg: Config, data_dir: str | Path, output_dir: str | Path, fold: str | int = "0",
             resume: bool = False, device: str = "auto",
             callbacks: Sequence[Callback] | None = None, progress: bool = True) -> FoldResult:
    """Train one fold; the full flow is in the module docstring.

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
    from rich.console import Console

    t_call = time.monotonic()
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    ctx = ddp.init_distributed(device)
    console = Console(highlight=False, quiet=not ctx.is_main)
    ok = False
    try:
        result = _run(cfg, data_dir, output_dir, fold, resume, ctx, console, t_call,
                      list(callbacks or []), progress)
        ok = True
        return result
    finally:
        ddp.cleanup(ctx, wait=ok)


def _run(cfg: Config, data_dir: Path, output_dir: Path, fold: str | int, resume: bool,
         ctx: ddp.DistContext, console: Any, t_call: float, extra: list[Callback],
         progress: bool) -> FoldResult:
    fold = parse_fold(fold, cfg.train.n_folds)
    fold_dir = output_dir / f"fold_{fold}"
    cfg, saved = _open_run(cfg, fold_dir, resume, console)
    if saved is not None and int(saved.get("world_size", 1)) != ctx.world_size:
        console.print(f"note: the checkpoint was written by {saved.get('world_size', 1)} "
                      f"process(es), this run has {ctx.world_size}: the ranks will draw "
                      "other patches than the interrupted run would have")
    if saved is not None and saved["finished"]:
        console.print(f"{fold_dir}: training already finished at iteration "
                      f"{saved['iteration']} (best mean Dice {saved['best_metric']}); nothing "
                      "to do")
        return FoldResult(fold_dir, True, "already_finished", None, saved["iteration"],
                          saved["best_metric"])
    tc = cfg.train
    if tc.epochs < 1 or tc.iterations_per_epoch < 1 or tc.val_every < 1:
        raise ConfigError(f"train.epochs ({tc.epochs}), train.iterations_per_epoch "
                          f"({tc.iterations_per_epoch}) and train.val_every ({tc.val_every}) "
                          "must be >= 1")
    seed_everything(tc.seed, tc.deterministic, ctx.device)
    prepared = _prepare_everywhere(cfg, data_dir, output_dir, fold, ctx, console, saved)
    plans = prepared.plans
    fold_dir.mkdir(parents=True, exist_ok=True)

    cache_dir = output_dir / "preprocessed" if tc.cache == "disk" else None
    train_set = data_transforms.make_dataset(
        prepared.train_cases, data_transforms.training_transforms(plans, tc), tc.cache,
        cache_dir=cache_dir)
    # validation cases are shared out among the ranks; None: no validation (fold "all")
    val_cases = prepared.val_cases[ctx.rank::ctx.world_size]
    val_set: Any = None
    if prepared.val_cases:
        val_set = data_transforms.make_dataset(
            val_cases, data_transforms.validation_transforms(plans), tc.cache,
            cache_dir=cache_dir) if val_cases else []

    total = tc.epochs * tc.iterations_per_epoch
    parts = build_components(cfg, plans, ctx.device, total)
    loop = restore_from_checkpoint(parts, saved) if saved is not None else LoopState()
    parts.train_model = ddp.wrap_ddp(parts.model, ctx)
    loader = make_patch_loader(train_set, plans.batch_size, tc.seed, ctx.rank, loop.iteration,
                               total, tc.num_workers, pin_memory=ctx.device.type == "cuda")
    if not loader.dataset.reproducible:
        console.print("warning: the training transforms have no set_random_state; a resumed "
                      "run will not repeat the same augmentations")

    info = RunContext(fold_dir=fold_dir, rank=ctx.rank, world_size=ctx.world_size,
                      start_iteration=loop.iteration, total_iterations=total,
                      iterations_per_epoch=tc.iterations_per_epoch,
                      labels={int(k): str(v) for k, v in plans.labels.items()},
                      model=parts.model, loss=parts.loss_fn)
    builtin = default_callbacks(fold_dir, console, progress) if ctx.is_main else []
    run = _Run(cfg, ctx, fold, fold_dir, prepared, val_set, [c.id for c in val_cases], console,
               _Callbacks([*builtin, *extra]), info, t_call, time.monotonic())

    result = FoldResult(fold_dir, False, "error", None, loop.iteration, loop.best_metric)
    run.callbacks.on_train_start(info)
    try:
        with StopSignals() as signals:
            result = _loop(run, parts, loop, loader, signals)
    finally:
        run.callbacks.on_train_end(info, result.finished, result.reason)
    if result.signal is not None:
        console.print(f"stopped by {signal.Signals(result.signal).name} at iteration "
                      f"{result.iteration}; continue with --resume ({fold_dir / LATEST})")
    elif result.finished:
        dice = "" if result.best_metric is None else \
            f", best validation mean Dice {result.best_metric:.4f}"
        console.print(f"{fold_dir}: finished after {result.iteration} iterations{dice}")
    return result


def train_fold(cfg: Config, data_dir: str | Path, output_dir: str | Path, fold: str | int = "0",
               resume: bool = False, device: str = "auto", **kwargs: Any) -> Path:
    """Train one fold and return its folder (``output_dir/fold_K`` or ``fold_all``).

    The contract of ``docs/architecture.md``; see :func:`run_fold` for the arguments
    (``callbacks`` and ``progress`` pass through ``kwargs``) and the raised errors.
    """
    return run_fold(cfg, data_dir, output_dir, fold, resume, device, **kwargs).fold_dir


def check_output_dir(data_dir: Path, output_dir: Path) -> None:
    """Refuse a model folder that is a file, the dataset folder or inside it: the run's
    ``dataset.json``, ``plans.json`` and ``fold_*`` would be mixed into the dataset (and a
    ``dataset.json`` there can change which layout is detected next time).

    Raises:
        UserError: naming ``--output`` and the reason.
    """
    output_dir, data_dir = Path(output_dir), Path(data_dir)
    check_output_folder(output_dir)
    out, data = output_dir.resolve(), data_dir.resolve()
    if out == data or data in out.parents:
        raise UserError(f"--output {output_dir} is inside the dataset folder {data_dir}: the model "
                        "files would be written into the dataset; choose a folder outside it")


def train_from_cli(cfg: Config, data_dir: Path, output_dir: Path, fold: str, resume: bool,
                   device: str) -> None:
    """``uumamba train``: run :func:`run_fold`; a signal stop exits with 128 + signal number.

    Raises:
        UserError: propagated to the CLI (one line, exit status 1).
        SystemExit: 130 after SIGINT, 143 after SIGTERM (checkpoint saved).
    """
    check_output_dir(data_dir, output_dir)
    result = run_fold(cfg, data_dir, output_dir, fold, resume, device)
    if result.signal is not None:
        raise SystemExit(128 + int(result.signal))
