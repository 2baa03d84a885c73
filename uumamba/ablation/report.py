"""The ablation's report from the runs' ``scores.json``: ``ablation.csv``, ``ablation.md``,
``ablation.png`` and ``ablation.json`` in OUTPUT.

Statistics (:mod:`uumamba.evaluation.statistics`):

- per cell and class: the mean Dice over the validation cases of the folds run, with a 95 %
  percentile bootstrap interval over cases; the mean HD95 (mm) over the cases where it is
  defined. With several seeds, each case's score is first averaged over the seeds, so the
  interval is over cases, not over cases x seeds (runs of one case are not independent);
- per case, the foreground mean: the mean over the foreground classes of its (seed-averaged)
  Dice (a class whose Dice is undefined for the case skipped); a cell's "foreground Dice" is
  the mean of that over cases;
- each cell against the reference cell: the mean of the per-case differences of foreground-mean
  Dice (cell - reference) with a paired bootstrap 95 % interval, and the two-sided Wilcoxon
  signed-rank p-value of the same pairs. No correction for multiple comparisons is applied.

Each run's ``scores.json`` is read only after it is checked for that run
(:func:`uumamba.ablation.scores.read_scores`: its cell, seed and fold, the digest of its
configuration, every value in range, one row per validation case and class, the fold's
validation cases of ``OUTPUT/splits.json``), so a report never mixes runs of other settings
or of another split; anything else is a DataError naming the file and the field.

Bootstrap resampling is seeded (:data:`BOOTSTRAP_SEED`), so the same scores give the same
report. Scores are of each run's final weights (``checkpoint_latest.pt``; the best
checkpoint was chosen on the same validation cases) and of the networks' masks without
postprocessing (the largest-component
rule is decided on these very validation cases, which would favour every cell by its own
choice); the postprocessed foreground mean of each run is in ``ablation.json``. With fewer
than :data:`FEW_CASES` cases the report says that its intervals and p-values are not
informative.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uumamba.ablation.grid import Cell
from uumamba.ablation.run import (
    RECORD,
    SPLITS,
    AblationRequest,
    RunTask,
    read_splits,
    tasks_of,
)
from uumamba.ablation.scores import read_json, read_scores
from uumamba.errors import DataError, UserError
from uumamba.evaluation.statistics import (
    N_RESAMPLES,
    Interval,
    bootstrap_mean,
    paired_bootstrap_difference,
    wilcoxon_signed_rank,
)
from uumamba.utils import atomic_path, json_safe

#: Seed of every bootstrap in the report.
BOOTSTRAP_SEED = 0
CSV_COLUMNS = ("cell", "fold", "seed", "case", "class", "dice", "hd95_mm")
FILES = ("ablation.csv", "ablation.md", "ablation.png", "ablation.json")
#: Below this many scored cases, intervals and p-values are flagged as not informative.
FEW_CASES = 10
#: How a cell's foreground Dice is formed (``ablation.json`` ``method``, ``ablation.md``).
FOREGROUND_DICE = ("per case, the mean of its Dice over the foreground classes (background "
                   "excluded; a class whose Dice is undefined for the case skipped), then the "
                   "mean of these per-case values over the cases")
#: What a run's ``postprocessed_foreground_mean_dice`` (``ablation.json`` ``runs``) is.
POSTPROCESSED = ("the run's foreground-mean Dice (mean over the foreground classes of the "
                 "per-class mean over its cases) after "
                 "nnU-Net's largest-connected-component postprocessing, which is chosen on "
                 "these same validation cases, so it is optimistic; for information only, "
                 "not used in any table, interval or test")


def _nanmean(values: np.ndarray, axis: int | None = None) -> Any:
    """NaN-skipping mean; NaN (no warning) where a slice has no finite value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


@dataclass
class CellScores:
    """One cell's scores, cases in the report's order.

    Attributes:
        cell: the cell.
        dice / hd95: shape (n_classes, n_cases), each case's value averaged over seeds (NaN
            where no seed has one).
        foreground: shape (n_cases,), the per-case mean of ``dice`` over classes.
        runs: the runs' ``scores.json`` records.
    """

    cell: Cell
    dice: np.ndarray
    hd95: np.ndarray
    foreground: np.ndarray
    runs: list[dict[str, Any]]


