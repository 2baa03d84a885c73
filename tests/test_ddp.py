"""Two-process DistributedDataParallel training on CPU (gloo), as under
``torchrun --nproc_per_node 2``: both ranks end with identical weights and σ, validation
cases are shared out and gathered, rank 0 writes the checkpoint."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from uumamba.engine.callbacks import Callback

WORLD = 2
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.yaml")


class DumpState(Callback):
    """Each rank saves its final weights, σ and validated case ids to ``out/rank{R}.pt``."""

    def __init__(self, out: str, rank: int) -> None:
        self.path = os.path.join(out, f"rank{rank}.pt")
        self.val_cases: list[str] = []

    def on_validation_end(self, ctx, result) -> None:
        self.val_cases = sorted(result.per_case)

    def on_train_end(self, ctx, finished, reason) -> None:
        torch.save({"model": ctx.model.state_dict(), "loss": ctx.loss.state_dict(),
                    "val_cases": self.val_cases, "finished": finished}, self.path)


def _worker(rank: int, port: int, data_dir: str, out: str) -> None:
    """One rank: the environment torchrun would set, then the ordinary training entry point."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      NUMBA_NUM_THREADS="1")  # one thread per rank on a 2-core machine
    torch.set_num_threads(1)
    from uumamba.config import load_config
    from uumamba.engine.train import run_fold

    cfg = load_config(TINY, [
        "train.epochs=1", "train.iterations_per_epoch=2", "train.time_limit_minutes=null",
        "inference.sw_batch_size=16"])
    run_fold(cfg, data_dir, os.path.join(out, "model"), fold="0", device="cpu",
             progress=False, callbacks=[DumpState(out, rank)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_gloo_ranks_train_in_lockstep(tmp_path):
    from uumamba.data.synthetic import write_synthetic_dataset
    from uumamba.engine.checkpoint import LATEST, load_checkpoint

    data_dir = write_synthetic_dataset(tmp_path / "data", n_cases=4, seed=2)
    mp.spawn(_worker, args=(_free_port(), str(data_dir), str(tmp_path)), nprocs=WORLD,
             join=True)

    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["finished"] and r1["finished"]
    for key in ("model", "loss"):
        assert r0[key].keys() == r1[key].keys()
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"{key}.{name}"
    assert not torch.equal(r0["loss"]["loss.log_sigma_sq"],
                           torch.zeros_like(r0["loss"]["loss.log_sigma_sq"]))  # σ trained

    fold_dir = tmp_path / "model" / "fold_0"
    ckpt = load_checkpoint(fold_dir / LATEST)
    assert ckpt["world_size"] == WORLD and ckpt["iteration"] == 2 and ckpt["finished"]
    for name, value in ckpt["model"].items():
        assert torch.equal(value, r0["model"][name]), name

    # each rank validated one of the two held-out cases; both see the gathered result
    val_ids = json.loads((tmp_path / "model" / "splits.json").read_text())[0]["val"]
    assert r0["val_cases"] == r1["val_cases"] == sorted(val_ids) and len(val_ids) == 2
    (record,) = [json.loads(x) for x in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(record["val_dice"]) == {"RV", "MYO", "LV"}
