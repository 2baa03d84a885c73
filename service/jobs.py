"""Durable asynchronous jobs: one SQLite store shared by every process of one host.

A job lives in the service's state folder (``ServiceSettings.state_dir``), not in a process:
its row in ``jobs.sqlite3`` (state, stage, progress, times, error, result summary) and its
folder ``jobs/<id>/`` (upload, then result). Once ``POST /v1/jobs`` has answered 202 the job is
known to every API process and worker that opens the same folder, and it survives a restart
of any of them until it expires (``job_ttl_s`` after it finished).

Life cycle: ``receiving`` (upload streaming; shown as ``queued``) -> ``queued`` ->
``running`` (claimed by one worker) -> ``done`` | ``failed`` | ``interrupted``. A worker
claims a job in one ``BEGIN IMMEDIATE`` transaction (so one job runs once) and holds it by a
lease it renews every ``lease_s / 4`` seconds. A job whose lease ran out, or whose worker
process on this host is gone, is *lost*: it is queued again while it has attempts left
(``lost_jobs="requeue"``, at most ``max_attempts`` claims), else marked ``interrupted`` with
the reason. A worker stopped gracefully gives its job back without spending an attempt.

Storage is bounded: at most ``max_jobs`` jobs and ``max_bytes`` of job files; the oldest
finished jobs are removed first, and a submission that would still exceed a cap is refused
(:class:`StoreFull`). Rows are written with ``synchronous=FULL`` in WAL mode, so a job
acknowledged with 202 survives a power cut as well as a crash.

The lease scheme is the one of distributed work queues (e.g. Amazon SQS's visibility timeout,
RQ's started-job registry): ownership expires unless renewed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .models import JobState, JobStatus, OutputFormat, VolumeSummary
from .pipeline import SegmentationOutput
from .worker import CancelToken

#: Name of the SQLite database inside the state folder.
DB_NAME = "jobs.sqlite3"
#: Seconds a transaction waits for another process's write lock before ``sqlite3.OperationalError``
#: ("database is locked"; the API answers 503). Normal transactions hold it for milliseconds.
BUSY_TIMEOUT_S = 5.0
#: Seconds a job folder without a row may exist before :meth:`JobStore.purge_expired` removes
#: it (a worker killed after its job was deleted, a crash between folder and row).
ORPHAN_AGE_S = 60.0
_FINISHED = ("done", "failed", "interrupted")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    stage TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    format TEXT NOT NULL,
    tta INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    expires REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    input_name TEXT,
    es_name TEXT,
    stem TEXT,
    summary TEXT,
    result_name TEXT,
    bytes INTEGER NOT NULL DEFAULT 0,
    model TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created);
"""


class StoreFull(Exception):
    """The job store holds ``max_jobs`` jobs or ``max_bytes`` of files that cannot be freed
    (none of them finished)."""


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def process_id() -> str:
    """This process as a job owner: ``host:pid:token`` (the token tells apart a reused pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_gone(owner: str | None) -> bool:
    """True when ``owner`` names a process of this host that no longer runs.

    Only speeds up detection: an owner on another host, or a pid that is alive (or reused),
    is left to its lease.
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, someone else's
        return False
    return False


@dataclass(frozen=True)
class Job:
    """A snapshot of one job's row (read again with :meth:`JobStore.get` to see changes).

    Times are ``time.time()`` seconds. ``workdir`` is the job's private folder; ``input`` and
    ``es_input`` its uploaded volumes there (``None`` once deleted or for no second phase).
    """

    id: str
    workdir: Path
    state: str
    stage: str
    progress: float
    format: OutputFormat
    tta: bool | None
    created: float
    started: float | None
    finished: float | None
    expires: float | None
    error: str | None
    attempts: int
    owner: str | None
    input_name: str | None
    es_name: str | None
    stem: str | None
    summary: str | None
    result_name: str | None
    model: str | None = None  # version of the model the job is for (ModelInfo.version)

    @property
    def public_state(self) -> JobState:
        """The state clients see (``receiving`` is shown as ``queued``)."""
        return JobState.queued if self.state == "receiving" else JobState(self.state)

    @property
    def input(self) -> Path | None:
        return self.workdir / self.input_name if self.input_name else None

    @property
    def es_input(self) -> Path | None:
        return self.workdir / self.es_name if self.es_name else None

    @property
    def output(self) -> SegmentationOutput | None:
        """What a finished job produced (``None`` unless ``done``)."""
        if self.state != "done" or self.summary is None:
            return None
        path = self.workdir / self.result_name if self.result_name else None
        return SegmentationOutput(self.format, path, VolumeSummary.model_validate_json(self.summary))

    def status(self) -> JobStatus:
        """The public view of this job."""
        return JobStatus(
            id=self.id, status=self.public_state, stage=self.stage, progress=self.progress,
            format=self.format, tta=self.tta, created_at=_utc(self.created),
            started_at=_utc(self.started), finished_at=_utc(self.finished),
            expires_at=_utc(self.expires), error=self.error, attempts=self.attempts,
            model_version=self.model,
        )


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


