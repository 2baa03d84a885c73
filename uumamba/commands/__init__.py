"""The ``uumamba`` command line: demo, check-data, train, predict, evaluate, ablate, serve,
export-slicer, export-dicom, pacs — the one place that prints.

This module parses flags (typer) and hands each command to its module in this package
(``train``, ``predict``, ``evaluate``, ``ablate``, ``check``, ``export``, ``demo``; imported
lazily, so ``uumamba --help`` and a missing input fail in a fraction of a second). Those
modules call the library (which returns values or raises and never prints), show progress and
tables, and turn outcomes into exit codes. Library notes and warnings arrive through the
``uumamba`` logger, which every command prints to stdout (:func:`uumamba.logs.print_messages`).
A :class:`uumamba.errors.UserError` becomes one line on stderr and exit status 1 — no
traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from uumamba.errors import UserError, cli_text, printable, shown

#: ``--checkpoint``'s values: ``uumamba.model_folder.CHECKPOINT_CHOICES``' keys (not imported
#: here: that package pulls in MONAI, and ``--help`` stays fast; a test keeps them equal).
CHECKPOINT_CHOICES = ("best", "latest")


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """An option callback refusing a value outside ``choices`` as a usage error (exit 2, the
    value shown cut and escaped), before any file is read."""
    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{shown(value)} is not one of "
                                     f"{', '.join(choices)}")
        return value
    return check

app = typer.Typer(
    name="uumamba",
    help="UU-Mamba cardiovascular segmentation: train, predict, evaluate, serve, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _setup() -> None:
    """Runs before every command: library messages (``uumamba`` logger) go to stdout."""
    from uumamba.logs import print_messages

    print_messages()


def _checks_environment(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` that first refuses a bad ``UUMAMBA_CPU_BF16`` (one line, exit 1), before
    any work: it is read again only where bf16 is chosen, e.g. after a training's first epoch.
    It runs once the command line is parsed, so ``--help``, which exits while parsing, is
    shown whatever the variable holds, and ``--output --help`` is an output folder."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        from uumamba.config import cpu_bf16_override
        from uumamba.errors import ConfigError

        try:
            cpu_bf16_override()
        except ConfigError as exc:
            _fail(str(exc))
        return command(*args, **kwargs)

    return checked


def _fail(message: str) -> None:
    typer.echo(f"error: {printable(message)}", err=True)
    raise typer.Exit(code=1)


def _require(path: Path, flag: str, folder: bool) -> None:
    """Fail fast (before torch / MONAI are imported) when a required input path is missing."""
    if folder and not path.is_dir():
        _fail(f"{flag} {path}: " + ("is not a folder" if path.exists() else "folder not found"))
    if not folder and not path.exists():
        _fail(f"{flag} {path}: no such file or folder")


@app.command("demo")
def demo(
    output: Annotated[Path | None, typer.Option(help="keep the synthetic dataset in OUTPUT/data and the model in OUTPUT/model")] = None,
    minutes: Annotated[float, typer.Option(help="wall-time cap on training in minutes (training "
                                               "normally ends after 600 iterations, well before)")] = 10.0,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
    cases: Annotated[int, typer.Option(help="number of synthetic cases to write")] = 8,
) -> None:
    """Write a synthetic cardiac-MRI-like dataset, train 600 iterations, predict, evaluate, print Dice."""
    from uumamba.commands.demo import demo_from_cli

    demo_from_cli(output=output, minutes=minutes, device=device, n_cases=cases)


@app.command("check-data")
def check_data(
    data: Annotated[Path, typer.Argument(help="dataset folder")],
    config: Annotated[Path | None, typer.Option(help="YAML config (labels, modality, layout)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override KEY=VALUE")] = None,
) -> None:
    """Read every case once and report all problems; exit 1 if any is fatal."""
    from uumamba.commands.check import run_check_data
    from uumamba.config import load_config

    cfg = load_config(config, set_ or [])
    code = run_check_data(data, cfg)
    raise typer.Exit(code=code)


@app.command("train")
def train(
    data: Annotated[Path, typer.Option(help="dataset folder")],
    output: Annotated[Path, typer.Option(help="model folder (runs/NAME)")],
    config: Annotated[Path | None, typer.Option(help="YAML config, e.g. configs/acdc.yaml")] = None,
    fold: Annotated[str, typer.Option(help="fold index or 'all'")] = "0",
    resume: Annotated[bool, typer.Option(help="continue from checkpoint_latest")] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override KEY=VALUE")] = None,
) -> None:
    """Check, plan, split and train one fold (or all data) of a dataset."""
    from uumamba.config import load_config

    _require(data, "--data", folder=True)
    if resume and config is None and (output / "config.yaml").is_file():
        config = output / "config.yaml"  # --resume without --config: the run's own settings
    cfg = load_config(config, set_ or [])
    from uumamba.commands.train import train_from_cli

    train_from_cli(cfg=cfg, data_dir=data, output_dir=output, fold=fold, resume=resume, device=device)


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Option(help="trained model folder")],
    input: Annotated[Path, typer.Option(help="image file, folder of images, or DICOM (folder of series / .zip)")],
    output: Annotated[Path, typer.Option(help="output folder")],
    folds: Annotated[str | None, typer.Option(help="comma-separated folds, default: all present")] = None,
    checkpoint: Annotated[str, typer.Option(callback=_one_of(CHECKPOINT_CHOICES), help="best (checkpoint_best.pt, else the latest) | latest (each fold's final weights, checkpoint_latest.pt: what to score a fold's own validation cases with)")] = "best",
    tta: Annotated[bool, typer.Option(help="mirroring test-time augmentation")] = False,
    format: Annotated[str | None, typer.Option(help="nii.gz | nrrd | mha | seg.nrrd | dcm (DICOM SEG; DICOM input) (default: input's)")] = None,
    probabilities: Annotated[bool, typer.Option(help="also write softmax probabilities")] = False,
    uncertainty: Annotated[bool, typer.Option(help="also write per-voxel predictive entropy")] = False,
    split_4d: Annotated[bool, typer.Option(help="split 4D inputs into frames (CASE_frameNN); each series gets its clinical indices")] = False,
    frame: Annotated[int | None, typer.Option(help="temporal position (0-based) of 4D DICOM series to segment")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
    pairs: Annotated[Path | None, typer.Option(help="CSV case_ED,case_ES,patient pairing the phases for clinical.csv (default: ACDC names + Info.cfg)")] = None,
    report: Annotated[bool, typer.Option("--report", help="also write PATIENT_report.html (mid slices, indices, reference ranges) per patient")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="skip cases whose outputs are already written (an interrupted run)")] = False,
    amp: Annotated[str | None, typer.Option(help="auto (bf16 where the device has bf16 matrix units: a GPU of compute capability 8.0+, a CPU with AMX or AVX512-BF16; fp16 on older GPUs; UUMAMBA_CPU_BF16=0 turns it off on CPUs) | off (float32) (default: the model's inference.amp)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override one of the model's inference settings, e.g. inference.input_check=refuse, inference.overlap=0.5 (repeatable)")] = None,
) -> None:
    """Segment images with a trained model; masks keep the input's geometry (several processes under torchrun)."""
    _require(model, "--model", folder=True)
    _require(input, "--input", folder=False)
    from uumamba.commands.predict import predict_from_cli

    predict_from_cli(
        model_dir=model, input_path=input, output_dir=output, folds=folds, tta=tta,
        out_format=format, probabilities=probabilities, uncertainty=uncertainty,
        split_4d=split_4d, device=device, pairs=pairs, report=report, frame=frame,
        resume=resume, amp=amp, overrides=set_ or [], checkpoint=checkpoint,
    )


