"""Training iterations per minute of this checkout against an earlier commit, in one run.

Both source trees train the same fold of the same data with the same config for
``--minutes`` each, one after the other and alternating (baseline, current, baseline, current
for ``--rounds 2``), so that a slow spell of a shared machine hits both. The baseline is a
``git worktree`` of ``--baseline`` (a commit, tag or branch) under ``OUTPUT/src-<sha>``; each
run is ``python -c "from uumamba.cli import main; main()" train ...`` with ``PYTHONPATH`` set
to its tree, in a fresh model folder under ``OUTPUT/runs``.

The rate of a run is measured on its whole epochs after the first (start-up, kernel
compilation and the first cache fill excluded) and before the last (the final validation):
``(iteration_last - iteration_first) / (elapsed_last - elapsed_first)`` of its
``metrics.jsonl`` records, times 60. Validation is pushed past the budget
(``train.val_every``) so that only the final one runs. Reported: every run's rate, the
median per tree and the ratio current / baseline; ``OUTPUT/throughput.json`` keeps it all.

    python benchmarks/bench_throughput.py --baseline HEAD~1 --minutes 3 --rounds 2 \
        --output runs/throughput

Run it on an otherwise idle machine: another process's load changes the rates (a second
training on the same 2 cores roughly halves them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = "from uumamba.cli import main; main()"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def baseline_tree(rev: str, output: Path) -> tuple[Path, str]:
    """A worktree of ``rev`` under ``output`` (reused when it exists); (path, full sha)."""
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = output / f"src-{sha[:12]}"
    if not (tree / "uumamba").is_dir():
        _git("worktree", "add", "--detach", "--force", str(tree), sha)
    return tree, sha


def epoch_rate(metrics: Path) -> tuple[float, int]:
    """(iterations per minute over the whole epochs between the first and the last record,
    total iterations) of a ``metrics.jsonl``.

    Raises:
        ValueError: fewer than three epoch records (the run was too short to measure).
    """
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if len(records) < 3:
        raise ValueError(f"{metrics}: {len(records)} epoch records; train longer "
                         "(--minutes) or use shorter epochs (--iterations-per-epoch)")
    first, last = records[0], records[-2]
    rate = 60.0 * (last["iteration"] - first["iteration"]) / (last["elapsed"] - first["elapsed"])
    return rate, records[-1]["iteration"]


def train_once(tree: Path, label: str, index: int, args: argparse.Namespace) -> dict:
    """One timed training run of the source ``tree``; its record."""
    out = args.output / "runs" / f"{index:02d}-{label}"
    sets = [f"train.time_limit_minutes={args.minutes}",
            f"train.iterations_per_epoch={args.iterations_per_epoch}",
            "train.val_every=100000", *args.overrides]
    cmd = [sys.executable, "-c", CLI, "train", "--data", str(args.data), "--output", str(out),
           "--config", str(args.config), "--fold", "0", "--device", "cpu"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    with (args.output / "runs" / f"{index:02d}-{label}.log").open("w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT,
                       cwd=tree)
    rate, iterations = epoch_rate(out / "fold_0" / "metrics.jsonl")
    return {"label": label, "tree": str(tree), "iterations_per_minute": rate,
            "iterations": iterations, "wall_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="git revision to compare against")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ACDC")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "acdc_cpu.yaml")
    p.add_argument("--output", type=Path, default=REPO / "runs" / "throughput")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget per run")
    p.add_argument("--rounds", type=int, default=2, help="baseline/current pairs")
    p.add_argument("--iterations-per-epoch", type=int, default=50)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override KEY=VALUE (both trees)")
    args = p.parse_args(argv)
    from uumamba.commands.script import describe_machine

    args.data, args.config = args.data.resolve(), args.config.resolve()
    args.output = args.output.resolve()
    (args.output / "runs").mkdir(parents=True, exist_ok=True)
    tree, sha = baseline_tree(args.baseline, args.output)
    head = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    machine = describe_machine()
    runs = []
    for r in range(args.rounds):
        for label, src in (("baseline", tree), ("current", REPO)):
            run = train_once(src, label, len(runs), args)
            runs.append(run)
            print(f"round {r + 1} {label:<8} {run['iterations_per_minute']:6.1f} it/min "
                  f"({run['iterations']} iterations in {args.minutes:g} min)", flush=True)
    median = {label: statistics.median(x["iterations_per_minute"] for x in runs
                                       if x["label"] == label)
              for label in ("baseline", "current")}
    result = {"machine": machine, "baseline": sha, "current": head + (" + uncommitted changes"
                                                                     if dirty else ""),
              "config": str(args.config), "minutes": args.minutes, "overrides": args.overrides,
              "runs": runs, "median_iterations_per_minute": median,
              "ratio": median["current"] / median["baseline"]}
    print(machine)
    print(f"baseline {sha[:12]}: {median['baseline']:.1f} it/min; current {result['current'][:12]}"
          f"{' (+ uncommitted)' if dirty else ''}: {median['current']:.1f} it/min; "
          f"ratio {result['ratio']:.2f}x")
    (args.output / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
