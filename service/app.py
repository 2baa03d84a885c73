"""The FastAPI application: routes, model loading, error mapping, and ``uumamba serve``.

``create_app(settings)`` returns an app whose lifespan loads the model in a background thread
(``/readyz`` answers 503 until it is loaded), starts the job-expiry sweeper, and on shutdown
cancels waiting work and removes every temporary file. Inference runs on the
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

import asyncio
import contextlib
import hmac
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

import uumamba
from uumamba.errors import UserError

from .jobs import Job, JobStore
from .model_info import describe_model, validate_model_dir
from .models import (
    ErrorResponse,
    Health,
    JobCreated,
    JobState,
    JobStatus,
    ModelInfo,
    OutputFormat,
    Readiness,
    VolumeSummary,
)
from .observability import Metrics, RequestContextMiddleware, configure_logging, logger
from .pipeline import MEDIA_TYPES, SegmentationOutput, check_volume, segment_file
from .settings import ServiceSettings
from .uploads import ReceivedUpload, UploadRejected, receive_upload
from .worker import InferencePool, QueueFull, Slot


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
        device, scan_backend: what ``/readyz`` reports.
        work_root: private temporary folder of this app (uploads, results), removed at
            shutdown. jobs: the job store. tasks: lifespan background tasks.
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
    work_root: Path | None = None
    jobs: JobStore | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    def require_ready(self) -> None:
        """Raise 503 with ``Retry-After`` while the model is not loaded."""
        if self.status != "ready":
            detail = "model is still loading" if self.status == "loading" else f"model failed to load: {self.load_error}"
            raise ServiceError(503, detail, {"Retry-After": str(self.settings.retry_after_s)})


# ---------------------------------------------------------------- model loading

def _load_model(state: ServiceState, predictor: Any) -> None:
    """Describe the model folder, build the predictor (unless given), find device and backend."""
    settings = state.settings
    info = describe_model(settings.model_dir, settings.folds)
    if predictor is None:
        from uumamba.inference.predict import Predictor

        folds = [f.removeprefix("fold_") for f in info.folds]
        predictor = Predictor.from_model_dir(settings.model_dir, folds=folds, device=settings.device)
    labels = getattr(predictor, "labels", None)
    if labels:  # the predictor's names (dataset.json) win over the plan's
        info = info.model_copy(update={"labels": dict(sorted(labels.items()))})
    if settings.warmup:
        _warm_up(predictor, settings.model_dir, state.work_root)
    device = str(getattr(predictor, "device", settings.device))
    state.device = device
    state.scan_backend = _scan_backend(predictor, settings.model_dir, device)
    state.info = info
    state.predictor = predictor
    state.status = "ready"


def _warm_up(predictor: Any, model_dir: Path, work_root: Path) -> None:
    """Segment one noise volume of the patch size at the target spacing (result discarded)."""
    import nibabel as nib
    import numpy as np

    from uumamba.data.plan import Plans

    plans = Plans.load(model_dir / "plans.json")
    shape = list(plans.patch_size)
    if plans.spatial_dims == 2:
        shape.insert(plans.slice_axis, 2)
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    path = work_root / "warmup.nii.gz"
    try:
        nib.save(nib.Nifti1Image(volume, np.diag([*plans.target_spacing, 1.0])), str(path))
        start = time.perf_counter()
        predictor.predict_file(path)
        logger.info("warm-up done", extra={"fields": {"seconds": round(time.perf_counter() - start, 3),
                                                       "shape": shape}})
    finally:
        path.unlink(missing_ok=True)


def _scan_backend(predictor: Any, model_dir: Path, device: str) -> str | None:
    """The predictor's selective-scan backend, else what ``resolve_scan_backend`` picks."""
    backend = getattr(predictor, "scan_backend", None)
    if backend:
        return str(backend)
    try:
        from uumamba.config import load_config
        from uumamba.nn import resolve_scan_backend

        return resolve_scan_backend(load_config(model_dir / "config.yaml").model.scan_backend, device)
    except Exception as exc:  # informational only; readiness does not depend on it
        logger.warning("scan backend unknown", extra={"fields": {"error": str(exc)}})
        return None


async def _load_in_background(state: ServiceState, predictor: Any) -> None:
    try:
        await asyncio.to_thread(_load_model, state, predictor)
        logger.info("model loaded", extra={"fields": {
            "model": state.info.name, "version": state.info.version, "device": state.device,
            "scan_backend": state.scan_backend, "folds": state.info.folds}})
    except Exception as exc:
        state.status = "failed"
        state.load_error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        logger.error("model failed to load", exc_info=not isinstance(exc, UserError),
                     extra={"fields": {"error": state.load_error}})


