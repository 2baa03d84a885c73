"""Preparing the model folder for training: integrity check, plan, config, ``dataset.json``
and splits, written through :class:`uumamba.model_folder.ModelFolder`, and the fold's cases.

``MODEL/plans.json`` is reused when present, else the dataset is planned and the plan saved;
``config.yaml``, ``dataset.json`` (``labels`` value -> name, ``modality``) and ``splits.json``
are written. Under ``torchrun`` rank 0 prepares and the result reaches every rank
(:func:`prepare_everywhere`); :meth:`Prepared.datasets` turns the fold's cases into the
training and validation datasets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uumamba.config import Config, TrainConfig
from uumamba.data import check as data_check
from uumamba.data import layouts
from uumamba.data import transforms as data_transforms
from uumamba.data.plan import Plans, apply_plan_decision, plan_dataset
from uumamba.engine import distributed as ddp
from uumamba.errors import DataError, ReportError, UserError, printable
from uumamba.model_folder import ModelFolder
from uumamba.model_folder.folder import PLANS, SPLITS

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What every rank needs from the model folder's preparation.

    Attributes:
        plans: the plan (reused, planned, or the resumed checkpoint's).
        cfg: the run's configuration with the plan's model / optimizer choices applied
            (:func:`uumamba.data.plan.apply_plan_decision`; what ``config.yaml`` holds).
        splits: ``splits.json``'s folds (empty for fold ``all`` when no split is possible).
        train_cases / val_cases: the fold's cases (``val_cases`` empty for fold ``all``).
    """

    plans: Plans
    splits: list[dict[str, list[str]]]
    train_cases: list[Any]
    val_cases: list[Any]
    cfg: Config | None = None

    def datasets(self, train_cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 cache_dir: Path | None = None) -> tuple[Any, Any, list[str]]:
        """The training dataset (``training_transforms``, all training cases) and this rank's
        share of the validation cases (``validation_transforms``), cached per
        ``train_cfg.cache``.

        Returns:
            ``(train_set, val_set, val_case_ids)``; ``val_set`` is None without validation
            (fold ``all``) and empty when this rank has no validation case.
        """
        train_set = data_transforms.make_dataset(
            self.train_cases, data_transforms.training_transforms(self.plans, train_cfg),
            train_cfg.cache, cache_dir=cache_dir)
        val_cases = self.val_cases[rank::world_size]  # shared out among the ranks
        val_set: Any = None
        if self.val_cases:
            val_set = data_transforms.make_dataset(
                val_cases, data_transforms.validation_transforms(self.plans), train_cfg.cache,
                cache_dir=cache_dir) if val_cases else []
        return train_set, val_set, [c.id for c in val_cases]


def _check(index: Any, cfg: Config) -> None:
    """Run the integrity check; log warnings, raise DataError listing the errors."""
    report = data_check.check_dataset(index, cfg.dataset, cfg.model.spatial_dims)
    for p in report.warnings:
        log.warning(f"warning: {p.file}: {p.message}")
    if report.fatal:
        errors = report.errors
        shown = "\n".join(printable(f"  {p.file}: {p.message}") for p in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        raise ReportError(f"{printable(index.root)}: {len(errors)} problem(s) stop training "
                        f"(`uumamba check-data {printable(index.root)}` prints the full report):\n"
                        f"{shown}{more}")


def _select_cases(cases: Sequence[Any], splits: list[dict[str, list[str]]], fold: str,
                  path: Path) -> tuple[list[Any], list[Any]]:
    """The fold's (train, val) cases; fold ``all``: every case, no validation.

    Raises:
        UserError: the fold is not in ``splits``. DataError: the fold names unknown cases.
    """
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
                         saved: dict[str, Any] | None = None,
                         device_type: str = "cuda") -> Prepared:
    """Check the dataset and write ``config.yaml``, ``plans.json``, ``dataset.json`` and
    ``splits.json`` into ``output_dir`` (reusing plans and splits already there).

    A new plan is sized for ``plan.target`` (``auto``: by ``device_type``); its choice and
    reason are logged, and its model / optimizer choices are applied to the configuration
    written to ``config.yaml`` and returned in :attr:`Prepared.cfg`.

    Args:
        saved: a checkpoint being resumed: its plans and splits are used as they are.
        device_type: the training device's type (``cpu``, ``cuda``).

    Raises:
        DataError: fatal integrity problems (all listed), unknown case ids in the splits.
        ConfigError: ``config.yaml`` there was made with different settings.
        UserError: the fold does not exist in ``splits.json``.
    """
    folder = ModelFolder(output_dir)
    index = layouts.discover(data_dir, layout=cfg.dataset.layout)
    _check(index, cfg)
    plans_path = folder.path(PLANS)
    if saved is not None:
        plans = Plans.model_validate(saved["plans"])
    elif plans_path.is_file():
        plans = folder.load_plans()
        log.info(f"using the existing plan {plans_path}"
                 + ("" if plans.decision is None else f" ({plans.decision.reason})"))
    else:
        plans = plan_dataset(index, cfg.dataset, cfg.plan, cfg.model, cfg.optim, device_type)
        if plans.decision is not None:
            log.info(f"plan: {plans.decision.reason}")
    cfg = apply_plan_decision(cfg, plans)
    folder.root.mkdir(parents=True, exist_ok=True)  # only once the plan stands: no empty folder
    if saved is None:
        folder.write_config(cfg)
    folder.write_plans(plans)
    folder.write_dataset_json(plans)
    if saved is not None:
        splits = saved["splits"]
    else:
        try:
            splits = folder.splits(index.cases, cfg.train.n_folds, cfg.train.seed)
        except ValueError as exc:
            if fold != "all":
                raise DataError(f"{data_dir}: cannot split into train.n_folds = "
                                f"{cfg.train.n_folds} folds: {exc}") from None
            splits = []  # fold "all" needs no split
    train_cases, val_cases = _select_cases(index.cases, splits, fold, folder.path(SPLITS))
    if not train_cases:
        raise DataError(f"{data_dir}: no training cases for fold {fold}")
    return Prepared(plans=plans, splits=splits, train_cases=train_cases, val_cases=val_cases,
                    cfg=cfg)


def prepare_everywhere(cfg: Config, data_dir: Path, output_dir: Path, fold: str,
                       ctx: ddp.DistContext, saved: dict[str, Any] | None) -> Prepared:
    """Rank 0 runs :func:`prepare_model_folder`; the result (or its error) reaches every rank.

    Raises:
        UserError (or its subclass raised on rank 0): the preparation failed.
    """
    prepared, error = None, None
    if ctx.is_main:
        try:
            prepared = prepare_model_folder(cfg, data_dir, output_dir, fold, saved,
                                            ctx.device.type)
        except UserError as exc:
            error = exc
    prepared, text = ddp.broadcast_object((prepared, None if error is None else str(error)),
                                          ctx)
    if error is not None:
        raise error
    if text is not None:
        raise UserError(text)
    return prepared
