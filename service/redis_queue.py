"""Several machines: jobs queued in Redis with RQ, run by ``uumamba worker --broker`` processes.

The API process only enqueues and serves results (:class:`RedisJobStore`, the same API-side
interface as :class:`uumamba_service.jobs.JobStore`, so the routes use either); every GPU
machine runs :func:`run_worker`, which loads the model once and executes jobs in-process with
an RQ :class:`rq.SimpleWorker` (no fork per job).

What lives where:

* **Redis** holds everything that must outlive a process: the RQ queue and job hashes (state,
  ``job.meta``: stage, progress, attempts, times, error, summary), the uploaded volume(s)
  (``uumamba:<queue>:in:<id>:<n>``, a list of chunks, TTL ``input_ttl_s``), the result file
  (``uumamba:<queue>:out:<id>``, TTL ``ttl_s``), and the store's index (ids, bytes) for the caps.
  Finished jobs expire with RQ's ``result_ttl`` / ``failure_ttl`` (both ``ttl_s``).
* **The API process** keeps only a cache: the upload while it streams in (``cache_dir/<id>/``,
  moved into Redis by :meth:`RedisJobStore.enqueue`) and a finished job's result file,
  copied from Redis on first :meth:`RedisJobStore.get` so the route can serve a local file.

What survives which failure:

* **API process restart / crash**: nothing acknowledged is lost. Queued, running and finished
  jobs are in Redis; any API process (this one restarted, or another one on another machine)
  answers for them and re-materialises results into its own cache. Only an upload still
  streaming (``receiving``) is lost; its record expires after a day.
* **Worker killed** (``kill -9``, power cut, lost machine): the job's execution in RQ's
  ``StartedJobRegistry`` is a lease of ``lease_s`` renewed every ``lease_s / 4`` by a heartbeat
  thread. Once it runs out, :meth:`RedisJobStore.reap` (called periodically by the API) or any
  worker's maintenance calls :meth:`rq.registry.StartedJobRegistry.cleanup`: the job is queued
  again for another worker while it has attempts left (``Retry(max=max_attempts - 1)``,
  ``lost_jobs="requeue"``), else it is ``interrupted`` with the reason. So a killed worker's
  job is running again within about ``lease_s`` plus one reap period.
* **Worker stopped** (SIGTERM / SIGINT, or ``stop`` set): warm shutdown; the running job is
  cancelled within one window batch and given back to the front of the queue without spending
  an attempt, then the worker exits. A second signal is RQ's cold shutdown.
* **Redis restart**: survives what Redis persisted (run it with ``appendonly yes``); without
  persistence Redis is the single point of failure. Use ``maxmemory-policy noeviction`` (as
  RQ requires) and size ``max_bytes`` to fit its memory: uploads and results are held there.

A job raising an error (a refused volume, an internal error) fails at once; only a *lost*
worker's job is retried. Deleting a job cancels a queued one, stops a running one within one
window batch (a Redis cancel key polled by the inference's cancel flag, plus RQ's
``send_stop_job_command``) and removes every key and the local cache.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .jobs import Job, StoreFull
from .models import JobState, OutputFormat
from .observability import logger
from .runner import (  # a worker being stopped gives its job back, as SQLite workers do
    STOPPING,
    cancelled_detail,
)
from .worker import CancelToken

#: The RQ job function, by name (the API process imports nothing of the worker).
JOB_FUNC = "uumamba_service.redis_queue.segment_job"
#: Cancel reason when this worker's lease ran out and the job went to another worker.
LEASE_LOST = "lease lost"
#: Bytes per Redis list element of a stored file (Redis strings stop at 512 MB).
CHUNK = 16 * 1024**2
#: Seconds an upload still streaming (``receiving``) is remembered.
RECEIVING_TTL_S = 24 * 3600
#: Seconds a queued job's uploaded volume is kept in Redis waiting for a worker.
INPUT_TTL_S = 7 * 24 * 3600
_ID_CHARS = set("0123456789abcdef")


_SAFE_JOB_CLASS = None


def _job_class():
    """RQ's job class with every name-to-code lookup of a stored job closed.

    A job hash in Redis names its function and its success / failure / stopped callbacks,
    which RQ imports and calls (``import_attribute``) in whichever process handles the job —
    a worker running it, or the API's :meth:`RedisJobStore.reap` failing an abandoned one.
    Whoever can write to Redis must not reach code that way: the function is
    :func:`segment_job` or nothing, and callbacks are never called.
    """
    global _SAFE_JOB_CLASS
    if _SAFE_JOB_CLASS is None:
        from rq.job import Job as RQJob

        class SafeJob(RQJob):
            @property
            def func(self):
                if self.func_name != JOB_FUNC:
                    raise ValueError("refused: not a uumamba segmentation job")
                return segment_job

            @property
            def success_callback(self):
                return None

            @property
            def failure_callback(self):
                return None

            @property
            def stopped_callback(self):
                return None

        _SAFE_JOB_CLASS = SafeJob
    return _SAFE_JOB_CLASS


def queue_for(model_version: str) -> str:
    """The RQ queue of one model version: an API process enqueues into its model's queue and
    a worker listens on its own model's, so two deployments (or a worker started with another
    model) on one Redis never run each other's jobs."""
    return f"uumamba-{model_version}"


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url)


def check_broker(url: str) -> None:
    """Refuse, in one line, a ``--broker`` that cannot work: rq absent, a URL that is not
    ``redis://`` / ``rediss://`` / ``unix://`` with a numeric database, or a Redis that does
    not answer a PING within 5 s. Called before any model is loaded.

    Raises:
        UserError: naming the broker without its password.
    """
    from urllib.parse import urlsplit

    from uumamba.errors import UserError

    try:
        import redis
        import rq  # noqa: F401
    except ImportError:
        raise UserError("--broker needs RQ: pip install 'uumamba[queue]'") from None
    try:
        parts = urlsplit(url)
        shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
    except ValueError:
        raise UserError("invalid --broker URL: expected redis://HOST:PORT/DB") from None
    db = parts.path.strip("/")
    if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and db and not db.isdigit()):
        raise UserError(f"invalid --broker URL {shown}: expected redis://HOST:PORT/DB (DB a number)")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        client.ping()
        client.close()
    except (redis.exceptions.RedisError, OSError, ValueError) as exc:
        raise UserError(f"cannot reach Redis at {shown}: {type(exc).__name__}: {exc}"[:300]) from None


