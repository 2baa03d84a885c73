"""End to end: a real ``uumamba serve`` process on 127.0.0.1 segments a real ACDC case.

The process is started with the console script (``python -m uumamba.cli`` when the script is
not on PATH) on a free loopback port, polled until ``/readyz`` answers 200, sent one ACDC
short-axis volume over HTTP, and stopped with SIGTERM. Skipped when the ACDC folder is absent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

from uumamba_service.testing import build_tiny_model


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            r = httpx.get(f"{base}/readyz", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"server at {base} not ready within {timeout} s")


def test_uumamba_serve_segments_an_acdc_case(acdc_dir, tmp_path, tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.getbasetemp() / "service_tiny_model")
    case = sorted(acdc_dir.glob("patient*/patient*_frame01.nii.gz"))[0]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "UUMAMBA_REQUEST_TIMEOUT_S": "300"}
    cmd = [sys.executable, "-m", "uumamba.cli", "serve", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = _wait_ready(base, proc, timeout=120)
        assert ready["device"].startswith("cpu") and ready["scan_backend"] == "cpu"
        with case.open("rb") as f:
            r = httpx.post(f"{base}/v1/segment", files={"file": (case.name, f, "application/gzip")},
                           headers={"X-Request-ID": "acdc-e2e"}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "acdc-e2e"
        out = tmp_path / "mask.nii.gz"
        out.write_bytes(r.content)
        src, mask = nib.load(str(case)), nib.load(str(out))
        assert mask.shape == src.shape
        np.testing.assert_allclose(mask.affine, src.affine, atol=1e-4)
        values = np.unique(np.asarray(mask.dataobj))
        assert set(values.tolist()) <= {0, 1, 2, 3}
        r = httpx.post(f"{base}/v1/segment", files={"file": ("notes.txt", b"hi", "text/plain")}, timeout=30)
        assert r.status_code == 415
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    # graceful shutdown; uvicorn re-raises the captured SIGTERM after it, hence -15
    assert proc.returncode in (0, -signal.SIGTERM), stderr[-3000:]
    assert "Application shutdown complete" in stderr
    assert '"request_id": "acdc-e2e"' in stderr  # JSON access log line of the upload


def test_uumamba_serve_refuses_a_missing_model_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "uumamba.cli", "serve", "--model", str(tmp_path / "nope"),
                        "--port", str(_free_port())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert Path(tmp_path / "nope").exists() is False
