"""Training survives the ways clusters stop it (issue 17), shown with real subprocesses of the
real CLI on a tiny synthetic dataset:

- SIGTERM to the whole process group (DataLoader workers included) mid-epoch and during a
  validation: checkpoint saved, exit status 143, and the resumed run ends with the same
  weights, optimizer state and learning rates as an uninterrupted run, bit for bit on CPU;
- SIGKILL in the middle of a checkpoint save: the resume removes the dead process's temporary
  file and continues from the last checkpoint; a truncated latest checkpoint falls back to
  ``checkpoint_previous.pt``; both still end bit-identical to the uninterrupted run;
- the time budget is total training time over resumes (a fake clock makes it exact), with
  the learning rate of ``train.schedule_by_time`` continuing where it stopped.

The faults are injected at a chosen iteration by a small driver (:data:`DRIVER`) that adds a
callback to the real ``uumamba train``, so where the run stops is deterministic.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_resume import InterruptAt, _assert_same_tensors, _comparable_history

from uumamba.config import load_config
from uumamba.data.synthetic import write_synthetic_dataset
from uumamba.engine import loop as loop_module
from uumamba.engine.callbacks import Callback
from uumamba.engine.checkpoint import LATEST, PREVIOUS, load_checkpoint
from uumamba.engine.train import run_fold

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"
# 2 epochs of 3 iterations, validation after each: 6 iterations in all.
SETTINGS = ["train.epochs=2", "train.iterations_per_epoch=3", "train.val_every=1",
            "train.time_limit_minutes=null", "inference.sw_batch_size=16"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DRIVER = '''
import os, signal, sys
import torch
from uumamba.engine import loop
from uumamba.engine.callbacks import Callback

mode, at = sys.argv[1], int(sys.argv[2])
done = [0]

def term_group():
    """SIGTERM to this process group from another process, as SLURM, systemd or a kubelet
    send it (DataLoader workers treat a SIGTERM from their parent differently)."""
    import subprocess
    subprocess.run([sys.executable, "-c", "import os, signal, sys; "
                    "os.killpg(int(sys.argv[1]), signal.SIGTERM)", str(os.getpgrp())],
                   start_new_session=True, check=True)

class Fault(Callback):
    def on_iteration_end(self, ctx, log):
        done[0] = log.iteration
        if mode == "term" and log.iteration == at:
            term_group()

real_callbacks = loop.default_callbacks
loop.default_callbacks = lambda *a, **k: [*real_callbacks(*a, **k), Fault()]

if mode == "term-validation":  # the group gets SIGTERM as the validation after `at` starts
    real_validate = loop.validate_cases
    def validate(*a, **k):
        if done[0] >= at:
            term_group()
        return real_validate(*a, **k)
    loop.validate_cases = validate

if mode == "kill-in-save":  # SIGKILL half-way through the first save after iteration `at`
    real_save = torch.save
    def save(obj, f, *a, **k):
        if done[0] >= at:
            with open(f, "wb") as fh:
                fh.write(b"PK half a checkpoint")
                fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = save

from uumamba.commands import main
sys.argv = ["uumamba", *sys.argv[3:]]
main()
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_cases=4, seed=2)


def tiny_config(*extra: str):
    return load_config(TINY_YAML, [*SETTINGS, *extra])


@pytest.fixture(scope="module")
def straight(one_torch_thread, data_dir, tmp_path_factory):
    """The uninterrupted run's final checkpoint and its learning rate per iteration."""
    lrs = LearningRates()
    out = tmp_path_factory.mktemp("straight")
    result = run_fold(tiny_config(), data_dir, out, fold="0", device="cpu", progress=False,
                      callbacks=[lrs])
    assert result.finished and result.iteration == 6
    return load_checkpoint(out / "fold_0" / LATEST), lrs.values


class LearningRates(Callback):
    """Iteration -> learning rate after its schedule step."""

    def __init__(self, values: dict[int, float] | None = None) -> None:
        self.values = {} if values is None else values

    def on_iteration_end(self, ctx, log) -> None:
        self.values[log.iteration] = log.lr


