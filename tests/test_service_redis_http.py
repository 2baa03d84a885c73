"""Issue 18 end to end over HTTP: two API processes and two worker processes on one Redis.

``uumamba serve --broker redis://... --processes 2`` (the API only enqueues and serves) and
two ``uumamba worker --broker redis://...`` processes; 30 jobs submitted and polled through
whichever API process answers: every job done, each by exactly one worker, none lost.
"""

from __future__ import annotations

import json
import time

import httpx
from redis_server import redis_url, require_redis  # noqa: F401  (fixture)
from service_processes import free_port, serve, start, stop, submit, tiny, wait  # noqa: F401

require_redis()


def test_two_apis_two_workers_thirty_jobs_each_done_once(tiny, redis_url, tmp_path):  # noqa: F811
    model, volume = tiny
    api_log = tmp_path / "api.log"
    worker_logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    api, base = serve(model, None, free_port(), api_log, "--processes", "2",
                       "--broker", redis_url, slow_s=0.0)
    workers = [start(["worker", "--model", str(model), "--broker", redis_url, "--device", "cpu"],
                      0.0, log) for log in worker_logs]
    try:
        end = time.monotonic() + 90
        while sum(log.read_text().count('"msg": "worker started"') for log in worker_logs) < 2:
            assert time.monotonic() < end, "workers did not start"
            assert all(w.poll() is None for w in workers), worker_logs[0].read_text()[-2000:]
            time.sleep(0.2)
        ids = [submit(base, volume) for _ in range(30)]
        bodies = [wait(base, job_id, ("done", "failed", "interrupted"), timeout=180) for job_id in ids]
        assert [b["status"] for b in bodies] == ["done"] * 30
        assert all(b["attempts"] == 1 for b in bodies)
        for job_id in ids[:5]:  # fresh connections: either API process serves any result
            with httpx.Client() as client:
                r = client.get(f"{base}/v1/jobs/{job_id}/result", timeout=30)
                assert r.status_code == 200 and r.json()["volumes_ml"]
    finally:
        for proc in [*workers, api]:
            stop(proc)
    done: dict[str, list[str]] = {}
    for log in worker_logs:
        for line in log.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("msg") == "job done":
                done.setdefault(json.loads(line)["job_id"], []).append(log.name)
    assert sorted(done) == sorted(ids) and all(len(v) == 1 for v in done.values())
    assert {v[0] for v in done.values()} == {"worker0.log", "worker1.log"}  # both took work
    assert "Traceback" not in api_log.read_text() + "".join(p.read_text() for p in worker_logs)
