"""Patient-grouped k-fold cross-validation splits (``splits.json``).

Cases sharing a ``group`` (the patient: ACDC's ED and ES frames) always land in the same
fold, so no patient is in both training and validation. Groups are shuffled with
``numpy.random.default_rng(seed)`` and dealt to folds largest-first onto the fold with the
fewest cases, which balances case counts; the result depends only on the case ids, groups
and seed. The file format is nnU-Net's: a JSON list of ``{"train": [ids], "val": [ids]}``.
Fold ``all`` (train on everything) is handled by the training engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from uumamba.data.layouts import Case
from uumamba.errors import DataError
from uumamba.utils import atomic_path


def make_splits(cases: Sequence[Case], n_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Deterministic k-fold split of ``cases`` grouped by ``case.group``.

    Returns:
        ``n_folds`` dicts ``{"train": [case ids], "val": [case ids]}`` (ids sorted); every
        case is in exactly one ``val`` list.

    Raises:
        ValueError: ``n_folds`` < 2, or fewer groups (patients) than folds.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds={n_folds}: need at least 2 folds (use fold 'all' to train "
                         "on everything)")
    groups: dict[str, list[str]] = {}
    for case in sorted(cases, key=lambda c: c.id):
        groups.setdefault(case.group, []).append(case.id)
    if len(groups) < n_folds:
        raise ValueError(f"n_folds={n_folds}: only {len(groups)} patient group(s) to split")
    names = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    # stable sort by size (largest first) keeps the shuffled order among equal sizes
    shuffled.sort(key=lambda g: -len(groups[g]))
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for group in shuffled:
        target = min(range(n_folds), key=lambda k: (len(folds[k]), k))
        folds[target].extend(groups[group])
    all_ids = sorted(c.id for c in cases)
    return [{"train": sorted(set(all_ids) - set(val)), "val": sorted(val)} for val in folds]


def save_splits(splits: list[dict[str, list[str]]], path: str | Path) -> None:
    """Write splits as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=2) + "\n")


def load_splits(path: str | Path, cases: Sequence[Case] | None = None) -> list[dict[str, list[str]]]:
    """Read a ``splits.json`` and, given ``cases``, check that it names only known cases.

    Raises:
        DataError: unreadable file, wrong structure, or case ids not in ``cases`` (named).
    """
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read splits: {exc}") from None
    if not isinstance(splits, list) or not all(
        isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list)
        for f in splits
    ):
        raise DataError(f"{path}: expected a JSON list of {{\"train\": [...], \"val\": [...]}}")
    if cases is not None:
        known = {c.id for c in cases}
        unknown = sorted({i for f in splits for i in f["train"] + f["val"]} - known)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataError(f"{path}: {len(unknown)} case id(s) not in the dataset: {shown}")
    return splits


def load_or_create_splits(path: str | Path, cases: Sequence[Case], n_folds: int = 5,
                          seed: int = 12345) -> list[dict[str, list[str]]]:
    """Use the ``splits.json`` at ``path`` when it exists (a user-provided split is
    honoured, validated against ``cases``); otherwise make one and save it there.

    Raises:
        DataError: see :func:`load_splits`. ValueError: see :func:`make_splits`.
    """
    path = Path(path)
    if path.is_file():
        return load_splits(path, cases)
    splits = make_splits(cases, n_folds, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_splits(splits, path)
    return splits
