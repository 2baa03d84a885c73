"""Patient-grouped, deterministic k-fold splits and user-provided splits.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uumamba.data.layouts import Case, discover
from uumamba.data.splits import load_or_create_splits, make_splits
from uumamba.errors import DataError


def _cases(n_patients: int = 13) -> list[Case]:
    cases = []
    for p in range(n_patients):
        frames = (1, 12) if p % 4 else (1,)  # some patients contribute one case only
        cases += [Case(f"patient{p:03d}_frame{f:02d}", f"patient{p:03d}", [Path("x.nii.gz")],
                       Path("y.nii.gz")) for f in frames]
    return cases


def test_grouped_complete_and_balanced() -> None:
    cases = _cases()
    splits = make_splits(cases, n_folds=5, seed=3)
    assert len(splits) == 5
    group_of = {c.id: c.group for c in cases}
    all_ids = sorted(c.id for c in cases)
    assert sorted(i for f in splits for i in f["val"]) == all_ids  # each case validated once
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == all_ids
        assert not {group_of[i] for i in fold["train"]} & {group_of[i] for i in fold["val"]}
    sizes = [len(f["val"]) for f in splits]
    assert max(sizes) - min(sizes) <= 2


def test_deterministic_by_seed() -> None:
    cases = _cases()
    assert make_splits(cases, 5, seed=1) == make_splits(list(reversed(cases)), 5, seed=1)
    assert make_splits(cases, 5, seed=1) != make_splits(cases, 5, seed=2)
    with pytest.raises(ValueError, match="n_folds=1"):
        make_splits(cases, 1)
    with pytest.raises(ValueError, match="only 13 patient group"):
        make_splits(cases, 20)


def test_load_or_create(tmp_path: Path) -> None:
    cases = _cases()
    path = tmp_path / "model" / "splits.json"
    created = load_or_create_splits(path, cases, 3, seed=0)
    assert json.loads(path.read_text()) == created and len(created) == 3
    # a user-edited file is honoured as it is
    custom = [{"train": ["patient001_frame01"], "val": ["patient002_frame01"]}]
    path.write_text(json.dumps(custom))
    assert load_or_create_splits(path, cases, 5, seed=0) == custom
    path.write_text(json.dumps([{"train": ["patient001_frame01", "ghost_1"], "val": ["ghost_2"]}]))
    with pytest.raises(DataError, match="splits.json: 2 case id.*ghost_1, ghost_2"):
        load_or_create_splits(path, cases, 5, seed=0)
    path.write_text(json.dumps({"train": []}))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_or_create_splits(path, cases, 5, seed=0)


def test_real_acdc_folds_keep_ed_es_together(acdc_dir: Path) -> None:
    index = discover(acdc_dir)
    splits = make_splits(index.cases, n_folds=5, seed=12345)
    for fold in splits:
        assert len(fold["val"]) == 8  # 4 patients x (ED, ES)
        patients = {i.split("_")[0] for i in fold["val"]}
        assert len(patients) == 4 and not patients & {i.split("_")[0] for i in fold["train"]}
