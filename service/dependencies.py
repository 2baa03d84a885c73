"""FastAPI dependencies of the routes: state, API key, readiness, admission, job lookup.

Declared with ``Depends`` on the routers and handlers of :mod:`uumamba_service.routes`, in
the order they are checked: :func:`require_api_key` (401, on the router), then
:func:`require_ready` (503 with ``Retry-After``), then :func:`reserve_slot` (429 with
``Retry-After``), all before the upload body is read. The quick checks are ``async`` (they run on the event
loop); :func:`get_job` may remove expired job folders, so it runs in the thread pool.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from fastapi import Depends, Request

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


async def reserve_slot(state: ServiceState = Depends(require_ready)) -> AsyncIterator[Slot]:
    """Admit the request into the inference pool, or answer 429 with ``Retry-After``.

    The slot is given back when the request ends unless it was handed to
    :meth:`~uumamba_service.worker.InferencePool.submit` (the pool then gives it back when
    the work ends), so a refused upload or invalid query never keeps a place.
    """
    try:
        slot = state.pool.reserve()
    except QueueFull:
        raise ServiceError(429, f"server busy: {state.pool.capacity} requests already admitted; "
                                "retry later", {"Retry-After": str(state.settings.retry_after_s)}) from None
    try:
        yield slot
    finally:
        if not slot.submitted:
            slot.release()


def get_job(job_id: str, state: ServiceState = Depends(get_state)) -> Job:
    """The job of the path's ``job_id``; 404 when unknown, deleted or expired."""
    job = state.jobs.get(job_id)
    if job is None:
        raise job_not_found(job_id)
    return job


def job_not_found(job_id: str) -> ServiceError:
    """The 404 answer for a job id that is unknown, deleted or expired."""
    return ServiceError(404, f"job {job_id!r} not found (unknown, deleted or expired)")