async def _expire_jobs(jobs: JobStore, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        n = jobs.purge_expired()
        if n:
            logger.info("jobs expired", extra={"fields": {"count": n}})


# ---------------------------------------------------------------- dependencies

def _state(request: Request) -> ServiceState:
    return request.app.state.service


def _require_api_key(request: Request) -> None:
    """Check ``X-API-Key`` against the configured key in constant time (401 otherwise)."""
    key = _state(request).settings.api_key
    if key is None:
        return
    given = request.headers.get("x-api-key")
    if given is None or not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise ServiceError(401, "missing or wrong X-API-Key header", {"WWW-Authenticate": "ApiKey"})


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("Missing or wrong `X-API-Key` (only when the server has a key)."),
    413: _error("Upload larger than `max_upload_mb`; refused before the body is buffered."),
    415: _error("Not multipart/form-data, unknown extension, or content that is not the format "
                "the extension names."),
    422: _error("Unreadable, truncated, empty, 2D / 4D or NaN-filled volume, malformed form, or "
                "a refused option; `detail` names the problem."),
    429: _error("Queue full; retry after `Retry-After` seconds."),
    503: _error("Model not loaded yet (or failed to load); retry after `Retry-After` seconds."),
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {
                "type": "string", "format": "binary",
                "description": "One 3D volume: .nii, .nii.gz, .nrrd or .mha. The name only "
                               "decides the format; it is never used as a path."}},
        }}},
    }
}

_FILE_CONTENT = {
    "application/gzip": {"schema": {"type": "string", "format": "binary"},
                         "example": "(binary NIfTI label map, format=nii.gz)"},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "example": "(binary 3D Slicer .seg.nrrd, format=seg.nrrd)"},
}

_FORMAT_QUERY = Query(OutputFormat.nii_gz, description="Output: `nii.gz` label map (default), "
                      "`seg.nrrd` 3D Slicer segmentation, or `json` per-class voxel counts and "
                      "volumes in mL.")
_TTA_QUERY = Query(None, description="Mirroring test-time augmentation; omit for the model "
                   "default (`tta_default` of `/v1/model`).")


# ---------------------------------------------------------------- responses

