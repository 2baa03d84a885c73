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

from uumamba.model_folder import ModelFolder

from .jobs import open_state_folder, process_id
from .model_info import load_predictor
from .observability import configure_logging, logger
from .runner import STOPPING, RunContext, work_forever
from .settings import ServiceSettings
from .warmup import warm_up


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
    settings = ServiceSettings.for_cli(model_dir=path, state_dir=state_dir, broker_url=broker,
                                       device=device)
    if settings.broker_url:
        from .redis_queue import check_broker

        check_broker(settings.broker_url)  # before loading the model
    ModelFolder(path).require(settings.folds)
    configure_logging(library=True)
    stop = threading.Event()

    if settings.broker_url:
        from .redis_queue import run_worker

        # run_worker listens on its model version's queue and installs its own SIGTERM /
        # SIGINT handlers (warm shutdown)
        return run_worker(path, settings.broker_url, device=settings.device, folds=settings.folds,
                          lease_s=settings.job_lease_s, max_inference_s=settings.max_inference_s,
                          burst=burst, warmup=settings.warmup)

    state_folder = settings.resolved_state_dir
    store = open_state_folder(settings)
    predictor, info = load_predictor(path, settings.folds, settings.device)
    if settings.warmup:
        warm_up(predictor, path)
    ctx = RunContext(predictor, info.labels, info.tta_default, settings.max_inference_s, process_id(),
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
