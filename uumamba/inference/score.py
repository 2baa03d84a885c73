"""Predict labelled cases with a :class:`~uumamba.inference.predict.Predictor` and score them
with the code ``uumamba evaluate`` uses (:func:`uumamba.evaluation.evaluate.evaluate_pairs`:
Dice, HD95, NSD and volumes per case and class), raw and with the postprocessing one rule
decides.

Used by ``benchmarks/bench_acdc.py`` (UU-Mamba against a DynUNet on one fold, their
predictions interleaved case by case) and ``uumamba ablate`` (every cell of a grid on its
folds' validation cases).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from uumamba.data.layouts import Case
from uumamba.inference.predict import Predictor


def predict_and_score(predictor: Predictor, cases: Sequence[Case], out_dir: Path,
                      labels: dict[int, str], tolerance_mm: float) -> dict[str, Any]:
    """Predict every case, score it raw and with postprocessing decided by one rule.

    The predictor's own postprocessing is switched off (``predictor.postprocessing`` is set
    to None); the raw masks go to ``out_dir/raw``. Then
    :func:`~uumamba.inference.postprocess.determine_postprocessing` (nnU-Net's
    largest-component rule) is run on those masks against the references (original grid),
    the chosen filtering is applied and the masks are written to ``out_dir/postprocessed``
    and scored again. The postprocessed score is thus decided on the cases it is measured
    on (as nnU-Net decides it on its cross-validation); the raw score carries no such
    selection.

    Args:
        predictor: the model (or fold ensemble) to run.
        cases: labelled cases (:class:`uumamba.data.layouts.Case`: ``id``, ``images``,
            ``label``).
        out_dir: where the masks and summaries go.
        labels: value -> name (background included), as the model's.
        tolerance_mm: NSD tolerance in mm.

    Writes:
        ``out_dir/{raw,postprocessed}/CASE.<ext>`` and ``CASE_volumes.json``
        (:func:`~uumamba.inference.writer.write_prediction`), and ``summary.json`` +
        ``metrics.csv`` in both folders (:func:`~uumamba.evaluation.evaluate.write_summary`).

    Returns:
        ``{"raw": summary, "postprocessed": summary, "postprocessing": spec,
        "predict_seconds": [s per case: reading, prediction, inversion, writing the raw
        mask]}`` with the summaries of :func:`uumamba.evaluation.evaluate.summarise` (``metric_per_case``
        holds each case's Dice / HD95 per label value).

    Raises:
        UserError / DataError: an unreadable or unsuitable image or reference (named), from
            :meth:`Predictor.predict_file` and :func:`evaluate_pairs`.
    """
    return predict_and_score_side_by_side({"model": predictor}, cases, {"model": out_dir},
                                          labels, tolerance_mm)["model"]


def predict_and_score_side_by_side(predictors: Mapping[str, Predictor], cases: Sequence[Case],
                                   out_dirs: Mapping[str, Path], labels: dict[int, str],
                                   tolerance_mm: float, warmup: bool = False
                                   ) -> dict[str, dict[str, Any]]:
    """:func:`predict_and_score` for several models, their predictions interleaved.

    Case ``i`` is predicted by every model before case ``i + 1``, the order rotated by one
    model per case (two models: alternately first), so that a drift of the machine's speed
    over the run (seen here: up to 30 % within minutes, sequential passes) falls on all of
    them alike and each case's seconds are a paired comparison. With an odd number of cases
    the first model goes first once more than the second (ACDC folds: two phases per
    patient, even). With ``warmup`` each model first predicts the first case once and writes
    its mask to a temporary folder, untimed and discarded (one-off costs: allocator, oneDNN
    primitive creation, numba, the writer's imports), so that no model's first timed case
    carries them.

    A case's seconds are those of :meth:`Predictor.predict_file` (reading, preprocessing,
    sliding window, inversion) and of writing its raw mask; the scoring is not timed.

    Args:
        predictors: name -> model; each one's own postprocessing is switched off (set to
            None, and left so).
        cases: labelled cases, as :func:`predict_and_score`'s.
        out_dirs: name -> output folder, a different one per model (as
            :func:`predict_and_score`'s ``out_dir``).
        labels: value -> name (background included), shared by all models.
        tolerance_mm: NSD tolerance in mm.
        warmup: predict the first case once per model before timing.

    Returns:
        name -> :func:`predict_and_score`'s result; ``predict_seconds`` in the order of
        ``cases`` for every model.

    Raises:
        ValueError: ``out_dirs`` does not name the same models as ``predictors``, or two
            models share a folder (one's raw masks would be scored as the other's).
        UserError / DataError: as :func:`predict_and_score`.
    """
    if set(out_dirs) != set(predictors):
        raise ValueError(f"out_dirs names {sorted(out_dirs)}, predictors {sorted(predictors)}")
    if len({Path(p).resolve() for p in out_dirs.values()}) != len(out_dirs):
        raise ValueError("out_dirs: every model needs its own folder")
    names = list(predictors)
    for predictor in predictors.values():
        predictor.postprocessing = None
    if warmup and cases:
        with tempfile.TemporaryDirectory(prefix="uumamba-warmup-") as scratch:
            for name in names:
                _predict_one(predictors[name], cases[0], Path(scratch) / name, labels)
    predicted: dict[str, list] = {name: [] for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i, case in enumerate(cases):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            entry, wall = _predict_one(predictors[name], case, Path(out_dirs[name]), labels)
            predicted[name].append(entry)
            seconds[name].append(wall)
    return {name: {**_score(predicted[name], Path(out_dirs[name]), labels, tolerance_mm),
                   "predict_seconds": seconds[name]} for name in names}


def _predict_one(predictor: Predictor, case: Case, out_dir: Path, labels: dict[int, str]
                 ) -> tuple[tuple, float]:
    """Predict one case and write its raw mask: ``((case, prediction, path of the raw
    mask), wall seconds of both)``."""
    from uumamba.inference.writer import write_prediction

    t0 = time.perf_counter()
    pred = predictor.predict_file(case.images)
    path = write_prediction(pred, case.id, case.images[0], out_dir / "raw", labels)[0]
    return (case, pred, path), time.perf_counter() - t0


def _score(preds: list[tuple], out_dir: Path, labels: dict[int, str], tolerance_mm: float
           ) -> dict[str, Any]:
    """Decide the postprocessing on one model's raw predictions, apply and write it, and
    score both: :func:`predict_and_score`'s result without ``predict_seconds``."""
    from uumamba.evaluation.evaluate import _read_labels, evaluate_pairs, write_summary
    from uumamba.evaluation.metrics import label_volumes
    from uumamba.inference.postprocess import apply_postprocessing, determine_postprocessing
    from uumamba.inference.writer import write_prediction

    refs = [_read_labels(case.label)[0] for case, _, _ in preds]  # the input's voxel grid
    spec = determine_postprocessing([pred.mask for _, pred, _ in preds], refs, labels)
    pairs_raw, pairs_post = [], []
    for case, pred, path in preds:
        mask = apply_postprocessing(pred.mask, spec)
        counts, volumes = label_volumes(mask, pred.geometry.spacing, labels)
        post = replace(pred, mask=mask, voxel_counts=counts, volumes_ml=volumes)
        written = write_prediction(post, case.id, case.images[0], out_dir / "postprocessed",
                                   labels)
        pairs_raw.append((case.id, path, case.label))
        pairs_post.append((case.id, written[0], case.label))
    result: dict[str, Any] = {"postprocessing": spec}
    for key, pairs in (("raw", pairs_raw), ("postprocessed", pairs_post)):
        result[key] = evaluate_pairs(pairs, labels, tolerance_mm)
        write_summary(result[key], out_dir / key)
    return result
