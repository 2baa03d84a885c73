"""Segment many cases into one output folder, skipping (and reporting) the ones that fail.

:func:`predict_case` runs the predictor on one case and writes its outputs
(:func:`uumamba.inference.writer.write_prediction`); a 4D input split into frames gives one
set of outputs per frame, ``CASE_frameNN``. :func:`predict_cases` does that for every case of
:func:`uumamba.inference.inputs.input_cases`: a case that fails (unreadable, 4D without
``split_4d``, wrong channel count, NaN voxels ...) is recorded with a one-line reason and the
others are still written, as ``nnUNetv2_predict`` carries on past a bad file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uumamba.errors import UserError
from uumamba.inference.predict import Prediction, Predictor
from uumamba.inference.writer import write_prediction

#: Called before each case with (index, case id) and after it with (index, case id, failure
#: message or None).
CaseHook = Callable[..., None]


@dataclass
class CaseFailure:
    """One case that was skipped: its id, first input file and a one-line reason that names
    the file."""

    case: str
    file: Path
    message: str


@dataclass
class BatchResult:
    """Outcome of :func:`predict_cases`: files written and cases skipped.

    ``volumes_ml``: output case name -> foreground label name -> mL of its mask (what
    :mod:`uumamba.clinical` pairs ED with ES from); ``inputs``: output case name -> its first
    input file."""

    written: list[Path] = field(default_factory=list)
    failures: list[CaseFailure] = field(default_factory=list)
    volumes_ml: dict[str, dict[str, float]] = field(default_factory=dict)
    inputs: dict[str, Path] = field(default_factory=dict)


def predict_case(predictor: Predictor, case: str, files: Sequence[Path], output_dir: Path, *,
                 split_4d: bool = False, probabilities: bool = False, entropy: bool = False,
                 out_format: str | None = None, extra: dict[str, Any] | None = None,
                 volumes: dict[str, dict[str, float]] | None = None) -> list[Path]:
    """Segment one case (one file per channel) and write its outputs; return their paths.

    ``volumes``, when given, receives output case name -> label name -> mL of each mask.

    Raises:
        UserError / DataError: from :meth:`Predictor.predict_file` and the writer.
    """
    result = predictor.predict_file(list(files), split_4d=split_4d, probabilities=probabilities,
                                    entropy=entropy)
    items = ([(case, result)] if isinstance(result, Prediction)
             else [(f"{case}_frame{t:02d}", r) for t, r in enumerate(result)])
    written: list[Path] = []
    for name, pred in items:
        written.extend(write_prediction(pred, name, Path(files[0]), Path(output_dir),
                                        predictor.labels, out_format, extra))
        if volumes is not None:
            volumes[name] = dict(pred.volumes_ml)
    return written


def _one_line(exc: BaseException, file: Path) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # messages from the readers already name the file: do not repeat it
    return message if file.name in message else f"{file.name}: {message}"


def predict_cases(predictor: Predictor, cases: Sequence[tuple[str, list[Path]]], output_dir: Path,
                  *, on_start: CaseHook | None = None, on_done: CaseHook | None = None,
                  **options: Any) -> BatchResult:
    """:func:`predict_case` for every ``(case id, files)``; failures are collected, not raised.

    Args:
        on_start / on_done: progress hooks (see :data:`CaseHook`).
        options: ``split_4d``, ``probabilities``, ``entropy``, ``out_format``, ``extra`` as
            for :func:`predict_case`.

    Returns:
        :class:`BatchResult`; the caller decides what a failure means (``uumamba predict``
        exits 1 after writing the others).
    """
    result = BatchResult()
    for i, (case, files) in enumerate(cases):
        if on_start is not None:
            on_start(i, case)
        failure = None
        try:
            volumes: dict[str, dict[str, float]] = {}
            result.written.extend(predict_case(predictor, case, files, output_dir,
                                               volumes=volumes, **options))
            result.volumes_ml.update(volumes)
            result.inputs.update({name: Path(files[0]) for name in volumes})
        except (UserError, ValueError, RuntimeError, OSError) as exc:
            failure = CaseFailure(case, Path(files[0]), _one_line(exc, Path(files[0])))
            result.failures.append(failure)
        if on_done is not None:
            on_done(i, case, None if failure is None else failure.message)
    return result
