"""A short real training run on two ACDC patients: the loss falls, σ moves, every output of a
fold folder is written and the checkpoint is complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from uumamba.config import config_from_dict, load_config
from uumamba.data.plan import Plans
from uumamba.engine.callbacks import Callback
from uumamba.engine.checkpoint import CHECKPOINT_KEYS, LATEST, load_checkpoint
from uumamba.engine.train import run_fold
from uumamba.nn import build_network

# 2D tiny U-Mamba-Bot; always foreground-centred patches and lr 0.02 keep the short loss curve
# smooth enough to show the decrease (measured: mean of the first 8 losses 3.50, last 8 3.19).
SETTINGS = ["train.epochs=2", "train.iterations_per_epoch=15", "train.time_limit_minutes=null",
            "train.cache=memory", "plan.batch_size=4", "train.foreground_oversample=1.0",
            "optim.lr=0.02"]

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def two_patients(acdc_dir, tmp_path_factory):
    """A dataset folder holding symlinks to the first two ACDC patients (never copies)."""
    root = tmp_path_factory.mktemp("acdc2")
    for patient in sorted(acdc_dir.glob("patient*"))[:2]:
        (root / patient.name).symlink_to(patient.resolve(), target_is_directory=True)
    return root


class LossLog(Callback):
    def __init__(self) -> None:
        self.logs = []

    def on_iteration_end(self, ctx, log) -> None:
        self.logs.append(log)


def test_short_acdc_run_learns_and_writes_a_complete_fold(two_patients, tmp_path):
    cfg = load_config(TINY, SETTINGS)
    log = LossLog()
    result = run_fold(cfg, two_patients, tmp_path / "model", fold="all", device="cpu",
                      progress=False, callbacks=[log])
    assert result.finished and result.iteration == 30

    losses = np.array([entry.loss for entry in log.logs])
    assert np.isfinite(losses).all() and all(entry.finite for entry in log.logs)
    assert losses[-8:].mean() < losses[:8].mean() - 0.1, losses.round(3)
    sigmas = log.logs[-1].sigmas
    assert set(sigmas) == {"dice", "ce", "focal"}
    assert all(abs(v - 1.0) > 1e-3 for v in sigmas.values()), sigmas  # σ trained from 1

    model_dir = tmp_path / "model"
    fold_dir = model_dir / "fold_all"
    ckpt = load_checkpoint(fold_dir / LATEST)
    assert set(CHECKPOINT_KEYS) <= set(ckpt)
    assert ckpt["finished"] is True and ckpt["fold"] == "all"
    assert (ckpt["epoch"], ckpt["iteration"]) == (2, 30)
    assert ckpt["scheduler"]["last_iter"] == 30 and ckpt["scaler"] is None
    assert {"python", "numpy", "torch", "data"} <= set(ckpt["rng"])
    plans = Plans.model_validate(ckpt["plans"])
    saved_cfg = config_from_dict(ckpt["config"])
    assert saved_cfg.optim.lr == 0.02 and plans.labels == {0: "background", 1: "RV", 2: "MYO",
                                                           3: "LV"}
    net = build_network(saved_cfg.model, plans)
    net.load_state_dict(ckpt["model"])  # strict: every weight present with its shape
    sigma_keys = [k for k in ckpt["loss"] if "sigma" in k.lower()]
    assert sigma_keys, list(ckpt["loss"])
    base = ckpt["optimizer"]["base_optimizer"]["state"]
    assert base and all("momentum_buffer" in s for s in base.values())
    assert ckpt["best_metric"] is None  # fold "all": no validation

    assert Plans.load(model_dir / "plans.json") == plans
    assert json.loads((model_dir / "dataset.json").read_text())["labels"]["3"] == "LV"
    assert (model_dir / "config.yaml").is_file() and (model_dir / "splits.json").is_file()
    records = [json.loads(line) for line in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert records[1]["iteration"] == 30 and records[1]["nonfinite_steps"] == 0
    assert (fold_dir / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((fold_dir / "tensorboard").glob("events.out.tfevents.*"))
