"""Exact resume: N iterations straight == the same run interrupted (mid-epoch and at an
epoch's end) and resumed, bit for bit on CPU; finished runs; the seeded patch stream."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from uumamba.cli import app
from uumamba.config import load_config
from uumamba.data.synthetic import write_synthetic_dataset
from uumamba.engine.callbacks import Callback
from uumamba.engine.checkpoint import BEST, LATEST, load_checkpoint
from uumamba.engine.train import PatchBatchSampler, SeededPatchDataset, run_fold
from uumamba.errors import ConfigError, UserError

SETTINGS = ["train.epochs=2", "train.iterations_per_epoch=2", "train.val_every=1",
            "train.time_limit_minutes=null", "inference.sw_batch_size=16"]

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_cases=4, seed=0)


def tiny_config(*extra: str):
    return load_config(TINY_YAML, [*SETTINGS, *extra])


class InterruptAt(Callback):
    """Sends SIGINT to this process after iteration ``n`` (as Ctrl-C would)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_iteration_end(self, ctx, log) -> None:
        if log.iteration == self.n:
            os.kill(os.getpid(), signal.SIGINT)


def _assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _comparable_history(history):
    return [{k: v for k, v in r.items() if k not in ("time", "elapsed")} for r in history]


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, data_dir):
    cfg = tiny_config()
    straight = run_fold(cfg, data_dir, tmp_path / "straight", fold="0", device="cpu",
                        progress=False)
    assert straight.finished and straight.iteration == 4

    out = tmp_path / "interrupted"
    first = run_fold(cfg, data_dir, out, fold="0", device="cpu", progress=False,
                     callbacks=[InterruptAt(1)])  # mid-epoch
    assert (first.reason, first.signal, first.iteration) == ("signal", signal.SIGINT, 1)
    mid = load_checkpoint(out / "fold_0" / LATEST)
    assert mid["finished"] is False and mid["iteration"] == 1 and mid["metric_history"] == []

    second = run_fold(cfg, data_dir, out, fold="0", resume=True, device="cpu", progress=False,
                      callbacks=[InterruptAt(2)])  # right at the end of epoch 1
    assert (second.reason, second.iteration) == ("signal", 2)
    assert load_checkpoint(out / "fold_0" / LATEST)["pending_epoch_end"] is True

    # a changed trajectory setting is refused, naming the key and both values
    with pytest.raises(ConfigError, match=r"optim\.lr \(0\.01 -> 0\.5\)") as err:
        run_fold(tiny_config("optim.lr=0.5", "train.epochs=3"), data_dir, out, fold="0",
                 resume=True, device="cpu", progress=False)
    assert "train.epochs (2 -> 3)" in str(err.value)
    # settings that may change on resume are taken (trajectory unchanged)
    third = run_fold(tiny_config("train.checkpoint_every_minutes=7", "train.val_every=1"),
                     data_dir, out, fold="0", resume=True, device="cpu", progress=False)
    assert third.finished and third.reason == "completed" and third.iteration == 4
    assert load_checkpoint(out / "fold_0" / LATEST)["config"]["train"][
        "checkpoint_every_minutes"] == 7

    a = load_checkpoint(tmp_path / "straight" / "fold_0" / LATEST)
    b = load_checkpoint(out / "fold_0" / LATEST)
    for key in ("model", "optimizer", "loss", "scheduler", "rng"):
        _assert_same_tensors(a[key], b[key], key)
    # SAM's checkpoint carries the base SGD's momentum buffers (compared equal above)
    assert all("momentum_buffer" in s for s in b["optimizer"]["base_optimizer"]["state"].values())
    assert _comparable_history(a["metric_history"]) == _comparable_history(b["metric_history"])
    assert [r["epoch"] for r in b["metric_history"]] == [1, 2]
    assert b["metric_history"][0]["val_mean_dice"] is not None  # epoch 1 validated on resume
    assert a["best_metric"] == b["best_metric"] and b["finished"] is True
    _assert_same_tensors(load_checkpoint(tmp_path / "straight" / "fold_0" / BEST)["model"],
                         load_checkpoint(out / "fold_0" / BEST)["model"], "best model")
    lines = (out / "fold_0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # no duplicated epochs after two resumes

    # resuming a finished run reports it and trains nothing; changed settings are refused
    again = run_fold(tiny_config("train.checkpoint_every_minutes=7"), data_dir, out,
                     fold="0", resume=True, device="cpu", progress=False)
    assert again.reason == "already_finished" and again.iteration == 4
    with pytest.raises(ConfigError, match=r"already finished.*train\.time_limit_minutes"):
        run_fold(tiny_config("train.checkpoint_every_minutes=7", "train.time_limit_minutes=5"),
                 data_dir, out, fold="0", resume=True, device="cpu", progress=False)
    _assert_same_tensors(load_checkpoint(out / "fold_0" / LATEST)["model"], b["model"], "model")

    # the CLI says so and exits 0; without --resume it refuses to overwrite
    runner = CliRunner()
    base = ["train", "--data", str(data_dir), "--output", str(out), "--config",
            str(TINY_YAML), "--fold", "0", "--device", "cpu"]
    sets = [x for s in SETTINGS for x in ("--set", s)]
    res = runner.invoke(app, [*base, *sets, "--set", "train.checkpoint_every_minutes=7",
                              "--resume"])
    assert res.exit_code == 0, res.output
    assert "already finished" in res.output
    # without --config, --resume reads the run's config.yaml (the first session's settings)
    res = runner.invoke(app, [*base[:-6], *base[-4:], "--resume"])
    assert res.exit_code == 0 and "already finished" in res.output, res.output
    with pytest.raises(UserError, match="--resume"):
        run_fold(cfg, data_dir, out, fold="0", device="cpu", progress=False)


def test_dataloader_workers_do_not_change_the_trajectory(tmp_path, data_dir):
    weights = []
    for workers in (0, 2):
        cfg = tiny_config("train.epochs=1", "train.iterations_per_epoch=3",
                          f"train.num_workers={workers}", "train.cache=memory")
        run_fold(cfg, data_dir, tmp_path / str(workers), fold="all", device="cpu",
                 progress=False)
        weights.append(load_checkpoint(tmp_path / str(workers) / "fold_all" / LATEST)["model"])
    _assert_same_tensors(weights[0], weights[1], "model")


def test_patch_stream_is_a_pure_function_of_seed_rank_iteration():
    s = PatchBatchSampler(n_cases=5, batch_size=3, seed=7, rank=0, start=0, stop=6)
    full = list(s)
    tail = list(PatchBatchSampler(5, 3, seed=7, rank=0, start=4, stop=6))
    assert tail == full[4:]
    other_rank = list(PatchBatchSampler(5, 3, seed=7, rank=1, start=0, stop=6))
    assert other_rank != full
    assert all(0 <= c < 5 for batch in full for c, _ in batch) and all(len(b) == 3 for b in full)


def test_seeded_dataset_repeats_augmentation_and_restores_global_rng():
    from monai.transforms import Compose, RandGaussianNoised

    class Items(torch.utils.data.Dataset):
        transform = Compose([RandGaussianNoised(["image"], prob=1.0, std=1.0)])

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.transform({"image": torch.zeros(1, 4, 4) + i})

    ds = SeededPatchDataset(Items())
    assert ds.reproducible
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    a = ds[(1, 123)]["image"]
    ds[(0, 5)]
    b = ds[(1, 123)]["image"]
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert not torch.equal(torch.as_tensor(ds[(1, 124)]["image"]), torch.as_tensor(a))
    assert torch.equal(torch.rand(1), expected_next)  # global torch RNG untouched


class _NicenessAndSignals(torch.utils.data.Dataset):
    """Each item: the worker's niceness and its SIGTERM disposition."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index):
        return {"nice": torch.tensor(os.nice(0)),
                "sigterm_ignored": torch.tensor(signal.getsignal(signal.SIGTERM)
                                                == signal.SIG_IGN)}


@pytest.mark.parametrize("nice", [0, 7])
def test_loader_workers_run_at_the_configured_niceness_and_ignore_sigterm(nice):
    from uumamba.engine.sampling import make_patch_loader

    base = os.nice(0)
    loader = make_patch_loader(_NicenessAndSignals(), 2, 0, 0, 0, 2, num_workers=1,
                               worker_nice=nice)
    batch = next(iter(loader))
    assert batch["nice"].tolist() == [min(base + nice, 19)] * 2
    assert batch["sigterm_ignored"].all()
    assert os.nice(0) == base  # the trainer keeps its own priority


def test_loader_nice_is_a_bounded_resumable_setting():
    from uumamba.engine.resume import RESUMABLE_KEYS

    assert load_config(None, ["train.loader_nice=19"]).train.loader_nice == 19
    assert load_config(None, []).train.loader_nice == 0
    for bad in ("-1", "20", "true", "1.5"):
        with pytest.raises(ConfigError, match="loader_nice"):
            load_config(None, [f"train.loader_nice={bad}"])
    assert "train.loader_nice" in RESUMABLE_KEYS
