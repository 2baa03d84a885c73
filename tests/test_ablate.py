"""``uumamba ablate``: a 2 x 2 grid trained for a few iterations on synthetic data (every output,
one csv row per cell x fold x seed x case x class, nothing rerun the second time, a lost
score recomputed without retraining); the report's statistics on hand-made scores (seeds
averaged first); bad flags refused in one line before anything is written; the hardening
(locks, scores checked for their run and settings, cells whose network or loss cannot be
built, a deleted cell folder, an exception with children running, bad OUTPUT paths) with
stand-in children and hand-made files, never a training."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from scipy.stats import wilcoxon
from typer.testing import CliRunner

from uumamba.ablation import child as ablation_child
from uumamba.ablation import report as ablation_report
from uumamba.ablation import run as ablation_run
from uumamba.ablation.grid import MAX_CELLS, cells_of, find_reference, parse_grid
from uumamba.ablation.lock import FileLock
from uumamba.ablation.report import write_report
from uumamba.ablation.run import RECORD, available_cores, make_request, run_ablation, tasks_of
from uumamba.ablation.scores import read_json, read_scores
from uumamba.cli import app
from uumamba.data.splits import save_splits
from uumamba.data.synthetic import write_synthetic_dataset
from uumamba.errors import DataError, UserError

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
GRID = ["--grid", "optim.name=adamw,sgd", "--grid", "loss.name=uncertainty,dice_ce"]
CELLS = ["optim.name=adamw,loss.name=uncertainty", "optim.name=adamw,loss.name=dice_ce",
         "optim.name=sgd,loss.name=uncertainty", "optim.name=sgd,loss.name=dice_ce"]
CLASSES = ["RV", "MYO", "LV"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 4 cases, train.n_folds = 2 (tiny.yaml): 2 validation cases per fold
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_cases=4, seed=0)


def _args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["ablate", "--config", str(TINY_YAML), "--data", str(data), "--output", str(output),
            *GRID, "--minutes", "1", "--folds", "0", "--seeds", "1",
            "--jobs", str(min(2, available_cores())), "--set", "train.epochs=1",
            "--set", "train.iterations_per_epoch=2", *extra]


def _mtimes(output: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(output)): p.stat().st_mtime_ns for p in output.glob(pattern)}


def test_two_by_two_grid_runs_reports_and_resumes(tmp_path, data_dir):
    out = tmp_path / "ablate"
    first = CliRunner().invoke(app, _args(data_dir, out))
    assert first.exit_code == 0, first.output
    assert "4 run(s) trained now, 0 done before" in first.output
    for name in ("ablation.csv", "ablation.md", "ablation.png", "ablation.json", RECORD,
                 "splits.json", "plans.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same split and plan in every run's model folder
    splits = json.loads((out / "splits.json").read_text())
    val = sorted(splits[0]["val"])
    assert len(val) == 2
    folders = sorted((out / "cells").glob("*/seed_1"))
    assert len(folders) == 4
    for folder in folders:
        assert json.loads((folder / "splits.json").read_text()) == splits
        assert (folder / "plans.json").read_text() == (out / "plans.json").read_text()
        scores = json.loads((folder / "fold_0" / "scores.json").read_text())
        assert scores["val_cases"] == val and scores["iterations"] == 2
        assert scores["planned_iterations"] == 2 and scores["seconds"] > 0
    configs = {f.parent.parent.name: f.read_text() for f in out.glob("cells/*/seed_1/config.yaml")}
    assert "name: sgd" in configs["optim.name-sgd__loss.name-dice_ce"]
    assert "name: dice_ce" in configs["optim.name-sgd__loss.name-dice_ce"]

    # csv: cells x folds x seeds x cases x classes rows, with numbers
    with (out / "ablation.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["cell", "fold", "seed", "case", "class", "dice", "hd95_mm"]
    assert len(rows) == 4 * 1 * 1 * 2 * 3
    assert {(r["cell"], r["case"], r["class"]) for r in rows} == {
        (c, v, k) for c in CELLS for v in val for k in CLASSES}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)

    # md: one table row per cell, each with numbers; the reference is the first cell
    md = (out / "ablation.md").read_text()
    table = md.split("## Dice per class")[1].split("\n\n")[1].splitlines()
    assert table[0].startswith("| cell | RV Dice | MYO Dice | LV Dice | foreground Dice")
    body = table[2:]
    assert [r.split(" | ")[0].lstrip("| ").replace(" (reference)", "") for r in body] == CELLS
    assert "(reference)" in body[0]
    for row in body:
        assert row.count("[") == 4 and row.split(" | ")[-2] == "2"  # 4 intervals; iterations
    assert ("--set train.epochs=1 --set train.iterations_per_epoch=2" in md
            and "(the validation cases of fold 0 of one patient-grouped split" in md)
    assert "**Caution:** Only 2 case(s) are scored" in md
    # the terminal table: cells numbered (fits 80 columns), named in a legend
    rows = [ln for ln in first.output.splitlines() if ln.lstrip().startswith(("1  0.", "4  0."))]
    assert len(rows) == 2 and all(len(ln) <= 80 for ln in rows), first.output
    assert f"1  {CELLS[0]} (reference)" in first.output and f"4  {CELLS[3]}" in first.output
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["reference"] == CELLS[0] and summary["n_cases"] == 2
    assert [c["cell"] for c in summary["comparisons"]] == CELLS[1:]
    fg = summary["cells"][0]["foreground_dice"]
    assert fg["low"] <= fg["estimate"] <= fg["high"] and fg["n"] == 2

    # a second invocation trains and scores nothing, and only rebuilds the report
    checkpoints = _mtimes(out, "cells/*/seed_1/fold_0/checkpoint_*.pt")
    scored = _mtimes(out, "cells/*/seed_1/fold_0/scores.json")
    assert len(checkpoints) >= 4 and len(scored) == 4
    second = CliRunner().invoke(app, _args(data_dir, out, "--reference",
                                           "optim.name=sgd,loss.name=dice_ce"))
    assert second.exit_code == 0, second.output
    assert "0 run(s) trained now, 4 done before" in second.output
    assert _mtimes(out, "cells/*/seed_1/fold_0/checkpoint_*.pt") == checkpoints
    assert _mtimes(out, "cells/*/seed_1/fold_0/scores.json") == scored
    assert json.loads((out / "ablation.json").read_text())["reference"] == CELLS[3]

    # a lost score is recomputed from the finished checkpoint, without training again
    lost = out / "cells" / "optim.name-sgd__loss.name-uncertainty" / "seed_1" / "fold_0"
    (lost / "scores.json").unlink()
    third = CliRunner().invoke(app, _args(data_dir, out))
    assert third.exit_code == 0, third.output
    assert "1 run(s) trained now, 3 done before" in third.output
    assert _mtimes(out, "cells/*/seed_1/fold_0/checkpoint_*.pt") == checkpoints
    assert "training already finished" in (lost.parent / "fold_0.log").read_text()
    assert json.loads((lost / "scores.json").read_text())["iterations"] == 2

    # another budget into the same OUTPUT is refused before anything runs
    with pytest.raises(UserError, match=r"other arguments \(--minutes 1\.0 -> 2\.0\)"):
        make_request(data=data_dir, output=out, grid=GRID[1::2], config=TINY_YAML,
                     overrides=["train.epochs=1", "train.iterations_per_epoch=2"], minutes=2.0,
                     folds="0", seeds="1")


def _fake_scores(request, per_case) -> None:
    """Write grid.json, splits.json and every run's scores.json (per_case(cell, seed, case))."""
    request.output.mkdir(parents=True)
    (request.output / RECORD).write_text(json.dumps(request.record()))
    save_splits([{"train": ["c", "d"], "val": ["a", "b"]},
                 {"train": ["a", "b"], "val": ["c", "d"]}], request.output / "splits.json")
    for task in tasks_of(request):
        val = ["a", "b"] if task.fold == 0 else ["c", "d"]
        rows = [{"case": case, "class": k, "dice": per_case(task.cell.label, task.seed, case),
                 "hd95_mm": None if (case, k) == ("a", "RV") else 2.0}
                for case in val for k in ("RV", "LV")]
        task.fold_dir.mkdir(parents=True)
        task.scores_path.write_text(json.dumps({
            "cell": task.cell.label, "seed": task.seed, "fold": task.fold,
            "config_hash": request.run_digest(task.cell, task.seed), "weights": "last",
            "classes": ["RV", "LV"],
            "val_cases": val, "per_case": rows, "iterations": 10 + task.fold, "seconds": 5.0,
            "planned_iterations": 20, "stopped_by": "time_limit",
            "foreground_mean_dice": 0.5}))


