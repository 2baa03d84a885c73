"""The multi-machine job queue (issue 18): RQ on a real ``redis-server``.

(a) :class:`RedisJobStore` with an in-process worker in burst mode: life cycle, results
    identical to :func:`segment_file`, failures without server paths, deletion, caps;
(b) two worker processes and two API-side stores, 30 jobs: each ran exactly once, none lost;
    then SIGTERM gives a running job back and deleting a running job stops it;
(c) ``kill -9`` of a worker mid-job with a 2 s lease: the job is queued again by ``reap()`` and
    finished by another worker (attempt 2), or with ``max_attempts=1`` reported
    ``interrupted`` with the reason, within a few lease times.

Worker processes run ``python -c`` code calling :func:`run_worker`, with
``Predictor.predict_file`` wrapped to record (job id, pid) in Redis and to sleep (cancellably)
while the Redis key ``test:slow`` holds a number of seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from redis_server import redis_url, require_redis, start_redis  # noqa: F401  (fixture)

require_redis()

from uumamba_service.jobs import StoreFull  # noqa: E402
from uumamba_service.models import OutputFormat  # noqa: E402
from uumamba_service.redis_queue import RedisJobStore, run_worker  # noqa: E402
from uumamba_service.testing import build_tiny_model  # noqa: E402

LEASE_S = 2.0

WORKER_CODE = r"""
import faulthandler, functools, os, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test dumps a stuck worker's stacks
import torch
torch.set_num_threads(1)
import redis
from rq import get_current_job
from uumamba.inference.predict import Predictor
from uumamba.inference.sliding import InferenceCancelled
from uumamba_service.redis_queue import run_worker

model, url, queue, lease = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
r = redis.Redis.from_url(url)
orig = Predictor.predict_file

@functools.wraps(orig)
def predict_file(self, path, *args, cancel=None, **kw):
    r.rpush("test:runs", f"{get_current_job().id} {os.getpid()}")
    end = time.monotonic() + float(r.get("test:slow") or 0)
    while time.monotonic() < end:
        if cancel is not None and cancel.is_set():
            raise InferenceCancelled(cancel.reason)
        time.sleep(0.05)
    return orig(self, path, *args, cancel=cancel, **kw)

Predictor.predict_file = predict_file
n = run_worker(model, url, device="cpu", lease_s=lease, queue_name=queue)
print("RAN", n, flush=True)
"""


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model, shared with the other service test modules within a session."""
    return build_tiny_model(tmp_path_factory.getbasetemp() / "service_tiny_model")


@pytest.fixture(scope="module")
def volume(model_dir, tmp_path_factory) -> Path:
    """A small real volume (48 x 48 x 8 crop of a synthetic case): one window, ~0.1 s."""
    import nibabel as nib
    import numpy as np

    source = model_dir.parent / "data" / "images" / "synth_000.nii.gz"
    img = nib.load(str(source))
    crop = np.asarray(img.dataobj, dtype=np.float32)[20:68, 20:68, :]
    path = tmp_path_factory.mktemp("redis_volume") / "small.nii.gz"
    nib.save(nib.Nifti1Image(crop, img.affine), str(path))
    return path


def submit(store: RedisJobStore, volume: Path, fmt: OutputFormat = OutputFormat.json,
           name: str = "upload.nii.gz") -> str:
    """create -> copy the upload into the job's folder -> enqueue; returns the job id."""
    job = store.create(fmt, None, "test-api")
    upload = job.workdir / name
    shutil.copyfile(volume, upload)
    store.enqueue(job.id, upload, None, "small")
    return job.id