class _TempFileResponse(FileResponse):
    """A file download that removes its work folder once sent (or once sending failed)."""

    def __init__(self, path: Path, cleanup: Path | None, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._cleanup is not None:
                shutil.rmtree(self._cleanup, ignore_errors=True)


def _result_response(output: SegmentationOutput, stem: str, cleanup: Path | None) -> Response:
    if output.format is OutputFormat.json:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        return JSONResponse(output.summary.model_dump(mode="json"))
    return _TempFileResponse(
        output.path, cleanup, media_type=MEDIA_TYPES[output.format],
        filename=f"{stem}_seg.{output.format.value}",
    )


def _remove_when_done(future: Any, folder: Path) -> None:
    """Remove ``folder`` now, or when the worker still using it finishes."""
    if future is None or future.done():
        shutil.rmtree(folder, ignore_errors=True)
    else:
        future.add_done_callback(lambda _f: shutil.rmtree(folder, ignore_errors=True))


# ---------------------------------------------------------------- routes

def _build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_require_api_key)])

    @router.get("/model", response_model=ModelInfo, summary="Describe the loaded model",
                responses={401: _UPLOAD_ERRORS[401], 503: _UPLOAD_ERRORS[503]})
    def model_info(request: Request) -> ModelInfo:
        """Name, version, labels, modality, target spacing, patch size, folds, the SHA-256 of
        every checkpoint and the uumamba package version."""
        state = _state(request)
        state.require_ready()
        return state.info

    @router.post(
        "/segment", summary="Segment one volume (synchronous)", response_class=Response,
        openapi_extra=_UPLOAD_BODY,
        responses={200: {"model": VolumeSummary, "content": _FILE_CONTENT,
                         "description": "The label map in the upload's voxel grid (shape, "
                                        "spacing, origin, direction), or the JSON summary."},
                   **_UPLOAD_ERRORS, 504: _error("Not finished within `request_timeout_s`.")},
    )
    async def segment(request: Request, format: OutputFormat = _FORMAT_QUERY,
                      tta: bool | None = _TTA_QUERY) -> Response:
        """Upload one volume and wait for its mask. Big volumes or slow devices: use `/v1/jobs`."""
        state = _state(request)
        state.require_ready()
        slot = _reserve(state)
        workdir = Path(tempfile.mkdtemp(prefix="segment-", dir=state.work_root))
        future = None
        try:
            upload = await _receive_checked(request, state, workdir)
            future = state.pool.submit(slot, _segment_sync, state, upload, workdir, format, tta)
            try:
                output = await asyncio.wait_for(asyncio.wrap_future(future),
                                                timeout=state.settings.request_timeout_s)
            except TimeoutError:
                raise ServiceError(504, f"segmentation did not finish within {state.settings.request_timeout_s:g} s; "
                                        "use /v1/jobs for long inferences") from None
            response = _result_response(output, upload.stem, workdir)
            workdir = None  # the response owns it now
            return response
        finally:
            if future is None:
                slot.release()
            if workdir is not None:
                _remove_when_done(future, workdir)

    @router.post(
        "/jobs", summary="Submit one volume as an asynchronous job", status_code=202,
        response_model=JobCreated, openapi_extra=_UPLOAD_BODY, responses=_UPLOAD_ERRORS,
    )
    async def submit_job(request: Request, response: Response, format: OutputFormat = _FORMAT_QUERY,
                         tta: bool | None = _TTA_QUERY) -> JobCreated:
        """Upload one volume; answers 202 at once with the job id. Poll `GET /v1/jobs/{id}`,
        then fetch `GET /v1/jobs/{id}/result`. The job runs even if the client disconnects;
        its result is kept for `job_ttl_s` seconds after it finished."""
        state = _state(request)
        state.require_ready()
        slot = _reserve(state)
        job = state.jobs.create(format, tta)
        try:
            upload = await _receive_checked(request, state, job.workdir)
            job.future = state.pool.submit(slot, _run_job, state, job, upload)
        except BaseException:
            slot.release()
            state.jobs.delete(job.id)
            raise
        logger.info("job queued", extra={"fields": {"job_id": job.id, "format": format.value}})
        url = f"/v1/jobs/{job.id}"
        response.headers["Location"] = url
        return JobCreated(id=job.id, status=JobState.queued, status_url=url, result_url=f"{url}/result")

    @router.get("/jobs/{job_id}", response_model=JobStatus, summary="Job status and progress",
                responses={401: _UPLOAD_ERRORS[401], 404: _error("Unknown, deleted or expired job.")})
    def job_status(request: Request, job_id: str) -> JobStatus:
        """State (queued, running, done, failed), stage, progress 0-1, times and error."""
        return _get_job(request, job_id).status()

    @router.get(
        "/jobs/{job_id}/result", summary="Result of a finished job", response_class=Response,
        responses={200: {"model": VolumeSummary, "content": _FILE_CONTENT,
                         "description": "As `/v1/segment` in the format chosen at submission."},
                   401: _UPLOAD_ERRORS[401], 404: _error("Unknown, deleted or expired job."),
                   409: _error("The job is not done (queued / running) or failed; see `detail`.")},
    )
    def job_result(request: Request, job_id: str) -> Response:
        """The mask file (or JSON summary); may be fetched again until the job expires."""
        job = _get_job(request, job_id)
        if job.state is JobState.failed:
            raise ServiceError(409, f"job failed: {job.error}")
        if job.state is not JobState.done or job.output is None:
            raise ServiceError(409, f"job is {job.state.value} (stage {job.stage}, progress {job.progress:.2f})")
        return _result_response(job.output, f"job_{job.id[:8]}", cleanup=None)

    @router.delete("/jobs/{job_id}", status_code=204, response_class=Response, summary="Delete a job",
                   responses={401: _UPLOAD_ERRORS[401], 404: _error("Unknown, deleted or expired job.")})
    def delete_job(request: Request, job_id: str) -> Response:
        """Cancel a queued job or forget a finished one and delete its files (a running
        inference finishes, then its files are deleted)."""
        if not _state(request).jobs.delete(job_id):
            raise ServiceError(404, f"job {job_id!r} not found (unknown, deleted or expired)")
        return Response(status_code=204)

    return router


def _reserve(state: ServiceState) -> Slot:
    try:
        return state.pool.reserve()
    except QueueFull:
        raise ServiceError(429, f"server busy: {state.pool.capacity} requests already admitted; retry later",
                           {"Retry-After": str(state.settings.retry_after_s)}) from None


async def _receive_checked(request: Request, state: ServiceState, workdir: Path) -> ReceivedUpload:
    """Stream the upload into ``workdir`` and check it is a segmentable 3D volume (413/415/422)."""
    upload = await receive_upload(request, workdir, state.settings.max_upload_bytes)
    await run_in_threadpool(check_volume, upload.path)
    return upload


def _segment_sync(state: ServiceState, upload: ReceivedUpload, workdir: Path, fmt: OutputFormat,
                  tta: bool | None) -> SegmentationOutput:
    return segment_file(state.predictor, upload.path, workdir, fmt, tta, state.info.labels,
                        state.info.tta_default)


