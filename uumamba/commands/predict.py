"""``uumamba predict``: a file, or every image of a folder with a progress bar; failures are
listed and the others written, then exit status 1 when any failed."""

from __future__ import annotations

from pathlib import Path

from uumamba.errors import UserError
from uumamba.inference.batch import predict_case, predict_cases
from uumamba.inference.inputs import check_output_dir, input_cases
from uumamba.inference.predict import Predictor
from uumamba.inference.writer import OUTPUT_FORMATS


def predict_from_cli(model_dir: Path, input_path: Path, output_dir: Path, folds: str | None = None,
                     tta: bool = False, out_format: str | None = None, probabilities: bool = False,
                     uncertainty: bool = False, split_4d: bool = False, device: str = "auto"
                     ) -> list[Path]:
    """Segment a file or every image in a folder (:mod:`uumamba.inference.batch`).

    ``tta=False`` means "as the model's config says" (``inference.tta``); ``True`` forces
    mirroring. A file that fails in a folder is reported in one line and skipped; at the end a
    :class:`UserError` summarises the failures (exit status 1). A 4D input with ``split_4d``
    gives one set of outputs per frame, ``CASE_frameNN``.

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
    predictor = Predictor.from_model_dir(model_dir, folds=folds, device=device,
                                         tta=True if tta else None)
    cases = input_cases(input_path, predictor.plans.num_input_channels)
    options = {"split_4d": split_4d, "probabilities": probabilities, "entropy": uncertainty,
               "out_format": out_format,
               "extra": {"model": str(model_dir), "folds": predictor.fold_names,
                         "tta": predictor.tta, "device": str(predictor.device)}}
    if len(cases) == 1 and input_path.is_file():
        return predict_case(predictor, *cases[0], output_dir, **options)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("predicting", total=len(cases))

        def done(_i: int, case: str, failure: str | None) -> None:
            if failure is not None:
                progress.console.print(f"[red]skipped[/red] {failure}")  # names the file
            progress.advance(task)

        result = predict_cases(
            predictor, cases, output_dir, **options,
            on_start=lambda _i, case: progress.update(task, description=f"predicting {case}"),
            on_done=done)
    if result.failures:
        n_bad = len(result.failures)
        written = (f"the other {len(cases) - n_bad} were written to {output_dir}"
                   if n_bad < len(cases) else "nothing was written")
        raise UserError(f"{n_bad} of {len(cases)} input(s) failed ({written}): "
                        + "; ".join(f.message for f in result.failures))
    console.print(f"wrote {len(cases)} prediction(s) to {output_dir}")
    return result.written
