"""Load test of the REST service: a real ``uumamba serve`` on loopback, concurrent clients.

Starts the server as a subprocess on 127.0.0.1 (a free port), waits for ``/readyz``, then sends
``--requests`` segmentations from ``--clients`` concurrent httpx clients, alternating the
synchronous ``POST /v1/segment`` and the job flow (``POST /v1/jobs`` -> poll -> result). Prints
p50 / p95 latency (end to end; for jobs, submission to downloaded result), throughput, peak and
post-warm-up server RSS (psutil when installed, else ``/proc/PID/status``), counts by status
code, 5xx and lost jobs (accepted with 202 but never finished with a downloadable result).

Usage::

    python benchmarks/bench_service.py                      # tiny model trained on the fly
    python benchmarks/bench_service.py --model runs/acdc --input case.nii.gz --device cuda
    python benchmarks/bench_service.py --workers 1,2 --jobs-only          # worker processes
    python benchmarks/bench_service.py --workers 1,2 --jobs-only --broker auto   # RQ on Redis

``--workers N[,M...]``: the API runs no jobs itself (``--no-run-jobs``) and N ``uumamba
worker`` processes take them from its state folder (SQLite), or with ``--broker`` from Redis
(``auto``: a throw-away ``redis-server`` on loopback); one run per count, side by side, each
with a fresh server and state, reported in one table. ``--jobs-only``: every request is a job
(the worker processes run only jobs). Without ``--workers`` the API runs everything itself with
``--threads`` inference threads.

Targets: no 5xx, no lost job, memory flat after the first requests (the RSS growth between
the end of warm-up and the end is printed).

``--hostile N`` adds N hostile requests from ``--hostile-clients`` more clients, interleaved
with the honest ones: gzip bombs (1 GiB of zeros in 1 MiB), an NRRD reading ``/etc/passwd``,
a 60-byte NIfTI declaring 30000^3 voxels and slow clients trickling 16 bytes every 0.5 s
(cut at ``--upload-timeout``). Honest p95 and throughput are printed as for the honest-only
run, with the hostile answers by status; targets: 0 x 5xx, 0 lost or refused honest requests.
All clients share 127.0.0.1, so the per-client upload limit is raised for the run.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (psutil if installed, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """Samples a process's RSS every ``interval_s`` seconds; ``peak`` and ``last`` in MiB."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak = self.last = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.last = rss_mb(self.pid)
            except (OSError, ValueError):
                return
            self.peak = max(self.peak, self.last)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()


def one_request(base: str, payload: bytes, name: str, use_job: bool, timeout: float) -> tuple[str, float, bool]:
    """Run one segmentation; returns (outcome status code as text, seconds, job_lost)."""
    start = time.perf_counter()
    files = {"file": (name, payload, "application/octet-stream")}
    with httpx.Client(base_url=base, timeout=timeout) as c:
        if not use_job:
            r = c.post("/v1/segment", files=files)
            return str(r.status_code), time.perf_counter() - start, False
        r = c.post("/v1/jobs", files=files)
        if r.status_code != 202:
            return str(r.status_code), time.perf_counter() - start, False
        job = r.json()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = c.get(job["status_url"])
            if s.status_code != 200:
                return f"job-status-{s.status_code}", time.perf_counter() - start, True
            if s.json()["status"] in ("done", "failed"):
                break
            time.sleep(0.05)
        else:
            return "job-timeout", time.perf_counter() - start, True
        res = c.get(job["result_url"])
        c.delete(job["status_url"])
        lost = res.status_code != 200 or not res.content
        return f"job-{res.status_code}", time.perf_counter() - start, lost


def hostile_payloads(scratch: Path) -> list[tuple[str, bytes | None]]:
    """(file name, bytes) of each hostile kind; ``None`` bytes means a slow client."""
    import gzip

    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape((16, 16, 16))
    header.set_data_dtype(np.uint8)
    member = gzip.compress(b"\0" * (1 << 20), compresslevel=9)
    bomb = gzip.compress(header.binaryblock + b"\0" * 4) + member * 1024
    huge = nib.Nifti1Header()
    huge.set_data_shape((30000, 30000, 30000))
    huge.set_data_dtype(np.float32)
    passwd = (b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 16 16 16\nencoding: ascii\n"
              b"data file: /etc/passwd\n\n")
    return [("bomb.nii.gz", bomb), ("passwd.nrrd", passwd),
            ("huge.nii.gz", gzip.compress(huge.binaryblock + b"\0" * 4)), ("slow.nii", None)]


