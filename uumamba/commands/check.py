"""``uumamba check-data``: the integrity report of a dataset as a table, exit status 1 when any
problem is fatal."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from uumamba.config import Config
from uumamba.data.check import CheckReport, Problem, check_dataset
from uumamba.data.layouts import discover
from uumamba.errors import DataError, printable


def print_report(report: CheckReport, console: Console | None = None) -> None:
    """Print a report as a rich table followed by the summary line."""
    console = console or Console()
    if report.problems:
        table = Table(show_lines=False)
        table.add_column("severity")
        table.add_column("file", overflow="fold")
        table.add_column("problem", overflow="fold")
        for p in report.problems:
            style = "bold red" if p.severity == "error" else "yellow"
            # file names and messages as plain text: no markup, control characters escaped
            table.add_row(f"[{style}]{p.severity}[/{style}]", Text(printable(p.file)),
                          Text(printable(p.message)))
        console.print(table)
    style = "bold red" if report.fatal else "green"
    console.print(f"[{style}]{report.summary()}[/{style}]")


def run_check_data(data_dir: str | Path, cfg: Config) -> int:
    """Discover, check (:func:`uumamba.data.check.check_dataset`), print; return the exit status.

    Discovery problems (no recognised layout, missing files) are printed as an error too; no
    exception escapes for bad data.

    Returns:
        1 when any problem is an error, else 0.
    """
    console = Console()
    try:
        index = discover(data_dir, cfg.dataset.layout)
    except DataError as exc:
        print_report(CheckReport([Problem("error", str(data_dir), str(exc))]), console)
        return 1
    console.print(f"{data_dir}: layout '{index.layout}', {len(index.cases)} labelled cases, "
                  f"{len(index.test_images)} test images")
    report = check_dataset(index, cfg.dataset, cfg.model.spatial_dims)
    print_report(report, console)
    return 1 if report.fatal else 0
