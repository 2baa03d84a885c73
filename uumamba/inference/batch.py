"""Segment many cases into one output folder, skipping (and reporting) the ones that fail.

:func:`predict_case` runs the predictor on one case and writes its outputs
(:func:`uumamba.inference.writer.write_prediction`); a 4D input split into frames gives one
set of outputs per frame, ``CASE_frameNN``. :func:`predict_cases` does that for every case of
:func:`uumamba.inference.inputs.input_cases`: a case that fails (unreadable, 4D without
``split_4d``, wrong channel count, NaN voxels ...) is recorded with a one-line reason and the
others are still written, as ``nnUNetv2_predict`` carries on past a bad file.

Beyond one process (``uumamba predict`` under torchrun): :func:`shard_cases` gives each rank
its share of the sorted case list, :func:`written_volumes` tells a case an earlier run already
wrote (``--resume``), and :func:`merge_results` puts the ranks' results back into one, in the
order one process would have produced.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uumamba.errors import DataError, UserError, escape_quoted, printable
from uumamba.inference.predict import Prediction, Predictor
from uumamba.inference.writer import mask_suffix, write_prediction

#: Called before each case with (index, case id) and after it with (index, case id, failure
#: message or None).
CaseHook = Callable[..., None]

#: Called after each output case is written with (output case name, seconds per stage: the
#: prediction's :attr:`~uumamba.inference.predict.Prediction.timings` plus ``write``).
TimingsHook = Callable[[str, dict[str, float]], None]


def format_timings(timings: dict[str, float]) -> str:
    """``12.3 s (read 0.4, preprocess 0.3, network 10.2, invert 0.8, postprocess 0.1, write
    0.5)``: the total and each stage, in the order they ran."""
    stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items())
    return f"{sum(timings.values()):.1f} s ({stages})"



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
    input file; ``outputs``: case id -> its output case names (``CASE``, or ``CASE_frameNN``
    per frame); ``skipped``: case ids found already written (``resume``), whose volumes are
    read back from ``CASE_volumes.json`` into ``volumes_ml``; ``warnings``: output case name
    -> the warnings of its input (:attr:`Prediction.warnings`: blank, another modality ...),
    for the clinical records of the phases they concern."""

    written: list[Path] = field(default_factory=list)
    failures: list[CaseFailure] = field(default_factory=list)
    volumes_ml: dict[str, dict[str, float]] = field(default_factory=dict)
    inputs: dict[str, Path] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    warnings: dict[str, list[str]] = field(default_factory=dict)


def predict_case(predictor: Predictor, case: str, files: Sequence[Path], output_dir: Path, *,
                 split_4d: bool = False, probabilities: bool = False, entropy: bool = False,
                 out_format: str | None = None, extra: dict[str, Any] | None = None,
                 volumes: dict[str, dict[str, float]] | None = None,
                 warnings: dict[str, list[str]] | None = None,
                 on_timings: TimingsHook | None = None) -> list[Path]:
    """Segment one case (one file per channel) and write its outputs; return their paths.

    ``volumes``, when given, receives output case name -> label name -> mL of each mask,
    ``warnings`` output case name -> its input's warnings (each frame's own for a split 4D);
    ``on_timings`` is called with each output case's seconds per stage once it is written.
    Every ``CASE_volumes.json`` records the predictor's ``folds``, ``tta``, ``device`` and
    ``precision`` (what the windows computed in); ``extra`` adds to them or overrides them
    (``uumamba predict``: the model folder, and for a DICOM SEG its version and digests).

    Raises:
        UserError / DataError: from :meth:`Predictor.predict_file` and the writer.
    """
    result = predictor.predict_file(list(files), split_4d=split_4d, probabilities=probabilities,
                                    entropy=entropy)
    items = ([(case, result)] if isinstance(result, Prediction)
             else [(f"{case}_frame{t:02d}", r) for t, r in enumerate(result)])
    extra = {"folds": list(predictor.fold_names), "tta": predictor.tta,
             "device": str(predictor.device), "precision": predictor.precision, **(extra or {})}
    written: list[Path] = []
    for name, pred in items:
        written.extend(write_prediction(pred, name, Path(files[0]), Path(output_dir),
                                        predictor.labels, out_format, extra))
        if volumes is not None:
            volumes[name] = dict(pred.volumes_ml)
        if warnings is not None:
            warnings[name] = list(pred.warnings)
        if on_timings is not None:
            on_timings(name, dict(pred.timings))
    return written


