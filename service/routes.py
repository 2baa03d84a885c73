"""The HTTP routes: module-level routers, one top-level handler per endpoint.

- :data:`router` (``/v1``, tag ``segmentation``, behind ``X-API-Key`` when a key is set):
  ``GET /v1/model``, ``POST /v1/segment``, ``POST /v1/jobs``, ``GET /v1/jobs/{job_id}``,
  ``GET /v1/jobs/{job_id}/result``, ``DELETE /v1/jobs/{job_id}``;
- :data:`health_router` (tag ``health``): ``/healthz`` and ``/readyz`` (no key), ``/metrics``
  (key);
- :data:`docs_router`: ``/openapi.json`` behind the key, included only when a key is set.

State, authentication, readiness and admission come from :mod:`uumamba_service.dependencies`;
the OpenAPI fragments below document the multipart body (read by hand, streamed, so FastAPI
cannot infer it), the file answers and every error.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from uumamba.inference.sliding import InferenceCancelled

from .dependencies import (
    admit,
    get_job,
    get_state,
    job_not_found,
    require_api_key,
    require_ready,
    upload_admission,
)
from .dispatch import dispatch, runs_jobs
from .jobs import Job, StoreFull
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
from .observability import logger
from .pipeline import SegmentationOutput, check_volume, segment_file
from .responses import remove_when_done, result_response
from .runner import cancelled_detail
from .state import ServiceError, ServiceState
from .uploads import ReceivedUpload, receive_upload
from .worker import CancelToken, Slot

# ---------------------------------------------------------------- OpenAPI fragments


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("Missing or wrong `X-API-Key` (only when the server has a key)."),
    408: _error("The upload did not arrive within `upload_timeout_s`."),
    413: _error("Upload larger than `max_upload_mb` (refused before the body is buffered), or "
                "a header declaring more voxels than allowed (also after resampling to the "
                "model's spacing)."),
    415: _error("Not multipart/form-data, unknown extension, or content that is not the format "
                "the extension names."),
    422: _error("Unreadable, truncated, empty, 2D / 4D or NaN-filled volume, a header refused "
                "before decoding (detached data file, implausible spacing, gzip bomb), "
                "malformed form, or a refused option; `detail` names the problem."),
    429: _error("Queue full, or too many uploads at once (from this client or in all); retry "
                "after `Retry-After` seconds."),
    503: _error("Model not loaded yet (or failed to load); retry after `Retry-After` seconds."),
}
_NOT_FOUND = _error("Unknown, deleted or expired job.")

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {
                "type": "string", "format": "binary",
                "description": "One 3D volume: .nii, .nii.gz, .nrrd or .mha, or a .zip of one "
                               "DICOM series. The name only "
                               "decides the format; it is never used as a path."},
                "file_es": {
                "type": "string", "format": "binary",
                "description": "Optional: the end-systolic phase of the same patient (`file` "
                               "is then end-diastolic); needs `format=json`, which then adds "
                               "`es` and the clinical indices (`clinical`). Both files share "
                               "the upload limit and are checked alike."}},
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
                      "`seg.nrrd` 3D Slicer segmentation, `json` per-class voxel counts and "
                      "volumes in mL, or `dcm` DICOM SEG (for a `.zip` of one DICOM series).")
_TTA_QUERY = Query(None, description="Mirroring test-time augmentation; omit for the model "
                   "default (`tta_default` of `/v1/model`).")

router = APIRouter(prefix="/v1", tags=["segmentation"], dependencies=[Depends(require_api_key)])
health_router = APIRouter(tags=["health"])
docs_router = APIRouter(dependencies=[Depends(require_api_key)])


# ---------------------------------------------------------------- /v1

@router.get("/model", response_model=ModelInfo, summary="Describe the loaded model",
            responses={401: _UPLOAD_ERRORS[401], 503: _UPLOAD_ERRORS[503]})
def model_info(state: ServiceState = Depends(require_ready)) -> ModelInfo:
    """Name, version, labels, modality, target spacing, patch size, folds, the SHA-256 of
    every checkpoint and the uumamba package version."""
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
                  tta: bool | None = _TTA_QUERY, state: ServiceState = Depends(require_ready),
                  ) -> Response:
    """Upload one volume and wait for its mask. Big volumes or slow devices: use `/v1/jobs`."""
    workdir: Path | None = None
    future = None
    slot: Slot | None = None
    cancel = CancelToken()
    try:
        async with upload_admission(request, state):
            workdir = _work_folder(state)
            upload = await _receive_checked(request, state, workdir, format)
        slot = admit(state)
        future = state.pool.submit(slot, _segment_sync, state, upload, workdir, format, tta, cancel)
        timeout_s = state.settings.request_timeout_s
        try:
            output = await asyncio.wait_for(asyncio.wrap_future(future), timeout=timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            cancel.cancel("request timeout")  # the worker stops within one window batch
            raise ServiceError(504, f"segmentation did not finish within {timeout_s:g} s; "
                                    "use /v1/jobs for long inferences") from None
        except InferenceCancelled:
            raise ServiceError(504, cancelled_detail(cancel.reason, state.settings.max_inference_s)) from None
        response = result_response(output, upload.stem, workdir)
        workdir = None  # the response owns it now
        return response
    finally:
        if slot is not None and not slot.submitted:
            slot.release()
        if workdir is not None:
            remove_when_done(future, workdir)


@router.post(
    "/jobs", summary="Submit one volume as an asynchronous job", status_code=202,
    response_model=JobCreated, openapi_extra=_UPLOAD_BODY, responses=_UPLOAD_ERRORS,
)
async def submit_job(request: Request, response: Response, format: OutputFormat = _FORMAT_QUERY,
                     tta: bool | None = _TTA_QUERY, state: ServiceState = Depends(require_ready),
                     ) -> JobCreated:
    """Upload one volume; answers 202 at once with the job id. Poll `GET /v1/jobs/{id}`,
    then fetch `GET /v1/jobs/{id}/result`. The job runs even if the client disconnects;
    its result is kept for `job_ttl_s` seconds after it finished."""
    async with upload_admission(request, state):
        try:  # the store may block (a lock, a network round trip): never on the event loop
            job = await run_in_threadpool(state.jobs.create, format, tta, state.owner,
                                          state.info.version)
        except StoreFull as exc:
            raise ServiceError(503, f"{exc}; retry later", {"Retry-After": "30"}) from None
        except OSError:
            raise _no_work_folder() from None
        try:
            upload = await _receive_checked(request, state, job.workdir, format)
        except BaseException:
            await _forget(state, job.id)
            raise
    slot: Slot | None = None
    try:
        if runs_jobs(state):
            slot = admit(state)
        elif state.jobs.waiting() >= state.settings.max_waiting_jobs:
            raise ServiceError(429, f"server busy: {state.settings.max_waiting_jobs} jobs already "
                                    "queued; retry later",
                               {"Retry-After": str(state.settings.retry_after_s)})
        await run_in_threadpool(state.jobs.enqueue, job.id, upload.path,
                                upload.es.path if upload.es else None, upload.stem)
        if slot is not None:
            dispatch(state, slot)
    except BaseException:
        await _forget(state, job.id)
        raise
    finally:
        if slot is not None and not slot.submitted:
            slot.release()
    logger.info("job queued", extra={"fields": {"job_id": job.id, "format": format.value}})
    url = f"/v1/jobs/{job.id}"
    response.headers["Location"] = url
    return JobCreated(id=job.id, status=JobState.queued, status_url=url, result_url=f"{url}/result")


@router.get("/jobs/{job_id}", response_model=JobStatus, summary="Job status and progress",
            responses={401: _UPLOAD_ERRORS[401], 404: _NOT_FOUND})
def job_status(job: Job = Depends(get_job)) -> JobStatus:
    """State (queued, running, done, failed, interrupted), stage, progress 0-1, times, error
    and attempts. Jobs are stored durably: a job is known after a server restart until it
    expires."""
    return job.status()


@router.get(
    "/jobs/{job_id}/result", summary="Result of a finished job", response_class=Response,
    responses={200: {"model": VolumeSummary, "content": _FILE_CONTENT,
                     "description": "As `/v1/segment` in the format chosen at submission."},
               401: _UPLOAD_ERRORS[401], 404: _NOT_FOUND,
               409: _error("The job is not done (queued / running), failed or was "
                           "interrupted; see `detail`.")},
)
def job_result(job: Job = Depends(get_job)) -> Response:
    """The mask file (or JSON summary); may be fetched again until the job expires."""
    state = job.public_state
    if state in (JobState.failed, JobState.interrupted):
        raise ServiceError(409, f"job {state.value}: {job.error}")
    output = job.output
    if state is not JobState.done or output is None:
        raise ServiceError(409, f"job is {state.value} (stage {job.stage}, progress {job.progress:.2f})")
    if output.path is not None and not output.path.is_file():
        raise job_not_found(job.id)  # deleted or expired between the lookup and now
    return result_response(output, f"job_{job.id[:8]}", cleanup=None)


@router.delete("/jobs/{job_id}", status_code=204, response_class=Response, summary="Delete a job",
               responses={401: _UPLOAD_ERRORS[401], 404: _NOT_FOUND})
def delete_job(job_id: str, state: ServiceState = Depends(get_state)) -> Response:
    """Cancel a queued job or forget a finished one and delete its files (a running
    inference stops within one window batch, then its files are deleted)."""
    if not state.jobs.delete(job_id):
        raise job_not_found(job_id)
    return Response(status_code=204)


async def _forget(state: ServiceState, job_id: str) -> None:
    """Delete a job that was not accepted, in a worker thread (the store may block). When the
    request is being cancelled (client gone: no await can complete), the deletion goes on in
    a background thread. Failures are logged; the upkeep loop removes what is left (an
    abandoned upload's row and folder)."""

    def forget() -> None:
        try:
            state.jobs.delete(job_id)
        except Exception:
            logger.exception("could not delete a refused job", extra={"fields": {"job_id": job_id}})

    try:
        await run_in_threadpool(forget)
    except BaseException:
        threading.Thread(target=forget, name="uumamba-forget-job", daemon=True).start()
        raise


def _no_work_folder() -> ServiceError:
    return ServiceError(503, "server cannot create a work folder (disk full?); retry later",
                        {"Retry-After": "30"})


def _work_folder(state: ServiceState) -> Path:
    """A new private folder for one request under the app's work root (503 when it fails)."""
    try:
        return Path(tempfile.mkdtemp(prefix="segment-", dir=state.work_root))
    except OSError:
        raise _no_work_folder() from None


async def _receive_checked(request: Request, state: ServiceState, workdir: Path,
                           fmt: OutputFormat | None = None) -> ReceivedUpload:
    """Stream the upload into ``workdir`` (deadline ``upload_timeout_s``) and check it is a
    segmentable 3D volume, header first, under the decoding semaphore (408/413/415/422); a
    second phase (``file_es``) is checked the same way."""
    settings = state.settings
    upload = await receive_upload(request, workdir, settings.max_upload_bytes,
                                  timeout_s=settings.upload_timeout_s)
    if upload.es is not None:  # refused at submission, before any decoding or queueing
        if fmt is not None and fmt is not OutputFormat.json:
            raise ServiceError(422, "a second phase ('file_es') is answered with clinical "
                                    "indices: use format=json")
        from uumamba.clinical import label_roles

        label_roles(state.info.labels)  # DataError (422) for a model without an LV label
    # the grid the predictor resamples to (a 2D model keeps each volume's slices: 0 = own),
    # from the in-process predictor or, in an API process without one, the model's description
    plans = getattr(state.predictor, "plans", None)
    target = getattr(plans, "resampling_spacing", None) or \
        getattr(state.info, "resampling_spacing_mm", None)
    for received, name in ((upload, "uploaded volume"),
                           (upload.es, "uploaded second phase ('file_es')")):
        if received is None:
            continue
        async with state.decode_gate:  # released on every path, cancellation included
            await run_in_threadpool(check_volume, received.path, target, settings.header_limits(),
                                    name)
    return upload


def _segment_sync(state: ServiceState, upload: ReceivedUpload, workdir: Path, fmt: OutputFormat,
                  tta: bool | None, cancel: CancelToken) -> SegmentationOutput:
    """Worker-thread body of ``/v1/segment``; ``cancel`` stops it between window batches."""
    if cancel.is_set():  # timed out while queued
        raise InferenceCancelled(cancel.reason or "cancelled")
    cancel.start(state.settings.max_inference_s)
    return segment_file(state.predictor, upload.path, workdir, fmt, tta, state.info.labels,
                        state.info.tta_default, cancel=cancel,
                        es_upload=upload.es.path if upload.es else None)


# ---------------------------------------------------------------- health, metrics, docs

@health_router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """200 while the process runs (no key needed)."""
    return Health(status="ok")


@health_router.get("/readyz", response_model=Readiness, summary="Readiness",
                   responses={503: {"model": Readiness, "description": "Model loading or failed to load."}})
def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    """200 with the device, selective-scan backend and precision once the model is loaded
    and the job store answers, else 503 (no key needed); ``scan_backend_warning`` says why
    mamba-ssm's kernels are not in use where they were wanted."""
    status, detail = state.status, state.load_error
    if status == "ready" and state.jobs is not None:
        try:
            state.jobs.waiting()  # a read: cheap under SQLite's WAL, one round trip to Redis
        except Exception as exc:
            status, detail = "failed", "job store unavailable (busy or unreachable)"
            logger.warning("readiness: job store unavailable", extra={"fields": {"error": type(exc).__name__}})
    body = Readiness(status=status, device=state.device, scan_backend=state.scan_backend,
                     scan_backend_warning=state.scan_backend_warning, precision=state.precision,
                     detail=detail)
    if status == "ready":
        return JSONResponse(body.model_dump())
    return JSONResponse(body.model_dump(), status_code=503,
                        headers={"Retry-After": str(state.settings.retry_after_s)})


@health_router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
                   dependencies=[Depends(require_api_key)],
                   responses={200: {"content": {"text/plain": {"example": "uumamba_queue_depth 0\n"}}},
                              401: _UPLOAD_ERRORS[401]})
def metrics_endpoint(state: ServiceState = Depends(get_state)) -> PlainTextResponse:
    """Request counts by status, latency sum / count, queue depth, running inferences, jobs."""
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


@docs_router.get("/openapi.json", include_in_schema=False)
def openapi_json(request: Request) -> JSONResponse:
    """The OpenAPI schema behind the API key (replaces FastAPI's open one when a key is set)."""
    return JSONResponse(request.app.openapi())
