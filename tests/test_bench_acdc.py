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
    assert "folds 0, 1" in text and "| foreground |" in text and "| 1 | dynunet | this run | float32 | 12 | 61 | 1.50 | in turn |" in text


def test_reference_run_pairs_volumes_with_an_earlier_runs_uumamba(tmp_path):
    """--reference: this run's UU-Mamba against an earlier run's, volume by volume; a fold
    whose validation cases differ (another splits.json) is refused."""
    from uumamba.errors import UserError

    bench = _bench()
    earlier = {"folds": [_record(0, {"a": {"RV": 0.7, "LV": 0.9}, "b": {"RV": 0.5, "LV": 0.8}},
                                 {"a": {"RV": 0.1, "LV": 0.1}, "b": {"RV": 0.1, "LV": 0.1}})]}
    earlier["folds"][0]["machine"] = "earlier machine"
    now = _record(0, {"a": {"RV": 0.8, "LV": 0.9}, "b": {"RV": 0.6, "LV": 0.9}}, {})
    for key in ("dice", "iterations", "train_seconds", "predict_seconds"):
        now[key].pop("dynunet")
    merged = bench.with_reference([now], earlier, "earlier.json")
    assert merged[0]["iterations"] == {"uumamba": 10, "reference": 10, "dynunet": 12}
    assert "reference" not in now["dice"]  # the run's own record is left as it was
    table = bench.pooled_table(merged, ["RV", "LV"], "reference")
    assert table["raw"]["RV"]["difference"]["estimate"] == pytest.approx(0.1)
    assert table["raw"]["LV"]["difference"]["estimate"] == pytest.approx(0.05)
    assert table["raw"]["RV"]["reference"]["estimate"] == pytest.approx(0.6)
    against_dynunet = bench.pooled_table(merged, ["RV", "LV"], "dynunet")  # the earlier run's
    assert against_dynunet["raw"]["RV"]["difference"]["estimate"] == pytest.approx(0.6)
    result = {"folds": merged, "table": table, "minutes": 20.0, "threads": 2,
              "other": "reference", "reference": "earlier.json", "overrides": ["model.expand=1"],
              "table_dynunet": against_dynunet}
    bench.write_markdown(result, tmp_path / "bench.md")
    text = (tmp_path / "bench.md").read_text()
    assert "UU-Mamba vs reference (earlier.json)" in text and "model.expand=1" in text
    assert "| 0 | reference | reference run | float32 | 10 | 60 | 1.50 | in turn |" in text
    # the reference run's DynUNet gets its row, marked as that run's
    assert "| 0 | dynunet | reference run | float32 | 12 | 61 | 1.50 | in turn |" in text
    assert "| 0 | uumamba | this run | float32 | 10 | 60 | 1.50 | alone, after a warm-up |" in text
    assert "Reference's machine (fold 0): earlier machine" in text
    assert "| RV | 0.700 [0.600, 0.800] | 0.100 [0.100, 0.100] | +0.600 [+0.500, +0.700] |" in text
    other_split = {**now, "val_cases": ["a", "c"]}
    with pytest.raises(UserError, match="validation cases differ"):
        bench.with_reference([other_split], earlier, "earlier.json")
    with pytest.raises(UserError, match="fold 1 has no UU-Mamba record"):
        bench.with_reference([{**now, "fold": 1}], earlier, "earlier.json")


