"""``uumamba ablate``: validate the grid, run every cell x seed x fold (resumably, in child
processes), write the report and print its main table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from uumamba.errors import UserError


def print_ablation(summary: dict[str, Any], width: int | None = None) -> None:
    """Foreground-mean Dice per cell with its interval, the difference from the reference and
    the Wilcoxon p, iterations and seconds per run, as a rich table; cells are numbered in the
    table and named in a legend below it, so the table fits 80 columns whatever the labels.

    Args:
        summary: :func:`uumamba.ablation.report.write_report`'s summary.
        width: the console width (None: the terminal's).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    def ci(e: dict[str, Any], signed: bool = False) -> str:
        if e["estimate"] is None:
            return "n/a"
        f = "+.3f" if signed else ".3f"
        return f"{e['estimate']:{f}} [{e['low']:{f}}, {e['high']:{f}}]"

    console = Console(width=width)
    comparisons = {c["cell"]: c for c in summary["comparisons"]}
    table = Table(title=f"Ablation: foreground-mean Dice, {summary['n_cases']} validation cases "
                        "[95 % bootstrap CI]",
                  caption="p: Wilcoxon signed-rank test of the per-case differences",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("#", "Dice", "vs reference", "p", "iterations", "seconds"):
        table.add_column(col, justify="right", no_wrap=True)
    legend, digits = [], len(str(len(summary["cells"])))
    for number, cell in enumerate(summary["cells"], start=1):
        comp = comparisons.get(cell["label"])
        p = None if comp is None else comp["wilcoxon"]["p_value"]
        table.add_row(str(number), ci(cell["foreground_dice"]),
                      "reference" if comp is None else ci(comp["difference"], signed=True),
                      "" if comp is None else ("n/a" if p is None or math.isnan(p) else f"{p:.3g}"),
                      f"{cell['iterations_mean']:.0f}", f"{cell['seconds_mean']:.0f}")
        legend.append(f"{number:>{digits}}  {cell['label']}"
                      + (" (reference)" if comp is None else ""))
    console.print(table)
    for line in legend:
        console.print(line, markup=False, highlight=False)
    if summary.get("caution"):
        console.print(f"note: {summary['caution']}", markup=False, highlight=False)


def ablate_from_cli(*, data: Path, output: Path, grid: list[str], config: Path | None,
                    overrides: list[str], minutes: float | None, folds: str, seeds: str | None,
                    reference: str | None, device: str, jobs: int,
                    threads: int | None) -> dict[str, Any]:
    """Validate (before anything is written), run what is not done, report.

    Raises:
        UserError: a bad flag (one line naming it), ``--output`` inside the dataset, made
            with other arguments, not creatable or writable, or in use by another
            ``uumamba ablate``; a grid cell whose network or loss cannot be built; failed
            runs (listed with their logs, each message cut to 500 characters); DataError
            (a ``scores.json`` of another run or other settings, naming the file and the
            field) / ConfigError from the data and configuration.
        SystemExit: 128 + signal number after SIGINT / SIGTERM (running runs saved their
            checkpoints; the same command resumes them).
    """
    from uumamba.ablation.run import make_request, run_ablation
    from uumamba.commands.train import check_output_dir

    request = make_request(data=data, output=output, grid=grid, config=config,
                           overrides=overrides, minutes=minutes, folds=folds, seeds=seeds,
                           reference=reference, device=device, jobs=jobs, threads=threads)
    check_output_dir(data, output)
    outcome = run_ablation(request)
    if outcome.signal is not None:
        typer.echo(f"interrupted: run the same command again to resume ({output})", err=True)
        raise SystemExit(128 + int(outcome.signal))
    if outcome.failed:
        shown = "; ".join(f"{task.name}: {message}" for task, message in outcome.failed[:3])
        more = f" (and {len(outcome.failed) - 3} more)" if len(outcome.failed) > 3 else ""
        raise UserError(f"{len(outcome.failed)} of {len(outcome.tasks)} run(s) failed: "
                        f"{shown}{more}; the others are kept, and the same command retries "
                        "only what is not done")
    from uumamba.ablation.report import write_report

    summary = write_report(request)
    print_ablation(summary)
    typer.echo(f"{len(outcome.ran)} run(s) trained now, {len(outcome.cached)} done before; "
               "wrote " + ", ".join(str(p) for p in summary["files"]))
    return summary