def run_cli(mode: str, at: int, data_dir: Path, out: Path, tmp_path: Path, *extra: str,
            resume: bool = False) -> tuple[int, str]:
    """``uumamba train`` (fold 0, two DataLoader workers) in its own process group, with the
    fault ``mode`` at iteration ``at``; returns (exit status, output)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    sets = [*SETTINGS, "train.num_workers=2", *extra]
    cmd = [sys.executable, str(driver), mode, str(at), "train", "--data", str(data_dir),
           "--output", str(out), "--config", str(TINY_YAML), "--fold", "0", "--device", "cpu",
           *[x for s in sets for x in ("--set", s)], *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=240, start_new_session=True)  # its own process group
    return proc.returncode, proc.stdout + proc.stderr


def finish_and_compare(out: Path, data_dir: Path, straight, lrs: dict[int, float]) -> dict:
    """Resume in this process to the end; the run must equal the uninterrupted one."""
    result = run_fold(tiny_config(), data_dir, out, fold="0", resume=True, device="cpu",
                      progress=False, callbacks=[LearningRates(lrs)])
    assert result.finished and result.reason == "completed" and result.iteration == 6
    expected, expected_lrs = straight
    final = load_checkpoint(out / "fold_0" / LATEST)
    for key in ("model", "optimizer", "loss", "scheduler"):
        _assert_same_tensors(expected[key], final[key], key)
    # Python's global `random` is left out: the CLI's rich progress bar draws from it (the
    # training never does: every patch seeds and restores the global generators)
    for key in ("numpy", "torch", "data"):
        _assert_same_tensors(expected["rng"][key], final["rng"][key], f"rng.{key}")
    assert _comparable_history(final["metric_history"]) == _comparable_history(
        expected["metric_history"])
    assert final["best_metric"] == expected["best_metric"]
    assert lrs and lrs == {i: expected_lrs[i] for i in lrs}  # where it stopped, exactly
    return final


def test_sigterm_to_the_group_mid_epoch_and_mid_validation(data_dir, tmp_path, straight):
    out = tmp_path / "model"
    fold_dir = out / "fold_0"
    code, output = run_cli("term", 2, data_dir, out, tmp_path)
    assert code == 143, output
    assert "stopped by SIGTERM at iteration 2" in output and "Traceback" not in output
    ckpt = load_checkpoint(fold_dir / LATEST)
    assert (ckpt["iteration"], ckpt["finished"], ckpt["pending_end"]) == (2, False, None)
    assert len(ckpt["epoch_state"]["losses"]) == 2

    t0 = time.monotonic()
    code, output = run_cli("term-validation", 3, data_dir, out, tmp_path, resume=True)
    assert code == 143, output
    assert "validation at iteration 3 abandoned" in output
    ckpt = load_checkpoint(fold_dir / LATEST)  # saved before the validation began
    assert ckpt["iteration"] == 3 and ckpt["metric_history"] == []
    assert ckpt["pending_end"] == {"partial": False, "final": False}
    assert load_checkpoint(fold_dir / PREVIOUS)["iteration"] == 2
    assert time.monotonic() - t0 < 120
    assert not [p.name for p in fold_dir.iterdir() if ".tmp-" in p.name]

    lrs = {}
    final = finish_and_compare(out, data_dir, straight, lrs)
    assert sorted(lrs) == [4, 5, 6]
    assert [r["epoch"] for r in final["metric_history"]] == [1, 2]


def test_sigkill_in_a_save_and_a_truncated_latest_resume_from_what_was_saved(
        data_dir, tmp_path, straight, capsys):
    out = tmp_path / "model"
    fold_dir = out / "fold_0"
    # killed while writing the checkpoint before epoch 2's validation (after iteration 6)
    code, output = run_cli("kill-in-save", 4, data_dir, out, tmp_path)
    assert code == -signal.SIGKILL, output
    stale = [p.name for p in fold_dir.iterdir() if ".tmp-" in p.name]
    assert len(stale) == 1 and re.fullmatch(r"\.checkpoint_latest\.tmp-\d+\.pt", stale[0])
    latest = load_checkpoint(fold_dir / LATEST)
    assert (latest["iteration"], latest["pending_end"]) == (3, None)  # epoch 1, validated
    assert load_checkpoint(fold_dir / PREVIOUS)["iteration"] == 3  # saved before validating

    # the latest is cut short as by a power loss: the previous one (pending validation) is used
    data = (fold_dir / LATEST).read_bytes()
    (fold_dir / LATEST).write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    finish_and_compare(out, data_dir, straight, {})
    text = capsys.readouterr().out.replace("\n", "")
    assert f"removed {stale[0]}" in text
    assert f"{fold_dir / LATEST}: cannot read checkpoint" in text
    assert f"resuming from {fold_dir / PREVIOUS} (iteration 3) instead" in text
    assert not [p.name for p in fold_dir.iterdir() if ".tmp-" in p.name]
    assert load_checkpoint(fold_dir / PREVIOUS)["iteration"] == 6  # rotation works again


class FakeClock(Callback):
    """A monotonic clock that moves ``step`` seconds per training iteration, nothing else: the
    time budget becomes a function of the iteration count."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1000.0, step

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def perf_counter() -> float:
        return time.perf_counter()

    def on_iteration_end(self, ctx, log) -> None:
        self.now += self.step


