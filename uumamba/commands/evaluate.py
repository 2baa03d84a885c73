"""``uumamba evaluate``: score a folder of predictions, write ``summary.json`` + ``metrics.csv``,
print the per-label table and warn about unpaired cases; with ``--clinical`` also compare the
clinical indices (EDV, ESV, EF, mass) of predictions and references
(:mod:`uumamba.evaluation.agreement`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from uumamba.config import Config
from uumamba.errors import UserError
from uumamba.evaluation.evaluate import (
    evaluate_folders,
    find_prediction_labels,
    find_reference_labels,
    write_summary,
)
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


def print_agreement(result: dict[str, Any]) -> None:
    """Per-index agreement of the clinical indices (n, r, bias, 95 % LoA, MAE) as a table."""
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None, digits: int = 1) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    table = Table(title=f"Clinical indices, predicted vs reference ({result['n_patients']} "
                        "patients)")
    for col in ("index", "n", "r", "bias", "95% LoA", "MAE"):
        table.add_column(col, justify="left" if col == "index" else "right")
    for index, s in result["agreement"].items():
        loa = ("n/a" if s["loa_low"] is None
               else f"[{fmt(s['loa_low'])}, {fmt(s['loa_high'])}]")
        table.add_row(index, str(s["n"]), fmt(s["pearson_r"], 3), fmt(s["bias"]), loa,
                      fmt(s["mae"]))
    Console().print(table)


def clinical_from_cli(pred_dir: Path, gt_dir: Path, output_dir: Path,
                      labels: dict[int, str] | None, pairs: Path | None) -> dict[str, Any]:
    """``--clinical``: indices of predictions and references per patient, their agreement,
    ``clinical_summary.json``, ``clinical_metrics.csv``, ``clinical_agreement.csv``,
    ``clinical_bland_altman.png`` and ``clinical_scatter.png`` in ``output_dir``.

    Raises:
        UserError: no named labels (config or ``dataset.json``), no LV label, no patient with
            both phases; DataError for a bad pairs CSV / Info.cfg / mask.
    """
    from uumamba.evaluation.agreement import evaluate_clinical, write_clinical_evaluation
    from uumamba.evaluation.evaluate import case_files

    if not labels:
        raise UserError("--clinical needs label names (LV, RV, MYO): give --config with "
                        "dataset.labels or put a dataset.json beside the references")
    preds, refs = case_files(pred_dir, gt_dir)
    result = evaluate_clinical(preds, refs, labels, pairs, info_folders=[gt_dir])
    paths = write_clinical_evaluation(result, output_dir)
    print_agreement(result)
    pairings = sorted({p["pairing"] for p in result["patients"]})
    typer.echo(f"pairing of ED and ES (by the references): {', '.join(pairings)}")
    for note in result["notes"]:
        typer.echo(f"warning: {note}", err=True)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))
    return result


def evaluate_from_cli(pred_dir: Path, gt_dir: Path, output_dir: Path | None, cfg: Config,
                      clinical: bool = False, pairs: Path | None = None) -> dict[str, Any]:
    """Score, write, print.

    Labels come from ``cfg.dataset.labels``, else a ``dataset.json`` in ``gt_dir`` or its
    parent, else the ``CASE_volumes.json`` files ``uumamba predict`` wrote beside the
    predictions (the model's labels), else the values found. The NSD tolerance is ``cfg.inference.nsd_tolerance_mm``.
    Outputs go to ``output_dir`` (default: ``pred_dir``). Unpaired cases are listed on stderr
    (and in the summary) but do not fail the command.

    With ``clinical`` the clinical indices are compared too (:func:`clinical_from_cli`;
    ``pairs``: a pairs CSV for layouts other than ACDC).

    Raises:
        UserError / DataError: as :func:`uumamba.evaluation.evaluate.evaluate_folders` and
            :func:`clinical_from_cli`; UserError when ``output_dir`` exists and is not a
            folder (checked before scoring), or ``pairs`` without ``clinical``.
    """
    labels = (cfg.dataset.labels or find_reference_labels(gt_dir)
              or find_prediction_labels(pred_dir))
    if pairs is not None and not clinical:
        raise UserError("--pairs is only used with --clinical")
    if clinical:
        from uumamba.clinical import label_roles, read_pairs_csv

        if not labels:
            raise UserError("--clinical needs label names (LV, RV, MYO): give --config with "
                            "dataset.labels or put a dataset.json beside the references")
        label_roles(labels)  # refuse a label set without LV before scoring anything
        if pairs is not None and not pairs.is_file():
            raise UserError(f"--pairs {pairs}: no such file")
        if pairs is not None:
            read_pairs_csv(pairs)  # a bad pairs CSV fails before anything is scored
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
    if clinical:
        summary["clinical"] = clinical_from_cli(pred_dir, gt_dir, output_dir or pred_dir, labels,
                                                pairs)
    return summary