def test_crafted_reference_is_refused_in_one_line_before_training(tmp_path):
    """A --reference is untrusted: each broken rule is one UserError naming the fold and the
    field (never a traceback, never a table that pairs the wrong volumes); the file is read
    bounded, and a FIFO is refused, not waited on."""
    import copy
    import json
    import os

    from uumamba.errors import UserError

    bench = _bench()
    good = {"folds": [_record(0, {"a": {"RV": 0.7, "LV": 0.9}, "b": {"RV": 0.5, "LV": 0.8}},
                              {"a": {"RV": 0.1, "LV": 0.1}, "b": {"RV": 0.1, "LV": 0.1}})]}
    assert set(bench.check_reference(good, "r.json", [0], ["RV", "LV"], {0: ["b", "a"]})) == {0}

    def broken(edit):
        ref = copy.deepcopy(good)
        edit(ref["folds"][0])
        return ref

    cases = {
        "iterations.uumamba": broken(lambda f: f.pop("iterations")),
        "dice.uumamba.raw does not hold one entry per validation case":
            broken(lambda f: f["dice"]["uumamba"]["raw"].update(c=f["dice"]["uumamba"]["raw"].pop("b"))),
        "is not a Dice in": broken(lambda f: f["dice"]["uumamba"]["raw"]["a"].update(LV=-5)),
        "does not hold the classes RV, LV": broken(lambda f: f["dice"]["dynunet"]["raw"]["a"].pop("RV")),
        "train_seconds.dynunet": broken(lambda f: f["train_seconds"].update(dynunet="1e300")),
        "predict_seconds.uumamba": broken(lambda f: f["predict_seconds"].update(uumamba=[True])),
        "val_cases are not a list": broken(lambda f: f.update(val_cases="ab")),
        "dice.uumamba.postprocessed": broken(lambda f: f["dice"]["uumamba"].update(postprocessed=[])),
    }
    for rule, ref in cases.items():
        with pytest.raises(UserError, match=rule.replace("(", r"\(")) as info:
            bench.check_reference(ref, "r.json", [0], ["RV", "LV"], {0: ["a", "b"]})
        assert "\n" not in str(info.value) and str(info.value).startswith("--reference r.json: fold 0")
    with pytest.raises(UserError, match="validation cases differ"):
        bench.check_reference(good, "r.json", [0], ["RV", "LV"], {0: ["a", "c"]})
    with pytest.raises(UserError, match="list of 'folds'"):
        bench.check_reference({"a": 1}, "r.json", [0], ["RV", "LV"])

    (tmp_path / "nan.json").write_text('{"folds": [NaN]}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(tmp_path / "fifo.json")
    for name in ("nan.json", "deep.json", "fifo.json"):
        with pytest.raises(UserError, match=f"--reference {tmp_path / name}: "):
            bench.read_reference(tmp_path / name)
    (tmp_path / "ok.json").write_text(json.dumps(good))
    assert bench.read_reference(tmp_path / "ok.json") == good


def test_reference_rows_show_the_reference_precision_and_budget(tmp_path):
    bench = _bench()
    earlier = {"minutes": 20, "folds": [_record(0, {"a": {"LV": 0.9}, "b": {"LV": 0.8}},
                                                {"a": {"LV": 0.1}, "b": {"LV": 0.1}})]}
    earlier["folds"][0]["train_precision"] = "bfloat16"
    earlier["folds"][0]["predict_interleaved"] = True
    now = {**_record(0, {"a": {"LV": 0.9}, "b": {"LV": 0.9}}, {}), "weights": "last"}
    for key in ("dice", "iterations", "train_seconds", "predict_seconds"):
        now[key].pop("dynunet")
    merged = bench.with_reference([now], earlier, "earlier.json")
    result = {"folds": merged, "table": bench.pooled_table(merged, ["LV"], "reference"),
              "minutes": 1.0, "threads": 2, "other": "reference", "reference": "earlier.json",
              "reference_minutes": earlier["minutes"]}
    bench.write_markdown(result, tmp_path / "bench.md")
    text = (tmp_path / "bench.md").read_text()
    assert "1 min per fold for this run's UU-Mamba, 20 min for the reference's" in text
    assert "| 0 | reference | reference run | bfloat16 | 10 | 60 | 1.50 | interleaved |" in text
    assert "| 0 | uumamba | this run | float32 |" in text
    assert "**Precision differs**: this run trained in float32, the reference in bfloat16" in text
    # the earlier record has no "weights": scored from checkpoint_best.pt, which is said
    assert "**Weights differ**: this run's UU-Mamba predicted from its last weights, the " \
        "reference's from its best" in text
    earlier["folds"][0]["weights"] = "last"
    merged = bench.with_reference([now], earlier, "earlier.json")
    bench.write_markdown({**result, "folds": merged}, tmp_path / "bench.md")
    assert "Weights differ" not in (tmp_path / "bench.md").read_text()


def test_a_stop_signal_during_training_records_no_fold(tmp_path, monkeypatch):
    """SIGINT / SIGTERM while UU-Mamba trains: its checkpoint is saved, but the fold is not
    scored or recorded as done, and the script exits 128 + the signal (here 143)."""
    import argparse
    import signal

    import uumamba.engine.train as train
    from uumamba.engine.loop import FoldResult

    bench = _bench()
    monkeypatch.setattr(train, "run_fold", lambda *a, **k: FoldResult(
        tmp_path / "fold_0", False, "signal", signal.SIGTERM, 2, None))
    args = argparse.Namespace(output=tmp_path, config=Path("acdc_cpu.yaml"), minutes=1.0,
                              reference=None, data=tmp_path)
    with pytest.raises(SystemExit) as info:
        bench.run_fold_pair(None, args, 0)
    assert info.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "folds").exists()


