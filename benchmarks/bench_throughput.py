"""Training iterations per minute of this checkout against an earlier commit, side by side.

Two real training runs, one per source tree (``--baseline``: a commit, tag or branch, checked
out as a ``git worktree`` under ``OUTPUT/src-<sha>``; and this checkout), train fold 0 of
``--data`` with ``--config`` at the same time but never simultaneously: they take turns of
``--turn`` iterations (``benchmarks/lockstep_train.py`` runs each tree's own
``run_fold`` with a callback that hands the turn back). The order alternates ABBA so neither
tree always goes first. A slow spell of a shared machine (on the 2-core VMs of this project
the same run varies by 15-30 % between minutes) therefore hits both trees alike, which two
runs one after the other cannot promise.

Each turn's seconds are the wall time from the "go" to the turn's last ``training_step``
(the loader, the schedule, the callbacks and logging of that tree included; data prefetched
while waiting is the same two batches for both). The first ``--warmup`` turns of each tree
are discarded (kernel compilation, first batches). Reported: iterations per minute of each
tree over the kept turns, the per-round ratio current / baseline with its median and a 95 %
bootstrap interval over rounds; ``OUTPUT/throughput.json`` keeps every turn.

    python benchmarks/bench_throughput.py --baseline HEAD~1 --rounds 30 --output runs/throughput

Both trees use their own defaults for anything the config leaves unset, which is the point:
the comparison is of the code, on the same config file and data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "lockstep_train.py"


MIN_ROUNDS_FOR_INTERVAL = 5


def _git(*args: str) -> str:
    """Output of ``git -C REPO ARGS``.

    Raises:
        UserError: git failed (its first error line).
    """
    from uumamba.errors import UserError

    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["failed"])[0]
        raise UserError(f"git {args[0]}: {first}")
    return done.stdout.strip()


def check_tree(tree: Path) -> Path:
    """``tree`` resolved, when it holds a ``uumamba`` package (else the child would import
    the installed one and compare this code with itself).

    Raises:
        UserError: no ``tree/uumamba/__init__.py``.
    """
    from uumamba.errors import UserError

    tree = tree.resolve()
    if not (tree / "uumamba" / "__init__.py").is_file():
        raise UserError(f"--baseline-tree {tree}: no uumamba package in it "
                        "(give a checkout of this repository)")
    return tree


def baseline_tree(rev: str, output: Path) -> tuple[Path, str]:
    """A worktree of ``rev`` under ``output`` (reused when it exists); (path, full sha).

    Raises:
        UserError: ``rev`` names no commit.
    """
    from uumamba.errors import UserError

    try:
        sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except UserError:
        raise UserError(f"--baseline {rev}: no such commit in {REPO}") from None
    tree = output / f"src-{sha[:12]}"
    if not (tree / "uumamba").is_dir():
        _git("worktree", "add", "--detach", "--force", str(tree), sha)
    return tree, sha


class Trainer:
    """A ``lockstep_train.py`` child training the source ``tree``."""

    def __init__(self, label: str, tree: Path, args: argparse.Namespace) -> None:
        self.label = label
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        iterations = (args.rounds * 2 + args.warmup + 1) * args.turn
        cmd = [sys.executable, str(CHILD), "--data", str(args.data), "--config",
               str(args.config), "--output", str(args.output / "runs" / label),
               "--fds", f"{to_child_r},{from_child_w}", "--turn", str(args.turn),
               "--iterations", str(iterations), "--threads", str(args.threads)]
        for s in args.overrides:
            cmd += ["--set", s]
        self.log = (args.output / f"{label}.log").open("w")
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(tree)},
                                     cwd=tree, stdout=self.log, stderr=subprocess.STDOUT,
                                     pass_fds=(to_child_r, from_child_w))
        os.close(to_child_r)
        os.close(from_child_w)
        self.commands = os.fdopen(self._to_child, "w", buffering=1)
        self.answers = os.fdopen(self._from_child, "r")
        self.turns: list[float] = []

    def turn(self) -> float:
        """Let the child train one turn; its seconds.

        Raises:
            UserError: the child ended without answering (with the last line of its log).
        """
        from uumamba.errors import UserError

        try:
            self.commands.write("go\n")
        except BrokenPipeError:
            pass
        line = self.answers.readline().split()
        if not line or line[0] != "turn":
            self.proc.wait()
            self.log.flush()
            lines = Path(self.log.name).read_text(errors="replace").strip().splitlines()
            last = lines[-1] if lines else f"exit status {self.proc.returncode}"
            raise UserError(f"the {self.label} trainer stopped: {last} (log: {self.log.name})")
        self.turns.append(float(line[1]))
        return self.turns[-1]

    def stop(self) -> None:
        try:
            self.commands.write("stop\n")
            self.commands.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", help="git revision to compare against")
    p.add_argument("--baseline-tree", type=Path,
                   help="a source tree to compare against instead of --baseline (no git)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ACDC")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "acdc_cpu.yaml")
    p.add_argument("--output", type=Path, default=REPO / "runs" / "throughput")
    p.add_argument("--rounds", type=int, default=20, help="ABBA rounds (2 turns per tree)")
    p.add_argument("--turn", type=int, default=20, help="iterations per turn")
    p.add_argument("--warmup", type=int, default=2, help="turns per tree not measured")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override KEY=VALUE (both trees)")
    args = p.parse_args(argv)
    if min(args.rounds, args.turn) < 1 or args.warmup < 0:
        raise SystemExit("--rounds and --turn must be >= 1, --warmup >= 0")
    if (args.baseline is None) == (args.baseline_tree is None):
        raise SystemExit("give one of --baseline REV or --baseline-tree PATH")
    import torch

    from uumamba.commands.script import describe_machine
    from uumamba.config import load_config
    from uumamba.errors import UserError

    if not args.data.is_dir():
        raise UserError(f"--data {args.data}: not a folder")
    load_config(args.config, args.overrides)  # a bad config or --set: one line, before any run
    torch.set_num_threads(args.threads)  # the machine line names the trainers' threads
    args.data, args.config = args.data.resolve(), args.config.resolve()
    args.output = args.output.resolve()
    (args.output / "runs").mkdir(parents=True, exist_ok=True)
    if args.baseline_tree is not None:
        tree = check_tree(args.baseline_tree)
        sha = str(tree)
    else:
        tree, sha = baseline_tree(args.baseline, args.output)
    head = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    machine = describe_machine()
    base, cur = Trainer("baseline", tree, args), Trainer("current", REPO, args)
    try:
        for _ in range(args.warmup):
            base.turn()
            cur.turn()
        ratios = []
        for r in range(args.rounds):
            first, second = (base, cur) if r % 2 == 0 else (cur, base)
            a, b = first.turn(), second.turn()
            b2, a2 = second.turn(), first.turn()
            t_base, t_cur = (a + a2, b + b2) if first is base else (b + b2, a + a2)
            ratios.append(t_base / t_cur)
            print(f"round {r + 1:>3}: baseline {60 * 2 * args.turn / t_base:6.1f} it/min, "
                  f"current {60 * 2 * args.turn / t_cur:6.1f} it/min, "
                  f"ratio {ratios[-1]:.2f}", flush=True)
    finally:
        base.stop()
        cur.stop()

    def rate(t: Trainer) -> float:
        kept = t.turns[args.warmup:]
        return 60.0 * args.turn * len(kept) / sum(kept)

    from uumamba.evaluation.statistics import bootstrap_median

    median = bootstrap_median(ratios)
    lo, hi = ((median.low, median.high) if args.rounds >= MIN_ROUNDS_FOR_INTERVAL
              else (float("nan"), float("nan")))
    result = {"machine": machine, "baseline": sha,
              "current": head + (" + uncommitted changes" if dirty else ""),
              "config": str(args.config), "overrides": args.overrides, "turn": args.turn,
              "warmup_turns": args.warmup, "rounds": args.rounds,
              "iterations_per_minute": {"baseline": rate(base), "current": rate(cur)},
              "ratio_median": median.estimate,
              "ratio_ci95": None if lo != lo else [lo, hi],
              "ratios": ratios, "turn_seconds": {"baseline": base.turns, "current": cur.turns}}
    print(machine)
    interval = (f"95 % interval {lo:.2f}-{hi:.2f}" if result["ratio_ci95"] is not None
                else f"no interval under {MIN_ROUNDS_FOR_INTERVAL} rounds")
    name = sha if args.baseline_tree is not None else sha[:12]
    print(f"baseline {name}: {rate(base):.1f} it/min; current {head[:12]}"
          f"{' + uncommitted' if dirty else ''}: {rate(cur):.1f} it/min; ratio current / "
          f"baseline {result['ratio_median']:.2f}x ({interval}, "
          f"{args.rounds} rounds of {2 * args.turn} iterations each)")
    (args.output / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
