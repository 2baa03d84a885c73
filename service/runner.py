"""Running stored jobs: claim one, hold its lease, segment it, record the outcome.

Used by the API process (its inference pool runs :func:`run_next` once per submitted job, so
jobs and synchronous requests share ``workers_per_device``) and by ``uumamba worker``
processes (:func:`work_forever`), all against the same :class:`~uumamba_service.jobs.JobStore`.
While a job runs, a heartbeat thread renews its lease every ``store.heartbeat_s`` seconds; when
the store says the job is no longer this worker's (deleted, or lost and re-queued), the
inference is cancelled within one window batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uumamba.errors import UserError
from uumamba.inference.sliding import InferenceCancelled

from .jobs import Job, JobStore
from .observability import logger
from .pipeline import segment_file

#: Cancel reason of a worker that is being stopped: its job is given back, not failed.
STOPPING = "worker stopping"


@dataclass
class RunContext:
    """What running a job needs besides the job.

    Attributes:
        predictor: the loaded predictor (``predict_file``).
        labels: label value -> name (model description). tta_default: the model's TTA default.
        max_inference_s: wall-time cap of one inference (``None``: none).
        owner: this process as a job owner (:func:`uumamba_service.jobs.process_id`).
        model: the model's version (``ModelInfo.version``): only jobs for it are taken.
    """

    predictor: Any
    labels: dict[int, str]
    tta_default: bool
    max_inference_s: float | None
    owner: str
    model: str | None = None


def cancelled_detail(reason: str | None, max_inference_s: float | None) -> str:
    """Why an inference stopped, for a client: the wall-time cap, or the cancel reason."""
    if reason == "wall-time cap" and max_inference_s is not None:
        return f"inference stopped at the wall-time cap of {max_inference_s:g} s (max_inference_s)"
    return f"inference cancelled ({reason})"


def run_job(store: JobStore, job: Job, ctx: RunContext) -> None:
    """Run a job claimed by ``ctx.owner``; never raises: the outcome goes into the store.

    A job cancelled because its worker stops (:data:`STOPPING`) is given back to the queue.
    """
    token = store.running_token(job.id)
    stop_beat = threading.Event()

    def beat() -> None:
        while not stop_beat.wait(store.heartbeat_s):
            try:
                if not store.heartbeat(job.id, ctx.owner):
                    token.cancel("job deleted")
                    return
            except Exception:  # a locked or vanished database: try again at the next beat
                logger.exception("job heartbeat failed", extra={"fields": {"job_id": job.id}})

    beater = threading.Thread(target=beat, name=f"uumamba-lease-{job.id[:8]}", daemon=True)
    beater.start()
    outcome, output, error = "done", None, None
    try:
        if token.is_set():
            raise InferenceCancelled(token.reason or "cancelled")
        token.start(ctx.max_inference_s)
        output = segment_file(
            ctx.predictor, job.input, job.workdir, job.format, job.tta, ctx.labels, ctx.tta_default,
            report=lambda stage, progress: store.mark(job.id, ctx.owner, stage, progress),
            cancel=token, es_upload=job.es_input)
    except InferenceCancelled:
        outcome = "given back" if token.reason == STOPPING else "cancelled"
        error = cancelled_detail(token.reason, ctx.max_inference_s)
    except UserError as exc:
        outcome, error = "failed", str(exc)
    except Exception as exc:
        outcome, error = "crashed", f"internal error ({type(exc).__name__}); see the server log"
        logger.exception("job crashed", extra={"fields": {"job_id": job.id}})
    finally:  # the lease is no longer renewed once the outcome is known
        stop_beat.set()
        beater.join(timeout=5)
    fields = {"job_id": job.id}
    if outcome == "given back":
        store.give_back(job.id, ctx.owner)
        logger.info("job given back", extra={"fields": fields})
        return
    recorded = store.finish(job.id, ctx.owner, output, error)
    if outcome == "done" and not recorded:  # deleted meanwhile, or lost to another worker
        logger.warning("job result discarded: no longer this worker's", extra={"fields": fields})
    elif outcome == "done":
        logger.info("job done", extra={"fields": fields})
    elif outcome == "cancelled":
        logger.info("job cancelled", extra={"fields": {**fields, "reason": token.reason}})
    elif outcome == "failed":
        logger.info("job failed", extra={"fields": {**fields, "error": error}})


def run_next(store: JobStore, ctx: RunContext) -> bool:
    """Claim the oldest queued job and run it; ``False`` when none was waiting."""
    job = store.claim(ctx.owner, ctx.model)
    if job is None:
        return False
    run_job(store, job, ctx)
    return True


def work_forever(store: JobStore, ctx: RunContext, stop: threading.Event, poll_s: float = 0.1,
                 idle_hook: Callable[[], None] | None = None) -> int:
    """The loop of a ``uumamba worker`` process: recover lost jobs, claim, run, until ``stop``.

    Args:
        store: the shared job store.
        ctx: this worker's context.
        stop: set to stop after the current job (a running job is given back by the caller
            cancelling its token with :data:`STOPPING`; see :meth:`JobStore.running_token`).
        poll_s: seconds between looks at an empty queue.
        idle_hook: called each time the queue was found empty (tests, metrics).

    Returns:
        How many jobs this worker ran.
    """
    ran, purged = 0, 0.0
    while not stop.is_set():
        store.reap()
        if run_next(store, ctx):
            ran += 1
            continue
        if time.monotonic() - purged > 5.0:  # expiry is coarse: no write transaction per poll
            store.purge_expired()
            purged = time.monotonic()
        if idle_hook is not None:
            idle_hook()
        stop.wait(poll_s)
    return ran