def load_scores(request: AblationRequest) -> tuple[list[str], list[str], list[CellScores]]:
    """Read every run's ``scores.json``, each validated for its run
    (:func:`uumamba.ablation.scores.read_scores`: its cell, seed, fold, the digest of its
    configuration, values in range, one row per validation case and class), and check that
    all runs scored the same split and classes.

    Returns:
        ``(classes, cases, cell scores)``: the foreground class names, the validation case
        ids (folds in ``--folds`` order, ids sorted within a fold) and one
        :class:`CellScores` per cell, in grid order.

    Raises:
        UserError: a run has no ``scores.json`` yet.
        DataError: an unreadable, too large or inconsistent ``scores.json`` or
            ``splits.json`` (naming the file and the field): scores of another run or of
            other settings, scored cases that are not the run's fold's validation cases in
            ``OUTPUT/splits.json``, classes that differ from the other runs'.
    """
    splits = read_splits(request.output / SPLITS, request.base.train.n_folds)
    cases = [c for f in request.folds for c in sorted(splits[f]["val"])]
    position = {c: i for i, c in enumerate(cases)}
    classes: list[str] | None = None
    by_cell: dict[str, list[tuple[RunTask, dict[str, Any]]]] = {}
    for task in tasks_of(request):
        if not task.scores_path.is_file():
            raise UserError(f"{task.name}: not done yet ({task.scores_path} missing); run the "
                            "same command again to finish it")
        scores = read_scores(task.scores_path, cell=task.cell.label, seed=task.seed,
                             fold=task.fold, config_hash=request.run_digest(task.cell, task.seed),
                             val_cases=splits[task.fold]["val"])
        names = list(scores["classes"])
        if classes is None:
            classes = names
        elif names != classes:
            raise DataError(f"{task.scores_path}: classes: {names} differ from the other runs' "
                            f"{classes}")
        by_cell.setdefault(task.cell.label, []).append((task, scores))
    assert classes is not None  # at least one cell, seed and fold
    out = []
    n_seeds = len(request.seeds)
    for cell in request.cells:
        runs = by_cell[cell.label]
        dice = np.full((n_seeds, len(classes), len(cases)), np.nan)
        hd95 = np.full_like(dice, np.nan)
        for task, scores in runs:
            s = request.seeds.index(task.seed)
            for row in scores["per_case"]:
                k, i = classes.index(row["class"]), position[row["case"]]
                dice[s, k, i] = np.nan if row["dice"] is None else row["dice"]
                hd95[s, k, i] = np.nan if row["hd95_mm"] is None else row["hd95_mm"]
        dice_cases, hd95_cases = _nanmean(dice, axis=0), _nanmean(hd95, axis=0)
        out.append(CellScores(cell, dice_cases, hd95_cases, _nanmean(dice_cases, axis=0),
                              [{**scores, "fold": task.fold, "seed": task.seed,
                                "scores_file": str(task.scores_path)} for task, scores in runs]))
    return classes, cases, out


def _interval(values: np.ndarray) -> Interval:
    return bootstrap_mean(values, n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED)