def _one_line(exc: BaseException, file: Path) -> str:
    """The first line of ``exc``'s message, naming ``file``; a line break inside the file's own
    path or name is escaped first, so that it does not cut the reason off."""
    text = escape_quoted(str(exc).strip(), file, file.name)
    name = printable(file.name)
    message = text.splitlines()[0] if text else type(exc).__name__
    # messages from the readers already name the file: do not repeat it
    return message if name in message else f"{name}: {message}"


def predict_cases(predictor: Predictor, cases: Sequence[tuple[str, list[Path]]], output_dir: Path,
                  *, on_start: CaseHook | None = None, on_done: CaseHook | None = None,
                  resume: bool = False, **options: Any) -> BatchResult:
    """:func:`predict_case` for every ``(case id, files)``; failures are collected, not raised.

    Args:
        on_start / on_done: progress hooks (see :data:`CaseHook`). A case skipped by
            ``resume`` gets ``on_done`` (failure None) but no ``on_start``.
        resume: skip a case whose outputs are all written already (:func:`written_volumes`);
            it is listed in ``skipped`` and its volumes are read back.
        options: ``split_4d``, ``probabilities``, ``entropy``, ``out_format``, ``extra``,
            ``on_timings`` as for :func:`predict_case`.

    Returns:
        :class:`BatchResult`; the caller decides what a failure means (``uumamba predict``
        exits 1 after writing the others).
    """
    result = BatchResult()
    check = {k: options[k] for k in ("split_4d", "probabilities", "entropy", "out_format")
             if k in options}
    for i, (case, files) in enumerate(cases):
        earlier: dict[str, list[str]] = {}
        previous = written_volumes(case, files, output_dir, **check,
                                   warnings=earlier) if resume else None
        if previous is not None:
            result.skipped.append(case)
            result.volumes_ml.update(previous)
            result.inputs.update({name: Path(files[0]) for name in previous})
            result.outputs[case] = list(previous)
            result.warnings.update(earlier)
            if on_done is not None:
                on_done(i, case, None)
            continue
        if on_start is not None:
            on_start(i, case)
        failure = None
        try:
            volumes: dict[str, dict[str, float]] = {}
            warnings: dict[str, list[str]] = {}
            result.written.extend(predict_case(predictor, case, files, output_dir,
                                               volumes=volumes, warnings=warnings, **options))
            result.volumes_ml.update(volumes)
            result.warnings.update(warnings)
            result.inputs.update({name: Path(files[0]) for name in volumes})
            result.outputs[case] = list(volumes)
        except (UserError, ValueError, RuntimeError, OSError) as exc:
            failure = CaseFailure(case, Path(files[0]), _one_line(exc, Path(files[0])))
            result.failures.append(failure)
        if on_done is not None:
            on_done(i, case, None if failure is None else failure.message)
    return result