def test_report_averages_seeds_before_bootstrapping_cases(tmp_path, monkeypatch):
    monkeypatch.chdir(TINY_YAML.parents[1])  # a config path as a user gives it: relative
    request = make_request(data=tmp_path, output=tmp_path / "out", grid=["optim.name=adamw,sgd"],
                           config=Path("configs/tiny.yaml"), folds="0,1", seeds="1,2", cores=2,
                           overrides=["train.epochs=1", "loss.name=dice_ce"])
    adamw = {1: {"a": 0.6, "b": 0.8, "c": 0.8, "d": 1.0}, 2: {"a": 0.8, "b": 0.8, "c": 1.0, "d": 1.0}}
    _fake_scores(request, lambda cell, seed, case: adamw[seed][case] if "adamw" in cell else 0.7)
    durable = []
    real_atomic_path = ablation_report.atomic_path

    def recording_atomic_path(path, **kwargs):
        durable.append((Path(path).name, kwargs.get("durable", False)))
        return real_atomic_path(path, **kwargs)

    monkeypatch.setattr(ablation_report, "atomic_path", recording_atomic_path)
    summary = write_report(request)
    assert sorted(durable) == [(f"ablation.{ext}", True) for ext in ("csv", "json", "md", "png")]

    # adamw: per case (seed mean) 0.7, 0.8, 0.9, 1.0 -> 0.85; sgd: 0.7 everywhere, a point
    cells = {c["label"]: c for c in summary["cells"]}
    assert cells["optim.name=adamw"]["dice"]["RV"]["estimate"] == pytest.approx(0.85)
    assert cells["optim.name=adamw"]["dice"]["RV"]["n"] == 4  # cases, not cases x seeds
    sgd = cells["optim.name=sgd"]["foreground_dice"]
    assert sgd["estimate"] == sgd["low"] == sgd["high"] == pytest.approx(0.7)
    assert cells["optim.name=sgd"]["hd95_mm"]["RV"] == {"mean": 2.0, "n": 3}
    assert cells["optim.name=adamw"]["iterations_mean"] == 10.5
    (comp,) = summary["comparisons"]
    # differences sgd - adamw per case: 0, -0.1, -0.2, -0.3; the zero is dropped by the test
    assert comp["difference"]["estimate"] == pytest.approx(-0.15)
    assert comp["difference"]["low"] < -0.15 < comp["difference"]["high"] <= 0.0
    assert comp["wilcoxon"]["p_value"] == pytest.approx(wilcoxon([-0.1, -0.2, -0.3]).pvalue)
    assert comp["wilcoxon"]["n_nonzero"] == 3

    md = (request.output / "ablation.md").read_text()
    assert "| optim.name=adamw (reference) | 0.850 [" in md
    assert "| optim.name=sgd | 0.700 [0.700, 0.700] | 0.700 [0.700, 0.700] |" in md
    assert "| optim.name=sgd | -0.150 [" in md
    assert "averaged over the seeds" in md
    # the command line can be pasted back; the config as given and resolved; few cases flagged
    assert (f"config `configs/tiny.yaml` (`{TINY_YAML}`) with "
            "`--set train.epochs=1 --set loss.name=dice_ce`;" in md)
    assert "(the validation cases of folds 0, 1 together of one patient-grouped split" in md
    assert "**Caution:** Only 4 case(s) are scored: intervals and p-values from so few" in md
    assert "- Foreground Dice: per case, the mean of its Dice over the foreground classes" in md
    assert "`postprocessed_foreground_mean_dice` (per run, in `ablation.json`): " in md
    assert "largest-connected-component" in summary["method"]["postprocessed_foreground_mean_dice"]
    assert summary["method"]["foreground_dice"].startswith("per case, the mean of its Dice")
    assert summary["caution"].startswith("only 4 case(s) are scored")
    with (request.output / "ablation.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # cells x folds x seeds x cases x classes
    assert sum(1 for r in rows if r["hd95_mm"] == "") == 2 * 2  # case a, RV: both seeds, cells

    # a run scored on other cases than the shared split's is refused
    bad = tasks_of(request)[0].scores_path
    record = json.loads(bad.read_text())
    bad.write_text(json.dumps({**record, "val_cases": ["a", "c"]}))
    with pytest.raises(UserError, match="not fold 0's validation cases"):
        write_report(request)


def test_reference_by_pairs_or_folder_name():
    cells = cells_of(parse_grid(["optim.name=adamw,sgd", "optim.lr=0.01,1.0e-3"]))
    assert find_reference(cells, None) is cells[0]
    assert find_reference(cells, "optim.lr=0.001,optim.name=sgd") is cells[3]
    assert find_reference(cells, "optim.name-adamw__optim.lr-1.0e-3") is cells[1]
    with pytest.raises(UserError) as ambiguous:
        find_reference(cells, "optim.name=sgd")
    assert str(ambiguous.value) == (
        "--reference optim.name=sgd: 2 cells match (optim.name=sgd,optim.lr=0.01; "
        "optim.name=sgd,optim.lr=1.0e-3); give a value for every grid key (optim.name, optim.lr)")
    with pytest.raises(UserError) as none:
        find_reference(cells, "optim.name=sam")
    assert str(none.value) == ("--reference optim.name=sam: no cell of the grid matches (the "
                               "grid's values: optim.name: adamw, sgd; optim.lr: 0.01, 1.0e-3)")
    with pytest.raises(UserError, match=r"separate KEY=VALUE pairs with commas, e\.g\. "
                                        r"--reference optim\.name=sgd,optim\.lr=0\.01$"):
        find_reference(cells, "optim.name=sgd optim.lr=0.01")


def _main(monkeypatch, capsys, argv):
    from uumamba.commands import main

    monkeypatch.setattr(sys, "argv", ["uumamba", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--grid", "optim.nme=adamw"], "--grid optim.nme=adamw: unknown config key 'optim.nme'"),
    (["--grid", "optim.lr=fast"], "--grid optim.lr=fast: "),
    (["--grid", "optim.name="], "--grid optim.name=: no value"),
    (["--grid", "optim.name=adamw,"], "--grid optim.name=adamw,: empty value"),
    (["--grid", "optim.name=adamw", "--grid", "optim.name=sgd"],
     "--grid optim.name=sgd: optim.name is already a grid axis"),
    (["--grid", "optim.name=../../etc"], "--grid optim.name=../../etc: value '../../etc' contains '/'"),
    (["--grid", "train.seed=1,2"], "--grid train.seed=1,2: train.seed cannot vary in a grid"),
    (["--grid", "optim.name=adamw", "--folds", "2"], "--folds 2: fold 2 does not exist"),
    (["--grid", "optim.name=adamw", "--folds", "0,x"], "--folds 0,x: 'x' is not an integer"),
    (["--grid", "optim.name=adamw", "--seeds", "1,1"], "--seeds 1,1: 1 is given twice"),
    (["--grid", "optim.name=adamw", "--seeds", "-1"], "--seeds -1: '-1' is not an integer >= 0"),
    (["--grid", "optim.name=adamw,sgd", "--reference", "optim.name=sam"],
     "--reference optim.name=sam: no cell of the grid matches (the grid's values: optim.name: "
     "adamw, sgd)"),
    (["--grid", "optim.name=adamw", "--jobs", "999"], "--jobs 999: more parallel runs than"),
    (["--grid", "optim.name=adamw", "--set", "optim.name=sam"],
     "--set optim.name: also a --grid axis"),
    ([], "--grid: give at least one"),
    # superscripts and other Unicode digits pass str.isdigit but are not integers for int()
    (["--grid", "optim.name=adamw", "--folds", "\u00b2"], "--folds \u00b2: '\u00b2' is not an integer"),
    (["--grid", "optim.name=adamw", "--seeds", "\u00b2"], "--seeds \u00b2: '\u00b2' is not an integer"),
    (["--grid", "optim.name=adamw", "--seeds", "4294967296"],
     "--seeds 4294967296: 4294967296 is too large (at most 4294967295)"),
    (["--grid", "optim.name=adamw", "--threads", "999"],
     "--threads 999: more threads per run than the"),
    (["--grid", "optim.lr=0.001,1e-3"],
     "--grid optim.lr: values '0.001' and '1e-3' give the same configuration"),
    (["--grid", "optim.name=adamw,sgd", "--reference", "optim.name=sgd,optim.name=adamw"],
     "--reference optim.name=sgd,optim.name=adamw: optim.name is given twice"),
    (["--grid", "optim.lr=1\x85"], "--grid 'optim.lr=1\\x85': contains the control character "
                                   "U+0085"),
    (["--grid", "optim.name=adamw\u2028sgd"], "--grid 'optim.name=adamw\\u2028sgd': contains the "
                                              "control character U+2028"),
])
def test_bad_flags_fail_in_one_line_before_anything_runs(monkeypatch, capsys, tmp_path, extra,
                                                         message):
    out = tmp_path / "out"
    code, err = _main(monkeypatch, capsys, ["ablate", "--config", str(TINY_YAML), "--data",
                                            str(tmp_path), "--output", str(out), *extra])
    assert code == 1
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


# The console script in a fresh process: exit status, stderr, and which modules were loaded.
PROBE = """
import sys
from uumamba.cli import main
sys.argv = ["uumamba", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    print(exc.code, "torch" in sys.modules)
"""


def test_bad_grid_fails_in_a_real_process_before_torch_loads(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE, "ablate", "--data", str(tmp_path),
                           "--output", str(tmp_path / "out"), "--grid", "model.name=unet,resnet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["1", "False"], proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: --grid model.name=resnet: ")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_ablation_library_never_imports_the_cli_framework():
    code = ("import sys\n"
            "import uumamba.ablation.grid, uumamba.ablation.run, uumamba.ablation.report\n"
            "import uumamba.ablation.child, uumamba.evaluation.statistics, uumamba.inference.score\n"
            "print(sorted(m for m in sys.modules if m.startswith(('uumamba.commands', 'typer'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[]"


def _stand_in_child(monkeypatch, code: str) -> None:
    """Replace the child command by ``python -c CODE`` (the parent's handling, no training)."""
    monkeypatch.setattr(ablation_run, "_child_command",
                        lambda request, task: [sys.executable, "-c", code])


def test_failed_runs_are_listed_and_the_others_still_run(monkeypatch, capsys, tmp_path, data_dir):
    _stand_in_child(monkeypatch, "import os, sys; print('threads', os.environ['OMP_NUM_THREADS'], "
                                 "os.environ['NUMBA_NUM_THREADS']); "
                                 "print('error: boom', file=sys.stderr); sys.exit(1)")
    out = tmp_path / "out"
    code, err = _main(monkeypatch, capsys, [
        "ablate", "--config", str(TINY_YAML), "--data", str(data_dir), "--output", str(out),
        "--grid", "optim.name=adamw,sgd", "--jobs", "1", "--threads", "1"])
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: 2 of 2 run(s) failed: optim.name=adamw seed 12345 fold 0: "
                          "error: boom (exit status 1; log ")
    logs = sorted(out.glob("cells/*/seed_12345/fold_0.log"))
    assert len(logs) == 2 and all("threads 1 1" in f.read_text() for f in logs)
    assert not (out / "ablation.md").exists()


def test_a_stop_signal_is_passed_on_once_and_no_further_run_starts(monkeypatch, tmp_path,
                                                                  data_dir, caplog):
    # the stand-in child stops on its first SIGINT with 130, as a training run does after
    # saving its checkpoint
    _stand_in_child(monkeypatch, "import signal, sys, time; print('ready', flush=True); "
                                 "signal.signal(signal.SIGINT, lambda *a: sys.exit(130)); "
                                 "time.sleep(60); sys.exit(3)")
    caplog.set_level(logging.INFO, logger="uumamba")
    request = make_request(data=data_dir, output=tmp_path / "out", config=TINY_YAML,
                           grid=["optim.name=adamw,sgd"], jobs=1, cores=2)
    first, second = tasks_of(request)
    done = threading.Event()

    def interrupt_when_ready() -> None:  # Ctrl-C once the first child runs
        while not done.wait(0.05):
            if first.log_path.is_file() and "ready" in first.log_path.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return

    watcher = threading.Thread(target=interrupt_when_ready, daemon=True)
    watcher.start()
    try:
        outcome = run_ablation(request)
    finally:
        done.set()
        watcher.join()
    assert outcome.signal == signal.SIGINT and not outcome.failed and not outcome.ran
    assert not second.log_path.exists()  # never started
    assert not first.scores_path.exists()
    # the stand-in saved no checkpoint: the parent does not claim one
    stopped = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert stopped == [f"{first.name}: stopped before its first checkpoint; it restarts next time"]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_wrapping_optimizer_over_another_base_than_the_plain_cells_is_warned(tmp_path, caplog):
    def request(grid, overrides=()):
        caplog.clear()
        make_request(data=tmp_path, output=tmp_path / "out", grid=grid, config=TINY_YAML,
                     overrides=list(overrides), cores=2)
        return _warnings(caplog)

    (warning,) = request(["optim.name=adamw,looksam", "loss.name=uncertainty,dice_ce"])
    assert warning.startswith("warning: wrapping-optimizer cell(s) optim.name=looksam,"
                              "loss.name=uncertainty (looksam over sgd); optim.name=looksam,"
                              "loss.name=dice_ce (looksam over sgd) run over optim.base sgd, "
                              "while the plain-optimizer cell(s) use adamw")
    assert warning.endswith("add --set optim.base=adamw to compare optimizers over the same base")
    assert request(["optim.name=adamw,looksam"], ["optim.base=adamw"]) == []
    assert request(["optim.name=sgd,adamw,sam"]) == []  # sam over sgd has its plain cell
    assert request(["optim.name=sam,asam"]) == []  # no plain cell to compare with
    assert not (tmp_path / "out").exists()


def test_a_one_cell_grid_is_warned_and_still_runs(tmp_path, caplog):
    request = make_request(data=tmp_path, output=tmp_path / "out", grid=["optim.name=adamw"],
                           config=TINY_YAML, cores=2)
    assert [c.label for c in request.cells] == ["optim.name=adamw"]
    (warning,) = _warnings(caplog)
    assert warning.startswith("warning: the grid has one cell (optim.name=adamw): nothing to "
                              "compare it with; it is trained and scored alone")


def test_a_first_run_that_fails_before_training_leaves_no_record(monkeypatch, tmp_path,
                                                                 data_dir):
    out = tmp_path / "out"

    def request(n_folds):
        return make_request(data=data_dir, output=out, grid=["optim.name=adamw,sgd"],
                            config=TINY_YAML, overrides=[f"train.n_folds={n_folds}"], cores=2)

    with pytest.raises(DataError, match=r"cannot split into train\.n_folds = 5 folds: .*only 4 "
                                        r"patient group\(s\).*; use --set train\.n_folds=4 or "
                                        r"fewer$"):
        run_ablation(request(5))
    assert not out.exists()  # no grid.json, splits.json or plans.json: not locked

    _stand_in_child(monkeypatch, "import sys; print('error: boom', file=sys.stderr); sys.exit(1)")
    outcome = run_ablation(request(2))  # other arguments are accepted
    assert len(outcome.failed) == 2
    assert json.loads((out / RECORD).read_text())["settings"]["train"]["n_folds"] == 2
    assert len(json.loads((out / "splits.json").read_text())) == 2
    # now recorded: other arguments are refused, with the way out (nothing trained yet)
    with pytest.raises(UserError, match=r"other arguments \(other --config / --set\).*no run of "
                                        r"it has trained yet, so deleting"):
        request(3)


def test_the_child_stops_in_one_line_when_interrupted_outside_training(monkeypatch, capsys,
                                                                       tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablation_child, "run_one", interrupted)
    code = ablation_child.main(["--data", str(tmp_path), "--model", str(tmp_path / "m"),
                                "--fold", "0", "--seed", "1"])
    err = capsys.readouterr().err
    assert code == 130
    assert err == "stopped: interrupted (SIGINT) outside training (while starting, predicting " \
                  "or scoring)\n"


# --- hardening: locks, checked scores, cells that cannot be built, files and folders ----------

def _request(data: Path, output: Path, grid=("optim.name=adamw,sgd",), **kwargs):
    return make_request(data=data, output=output, grid=list(grid), config=TINY_YAML,
                        cores=2, **kwargs)


def test_a_second_ablation_into_the_same_output_is_refused(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / ".lock"):  # another invocation holds it (flock is per open file)
        with pytest.raises(UserError) as busy:
            run_ablation(_request(data_dir, out))
    assert str(busy.value) == (f"--output {out}: another uumamba ablate is running there "
                               f"(pid {os.getpid()})")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written

    # two requests validated before either ran: the second, with other arguments, is refused
    # under the lock once the first has recorded its own
    first = _request(data_dir, tmp_path / "o2", minutes=1.0)
    second = _request(data_dir, tmp_path / "o2", minutes=2.0)
    _stand_in_child(monkeypatch, "import sys; print('error: boom', file=sys.stderr); sys.exit(1)")
    assert len(run_ablation(first).failed) == 2
    with pytest.raises(UserError, match=r"other arguments \(--minutes 1\.0 -> 2\.0\)"):
        run_ablation(second)


def test_a_child_refuses_a_run_that_another_child_trains(tmp_path):
    model = tmp_path / "seed_1"
    model.mkdir()
    with FileLock(ablation_child.lock_path(model, 0)):  # an orphaned child of a killed parent
        with pytest.raises(UserError) as held:
            ablation_child.run_one(None, [], tmp_path, model, 0, "cpu", "optim.name=sgd", 1)
    assert str(held.value).startswith(f"{model / 'fold_0.lock'}: another process trains this "
                                      f"run (pid {os.getpid()})")
    assert sorted(p.name for p in model.iterdir()) == ["fold_0.lock"]


def _valid_scores(cell="optim.name=sgd", seed=1, fold=0, digest="0" * 64):
    return {"cell": cell, "seed": seed, "fold": fold, "config_hash": digest, "weights": "last",
            "iterations": 10, "planned_iterations": 20, "seconds": 3.5,
            "stopped_by": "time_limit", "classes": ["RV", "LV"], "val_cases": ["b", "a"],
            "foreground_mean_dice": 0.5, "postprocessed_foreground_mean_dice": None,
            "per_case": [{"case": c, "class": k, "dice": 0.5, "hd95_mm": None}
                         for c in ("a", "b") for k in ("RV", "LV")]}


def _set(key, value):
    def edit(s):
        s[key] = value
    return edit


def _row(key, value):
    def edit(s):
        s["per_case"][0][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("cell", "optim.name=adamw"), "cell: 'optim.name=adamw' is not this run's"),
    (_set("seed", 2), "seed: 2 is not this run's"),
    (_set("fold", 1), "fold: 1 is not this run's"),
    (_set("config_hash", "1" * 64), "config_hash: the run was scored with other settings; "
                                    "delete the cell folder to retrain"),
    (lambda s: s.pop("config_hash"), "config_hash: Field required"),
    (lambda s: s.pop("weights"), "weights: not recorded: scored, as before 2026-12-06, from "
                                 "checkpoint_best.pt"),
    (_set("weights", "best"), "weights: 'best': scored, as before"),
    (_set("weights", "l\u0430st" * 10**5), "weights: 'l\u0430stl\u0430stl\u0430stl\u0430stl\u0430st'... is not "
                                         "'last' (the only value this version writes)"),
    (_set("weights", 1), "weights: '1' is not 'last'"),
    (_set("cell", "x" * 10**6), "cell: 'xxxxxxxxxxxxxxxxxxxx'... is not this run's"),
    (_set("classes", ["RV" * 10**5] * 2), "classes: a class is named twice ('RVRV"),
    (_set("iterations", "abc"), "iterations: Input should be a valid integer"),
    (_set("iterations", None), "iterations: Input should be a valid integer"),
    (_set("iterations", 10**400), "iterations: Input should be less than"),
    (_set("planned_iterations", -1), "planned_iterations: Input should be greater than"),
    (_set("seconds", "abc"), "seconds: Input should be a valid number"),
    (_set("seconds", float("inf")), "seconds: Input should be a finite number"),
    (_set("classes", "RV"), "classes: Input should be a valid list"),
    (_set("classes", ["RV", "RV"]), "classes: a class is named twice"),
    (_set("val_cases", 5), "val_cases: Input should be a valid list"),
    (_set("val_cases", ["a", 3]), "val_cases.1: Input should be a valid string"),
    (_set("val_cases", ["a", "c"]), "val_cases: scored cases 'a, c' are not fold 0's"),
    (_set("per_case", {"a": 1}), "per_case: Input should be a valid list"),
    (_set("per_case", []), "per_case: 0 row(s), expected one per validation case and class"),
    (lambda s: s["per_case"].pop(), "per_case: 3 row(s), expected one per"),
    (lambda s: s["per_case"].append(dict(s["per_case"][0])), "per_case.4: case 'a' class 'RV' "
                                                             "is scored twice"),
    (lambda s: s["per_case"][0].pop("dice"), "per_case.0.dice: Field required"),
    (_row("dice", "0.5"), "per_case.0.dice: Input should be a valid number"),
    (_row("dice", 1e300), "per_case.0.dice: Input should be less than or equal to 1"),
    (_row("dice", -5.0), "per_case.0.dice: Input should be greater than or equal to 0"),
    (_row("dice", float("nan")), "per_case.0.dice: Input should be a finite number"),
    (_row("hd95_mm", -1.0), "per_case.0.hd95_mm: Input should be greater than or equal to 0"),
    (_row("class", "AORTA"), "per_case.0.class: 'AORTA' is not one of classes"),
    (_row("case", "z"), "per_case.0.case: 'z' is not one of val_cases"),
    (_set("foreground_mean_dice", 2.0), "foreground_mean_dice: Input should be less than"),
    (_set("stopped_by", "magic"), "stopped_by: Input should be 'time_limit' or 'completed'"),
])
def test_a_scores_file_is_accepted_only_for_its_run_and_in_range(tmp_path, edit, message):
    path = tmp_path / "scores.json"
    good = _valid_scores()
    path.write_text(json.dumps(good))
    checked = dict(cell="optim.name=sgd", seed=1, fold=0, config_hash="0" * 64,
                   val_cases=["a", "b"])
    assert read_scores(path, **checked)["per_case"][0] == good["per_case"][0]
    bad = json.loads(json.dumps(good))
    edit(bad)
    path.write_text(json.dumps(bad))  # NaN / Infinity written as JSON's non-standard tokens
    with pytest.raises(DataError) as refused:
        read_scores(path, **checked)
    text = str(refused.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text
    assert len(text) < len(str(path)) + 400  # a crafted value is named cut, never echoed whole


def test_json_files_are_bounded_before_they_are_decoded(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"x": "y" * 100}))
    with pytest.raises(DataError, match=r"scores\.json: \d+ bytes, more than the 50 a file"):
        read_json(path, limit=50)
    path.write_text('{"dice": NaN}')
    with pytest.raises(DataError, match=r"not valid JSON \(NaN is not a JSON number"):
        read_json(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError, match=r"scores\.json: not a regular file$"):
        read_json(path)