@app.command("evaluate")
def evaluate(
    pred: Annotated[Path, typer.Option(help="folder of predicted masks")],
    gt: Annotated[Path, typer.Option(help="folder of reference masks")],
    output: Annotated[Path | None, typer.Option(help="where to write summary.json / metrics.csv (default: PRED)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (labels, NSD tolerance)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override KEY=VALUE")] = None,
    clinical: Annotated[bool, typer.Option("--clinical", help="also compare EDV, ESV, EF and myocardial mass per patient (r, bias, limits of agreement, Bland-Altman plot)")] = False,
    pairs: Annotated[Path | None, typer.Option(help="CSV case_ED,case_ES,patient pairing the phases (default: ACDC names + Info.cfg)")] = None,
) -> None:
    """Dice, HD95 (mm), NSD and volumes per case and class; summary.json + metrics.csv."""
    from uumamba.config import load_config

    _require(pred, "--pred", folder=True)
    _require(gt, "--gt", folder=True)
    cfg = load_config(config, set_ or [])
    from uumamba.commands.evaluate import evaluate_from_cli

    evaluate_from_cli(pred_dir=pred, gt_dir=gt, output_dir=output, cfg=cfg, clinical=clinical,
                      pairs=pairs)


@app.command("ablate")
def ablate(
    data: Annotated[Path, typer.Option(help="dataset folder")],
    output: Annotated[Path, typer.Option(help="ablation folder: runs in OUTPUT/cells/, report "
                                              "in OUTPUT/ablation.{md,csv,png,json}")],
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", help="KEY=V1,V2,... one axis of the grid (repeat for more; any config key; "
                       "values parsed as --set parses them)")] = None,
    config: Annotated[Path | None, typer.Option(help="base YAML config, e.g. configs/acdc_cpu.yaml")] = None,
    minutes: Annotated[float | None, typer.Option(help="training budget of every run "
                                                       "(train.time_limit_minutes; default: "
                                                       "the config's)")] = None,
    folds: Annotated[str, typer.Option(help="comma-separated folds to train and score")] = "0",
    seeds: Annotated[str | None, typer.Option(help="comma-separated train.seed values, one run "
                                                   "each (default: the config's seed)")] = None,
    reference: Annotated[str | None, typer.Option(help="cell to compare with, 'key=value,...' "
                                                       "or its folder name (default: the "
                                                       "first cell)")] = None,
    jobs: Annotated[int, typer.Option(help="runs in parallel (at most the CPU cores)")] = 1,
    threads: Annotated[int | None, typer.Option(help="threads per run (default: cores / "
                                                     "jobs)")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override KEY=VALUE (every cell)")] = None,
) -> None:
    """Train every cell of a grid with the same budget, split and plan; score, compare, report.

    Resumable: finished runs are kept, interrupted ones resume; the same command again only
    rebuilds the report."""
    _require(data, "--data", folder=True)
    from uumamba.commands.ablate import ablate_from_cli

    ablate_from_cli(data=data, output=output, grid=grid or [], config=config,
                    overrides=set_ or [], minutes=minutes, folds=folds, seeds=seeds,
                    reference=reference, device=device, jobs=jobs, threads=threads)


