"""The durable job store (issue 18): jobs survive restarts, one job runs once, lost workers.

Unit tests drive :class:`uumamba_service.jobs.JobStore` directly (claims from two processes,
leases, caps, expiry); the end-to-end tests start real ``uumamba serve`` / ``uumamba worker``
processes on one state folder, kill them (SIGKILL and SIGTERM) mid-job, and check what the
next process serves. A predictor slowed by ``UUMAMBA_TEST_SLOW_S`` seconds per volume
(:mod:`slow_cli`, started by :mod:`service_processes`) keeps a job running long enough to be
interrupted.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_processes import free_port, serve, start, stop, submit, tiny, wait  # noqa: F401

from uumamba_service.jobs import JobStore, StoreFull
from uumamba_service.models import OutputFormat, VolumeSummary
from uumamba_service.pipeline import SegmentationOutput

# ------------------------------------------------------------------ the store alone

def _queued(store: JobStore, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        job = store.create(OutputFormat.json, None, "api")
        (job.workdir / "in.nii.gz").write_bytes(b"x" * 10)
        store.enqueue(job.id, job.workdir / "in.nii.gz", None, "case")
        ids.append(job.id)
    return ids


def _summary() -> VolumeSummary:
    return VolumeSummary(shape=[2, 2, 2], spacing_mm=[1.0, 1.0, 1.0], voxel_volume_ml=0.001,
                         voxel_counts={"LV": 3}, volumes_ml={"LV": 0.003}, tta=False)


def _claim_all(root: str, owner: str, out) -> None:
    store = JobStore(Path(root), 60.0)
    taken = []
    while (job := store.claim(owner)) is not None:
        taken.append(job.id)
        store.finish(job.id, owner, SegmentationOutput(OutputFormat.json, None, _summary()), None)
    out.put(taken)


def test_two_processes_claim_each_job_once(tmp_path):
    store = JobStore(tmp_path, 60.0)
    ids = _queued(store, 40)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), f"w{i}", out)) for i in range(2)]
    for p in procs:
        p.start()
    taken = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(taken[0] + taken[1]) == sorted(ids)  # every job once, none twice, none lost
    assert store.counts()["done"] == 40 and store.waiting() == 0


def test_lost_lease_requeues_then_interrupts(tmp_path):
    store = JobStore(tmp_path, 60.0, lease_s=0.2, max_attempts=2)
    (job_id,) = _queued(store, 1)
    owner = "otherhost:1:x"  # another machine: only its lease tells
    assert store.claim(owner).id == job_id
    assert store.reap() == 0  # lease still valid
    assert store.heartbeat(job_id, owner)
    time.sleep(0.3)
    assert store.reap() == 1
    job = store.get(job_id)
    assert job.state == "queued" and job.attempts == 1
    assert not store.heartbeat(job_id, owner)  # the lost worker learns it is no longer its job
    assert store.claim("otherhost:2:y").attempts == 2
    time.sleep(0.3)
    assert store.reap() == 1
    job = store.get(job_id)
    assert job.state == "interrupted" and job.status().status.value == "interrupted"
    assert "attempt 2 of 2" in job.error and job.expires is not None
    # the first owner's late result does not overwrite the outcome
    assert not store.finish(job_id, owner, SegmentationOutput(OutputFormat.json, None, _summary()), None)


def test_dead_worker_on_this_host_is_detected_at_once(tmp_path):
    store = JobStore(tmp_path, 60.0, lease_s=3600.0, lost_jobs="interrupt")
    (job_id,) = _queued(store, 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = f"{socket.gethostname()}:{dead.pid}:x"
    store.claim(owner)
    assert store.reap() == 1  # no need to wait an hour of lease
    job = store.get(job_id)
    assert job.state == "interrupted" and "its process is gone" in job.error
    assert store.get(job_id).status().attempts == 1


def test_give_back_does_not_spend_an_attempt(tmp_path):
    store = JobStore(tmp_path, 60.0, max_attempts=1)
    (job_id,) = _queued(store, 1)
    store.claim("me")
    store.give_back(job_id, "me")
    job = store.get(job_id)
    assert job.state == "queued" and job.attempts == 0
    assert store.claim("me").attempts == 1


def test_caps_remove_the_oldest_finished_first_and_refuse_beyond(tmp_path):
    store = JobStore(tmp_path, 60.0, max_jobs=3)
    ids = _queued(store, 3)
    with pytest.raises(StoreFull, match="3 jobs"):
        store.create(OutputFormat.json, None, "api")  # all three are waiting: nothing to free
    for job_id in ids[:2]:
        store.claim("w")
        store.finish(job_id, "w", SegmentationOutput(OutputFormat.json, None, _summary()), None)
    store.create(OutputFormat.json, None, "api")  # frees the oldest finished job
    assert store.get(ids[0]) is None and not (store.files / ids[0]).exists()
    assert store.get(ids[1]).state == "done" and store.get(ids[2]).state == "queued"


def test_expired_jobs_are_gone_with_their_files(tmp_path):
    store = JobStore(tmp_path, 0.2)
    (job_id,) = _queued(store, 1)
    store.claim("w")
    assert store.finish(job_id, "w", None, "bad input")  # a failure keeps no files
    assert store.get(job_id).error == "bad input" and not (store.files / job_id).exists()
    time.sleep(0.3)
    assert store.get(job_id) is None and store.purge_expired() == 1
    assert store.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0, "interrupted": 0}


def test_deleting_a_running_job_stops_its_worker(tmp_path):
    store = JobStore(tmp_path, 60.0)
    (job_id,) = _queued(store, 1)
    store.claim("w")
    token = store.running_token(job_id)
    assert store.delete(job_id) and token.is_set() and token.reason == "job deleted"
    assert (store.files / job_id).exists()  # the worker still uses it ...
    assert not store.heartbeat(job_id, "w")
    store.finish(job_id, "w", None, "inference cancelled (job deleted)")
    assert not (store.files / job_id).exists()  # ... and removes it when it stops
    assert store.get(job_id) is None and not store.delete(job_id)


def test_uploads_in_progress_count_against_the_byte_cap(tmp_path):
    store = JobStore(tmp_path, 60.0, max_bytes=1000, upload_reserve_bytes=400)
    first = store.create(OutputFormat.json, None, "api")
    store.create(OutputFormat.json, None, "api")  # two uploads streaming: 800 of 1000 bytes held
    with pytest.raises(StoreFull, match="bytes"):
        store.create(OutputFormat.json, None, "api")
    (first.workdir / "in.nii.gz").write_bytes(b"x" * 10)
    store.enqueue(first.id, first.workdir / "in.nii.gz", None, "case")  # real size replaces 400
    store.create(OutputFormat.json, None, "api")


def test_orphan_folders_are_swept(tmp_path):
    store = JobStore(tmp_path, 60.0)
    (job_id,) = _queued(store, 1)
    orphan = store.files / ("f" * 32)
    orphan.mkdir()
    (orphan / "upload.nii.gz").write_bytes(b"x")
    fresh = store.files / ("e" * 32)
    fresh.mkdir()
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    assert store.purge_expired() == 1
    assert not orphan.exists() and fresh.exists() and (store.files / job_id).exists()


def test_a_corrupt_database_is_one_line(tmp_path):
    from uumamba.errors import UserError
    from uumamba_service.jobs import open_state_folder
    from uumamba_service.settings import ServiceSettings

    (tmp_path / "jobs.sqlite3").write_bytes(b"not a database" * 100)
    settings = ServiceSettings(model_dir=tmp_path, state_dir=tmp_path)
    with pytest.raises(UserError, match="cannot open the job store .*jobs.sqlite3"):
        open_state_folder(settings)


def test_an_unavailable_store_is_503_json_and_not_ready(tiny, monkeypatch):  # noqa: F811
    import sqlite3

    from fastapi.testclient import TestClient
    from service_fixtures import service_settings, wait_ready

    from uumamba_service.app import create_app

    model, volume = tiny
    app = create_app(service_settings(model))
    with TestClient(app) as client:
        wait_ready(client)
        jobs = app.state.service.jobs

        def locked(*args, **kwargs):
            raise sqlite3.OperationalError(f"database is locked: {jobs.root}")

        for name in ("get", "create", "waiting", "delete"):
            monkeypatch.setattr(jobs, name, locked)
        answers = [client.get("/v1/jobs/" + "a" * 32), client.delete("/v1/jobs/" + "a" * 32)]
        with volume.open("rb") as f:
            answers.append(client.post("/v1/jobs", files={"file": (volume.name, f)}))
        for r in answers:
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert r.json()["detail"].startswith("job store unavailable")
            assert str(jobs.root) not in r.text
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "job store unavailable" in ready.json()["detail"]
        assert client.get("/healthz").status_code == 200


# ------------------------------------------------------------------ real processes

def test_jobs_survive_a_killed_and_a_stopped_server(tiny, tmp_path):  # noqa: F811
    model, volume = tiny
    state, log = tmp_path / "state", tmp_path / "serve.log"
    port = free_port()
    proc, base = serve(model, state, port, log)
    try:
        finished = submit(base, volume)
        done = wait(base, finished, ("done",))
        result = httpx.get(f"{base}/v1/jobs/{finished}/result", timeout=30).json()
        running = submit(base, volume)
        wait(base, running, ("running",))
        stop(proc, signal.SIGKILL)  # mid-job, no shutdown at all

        proc, base = serve(model, state, port, log)
        again = httpx.get(f"{base}/v1/jobs/{finished}", timeout=10).json()
        assert again["status"] == "done" and again["finished_at"] == done["finished_at"]
        assert httpx.get(f"{base}/v1/jobs/{finished}/result", timeout=30).json() == result
        # the killed server's job: its process is gone, so it is queued again at once and run
        body = wait(base, running, ("done", "failed", "interrupted"))
        assert body["status"] == "done" and body["attempts"] == 2, body
        assert httpx.get(f"{base}/v1/jobs/{running}/result", timeout=30).json()["volumes_ml"] == result["volumes_ml"]

        stopped = submit(base, volume)
        wait(base, stopped, ("running",))
        stop(proc, signal.SIGTERM)  # graceful: the job is given back, the attempt not counted
        assert proc.returncode in (0, -signal.SIGTERM)
        proc, base = serve(model, state, port, log)
        body = wait(base, stopped, ("done", "failed", "interrupted"))
        assert body["status"] == "done" and body["attempts"] == 1, body
    finally:
        stop(proc)
    assert "Traceback" not in log.read_text()


def test_workers_share_one_api_and_a_killed_worker_loses_nothing(tiny, tmp_path):  # noqa: F811
    model, volume = tiny
    state, port = tmp_path / "state", free_port()
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    api, base = serve(model, state, port, tmp_path / "api.log", "--no-run-jobs")
    worker_args = ["worker", "--model", str(model), "--state-dir", str(state), "--device", "cpu"]
    workers = []
    try:
        doomed = start(worker_args, 30.0, logs[0])  # slow: still running when killed
        first = submit(base, volume)
        wait(base, first, ("running",), timeout=90)
        stop(doomed, signal.SIGKILL)
        workers = [start(worker_args, 0.0, logs[i]) for i in (1, 2)]
        ids = [submit(base, volume) for _ in range(12)]
        bodies = [wait(base, job_id, ("done", "failed", "interrupted"), timeout=120)
                  for job_id in [first, *ids]]
        assert [b["status"] for b in bodies] == ["done"] * 13
        assert bodies[0]["attempts"] == 2 and all(b["attempts"] == 1 for b in bodies[1:])
    finally:
        for proc in [*workers, api]:
            stop(proc)
    ran: list[str] = []
    for path in logs[1:]:
        for line in path.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("msg") == "job done":
                ran.append(json.loads(line)["job_id"])
    assert sorted(ran) == sorted([first, *ids])  # each job done exactly once, by a live worker
    assert all(ran.count(job_id) == 1 for job_id in ran)
    assert "Traceback" not in "".join(p.read_text() for p in logs)


def test_two_api_processes_share_the_jobs(tiny, tmp_path):  # noqa: F811
    """``uumamba serve --processes 2`` (uvicorn workers): a job submitted to one process is
    polled and fetched through whichever answers, each run once."""
    model, volume = tiny
    log = tmp_path / "serve.log"
    proc, base = serve(model, tmp_path / "state", free_port(), log, "--processes", "2", slow_s=0.0)
    try:
        end = time.monotonic() + 90
        while log.read_text().count('"msg": "model loaded"') < 2 and time.monotonic() < end:
            time.sleep(0.2)
        ids = [submit(base, volume) for _ in range(8)]
        bodies = [wait(base, job_id, ("done", "failed", "interrupted")) for job_id in ids]
        assert [b["status"] for b in bodies] == ["done"] * 8
        for job_id in ids:  # fresh connections: any process may answer, all know every job
            for _ in range(3):
                with httpx.Client() as client:
                    assert client.get(f"{base}/v1/jobs/{job_id}/result", timeout=30).status_code == 200
    finally:
        stop(proc)
    done = [json.loads(line)["job_id"] for line in log.read_text().splitlines()
            if line.startswith("{") and json.loads(line).get("msg") == "job done"]
    assert sorted(done) == sorted(ids)