def _serializer():
    from rq.serializers import JSONSerializer

    return JSONSerializer  # never pickle: nothing read from Redis is executed


class _Keys:
    """The store's own Redis keys for one queue (RQ keeps its ``rq:*`` keys)."""

    def __init__(self, queue_name: str) -> None:
        p = f"uumamba:{queue_name}:"
        self.index = p + "jobs"  # zset id -> created
        self.bytes = p + "bytes"  # hash id -> bytes held in Redis
        self._p = p

    def receiving(self, job_id: str) -> str:
        return f"{self._p}receiving:{job_id}"

    def input(self, job_id: str, n: int) -> str:
        return f"{self._p}in:{job_id}:{n}"

    def output(self, job_id: str) -> str:
        return f"{self._p}out:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self._p}cancel:{job_id}"

    def deleted(self, job_id: str) -> str:
        return f"{self._p}deleted:{job_id}"

    def owner(self, job_id: str) -> str:
        """``worker-name:attempt`` of the execution that may record the job's outcome."""
        return f"{self._p}owner:{job_id}"

    def all_of(self, job_id: str) -> list[str]:
        return [self.receiving(job_id), self.input(job_id, 0), self.input(job_id, 1),
                self.output(job_id), self.cancel(job_id), self.owner(job_id)]


def _put_file(conn: Any, key: str, path: Path, ttl_s: float) -> int:
    """Store ``path`` in the list ``key`` (chunks of :data:`CHUNK`, TTL set with the first
    chunk, so a crash half-way leaves nothing immortal). Returns the bytes stored."""
    conn.delete(key)
    total = 0
    ttl = max(1, math.ceil(ttl_s))
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            pipe = conn.pipeline(transaction=False)
            pipe.rpush(key, chunk)
            pipe.expire(key, ttl)
            pipe.execute()
            total += len(chunk)
    if total == 0:  # an empty file is one empty chunk
        pipe = conn.pipeline(transaction=False)
        pipe.rpush(key, b"")
        pipe.expire(key, ttl)
        pipe.execute()
    return total


