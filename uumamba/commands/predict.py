"""``uumamba predict``: a file, or every image of a folder with a progress bar; failures are
listed and the others written, then exit status 1 when any failed.

Beyond one process: under ``torchrun --nproc_per_node N [--nnodes M] -m uumamba.cli predict``
the ranks join one process group (:mod:`uumamba.engine.distributed`: ``gloo`` on CPU,
``nccl`` when the predictor runs on CUDA, ``cuda:LOCAL_RANK``) and share the sorted case list
out round robin (case ``i`` to rank ``i % WORLD_SIZE``,
:func:`uumamba.inference.batch.shard_cases`), so every case is written once, by one rank.
Rank 0 shows one progress bar counting every rank's cases, gathers the ranks' results and
alone prints the summary and writes what belongs to the whole folder (``clinical.json`` /
``.csv``, reports); the other ranks print only their own failures.

Every case predicted gets one line with its seconds per stage (``CASE: 12.3 s (read 0.4,
preprocess 0.3, network 10.2, invert 0.8, postprocess 0.1, write 0.5)``; under torchrun rank
0's cases only), and the same numbers are in its ``CASE_volumes.json`` (``timings_s``). A failure on any rank
makes every rank exit 1. ``--resume`` skips cases whose outputs all exist
(:func:`uumamba.inference.batch.written_volumes`), with one process or several. Multi-node
runs need the model, input and output folders on a filesystem all nodes share.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uumamba.errors import DataError, UserError, cli_text, printable, shown
from uumamba.inference.inputs import check_output_dir, input_cases
from uumamba.inference.writer import OUTPUT_FORMATS

if TYPE_CHECKING:  # torch loads only once the flags are checked
    import torch

    from uumamba.engine.distributed import DistContext, SharedCounter
    from uumamba.inference.batch import BatchResult
    from uumamba.inference.predict import Predictor


def predict_from_cli(model_dir: Path, input_path: Path, output_dir: Path, folds: str | None = None,
                     tta: bool = False, out_format: str | None = None, probabilities: bool = False,
                     uncertainty: bool = False, split_4d: bool = False, device: str = "auto",
                     pairs: Path | None = None, report: bool = False,
                     frame: int | None = None, resume: bool = False,
                     amp: str | None = None, overrides: list[str] | None = None,
                     checkpoint: str = "best") -> list[Path]:
    """Segment a file, a folder of images, or DICOM (a folder of series or a ``.zip``).

    DICOM input (:func:`uumamba.inference.inputs.is_dicom_input`): each series becomes one
    case named ``PatientID_SeriesNumber`` (:mod:`uumamba.dicom.cases`), copied to NIfTI in a
    temporary folder kept until every output is written (one per rank under torchrun);
    ``frame`` picks one temporal position of 4D series (``split_4d`` splits them); a series
    that cannot be read counts as a failed input. Masks default to ``nii.gz``; ``--format
    dcm`` writes DICOM SEG. ``amp`` (``auto`` | ``off``) overrides the model's
    ``inference.amp``; ``overrides`` (``inference.KEY=VALUE``, ``--set``) any of its inference
    settings (:func:`uumamba.config.inference_overrides`, checked here before the model loads).
    ``checkpoint``: ``best`` (``checkpoint_best.pt``, else the latest) or ``latest`` (each
    fold's final weights; :data:`uumamba.model_folder.CHECKPOINT_CHOICES`).
    Otherwise as :func:`_predict_from_cli`.
    """
    from uumamba.config import InferenceConfig, inference_overrides

    overrides = list(overrides or [])
    inference_overrides(InferenceConfig(), overrides)  # a bad key fails before torch loads
    amp = None if amp is None else amp.strip().lower()
    if amp is not None and amp not in ("auto", "off"):
        raise UserError(f"--amp {shown(amp)}: expected auto (bf16 where the device has bf16 "
                        "matrix units) or off (float32)")
    from uumamba.inference.inputs import is_dicom_input

    args = (model_dir, input_path, output_dir, folds, tta, out_format, probabilities,
            uncertainty, split_4d, device, pairs, report)
    if not is_dicom_input(Path(input_path)):
        if frame is not None:
            raise UserError("--frame selects a temporal position of a 4D DICOM series; for "
                            "4D NIfTI use --split-4d")
        return _predict_from_cli(*args, resume=resume, amp=amp, overrides=overrides,
                                 checkpoint=checkpoint)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="uumamba-dicom-") as work:
        return _predict_from_cli(*args, dicom_work=Path(work), frame=frame, resume=resume,
                                 amp=amp, overrides=overrides, checkpoint=checkpoint)


@dataclass(frozen=True)
class _Request:
    """The checked flags of one ``uumamba predict`` (what every rank runs with)."""

    model_dir: Path
    input_path: Path
    output_dir: Path
    folds: str | None
    tta: bool
    out_format: str | None
    probabilities: bool
    uncertainty: bool
    split_4d: bool
    pairs: Path | None
    pair_rows: list | None
    report: bool
    dicom_work: Path | None
    frame: int | None
    resume: bool
    amp: str | None
    overrides: tuple[str, ...] = ()
    checkpoint: str = "best"


def _predict_from_cli(model_dir: Path, input_path: Path, output_dir: Path, folds: str | None = None,
                      tta: bool = False, out_format: str | None = None, probabilities: bool = False,
                      uncertainty: bool = False, split_4d: bool = False, device: str = "auto",
                      pairs: Path | None = None, report: bool = False,
                      dicom_work: Path | None = None, frame: int | None = None,
                      resume: bool = False, amp: str | None = None,
                      overrides: list[str] | None = None,
                      checkpoint: str = "best") -> list[Path]:
    """Segment a file or every image in a folder (:mod:`uumamba.inference.batch`).

    ``tta=False`` means "as the model's config says" (``inference.tta``); ``True`` forces
    mirroring. A file that fails in a folder is reported in one line and skipped; at the end a
    :class:`UserError` summarises the failures (exit status 1). A 4D input with ``split_4d``
    gives one set of outputs per frame, ``CASE_frameNN``.

    ``resume``: a case whose outputs all exist under their final names is not predicted
    again (:func:`uumamba.inference.batch.written_volumes`; its volumes are read back for
    ``clinical.*``), and temporaries of killed writers are removed first (when every rank
    runs on this machine); the summary counts the skipped cases.

    Under torchrun (``WORLD_SIZE`` > 1), see the module docstring: this rank predicts its
    share; rank 0 prints the bar, the summary and writes ``clinical.*``.

    Clinical indices (:func:`uumamba.clinical_report.write_batch_clinical`): when a folder holds both phases of a
    patient (ACDC names + Info.cfg, or ``pairs``), or a 4D series is split (``split_4d``: ED
    and ES from its Info.cfg or its LV volume curve), ``clinical.json`` / ``clinical.csv`` are
    written; ``report`` adds ``PATIENT_report.html`` / ``.png`` per patient.

    Returns:
        Paths written (rank 0 of several: by all ranks; another rank: none).

    Raises:
        UserError: bad model folder / input / format, or at least one input failed.
        SystemExit: status 1 on every rank of several when any input failed on any rank (or
            rank 0's summary raised); rank 0 has printed ``error: ...`` (the summary) first.
    """
    if out_format is not None and out_format.lstrip(".") not in OUTPUT_FORMATS:
        raise UserError(f"--format {out_format}: expected one of {', '.join(OUTPUT_FORMATS)}")
    out_format = out_format.lstrip(".") if out_format else None
    input_path, output_dir = Path(input_path), Path(output_dir)
    check_output_dir(input_path, output_dir)
    pair_rows = None
    if pairs is not None or report:
        from uumamba.clinical import read_pairs_csv

        if input_path.is_file() and not (report and pairs is None and split_4d
                                         and _is_cine(input_path)):
            raise UserError("--pairs / --report need a folder of ED and ES images as --input "
                            "(--report: or one 4D cine with --split-4d)")
        pair_rows = read_pairs_csv(pairs) if pairs is not None else None  # fail before loading
    if dicom_work is not None:
        out_format = out_format or "nii.gz"  # not the temporary copies' uncompressed .nii
    elif out_format == "dcm":
        raise UserError(f"--format dcm needs DICOM input (a folder of series or a .zip); "
                        f"{input_path} is not")
    if input_path.is_file() and dicom_work is None:
        # A bad single file is refused from its header before torch and MONAI load (~5 s);
        # the predictor checks it again with the model's spacing (the resampling cap).
        from uumamba.data.untrusted import check_local_inputs

        check_local_inputs(input_path)
    request = _Request(model_dir, input_path, output_dir, folds, tta, out_format, probabilities,
                       uncertainty, split_4d, pairs, pair_rows, report, dicom_work, frame, resume,
                       amp, tuple(overrides or ()), checkpoint)
    from uumamba.engine import distributed as ddp

    # Under torchrun: one process group (gloo on CPU, nccl on CUDA), each rank on its device
    ctx = ddp.init_distributed(device) if ddp.launched() else ddp.DistContext()
    ok = False
    try:
        written = _predict_in_group(request, ctx, ctx.device if ctx.enabled else device)
        ok = True
        return written
    finally:
        ddp.cleanup(ctx, wait=ok)


def _predict_in_group(r: _Request, ctx: DistContext, device: str | torch.device) -> list[Path]:
    """The part of :func:`_predict_from_cli` after the checks that need no model: load, list
    the cases, predict this rank's share, and (rank 0) summarise and write ``clinical.*``.

    Raises:
        UserError / SystemExit: as :func:`_predict_from_cli`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from uumamba.engine import distributed as ddp
    from uumamba.inference.batch import (
        CaseFailure,
        format_timings,
        merge_results,
        predict_case,
        predict_cases,
        shard_cases,
        written_volumes,
    )
    from uumamba.inference.predict import Predictor

    with ddp.main_rank_logs(ctx, "uumamba"):  # notes about the whole run: rank 0's only
        predictor = Predictor.from_model_dir(r.model_dir, folds=r.folds, device=device,
                                             tta=True if r.tta else None,
                                             checkpoint=r.checkpoint)
        if r.overrides:
            from uumamba.config import inference_overrides

            predictor.inference_cfg = inference_overrides(predictor.inference_cfg,
                                                          list(r.overrides))
        if r.amp is not None:
            predictor.inference_cfg = predictor.inference_cfg.model_copy(update={"amp": r.amp})
        refused: list[str] = []
        if r.dicom_work is not None:
            from uumamba.dicom.cases import materialize_cases

            dicom = materialize_cases(r.input_path, r.dicom_work,
                                      predictor.plans.num_input_channels, frame=r.frame,
                                      split_4d=r.split_4d)
            cases, refused = dicom.cases, dicom.refused
            if not cases:
                raise UserError(f"{r.input_path}: no DICOM series could be read: "
                                + "; ".join(refused))
        else:
            cases = input_cases(r.input_path, predictor.plans.num_input_channels,
                                output_dir=r.output_dir, split_4d=r.split_4d)
            _check_info_cfgs(cases, r.input_path, r.split_4d, predictor.labels)
    options = {"split_4d": r.split_4d, "probabilities": r.probabilities,
               "entropy": r.uncertainty, "out_format": r.out_format,
               # the choice, and the file each fold's weights came from (best falls back)
               "extra": {"model": str(r.model_dir), "checkpoint": r.checkpoint,
                         "checkpoint_files": dict(predictor.checkpoint_files)}}
    # folds, tta, device, precision: predict_case
    if r.out_format == "dcm":  # the SEG's algorithm identification
        from uumamba.model_folder import ModelFolder

        digests = predictor.weights  # of the bytes loaded, not the files on disk now
        options["extra"].update(model_version=ModelFolder.version(digests),
                                weights_sha256={d.fold: d.sha256 for d in digests})
    # one line per message in logs; file and case names are data, never markup
    console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False, emoji=False)
    # one file: its outputs at once; a 4D cine split into frames goes the folder's way, which
    # pairs its frames into a clinical record
    if len(cases) == 1 and r.input_path.is_file() and not refused and not ctx.enabled \
            and not (r.split_4d and _is_cine(cases[0][1][0])):
        case, files = cases[0]
        if r.resume and written_volumes(case, files, r.output_dir, split_4d=r.split_4d,
                                        probabilities=r.probabilities, entropy=r.uncertainty,
                                        out_format=r.out_format) is not None:
            console.print(printable(f"skipped {case}: already written to {r.output_dir} (--resume)"))
            return []
        written = predict_case(predictor, case, files, r.output_dir, **options,
                               on_timings=lambda name, t: console.print(
                                   printable(f"{name}: {format_timings(t)}")))
        console.print(printable(f"wrote {written[0].name} and {len(written) - 1} side file(s) "
                                f"to {r.output_dir} (windows in {predictor.precision})"))
        return written
    if r.resume and ctx.is_main and _all_ranks_here(ctx):
        from uumamba.utils import remove_stale_temporaries

        for stale in remove_stale_temporaries(r.output_dir):
            console.print(printable(f"removed {stale.name}, left in {r.output_dir} by a killed "
                                    "process"))
    ddp.barrier(ctx)  # (resume) no rank writes before the leftovers are gone

    def shown(message: str) -> str:
        """A failure as the user names the input: a DICOM case's temporary NIfTI copy
        becomes ``INPUT: series CASE``."""
        if r.dicom_work is None:
            return message
        for case, files in cases:
            for f in files:
                message = message.replace(str(f), f"{r.input_path}: series {case}")
        return message.replace(str(r.dicom_work), str(r.input_path))

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    counter = ddp.SharedCounter(ctx) if ctx.enabled else None
    # one bar, rank 0's, counting every rank's cases; the other ranks print their failures
    with Progress(*columns, console=console, transient=False,
                  disable=not ctx.is_main) as progress:
        task = progress.add_task("predicting", total=len(cases))

        def timings(name: str, seconds: dict[str, float]) -> None:
            if ctx.is_main:  # rank 0's own cases; every case's are in its CASE_volumes.json
                progress.console.print(printable(f"{name}: {format_timings(seconds)}"))

        def done(_i: int, case: str, failure: str | None) -> None:
            if failure is not None:
                progress.console.print(printable(f"skipped {shown(failure)}"), style="red")
            if counter is None:
                progress.advance(task)
            else:
                counter.add(1)  # rank 0's bar follows the count (_follow)

        with _follow(counter, progress, task, ctx.is_main):
            result = predict_cases(
                predictor, shard_cases(cases, ctx.rank, ctx.world_size), r.output_dir,
                **options, resume=r.resume, on_timings=timings,
                on_start=lambda _i, case: progress.update(task, description=printable(f"predicting {case}")),
                on_done=done)
            if ctx.enabled:  # every rank's result on every rank (waits for the last case)
                result.failures = [CaseFailure(f.case, f.file, shown(f.message))
                                   for f in result.failures]
                result = merge_results(ddp.gather_objects(result, ctx), cases)
        if ctx.enabled:
            progress.update(task, completed=len(cases))
    if not ctx.enabled:
        return _summarise(r, console, predictor, result, len(cases), refused, shown)
    error, written = None, []
    if ctx.is_main:
        try:
            written = _summarise(r, console, predictor, result, len(cases), refused, shown)
        except UserError as exc:
            error = cli_text(exc)
    error = ddp.broadcast_object(error, ctx)
    if error is not None:
        if ctx.is_main:
            print(f"error: {error}", file=sys.stderr, flush=True)
        ddp.barrier(ctx)  # torchrun stops the other ranks once one exits: print first
        raise SystemExit(1)
    return written


def _is_cine(first_file: Path) -> bool:
    """True when ``predict --split-4d`` splits a case whose first input is ``first_file`` into
    frames (its header has four dimensions); False when the header cannot be read (the
    prediction reports that)."""
    from uumamba.inference.batch import output_names

    try:
        return output_names("case", [first_file], split_4d=True) != ["case"]
    except (DataError, OSError):
        return False


def _check_info_cfgs(cases: list[tuple[str, list[Path]]], input_path: Path, split_4d: bool,
                     labels: dict[int, str]) -> None:
    """Read, before any inference, the Info.cfg each ACDC case or cine will be paired by (the
    lookup the clinical records use, :func:`uumamba.clinical.info_cfg_lookup`), so that a
    broken one stops the run before the predictions rather than after them. Nothing is
    checked for a label set without an LV (no clinical record is made then).

    Raises:
        DataError: an Info.cfg breaks a rule of :func:`uumamba.clinical.read_info_cfg`.
    """
    from uumamba.clinical import acdc_patient, cine_patient, info_cfg_lookup, label_roles

    try:
        label_roles(labels)
    except DataError:
        return
    cines = {case: [case] for case, files in cases if split_4d and _is_cine(files[0])}
    lookup = info_cfg_lookup({case: Path(files[0]) for case, files in cases}, input_path, cines)
    patients = {cine_patient(case) if case in cines else acdc_patient(case) for case, _ in cases}
    for patient in sorted(patients - {None}):
        lookup(patient)


def _all_ranks_here(ctx: DistContext) -> bool:
    """True when every rank runs on this machine (so a writer's pid can be checked here)."""
    return not ctx.enabled or os.environ.get("LOCAL_WORLD_SIZE") == str(ctx.world_size)


@contextlib.contextmanager
def _follow(counter: SharedCounter | None, progress: Any, task: Any, show: bool) -> Iterator[None]:
    """Inside: (rank 0 of several) a thread moves the bar to the count of cases done on all
    ranks twice a second, also while this rank predicts a case or waits for the others."""
    if counter is None or not show:
        yield
        return
    import threading

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            progress.update(task, completed=counter.value())

    thread = threading.Thread(target=poll, name="uumamba-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _summarise(r: _Request, console: Any, predictor: Predictor, result: BatchResult,
               n_cases: int, refused: list[str], shown: Callable[[str], str]) -> list[Path]:
    """Print what happened to a folder of cases and write ``clinical.*`` (one process, or
    rank 0 with every rank's ``result``); return every path written.

    Raises:
        UserError: at least one input failed (nothing written for the whole folder); from
            :func:`uumamba.clinical_report.write_batch_clinical`.
    """
    for message in refused:
        console.print(printable(f"skipped {message}"), style="red")
    n_skipped = len(result.skipped)
    if result.failures or refused:
        messages = [printable(m) for m in refused + [shown(f.message) for f in result.failures]]
        n_bad, n_all = len(messages), n_cases + len(refused)
        n_good = n_all - n_bad - n_skipped
        written = (f"{n_good} other{' was' if n_good == 1 else 's were'} written to "
                   f"{r.output_dir}" if n_good else "nothing was written")
        already = f"; {n_skipped} already written, skipped (--resume)" if n_skipped else ""
        raise UserError(f"{n_bad} of {n_all} input(s) failed ({written}{already}): "
                        + "; ".join(messages))
    n_masks = sum(len(names) for case, names in result.outputs.items()
                  if case not in result.skipped)
    frames = f" of {n_cases - n_skipped} input(s), 4D split into frames" \
        if n_masks != n_cases - n_skipped else ""
    if n_skipped:
        console.print(printable(f"wrote {n_masks} prediction(s){frames} to {r.output_dir}; "
                                f"skipped {n_skipped} already written (--resume); windows in "
                                f"{predictor.precision}"))
    else:
        console.print(printable(f"wrote {n_masks} prediction(s){frames} to {r.output_dir} "
                                f"(windows in {predictor.precision})"))
    from uumamba.clinical_report import write_batch_clinical

    cines = {case: names for case, names in result.outputs.items() if names != [case]}
    clinical = write_batch_clinical(result.volumes_ml, result.inputs, predictor.labels,
                                    r.model_dir, predictor.weights, r.input_path,
                                    r.output_dir, r.pair_rows, r.report, r.out_format,
                                    required=r.pairs is not None or r.report, cines=cines,
                                    input_warnings=result.warnings)
    # no notes on scans that are not cardiac phases (a split 4D cine is one)
    if clinical.records or r.pairs is not None or r.report or cines:
        for note in clinical.notes:
            console.print(printable(f"clinical: {note}"))
    if clinical.records:
        pairing = ", ".join(sorted({rec["pairing"] for rec in clinical.records}))
        console.print(printable(
            f"wrote clinical indices of {len(clinical.records)} patient(s) to "
            f"{r.output_dir / 'clinical.csv'} and clinical.json (pairing: {pairing})"
            + (", and one report.html per patient" if r.report else "")))
    return result.written + clinical.written
