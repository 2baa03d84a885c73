"""``uumamba predict``: a file, or every image of a folder with a progress bar; failures are
listed and the others written, then exit status 1 when any failed."""

from __future__ import annotations

from pathlib import Path

from uumamba.errors import UserError
from uumamba.inference.inputs import check_output_dir, input_cases
from uumamba.inference.writer import OUTPUT_FORMATS


def predict_from_cli(model_dir: Path, input_path: Path, output_dir: Path, folds: str | None = None,
                     tta: bool = False, out_format: str | None = None, probabilities: bool = False,
                     uncertainty: bool = False, split_4d: bool = False, device: str = "auto",
                     pairs: Path | None = None, report: bool = False,
                     frame: int | None = None) -> list[Path]:
    """Segment a file, a folder of images, or DICOM (a folder of series or a ``.zip``).

    DICOM input (:func:`uumamba.inference.inputs.is_dicom_input`): each series becomes one
    case named ``PatientID_SeriesNumber`` (:mod:`uumamba.dicom.cases`), copied to NIfTI in a
    temporary folder kept until every output is written; ``frame`` picks one temporal
    position of 4D series (``split_4d`` splits them); a series that cannot be read counts as a
    failed input. Masks default to ``nii.gz``; ``--format dcm`` writes DICOM SEG. Otherwise
    as :func:`_predict_from_cli`.
    """
    from uumamba.inference.inputs import is_dicom_input

    args = (model_dir, input_path, output_dir, folds, tta, out_format, probabilities,
            uncertainty, split_4d, device, pairs, report)
    if not is_dicom_input(Path(input_path)):
        if frame is not None:
            raise UserError("--frame selects a temporal position of a 4D DICOM series; for "
                            "4D NIfTI use --split-4d")
        return _predict_from_cli(*args)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="uumamba-dicom-") as work:
        return _predict_from_cli(*args, dicom_work=Path(work), frame=frame)


def _predict_from_cli(model_dir: Path, input_path: Path, output_dir: Path, folds: str | None = None,
                      tta: bool = False, out_format: str | None = None, probabilities: bool = False,
                      uncertainty: bool = False, split_4d: bool = False, device: str = "auto",
                      pairs: Path | None = None, report: bool = False,
                      dicom_work: Path | None = None, frame: int | None = None) -> list[Path]:
    """Segment a file or every image in a folder (:mod:`uumamba.inference.batch`).

    ``tta=False`` means "as the model's config says" (``inference.tta``); ``True`` forces
    mirroring. A file that fails in a folder is reported in one line and skipped; at the end a
    :class:`UserError` summarises the failures (exit status 1). A 4D input with ``split_4d``
    gives one set of outputs per frame, ``CASE_frameNN``.

    Clinical indices (:func:`uumamba.clinical_report.write_batch_clinical`): when a folder holds both phases of a
    patient (ACDC names + Info.cfg, or ``pairs``), ``clinical.json`` / ``clinical.csv`` are
    written; ``report`` adds ``PATIENT_report.html`` / ``.png`` per patient.

    Returns:
        Paths written.

    Raises:
        UserError: bad model folder / input / format, or at least one input failed.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if out_format is not None and out_format.lstrip(".") not in OUTPUT_FORMATS:
        raise UserError(f"--format {out_format}: expected one of {', '.join(OUTPUT_FORMATS)}")
    out_format = out_format.lstrip(".") if out_format else None
    input_path, output_dir = Path(input_path), Path(output_dir)
    check_output_dir(input_path, output_dir)
    pair_rows = None
    if pairs is not None or report:
        from uumamba.clinical import read_pairs_csv

        if input_path.is_file():
            raise UserError("--pairs / --report need a folder of ED and ES images as --input")
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
    from uumamba.inference.batch import predict_case, predict_cases
    from uumamba.inference.predict import Predictor

    predictor = Predictor.from_model_dir(model_dir, folds=folds, device=device,
                                         tta=True if tta else None)
    refused: list[str] = []
    if dicom_work is not None:
        from uumamba.dicom.cases import materialize_cases

        dicom = materialize_cases(input_path, dicom_work, predictor.plans.num_input_channels,
                                  frame=frame, split_4d=split_4d)
        cases, refused = dicom.cases, dicom.refused
        if not cases:
            raise UserError(f"{input_path}: no DICOM series could be read: " + "; ".join(refused))
    else:
        cases = input_cases(input_path, predictor.plans.num_input_channels)
    options = {"split_4d": split_4d, "probabilities": probabilities, "entropy": uncertainty,
               "out_format": out_format,
               "extra": {"model": str(model_dir), "folds": predictor.fold_names,
                         "tta": predictor.tta, "device": str(predictor.device)}}
    if out_format == "dcm":  # the SEG's algorithm identification
        from uumamba.model_folder import ModelFolder

        digests = ModelFolder(model_dir).digests(predictor.fold_names)
        options["extra"].update(model_version=ModelFolder.version(digests),
                                weights_sha256={d.fold: d.sha256 for d in digests})
    console = Console(stderr=True)
    if len(cases) == 1 and input_path.is_file() and not refused:
        written = predict_case(predictor, *cases[0], output_dir, **options)
        console.print(f"wrote {written[0].name} and {len(written) - 1} side file(s) to {output_dir}")
        return written
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("predicting", total=len(cases))

        def shown(message: str) -> str:
            """A failure as the user names the input: a DICOM case's temporary NIfTI copy
            becomes ``INPUT: series CASE``."""
            if dicom_work is None:
                return message
            for case, files in cases:
                for f in files:
                    message = message.replace(str(f), f"{input_path}: series {case}")
            return message.replace(str(dicom_work), str(input_path))

        def done(_i: int, case: str, failure: str | None) -> None:
            if failure is not None:
                progress.console.print(f"[red]skipped[/red] {shown(failure)}")  # names the file
            progress.advance(task)

        result = predict_cases(
            predictor, cases, output_dir, **options,
            on_start=lambda _i, case: progress.update(task, description=f"predicting {case}"),
            on_done=done)
    for message in refused:
        console.print(f"[red]skipped[/red] {message}")
    if result.failures or refused:
        messages = refused + [shown(f.message) for f in result.failures]
        n_bad, n_all = len(messages), len(cases) + len(refused)
        n_good = n_all - n_bad
        written = (f"{n_good} other{' was' if n_good == 1 else 's were'} written to {output_dir}"
                   if n_good else "nothing was written")
        raise UserError(f"{n_bad} of {n_all} input(s) failed ({written}): " + "; ".join(messages))
    console.print(f"wrote {len(cases)} prediction(s) to {output_dir}")
    from uumamba.clinical_report import write_batch_clinical

    clinical = write_batch_clinical(result.volumes_ml, result.inputs, predictor.labels,
                                    model_dir, predictor.fold_names, input_path, output_dir,
                                    pair_rows, report, out_format,
                                    required=pairs is not None or report)
    if clinical.records or pairs is not None or report:  # no notes on folders of other scans
        for note in clinical.notes:
            console.print(f"clinical: {note}")
    if clinical.records:
        pairing = ", ".join(sorted({r["pairing"] for r in clinical.records}))
        console.print(f"wrote clinical indices of {len(clinical.records)} patient(s) to "
                      f"{output_dir / 'clinical.csv'} and clinical.json (pairing: {pairing})"
                      + (", and one report.html per patient" if report else ""))
    return result.written + clinical.written
