"""benchmarks/bench_predict.py: its report from a hand-made result, its Dice of two masks, and
its refusal of a folder that is not a trained model (before any prediction)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from uumamba.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_predict",
                                                  REPO / "benchmarks" / "bench_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dice_of_two_masks():
    bench = _bench()
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert bench._dice(a, b) is None
    a[0, :] = True
    b[0, :2] = True
    assert bench._dice(a, b) == pytest.approx(2 * 2 / 6)


def test_report_lists_every_predictor_stage_and_the_agreement():
    bench = _bench()
    stages = {s: 0.1 for s in bench.STAGES}
    names = ["uumamba auto", "uumamba off", "dynunet auto", "dynunet off"]
    result = {
        "auto_precision": "bfloat16", "volumes": ["a", "b", "c"], "warmup": "a",
        "stages": {n: dict(stages, network=1.0 + i) for i, n in enumerate(names)},
        "total": {n: 1.5 + i for i, n in enumerate(names)},
        "agreement": [{"case": "b", "RV": {"bf16_vs_float32": 0.99, "auto_vs_truth": 0.8,
                                            "off_vs_truth": 0.81}},
                      {"case": "c", "RV": {"bf16_vs_float32": 0.97, "auto_vs_truth": None,
                                            "off_vs_truth": 0.79}}],
        "startup": {"case": "a", "process_seconds": [4.0, 3.0, 3.5], "mean": 3.5,
                    "in_process_seconds": 1.5},
    }
    text = bench.markdown(result, "vm: test")
    assert "`inference.amp=auto` is bfloat16 here; 2 volumes after the warm-up a" in text
    assert "| network | 1.000 | 2.000 | 3.000 | 4.000 |" in text
    assert "| **total (wall)** | **1.500** | **2.500** | **3.500** | **4.500** |" in text
    assert "| class | bf16 vs float32 | vs truth, auto | vs truth, float32 |" in text
    assert "| RV | 0.9800 | 0.8000 | 0.8000 |" in text  # None is left out of the mean
    assert "| foreground mean | 0.9800 | 0.8000 | 0.8000 |" in text
    assert "as a process on a: 3.50 s (runs 4.00, 3.00, 3.50), against 1.50 s" in text


def test_a_folder_without_a_model_is_refused(tmp_path):
    bench = _bench()
    with pytest.raises(UserError, match=r"not a trained model folder \(no splits\.json\)"):
        bench.main(["--model", str(tmp_path), "--data", str(tmp_path)])


def test_per_volume_ratio_is_the_geometric_mean_with_an_interval():
    bench = _bench()
    totals = {"uumamba auto": [1.0, 2.0, 4.0], "dynunet auto": [2.0, 2.0, 2.0],
              "uumamba off": [1.0, 1.0], "dynunet off": [1.0, 1.0]}
    r = bench._ratios(totals)
    assert r["auto"]["ratio"] == pytest.approx(1.0)  # (0.5 * 1 * 2) ** (1 / 3)
    assert r["auto"]["low"] < 1.0 < r["auto"]["high"] and r["auto"]["n"] == 3
    assert r["off"] == {"ratio": 1.0, "low": 1.0, "high": 1.0, "n": 2}
    post = {"uumamba auto": [0.0, 0.0, 2.0], "dynunet auto": [1.0, 1.0, 1.0]}
    r = bench._ratios(totals, post)
    assert r["auto"]["before_postprocess"]["ratio"] == pytest.approx((1 * 2 * 2) ** (1 / 3))
    assert "before_postprocess" not in r["off"]