def test_the_report_refuses_scores_of_other_settings_and_a_lost_record(tmp_path, data_dir):
    request = _request(tmp_path, tmp_path / "out", folds="0")
    _fake_scores(request, lambda cell, seed, case: 0.5)
    target = tasks_of(request)[1].scores_path
    record = json.loads(target.read_text())
    other = _request(tmp_path, tmp_path / "elsewhere", overrides=["optim.lr=0.5"])
    target.write_text(json.dumps({**record, "config_hash": other.run_digest(
        other.cells[1], request.seeds[0])}))
    with pytest.raises(DataError) as refused:
        write_report(request)
    assert str(refused.value) == (f"{target}: config_hash: the run was scored with other "
                                  "settings; delete the cell folder to retrain")
    # grid.json deleted: the cells' settings are unknown, so a rerun is refused up front
    (request.output / RECORD).unlink()
    with pytest.raises(UserError, match=r"holds cells/ but no grid\.json .* cannot be checked"):
        run_ablation(_request(data_dir, request.output, folds="0"))
    assert not (request.output / RECORD).exists()


def test_a_cell_whose_network_or_loss_cannot_be_built_fails_before_anything_is_written(
        tmp_path, data_dir, monkeypatch):
    _stand_in_child(monkeypatch, "raise SystemExit('never started')")
    out = tmp_path / "out"
    with pytest.raises(UserError) as blocks:
        run_ablation(_request(data_dir, out, grid=["model.n_blocks_per_stage=[1,1,1],[2,2]"]))
    assert str(blocks.value).startswith("--grid cell model.n_blocks_per_stage=[2,2]: ")
    assert "n_blocks_per_stage" in str(blocks.value).split(": ", 1)[1]
    with pytest.raises(UserError) as alpha:
        run_ablation(_request(data_dir, out, grid=["loss.focal_alpha=[1.0,1.0,1.0,1.0],"
                                                   "[1.0,2.0]"]))
    assert str(alpha.value).startswith("--grid cell loss.focal_alpha=[1.0,2.0]: ")
    assert not out.exists()  # no grid.json, splits.json, plans.json, cells: nothing


