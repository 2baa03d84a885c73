"""benchmarks/bench_acdc.py's cross-validation report: pooled means, intervals and paired
differences over every fold's validation volumes, from hand-made fold records."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_acdc", REPO / "benchmarks" / "bench_acdc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(fold: int, ours: dict, theirs: dict) -> dict:
    return {"fold": fold, "val_cases": sorted(ours), "iterations": {"uumamba": 10, "dynunet": 12},
            "train_seconds": {"uumamba": 60.0, "dynunet": 61.0},
            "predict_seconds": {"uumamba": [1.0, 2.0], "dynunet": [1.5, 1.5]},
            "dice": {"uumamba": {"raw": ours, "postprocessed": ours},
                     "dynunet": {"raw": theirs, "postprocessed": theirs}},
            "postprocessing_labels": {"uumamba": [], "dynunet": [1]}}


def test_pooled_table_pools_volumes_of_all_folds(tmp_path):
    bench = _bench()
    records = [
        _record(0, {"a": {"RV": 0.8, "LV": 0.9}, "b": {"RV": 0.6, "LV": 0.8}},
                {"a": {"RV": 0.7, "LV": 0.9}, "b": {"RV": 0.5, "LV": 0.7}}),
        _record(1, {"c": {"RV": None, "LV": 0.95}, "d": {"RV": 0.9, "LV": 0.85}},
                {"c": {"RV": 0.2, "LV": 0.90}, "d": {"RV": 0.8, "LV": 0.80}}),
    ]
    table = bench.pooled_table(records, ["RV", "LV"])
    rv = table["raw"]["RV"]
    # case c has no RV score on our side: that pair is left out of both means
    assert rv["n"] == 3
    assert rv["uumamba"]["estimate"] == pytest.approx(np.mean([0.8, 0.6, 0.9]))
    assert rv["dynunet"]["estimate"] == pytest.approx(np.mean([0.7, 0.5, 0.8]))
    assert rv["difference"]["estimate"] == pytest.approx(0.1)
    assert rv["difference"]["low"] == pytest.approx(0.1)  # constant difference: point interval
    fg = table["raw"]["foreground"]
    ours_fg = [0.85, 0.7, 0.95, 0.875]  # c: LV only (RV missing)
    assert fg["n"] == 4 and fg["uumamba"]["estimate"] == pytest.approx(np.mean(ours_fg))
    assert fg["uumamba"]["low"] <= fg["uumamba"]["estimate"] <= fg["uumamba"]["high"]
    result = {"folds": records, "table": table, "minutes": 20.0, "threads": 2}
    bench.write_markdown(result, tmp_path / "bench.md")
    text = (tmp_path / "bench.md").read_text()
    assert "folds 0, 1" in text and "| foreground |" in text and "| 1 | dynunet | float32 | 12 | 61 | 1.50 |" in text
