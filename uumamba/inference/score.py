"""Predict labelled cases with a :class:`~uumamba.inference.predict.Predictor` and score them
with the code ``uumamba evaluate`` uses (:func:`uumamba.evaluation.evaluate.evaluate_pairs`:
Dice, HD95, NSD and volumes per case and class), raw and with the postprocessing one rule
decides.

Used by ``benchmarks/bench_acdc.py`` (UU-Mamba against a DynUNet on one fold) and
``uumamba ablate`` (every cell of a grid on its folds' validation cases).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
    from uumamba.evaluation.evaluate import _read_labels, evaluate_pairs, write_summary
    from uumamba.evaluation.metrics import label_volumes
    from uumamba.inference.postprocess import apply_postprocessing, determine_postprocessing
    from uumamba.inference.writer import write_prediction

    out_dir = Path(out_dir)
    predictor.postprocessing = None
    preds, seconds = [], []
    for case in cases:
        t0 = time.perf_counter()
        pred = predictor.predict_file(case.images)
        path = write_prediction(pred, case.id, case.images[0], out_dir / "raw", labels)[0]
        seconds.append(time.perf_counter() - t0)
        preds.append((case, pred, path))
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
    result: dict[str, Any] = {"postprocessing": spec, "predict_seconds": seconds}
    for key, pairs in (("raw", pairs_raw), ("postprocessed", pairs_post)):
        result[key] = evaluate_pairs(pairs, labels, tolerance_mm)
        write_summary(result[key], out_dir / key)
    return result
