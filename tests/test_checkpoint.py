"""Checkpoint files: atomic and durable writes, the previous checkpoint kept, complete keys,
clear errors, stale temporary files, RNG round trip."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from uumamba.engine.checkpoint import (
    CHECKPOINT_KEYS,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from uumamba.errors import DataError
from uumamba.utils import NAME_MAX, atomic_path, remove_stale_temporaries


def _state(weight: float = 1.0) -> dict:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    state = {k: None for k in CHECKPOINT_KEYS}
    state.update(model=model.state_dict(), optimizer=opt.state_dict(), epoch=3, iteration=30,
                 rng=capture_rng_state(), config={"train": {"seed": 1}}, fold="0",
                 finished=False, best_metric=0.5, metric_history=[{"epoch": 1}],
                 splits=[{"train": ["a"], "val": ["b"]}])
    return state


def test_round_trip_keeps_every_key_and_tensor(tmp_path):
    state = _state(2.0)
    path = save_checkpoint(tmp_path / "sub" / "checkpoint_latest.pt", state)
    loaded = load_checkpoint(path)
    assert set(CHECKPOINT_KEYS) <= set(loaded)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    buf = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(buf, state["optimizer"]["state"][0]["momentum_buffer"])
    assert loaded["iteration"] == 30 and loaded["best_metric"] == 0.5
    # no temporary file left beside the checkpoint
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint_latest.pt"]


def test_incomplete_state_is_refused_before_writing(tmp_path):
    state = _state()
    del state["scheduler"]
    with pytest.raises(ValueError, match="scheduler"):
        save_checkpoint(tmp_path / "c.pt", state)
    assert not (tmp_path / "c.pt").exists()


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    first = _state(1.0)
    path = save_checkpoint(tmp_path / "c.pt", first)

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(5.0))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["weight"], first["model"]["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_missing_truncated_and_foreign_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    good = save_checkpoint(tmp_path / "good.pt", _state())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(DataError, match="missing keys"):
        load_checkpoint(foreign)


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(3)
    np.random.seed(3)  # noqa: NPY002 - the global generator is what is checkpointed
    torch.manual_seed(3)
    state = _state()
    state["rng"] = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    path = save_checkpoint(tmp_path / "c.pt", state)
    random.random(), np.random.rand(), torch.rand(5)  # noqa: NPY002 - move them on
    restore_rng_state(load_checkpoint(path)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    assert again[0] == expected[0] and again[1] == expected[1]
    assert torch.equal(again[2], expected[2])


def test_save_keeps_the_replaced_latest_as_previous_durably(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    latest, previous = tmp_path / "checkpoint_latest.pt", tmp_path / "checkpoint_previous.pt"
    first, second = _state(1.0), _state(2.0)
    save_checkpoint(latest, first, previous=previous)
    assert not previous.exists()
    save_checkpoint(latest, second, previous=previous)
    assert torch.equal(load_checkpoint(latest)["model"]["weight"], second["model"]["weight"])
    assert torch.equal(load_checkpoint(previous)["model"]["weight"], first["model"]["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [latest.name, previous.name]
    # the file before its rename, the folder after it: twice each
    assert synced.count(str(tmp_path)) == 2
    assert sum(".checkpoint_latest.tmp-" in s for s in synced) == 2


def test_empty_file_is_refused_clearly(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load_checkpoint(tmp_path / "c.pt")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    names = [f".checkpoint_latest.tmp-{dead_pid}.pt", f".config.tmp-{dead_pid}.yaml",
             f".checkpoint_latest.tmp-{os.getpid()}.pt",  # this process: still writing
             f".checkpoint_best.tmp-{os.getppid()}.pt",  # a live process
             "checkpoint_latest.pt", "notes.tmp-1.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_a_long_legal_output_name_is_written_through_a_short_temporary_name(tmp_path):
    """A 247-byte output name: its temporary name (with '.', '.tmp-PID') would pass 255 bytes
    and the write failed with 'File name too long'."""
    path = tmp_path / ("L" * 240 + ".nii.gz")
    seen = []
    with atomic_path(path) as tmp:
        seen.append(tmp.name)
        assert len(tmp.name.encode()) <= NAME_MAX and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert path.read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    # a killed writer's long-name temporary is still recognised as stale
    stale = tmp_path / seen[0].replace(f".tmp-{os.getpid()}", ".tmp-999999999")
    stale.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == [stale]
