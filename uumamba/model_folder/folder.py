"""The model folder written by ``uumamba train`` and read by ``predict``, ``serve`` and
``export-slicer``: its one owner.

Layout (docs/architecture.md)::

    MODEL/config.yaml        the run's configuration (dataset / plan / model shared by folds)
    MODEL/plans.json         preprocessing, patch size, network topology (uumamba.data.plan)
    MODEL/splits.json        patient-grouped folds, nnU-Net's format (uumamba.data.splits)
    MODEL/dataset.json       {"labels": {"0": "background", ...}, "modality",
                             "num_input_channels", "spatial_dims"}
    MODEL/postprocessing.json   optional, overrides the folds' decisions
    MODEL/fold_K/ (fold_all/)   checkpoint_latest.pt  checkpoint_best.pt  postprocessing.json
                                metrics.jsonl  progress.png  validation_overlay.png  tensorboard/

Training writes through :class:`ModelFolder` (``write_config``, ``write_plans``,
``write_dataset_json``, ``splits``, ``save_postprocessing``); the predictor, the service and
the Slicer export read through it (``require``, ``load_config``, ``load_plans``, ``labels``,
``fold_checkpoints``, ``postprocessing``, ``digests``). Nothing here loads a network, so a
damaged folder is reported in one line before any weights are read.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uumamba.config import Config, load_config, save_config
from uumamba.data.labels import read_dataset_labels, read_json_object
from uumamba.data.plan import Plans
from uumamba.errors import ConfigError, DataError, UserError, shown
from uumamba.model_folder.checkpoints import BEST, LATEST
from uumamba.utils import atomic_path, json_safe

_FOLD = re.compile(r"(fold_)?(\d{1,3}|all)", re.ASCII)  # a fold folder's name, with or without fold_

CONFIG = "config.yaml"
PLANS = "plans.json"
SPLITS = "splits.json"
DATASET_JSON = "dataset.json"
POSTPROCESSING = "postprocessing.json"
#: Checkpoint used per fold, in order of preference.
CHECKPOINT_NAMES: tuple[str, ...] = (BEST, LATEST)
#: ``checkpoint`` argument -> the files tried per fold, in order: ``best`` is the default
#: (``checkpoint_best.pt``, else the latest, as nnU-Net's ``checkpoint_best``), ``latest``
#: the final weights only (nnU-Net's ``-chk checkpoint_final.pth``): what a cross-validation
#: must score, since ``checkpoint_best.pt`` was chosen by the Dice of those same cases.
CHECKPOINT_CHOICES: dict[str, tuple[str, ...]] = {"best": CHECKPOINT_NAMES, "latest": (LATEST,)}
#: Config sections every fold of one model must share (the predictor ensembles the folds).
SHARED_SECTIONS: tuple[str, ...] = ("dataset", "plan", "model")


@dataclass(frozen=True)
class WeightsDigest:
    """One checkpoint the predictor loads: fold name, path relative to the folder (POSIX),
    SHA-256 (hex) and size in bytes."""

    fold: str
    file: str
    sha256: str
    size_bytes: int


def parse_folds(folds: str | int | Sequence[str | int] | None) -> list[str] | None:
    """``"0,1"`` / ``[0, "fold_1"]`` / ``"all"`` -> fold folder names; None stays None.

    Raises:
        UserError: a fold is neither a number (up to 3 digits) nor ``all``, with or without
            ``fold_`` (the value is shown cut to 20 characters).
    """
    if folds is None:
        return None
    if isinstance(folds, (str, int)):
        folds = [f for f in str(folds).split(",") if f.strip()]
    names = []
    for fold in (str(x).strip() for x in folds):
        if not _FOLD.fullmatch(fold):
            raise UserError(f"fold {shown(fold)}: expected a fold number (0, 1, ...) or all, "
                            "comma-separated")
        names.append(fold if fold.startswith("fold_") else f"fold_{fold}")
    return names


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file, hex, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class ModelFolder:
    """A model folder on disk (it need not exist yet when training is about to create it).

    Args:
        root: the folder (``runs/NAME``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.root)!r})"

    @property
    def name(self) -> str:
        return self.root.name

    def path(self, name: str) -> Path:
        """``root / name`` (one of the layout's file names)."""
        return self.root / name

    def fold_dir(self, fold: str) -> Path:
        """``fold_K`` / ``fold_all`` for fold ``K`` / ``all``."""
        fold = str(fold)
        return self.root / (fold if fold.startswith("fold_") else f"fold_{fold}")

    # ------------------------------------------------------------------ reading

    def require(self, folds: str | int | Sequence[str | int] | None = None,
                checkpoint: str = "best") -> ModelFolder:
        """Check that this is a trained model folder; return it with a resolved root.

        Raises:
            UserError: one line naming the folder and what is missing (the folder,
                ``plans.json``, ``config.yaml``, any / a requested fold checkpoint), or that
                ``plans.json`` is not a JSON object.
        """
        if not self.root.is_dir():
            raise UserError(f"model folder {self.root} does not exist (train one with "
                            "'uumamba train')")
        for name in (PLANS, CONFIG):
            if not self.path(name).is_file():
                raise UserError(f"{self.root} is not a trained model folder: {name} is missing")
        read_json_object(self.path(PLANS), PLANS)
        self.fold_checkpoints(folds, checkpoint)
        return ModelFolder(self.root.resolve())

    def load_config(self) -> Config:
        """``config.yaml``. Raises ConfigError (unreadable or invalid, naming the file)."""
        return load_config(self.path(CONFIG))

    def load_plans(self) -> Plans:
        """``plans.json``. Raises ConfigError (unreadable or invalid, naming the file)."""
        return Plans.load(self.path(PLANS))

    def dataset_labels(self) -> dict[int, str] | None:
        """Labels of ``dataset.json``; None when the file or its labels are absent.

        Raises:
            DataError: the file is not readable JSON or its labels are malformed.
        """
        path = self.path(DATASET_JSON)
        return read_dataset_labels(path) if path.is_file() else None

    def labels(self, plans: Plans | None = None) -> dict[int, str]:
        """Value -> name: ``dataset.json``'s names win over the plan's."""
        return self.dataset_labels() or dict((plans or self.load_plans()).labels)

    def fold_checkpoints(self, folds: str | int | Sequence[str | int] | None = None,
                         checkpoint: str = "best") -> dict[str, Path]:
        """Fold folder name -> the checkpoint its weights are loaded from.

        Args:
            folds: fold indices / names (``0``, ``"fold_0"``, ``"all"``, ``"0,1"``); None:
                every ``fold_*`` folder with a checkpoint.
            checkpoint: ``best`` (``checkpoint_best.pt``, else ``checkpoint_latest.pt``) or
                ``latest`` (``checkpoint_latest.pt`` only: the final weights; see
                :data:`CHECKPOINT_CHOICES`).

        Raises:
            UserError: an unknown ``checkpoint``; no fold has such a checkpoint, or a
                requested fold has none.
        """
        names = CHECKPOINT_CHOICES.get(checkpoint)
        if names is None:
            raise UserError(f"checkpoint: {shown(checkpoint)} is not one of "
                            f"{', '.join(CHECKPOINT_CHOICES)}")
        found: dict[str, Path] = {}
        for fold_dir in sorted(p for p in self.root.glob("fold_*") if p.is_dir()):
            for name in names:
                if (fold_dir / name).is_file():
                    found[fold_dir.name] = fold_dir / name
                    break
        wanted = parse_folds(folds)
        files = " or ".join(names)
        if wanted is None:
            # folds with another checkpoint only (a best, no latest: a training stopped
            # before its end) are named, never silently left out of the ensemble
            other = sorted({path.parent.name for name in CHECKPOINT_NAMES
                            for path in self.root.glob(f"fold_*/{name}")
                            if path.is_file()} - set(found))
            if other:
                raise UserError(f"{self.root}: {', '.join(other)} has no {files}, only "
                                "checkpoint_best.pt (its training did not finish); choose the "
                                "folds, or checkpoint 'best'")
            if not found:
                raise UserError(f"{self.root}: no fold_*/{files}; is this a model folder "
                                "written by 'uumamba train'?")
            return found
        missing = [f for f in wanted if f not in found]
        if missing:
            raise UserError(f"{self.root}: {', '.join(missing)} has no {files} "
                            f"(folds with one: {', '.join(found) or 'none'})")
        return {f: found[f] for f in wanted}

    def digests(self, folds: str | int | Sequence[str | int] | None = None,
                checkpoint: str = "best") -> list[WeightsDigest]:
        """SHA-256 and size of every checkpoint the predictor would load for ``folds`` and
        ``checkpoint`` (:meth:`fold_checkpoints`)."""
        return [WeightsDigest(fold, path.relative_to(self.root).as_posix(), sha256_file(path),
                              path.stat().st_size)
                for fold, path in self.fold_checkpoints(folds, checkpoint).items()]

    @staticmethod
    def version(digests: Sequence[WeightsDigest]) -> str:
        """A 12-hex-digit model version: SHA-256 over the checkpoints' digests in fold order."""
        return hashlib.sha256("".join(d.sha256 for d in digests).encode()).hexdigest()[:12]

    def postprocessing(self, fold_dirs: Sequence[str | Path]) -> dict[str, Any] | None:
        """The postprocessing to apply for an ensemble of ``fold_dirs``.

        ``MODEL/postprocessing.json`` (e.g. decided on the whole cross-validation) wins when
        present. Otherwise each fold's ``postprocessing.json`` is read and a class is filtered
        only if every fold enabled it (a fold without the file enables nothing).

        Returns:
            A spec for :func:`uumamba.inference.postprocess.apply_postprocessing`, or None
            when nothing is enabled.

        Raises:
            DataError: a ``postprocessing.json`` is not readable JSON of the expected form.
        """
        root_file = self.path(POSTPROCESSING)
        if root_file.is_file():
            spec = _read_postprocessing(root_file)
            return spec if spec["largest_component_labels"] else None
        common: set[int] | None = None
        for fold_dir in fold_dirs:
            path = Path(fold_dir) / POSTPROCESSING
            labels = set(_read_postprocessing(path)["largest_component_labels"]) \
                if path.is_file() else set()
            common = labels if common is None else common & labels
        if not common:
            return None
        return {"largest_component_labels": sorted(common),
                "source": [str(f) for f in fold_dirs]}

    def cross_validation_decisions(self, n_folds: int) -> list[tuple[str, dict[str, Any]]]:
        """``(fold_K, its postprocessing.json)`` for each fold 0 .. ``n_folds - 1`` that has one
        (for the decision of a ``fold_all`` model, :func:`uumamba.inference.postprocess.
        pool_fold_decisions`).

        Raises:
            DataError: a fold's ``postprocessing.json`` is not readable JSON of the expected
                form.
        """
        found = []
        for k in range(n_folds):
            path = self.fold_dir(str(k)) / POSTPROCESSING
            if path.is_file():
                found.append((f"fold_{k}", _read_postprocessing(path)))
        return found

    # ------------------------------------------------------------------ writing (training)

    def write_config(self, cfg: Config) -> Path:
        """Save ``config.yaml``.

        Raises:
            ConfigError: the folder was made with other dataset / plan / model settings
                (folds of one model must share them, the predictor ensembles them).
        """
        path = self.path(CONFIG)
        if path.is_file():
            old = load_config(path)
            differ = [s for s in SHARED_SECTIONS
                      if getattr(old, s).model_dump() != getattr(cfg, s).model_dump()]
            if differ:
                raise ConfigError(f"{path}: this model folder was created with different "
                                  f"{', '.join(differ)} settings; folds of one model must "
                                  "share them - use another --output")
        save_config(cfg, path)
        return path

    def write_plans(self, plans: Plans) -> Path:
        """Save ``plans.json`` unless one is there already (folds share the plan)."""
        path = self.path(PLANS)
        if not path.is_file():
            plans.save(path)
        return path

    def write_dataset_json(self, plans: Plans) -> Path:
        """``dataset.json``: labels (value as a string -> name), modality, channels, dims."""
        info = {"labels": {str(k): v for k, v in sorted(plans.labels.items())},
                "modality": plans.modality, "num_input_channels": plans.num_input_channels,
                "spatial_dims": plans.spatial_dims}
        path = self.path(DATASET_JSON)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")
        return path

    def splits(self, cases: Sequence[Any], n_folds: int, seed: int) -> list[dict[str, list[str]]]:
        """``splits.json`` when present (validated against ``cases``), else a new patient-grouped
        split saved there (:func:`uumamba.data.splits.load_or_create_splits`).

        Raises:
            DataError: an unreadable or inconsistent ``splits.json``. ValueError: too few
                groups for ``n_folds``.
        """
        from uumamba.data.splits import load_or_create_splits

        return load_or_create_splits(self.path(SPLITS), cases, n_folds, seed)

    @staticmethod
    def save_postprocessing(spec: dict[str, Any], fold_dir: str | Path) -> Path:
        """Write ``spec`` to ``fold_dir/postprocessing.json`` atomically (NaN as null)."""
        path = Path(fold_dir) / POSTPROCESSING
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(json_safe(spec), indent=2))
        return path


def _read_postprocessing(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
        labels = [int(v) for v in spec.get("largest_component_labels", [])]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: cannot read postprocessing spec: {exc}") from None
    return {**spec, "largest_component_labels": labels}


def save_postprocessing(spec: dict[str, Any], fold_dir: str | Path) -> Path:
    """``fold_dir/postprocessing.json`` (see :meth:`ModelFolder.save_postprocessing`)."""
    return ModelFolder.save_postprocessing(spec, fold_dir)


def load_postprocessing(model_dir: str | Path, fold_dirs: Sequence[str | Path]
                        ) -> dict[str, Any] | None:
    """The ensemble's postprocessing (see :meth:`ModelFolder.postprocessing`)."""
    return ModelFolder(model_dir).postprocessing(fold_dirs)