def shard_cases(cases: Sequence[tuple[str, list[Path]]], rank: int, world_size: int
                ) -> list[tuple[str, list[Path]]]:
    """The cases rank ``rank`` of ``world_size`` predicts: case ``i`` of the (sorted) list goes
    to rank ``i % world_size`` (round robin, so neighbours in name order — often one
    patient's phases, or similar sizes — are spread over the ranks).

    The split depends only on the list, never on what an earlier run wrote, so a rerun with
    ``resume`` gives every rank the same cases again. All of them when ``world_size`` is 1.

    Raises:
        ValueError: ``world_size`` < 1 or ``rank`` outside ``0 .. world_size - 1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    return list(cases[rank::world_size])


def output_names(case: str, files: Sequence[Path], split_4d: bool = False) -> list[str]:
    """The output case names :func:`predict_case` gives ``case``: ``[case]``, or with
    ``split_4d`` and a 4D first input (header only) ``CASE_frame00`` .. one per frame.

    Raises:
        DataError: the first input's header cannot be read (only with ``split_4d``).
    """
    if not split_4d:
        return [case]
    from uumamba.data.io import read_geometry

    shape = read_geometry(files[0]).shape
    return [case] if len(shape) != 4 else [f"{case}_frame{t:02d}" for t in range(shape[3])]


def written_volumes(case: str, files: Sequence[Path], output_dir: Path, *,
                    split_4d: bool = False, probabilities: bool = False, entropy: bool = False,
                    out_format: str | None = None,
                    warnings: dict[str, list[str]] | None = None,
                    ) -> dict[str, dict[str, float]] | None:
    """Output case name -> label name -> mL of ``case`` as an earlier run wrote it, or None
    when the case is not completely written (then ``resume`` predicts it again).

    Written means: every file :func:`predict_case` writes with these options exists under
    its final name — the mask, the probabilities / entropy maps when asked for, and
    ``CASE_volumes.json`` (written last), for every frame of a split 4D input. Every output
    is written to a temporary ``.NAME.tmp-PID...`` and renamed onto its name only when
    complete (:func:`uumamba.utils.atomic_path`), so a file under its final name is whole and
    the temporary of a killed run never counts. The volumes come from ``CASE_volumes.json``
    (the values :class:`~uumamba.inference.predict.Prediction` reported); ``warnings``, when
    given, receives each output name's input warnings from the same file (its strings; none
    when it holds no list).

    Never raises: a header or ``CASE_volumes.json`` that cannot be read means "not written"
    (predicting again then reports the problem as usual).
    """
    output_dir = Path(output_dir)
    try:
        names = output_names(case, files, split_4d)
        suffix, fmt = mask_suffix(Path(files[0]), out_format)
    except (UserError, DataError, OSError):
        return None
    map_fmt = fmt or "nrrd"
    volumes: dict[str, dict[str, float]] = {}
    found: dict[str, list[str]] = {}
    for name in names:
        needed = [output_dir / f"{name}{suffix}"]
        needed += [output_dir / f"{name}_probabilities.{map_fmt}"] if probabilities else []
        needed += [output_dir / f"{name}_entropy.{map_fmt}"] if entropy else []
        if not all(p.is_file() for p in needed):
            return None
        try:
            info = json.loads((output_dir / f"{name}_volumes.json").read_text())
            volumes[name] = {label: float(v["volume_ml"]) for label, v in info["labels"].items()}
            listed = info.get("warnings", [])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        found[name] = [w for w in listed if isinstance(w, str)] if isinstance(listed, list) else []
    if warnings is not None:
        warnings.update(found)
    return volumes


def merge_results(results: Sequence[BatchResult], cases: Sequence[tuple[str, list[Path]]]
                  ) -> BatchResult:
    """The shards' results (:func:`shard_cases`) as one, in the order of ``cases``: volumes,
    inputs, failures and skipped cases come out as one process predicting ``cases`` in turn
    would list them (so ``clinical.json`` is the same); ``written`` is each shard's files,
    shard after shard.

    ``inputs`` are taken from ``cases`` (this process's files), not from the shards: a
    DICOM case's NIfTI copy lives in each rank's own temporary folder.
    """
    order = {case: i for i, (case, _files) in enumerate(cases)}
    merged = BatchResult(written=[p for r in results for p in r.written])
    for case, files in cases:
        for r in results:
            for name in r.outputs.get(case, []):
                merged.volumes_ml[name] = r.volumes_ml[name]
                merged.inputs[name] = Path(files[0])
                if name in r.warnings:
                    merged.warnings[name] = list(r.warnings[name])
            if case in r.outputs:
                merged.outputs[case] = list(r.outputs[case])
    merged.failures = sorted((f for r in results for f in r.failures),
                             key=lambda f: order.get(f.case, len(order)))
    merged.skipped = sorted((c for r in results for c in r.skipped),
                            key=lambda c: order.get(c, len(order)))
    return merged