@app.command("serve")
def serve(
    model: Annotated[Path, typer.Option(envvar="UUMAMBA_MODEL", help="trained model folder")],
    host: Annotated[str, typer.Option(envvar="UUMAMBA_HOST", help="address to bind (not loopback: "
                                                                 "needs UUMAMBA_API_KEY)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="UUMAMBA_PORT", help="TCP port")] = 8000,
    device: Annotated[str, typer.Option(envvar="UUMAMBA_DEVICE", help="cpu | cuda | cuda:N | auto")] = "auto",
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth",
        help="allow a non-loopback --host without UUMAMBA_API_KEY (anyone who can reach the "
             "port can upload)")] = False,
    state_dir: Annotated[Path | None, typer.Option(
        envvar="UUMAMBA_STATE_DIR", help="durable job store folder (default: a stable "
                                         "per-user, per-model folder under ~/.local/state; "
                                         "not used with --broker)")] = None,
    broker: Annotated[str | None, typer.Option(
        envvar="UUMAMBA_BROKER_URL", help="redis://HOST:PORT/DB: queue jobs on Redis for "
                                          "'uumamba worker --broker' processes")] = None,
    run_jobs: Annotated[bool, typer.Option(
        "--run-jobs/--no-run-jobs", envvar="UUMAMBA_RUN_JOBS",
        help="run jobs in this process too (--no-run-jobs: only 'uumamba worker' runs them)")] = True,
    processes: Annotated[int, typer.Option(min=1, help="API processes (uvicorn workers) sharing "
                                                       "the job store")] = 1,
) -> None:
    """Serve the model over HTTP (FastAPI + uvicorn); more settings via UUMAMBA_* variables.

    A --host other than loopback needs UUMAMBA_API_KEY (or --insecure-no-auth). Jobs are
    stored durably in --state-dir and survive restarts."""
    from uumamba_service.app import serve_from_cli

    serve_from_cli(model_dir=model, host=host, port=port, device=device,
                   insecure_no_auth=insecure_no_auth, state_dir=state_dir, broker=broker,
                   run_jobs=run_jobs, processes=processes)


