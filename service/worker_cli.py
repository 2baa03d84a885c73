"""``uumamba worker``: a process that runs stored jobs, apart from any API process.

With the SQLite store (``--state-dir``, or the model's default state folder) it claims jobs
from the folder that the API processes of this host write (:func:`~uumamba_service.runner.work_forever`);
with ``--broker redis://...`` it is an RQ worker on that Redis
(:func:`uumamba_service.redis_queue.run_worker`), on any machine. SIGTERM / SIGINT stop it
after giving its running job back to the queue (within one window batch).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from pydantic import ValidationError

from uumamba.errors import UserError
from uumamba.model_folder import ModelFolder

from .jobs import open_state_folder, process_id
from .model_info import describe_model
from .observability import configure_logging, logger
from .runner import STOPPING, RunContext, work_forever
from .settings import ServiceSettings
from .warmup import warm_up


def _settings(model_dir: Path, **overrides) -> ServiceSettings:
    try:
        return ServiceSettings(model_dir=model_dir, **{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"UUMAMBA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid service setting: {problems}") from None


def run_worker_from_cli(model_dir: Path, state_dir: Path | None = None, broker: str | None = None,
                        device: str = "auto", burst: bool = False) -> int:
    """Load the model once, then run jobs until stopped (or, with ``burst``, until none waits).

    Other settings (``UUMAMBA_JOB_LEASE_S``, ``UUMAMBA_MAX_INFERENCE_S``, ``UUMAMBA_FOLDS``,
    ...) come from the environment as for ``uumamba serve``.

    Returns:
        How many jobs this worker ran.

    Raises:
        UserError: the model folder is missing or incomplete, a setting is invalid, or the
            state folder cannot be created.
    """
    path = ModelFolder(model_dir).require().root
    settings = _settings(path, state_dir=state_dir, broker_url=broker, device=device)
    if settings.broker_url:
        from .redis_queue import check_broker

        check_broker(settings.broker_url)  # before loading the model
    ModelFolder(path).require(settings.folds)
    configure_logging(library=True)
    stop = threading.Event()

    if settings.broker_url:
        from .redis_queue import queue_for, run_worker

        version = describe_model(path, settings.folds).version

        # run_worker installs its own SIGTERM / SIGINT handlers (warm shutdown)
        return run_worker(path, settings.broker_url, device=settings.device, folds=settings.folds,
                          lease_s=settings.job_lease_s, max_inference_s=settings.max_inference_s,
                          burst=burst, warmup=settings.warmup, queue_name=queue_for(version))

    state_folder = settings.resolved_state_dir
    store = open_state_folder(settings)
    from uumamba.inference.predict import Predictor

    info = describe_model(path, settings.folds)
    folds = [f.removeprefix("fold_") for f in info.folds]
    predictor = Predictor.from_model_dir(path, folds=folds, device=settings.device)
    labels = dict(sorted((getattr(predictor, "labels", None) or info.labels).items()))
    if settings.warmup:
        warm_up(predictor, path)
    ctx = RunContext(predictor, labels, info.tta_default, settings.max_inference_s, process_id(),
                     info.version)

    def on_signal(signum, _frame) -> None:
        stop.set()
        store.cancel_running(STOPPING)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    logger.info("worker started", extra={"fields": {"state_dir": str(state_folder), "owner": ctx.owner,
                                                     "model": info.name, "model_version": info.version,
                                                     "device": str(getattr(predictor, "device", ""))}})
    if burst:
        from .runner import run_next

        ran = 0
        store.reap()
        while not stop.is_set() and run_next(store, ctx):
            ran += 1
    else:
        ran = work_forever(store, ctx, stop)
    logger.info("worker stopped", extra={"fields": {"jobs_run": ran}})
    return ran