def wait_for(condition, timeout: float, what: str, every: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


#: Seconds a SIGTERMed worker gets to give its job back and exit. Alone it takes 1-2 s; the
#: full suite beside a training run on 2 cores once took more than 15.
STOP_S = 45.0


class WorkerProcess:
    """A ``run_worker`` subprocess (stdout/stderr in a log file)."""

    def __init__(self, model_dir: Path, url: str, queue: str, log: Path, lease_s: float = LEASE_S):
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                   PYTHONUNBUFFERED="1")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_CODE, str(model_dir), url, queue, str(lease_s)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=log.parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def ran(self) -> int:
        """Jobs reported by an exited worker."""
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("RAN "):
                return int(line.split()[1])
        raise AssertionError(f"worker {self.pid} printed no RAN line:\n{self.tail()}")

    def exit_code(self, timeout: float) -> int:
        """The exit status within ``timeout`` s; past it, the worker's thread stacks (its
        faulthandler, on SIGUSR1) go into the AssertionError raised."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            raise AssertionError(f"worker {self.pid} did not exit within {timeout:g} s of the "
                                 f"signal; its stacks:\n{self.tail()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def worker_names(url: str, queue: str) -> dict[int, str]:
    """pid -> RQ worker name of the workers registered on ``queue``."""
    import redis
    from rq import Queue, Worker

    conn = redis.Redis.from_url(url)
    try:
        return {int(w.name.split(".")[-2]): w.name
                for w in Worker.all(queue=Queue(queue, connection=conn))}
    finally:
        conn.close()


def runs(url: str) -> list[tuple[str, int]]:
    """(job id, pid) of every predict_file call recorded by the worker wrapper."""
    import redis

    conn = redis.Redis.from_url(url)
    try:
        return [(a, int(b)) for a, b in (x.decode().split() for x in conn.lrange("test:runs", 0, -1))]
    finally:
        conn.close()


def set_slow(url: str, seconds: float) -> None:
    import redis

    conn = redis.Redis.from_url(url)
    conn.set("test:slow", seconds)
    conn.close()


# ------------------------------------------------------------------ (a) unit level, in-process

def test_store_life_cycle_in_process_worker(redis_url, model_dir, volume, tmp_path):  # noqa: F811
    from uumamba.inference.predict import Predictor
    from uumamba_service.model_info import describe_model
    from uumamba_service.pipeline import segment_file

    store = RedisJobStore(redis_url, 60.0, lease_s=LEASE_S, cache_dir=tmp_path / "cache",
                          queue_name="unit")
    try:
        receiving = store.create(OutputFormat.nii_gz, None, "api-1")
        assert receiving.state == "receiving" and receiving.workdir.is_dir()
        assert store.get(receiving.id).public_state.value == "queued"
        upload = receiving.workdir / "upload.nii.gz"
        shutil.copyfile(volume, upload)
        store.enqueue(receiving.id, upload, None, "small")
        assert not upload.exists(), "the upload must move into Redis"
        queued = store.get(receiving.id)
        assert (queued.state, queued.attempts, queued.output) == ("queued", 0, None)

        json_id = submit(store, volume, OutputFormat.json)
        bad = store.create(OutputFormat.json, None, "api-1")
        (bad.workdir / "upload.nii.gz").write_bytes(b"not a volume at all")
        store.enqueue(bad.id, bad.workdir / "upload.nii.gz", None, "bad")
        gone = submit(store, volume)
        assert store.counts() == {"queued": 4, "running": 0, "done": 0, "failed": 0,
                                  "interrupted": 0}
        assert store.waiting() == 4
        assert store.delete(gone) and store.get(gone) is None and not store.delete(gone)

        assert run_worker(model_dir, redis_url, device="cpu", lease_s=LEASE_S,
                          queue_name="unit", burst=True) == 3

        done = store.get(receiving.id)
        assert (done.state, done.stage, done.progress, done.attempts) == ("done", "done", 1.0, 1)
        assert done.error is None and done.started <= done.finished < done.expires
        assert done.expires == pytest.approx(done.finished + 60, abs=2)
        assert done.owner and done.status().status.value == "done"
        result = done.output
        assert result.path == store.files / done.id / "mask.nii.gz" and result.path.is_file()

        # the same inference run directly: identical bytes and summary
        predictor = Predictor.from_model_dir(model_dir, device="cpu")
        info = describe_model(model_dir)
        direct = tmp_path / "direct"
        direct.mkdir()
        expected = segment_file(predictor, volume, direct, OutputFormat.nii_gz, None,
                                dict(predictor.labels), info.tta_default)
        assert result.path.read_bytes() == expected.path.read_bytes()
        assert result.summary == expected.summary

        as_json = store.get(json_id)
        assert as_json.state == "done" and as_json.output.path is None
        assert as_json.output.summary == expected.summary

        failed = store.get(bad.id)
        assert failed.state == "failed" and failed.output is None
        assert "not gzip-compressed" in failed.error, failed.error
        assert tempfile.gettempdir() not in failed.error and str(tmp_path) not in failed.error
        assert "Traceback" not in failed.error
        assert store.counts() == {"queued": 0, "running": 0, "done": 2, "failed": 1,
                                  "interrupted": 0}

        # a second API process (another cache folder) serves the same result
        other = RedisJobStore(redis_url, 60.0, cache_dir=tmp_path / "cache2", queue_name="unit")
        assert other.get(done.id).output.path.read_bytes() == result.path.read_bytes()
        assert other.delete(done.id) and store.get(done.id) is None
        other.close()
        store.purge_expired()
        assert not (store.files / done.id).exists(), "local cache of a deleted job left"
        assert store.counts()["done"] == 1
    finally:
        store.close()


def test_caps_free_finished_jobs_then_refuse(redis_url, model_dir, volume, tmp_path):  # noqa: F811
    store = RedisJobStore(redis_url, 60.0, cache_dir=tmp_path / "c", queue_name="caps",
                          max_jobs=2)
    try:
        oldest, newer = submit(store, volume), submit(store, volume)
        assert run_worker(model_dir, redis_url, device="cpu", queue_name="caps", burst=True) == 2
        third = submit(store, volume)  # the oldest finished job makes room
        assert store.get(oldest) is None and store.get(newer).state == "done"
        submit(store, volume)  # and the next one
        with pytest.raises(StoreFull, match="max_jobs 2"):  # two queued: nothing to free
            store.create(OutputFormat.json, None, "api")
        assert store.get(newer) is None and store.get(third).state == "queued"
        assert len(list((tmp_path / "c").iterdir())) == 2, "a refused or removed job left a folder"
    finally:
        store.close()
    small = RedisJobStore(redis_url, 60.0, cache_dir=tmp_path / "d", queue_name="capsb",
                          max_bytes=10)
    try:
        submit(small, volume)
        with pytest.raises(StoreFull, match="max_bytes 10"):
            small.create(OutputFormat.json, None, "api")
    finally:
        small.close()


def test_worker_refuses_foreign_jobs_and_stops_on_event(redis_url, model_dir, tmp_path):  # noqa: F811
    """A job naming another function is failed unrun; ``stop`` ends an idle worker at once."""
    import threading

    import redis
    from rq import Queue
    from rq.job import Job as RQJob
    from rq.serializers import JSONSerializer

    sentinel = tmp_path / "sentinel"
    sentinel.write_text("must survive")
    conn = redis.Redis.from_url(redis_url)
    Queue("foreign", connection=conn, serializer=JSONSerializer).enqueue_call(
        "os.remove", args=(str(sentinel),), job_id="f" * 32)
    stop = threading.Event()
    ran: list[int] = []
    thread = threading.Thread(target=lambda: ran.append(run_worker(
        model_dir, redis_url, device="cpu", lease_s=LEASE_S, queue_name="foreign", stop=stop)))
    thread.start()
    try:
        wait_for(lambda: RQJob.fetch("f" * 32, connection=conn, serializer=JSONSerializer)
                 .get_status().value == "failed", 30, "the foreign job to be refused")
        assert sentinel.exists(), "a foreign job ran on the worker"
        time.sleep(0.5)
        stopped = time.monotonic()
        stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive() and time.monotonic() - stopped < 3
        assert ran == [0]
    finally:
        stop.set()
        thread.join(timeout=10)
        conn.close()


def test_queued_job_survives_api_and_redis_restart(model_dir, volume, tmp_path):
    """With ``appendonly yes`` an acknowledged job survives a Redis restart and a new API
    process (another store object) finds and finishes it."""
    server = start_redis(tmp_path / "redis", appendonly=True)
    try:
        store = RedisJobStore(server.url, 60.0, cache_dir=tmp_path / "a", queue_name="durable")
        job_id = submit(store, volume, OutputFormat.nii_gz)
        store.close()  # the API process goes away
        server.restart()
        store = RedisJobStore(server.url, 60.0, cache_dir=tmp_path / "b", queue_name="durable")
        assert store.get(job_id).state == "queued" and store.waiting() == 1
        assert run_worker(model_dir, server.url, device="cpu", queue_name="durable", burst=True) == 1
        done = store.get(job_id)
        assert done.state == "done" and done.output.path.is_file()
        store.close()
    finally:
        server.stop()


# ------------------------------------------------------------------ (b) two workers, 30 jobs

def test_two_workers_run_each_job_exactly_once(redis_url, model_dir, volume, tmp_path):  # noqa: F811
    queue = "many"
    set_slow(redis_url, 0)
    api_a = RedisJobStore(redis_url, 120.0, lease_s=5.0, cache_dir=tmp_path / "api_a",
                          queue_name=queue)
    api_b = RedisJobStore(redis_url, 120.0, lease_s=5.0, cache_dir=tmp_path / "api_b",
                          queue_name=queue)
    workers = [WorkerProcess(model_dir, redis_url, queue, tmp_path / f"w{i}.log", lease_s=5.0)
               for i in range(2)]
    try:
        wait_for(lambda: len(worker_names(redis_url, queue)) == 2, 60, "two workers to register")
        names = worker_names(redis_url, queue)
        ids = [submit(api_a if i % 2 else api_b, volume) for i in range(30)]
        wait_for(lambda: api_a.counts()["done"] == 30, 90,
                 f"30 jobs done (now {api_a.counts()})", every=0.25)
        recorded = [r for r in runs(redis_url) if r[0] in set(ids)]
        assert sorted(j for j, _ in recorded) == sorted(ids), "a job ran twice or never"
        by_pid = {pid: sum(1 for _, p in recorded if p == pid) for pid in names}
        assert all(by_pid.values()), f"one worker ran nothing: {by_pid}"
        for job_id, pid in recorded:
            job = api_b.get(job_id)
            assert (job.state, job.attempts, job.owner) == ("done", 1, names[pid])
        assert api_b.counts() == {"queued": 0, "running": 0, "done": 30, "failed": 0,
                                  "interrupted": 0}
        assert api_a.waiting() == 0

        # SIGTERM mid-job: the job is given back (no attempt spent), the worker exits
        set_slow(redis_url, 60)
        slow_id = submit(api_a, volume)
        running = wait_for(lambda: (j := api_a.get(slow_id)) and j.state == "running"
                           and j.stage == "predicting" and j, 30, "the slow job to run")
        first = next(w for w in workers if names[w.pid] == running.owner)
        second = next(w for w in workers if w is not first)
        first.proc.send_signal(signal.SIGTERM)
        assert first.exit_code(STOP_S) == 0, first.tail()
        assert first.ran() == by_pid[first.pid]
        # ... and the other worker takes it: deleting it there stops it within a batch
        again = wait_for(lambda: (j := api_b.get(slow_id)) and j.state == "running"
                         and j.owner == names[second.pid] and j.stage == "predicting" and j,
                         30, "the given-back job to run on the other worker")
        assert again.attempts == 1, "a given-back job must not spend an attempt"
        assert api_b.delete(slow_id) and api_a.get(slow_id) is None
        try:
            wait_for(lambda: api_a.counts()["running"] == 0 and not _job_keys(redis_url, slow_id),
                     10, "the deleted job to stop and vanish")
        except AssertionError:
            raise AssertionError(f"keys left: {_job_keys(redis_url, slow_id)}\n{second.tail()}") from None
        second.proc.send_signal(signal.SIGTERM)
        assert second.exit_code(STOP_S) == 0, second.tail()
        assert second.ran() == by_pid[second.pid] + 1  # the deleted job ran to an outcome
    finally:
        for w in workers:
            w.stop()
        api_a.close()
        api_b.close()
        set_slow(redis_url, 0)


def _job_keys(url: str, job_id: str) -> list[str]:
    """Redis keys naming ``job_id``, but the deletion's own markers (they expire)."""
    import redis

    conn = redis.Redis.from_url(url)
    try:
        return [k.decode() for k in conn.keys(f"*{job_id}*")
                if b":deleted:" not in k and b":cancel:" not in k]
    finally:
        conn.close()