class JobStore:
    """The durable job store in ``root`` (``root/jobs.sqlite3`` and ``root/jobs/<id>/``).

    Every method opens its own short transaction, so one store object may be used from many
    threads, and many processes may open the same ``root``.

    Args:
        root: the state folder (created, mode 0700).
        ttl_s: seconds a finished job (and its result) is kept.
        lease_s: seconds a claim lasts unless renewed by :meth:`heartbeat`.
        max_attempts: claims of one job before a lost job is ``interrupted`` (>= 1).
        lost_jobs: ``requeue`` (queue a lost job again while attempts are left) or
            ``interrupt`` (mark it ``interrupted`` at once).
        max_jobs / max_bytes: caps on stored jobs and on their files' bytes.
        upload_reserve_bytes: bytes counted for an upload still streaming (``receiving``),
            the largest accepted upload, so that concurrent uploads cannot overshoot
            ``max_bytes``; replaced by the real size once queued.

    Raises:
        OSError: ``root`` cannot be created or the database opened.
        ValueError: a bad argument.
    """

    def __init__(self, root: Path, ttl_s: float, *, lease_s: float = 30.0, max_attempts: int = 2,
                 lost_jobs: str = "requeue", max_jobs: int = 1000,
                 max_bytes: int = 20 * 1024**3, upload_reserve_bytes: int = 0) -> None:
        if lost_jobs not in ("requeue", "interrupt"):
            raise ValueError(f"lost_jobs must be 'requeue' or 'interrupt', got {lost_jobs!r}")
        if max_attempts < 1 or lease_s <= 0:
            raise ValueError("max_attempts must be >= 1 and lease_s > 0")
        self.root = Path(root)
        self.files = self.root / "jobs"
        self.ttl_s, self.lease_s, self.max_attempts = ttl_s, lease_s, max_attempts
        self.lost_jobs, self.max_jobs, self.max_bytes = lost_jobs, max_jobs, max_bytes
        self.upload_reserve_bytes = min(max(0, upload_reserve_bytes), max_bytes)
        self.files.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self._local = threading.local()
        self._tokens: dict[str, CancelToken] = {}  # jobs running in this process
        self._tokens_lock = threading.Lock()
        db = self._db()
        db.executescript(_SCHEMA)  # its own transaction
        if "model" not in {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}:
            db.execute("ALTER TABLE jobs ADD COLUMN model TEXT")  # a store of an earlier release

    # ------------------------------------------------------------ plumbing

    @property
    def heartbeat_s(self) -> float:
        """How often a worker renews its lease (a quarter of it, at least 0.1 s)."""
        return max(0.1, self.lease_s / 4)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / DB_NAME, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (``BEGIN IMMEDIATE``), committed or rolled back."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _job(self, row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
        return Job(
            id=row["id"], workdir=self.files / row["id"], state=row["state"], stage=row["stage"],
            progress=row["progress"], format=OutputFormat(row["format"]),
            tta=None if row["tta"] is None else bool(row["tta"]), created=row["created"],
            started=row["started"], finished=row["finished"], expires=row["expires"],
            error=row["error"], attempts=row["attempts"], owner=row["owner"],
            input_name=row["input_name"], es_name=row["es_name"], stem=row["stem"],
            summary=row["summary"], result_name=row["result_name"], model=row["model"])

    def _remove_files(self, job_id: str) -> None:
        shutil.rmtree(self.files / job_id, ignore_errors=True)

    # ------------------------------------------------------------ the API side

    def create(self, fmt: OutputFormat, tta: bool | None, owner: str, model: str | None = None) -> Job:
        """Register a job in ``receiving`` with a new random id and an empty folder.

        ``model``: the version of the model it is for; only workers of that version take it
        (:meth:`claim`).

        Raises:
            StoreFull: ``max_jobs`` jobs are stored and none can be freed.
            OSError: the folder cannot be created (disk full, permissions); nothing is kept.
        """
        self.purge_expired()
        job_id = uuid.uuid4().hex
        workdir = self.files / job_id
        reserve = self.upload_reserve_bytes
        with self._tx() as db:
            count, stored = db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM jobs").fetchone()
            if count >= self.max_jobs:
                raise StoreFull(f"job store full: {count} jobs (max_jobs {self.max_jobs})")
            if stored + max(reserve, 1) > self.max_bytes:
                raise StoreFull(f"job store full: {stored} bytes of job files and uploads "
                                f"(max_bytes {self.max_bytes})")
            db.execute("INSERT INTO jobs (id, state, stage, format, tta, created, owner, bytes, model) "
                       "VALUES (?, 'receiving', 'queued', ?, ?, ?, ?, ?, ?)",
                       (job_id, fmt.value, None if tta is None else int(tta), time.time(), owner,
                        reserve, model))
        try:  # after the commit: a folder never outlives a failed transaction
            workdir.mkdir(mode=0o700)
        except BaseException:
            with self._tx() as db:
                db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            raise
        return self.get(job_id)

    def enqueue(self, job_id: str, input_path: Path, es_path: Path | None, stem: str) -> None:
        """The upload of a ``receiving`` job is complete and checked: queue it.

        ``input_path`` / ``es_path`` lie in the job's folder (names are stored, not paths).
        """
        workdir = self.files / job_id
        for path in (input_path, es_path):
            if path is not None and path.parent != workdir:
                raise ValueError(f"upload {path.name} is not in the job's folder")
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='queued', owner=NULL, input_name=?, es_name=?, stem=?, "
                       "bytes=? WHERE id=? AND state='receiving'",
                       (input_path.name, es_path.name if es_path else None, stem,
                        _folder_bytes(workdir), job_id))

    def get(self, job_id: str) -> Job | None:
        """The job, or ``None`` when unknown, deleted or expired."""
        row = self._db().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        job = self._job(row)
        if job is not None and job.expires is not None and job.expires <= time.time():
            return None
        return job

    def delete(self, job_id: str) -> bool:
        """Forget a job and remove its folder; a running one is cancelled first (in this
        process at once, in another at its next heartbeat) and its folder removed when it
        stops.

        Returns:
            ``False`` when the job is unknown or expired.
        """
        with self._tx() as db:
            row = db.execute("SELECT state, expires FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or (row["expires"] is not None and row["expires"] <= time.time()):
                return False
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        with self._tokens_lock:
            token = self._tokens.get(job_id)
        if token is not None:
            token.cancel("job deleted")
        if row["state"] != "running":
            self._remove_files(job_id)
        return True

    def counts(self) -> dict[str, int]:
        """Number of live jobs per public state (for /metrics)."""
        counts = {state.value: 0 for state in JobState}
        now = time.time()
        for row in self._db().execute("SELECT state, COUNT(*) AS n FROM jobs WHERE expires IS NULL "
                                      "OR expires > ? GROUP BY state", (now,)):
            state = "queued" if row["state"] == "receiving" else row["state"]
            counts[state] += row["n"]
        return counts

    def waiting(self, model: str | None = None) -> int:
        """Jobs queued (uploaded, not yet claimed); with ``model``, those a worker of that
        model version may take."""
        return self._db().execute("SELECT COUNT(*) FROM jobs WHERE state='queued' AND (model IS NULL "
                                  "OR ? IS NULL OR model=?)", (model, model)).fetchone()[0]

    # ------------------------------------------------------------ the worker side

    def claim(self, owner: str, model: str | None = None) -> Job | None:
        """Take the oldest queued job for ``owner`` (one transaction: one job runs once).

        ``model``: take only jobs for this model version (and jobs that name none); a worker
        serving another model leaves them to the right one.

        Returns:
            The job, now ``running`` with a lease of ``lease_s``; ``None`` when none waits.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state='queued' AND (model IS NULL OR ? IS NULL "
                             "OR model=?) ORDER BY created LIMIT 1", (model, model)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', stage='starting', progress=0, owner=?, "
                       "lease_until=?, attempts=attempts+1, started=? WHERE id=?",
                       (owner, now + self.lease_s, now, row["id"]))
        return self.get(row["id"])

    def running_token(self, job_id: str) -> CancelToken:
        """The cancel flag of a job this process runs (set by :meth:`delete` at once)."""
        with self._tokens_lock:
            return self._tokens.setdefault(job_id, CancelToken())

    def cancel_running(self, reason: str) -> int:
        """Cancel every job this process runs (e.g. :data:`~uumamba_service.runner.STOPPING`
        at shutdown); returns how many."""
        with self._tokens_lock:
            tokens = list(self._tokens.values())
        for token in tokens:
            token.cancel(reason)
        return len(tokens)

    def heartbeat(self, job_id: str, owner: str) -> bool:
        """Renew ``owner``'s lease; ``False`` when the job is no longer its own (deleted,
        or lost and given to someone else): the worker must stop it."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET lease_until=? WHERE id=? AND owner=? AND state='running'",
                             (time.time() + self.lease_s, job_id, owner))
        return cur.rowcount == 1

    def mark(self, job_id: str, owner: str, stage: str, progress: float) -> None:
        """Progress report of the owning worker (progress never goes back)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET stage=?, progress=MAX(progress, ?) "
                       "WHERE id=? AND owner=? AND state='running'", (stage, progress, job_id, owner))

    def finish(self, job_id: str, owner: str, output: SegmentationOutput | None,
               error: str | None) -> bool:
        """Record success (``output``) or failure (``error``); start the expiry clock.

        Only the owner's record counts: a job deleted meanwhile has its folder removed here,
        and one lost to another worker is left to that worker. A failed job's files go.

        Returns:
            Whether the outcome was recorded.
        """
        now = time.time()
        workdir = self.files / job_id
        with self._tx() as db:
            if error is None:
                row = db.execute("SELECT input_name, es_name FROM jobs WHERE id=? AND owner=?",
                                 (job_id, owner)).fetchone()
                for name in (row["input_name"], row["es_name"]) if row else ():
                    if name:
                        (workdir / name).unlink(missing_ok=True)
                result = output.path.name if output is not None and output.path is not None else None
                cur = db.execute(
                    "UPDATE jobs SET state='done', stage='done', progress=1, finished=?, expires=?, "
                    "summary=?, result_name=?, input_name=NULL, es_name=NULL, lease_until=NULL, "
                    "bytes=? WHERE id=? AND owner=? AND state='running'",
                    (now, now + self.ttl_s, output.summary.model_dump_json() if output else None,
                     result, _folder_bytes(workdir), job_id, owner))
            else:
                cur = db.execute(
                    "UPDATE jobs SET state='failed', stage='failed', finished=?, expires=?, error=?, "
                    "input_name=NULL, es_name=NULL, lease_until=NULL, bytes=0 "
                    "WHERE id=? AND owner=? AND state='running'",
                    (now, now + self.ttl_s, error, job_id, owner))
            recorded = cur.rowcount == 1
            gone = db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone() is None
        with self._tokens_lock:
            self._tokens.pop(job_id, None)
        if gone or (recorded and error is not None):
            self._remove_files(job_id)
        return recorded

    def give_back(self, job_id: str, owner: str) -> None:
        """A worker stopping gracefully returns its running job: queued again (the attempt
        not counted) or, with ``lost_jobs="interrupt"``, marked ``interrupted``."""
        with self._tokens_lock:
            self._tokens.pop(job_id, None)
        with self._tx() as db:
            if self.lost_jobs == "requeue":
                db.execute("UPDATE jobs SET state='queued', stage='queued', owner=NULL, lease_until=NULL, "
                           "attempts=MAX(attempts-1, 0) WHERE id=? AND owner=? AND state='running'",
                           (job_id, owner))
            else:
                self._interrupt(db, job_id, "the worker running this job was stopped; resubmit it")

    def _interrupt(self, db: sqlite3.Connection, job_id: str, reason: str) -> None:
        now = time.time()
        db.execute("UPDATE jobs SET state='interrupted', stage='interrupted', finished=?, expires=?, "
                   "error=?, owner=NULL, lease_until=NULL WHERE id=?",
                   (now, now + self.ttl_s, reason, job_id))

    def reap(self, now: float | None = None) -> int:
        """Recover lost jobs: running ones whose lease ran out or whose worker on this host is
        gone (queued again or ``interrupted``, see the class), and uploads left ``receiving``
        by an API process that is gone (removed).

        Returns:
            How many jobs were recovered or removed.
        """
        now = time.time() if now is None else now
        db = self._db()
        rows = db.execute("SELECT id, state, owner, lease_until, attempts, created FROM jobs "
                          "WHERE state IN ('running', 'receiving')").fetchall()
        lost = [r for r in rows if r["state"] == "running"
                and ((r["lease_until"] or 0) < now or _owner_is_gone(r["owner"]))]
        abandoned = [r["id"] for r in rows if r["state"] == "receiving"
                     and (_owner_is_gone(r["owner"]) or r["created"] < now - 24 * 3600)]
        if not lost and not abandoned:
            return 0
        with self._tx() as db:
            for row in lost:
                still = db.execute("SELECT owner FROM jobs WHERE id=? AND state='running'",
                                   (row["id"],)).fetchone()
                if still is None or still["owner"] != row["owner"]:
                    continue  # finished or renewed meanwhile
                if self.lost_jobs == "requeue" and row["attempts"] < self.max_attempts:
                    db.execute("UPDATE jobs SET state='queued', stage='queued', owner=NULL, "
                               "lease_until=NULL WHERE id=?", (row["id"],))
                else:
                    how = ("its process is gone" if _owner_is_gone(row["owner"])
                           else f"no heartbeat within the lease of {self.lease_s:g} s")
                    self._interrupt(db, row["id"], (
                        f"the worker running this job stopped ({how}; attempt {row['attempts']} "
                        f"of {self.max_attempts}); resubmit it"))
            for job_id in abandoned:
                db.execute("DELETE FROM jobs WHERE id=? AND state='receiving'", (job_id,))
        for job_id in abandoned:
            self._remove_files(job_id)
        return len(lost) + len(abandoned)

    # ------------------------------------------------------------ expiry and caps

    def purge_expired(self, now: float | None = None) -> int:
        """Delete finished jobs whose ``expires`` has passed, then the oldest finished ones
        while more than ``max_jobs`` jobs or ``max_bytes`` of files are stored.

        Returns:
            How many jobs were removed.
        """
        now = time.time() if now is None else now
        removed: list[str] = []
        with self._tx() as db:
            removed += [r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE expires IS NOT NULL AND expires <= ?", (now,))]
            count, stored = db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM jobs "
                                       "WHERE expires IS NULL OR expires > ?", (now,)).fetchone()
            room = max(self.upload_reserve_bytes, 1)  # keep room for one more submission
            if count > self.max_jobs - 1 or stored + room > self.max_bytes:
                for row in db.execute("SELECT id, bytes FROM jobs WHERE state IN (?, ?, ?) AND expires > ? "
                                      "ORDER BY finished", (*_FINISHED, now)):
                    if count <= self.max_jobs - 1 and stored + room <= self.max_bytes:
                        break
                    removed.append(row["id"])
                    count, stored = count - 1, stored - row["bytes"]
            db.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in removed])
        for job_id in removed:
            self._remove_files(job_id)
        return len(removed) + self._sweep_orphans(now)

    def _sweep_orphans(self, now: float) -> int:
        """Remove job folders that have had no row for ``ORPHAN_AGE_S`` (returns how many)."""
        known = {r["id"] for r in self._db().execute("SELECT id FROM jobs")}
        removed = 0
        for folder in self.files.iterdir():
            if folder.name in known or folder.is_symlink() or not folder.is_dir():
                continue
            with contextlib.suppress(OSError):
                if now - folder.stat().st_mtime < ORPHAN_AGE_S:
                    continue  # being created: its row is committed first, then the folder
                if self._db().execute("SELECT 1 FROM jobs WHERE id=?", (folder.name,)).fetchone() is None:
                    shutil.rmtree(folder, ignore_errors=True)  # still no row: an orphan
                    removed += 1
        return removed

    def close(self) -> None:
        """Close this thread's database connection (others close when their thread ends)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def open_state_folder(settings) -> JobStore:
    """The SQLite job store of ``settings`` (:class:`~uumamba_service.settings.ServiceSettings`:
    ``resolved_state_dir``, TTL, lease, caps) for a CLI command.

    Raises:
        UserError: the folder cannot be created, or its database is not one (corrupt or
            foreign file), or it stays locked; one line naming the folder.
    """
    from uumamba.errors import UserError

    folder = settings.resolved_state_dir
    try:
        return JobStore(folder, settings.job_ttl_s, **settings.job_store_options())
    except OSError as exc:
        raise UserError(f"cannot open the job state folder {folder}: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:
        raise UserError(f"cannot open the job store {folder / DB_NAME}: {exc} (move the file "
                        "away to start with an empty store)") from None