def one_hostile(base: str, name: str, payload: bytes | None, timeout: float) -> tuple[str, float, bool]:
    """One hostile request; returns (status code as text, seconds, leaked)."""
    start = time.perf_counter()
    with httpx.Client(base_url=base, timeout=timeout) as c:
        if payload is None:
            boundary = "benchSlowClient"

            def trickle():
                yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                       f"filename=\"{name}\"\r\n\r\n").encode()
                for _ in range(int(timeout * 2)):
                    time.sleep(0.5)
                    yield b"\0" * 16

            try:
                r = c.post("/v1/segment", content=trickle(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            except httpx.HTTPError as exc:  # the server closed the connection mid-body
                return f"closed-{type(exc).__name__}", time.perf_counter() - start, False
        else:
            r = c.post("/v1/segment", files={"file": (name, payload, "application/octet-stream")})
    leaked = "root:" in r.text or "/tmp/" in r.text
    return str(r.status_code), time.perf_counter() - start, leaked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: train a tiny one)")
    parser.add_argument("--input", type=Path, help="volume to upload (default: a synthetic case)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="UUMAMBA_WORKERS_PER_DEVICE")
    parser.add_argument("--workers", default=None,
                        help="comma-separated counts of 'uumamba worker' processes, one run each")
    parser.add_argument("--broker", default=None,
                        help="redis://HOST:PORT/DB for the workers, or 'auto' (a loopback redis-server)")
    parser.add_argument("--jobs-only", action="store_true", help="every request through /v1/jobs")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (model, server log)")
    parser.add_argument("--hostile", type=int, default=0, help="hostile requests mixed in")
    parser.add_argument("--hostile-clients", type=int, default=4)
    parser.add_argument("--upload-timeout", type=float, default=5.0, help="UUMAMBA_UPLOAD_TIMEOUT_S")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="bench-service-"))
    model_dir = args.model
    if model_dir is None:
        from uumamba_service.testing import build_tiny_model

        print("training a tiny model ...", flush=True)
        model_dir = build_tiny_model(scratch)
    upload = args.input
    if upload is None:
        upload = next(iter(sorted((model_dir.parent / "data" / "images").glob("*.nii.gz"))), None)
        if upload is None:
            from uumamba.data.synthetic import write_synthetic_dataset

            upload = sorted((write_synthetic_dataset(scratch / "data", n_cases=1) / "images").glob("*"))[0]
    payload = upload.read_bytes()

    counts = [int(n) for n in args.workers.split(",")] if args.workers else [None]
    redis_proc = None
    broker = args.broker
    try:
        if broker == "auto":
            redis_proc, broker = start_redis(scratch / "redis")
        rows, status = [], 0
        for n in counts:
            row, bad = run_one(args, model_dir, upload, payload, scratch, n, broker)
            rows.append(row)
            status |= bad
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        if args.keep:
            print(f"scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if len(rows) > 1 or args.workers:
        mode = "RQ on Redis" if broker else "SQLite state folder"
        print(f"\n| worker processes ({mode}) | requests | throughput (requests/s) | p50 (s) | p95 (s) | 5xx | lost |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['workers']} | {row['n']} | {row['throughput']:.2f} | {row['p50']:.3f} | "
                  f"{row['p95']:.3f} | {row['5xx']} | {row['lost']} |")
    return status


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A throw-away ``redis-server`` on a free loopback port (no persistence); its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("--broker auto needs redis-server (Debian: apt-get install redis-server)")
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not answer")


def run_one(args, model_dir: Path, upload: Path, payload: bytes, scratch: Path,
            n_workers: int | None, broker: str | None) -> tuple[dict, int]:
    """One load run against a fresh server (and ``n_workers`` worker processes); returns
    its summary row and 1 when a target was missed."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "UUMAMBA_MAX_QUEUE": str(max(args.clients * 2, 8)),
           "UUMAMBA_WORKERS_PER_DEVICE": str(args.threads), "UUMAMBA_REQUEST_TIMEOUT_S": str(args.timeout),
           "UUMAMBA_UPLOAD_TIMEOUT_S": str(args.upload_timeout),
           "UUMAMBA_MAX_UPLOADS_PER_CLIENT": str(args.clients + args.hostile_clients + 1)}
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{n_workers}-", dir=scratch))
    if broker:
        env["UUMAMBA_BROKER_URL"] = broker
    else:
        env["UUMAMBA_STATE_DIR"] = str(run_dir / "state")
    serve = [sys.executable, "-m", "uumamba.cli", "serve", "--model", str(model_dir),
             "--host", "127.0.0.1", "--port", str(port), "--device", args.device]
    if n_workers is not None:
        serve.append("--no-run-jobs")
    log_path = run_dir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve, env=env, stdout=log, stderr=log)
        workers = [subprocess.Popen([sys.executable, "-m", "uumamba.cli", "worker", "--model", str(model_dir),
                                     "--device", args.device], env={**env, "OMP_NUM_THREADS": str(args.threads)},
                                    stdout=log, stderr=log)
                   for _ in range(n_workers or 0)]
    sampler = RssSampler(proc.pid)
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                print(log_path.read_text()[-3000:])
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                # with worker processes: also until each has loaded and warmed up the model
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200 and (
                        not n_workers or log_path.read_text().count('"msg": "worker started"') >= n_workers):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > 300:
                raise SystemExit("server not ready after 300 s")
            time.sleep(0.2)
        print(f"server ready in {time.monotonic() - t0:.1f} s (pid {proc.pid}, {base}); "
              f"upload {upload.name} {len(payload) / 1024:.0f} KiB; "
              f"{args.requests} requests, {args.clients} clients", flush=True)
        sampler.start()
        rss_idle = rss_mb(proc.pid)
        results: list[tuple[str, float, bool]] = []
        rss_after_warmup = None
        kinds = hostile_payloads(scratch) if args.hostile else []
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(args.clients) as ex, \
                cf.ThreadPoolExecutor(max(1, args.hostile_clients)) as bad:
            hostile = [bad.submit(one_hostile, base, *kinds[i % len(kinds)], args.upload_timeout * 2)
                       for i in range(args.hostile)]
            futures = [ex.submit(one_request, base, payload, upload.name, args.jobs_only or i % 2 == 1,
                                 args.timeout)
                       for i in range(args.requests)]
            for fut in cf.as_completed(futures):
                results.append(fut.result())
                if len(results) == args.clients:
                    rss_after_warmup = rss_mb(proc.pid)
            wall = time.perf_counter() - start
            hostile_results = [f.result() for f in hostile]
        rss_end = rss_mb(proc.pid)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        sampler.stop()
        for child in [*workers, proc]:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()

    latencies = sorted(r[1] for r in results)
    codes = collections.Counter(r[0] for r in results)
    lost = sum(r[2] for r in results)
    n_5xx = sum(n for code, n in codes.items() if code.removeprefix("job-").startswith("5"))
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    print(f"latency p50 {statistics.median(latencies):.3f} s, p95 {p95:.3f} s, "
          f"min {latencies[0]:.3f} s, max {latencies[-1]:.3f} s")
    print(f"throughput {len(results) / wall:.2f} requests/s ({len(results)} in {wall:.1f} s)")
    print(f"server RSS: idle {rss_idle:.0f} MiB, after first {args.clients} requests "
          f"{rss_after_warmup or float('nan'):.0f} MiB, end {rss_end:.0f} MiB, peak {sampler.peak:.0f} MiB "
          f"(growth after warm-up {rss_end - (rss_after_warmup or rss_end):+.0f} MiB)")
    print("status codes: " + ", ".join(f"{code}: {n}" for code, n in sorted(codes.items())))
    print(f"5xx: {n_5xx}, lost jobs: {lost}, server exit code: {proc.returncode}")
    refused_honest = sum(n for code, n in codes.items() if code.removeprefix("job-") != "200")
    hostile_5xx = leaks = 0
    if hostile_results:
        hcodes = collections.Counter(r[0] for r in hostile_results)
        hostile_5xx = sum(n for code, n in hcodes.items() if code.startswith("5"))
        leaks = sum(r[2] for r in hostile_results)
        print(f"hostile: {len(hostile_results)} requests, status codes: "
              + ", ".join(f"{code}: {n}" for code, n in sorted(hcodes.items()))
              + f"; 5xx: {hostile_5xx}, answers leaking /etc/passwd or a path: {leaks}; "
              f"honest requests not answered 200: {refused_honest}")
    queue_lines = [line for line in metrics.splitlines() if line.startswith("uumamba_queue_depth")]
    print("server metrics at end: " + "; ".join(queue_lines))
    row = {"workers": n_workers if n_workers is not None else f"in-API ({args.threads} threads)",
           "n": len(results), "throughput": len(results) / wall, "p50": statistics.median(latencies),
           "p95": p95, "5xx": n_5xx, "lost": lost}
    return row, int(bool(n_5xx or lost or hostile_5xx or leaks or (hostile_results and refused_honest)))




if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