# ------------------------------------------------------------------ (c) kill -9 mid-job

def test_killed_worker_job_is_requeued_or_interrupted(redis_url, model_dir, volume, tmp_path):  # noqa: F811
    set_slow(redis_url, 60)
    retry = RedisJobStore(redis_url, 120.0, lease_s=LEASE_S, max_attempts=2,
                          cache_dir=tmp_path / "retry", queue_name="kill2")
    once = RedisJobStore(redis_url, 120.0, lease_s=LEASE_S, max_attempts=1,
                         cache_dir=tmp_path / "once", queue_name="kill1")
    doomed = [WorkerProcess(model_dir, redis_url, "kill2", tmp_path / "a.log"),
              WorkerProcess(model_dir, redis_url, "kill1", tmp_path / "c.log")]
    rescuer = None
    try:
        retry_id, once_id = submit(retry, volume), submit(once, volume)
        for store, job_id in ((retry, retry_id), (once, once_id)):
            wait_for(lambda s=store, i=job_id: (j := s.get(i)) and j.stage == "predicting",
                     60, f"job {job_id} to run")
        first_owner = retry.get(retry_id).owner
        for w in doomed:
            w.proc.send_signal(signal.SIGKILL)
            w.proc.wait(timeout=10)
        killed = time.monotonic()
        set_slow(redis_url, 0)
        rescuer = WorkerProcess(model_dir, redis_url, "kill2", tmp_path / "b.log")

        reaped = 0

        def interrupted():
            nonlocal reaped
            reaped += once.reap()
            retry.reap()
            job = once.get(once_id)
            return job if job.state == "interrupted" else None

        job = wait_for(interrupted, 4 * LEASE_S + 2, "the lost job (max_attempts=1) to be interrupted",
                       every=0.2)
        assert time.monotonic() - killed < 4 * LEASE_S + 2
        assert reaped >= 1
        assert "stopped (no heartbeat" in job.error and "attempt 1 of 1" in job.error, job.error
        assert job.attempts == 1 and job.finished is not None and job.expires is not None
        assert once.counts()["interrupted"] == 1

        requeued = wait_for(lambda: (retry.reap() or True) and (j := retry.get(retry_id))
                            and j.state != "running" and j, 4 * LEASE_S + 2,
                            "the lost job (max_attempts=2) to be queued again", every=0.2)
        assert requeued.state in ("queued", "done"), requeued
        done = wait_for(lambda: (j := retry.get(retry_id)) and j.state == "done" and j, 60,
                        "the re-queued job to finish on the second worker", every=0.2)
        assert done.attempts == 2 and done.owner != first_owner and done.output is not None
        assert [p for j, p in runs(redis_url) if j == retry_id] == [doomed[0].pid, rescuer.pid]
    finally:
        for w in (*doomed, *([rescuer] if rescuer else [])):
            w.stop()
        retry.close()
        once.close()
        set_slow(redis_url, 0)