@app.command("worker")
def worker(
    model: Annotated[Path, typer.Option(envvar="UUMAMBA_MODEL", help="trained model folder")],
    state_dir: Annotated[Path | None, typer.Option(
        envvar="UUMAMBA_STATE_DIR", help="job store folder shared with 'uumamba serve' on this "
                                         "host (default: the model's default state folder)")] = None,
    broker: Annotated[str | None, typer.Option(
        envvar="UUMAMBA_BROKER_URL", help="redis://HOST:PORT/DB: take jobs from that Redis "
                                          "(any machine) instead of a state folder")] = None,
    device: Annotated[str, typer.Option(envvar="UUMAMBA_DEVICE", help="cpu | cuda | cuda:N | auto")] = "auto",
    burst: Annotated[bool, typer.Option("--burst", help="stop when no job waits")] = False,
) -> None:
    """Run queued service jobs with this model until stopped (SIGTERM gives the running job
    back to the queue).

    Use the API's --model: a worker takes only jobs submitted for its model's version.
    With --broker (Redis, any machine) --state-dir (this host) is not used."""
    from uumamba_service.worker_cli import run_worker_from_cli

    run_worker_from_cli(model, state_dir=state_dir, broker=broker, device=device, burst=burst)


@app.command("export-slicer")
def export_slicer(
    mask: Annotated[Path, typer.Option(help="label map (NIfTI / NRRD / MHA)")],
    reference: Annotated[Path, typer.Option(help="image the mask belongs to")],
    output: Annotated[Path, typer.Option(help="OUT.seg.nrrd")],
    labels: Annotated[str | None, typer.Option(help="'1=RV,2=MYO,3=LV' or a model folder / dataset.json")] = None,
) -> None:
    """Write a 3D Slicer segmentation (.seg.nrrd) with names, colours and terminology."""
    from uumamba.commands.export import export_from_cli

    export_from_cli(mask=mask, reference=reference, output=output, labels=labels)


@app.command("export-dicom")
def export_dicom(
    mask: Annotated[Path, typer.Option(help="label map (NIfTI / NRRD / MHA) on the series' grid")],
    reference_series: Annotated[Path, typer.Option(help="folder of the DICOM series the mask belongs to")],
    output: Annotated[Path, typer.Option(help="OUT.dcm")],
    labels: Annotated[str | None, typer.Option(help="'1=RV,2=MYO,3=LV' or a model folder / dataset.json")] = None,
) -> None:
    """Write a DICOM Segmentation (SEG) referencing the source series, frame by frame."""
    from uumamba.commands.export import export_dicom_from_cli

    _require(mask, "--mask", folder=False)
    _require(reference_series, "--reference-series", folder=True)
    export_dicom_from_cli(mask=mask, reference_series=reference_series, output=output, labels=labels)


@app.command("pacs")
def pacs(
    url: Annotated[str, typer.Option(help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")],
    study: Annotated[str, typer.Option(help="StudyInstanceUID")],
    model: Annotated[Path, typer.Option(help="trained model folder")],
    output: Annotated[Path, typer.Option(help="folder for the masks and SEG files kept locally")],
    series: Annotated[str | None, typer.Option(help="SeriesInstanceUID (default: every image series of the study)")] = None,
    user: Annotated[str | None, typer.Option(envvar="UUMAMBA_PACS_USER", help="HTTP basic user")] = None,
    password: Annotated[str | None, typer.Option(envvar="UUMAMBA_PACS_PASSWORD", help="HTTP basic password")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per HTTP request")] = 60.0,
    frame: Annotated[int | None, typer.Option(help="temporal position of 4D series")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
) -> None:
    """Retrieve a series from a PACS (WADO-RS), segment it, store the DICOM SEG back (STOW-RS)."""
    _require(model, "--model", folder=True)
    from uumamba.commands.pacs import pacs_from_cli

    pacs_from_cli(url=url, study=study, series=series, model_dir=model, output_dir=output,
                  user=user, password=password, timeout=timeout, frame=frame, device=device)


for _info in app.registered_commands:  # every command, as registered above
    _info.callback = _checks_environment(_info.callback)


def main() -> None:
    """Console-script entry point: run the app, turning UserError into a one-line message."""
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {cli_text(exc)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
