"""Asynchronous jobs: in-memory state, private result folders, expiry after ``job_ttl_s``.

A job lives in the server process, not in the client's connection: once ``POST /v1/jobs`` has
answered 202, a client may disconnect and poll later. Each job owns a folder (upload, then
result) removed when the job is deleted, expires, fails, or the server stops. State is lost
on restart (no database: a restarted model server answers 404 and clients resubmit).
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .models import JobState, JobStatus, OutputFormat
from .pipeline import SegmentationOutput
from .worker import CancelToken


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass
class Job:
    """One job's state; mutated only through :class:`JobStore` (under its lock).

    Times are ``time.time()`` seconds; ``expires`` is set when the job finishes.
    """

    id: str
    workdir: Path
    format: OutputFormat
    tta: bool | None
    created: float = field(default_factory=time.time)
    state: JobState = JobState.queued
    stage: str = "queued"
    progress: float = 0.0
    started: float | None = None
    finished: float | None = None
    expires: float | None = None
    error: str | None = None
    output: SegmentationOutput | None = None
    future: Future | None = None
    cancel: CancelToken = field(default_factory=CancelToken)

    def status(self) -> JobStatus:
        """The public view of this job."""
        return JobStatus(
            id=self.id, status=self.state, stage=self.stage, progress=self.progress,
            format=self.format, tta=self.tta, created_at=_utc(self.created),
            started_at=_utc(self.started), finished_at=_utc(self.finished),
            expires_at=_utc(self.expires), error=self.error,
        )


class JobStore:
    """Thread-safe registry of jobs with time-to-live for finished ones.

    Args:
        root: folder under which each job gets ``root/<id>/``.
        ttl_s: seconds a done or failed job is kept after it finished.
    """

    def __init__(self, root: Path, ttl_s: float) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def create(self, fmt: OutputFormat, tta: bool | None) -> Job:
        """Register a queued job with a new random id and an empty work folder.

        Raises:
            OSError: the folder cannot be created (disk full, permissions); nothing is kept.
        """
        job_id = uuid.uuid4().hex
        workdir = self.root / job_id
        workdir.mkdir(parents=True)
        job = Job(id=job_id, workdir=workdir, format=fmt, tta=tta)
        with self._lock:
            self._jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        """The job, or ``None`` when unknown, deleted or expired."""
        self.purge_expired()
        with self._lock:
            return self._jobs.get(job_id)

    def mark(self, job: Job, stage: str, progress: float) -> None:
        """Progress report from the worker: moves a queued job to running."""
        with self._lock:
            if job.state is JobState.queued:
                job.state = JobState.running
                job.started = time.time()
            job.stage = stage
            job.progress = max(job.progress, progress)

    def finish(self, job: Job, output: SegmentationOutput | None, error: str | None) -> None:
        """Record success (``output``) or failure (``error``); start the expiry clock.

        A job deleted while it ran has its folder removed here instead.
        """
        now = time.time()
        with self._lock:
            job.finished = now
            job.expires = now + self.ttl_s
            if error is None:
                job.state, job.stage, job.progress, job.output = JobState.done, "done", 1.0, output
            else:
                job.state, job.stage, job.error = JobState.failed, "failed", error
            orphan = job.id not in self._jobs
        if orphan or error is not None:
            shutil.rmtree(job.workdir, ignore_errors=True)

    def delete(self, job_id: str) -> bool:
        """Forget a job: cancel it if still waiting, remove its folder (now, or when it ends).

        Returns:
            ``False`` when the job is unknown or expired.
        """
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is None:
            return False
        job.cancel.cancel("job deleted")  # a running inference stops within one window batch
        running = job.future is not None and not job.future.cancel() and not job.future.done()
        if not running:
            shutil.rmtree(job.workdir, ignore_errors=True)
        return True

    def purge_expired(self, now: float | None = None) -> int:
        """Delete finished jobs whose ``expires`` has passed; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [j for j in self._jobs.values() if j.expires is not None and j.expires <= now]
            for job in expired:
                del self._jobs[job.id]
        for job in expired:
            shutil.rmtree(job.workdir, ignore_errors=True)
        return len(expired)

    def counts(self) -> dict[str, int]:
        """Number of jobs per state (for /metrics)."""
        counts = {state.value: 0 for state in JobState}
        with self._lock:
            for job in self._jobs.values():
                counts[job.state.value] += 1
        return counts

    def clear(self) -> None:
        """Cancel waiting jobs and remove every job folder (server shutdown)."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            job.cancel.cancel("server stopping")
            if job.future is not None:
                job.future.cancel()
            shutil.rmtree(job.workdir, ignore_errors=True)