def test_time_budget_and_time_schedule_span_two_resumes(data_dir, tmp_path, monkeypatch,
                                                       capsys):
    """30 s budget, 6 s per iteration: 5 of 8 planned iterations, interrupted or not."""
    settings = ("train.epochs=2", "train.iterations_per_epoch=4", "train.schedule_by_time=true",
                "train.time_limit_minutes=0.5")
    cfg = tiny_config(*settings)
    clock = FakeClock(6.0)
    monkeypatch.setattr(loop_module, "time", clock)
    straight_lrs = LearningRates()
    result = run_fold(cfg, data_dir, tmp_path / "a", fold="all", device="cpu",
                      progress=False, callbacks=[clock, straight_lrs])
    assert (result.reason, result.iteration) == ("time_limit", 5)
    text = capsys.readouterr().out.replace("\n", " ")
    assert "time limit of 0.5 min reached after 5 of 8 planned iterations (62 %)" in text
    expected = load_checkpoint(tmp_path / "a" / "fold_all" / LATEST)
    assert expected["elapsed"] == 30.0 and expected["finished"] is True

    out, lrs = tmp_path / "b", LearningRates()
    first = run_fold(cfg, data_dir, out, fold="all", device="cpu", progress=False,
                     callbacks=[clock, lrs, InterruptAt(2)])
    assert (first.reason, first.iteration) == ("signal", 2)
    assert load_checkpoint(out / "fold_all" / LATEST)["elapsed"] == 12.0
    capsys.readouterr()
    second = run_fold(cfg, data_dir, out, fold="all", resume=True, device="cpu",
                      progress=False, callbacks=[clock, lrs, InterruptAt(4)])
    text = capsys.readouterr().out.replace("\n", " ")
    assert "time budget: 0.2 min of 0.5 min spent, 0.3 min left" in text
    assert (second.reason, second.iteration) == ("signal", 4)
    third = run_fold(cfg, data_dir, out, fold="all", resume=True, device="cpu",
                     progress=False, callbacks=[clock, lrs])
    assert (third.reason, third.iteration) == ("time_limit", 5)
    final = load_checkpoint(out / "fold_all" / LATEST)
    assert final["elapsed"] == 30.0
    for key in ("model", "optimizer", "loss", "scheduler"):
        _assert_same_tensors(expected[key], final[key], key)
    assert lrs.values == straight_lrs.values
    assert final["scheduler"]["progress_floor"] == pytest.approx(24.0 / 30.0)


_FAILING_TRANSFORM = r"""
import os, sys
import uumamba.data.transforms as T
original = T.NormalizeFromPlan.__call__
calls = {"n": 0}
def failing(self, data):
    calls["n"] += 1
    if calls["n"] > 2:
        raise RuntimeError("crafted failure in a data transform")
    return original(self, data)
T.NormalizeFromPlan.__call__ = failing
from uumamba.cli import main
sys.argv = ["uumamba", "train", "--data", sys.argv[1], "--output", sys.argv[2], "--fold", "all",
            "--config", sys.argv[3], "--set", "train.num_workers=1", "--set", "train.cache=none"]
main()
"""


def test_a_failing_data_worker_ends_the_run_instead_of_hanging(tmp_path):
    """A transform raising inside a DataLoader worker: the error reaches the main process and
    it exits (non-zero) instead of waiting forever at exit for a worker that ignores SIGTERM."""
    data = write_synthetic_dataset(tmp_path / "data", n_cases=4, seed=3)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", _FAILING_TRANSFORM, str(data), str(tmp_path / "run"),
                        str(config)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode not in (0, 124), r.stderr[-2000:]
    assert "crafted failure in a data transform" in r.stderr
    assert time.monotonic() - start < 150