def _run_job(state: ServiceState, job: Job, upload: ReceivedUpload) -> None:
    """Worker-thread body of a job: never raises; the outcome goes into the job store."""
    jobs = state.jobs
    try:
        output = segment_file(state.predictor, upload.path, job.workdir, job.format, job.tta,
                              state.info.labels, state.info.tta_default,
                              report=lambda stage, progress: jobs.mark(job, stage, progress))
        upload.path.unlink(missing_ok=True)
        jobs.finish(job, output, None)
        logger.info("job done", extra={"fields": {"job_id": job.id}})
    except UserError as exc:
        jobs.finish(job, None, str(exc))
        logger.info("job failed", extra={"fields": {"job_id": job.id, "error": str(exc)}})
    except Exception as exc:
        jobs.finish(job, None, f"internal error ({type(exc).__name__}); see the server log")
        logger.exception("job crashed", extra={"fields": {"job_id": job.id}})


def _get_job(request: Request, job_id: str) -> Job:
    job = _state(request).jobs.get(job_id)
    if job is None:
        raise ServiceError(404, f"job {job_id!r} not found (unknown, deleted or expired)")
    return job


# ---------------------------------------------------------------- app factory

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
    metrics = Metrics()
    pool = InferencePool(settings.workers_per_device, settings.max_queue)
    state = ServiceState(settings=settings, pool=pool, metrics=metrics)
    metrics.add_gauge("uumamba_queue_depth", "Admitted requests waiting for a worker.", lambda: pool.queued)
    metrics.add_gauge("uumamba_inferences_running", "Inferences running now.", lambda: pool.running)
    metrics.add_gauge("uumamba_model_ready", "1 when the model is loaded.", lambda: int(state.status == "ready"))
    metrics.add_gauge("uumamba_jobs", "Jobs held, by state.",
                      lambda: state.jobs.counts() if state.jobs else {}, label="state")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.work_root = Path(tempfile.mkdtemp(prefix="uumamba-service-", dir=settings.tmp_dir))
        state.jobs = JobStore(state.work_root / "jobs", settings.job_ttl_s)
        sweep_s = min(60.0, max(0.5, settings.job_ttl_s / 4))
        state.tasks = [asyncio.create_task(_load_in_background(state, predictor)),
                       asyncio.create_task(_expire_jobs(state.jobs, sweep_s))]
        try:
            yield
        finally:
            for task in state.tasks:
                task.cancel()
            pool.shutdown()
            state.jobs.clear()
            shutil.rmtree(state.work_root, ignore_errors=True)

    protected_docs = settings.api_key is not None
    app = FastAPI(
        title="uumamba segmentation service",
        version=uumamba.__version__,
        description="Cardiovascular segmentation with UU-Mamba (Tsai et al. 2024). Upload a 3D "
                    "volume (NIfTI, NRRD, MetaImage); get the label map in the upload's geometry, "
                    "a 3D Slicer segmentation, or per-class volumes in mL.",
        lifespan=lifespan,
        openapi_url=None if protected_docs else "/openapi.json",
        docs_url=None if protected_docs else "/docs",
        redoc_url=None if protected_docs else "/redoc",
    )
    app.state.service = state

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(UploadRejected)
    async def _upload_rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        # 413 while the body is still arriving: close the connection rather than drain it
        headers = {"Connection": "close"} if exc.status_code == 413 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/healthz", response_model=Health, summary="Liveness", tags=["health"])
    def healthz() -> Health:
        """200 while the process runs (no key needed)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, summary="Readiness", tags=["health"],
             responses={503: {"model": Readiness, "description": "Model loading or failed to load."}})
    def readyz() -> JSONResponse:
        """200 with the device and selective-scan backend once the model is loaded, else 503
        (no key needed)."""
        body = Readiness(status=state.status, device=state.device, scan_backend=state.scan_backend,
                         detail=state.load_error)
        if state.status == "ready":
            return JSONResponse(body.model_dump())
        return JSONResponse(body.model_dump(), status_code=503,
                            headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
             dependencies=[Depends(_require_api_key)], tags=["health"],
             responses={200: {"content": {"text/plain": {"example": "uumamba_queue_depth 0\n"}}},
                        401: _UPLOAD_ERRORS[401]})
    def metrics_endpoint() -> PlainTextResponse:
        """Request counts by status, latency sum / count, queue depth, running inferences, jobs."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    if protected_docs:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(_require_api_key)])
        def openapi_json() -> JSONResponse:
            return JSONResponse(app.openapi())

    app.include_router(_build_router(), tags=["segmentation"])
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key", "X-Request-ID", "Content-Type"],
                           expose_headers=["X-Request-ID", "Content-Disposition", "Location"])
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
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

    path = validate_model_dir(model_dir)
    try:
        settings = ServiceSettings(model_dir=path, device=device)
    except ValidationError as exc:
        problems = "; ".join(f"UUMAMBA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid service setting: {problems}") from None
    validate_model_dir(path, settings.folds)
    configure_logging()
    logger.info("starting", extra={"fields": {"model_dir": str(path), "host": host, "port": port,
                                               "device": device}})
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_config=None,
                timeout_graceful_shutdown=10)


__all__ = ["ServiceSettings", "create_app", "serve_from_cli"]
