"""benchmarks/bench_throughput.py: two trainers taking turns, on synthetic data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from uumamba.data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_throughput", REPO / "benchmarks" / "bench_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_trainers_take_turns_and_the_ratio_comes_from_their_turns(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", n_cases=4, shape=(40, 40, 6), seed=3)
    out = tmp_path / "out"
    result = _bench().main([
        "--baseline-tree", str(REPO), "--data", str(data), "--output", str(out),
        "--config", str(REPO / "configs" / "tiny.yaml"), "--rounds", "2", "--turn", "2",
        "--warmup", "1", "--threads", "1", "--set", "optim.name=adamw"])
    saved = json.loads((out / "throughput.json").read_text())
    for label in ("baseline", "current"):
        # warm-up + 2 rounds x 2 turns, each timed
        assert len(saved["turn_seconds"][label]) == 1 + 2 * 2
        assert all(s > 0 for s in saved["turn_seconds"][label])
        kept = saved["turn_seconds"][label][1:]
        assert result["iterations_per_minute"][label] == pytest.approx(60 * 2 * 4 / sum(kept))
    b, c = saved["turn_seconds"]["baseline"][1:], saved["turn_seconds"]["current"][1:]
    # round 1 ran baseline, current, current, baseline; round 2 the mirror image
    assert saved["ratios"][0] == pytest.approx((b[0] + b[1]) / (c[0] + c[1]))
    assert saved["ratios"][1] == pytest.approx((b[2] + b[3]) / (c[2] + c[3]))
    assert saved["ratio_ci95"] is None  # 2 rounds: too few for an interval


def test_bad_inputs_are_one_line_errors_before_any_trainer(tmp_path, capsys):
    from uumamba.commands.script import run_script

    bench = _bench()
    data = write_synthetic_dataset(tmp_path / "data", n_cases=2, shape=(40, 40, 6), seed=3)
    tiny = str(REPO / "configs" / "tiny.yaml")
    cases = [
        (["--baseline-tree", str(REPO), "--data", str(tmp_path / "nope")], "not a folder"),
        (["--baseline-tree", str(tmp_path), "--data", str(data)], "no uumamba package"),
        (["--baseline-tree", str(REPO), "--data", str(data), "--set", "train.bogus=1"],
         "bogus"),
        (["--baseline", "no-such-revision-xyz", "--data", str(data)], "no such commit"),
    ]
    for extra, expected in cases:
        out = tmp_path / "out"
        assert run_script(bench.main, [*extra, "--config", tiny, "--output", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err


def test_refuses_both_or_neither_baseline(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit, match="one of"):
        bench.main(["--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="one of"):
        bench.main(["--baseline", "HEAD", "--baseline-tree", str(REPO), "--output",
                    str(tmp_path)])
