"""FastAPI dependencies of the routes: state, API key, readiness, admission, job lookup.

Declared with ``Depends`` on the routers and handlers of :mod:`uumamba_service.routes`, in
the order they are checked: :func:`require_api_key` (401, on the router), then
:func:`require_ready` (503 with ``Retry-After``), both before the upload body is read. The
upload routes then use :func:`upload_admission` (429 before the body: pool full, too many
uploads from the client or in all) and, once the upload is complete and checked,
:func:`admit` (429) for a place in the inference pool. The quick checks are ``async`` (they run on the event
loop); :func:`get_job` may remove expired job folders, so it runs in the thread pool.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator

from fastapi import Depends, Request

from uumamba.errors import shown

from .jobs import Job
from .state import ServiceError, ServiceState
from .worker import QueueFull, Slot


async def get_state(request: Request) -> ServiceState:
    """The app's :class:`ServiceState` (``request.app.state.service``)."""
    return request.app.state.service


async def require_api_key(request: Request, state: ServiceState = Depends(get_state)) -> None:
    """Check ``X-API-Key`` against the configured key in constant time (401 otherwise).

    Read from the headers directly (not a declared header parameter), so the OpenAPI schema
    lists no key parameter on each operation.
    """
    key = state.settings.api_key
    if key is None:
        return
    given = request.headers.get("x-api-key")
    if given is None or not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise ServiceError(401, "missing or wrong X-API-Key header", {"WWW-Authenticate": "ApiKey"})


async def require_ready(state: ServiceState = Depends(get_state)) -> ServiceState:
    """The state once the model is loaded; 503 with ``Retry-After`` while it is not."""
    if state.status != "ready":
        detail = ("model is still loading" if state.status == "loading"
                  else f"model failed to load: {state.load_error}")
        raise ServiceError(503, detail, {"Retry-After": str(state.settings.retry_after_s)})
    return state


def queue_full(state: ServiceState) -> ServiceError:
    """The 429 answer when the inference pool admits no more requests."""
    return ServiceError(429, f"server busy: {state.pool.capacity} requests already admitted; "
                             "retry later", {"Retry-After": str(state.settings.retry_after_s)})


def admit(state: ServiceState) -> Slot:
    """Admit a complete, checked upload into the inference pool, or answer 429.

    The caller gives the slot back unless it was handed to
    :meth:`~uumamba_service.worker.InferencePool.submit` (the pool then gives it back when the
    work ends): ``finally: if not slot.submitted: slot.release()``.

    Raises:
        ServiceError: 429 with ``Retry-After`` when ``workers + max_queue`` are admitted.
    """
    try:
        return state.pool.reserve()
    except QueueFull:
        raise queue_full(state) from None


@contextlib.asynccontextmanager
async def upload_admission(request: Request, state: ServiceState) -> AsyncIterator[None]:
    """Let one upload stream, or answer 429 before its body is read.

    Refused (429 with ``Retry-After``): the inference pool is already full (the upload could
    not be admitted anyway), the client address already streams ``max_uploads_per_client``
    uploads, or ``max_concurrent_uploads`` uploads stream in all. The count is given back when
    the block ends, on every path. Runs on the event loop (no lock needed).
    """
    settings = state.settings
    retry = {"Retry-After": str(settings.retry_after_s)}
    client = request.client.host if request.client else "unknown"
    if state.pool.full:
        raise queue_full(state)
    if state.uploads.get(client, 0) >= settings.max_uploads_per_client:
        raise ServiceError(429, f"too many uploads at once from this client (limit "
                                f"{settings.max_uploads_per_client}); retry later", retry)
    if state.uploads_total >= settings.max_concurrent_uploads:
        raise ServiceError(429, f"server busy: {settings.max_concurrent_uploads} uploads in "
                                "progress; retry later", retry)
    state.uploads[client] = state.uploads.get(client, 0) + 1
    try:
        yield
    finally:
        left = state.uploads.get(client, 1) - 1
        if left > 0:
            state.uploads[client] = left
        else:
            state.uploads.pop(client, None)


def get_job(job_id: str, state: ServiceState = Depends(get_state)) -> Job:
    """The job of the path's ``job_id``; 404 when unknown, deleted or expired."""
    job = state.jobs.get(job_id)
    if job is None:
        raise job_not_found(job_id)
    return job


def job_not_found(job_id: str) -> ServiceError:
    """The 404 answer for a job id that is unknown, deleted or expired (a crafted id is
    quoted cut to 64 characters)."""
    return ServiceError(404, f"job {shown(job_id, 64)} not found (unknown, deleted or expired)")