def test_a_deleted_cell_folder_is_remade_and_long_errors_are_cut(tmp_path, data_dir,
                                                                 monkeypatch):
    request = _request(data_dir, tmp_path / "out", jobs=1)
    first, second = tasks_of(request)
    # the first child deletes the second cell's folder (as a user might) and fails verbosely
    codes = {first.name: f"import shutil, sys; shutil.rmtree({str(second.model_dir.parent)!r}); "
                         "print('error: ' + 'x' * 5000, file=sys.stderr); sys.exit(1)",
             second.name: "import sys; print('error: boom', file=sys.stderr); sys.exit(1)"}
    monkeypatch.setattr(ablation_run, "_child_command",
                        lambda request, task: [sys.executable, "-c", codes[task.name]])
    outcome = run_ablation(request)
    (t1, m1), (t2, m2) = outcome.failed
    assert (t1, t2) == (first, second)
    assert len(m1) <= ablation_run.MAX_MESSAGE and m1.startswith("error: xxx") and "..." in m1
    assert m2.startswith("error: boom (exit status 1; log ")  # it ran, in a remade folder
    assert (second.model_dir / "splits.json").read_text() == \
        (request.output / "splits.json").read_text()


def test_an_exception_in_the_parent_stops_and_waits_for_its_children(tmp_path, data_dir,
                                                                     monkeypatch):
    _stand_in_child(monkeypatch, "import signal, sys, time\n"
                                 "def term(*a):\n    print('terminated', flush=True); sys.exit(143)\n"
                                 "signal.signal(signal.SIGTERM, term)\n"
                                 "print('ready', flush=True); time.sleep(60); sys.exit(3)")
    request = _request(data_dir, tmp_path / "out", jobs=1)
    first = tasks_of(request)[0]

    def broken_reap(self):
        if first.log_path.is_file() and "ready" in first.log_path.read_text():
            raise RuntimeError("bug in the parent")

    monkeypatch.setattr(ablation_run._Children, "reap", broken_reap)
    with pytest.raises(RuntimeError, match="bug in the parent"):
        run_ablation(request)
    assert "terminated" in first.log_path.read_text()  # signalled and waited for
    assert not tasks_of(request)[1].log_path.exists()
    # the lock was released: another invocation may run
    with FileLock(request.output / ".lock"):
        pass