def test_crafted_redis_records_reach_no_file_and_no_code(redis_url, model_dir, volume, tmp_path):  # noqa: F811
    """Whoever can write to Redis: a result name that is a path is refused (no file read or
    written outside the job's cache folder), and callbacks named in a job hash are never
    imported or called, by the worker or by the API's reap."""
    import json

    import redis

    from uumamba_service.redis_queue import _job_class

    conn = redis.Redis.from_url(redis_url)
    store = RedisJobStore(redis_url, 60.0, lease_s=LEASE_S, cache_dir=tmp_path / "cache",
                          queue_name="crafted")
    try:
        marker = tmp_path / "called"
        hooked = submit(store, volume)
        # a callback that would leave a file behind if RQ ever imported and called it
        conn.hset(f"rq:job:{hooked}", mapping={"success_callback_name": "pathlib.Path.touch",
                                               "failure_callback_name": "os.remove"})
        assert _job_class().fetch(hooked, connection=conn).success_callback is None
        assert run_worker(model_dir, redis_url, device="cpu", lease_s=LEASE_S,
                          queue_name="crafted", burst=True) == 1
        assert store.get(hooked).state == "done" and not marker.exists()

        for name in ("/etc/passwd", "../../../../tmp/pwned.txt", "..", f"../{hooked}/mask.nii.gz"):
            meta = json.loads(conn.hget(f"rq:job:{hooked}", "meta"))
            meta["result_name"] = name
            conn.hset(f"rq:job:{hooked}", "meta", json.dumps(meta))
            conn.rpush(f"uumamba:crafted:out:{hooked}", b"OWNED")
            job = store.get(hooked)
            assert (job.state, job.error, job.output) == ("failed", "corrupt job record", None), name
        assert not Path("/tmp/pwned.txt").exists()
    finally:
        store.close()
