"""The FastAPI application: :func:`create_app` assembles the service; ``uumamba serve``.

``create_app(settings)`` builds the per-app state, the lifespan
(:mod:`uumamba_service.lifespan`: model loading in a background thread, job expiry, cleanup),
the error mapping, the middleware, and includes the module-level routers of
:mod:`uumamba_service.routes`. Inference runs on the
:class:`~uumamba_service.worker.InferencePool` threads, never on the event loop.

Status codes: 401 missing / wrong ``X-API-Key``; 404 unknown or expired job; 409 job result
not available (not finished or failed); 413 upload too large; 415 not a supported image;
422 unreadable / truncated / 4D / NaN volume and every :class:`uumamba.errors.UserError`;
429 queue full (``Retry-After``); 503 model not loaded (``Retry-After``); 504 request timeout.

Conventions mirrored: Kubernetes-style ``/healthz`` (liveness) and ``/readyz`` (readiness);
status codes and ``Retry-After`` as RFC 9110; FastAPI's error body ``{"detail": ...}``; the
asynchronous-request pattern of RFC 9110 (202 Accepted with ``Location``, then poll); masks
returned in the input's voxel grid as ``nnUNetv2_predict`` and TotalSegmentator write them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

import uumamba
from uumamba.errors import UserError
from uumamba.model_folder import ModelFolder

from .lifespan import service_lifespan
from .observability import Metrics, RequestContextMiddleware, configure_logging, logger
from .routes import docs_router, health_router, router
from .settings import ServiceSettings
from .state import ServiceError, ServiceState
from .uploads import UploadRejected
from .worker import InferencePool


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    """``{"detail"}`` with the error's status and headers."""
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _upload_rejected(request: Request, exc: UploadRejected) -> JSONResponse:
    """``{"detail"}`` with the upload's status; a 413 closes the connection."""
    # 413 while the body is still arriving: close the connection rather than drain it
    headers = {"Connection": "close"} if exc.status_code == 413 else None
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


async def _user_error(request: Request, exc: UserError) -> JSONResponse:
    """Every :class:`uumamba.errors.UserError` is the client's input: 422."""
    return JSONResponse({"detail": str(exc)}, status_code=422)


def _new_state(settings: ServiceSettings) -> ServiceState:
    """The state of one app, with the metrics' gauges reading it at scrape time."""
    metrics = Metrics()
    pool = InferencePool(settings.workers_per_device, settings.max_queue)
    state = ServiceState(settings=settings, pool=pool, metrics=metrics)
    metrics.add_gauge("uumamba_queue_depth", "Admitted requests waiting for a worker.", lambda: pool.queued)
    metrics.add_gauge("uumamba_inferences_running", "Inferences running now.", lambda: pool.running)
    metrics.add_gauge("uumamba_model_ready", "1 when the model is loaded.", lambda: int(state.status == "ready"))
    metrics.add_gauge("uumamba_jobs", "Jobs held, by state.",
                      lambda: state.jobs.counts() if state.jobs else {}, label="state")
    return state


def create_app(settings: ServiceSettings, predictor: Any = None) -> FastAPI:
    """Build the service.

    Args:
        settings: service settings (model folder, device, limits, key, CORS).
        predictor: an already loaded predictor (tests, embedding); ``None`` loads
            ``Predictor.from_model_dir(settings.model_dir, folds, device)`` in the background
            at startup. The model folder is described (labels, hashes) either way.

    Returns:
        The FastAPI app; start it with uvicorn (or ``with TestClient(app)``, which runs the
        lifespan).
    """
    configure_logging()
    state = _new_state(settings)
    protected_docs = settings.api_key is not None
    app = FastAPI(
        title="uumamba segmentation service",
        version=uumamba.__version__,
        description="Cardiovascular segmentation with UU-Mamba (Tsai et al. 2024). Upload a 3D "
                    "volume (NIfTI, NRRD, MetaImage); get the label map in the upload's geometry, "
                    "a 3D Slicer segmentation, or per-class volumes in mL.",
        lifespan=functools.partial(service_lifespan, predictor=predictor),
        openapi_url=None if protected_docs else "/openapi.json",
        docs_url=None if protected_docs else "/docs",
        redoc_url=None if protected_docs else "/redoc",
        exception_handlers={ServiceError: _service_error, UploadRejected: _upload_rejected,
                            UserError: _user_error},
    )
    app.state.service = state
    app.include_router(health_router)
    if protected_docs:
        app.include_router(docs_router)
    app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key", "X-Request-ID", "Content-Type"],
                           expose_headers=["X-Request-ID", "Content-Disposition", "Location"])
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    return app


def serve_from_cli(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
                   device: str = "auto") -> None:
    """``uumamba serve``: validate the model folder, then run the app with uvicorn.

    Other settings come from ``UUMAMBA_*`` environment variables (see
    :class:`~uumamba_service.settings.ServiceSettings`).

    Raises:
        UserError: one line when the model folder is missing or not a trained model folder,
            or a setting from the environment is invalid.
    """
    import uvicorn
    from pydantic import ValidationError

    path = ModelFolder(model_dir).require().root
    try:
        settings = ServiceSettings(model_dir=path, device=device)
    except ValidationError as exc:
        problems = "; ".join(f"UUMAMBA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid service setting: {problems}") from None
    ModelFolder(path).require(settings.folds)
    configure_logging()
    logger.info("starting", extra={"fields": {"model_dir": str(path), "host": host, "port": port,
                                               "device": device}})
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_config=None,
                timeout_graceful_shutdown=10)


__all__ = ["ServiceSettings", "create_app", "serve_from_cli"]
