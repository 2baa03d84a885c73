"""The FastAPI application: :func:`create_app` assembles the service; ``uumamba serve``.

``create_app(settings)`` builds the per-app state, the lifespan
(:mod:`uumamba_service.lifespan`: model loading in a background thread, job expiry, cleanup),
the error mapping, the middleware, and includes the module-level routers of
:mod:`uumamba_service.routes`. Inference runs on the
:class:`~uumamba_service.worker.InferencePool` threads, never on the event loop.

Status codes: 400 ``Host`` not in ``allowed_hosts``; 401 missing / wrong ``X-API-Key``; 404
unknown or expired job; 408 upload slower than ``upload_timeout_s``; 409 job result not
available (not finished or failed); 413 upload too large, or a header declaring too many
voxels / bytes (also after resampling); 415 not a supported image; 422 unreadable /
truncated / 4D / NaN volume, a refused header (detached data file, implausible spacing, gzip
bomb) and every :class:`uumamba.errors.UserError`; 429 queue full or too many uploads
(``Retry-After``); 503 model not loaded (``Retry-After``) or no room for a work folder; 504
request timeout or inference wall-time cap.

Conventions mirrored: Kubernetes-style ``/healthz`` (liveness) and ``/readyz`` (readiness);
status codes and ``Retry-After`` as RFC 9110; FastAPI's error body ``{"detail": ...}``; the
asynchronous-request pattern of RFC 9110 (202 Accepted with ``Location``, then poll); masks
returned in the input's voxel grid as ``nnUNetv2_predict`` and TotalSegmentator write them.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import JSONResponse

import uumamba
from uumamba.data.untrusted import VolumeTooLarge
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
    # 413 / 408 while the body is still arriving: close the connection rather than drain it
    headers = {"Connection": "close"} if exc.status_code in (408, 413) else None
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


async def _too_large(request: Request, exc: VolumeTooLarge) -> JSONResponse:
    """A header declaring more voxels / bytes than the caps: 413."""
    return JSONResponse({"detail": str(exc)}, status_code=413)


async def _user_error(request: Request, exc: UserError) -> JSONResponse:
    """Every :class:`uumamba.errors.UserError` is the client's input: 422."""
    return JSONResponse({"detail": str(exc)}, status_code=422)


def _store_errors() -> tuple[type[BaseException], ...]:
    """Exception types of an unavailable job store: SQLite (locked past its busy timeout,
    corrupt, disk error) and, when installed, Redis (unreachable, timed out)."""
    import sqlite3

    errors: list[type[BaseException]] = [sqlite3.Error]
    try:
        import redis

        errors.append(redis.exceptions.RedisError)
    except ImportError:
        pass
    return tuple(errors)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The job store failed (locked, corrupt, unreachable): 503 with ``Retry-After``; the
    cause goes to the log only (it may name server paths)."""
    logger.error("job store unavailable", exc_info=exc,
                 extra={"fields": {"error": f"{type(exc).__name__}: {exc}"[:300]}})
    return JSONResponse({"detail": "job store unavailable (busy or unreachable); retry later"},
                        status_code=503, headers={"Retry-After": "5"})


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
                            VolumeTooLarge: _too_large, UserError: _user_error,
                            **{error: _store_unavailable for error in _store_errors()}},
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
                           expose_headers=["X-Request-ID", "Content-Disposition", "Location",
                                           "X-Input-Warnings"])
    if settings.allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    return app


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> list[str]:
    """``Host`` values accepted when ``UUMAMBA_ALLOWED_HOSTS`` is unset: localhost, 127.0.0.1,
    ::1 and the bound ``host``; for a wildcard bind (0.0.0.0, ::) the machine's host name and
    fully qualified name instead of the wildcard."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    if host in ("0.0.0.0", "::", ""):
        hosts += [socket.gethostname(), socket.getfqdn()]
    else:
        hosts.append(host.strip("[]"))
    return list(dict.fromkeys(h for h in hosts if h))


def serve_from_cli(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
                   device: str = "auto", insecure_no_auth: bool = False,
                   state_dir: Path | None = None, broker: str | None = None,
                   run_jobs: bool = True, processes: int = 1) -> None:
    """``uumamba serve``: validate the model folder, then run the app with uvicorn.

    Other settings come from ``UUMAMBA_*`` environment variables (see
    :class:`~uumamba_service.settings.ServiceSettings`). ``UUMAMBA_ALLOWED_HOSTS`` unset:
    :func:`default_allowed_hosts` of ``host``.

    Args:
        insecure_no_auth: allow a non-loopback ``host`` without ``UUMAMBA_API_KEY``.
        state_dir / broker / run_jobs: the job store (see :class:`ServiceSettings`).
        processes: uvicorn worker processes; more than one starts the app in each through
            :func:`app_from_env`, all sharing the job store.

    Raises:
        UserError: one line when the model folder is missing or not a trained model folder,
            a setting from the environment is invalid, the state folder cannot be created,
            or ``host`` is not a loopback address while no API key is set and
            ``insecure_no_auth`` is false.
    """
    import uvicorn

    path = ModelFolder(model_dir).require().root
    settings = ServiceSettings.for_cli(model_dir=path, device=device, run_jobs=run_jobs,
                                       state_dir=state_dir, broker_url=broker)
    ModelFolder(path).require(settings.folds)
    if settings.api_key is None and not is_loopback(host) and not insecure_no_auth:
        raise UserError(f"refusing to serve on {host} without an API key: set UUMAMBA_API_KEY, "
                        "bind 127.0.0.1, or pass --insecure-no-auth")
    if settings.allowed_hosts is None:
        settings = settings.model_copy(update={"allowed_hosts": default_allowed_hosts(host)})
    if settings.broker_url:
        from .redis_queue import check_broker

        check_broker(settings.broker_url)
    else:
        from .jobs import open_state_folder

        open_state_folder(settings).close()  # a one-line UserError for a bad state folder
    configure_logging(library=True)
    logger.info("starting", extra={"fields": {
        "model_dir": str(path), "host": host, "port": port, "device": device,
        "processes": processes, "jobs": settings.broker_url and "redis" or str(settings.resolved_state_dir)}})
    if processes == 1:
        uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_config=None,
                    timeout_graceful_shutdown=10)
        return
    os.environ.update({
        "UUMAMBA_MODEL_DIR": str(path), "UUMAMBA_DEVICE": settings.device,
        "UUMAMBA_RUN_JOBS": str(settings.run_jobs).lower(),
        "UUMAMBA_ALLOWED_HOSTS": ",".join(settings.allowed_hosts or []),
        **({"UUMAMBA_BROKER_URL": settings.broker_url} if settings.broker_url else
           {"UUMAMBA_STATE_DIR": str(settings.resolved_state_dir)}),
    })
    # uvicorn kills a child that does not answer its supervisor's ping within
    # timeout_worker_healthcheck (default 5 s); loading torch and the model under the GIL on a
    # busy machine takes longer, so it would restart the children in a loop.
    uvicorn.run("uumamba_service.app:app_from_env", factory=True, workers=processes, host=host,
                port=port, access_log=False, log_config=None, timeout_graceful_shutdown=10,
                timeout_worker_healthcheck=120)


def app_from_env() -> FastAPI:
    """An app from ``UUMAMBA_*`` variables alone (``UUMAMBA_MODEL_DIR`` required): the factory
    each process of ``uumamba serve --processes N`` (or ``uvicorn --factory --workers N``) runs."""
    configure_logging(library=True)
    return create_app(ServiceSettings())


__all__ = ["ServiceSettings", "create_app", "serve_from_cli"]
