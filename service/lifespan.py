"""Startup and shutdown of one app: model loading, warm-up, job expiry, cleanup.

:func:`service_lifespan` is the app's lifespan: it creates the private work folder and the job
store, loads the model in a background thread (``/readyz`` answers 503 until it is loaded),
starts the job-expiry sweeper, and on shutdown cancels waiting work and removes every
temporary file. The model folder is read through :class:`uumamba.model_folder.ModelFolder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from uumamba.errors import UserError
from uumamba.model_folder import ModelFolder

from .jobs import JobStore
from .model_info import describe_model
from .observability import logger
from .state import ServiceState


def _load_model(state: ServiceState, predictor: Any) -> None:
    """Describe the model folder, build the predictor (unless given), warm it up, and record
    its device and selective-scan backend (the predictor's own ``scan_backend``)."""
    settings = state.settings
    info = describe_model(settings.model_dir, settings.folds)
    if predictor is None:
        from uumamba.inference.predict import Predictor

        folds = [f.removeprefix("fold_") for f in info.folds]
        predictor = Predictor.from_model_dir(settings.model_dir, folds=folds, device=settings.device)
    labels = getattr(predictor, "labels", None)
    if labels:  # the names the predictor writes win
        info = info.model_copy(update={"labels": dict(sorted(labels.items()))})
    if settings.warmup:
        _warm_up(predictor, settings.model_dir, state.work_root)
    state.device = str(getattr(predictor, "device", settings.device))
    state.scan_backend = getattr(predictor, "scan_backend", None)
    state.info = info
    state.predictor = predictor
    state.status = "ready"


def _warm_up(predictor: Any, model_dir: Path, work_root: Path) -> None:
    """Segment one noise volume of the patch size at the target spacing (result discarded)."""
    import nibabel as nib
    import numpy as np

    plans = ModelFolder(model_dir).load_plans()
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


async def _load_in_background(state: ServiceState, predictor: Any) -> None:
    """Run :func:`_load_model` in a thread; a failure sets ``status = "failed"`` and says why."""
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
    """Purge expired jobs every ``every_s`` seconds, forever (cancelled at shutdown)."""
    while True:
        await asyncio.sleep(every_s)
        n = jobs.purge_expired()
        if n:
            logger.info("jobs expired", extra={"fields": {"count": n}})


@contextlib.asynccontextmanager
async def service_lifespan(app: FastAPI, predictor: Any = None) -> AsyncIterator[None]:
    """The lifespan of ``app`` (its state is ``app.state.service``).

    Args:
        app: the app being started.
        predictor: an already loaded predictor, or ``None`` to build one from the settings.
    """
    state: ServiceState = app.state.service
    settings = state.settings
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
        state.pool.shutdown()
        state.jobs.clear()
        shutil.rmtree(state.work_root, ignore_errors=True)