def _get_file(conn: Any, key: str, dest: Path) -> bool:
    """Write the list ``key`` to ``dest`` (atomically: a temporary name, then renamed).
    Returns ``False`` when the key is absent (expired or deleted)."""
    n = conn.llen(key)
    if not n:
        return False
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "wb") as f:
            for i in range(n):
                chunk = conn.lindex(key, i)
                if chunk is None:
                    return False
                f.write(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _meta_of(raw: bytes | None) -> dict:
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _abandoned(rq_job: Any) -> bool:
    """True when RQ failed the job because its worker's lease ran out (AbandonedJobError)."""
    try:
        result = rq_job.latest_result()
    except Exception:
        return False
    return bool(result is not None and result.exc_string and "AbandonedJobError" in result.exc_string)


class RedisJobStore:
    """The API side of the Redis job queue; the interface and semantics of
    :class:`uumamba_service.jobs.JobStore` (``create`` -> upload -> ``enqueue`` -> ``get`` /
    ``delete``; ``counts``, ``waiting``, ``reap``, ``purge_expired``, ``close``).

    Every method is a few Redis round trips, so one store may be used from many threads and
    many API processes (on any machine) may share one Redis.

    Args:
        url: ``redis://[:password@]host:port/db`` (or ``rediss://``).
        ttl_s: seconds a finished job and its result are kept (RQ ``result_ttl`` /
            ``failure_ttl``, and the result key's TTL).
        lease_s: the workers' lease (only used in messages here; workers take theirs from
            ``uumamba worker``): keep both equal.
        max_attempts: runs of one job before a lost job is ``interrupted`` (>= 1).
        lost_jobs: ``requeue`` (a lost worker's job runs again while attempts are left) or
            ``interrupt`` (``interrupted`` at once).
        max_jobs / max_bytes: caps on stored jobs and on the bytes of uploads and results
            held in Redis; the oldest finished jobs are removed first, then
            :class:`~uumamba_service.jobs.StoreFull`.
        cache_dir: this process's local folder for uploads streaming in and result copies.
        queue_name: the RQ queue (workers must listen on the same one).
        input_ttl_s: seconds a queued job's upload waits in Redis for a worker; a job taken
            later fails with a message saying so.

    Raises:
        redis.exceptions.ConnectionError: Redis does not answer.
        ValueError: a bad argument.
    """

    def __init__(self, url: str, ttl_s: float, *, lease_s: float = 30.0, max_attempts: int = 2,
                 lost_jobs: str = "requeue", max_jobs: int = 1000,
                 max_bytes: int = 20 * 1024**3, cache_dir: Path, queue_name: str = "uumamba",
                 input_ttl_s: float = INPUT_TTL_S, upload_reserve_bytes: int = 0) -> None:
        from rq import Queue

        if lost_jobs not in ("requeue", "interrupt"):
            raise ValueError(f"lost_jobs must be 'requeue' or 'interrupt', got {lost_jobs!r}")
        if max_attempts < 1 or lease_s <= 0:
            raise ValueError("max_attempts must be >= 1 and lease_s > 0")
        self.url, self.queue_name = url, queue_name
        self.model_version = queue_name.removeprefix("uumamba-") if queue_name.startswith("uumamba-") else None
        self.ttl_s, self.lease_s, self.max_attempts = ttl_s, lease_s, max_attempts
        self.lost_jobs, self.max_jobs, self.max_bytes = lost_jobs, max_jobs, max_bytes
        self.input_ttl_s = max(input_ttl_s, ttl_s)
        # bytes counted for an upload still streaming, as in JobStore
        self.upload_reserve_bytes = min(max(0, upload_reserve_bytes), max_bytes)
        self.files = Path(cache_dir)
        self.files.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.files, 0o700)
        self.conn = _redis(url)
        self.conn.ping()
        self.keys = _Keys(queue_name)
        self.queue = Queue(queue_name, connection=self.conn, serializer=_serializer(),
                           job_class=_job_class())
        self._create = self.conn.register_script(_CREATE_LUA)

    # ------------------------------------------------------------ plumbing

    def _rq_job(self, job_id: str) -> Any | None:
        from rq.exceptions import NoSuchJobError

        RQJob = _job_class()

        if not job_id or set(job_id) - _ID_CHARS:
            return None
        try:
            job = RQJob.fetch(job_id, connection=self.conn, serializer=_serializer())
        except NoSuchJobError:
            return None
        except Exception:  # a foreign or damaged hash: not one of ours
            logger.exception("unreadable RQ job", extra={"fields": {"job_id": job_id}})
            return None
        if job.origin != self.queue_name or "format" not in (job.meta or {}):
            return None
        return job

    def _registry_score(self, key: str, job_id: str) -> float | None:
        score = self.conn.zscore(key, job_id)
        return None if score is None or math.isinf(score) else float(score)

    def _forget(self, job_id: str) -> None:
        """Remove the store's keys, index entries and local cache of one job (not RQ's)."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.delete(*self.keys.all_of(job_id))
        pipe.zrem(self.keys.index, job_id)
        pipe.hdel(self.keys.bytes, job_id)
        pipe.execute()
        shutil.rmtree(self.files / job_id, ignore_errors=True)

    # ------------------------------------------------------------ the API side

    def create(self, fmt: OutputFormat, tta: bool | None, owner: str, model: str | None = None) -> Job:
        """Register a job in ``receiving`` with a new random id and an empty local folder.

        ``model`` is recorded for the status only: the queue itself is the model's
        (:func:`queue_for`), so only workers of that model version take its jobs.

        Raises:
            StoreFull: ``max_jobs`` jobs or ``max_bytes`` stored and none can be freed.
            OSError: the folder cannot be created; nothing is kept.
        """
        self.purge_expired()
        job_id = uuid.uuid4().hex
        workdir = self.files / job_id
        now = time.time()
        code, value = self._create(
            keys=[self.keys.index, self.keys.bytes, self.keys.receiving(job_id)],
            args=[job_id, repr(now), self.max_jobs, self.max_bytes, RECEIVING_TTL_S,
                  fmt.value, "" if tta is None else str(int(tta)), owner,
                  max(self.upload_reserve_bytes, 1)])
        if code == 1:
            raise StoreFull(f"job store full: {value} jobs (max_jobs {self.max_jobs})")
        if code == 2:
            raise StoreFull(f"job store full: {value} bytes of job files (max_bytes {self.max_bytes})")
        try:  # after registering: a concurrent purge keeps the folders of indexed jobs only
            workdir.mkdir(mode=0o700)
        except BaseException:
            self._forget(job_id)
            raise
        return Job(id=job_id, workdir=workdir, state="receiving", stage="queued", progress=0.0,
                   format=fmt, tta=tta, created=now, started=None, finished=None, expires=None,
                   error=None, attempts=0, owner=owner, input_name=None, es_name=None, stem=None,
                   summary=None, result_name=None, model=self.model_version)

    def enqueue(self, job_id: str, input_path: Path, es_path: Path | None, stem: str) -> None:
        """The upload of a ``receiving`` job is complete and checked: copy it into Redis,
        remove the local copies, and queue the RQ job (same id). A job no longer receiving
        (deleted meanwhile) is left alone, as :meth:`JobStore.enqueue` does.

        Raises:
            ValueError: the upload is not in the job's folder.
        """
        from rq import Retry

        workdir = self.files / job_id
        for path in (input_path, es_path):
            if path is not None and path.parent != workdir:
                raise ValueError(f"upload {path.name} is not in the job's folder")
        record = {k.decode(): v.decode() for k, v in
                  self.conn.hgetall(self.keys.receiving(job_id)).items()}
        if not record:
            return
        stored = 0
        names: list[str] = []
        for n, path in enumerate(p for p in (input_path, es_path) if p is not None):
            stored += _put_file(self.conn, self.keys.input(job_id, n), path, self.input_ttl_s)
            names.append(path.name)
        tta = None if record["tta"] == "" else bool(int(record["tta"]))
        meta = {"format": record["format"], "tta": tta, "created": float(record["created"]),
                "stem": stem, "inputs": names, "stage": "queued", "progress": 0.0,
                "attempts": 0}
        retry = (Retry(max=self.max_attempts - 1)
                 if self.lost_jobs == "requeue" and self.max_attempts > 1 else None)
        ttl = max(1, math.ceil(self.ttl_s))
        rq_job = self.queue.enqueue_call(
            JOB_FUNC, args=(job_id,), job_id=job_id, timeout=-1, result_ttl=ttl, failure_ttl=ttl,
            retry=retry, meta=meta, description=f"segment {stem}")
        pipe = self.conn.pipeline(transaction=False)
        pipe.hset(self.keys.bytes, job_id, stored)
        pipe.delete(self.keys.receiving(job_id))
        _, still_receiving = pipe.execute()
        for path in (input_path, es_path):
            if path is not None:
                path.unlink(missing_ok=True)
        if not still_receiving:  # deleted while its upload moved into Redis
            with contextlib.suppress(Exception):
                rq_job.delete()
            self._forget(job_id)
            return
        logger.info("job enqueued", extra={"fields": {"job_id": job_id, "bytes": stored}})

    def get(self, job_id: str) -> Job | None:
        """The job, or ``None`` when unknown, deleted or expired. A ``done`` job's result
        file is copied from Redis into ``cache_dir/<id>/`` on first call."""
        if not job_id or set(job_id) - _ID_CHARS:
            return None
        record = self.conn.hgetall(self.keys.receiving(job_id))
        if record:
            r = {k.decode(): v.decode() for k, v in record.items()}
            return Job(id=job_id, workdir=self.files / job_id, state="receiving", stage="queued",
                       progress=0.0, format=OutputFormat(r["format"]),
                       tta=None if r["tta"] == "" else bool(int(r["tta"])),
                       created=float(r["created"]), started=None, finished=None, expires=None,
                       error=None, attempts=0, owner=r.get("owner"), input_name=None,
                       es_name=None, stem=None, summary=None, result_name=None, model=self.model_version)
        if self.conn.exists(self.keys.deleted(job_id)):
            return None
        rq_job = self._rq_job(job_id)
        if rq_job is None:
            return None
        return self._job(rq_job)

    def _state(self, rq_job: Any, meta: dict) -> tuple[str, str | None]:
        """(our state, error) of an RQ job."""
        status = rq_job.get_status(refresh=False)
        status = getattr(status, "value", status)
        if status in ("queued", "deferred", "scheduled", "created", "ready_to_enqueue",
                      "rate_limited"):
            return "queued", None
        if status == "started":
            return "running", None
        if status == "finished":
            return "done", None
        if status == "failed":
            if meta.get("error"):
                return "failed", meta["error"]
            if _abandoned(rq_job):
                attempts = int(meta.get("attempts") or 0)
                return "interrupted", (
                    f"the worker running this job stopped (no heartbeat within the lease; attempt {attempts} of "
                    f"{self.max_attempts if self.lost_jobs == 'requeue' else 1}, lease "
                    f"{self.lease_s:g} s); resubmit it")
            return "failed", "internal error; see the worker log"
        if status == "stopped":
            return "failed", meta.get("error") or "job stopped"
        if status == "canceled":
            return "failed", "job cancelled"
        return "failed", f"unexpected queue state {status!r}"

    def _job(self, rq_job: Any) -> Job:
        meta = rq_job.meta or {}
        job_id = rq_job.id
        state, error = self._state(rq_job, meta)
        expires = finished = None
        if state == "done":
            expires = self._registry_score(rq_job.finished_job_registry.key, job_id)
        elif state in ("failed", "interrupted"):
            expires = self._registry_score(rq_job.failed_job_registry.key, job_id)
        if state in ("done", "failed", "interrupted"):
            finished = meta.get("finished")
            if finished is None and rq_job.ended_at is not None:
                finished = rq_job.ended_at.timestamp()
            if finished is None and expires is not None:
                finished = expires - max(1, math.ceil(self.ttl_s))
        stage = {"queued": "queued", "done": "done", "failed": "failed",
                 "interrupted": "interrupted"}.get(state, meta.get("stage") or "starting")
        try:
            progress = 1.0 if state == "done" else float(meta.get("progress") or 0.0)
        except (TypeError, ValueError):
            progress = 0.0
        workdir = self.files / job_id
        result_name = meta.get("result_name") if state == "done" else None
        if result_name is not None and (not isinstance(result_name, str)
                                        or result_name != Path(result_name).name
                                        or result_name in ("", ".", "..")):
            # a record naming a path (written by someone with access to Redis): never a file
            # outside this job's folder
            state, stage, error, result_name = "failed", "failed", "corrupt job record", None
        if state == "done" and result_name:
            path = workdir / result_name
            if not path.is_file():
                workdir.mkdir(mode=0o700, exist_ok=True)
                if not _get_file(self.conn, self.keys.output(job_id), path):
                    state, stage, error = "failed", "failed", (
                        "the result is no longer stored in the queue (expired or evicted); "
                        "resubmit the job")
                    result_name = None
        try:
            fmt = OutputFormat(meta.get("format"))
        except ValueError:
            fmt, state, stage, error = OutputFormat.json, "failed", "failed", "corrupt job record"
        return Job(
            id=job_id, workdir=workdir, state=state, stage=stage, progress=min(progress, 1.0),
            format=fmt, tta=meta.get("tta"),
            created=float(meta.get("created") or time.time()), started=meta.get("started"),
            finished=finished, expires=expires, error=error,
            attempts=int(meta.get("attempts") or 0), owner=meta.get("worker"),
            input_name=None, es_name=None, stem=meta.get("stem"),
            summary=meta.get("summary") if state == "done" else None, result_name=result_name,
            model=self.model_version)

    def delete(self, job_id: str) -> bool:
        """Forget a job: a queued one is cancelled, a running one stopped within one window
        batch (cancel key + RQ's stop command); every key and the local cache are removed.

        Returns:
            ``False`` when the job is unknown, deleted or expired.
        """
        from rq.command import send_stop_job_command

        if not job_id or set(job_id) - _ID_CHARS:
            return False
        if self.conn.delete(self.keys.receiving(job_id)):
            self._forget(job_id)
            return True
        if self.conn.exists(self.keys.deleted(job_id)):
            return False
        rq_job = self._rq_job(job_id)
        if rq_job is None:
            self._forget(job_id)  # tidy a stale index entry
            return False
        marker_ttl = max(1, math.ceil(self.ttl_s)) + 3600
        pipe = self.conn.pipeline(transaction=False)
        pipe.set(self.keys.deleted(job_id), 1, ex=marker_ttl)
        pipe.set(self.keys.cancel(job_id), 1, ex=marker_ttl)
        pipe.execute()
        status = rq_job.get_status()
        if getattr(status, "value", status) == "started":
            # the worker deletes the RQ job once it has stopped (it sees the marker)
            with contextlib.suppress(Exception):
                send_stop_job_command(self.conn, job_id, serializer=_serializer())
        else:
            with contextlib.suppress(Exception):
                rq_job.delete()
        keys = self.keys.all_of(job_id)
        keys.remove(self.keys.cancel(job_id))  # the running worker polls it
        pipe = self.conn.pipeline(transaction=False)
        pipe.delete(*keys)
        pipe.zrem(self.keys.index, job_id)
        pipe.hdel(self.keys.bytes, job_id)
        pipe.execute()
        shutil.rmtree(self.files / job_id, ignore_errors=True)
        return True

    def _states(self) -> dict[str, str]:
        """id -> public state of every indexed, live job (a few pipelined round trips)."""
        from rq.job import Job as RQJob

        ids = [i.decode() for i in self.conn.zrange(self.keys.index, 0, -1)]
        if not ids:
            return {}
        pipe = self.conn.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(self.keys.receiving(job_id))
            pipe.exists(self.keys.deleted(job_id))
            pipe.hmget(RQJob.key_for(job_id), "status", "meta")
        replies = pipe.execute()
        states: dict[str, str] = {}
        for n, job_id in enumerate(ids):
            receiving, deleted, (status, meta) = replies[3 * n: 3 * n + 3]
            if receiving:
                states[job_id] = "queued"
            elif deleted or status is None:
                continue
            else:
                status = status.decode()
                if status == "failed" and not _meta_of(meta).get("error"):
                    rq_job = self._rq_job(job_id)
                    states[job_id] = ("interrupted" if rq_job is not None and _abandoned(rq_job)
                                      else "failed")
                else:
                    states[job_id] = {"started": "running", "finished": "done", "failed": "failed",
                                      "stopped": "failed", "canceled": "failed"}.get(status, "queued")
        return states

    def counts(self) -> dict[str, int]:
        """Number of live jobs per public state (for /metrics)."""
        counts = {state.value: 0 for state in JobState}
        for state in self._states().values():
            counts[state] += 1
        return counts

    def waiting(self, model: str | None = None) -> int:
        """Jobs queued (uploaded, not yet taken by a worker); this queue is one model's."""
        return self.queue.count

    def reap(self, now: float | None = None) -> int:
        """Recover jobs of lost workers: :meth:`rq.registry.StartedJobRegistry.cleanup` queues
        a job whose lease ran out again while it has retries left, else fails it (shown as
        ``interrupted``); the uploads of those are removed.

        Returns:
            How many jobs were handled.
        """
        from rq.registry import StartedJobRegistry

        registry = StartedJobRegistry(self.queue_name, connection=self.conn, job_class=_job_class(),
                                      serializer=_serializer(), death_penalty_class=_NoDeathPenalty)
        ids = sorted(set(registry.get_expired_job_ids(now)))
        if not ids:
            return 0
        registry.cleanup(now)
        for job_id in ids:
            rq_job = self._rq_job(job_id)
            if rq_job is not None and getattr(rq_job.get_status(), "value", None) == "failed":
                self.conn.delete(self.keys.input(job_id, 0), self.keys.input(job_id, 1))
                self.conn.hset(self.keys.bytes, job_id, 0)
                logger.warning("job interrupted: worker lost", extra={"fields": {"job_id": job_id}})
            elif rq_job is not None:
                logger.warning("job queued again: worker lost", extra={"fields": {"job_id": job_id}})
        return len(ids)

    # ------------------------------------------------------------ expiry and caps

    def purge_expired(self, now: float | None = None) -> int:
        """Tidy the index: jobs whose RQ hash expired (RQ's ``result_ttl`` / ``failure_ttl``)
        or whose upload record expired lose their keys and local cache; then the oldest
        finished jobs are deleted while more than ``max_jobs - 1`` jobs or ``max_bytes`` are
        stored (room for one more submission). Local cache folders of unknown jobs go too.

        Returns:
            How many jobs were removed.
        """
        from rq.job import Job as RQJob

        ids = [i.decode() for i in self.conn.zrange(self.keys.index, 0, -1)]
        removed = 0
        live: dict[str, tuple[str, float]] = {}
        if ids:
            pipe = self.conn.pipeline(transaction=False)
            for job_id in ids:
                pipe.exists(self.keys.receiving(job_id))
                pipe.hmget(RQJob.key_for(job_id), "status", "ended_at")
                pipe.exists(self.keys.deleted(job_id))
            replies = pipe.execute()
            for n, job_id in enumerate(ids):
                receiving, (status, ended), deleted = replies[3 * n: 3 * n + 3]
                if not receiving and (status is None or deleted):
                    self._forget(job_id)
                    removed += 1
                    continue
                ended_ts = 0.0
                if ended:
                    with contextlib.suppress(ValueError):
                        from rq.utils import str_to_date

                        ended_ts = str_to_date(ended).timestamp()
                live[job_id] = ("receiving" if receiving else status.decode(), ended_ts)
        sizes = {k.decode(): int(v) for k, v in self.conn.hgetall(self.keys.bytes).items()}
        count, stored = len(live), sum(sizes.get(i, 0) for i in live)
        room = max(self.upload_reserve_bytes, 1)  # keep room for one more submission
        if count > self.max_jobs - 1 or stored + room > self.max_bytes:
            finished = sorted((ended, job_id) for job_id, (status, ended) in live.items()
                              if status in ("finished", "failed", "stopped", "canceled"))
            for _ended, job_id in finished:
                if count <= self.max_jobs - 1 and stored + room <= self.max_bytes:
                    break
                if self.delete(job_id):
                    removed += 1
                count, stored = count - 1, stored - sizes.get(job_id, 0)
        with contextlib.suppress(OSError):
            for child in self.files.iterdir():
                if (child.is_dir() and not child.is_symlink() and len(child.name) == 32
                        and not set(child.name) - _ID_CHARS and child.name not in live
                        # a job created after the index was read above is indexed (before its
                        # folder is made): ask again before removing
                        and self.conn.zscore(self.keys.index, child.name) is None):
                    shutil.rmtree(child, ignore_errors=True)
        return removed

    def close(self) -> None:
        """Close the Redis connections of this store."""
        with contextlib.suppress(Exception):
            self.conn.close()
            self.conn.connection_pool.disconnect()


# KEYS: index zset, bytes hash, receiving hash; ARGV: id, created, max_jobs, max_bytes, ttl,
# format, tta, owner, reserve (bytes held for the upload until enqueue counts it).
# Returns {0, 0} (registered), {1, jobs} or {2, bytes} (a cap is reached).
_CREATE_LUA = """
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[3]) then return {1, n} end
local b = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do b = b + tonumber(v) end
if b + tonumber(ARGV[9]) > tonumber(ARGV[4]) then return {2, b} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[9])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], 'format', ARGV[6], 'tta', ARGV[7], 'created', ARGV[2], 'owner', ARGV[8])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return {0, 0}
"""


# ---------------------------------------------------------------------- the worker side


try:
    from rq.timeouts import BaseDeathPenalty as _DeathPenaltyBase
except ImportError:  # rq absent: the store and worker refuse to start, the module still imports
    _DeathPenaltyBase = object  # type: ignore[assignment,misc]


class _NoDeathPenalty(_DeathPenaltyBase):
    """No SIGALRM timeout (works off the main thread): the wall-time cap is our cancel flag's."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class RedisCancelToken(CancelToken):
    """The cancel flag of one job on a worker: a :class:`~uumamba_service.worker.CancelToken`
    (wall-time cap, :meth:`cancel`) that is also set once the job's Redis cancel key exists
    (written by :meth:`RedisJobStore.delete`), polled at most every ``poll_s`` seconds."""

    def __init__(self, conn: Any, key: str, poll_s: float = 0.25) -> None:
        super().__init__()
        self._conn, self._key, self._poll_s = conn, key, poll_s
        self._next_poll = 0.0

    def poll(self) -> None:
        """Look at the cancel key now (a Redis hiccup is ignored: the lease decides)."""
        try:
            if self._conn.exists(self._key):
                self.cancel("job deleted")
        except Exception:
            logger.warning("cancel key unreadable", exc_info=True)

    def is_set(self) -> bool:
        if not super().is_set() and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self._poll_s
            self.poll()
        return super().is_set()


@dataclass
class _WorkerContext:
    """What :func:`segment_job` needs in the worker process (set by :func:`run_worker`)."""

    worker: Any
    predictor: Any
    labels: dict[int, str]
    tta_default: bool
    max_inference_s: float | None


_ACTIVE: _WorkerContext | None = None


class _Outcome(Exception):
    """Raised by :func:`segment_job` to end a job; ``kind`` tells the worker how."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def segment_job(job_id: str) -> str:
    """The RQ job function (run by :func:`run_worker`'s worker, in-process).

    Fetches the job's upload(s) from Redis into a private temporary folder, segments them
    with :func:`uumamba_service.pipeline.segment_file` (progress into ``job.meta``), stores the
    result file in Redis (TTL = the job's ``result_ttl``) and returns the summary JSON.

    Raises:
        _Outcome: the job failed (``error`` in ``job.meta``: a user error's message, or
            ``internal error (TypeName); see the worker log``), was cancelled, is given back
            (worker stopping) or was lost (lease ran out).
    """
    from rq import get_current_job

    from uumamba.errors import UserError
    from uumamba.inference.sliding import InferenceCancelled

    from .pipeline import segment_file

    ctx = _ACTIVE
    job = get_current_job()
    if ctx is None or job is None:
        raise RuntimeError("segment_job runs in `uumamba worker --broker`, not in a plain rq worker")
    job_id = job.id  # the argument is for `rq info`; the job's own id names its keys
    worker = ctx.worker
    token: RedisCancelToken = worker.current_token
    keys = _Keys(job.origin)
    meta = job.meta
    meta["attempts"] = int(meta.get("attempts") or 0) + 1
    meta.setdefault("started", time.time())
    meta.update(stage="starting", worker=worker.name, error=None)
    # This execution owns the outcome until another one takes the job (a lost lease): a worker
    # that stalled past its lease (GC, SIGSTOP, Redis or network pause) and then finishes must
    # not record, delete the inputs or overwrite the meta of the execution that replaced it.
    mine = f"{worker.name}:{meta['attempts']}".encode()
    job.connection.set(keys.owner(job_id), mine, ex=7 * 24 * 3600)
    job.save_meta()

    def ours() -> bool:
        return token.reason != LEASE_LOST and job.connection.get(keys.owner(job_id)) == mine

    def lost() -> _Outcome:
        return _Outcome("lease_lost", "lease lost: the job went to another worker")

    def report(stage: str, progress: float) -> None:
        if not ours():
            return  # another worker owns the job's meta now
        meta["stage"] = stage
        meta["progress"] = max(float(meta.get("progress") or 0.0), progress)
        job.save_meta()

    def fail(kind: str, message: str) -> _Outcome:
        if token.reason != "job deleted" and not ours():  # a deleted job's keys are gone: still its end
            return lost()
        meta.update(stage="failed", error=message, finished=time.time())
        job.save_meta()
        job.connection.delete(keys.input(job_id, 0), keys.input(job_id, 1))
        job.connection.hset(keys.bytes, job_id, 0)
        return _Outcome(kind, message)

    fmt = OutputFormat(meta["format"])
    with tempfile.TemporaryDirectory(prefix="uumamba-job-") as tmp:
        folder = Path(tmp)
        try:
            if token.is_set():
                raise InferenceCancelled(token.reason or "cancelled")
            paths: list[Path] = []
            for n, name in enumerate(meta.get("inputs") or []):
                path = folder / Path(name).name
                if not _get_file(job.connection, keys.input(job_id, n), path):
                    raise UserError("the uploaded volume is no longer stored (it waited longer "
                                    "than the queue keeps uploads); resubmit the job")
                paths.append(path)
            if not paths:
                raise UserError("the job has no uploaded volume; resubmit it")
            report("reading", 0.05)
            token.start(ctx.max_inference_s)
            output = segment_file(
                ctx.predictor, paths[0], folder, fmt, meta.get("tta"), ctx.labels,
                ctx.tta_default, report=report, cancel=token,
                es_upload=paths[1] if len(paths) > 1 else None)
            token.poll()
            if token.is_set() and token.reason in (LEASE_LOST, "job deleted"):
                raise InferenceCancelled(token.reason)  # not ours to record any more
            if not ours():
                raise InferenceCancelled(LEASE_LOST)
            stored = 0
            ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else 3600
            if output.path is not None:
                stored = _put_file(job.connection, keys.output(job_id), output.path, ttl)
            summary = output.summary.model_dump_json()
        except InferenceCancelled:
            if token.reason == STOPPING:
                meta.update(stage="queued", attempts=max(meta["attempts"] - 1, 0))
                job.save_meta()
                raise _Outcome("give_back", "worker stopping: job given back") from None
            if token.reason == LEASE_LOST:
                raise lost() from None
            raise fail("cancelled", cancelled_detail(token.reason, ctx.max_inference_s)) from None
        except UserError as exc:
            raise fail("user_error", str(exc)) from None
        except Exception as exc:
            logger.exception("job crashed", extra={"fields": {"job_id": job_id}})
            raise fail("internal", f"internal error ({type(exc).__name__}); see the worker log") from None
    meta.update(stage="done", progress=1.0, summary=summary, finished=time.time(),
                result_name=output.path.name if output.path is not None else None)
    job.save_meta()
    pipe = job.connection.pipeline(transaction=False)
    pipe.delete(keys.input(job_id, 0), keys.input(job_id, 1))
    pipe.hset(keys.bytes, job_id, stored)
    pipe.execute()
    logger.info("job done", extra={"fields": {"job_id": job_id, "worker": worker.name}})
    return summary


def _worker_class():
    """The RQ worker class (defined lazily: rq is imported only where it is used)."""
    from rq.exceptions import StopRequested
    from rq.worker import SimpleWorker

    class LeaseWorker(SimpleWorker):
        """An in-process RQ worker whose started-job heartbeat is a lease of ``lease_s``."""

        death_penalty_class = _NoDeathPenalty

        def __init__(self, *args: Any, lease_s: float, stop: threading.Event, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.lease_s = lease_s
            self.beat_s = max(0.1, lease_s / 4)
            self.maintenance_interval = max(1, math.ceil(lease_s))  # workers reap too
            self.stop_event = stop
            self.current_token: RedisCancelToken | None = None
            self.outcome: str | None = None
            self.jobs_run = 0
            self._beat_lock = threading.Lock()
            self._beat_done = threading.Event()

        # -- the command channel
        def subscribe(self) -> None:
            """rq's subscription, its listener thread polling every second, not every 60 s:
            rq's teardown unsubscribes and then joins that thread, and a thread that had
            already read the unsubscribe reply waits out its whole poll before it sees the
            stop (a SIGTERMed worker took up to 60 s to exit)."""
            self.pubsub = self.connection.pubsub()
            self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
            self.pubsub_thread = self.pubsub.run_in_thread(
                sleep_time=1.0, daemon=True,
                exception_handler=self._pubsub_exception_handler)

        # -- lease
        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return max(1, math.ceil(self.lease_s))

        @property
        def dequeue_timeout(self) -> int:
            return 1  # wake every second to honour `stop`

        def _beat(self, job: Any, execution: Any, token: RedisCancelToken,
                  done: threading.Event) -> None:
            """Renew the lease every ``beat_s`` until the job's execution ended; cancel the
            job when the cancel key appears or the lease was lost (given to another worker)."""
            registry_key = job.started_job_registry.key
            while not done.wait(self.beat_s):
                with self._beat_lock:
                    if done.is_set():
                        return
                    try:
                        self.maintain_heartbeats(job, execution)
                        if self.connection.zscore(registry_key, execution.composite_key) is None:
                            token.cancel(LEASE_LOST)
                        token.poll()
                    except Exception:  # Redis unreachable: try again; the lease decides
                        logger.warning("job heartbeat failed", exc_info=True,
                                       extra={"fields": {"job_id": job.id}})

        def perform_job(self, job: Any, queue: Any, execution: Any) -> bool:

            if job.func_name != JOB_FUNC:  # whoever can write to Redis must not run code here
                logger.error("refused a job that is not a segmentation",
                             extra={"fields": {"job_id": job.id, "func": str(job.func_name)[:100]}})
                self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
                job.retries_left = 0
                self.outcome = "refused"
                SimpleWorker.handle_job_failure(self, job, queue, execution=execution,
                                                exc_string="refused: not a uumamba segmentation job")
                return False
            token = RedisCancelToken(self.connection, _Keys(job.origin).cancel(job.id))
            self.current_token, self.outcome = token, None
            if self.stop_event.is_set():
                token.cancel(STOPPING)
            self._beat_done = done = threading.Event()
            beater = threading.Thread(target=self._beat, args=(job, execution, token, done),
                                      name=f"uumamba-lease-{job.id[:8]}", daemon=True)
            beater.start()
            try:
                ok = super().perform_job(job, queue, execution)
            finally:
                with self._beat_lock:
                    done.set()
                beater.join(timeout=5)
                self.current_token = None
            if self.outcome not in ("give_back", "lease_lost", "refused"):
                self.jobs_run += 1
            keys = _Keys(job.origin)
            if self.connection.exists(keys.deleted(job.id)):  # deleted while it ran
                with contextlib.suppress(Exception):
                    _job_class().fetch(job.id, connection=self.connection, serializer=self.serializer).delete()
                other = keys.all_of(job.id)
                other.remove(keys.cancel(job.id))
                self.connection.delete(*other)
                self.connection.hdel(keys.bytes, job.id)
            return ok

        def handle_execution_ended(self, job: Any, queue: Any, heartbeat_ttl: int) -> None:
            with self._beat_lock:  # no heartbeat may re-add the execution RQ now removes
                self._beat_done.set()
            super().handle_execution_ended(job, queue, heartbeat_ttl)

        # -- outcomes
        def handle_exception(self, job: Any, *exc_info: Any) -> None:
            exc = exc_info[1] if len(exc_info) > 1 else None
            if isinstance(exc, _Outcome):
                self.outcome = exc.kind
                if exc.kind != "internal":  # internal errors were logged with their traceback
                    logger.info("job ended", extra={"fields": {"job_id": job.id, "outcome": exc.kind,
                                                                "detail": str(exc)}})
                return
            super().handle_exception(job, *exc_info)

        def handle_job_failure(self, job: Any, queue: Any, started_job_registry: Any = None,
                               exc_string: str = "", execution: Any = None) -> None:
            if self.outcome == "lease_lost":  # the job is someone else's now
                with self.connection.pipeline() as pipe:
                    self.cleanup_execution(job, pipeline=pipe, execution=execution)
                    pipe.execute()
                return
            if self.outcome == "give_back":
                with self.connection.pipeline() as pipe:
                    self.cleanup_execution(job, pipeline=pipe, execution=execution)
                    queue._enqueue_job(job, pipeline=pipe, at_front=True)
                    pipe.execute()
                logger.info("job given back", extra={"fields": {"job_id": job.id}})
                return
            job.retries_left = 0  # a job that raised is not retried; only a lost worker's is
            super().handle_job_failure(job, queue, started_job_registry=started_job_registry,
                                       exc_string=exc_string, execution=execution)

        # -- stopping
        def kill_horse(self, sig: Any = None) -> None:
            """RQ's stop-job command (``send_stop_job_command``): cancel the running job."""
            token = self.current_token
            if token is not None:
                token.cancel("job deleted")

        def handle_warm_shutdown_request(self) -> None:
            super().handle_warm_shutdown_request()
            token = self.current_token
            if token is not None:
                token.cancel(STOPPING)

        def request_thread_stop(self) -> None:
            """``stop`` was set: like SIGTERM, from another thread."""
            token = self.current_token
            if token is not None:
                token.cancel(STOPPING)
            self._stop_requested = True

        def _install_signal_handlers(self) -> None:
            if threading.current_thread() is threading.main_thread():
                super()._install_signal_handlers()

        def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
            if timeout is None:  # burst
                return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
            while True:
                if self.stop_event.is_set() or self._stop_requested:
                    raise StopRequested()
                result = super().dequeue_job_and_maintain_ttl(1, 1)
                if result is not None:
                    return result

    return LeaseWorker


def run_worker(model_dir: Path, url: str, *, device: str = "auto", folds: list[str] | None = None,
               lease_s: float = 30.0, max_inference_s: float | None = 3600.0,
               queue_name: str | None = None, burst: bool = False,
               stop: threading.Event | None = None, warmup: bool = False) -> int:
    """Run jobs from the Redis queue at ``url`` until stopped (``uumamba worker --broker``).

    The model is loaded once; jobs run in this process (RQ :class:`~rq.SimpleWorker`), one at a
    time. While one runs, a heartbeat thread renews its lease every ``lease_s / 4``: if this
    process dies, the job is re-queued (or ``interrupted``) about ``lease_s`` later by
    :meth:`RedisJobStore.reap` or another worker. SIGTERM / SIGINT (main thread only) or
    ``stop`` stop the worker: the running job is cancelled within one window batch and given
    back to the queue, not failed. The worker also cleans RQ's registries every ``lease_s``.

    Args:
        model_dir: the trained model folder.
        url: the Redis URL (the API's ``--broker``).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        folds: folds to ensemble (``fold_N`` or ``N``); ``None``: all.
        lease_s: the lease of a running job (keep it equal to the API's).
        max_inference_s: wall-time cap of one job's inference (``None``: none).
        queue_name: the RQ queue to listen on (``None``: :func:`queue_for` the model's
            version, the queue an API process serving this model enqueues into).
        burst: return once the queue is empty (tests, batch runs).
        stop: set it (from another thread) to stop the worker.
        warmup: segment one synthetic volume before taking jobs (as ``uumamba serve`` does).

    Returns:
        How many jobs this worker ran to an outcome (done or failed; given-back ones not).

    Raises:
        UserError: the model folder is not usable.
        redis.exceptions.ConnectionError: Redis does not answer at start.
    """
    global _ACTIVE

    if lease_s <= 0:
        raise ValueError("lease_s must be > 0")
    if _ACTIVE is not None:
        raise RuntimeError("one run_worker per process")
    from .model_info import load_predictor

    predictor, info = load_predictor(Path(model_dir), folds, device)
    labels, tta_default = info.labels, bool(info.tta_default)
    queue_name = queue_name if queue_name is not None else queue_for(info.version)
    if warmup:
        from .warmup import warm_up

        warm_up(predictor, Path(model_dir))
    conn = _redis(url)
    conn.ping()
    stop = stop if stop is not None else threading.Event()
    name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    worker = _worker_class()(queue_name, name=name, connection=conn, serializer=_serializer(),
                             job_class=_job_class(),
                             lease_s=lease_s, stop=stop, worker_ttl=max(60, math.ceil(lease_s) * 4))
    _ACTIVE = _WorkerContext(worker, predictor, labels, tta_default, max_inference_s)
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    watcher_done = threading.Event()

    def watch() -> None:
        while not watcher_done.wait(0.2):
            if stop.is_set():
                worker.request_thread_stop()
                return

    watcher = threading.Thread(target=watch, name="uumamba-worker-stop", daemon=True)
    watcher.start()
    logger.info("worker started", extra={"fields": {
        "worker": name, "queue": queue_name, "device": str(getattr(predictor, "device", device)),
        "lease_s": lease_s}})
    try:
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        watcher_done.set()
        _ACTIVE = None
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        conn.close()
    logger.info("worker stopped", extra={"fields": {"worker": name, "jobs": worker.jobs_run}})
    return worker.jobs_run
