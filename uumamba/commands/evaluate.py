"""``uumamba evaluate``: score a folder of predictions, write ``summary.json`` + ``metrics.csv``,
print the per-label table and warn about unpaired cases."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from uumamba.config import Config
from uumamba.evaluation.evaluate import evaluate_folders, find_reference_labels, write_summary
from uumamba.utils import check_output_folder


def print_summary(summary: dict[str, Any], title: str = "Evaluation") -> None:
    """Per-label mean Dice / HD95 / NSD / volumes and the foreground mean as a rich table."""
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float, digits: int = 3) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{v:.{digits}f}"

    table = Table(title=f"{title} ({summary['n_cases']} cases, NSD @ "
                        f"{summary['nsd_tolerance_mm']:g} mm)")
    for col in ("label", "Dice", "HD95 (mm)", "NSD", "pred mL", "ref mL"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for value, m in summary["mean"].items():
        table.add_row(
            f"{value} {m['name']}", fmt(m["Dice"]), fmt(m["HD95"], 2), fmt(m["NSD"]),
            fmt(m["volume_pred_ml"], 1), fmt(m["volume_ref_ml"], 1),
        )
    fg = summary["foreground_mean"]
    table.add_row("foreground mean", fmt(fg["Dice"]), fmt(fg["HD95"], 2), fmt(fg["NSD"]), "", "",
                  style="bold")
    Console().print(table)


def evaluate_from_cli(pred_dir: Path, gt_dir: Path, output_dir: Path | None, cfg: Config
                      ) -> dict[str, Any]:
    """Score, write, print.

    Labels come from ``cfg.dataset.labels``, else a ``dataset.json`` in ``gt_dir`` or its
    parent, else the values found. The NSD tolerance is ``cfg.inference.nsd_tolerance_mm``.
    Outputs go to ``output_dir`` (default: ``pred_dir``). Unpaired cases are listed on stderr
    (and in the summary) but do not fail the command.

    Raises:
        UserError / DataError: as :func:`uumamba.evaluation.evaluate.evaluate_folders`;
            UserError when ``output_dir`` exists and is not a folder (checked before scoring).
    """
    labels = cfg.dataset.labels or find_reference_labels(gt_dir)
    if output_dir is not None:
        check_output_folder(output_dir)
    summary = evaluate_folders(pred_dir, gt_dir, labels, cfg.inference.nsd_tolerance_mm)
    json_path, csv_path = write_summary(summary, output_dir or pred_dir)
    print_summary(summary)
    for key, what in (("unmatched_predictions", "prediction(s) have no reference"),
                      ("missing_predictions", "reference case(s) have no prediction")):
        if summary.get(key):
            typer.echo(f"warning: {len(summary[key])} {what} and were not scored: "
                       f"{', '.join(summary[key][:10])}", err=True)
    typer.echo(f"wrote {json_path} and {csv_path}")
    return summary
