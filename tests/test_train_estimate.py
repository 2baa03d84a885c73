"""The time estimate at the start of training: the pure computation (rate probe, schedule,
warning, cheaper options) and, on a tiny model, that it is printed and close to the rate the
run then has."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from uumamba.config import load_config
from uumamba.data.synthetic import write_synthetic_dataset
from uumamba.engine.callbacks import Callback
from uumamba.engine.estimate import (
    ANNEALED_ENOUGH,
    RateProbe,
    cheaper_options,
    estimate_schedule,
    format_duration,
    schedule_warning,
)
from uumamba.engine.train import run_fold

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rate_probe_skips_warmup_and_stops() -> None:
    probe = RateProbe(warmup=2, iterations=3, max_seconds=100.0)
    assert [probe.add(s) for s in (9.0, 8.0, 1.0, 2.0)] == [None] * 4
    assert probe.partial() == pytest.approx(1.5) and probe.measured == 2
    assert probe.add(3.0) == pytest.approx(2.0)
    assert probe.add(1.0) is None and probe.measured == 3  # reported once
    slow = RateProbe(warmup=1, iterations=5, max_seconds=20.0)
    assert slow.add(50.0) is None and slow.add(12.0) is None
    assert slow.add(12.0) == pytest.approx(12.0)  # 24 s >= 20 s: enough
    with pytest.raises(ValueError, match="iterations"):
        RateProbe(iterations=0)


def test_schedule_the_issue_case() -> None:
    # the issue: ~58 s per iteration, 100 x 250 iterations, 15-minute limit
    est = estimate_schedule(58.0, 5, 25_000, 7, time_limit_minutes=15, elapsed_seconds=60.0)
    assert est.planned_seconds == pytest.approx(58.0 * 25_000)
    assert est.iterations_in_limit == 7 + int(840 // 58) and est.too_long
    line = est.summary()
    assert "58.00 s per iteration" in line and "17 days" in line and "allows about 21" in line
    options = cheaper_options(est, device_type="cpu", plan_target="gpu", spatial_dims=3,
                              optim_name="sam", patch_size=[112, 80, 40],
                              iterations_per_epoch=250)
    text = schedule_warning(est, options)
    assert text.startswith("warning: the planned schedule needs 17 days")
    # annealed over the time limit (train.schedule_by_time): a warning only while the limit
    # allows fewer than ANNEALED_ENOUGH iterations, and without "fewer epochs"
    by_time = cheaper_options(est, device_type="cpu", plan_target="gpu", spatial_dims=3,
                              optim_name="sam", patch_size=[112, 80, 40],
                              iterations_per_epoch=250, by_time=True)
    assert not any("train.epochs" in o for o in by_time) and len(by_time) == len(options) - 1
    assert schedule_warning(est, by_time, by_time=True).startswith("warning: the planned")
    enough = estimate_schedule(2.0, 5, 25_000, 7, time_limit_minutes=15, elapsed_seconds=60.0)
    assert enough.too_long and enough.iterations_in_limit >= ANNEALED_ENOUGH
    assert schedule_warning(enough, by_time, by_time=True) is None
    assert schedule_warning(enough, options) is not None
    for option in ("plan.target=cpu", "optim.name=adamw", "model.spatial_dims=2",
                   "plan.patch_size=[56,80,40]", "train.epochs=1"):
        assert option in text, option


def test_schedule_that_fits_has_no_warning() -> None:
    est = estimate_schedule(0.5, 5, 1000, 0, time_limit_minutes=60)
    assert not est.too_long and est.iterations_in_limit == 7200
    assert schedule_warning(est, ["x"]) is None
    day = estimate_schedule(2.0, 5, 50_000, 0)  # no limit, but more than a day
    assert day.too_long and "more than a day" in schedule_warning(day, ["y"])
    assert [format_duration(s) for s in (42, 300, 7200, 10 * 86400)] == \
        ["42 s", "5.0 min", "2.0 h", "10 days"]
    with pytest.raises(ValueError):
        estimate_schedule(0.0, 1, 10, 0)


class _IterationClock(Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_iteration_end(self, ctx, log) -> None:
        self.ends.append(time.perf_counter())


def test_estimate_printed_and_close_to_the_run(tmp_path: Path, caplog) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_cases=2, seed=0)
    total = 16
    cfg = load_config(TINY_YAML, ["train.epochs=1", f"train.iterations_per_epoch={total}",
                                  "train.val_every=1", "train.time_limit_minutes=10",
                                  "plan.patch_size=[64, 64]", "model.features=[8, 16, 32, 64]",
                                  "inference.sw_batch_size=16"])
    clock = _IterationClock()
    with caplog.at_level(logging.INFO, logger="uumamba"):
        result = run_fold(cfg, data, tmp_path / "model", fold="0", device="cpu",
                          callbacks=[clock], progress=False)
    assert result.finished and len(clock.ends) == total
    lines = [r.getMessage() for r in caplog.records if "time estimate:" in r.getMessage()]
    assert len(lines) == 1 and "s per iteration" in lines[0] and "planned iterations" in lines[0]
    assert "time limit of 10.0 min allows" in lines[0]
    record = json.loads((result.fold_dir / "time_estimate.json").read_text())
    assert record["measured_iterations"] == 5 and record["total_iterations"] == total
    assert record["plan_target"] == "cpu" and record["warning"] is None
    # the measured total of the run (after the first iteration: set-up excluded)
    measured = (clock.ends[-1] - clock.ends[0]) / (total - 1) * total
    assert 0.5 < record["planned_seconds"] / measured < 2.0, (record, measured)
