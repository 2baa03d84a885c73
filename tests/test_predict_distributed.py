"""``uumamba predict`` beyond one process: under ``torchrun --nproc_per_node 2`` (gloo, CPU) the
ranks share a folder of cases out, write each case once with the same masks and affines as one
process, show one bar and one summary; ``--resume`` recomputes only the missing cases; a
failure on one rank makes the run exit 1 with the other cases written. Plus the pieces
(sharding, merging, the written-case check) without processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from uumamba.commands.predict import predict_from_cli
from uumamba.config import Config, save_config
from uumamba.data.plan import ChannelNormalization, Plans
from uumamba.engine.checkpoint import CHECKPOINT_KEYS
from uumamba.errors import UserError
from uumamba.inference.batch import (
    BatchResult,
    CaseFailure,
    merge_results,
    shard_cases,
    written_volumes,
)
from uumamba.nn import build_network

LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
CASES = [f"case{i}" for i in range(6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained 2D U-Mamba-Bot written as ``uumamba train`` writes it (one fold)."""
    root = tmp_path_factory.mktemp("model")
    cfg = Config.model_validate({
        "dataset": {"labels": LABELS},
        "model": {"name": "umamba_bot", "spatial_dims": 2, "features": [4, 8, 16], "d_state": 4,
                  "expand": 1},
        "inference": {"sw_batch_size": 4},
    })
    plans = Plans(
        spatial_dims=2, modality="MRI", labels=LABELS, num_input_channels=1,
        target_spacing=[1.5, 1.5, 8.0], slice_axis=2,
        normalization=[ChannelNormalization(scheme="zscore")], patch_size=[32, 32],
        strides=[[1, 1], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 3, batch_size=2,
    )
    save_config(cfg, root / "config.yaml")
    plans.save(root / "plans.json")
    (root / "dataset.json").write_text(json.dumps({"labels": {str(k): v for k, v in LABELS.items()}}))
    torch.manual_seed(0)
    state = dict.fromkeys(CHECKPOINT_KEYS)
    state["model"] = build_network(cfg.model, plans).state_dict()
    (root / "fold_0").mkdir()
    torch.save(state, root / "fold_0" / "checkpoint_best.pt")
    return root


def _write_cases(folder: Path, names: list[str]) -> Path:
    """Small random volumes, each with its own (oblique-free, shifted) affine."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i, name in enumerate(names):
        affine = np.diag([-1.5, -1.5, 8.0, 1.0])
        affine[:3, 3] = [10.0 * i, -5.0, 2.5 * i]
        image = rng.normal(size=(24, 20, 3)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"{name}_0000.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return _write_cases(tmp_path_factory.mktemp("cases") / "in", CASES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(model: Path, inputs: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m uumamba.cli predict`` on CPU, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "uumamba.cli", "predict", "--model", str(model), "--input", str(inputs),
           "--output", str(output), "--device", "cpu", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _words(text: str) -> str:
    """``text`` with rich's line wrapping undone (one space between words)."""
    return " ".join(text.split())


def _masks(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {p.name: nib.load(str(p)) for p in sorted(folder.glob("*.nii.gz"))}


def _expected_names(cases: list[str]) -> list[str]:
    return sorted([f"{c}.nii.gz" for c in cases] + [f"{c}_volumes.json" for c in cases])


@pytest.fixture(scope="module")
def single_run(model_dir, inputs, tmp_path_factory, one_torch_thread) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    predict_from_cli(model_dir, inputs, out, device="cpu")
    return out


@pytest.fixture(scope="module")
def two_rank_run(model_dir, inputs, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp") / "out"
    return out, _torchrun(model_dir, inputs, out)


@pytest.mark.timeout(300)
def test_two_ranks_write_every_case_once_as_one_process(single_run, two_rank_run):
    out, run = two_rank_run
    assert run.returncode == 0, run.stderr[-3000:]
    # every case exactly once, nothing else (no temporaries, no per-rank files)
    assert sorted(p.name for p in out.iterdir()) == _expected_names(CASES)
    assert sorted(p.name for p in single_run.iterdir()) == _expected_names(CASES)
    single, multi = _masks(single_run), _masks(out)
    assert single.keys() == multi.keys()
    for name in single:
        np.testing.assert_array_equal(np.asarray(multi[name].dataobj),
                                      np.asarray(single[name].dataobj), err_msg=name)
        np.testing.assert_array_equal(multi[name].affine, single[name].affine, err_msg=name)
        assert multi[name].header.get_data_dtype() == single[name].header.get_data_dtype()
    for case in CASES:
        a = json.loads((single_run / f"{case}_volumes.json").read_text())
        b = json.loads((out / f"{case}_volumes.json").read_text())
        # everything but the mask's path and the seconds per stage (timings_s) is the same
        assert {**a, "mask": None, "timings_s": None} == {**b, "mask": None, "timings_s": None}
    # one bar and one summary, from rank 0
    both = _words(run.stdout + run.stderr)
    assert both.count(f"wrote {len(CASES)} prediction(s) to {out}") == 1, both
    assert both.count(f"{len(CASES)}/{len(CASES)}") == 1, both
    assert "error:" not in both and "skipped" not in both


@pytest.mark.timeout(300)
def test_resume_recomputes_only_missing_cases(model_dir, inputs, two_rank_run):
    out, first = two_rank_run
    assert first.returncode == 0, first.stderr[-3000:]
    removed = ["case1", "case4"]
    for case in removed:
        (out / f"{case}.nii.gz").unlink()
    (out / ".case2.tmp-999999.nii.gz").write_bytes(b"half a file")  # a killed writer's leftover
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run = _torchrun(model_dir, inputs, out, "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == _expected_names(CASES)  # leftover removed
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    recomputed = {name for name in after if after[name] != before.get(name)}
    assert recomputed == {f"{c}{s}" for c in removed for s in (".nii.gz", "_volumes.json")}
    both = _words(run.stdout + run.stderr)
    assert both.count(f"wrote 2 prediction(s) to {out}; skipped 4 already written (--resume)") == 1


@pytest.mark.timeout(300)
def test_failure_on_one_rank_exits_1_with_the_others_written(model_dir, tmp_path):
    names = ["a", "b", "c", "d"]  # b (index 1) goes to rank 1
    inputs = _write_cases(tmp_path / "in", names)
    good = (inputs / "b_0000.nii.gz").read_bytes()
    (inputs / "b_0000.nii.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    out = tmp_path / "out"
    run = _torchrun(model_dir, inputs, out)
    assert run.returncode == 1, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == _expected_names(["a", "c", "d"])
    both = _words(run.stdout + run.stderr)
    assert run.stderr.count("skipped ") == 1 and "b_0000.nii.gz" in run.stderr  # rank 1's, once
    assert both.count("error: 1 of 4 input(s) failed (3 others were written to") == 1, both
    assert "exitcode : 1" in both, both  # torchrun's report names the ranks' status


def test_single_process_resume_skips_written_cases(model_dir, tmp_path, one_torch_thread, capsys):
    inputs = _write_cases(tmp_path / "in", ["p", "q", "r"])
    out = tmp_path / "out"
    predict_from_cli(model_dir, inputs, out, device="cpu")
    (out / "q_volumes.json").unlink()  # written last: without it the case is not complete
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    predict_from_cli(model_dir, inputs, out, device="cpu", resume=True)
    err = _words(capsys.readouterr().err)
    assert f"wrote 1 prediction(s) to {out}; skipped 2 already written (--resume)" in err
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {n for n in after if after[n] != before.get(n)} == {"q.nii.gz", "q_volumes.json"}
    # a different request (entropy maps too) is not "written" yet
    assert written_volumes("p", [inputs / "p_0000.nii.gz"], out, entropy=True) is None
    (inputs / "s_0000.nii.gz").write_bytes(b"not an image")  # a new, bad case still fails
    with pytest.raises(UserError, match=r"1 of 4 input\(s\) failed \(nothing was written; "
                                        r"3 already written, skipped \(--resume\)\)"):
        predict_from_cli(model_dir, inputs, out, device="cpu", resume=True)


def test_written_volumes_needs_final_names_and_reads_volumes(tmp_path):
    src = tmp_path / "x_0000.nii.gz"
    out = tmp_path / "out"
    out.mkdir()
    assert written_volumes("x", [src], out) is None
    (out / ".x.tmp-123.nii.gz").write_bytes(b"partial")  # a temporary never counts
    (out / "x_volumes.json").write_text(json.dumps({"labels": {"LV": {"volume_ml": 1.25}}}))
    assert written_volumes("x", [src], out) is None
    (out / "x.nii.gz").write_bytes(b"mask")
    assert written_volumes("x", [src], out) == {"x": {"LV": 1.25}}
    (out / "x_volumes.json").write_text("{trunc")
    assert written_volumes("x", [src], out) is None


def test_shards_are_round_robin_and_merge_back_in_case_order():
    cases = [(c, [Path(f"/in/{c}_0000.nii.gz")]) for c in CASES]
    shards = [shard_cases(cases, rank, 4) for rank in range(4)]
    assert [[c for c, _ in s] for s in shards] == [["case0", "case4"], ["case1", "case5"],
                                                   ["case2"], ["case3"]]
    assert shard_cases(cases, 0, 1) == cases
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard_cases(cases, 2, 2)
    results = []
    for shard in reversed(shards):  # any order of ranks gives the same merge
        r = BatchResult()
        for case, files in shard:
            if case == "case2":
                r.failures.append(CaseFailure(case, files[0], "bad"))
                continue
            r.outputs[case] = [case]
            r.volumes_ml[case] = {"LV": 1.0}
            r.inputs[case] = Path("/elsewhere") / files[0].name
        results.append(r)
    merged = merge_results(results, cases)
    assert list(merged.volumes_ml) == ["case0", "case1", "case3", "case4", "case5"]
    assert merged.inputs["case1"] == Path("/in/case1_0000.nii.gz")  # this process's files
    assert [f.case for f in merged.failures] == ["case2"]
