"""Startup and shutdown of one app: model loading, warm-up, job upkeep, cleanup.

:func:`service_lifespan` is the app's lifespan: it creates the private work folder (for
synchronous requests) and opens the durable job store (:func:`open_job_store`), loads the
model in a background thread (``/readyz`` answers 503 until it is loaded), starts the job
upkeep loop (:func:`_maintain_jobs`: lost jobs recovered, expired ones purged, queued ones
handed to the inference pool), and on shutdown gives running jobs back to the queue, cancels
waiting work and removes every temporary file; stored jobs stay for the next start. At start it
removes work folders left by an earlier process that died (:func:`sweep_stale_work_folders`).
The model folder is read through :class:`uumamba.model_folder.ModelFolder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from uumamba.errors import UserError

from .dispatch import top_up
from .jobs import JobStore, process_id
from .model_info import describe_model, load_predictor
from .models import ModelInfo
from .observability import logger
from .runner import STOPPING, RunContext
from .settings import ServiceSettings
from .state import ServiceState
from .warmup import warm_up


def _load_model(state: ServiceState, predictor: Any, info: ModelInfo | None = None) -> None:
    """Describe the model folder (unless ``info`` is given), build the predictor (unless
    given), warm it up, and record its device, selective-scan backend and precision (the
    predictor's own ``scan_backend`` and ``precision``, None for a predictor without them)."""
    settings = state.settings
    predictor, info = load_predictor(settings.model_dir, settings.folds, settings.device, predictor, info)
    if settings.warmup:
        warm_up(predictor, settings.model_dir, state.work_root)
    state.device = str(getattr(predictor, "device", settings.device))
    state.scan_backend = getattr(predictor, "scan_backend", None)
    state.scan_backend_warning = getattr(predictor, "scan_backend_warning", None)
    state.precision = getattr(predictor, "precision", None)
    state.info = info
    state.predictor = predictor
    state.run_context = RunContext(predictor, info.labels, info.tta_default,
                                   settings.max_inference_s, state.owner, info.version)
    state.status = "ready"


async def _load_in_background(state: ServiceState, predictor: Any, info: ModelInfo | None) -> None:
    """Run :func:`_load_model` in a thread; a failure sets ``status = "failed"`` and says why."""
    try:
        await asyncio.to_thread(_load_model, state, predictor, info)
        logger.info("model loaded", extra={"fields": {
            "model": state.info.name, "version": state.info.version, "device": state.device,
            "scan_backend": state.scan_backend, "precision": state.precision,
            "folds": state.info.folds}})
        if state.scan_backend_warning:
            logger.warning("selective-scan fallback", extra={"fields": {
                "scan_backend": state.scan_backend, "reason": state.scan_backend_warning}})
    except Exception as exc:
        state.status = "failed"
        error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        logger.error("model failed to load", exc_info=not isinstance(exc, UserError),
                     extra={"fields": {"error": error}})
        # /readyz answers without a key: name files relative to the model folder only
        model_dir = str(Path(state.settings.model_dir).resolve())
        error = error.replace(model_dir, "<model folder>")
        state.load_error = error.replace(str(state.settings.model_dir), "<model folder>").splitlines()[0][:300]


def open_job_store(settings: ServiceSettings, work_root: Path, info: ModelInfo | None = None) -> Any:
    """The job store of ``settings``: RQ on Redis when ``broker_url`` is set (the queue of the
    model's version: ``info``, described here unless given), else the SQLite store in
    ``resolved_state_dir`` (created, 0700).

    Raises:
        OSError: the state folder cannot be created or its database opened.
    """
    if settings.broker_url:
        from .redis_queue import RedisJobStore, queue_for

        version = (info or describe_model(settings.model_dir, settings.folds)).version
        return RedisJobStore(settings.broker_url, settings.job_ttl_s, cache_dir=work_root / "jobs",
                             queue_name=queue_for(version), **settings.job_store_options())
    return JobStore(settings.resolved_state_dir, settings.job_ttl_s, **settings.job_store_options())


def _upkeep(state: ServiceState) -> None:
    """One pass of job upkeep (in a thread: the store blocks)."""
    jobs = state.jobs
    lost = jobs.reap()
    if lost:
        logger.warning("lost jobs recovered", extra={"fields": {"count": lost}})
    n = jobs.purge_expired()
    if n:
        logger.info("jobs expired", extra={"fields": {"count": n}})
    top_up(state)


async def _maintain_jobs(state: ServiceState, every_s: float) -> None:
    """Job upkeep now, then every ``every_s`` seconds, forever (cancelled at shutdown).

    A failing pass (database locked for long, disk error) is logged and retried.
    """
    while True:
        try:
            await asyncio.to_thread(_upkeep, state)
        except Exception as exc:  # one line per pass: a store that is down is not a bug
            logger.warning("job upkeep failed", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"[:300]}})
        await asyncio.sleep(every_s)


#: Name of the stable parent of every app's work folder (one per user) in the temp folder.
WORK_PARENT = "uumamba-service-work"
_LOCK = ".lock"  # suffix of the lock file next to each work folder


def _lock(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on ``fd`` (POSIX ``flock``); False when held."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no sweeping
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _work_parent(tmp_dir: Path | None) -> Path | None:
    """``<tmp>/uumamba-service-work-<uid>``, private to this user (0700, a real folder owned
    by us), or ``None`` when such a folder cannot be had (then nothing is swept)."""
    base = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
    uid = os.getuid() if hasattr(os, "getuid") else 0
    parent = base / f"{WORK_PARENT}-{uid}"
    try:
        parent.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(parent)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != uid):
        return None  # a symlink or someone else's folder: never sweep it
    return parent


def sweep_stale_work_folders(parent: Path) -> int:
    """Remove work folders under ``parent`` whose owning process is gone.

    Each live app holds an exclusive ``flock`` on ``<folder>.lock`` (next to its folder, so
    the folder holds only request files) for its lifetime, so
    a folder whose lock can be taken belongs to a process that crashed or was killed (the
    scans it left are removed); folders without a lock file are removed once a minute old.

    Returns:
        How many folders were removed.
    """
    removed = 0
    for child in parent.iterdir():
        if not child.is_dir() or child.is_symlink() or not child.name.startswith("pid"):
            continue
        lock = parent / f"{child.name}{_LOCK}"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # no lock yet: just being created, or a very old crash
            fd = None
            with contextlib.suppress(OSError):
                if time.time() - child.stat().st_mtime < 60:
                    continue
        except OSError:
            continue
        try:
            if fd is not None and not _lock(fd):
                continue  # a live app (this process or another)
            shutil.rmtree(child, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed += 1
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def make_work_root(tmp_dir: Path | None) -> tuple[Path, int | None]:
    """This app's private work folder and the descriptor of its held lock.

    Under the stable per-user parent (see :func:`sweep_stale_work_folders`, run first), else
    a plain ``mkdtemp`` in ``tmp_dir``.
    """
    parent = _work_parent(tmp_dir)
    if parent is None:
        return Path(tempfile.mkdtemp(prefix="uumamba-service-", dir=tmp_dir)), None
    n = sweep_stale_work_folders(parent)
    if n:
        logger.info("stale work folders removed", extra={"fields": {"count": n}})
    root = Path(tempfile.mkdtemp(prefix=f"pid{os.getpid()}-", dir=parent))
    fd = os.open(parent / f"{root.name}{_LOCK}", os.O_RDWR | os.O_CREAT, 0o600)
    _lock(fd)
    return root, fd


@contextlib.asynccontextmanager
async def service_lifespan(app: FastAPI, predictor: Any = None) -> AsyncIterator[None]:
    """The lifespan of ``app`` (its state is ``app.state.service``).

    Args:
        app: the app being started.
        predictor: an already loaded predictor, or ``None`` to build one from the settings.
    """
    state: ServiceState = app.state.service
    settings = state.settings
    state.work_root, state.work_lock = make_work_root(settings.tmp_dir)
    state.owner = process_id()
    # with a broker the queue is the model version's: describe the folder once, for both
    info = describe_model(settings.model_dir, settings.folds) if settings.broker_url else None
    state.jobs = open_job_store(settings, state.work_root, info)
    every_s = min(60.0, max(0.2, settings.job_ttl_s / 4), max(0.2, settings.job_lease_s / 4), 2.0)
    state.tasks = [asyncio.create_task(_load_in_background(state, predictor, info)),
                   asyncio.create_task(_maintain_jobs(state, every_s))]
    try:
        yield
    finally:
        for task in state.tasks:
            task.cancel()
        if hasattr(state.jobs, "cancel_running"):
            state.jobs.cancel_running(STOPPING)  # running jobs are given back to the queue
        state.pool.shutdown()
        end = time.monotonic() + 10.0
        while state.pool.running and time.monotonic() < end:
            await asyncio.sleep(0.05)
        state.jobs.close()
        shutil.rmtree(state.work_root, ignore_errors=True)
        if state.work_lock is not None:
            lock = state.work_root.parent / f"{state.work_root.name}{_LOCK}"
            lock.unlink(missing_ok=True)
            os.close(state.work_lock)  # releases the lock