def test_predict_ratio_pairs_the_interleaved_folds_volume_by_volume(tmp_path):
    """The per-volume ratio of predict seconds (geometric mean) pooled over the folds
    predicted interleaved, and per fold; a record from before interleaving (sequential
    seconds) and one merged with a --reference (its DynUNet from another run) are left out;
    a record with broken seconds is refused naming its fold."""
    from uumamba.errors import UserError

    bench = _bench()
    dice = {"a": {"RV": 0.8}, "b": {"RV": 0.7}}
    records = [_record(f, dice, dice) for f in (0, 1, 2)]
    assert bench.predict_ratio(records) is None  # none interleaved
    records[0]["predict_interleaved"] = records[1]["predict_interleaved"] = True
    records[1]["predict_seconds"] = {"uumamba": [1.0, 1.0], "dynunet": [2.0, 2.0]}
    q = bench.predict_ratio(records)
    assert q["n"] == 4
    assert q["per_fold"] == {"0": pytest.approx(np.sqrt(8 / 9)), "1": pytest.approx(0.5)}
    assert q["ratio"] == pytest.approx(((1 / 1.5) * (2 / 1.5) * 0.5 * 0.5) ** 0.25)
    assert q["low"] <= q["ratio"] <= q["high"]
    for r, machine in zip(records, ("CPU B", "CPU A", "CPU B"), strict=True):
        r["machine"] = machine
    result = {"folds": records[::-1], "table": bench.pooled_table(records, ["RV"]),
              "minutes": 20.0, "threads": 2, "predict_ratio": q}
    bench.write_markdown(result, tmp_path / "bench.md")
    text = (tmp_path / "bench.md").read_text()
    assert f"interleaved volume by volume: **{q['ratio']:.3f}**" in text
    assert "fold 0 0.943, fold 1 0.500" in text
    assert text.rstrip().endswith("Machine (folds 0, 2): CPU B\nMachine (fold 1): CPU A")
    assert "| 0 | dynunet | this run | float32 | 12 | 61 | 1.50 | interleaved |" in text
    assert "| 2 | dynunet | this run | float32 | 12 | 61 | 1.50 | in turn |" in text

    now = _record(0, dice, {})
    now["predict_interleaved"] = True  # as a resumed fold might carry
    for key in ("dice", "iterations", "train_seconds", "predict_seconds"):
        now[key].pop("dynunet")
    merged = bench.with_reference([now], {"folds": [_record(0, dice, dice)]}, "earlier.json")
    assert "dynunet" in merged[0]["predict_seconds"]
    assert bench.predict_ratio(merged) is None

    for broken in ({"uumamba": [1.0], "dynunet": [1.0, 2.0]},
                   {"uumamba": [1.0, 0.0], "dynunet": [1.0, 2.0]}, {"uumamba": [1.0, 2.0]},
                   [1.0, 2.0]):
        records[1]["predict_seconds"] = broken
        with pytest.raises(UserError, match="^fold 1: predict_seconds"):
            bench.predict_ratio(records)


def test_resume_refuses_a_fold_of_another_budget_or_best_checkpoint(tmp_path):
    """A recorded fold is reused only when it was predicted from the last weights (not the
    checkpoint chosen on its own validation cases) with this run's minutes, config and
    overrides."""
    import json

    from uumamba.errors import UserError

    bench = _bench()
    record = _record(4, {"a": {"RV": 0.8}}, {"a": {"RV": 0.7}})
    (tmp_path / "folds").mkdir()
    config = str(REPO / "configs" / "acdc_cpu.yaml")
    data = tmp_path / "ACDC" / "patient001"  # the run never reads it: the fold is recorded
    data.mkdir(parents=True)
    argv = ["--folds", "4", "--output", str(tmp_path), "--minutes", "0.3", "--config", config,
            "--data", str(data.parent)]
    (tmp_path / "folds" / "fold_4.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="checkpoint_best"):
        bench.main(argv)
    record.update(weights="last", minutes=0.5, config=config, overrides=[])
    (tmp_path / "folds" / "fold_4.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="fold 4 has minutes '0.5', this run '0.3'"):
        bench.main(argv)
