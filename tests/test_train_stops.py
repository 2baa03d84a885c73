"""Ways a run ends early: SIGTERM (subprocess, real CLI), the time limit, and too many
non-finite losses in a row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from uumamba.config import load_config
from uumamba.data.synthetic import write_synthetic_dataset
from uumamba.engine import components as train_module
from uumamba.engine.callbacks import Callback
from uumamba.engine.checkpoint import LATEST, load_checkpoint
from uumamba.engine.train import run_fold
from uumamba.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BASE = ["train.time_limit_minutes=null", "inference.sw_batch_size=16"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_cases=4, seed=1)


def test_sigterm_saves_a_loadable_checkpoint_and_exits_143(data_dir, tmp_path):
    """An asynchronous SIGTERM to the process group at an arbitrary moment (as a cluster
    sends it); tests/test_train_faults.py stops at chosen iterations and resumes."""
    out = tmp_path / "model"
    sets = [*BASE, "train.epochs=1", "train.iterations_per_epoch=2000", "train.num_workers=2"]
    cmd = [sys.executable, "-m", "uumamba.cli", "train", "--data", str(data_dir), "--output",
           str(out), "--config", str(REPO / "configs/tiny.yaml"), "--fold", "all",
           "--device", "cpu", *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path, start_new_session=True)
    try:
        events = out / "fold_all" / "tensorboard"
        deadline = time.monotonic() + 240
        while not events.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # the TensorBoard folder appears when the loop starts
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(2.0)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, DataLoader workers included
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output
    assert "stopped by SIGTERM" in output
    ckpt = load_checkpoint(out / "fold_all" / LATEST)
    assert ckpt["finished"] is False and 1 <= ckpt["iteration"] < 2000
    assert ckpt["metric_history"] == [] and len(ckpt["epoch_state"]["losses"]) == ckpt["iteration"]
    assert not [p.name for p in (out / "fold_all").iterdir() if ".tmp-" in p.name]


def test_time_limit_validates_saves_and_marks_finished(data_dir, tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", [*BASE, "train.epochs=50",
                                            "train.iterations_per_epoch=4",
                                            "train.time_limit_minutes=0.0001"])
    result = run_fold(cfg, data_dir, tmp_path, fold="1", device="cpu", progress=False)
    assert (result.finished, result.reason, result.iteration) == (True, "time_limit", 1)
    fold_dir = tmp_path / "fold_1"
    ckpt = load_checkpoint(fold_dir / LATEST)
    assert ckpt["finished"] is True and ckpt["iteration"] == 1
    (record,) = [json.loads(x) for x in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["partial"] is True and record["iteration"] == 1
    assert set(record["val_dice"]) == {"RV", "MYO", "LV"}
    assert 0.0 <= record["val_mean_dice"] <= 1.0
    assert ckpt["best_metric"] == pytest.approx(record["val_mean_dice"])
    assert (fold_dir / "checkpoint_best.pt").is_file()
    for png in ("progress.png", "validation_overlay.png"):
        assert (fold_dir / png).read_bytes()[:4] == b"\x89PNG"
    # the final validation decided the postprocessing for the predictor
    spec = json.loads((fold_dir / "postprocessing.json").read_text())
    assert spec["n_cases"] == len(ckpt["splits"][1]["val"])
    assert set(spec["dice_before"]) == {"RV", "MYO", "LV"}
    assert set(spec["largest_component_labels"]) <= {1, 2, 3}
    again = run_fold(cfg, data_dir, tmp_path, fold="1", resume=True, device="cpu",
                     progress=False)
    assert again.reason == "already_finished"


class NaNLoss(torch.nn.Module):
    """The real loss (σ and all) multiplied by NaN."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, logits, target):
        return self.inner(logits, target) * float("nan")

    def sigmas(self):
        return self.inner.sigmas()


class InitialWeights(Callback):
    def on_train_start(self, ctx) -> None:
        self.state = {k: v.clone() for k, v in ctx.model.state_dict().items()}


def test_consecutive_nonfinite_losses_stop_with_a_clear_error(data_dir, tmp_path, monkeypatch):
    real_build_loss = train_module.build_loss
    monkeypatch.setattr(train_module, "build_loss",
                        lambda *a, **k: NaNLoss(real_build_loss(*a, **k)))
    cfg = load_config(REPO / "configs/tiny.yaml", [*BASE, "train.epochs=1",
                                            "train.iterations_per_epoch=10",
                                            "train.max_nonfinite_steps=2"])
    initial = InitialWeights()
    with pytest.raises(UserError, match="3 consecutive non-finite losses") as err:
        run_fold(cfg, data_dir, tmp_path, fold="all", device="cpu", progress=False,
                 callbacks=[initial])
    assert "max_nonfinite_steps = 2" in str(err.value)
    ckpt = load_checkpoint(tmp_path / "fold_all" / LATEST)
    assert ckpt["iteration"] == 3 and ckpt["finished"] is False
    assert ckpt["epoch_state"]["nonfinite"] == 3
    for name, value in ckpt["model"].items():  # every step skipped: weights untouched
        assert torch.equal(value, initial.state[name]), name


def test_cli_refuses_a_model_folder_inside_the_dataset(data_dir, tmp_path):
    """Run through the real CLI: one-line error, exit 1, nothing written into the data."""
    before = sorted(p.name for p in data_dir.rglob("*"))
    for output in (data_dir, data_dir / "model"):
        proc = subprocess.run(
            [sys.executable, "-m", "uumamba.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
             "--data", str(data_dir), "--output", str(output)],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert "inside the dataset folder" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in data_dir.rglob("*")) == before


def test_bad_plan_leaves_no_empty_model_folder(data_dir, tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", BASE + ["plan.patch_size=[7]"])
    out = tmp_path / "model"
    with pytest.raises(Exception, match="patch_size"):
        run_fold(cfg, data_dir, out, fold=0)
    assert not out.exists()
