"""What one app holds between requests: :class:`ServiceState` and the HTTP error type.

One :class:`ServiceState` per app lives in ``app.state.service``; request handlers reach it
through :func:`uumamba_service.dependencies.get_state`. :class:`ServiceError` is raised by
handlers and dependencies and answered as ``{"detail": ...}`` by the app's exception handler.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jobs import JobStore
from .models import ModelInfo
from .observability import Metrics
from .settings import ServiceSettings
from .worker import InferencePool


class ServiceError(Exception):
    """An HTTP error answer with ``{"detail": ...}`` and optional headers."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


@dataclass
class ServiceState:
    """Everything a request handler needs; one per app (``app.state.service``).

    Attributes:
        settings / pool / metrics: configuration, inference threads, counters.
        predictor, info: the loaded predictor and the ``/v1/model`` description (``None``
            until loaded).
        status: ``loading`` | ``ready`` | ``failed`` (``load_error`` says why).
        device, scan_backend, scan_backend_warning, precision: what ``/readyz`` reports (the
            predictor's ``device``, ``scan_backend``, ``scan_backend_warning``: why mamba-ssm's
            CUDA kernels are not used where wanted, and ``precision``).
        work_root: private temporary folder of this app (synchronous uploads and results),
            removed at shutdown. jobs: the durable job store
            (:class:`~uumamba_service.jobs.JobStore`, or the Redis one with a broker).
            owner: this process as a job owner. run_context: what a job run needs (set once
            the model is loaded). drains: pool tasks submitted to run queued jobs, not yet
            ended (guarded by ``drain_lock``). tasks: lifespan background tasks.
        work_lock: open lock file that marks ``work_root`` as in use (see lifespan).
        decode_gate: bounded semaphore (``max_decoding``) around decoding / checking uploads.
        uploads: uploads streaming now, per client address (``max_uploads_per_client``).
    """

    settings: ServiceSettings
    pool: InferencePool
    metrics: Metrics
    predictor: Any = None
    info: ModelInfo | None = None
    status: str = "loading"  # loading | ready | failed
    load_error: str | None = None
    device: str | None = None
    scan_backend: str | None = None
    scan_backend_warning: str | None = None
    precision: str | None = None
    work_root: Path | None = None
    jobs: JobStore | Any = None
    owner: str = ""
    run_context: Any = None
    drains: int = 0
    drain_lock: threading.Lock = field(default_factory=threading.Lock)
    tasks: list[asyncio.Task] = field(default_factory=list)
    work_lock: Any = None
    decode_gate: asyncio.Semaphore | None = None
    uploads: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.decode_gate is None:
            self.decode_gate = asyncio.BoundedSemaphore(self.settings.max_decoding)

    @property
    def uploads_total(self) -> int:
        """Uploads streaming now, all clients together."""
        return sum(self.uploads.values())