def test_bad_output_paths_fail_in_one_line(monkeypatch, capsys, tmp_path, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _main(monkeypatch, capsys, ["ablate", "--config", str(TINY_YAML), "--data",
                                            str(data_dir), "--output", str(blocker / "out"),
                                            "--grid", "optim.name=adamw,sgd"])
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: --output {blocker / 'out'}: cannot create {blocker / 'out'}: "
                          "Not a directory")
    out = tmp_path / "out"
    (out / RECORD).mkdir(parents=True)
    with pytest.raises(UserError, match=r"grid\.json exists but is not a regular file"):
        _request(data_dir, out)


def test_a_grid_above_max_cells_is_refused_before_its_cells_are_built():
    axes = parse_grid([f"train.epochs={','.join(map(str, range(1, 41)))}",
                       f"train.iterations_per_epoch={','.join(map(str, range(1, 31)))}"])
    with pytest.raises(UserError, match=rf"^--grid: 40 x 30 = 1200 cells; a grid has at most "
                                        rf"{MAX_CELLS} "):
        cells_of(axes)


def test_a_scores_path_that_is_not_a_regular_file_is_refused_not_trained_over(tmp_path):
    """A FIFO (or a folder, a device) where a run's scores.json belongs would read as "not
    done" and be trained over; it is refused by name, and nothing is replaced."""
    request = _request(tmp_path, tmp_path / "out", folds="0")
    _fake_scores(request, lambda cell, seed, case: 0.5)
    target = tasks_of(request)[1].scores_path
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(UserError, match=f"{target}: not a regular file; delete it"):
        run_ablation(request)
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