def summarise(request: AblationRequest) -> tuple[dict[str, Any], list[CellScores]]:
    """Every number of the report (what ``ablation.json`` holds) and the per-case scores it
    was computed from.

    Raises:
        UserError / DataError: as :func:`load_scores`.
    """
    classes, cases, scores = load_scores(request)
    by_label = {s.cell.label: s for s in scores}
    ref = by_label[request.reference.label]
    cells = []
    for s in scores:
        hd95 = {}
        for k, name in enumerate(classes):
            finite = s.hd95[k][~np.isnan(s.hd95[k])]
            hd95[name] = {"mean": float(finite.mean()) if finite.size else None,
                          "n": int(finite.size)}
        iterations = [r["iterations"] for r in s.runs]
        seconds = [r["seconds"] for r in s.runs]
        cells.append({
            "label": s.cell.label, "slug": s.cell.slug,
            "settings": {k: v for (k, _), v in zip(s.cell.settings, s.cell.values, strict=True)},
            "plan": "own" if s.cell.plans_itself else "shared",
            "reference": s is ref,
            "dice": {name: _interval(s.dice[k]).to_json() for k, name in enumerate(classes)},
            "foreground_dice": _interval(s.foreground).to_json(),
            "hd95_mm": hd95,
            "iterations_mean": float(np.mean(iterations)), "iterations_min": min(iterations),
            "iterations_max": max(iterations),
            "seconds_mean": float(np.mean(seconds)), "n_runs": len(s.runs),
        })
    comparisons = []
    for s in scores:
        if s is ref:
            continue
        diff = paired_bootstrap_difference(s.foreground, ref.foreground,
                                           n_resamples=N_RESAMPLES, seed=BOOTSTRAP_SEED)
        test = wilcoxon_signed_rank(s.foreground, ref.foreground)
        comparisons.append({
            "cell": s.cell.label, "reference": ref.cell.label,
            "metric": "per-case foreground-mean Dice, cell - reference",
            "difference": diff.to_json(),
            "wilcoxon": {"statistic": test.statistic, "p_value": test.p_value, "n": test.n,
                         "n_nonzero": test.n_nonzero, "note": test.note},
        })
    runs = [{"cell": r["cell"], "fold": r["fold"], "seed": r["seed"],
             "iterations": r["iterations"], "planned_iterations": r["planned_iterations"],
             "seconds": r["seconds"], "stopped_by": r["stopped_by"],
             "precision": r.get("precision"),
             "foreground_mean_dice": r["foreground_mean_dice"],
             "postprocessed_foreground_mean_dice": r.get("postprocessed_foreground_mean_dice"),
             "scores_file": r["scores_file"]}
            for s in scores for r in s.runs]
    record = read_json(request.output / RECORD)
    if not isinstance(record, dict):
        raise DataError(f"{request.output / RECORD}: not an ablation record (expected a JSON "
                        "object)")
    cautions = [] if len(cases) >= FEW_CASES else [
        f"only {len(cases)} case(s) are scored: intervals and p-values from so few cases are "
        "not informative (score more folds with --folds, or use more data)"]
    precisions = sorted({str(r["precision"]) for r in runs})
    if len(precisions) > 1:  # train.amp=auto resolves by machine (bf16 on a CPU with AMX or AVX512-BF16)
        cautions.append(f"the runs trained in different precisions ({', '.join(precisions)}; "
                        "None: not recorded), so their iterations and Dice are not a like "
                        "for like comparison (rerun the cells on one machine, or pin train.amp)")
    caution = "; ".join(cautions) or None
    return {
        "arguments": record, "reference": ref.cell.label, "classes": classes,
        "cases": cases, "n_cases": len(cases), "folds": request.folds, "seeds": request.seeds,
        "minutes": request.minutes, "cells": cells, "comparisons": comparisons, "runs": runs,
        "caution": caution,
        "method": {
            "foreground_dice": FOREGROUND_DICE,
            "interval": f"Efron percentile bootstrap over cases, {N_RESAMPLES} resamples, "
                        f"seed {BOOTSTRAP_SEED}, 95 %",
            "seeds": "a case's score is averaged over seeds before resampling cases",
            "paired": "paired bootstrap of per-case differences (same resampling); "
                      "two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon, zero "
                      "differences dropped); no multiple-comparison correction",
            "scored": "the networks' masks without postprocessing",
            "weights": "each run's final weights (checkpoint_latest.pt), not checkpoint_best.pt "
                       "(chosen by the Dice of the very cases scored)",
            "postprocessed_foreground_mean_dice": POSTPROCESSED,
        },
    }, scores


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _ci(entry: dict[str, Any], digits: int = 3) -> str:
    if entry["estimate"] is None:
        return "n/a"
    return f"{_f(entry['estimate'], digits)} [{_f(entry['low'], digits)}, " \
           f"{_f(entry['high'], digits)}]"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _signed(entry: dict[str, Any]) -> str:
    if entry["estimate"] is None:
        return "n/a"
    return f"{entry['estimate']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def render_markdown(summary: dict[str, Any]) -> str:
    """``ablation.md``: the cells x classes table, the paired comparisons, the runs, the method."""
    classes, args = summary["classes"], summary["arguments"]
    budget = "the configuration's budget" if summary["minutes"] is None \
        else f"{summary['minutes']:g} min per run"
    seeds = summary["seeds"]
    folds = summary["folds"]
    if args["config"] is None:
        config = "the default configuration"
    else:
        resolved = args.get("config_resolved")
        config = f"config `{args['config']}`" + (
            f" (`{resolved}`)" if resolved and resolved != args["config"] else "")
    overrides = " ".join(f"--set {shlex.quote(item)}" for item in args["set"])
    where = (f"the validation cases of fold {folds[0]}" if len(folds) == 1 else
             f"the validation cases of folds {', '.join(map(str, folds))} together")
    lines = [
        f"# Ablation: {len(summary['cells'])} cells, fold{'s' if len(folds) > 1 else ''} "
        f"{', '.join(map(str, folds))}, seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))} ({budget})", "",
        f"Data `{args['data']}`, {config}" + (f" with `{overrides}`" if overrides else "")
        + f"; {summary['n_cases']} validation cases ({where} of one patient-grouped split, the "
        "same for every cell and seed).", "",
    ]
    if summary.get("caution"):
        lines += [f"**Caution:** {summary['caution'][0].upper()}{summary['caution'][1:]}.", ""]
    lines += [
        f"## Dice per class (mean over {summary['n_cases']} cases, 95 % bootstrap interval)",
        "",
    ]
    head = ["cell", *[f"{c} Dice" for c in classes], "foreground Dice",
            *[f"{c} HD95 mm" for c in classes], "iterations", "seconds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in summary["cells"]:
        name = _md(cell["label"]) + (" (reference)" if cell["reference"] else "")
        its = f"{cell['iterations_mean']:.0f}"
        if cell["iterations_min"] != cell["iterations_max"]:
            its += f" ({cell['iterations_min']}-{cell['iterations_max']})"
        row = [name, *[_ci(cell["dice"][c]) for c in classes], _ci(cell["foreground_dice"]),
               *[_f(cell["hd95_mm"][c]["mean"], 2) for c in classes], its,
               f"{cell['seconds_mean']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Iterations and seconds: mean per run (min-max where runs differ); seconds "
              "are each run's training wall time, summed over resumed sessions.", ""]
    lines += [f"## Paired comparison with the reference ({_md(summary['reference'])})", "",
              "Per-case foreground-mean Dice, cell minus reference.", "",
              "| cell | mean difference [95 % CI] | Wilcoxon p | cases |", "|---|---|---|---|"]
    for comp in summary["comparisons"]:
        w = comp["wilcoxon"]
        p = "n/a" if w["p_value"] is None else f"{w['p_value']:.3g}"
        if w["note"]:
            p += f" ({w['note']})"
        lines.append(f"| {_md(comp['cell'])} | {_signed(comp['difference'])} | {p} | "
                     f"{comp['difference']['n']} |")
    if not summary["comparisons"]:
        lines.append("| (one cell only) | | | |")
    lines += ["", "## Runs", "", "| cell | fold | seed | iterations | planned | seconds | "
              "stopped by | precision | foreground Dice |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        lines.append(f"| {_md(r['cell'])} | {r['fold']} | {r['seed']} | {r['iterations']} | "
                     f"{r['planned_iterations']} | {r['seconds']:.0f} | {r['stopped_by']} | "
                     f"{r.get('precision') or '-'} | {_f(r['foreground_mean_dice'])} |")
    own = [c["label"] for c in summary["cells"] if c["plan"] == "own"]
    seed_note = ("With several seeds, a case's Dice (and HD95) is first averaged over the "
                 "seeds; intervals and tests resample cases, never cases x seeds."
                 if len(seeds) > 1 else "One seed: each case is scored once per cell.")
    if not own:
        plan = "the same plan"
    elif len(own) == len(summary["cells"]):
        plan = "a plan of its own (the grid varies a setting the plan is made from)"
    else:
        plan = (f"the shared plan (except {', '.join(map(_md, own))}: they vary a setting the "
                "plan is made from and are planned on their own)")
    lines += ["", "## Method", "",
              f"- Every run trains one fold with the same budget ({budget}), the same split "
              f"and {plan}, then predicts its fold's validation cases from its final weights "
              "(`checkpoint_latest.pt`: `checkpoint_best.pt` was chosen by the Dice of those "
              "same cases); Dice and HD95 come from the code of `uumamba evaluate`, on the "
              "masks without postprocessing.",
              f"- 95 % intervals: Efron's percentile bootstrap over cases ({N_RESAMPLES} "
              f"resamples, seed {BOOTSTRAP_SEED}). {seed_note}",
              "- Paired comparison: paired bootstrap of the per-case differences and the "
              "two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon, zero differences "
              "dropped); no correction for multiple comparisons.",
              f"- Foreground Dice: {FOREGROUND_DICE}. In the runs table it is each run's "
              "mean over the foreground classes of the per-class mean over its cases.",
              "- HD95: mean over the cases where it is defined (both masks non-empty).",
              "- `postprocessed_foreground_mean_dice` (per run, in `ablation.json`): "
              f"{POSTPROCESSED}.", ""]
    return "\n".join(lines)


def _write_csv(path: Path, classes: list[str], scores: list[CellScores]) -> None:
    """One row per cell, fold, seed, case and class (empty cells for undefined values)."""
    with atomic_path(path, durable=True) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for s in scores:
            for run in sorted(s.runs, key=lambda r: (r["fold"], r["seed"])):
                for row in sorted(run["per_case"],
                                  key=lambda r: (r["case"], classes.index(r["class"]))):
                    writer.writerow([s.cell.label, run["fold"], run["seed"], row["case"],
                                     row["class"], "" if row["dice"] is None else row["dice"],
                                     "" if row["hd95_mm"] is None else row["hd95_mm"]])


def _write_png(path: Path, summary: dict[str, Any]) -> None:
    """Grouped bars: per class (and the foreground mean) one bar per cell, bootstrap
    intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*summary["classes"], "foreground"]
    cells = summary["cells"]
    width = 0.8 / len(cells)
    fig, ax = plt.subplots(figsize=(max(6.0, len(groups) * (0.9 + 0.35 * len(cells))), 4.5))
    x = np.arange(len(groups))
    for j, cell in enumerate(cells):
        entries = [*(cell["dice"][c] for c in summary["classes"]), cell["foreground_dice"]]
        est = np.array([np.nan if e["estimate"] is None else e["estimate"] for e in entries])
        low = np.array([np.nan if e["low"] is None else e["low"] for e in entries])
        high = np.array([np.nan if e["high"] is None else e["high"] for e in entries])
        yerr = np.vstack([np.nan_to_num(est - low), np.nan_to_num(high - est)])
        label = cell["label"] + (" (reference)" if cell["reference"] else "")
        ax.bar(x - 0.4 + width * (j + 0.5), np.nan_to_num(est), width, yerr=yerr, capsize=3,
               label=label)
    ax.set_xticks(x, groups)
    ax.set_ylabel("Dice (mean over cases, 95 % bootstrap CI)")
    ax.set_ylim(0.0, 1.05)
    folds = summary["folds"]
    ax.set_title(f"Ablation: {summary['n_cases']} validation cases, fold"
                 f"{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))}")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1,
              frameon=False)
    fig.tight_layout()
    try:
        with atomic_path(path, durable=True) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


def write_report(request: AblationRequest) -> dict[str, Any]:
    """Write ``ablation.csv`` (columns :data:`CSV_COLUMNS`), ``ablation.md``, ``ablation.png``
    and ``ablation.json`` into ``request.output`` (each atomically and durably).

    Returns:
        The summary (``ablation.json``'s content) plus ``files``: the paths written.

    Raises:
        UserError / DataError: as :func:`load_scores` (a run not done, another split, a
            ``scores.json`` that is unreadable, out of range, of another run or of other
            settings); UserError: a file cannot be written (naming ``--output`` and the
            reason).
    """
    summary, scores = summarise(request)
    paths = [request.output / name for name in FILES]
    writing = paths[0]
    try:
        _write_csv(paths[0], summary["classes"], scores)
        writing = paths[1]
        with atomic_path(paths[1], durable=True) as tmp:
            tmp.write_text(render_markdown(summary))
        writing = paths[2]
        _write_png(paths[2], summary)
        writing = paths[3]
        with atomic_path(paths[3], durable=True) as tmp:
            tmp.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise UserError(f"--output {request.output}: cannot write {writing}: "
                        f"{exc.strerror or exc}") from None
    return {**summary, "files": paths}
