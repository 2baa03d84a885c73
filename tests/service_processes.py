"""Real service processes for tests: ``uumamba serve`` / ``uumamba worker`` started through
:mod:`slow_cli` (each predicted volume delayed by ``slow_s`` seconds), polled over HTTP, and
stopped; the tiny model and one small volume as a module fixture (``tiny``).
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
import pytest

from uumamba_service.testing import build_tiny_model

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(slow_s: float) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "UUMAMBA_WARMUP": "false",
            "UUMAMBA_TEST_SLOW_S": str(slow_s), "UUMAMBA_JOB_LEASE_S": "4",
            "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def start(args: list[str], slow_s: float, log: Path) -> subprocess.Popen:
    out = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", "slow_cli", *args], env=_env(slow_s),
                            stdout=out, stderr=subprocess.STDOUT)


def serve(model: Path, state: Path | None, port: int, log: Path, *extra: str, slow_s: float = 3.0):
    """``uumamba serve`` on loopback (``state``: its ``--state-dir``; ``None`` with
    ``--broker``), ready; returns (process, base URL)."""
    folder = ["--state-dir", str(state)] if state is not None else []
    proc = start(["serve", "--model", str(model), "--port", str(port), "--device", "cpu",
                  *folder, *extra], slow_s, log)
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 90
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready: {log.read_text()[-3000:]}")


def submit(base: str, volume: Path) -> str:
    with volume.open("rb") as f:
        r = httpx.post(f"{base}/v1/jobs?format=json", files={"file": (volume.name, f)}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait(base: str, job_id: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        body = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if body["status"] in states:
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {states} within {timeout} s: {body}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("durable")
    model = build_tiny_model(tmp_path_factory.getbasetemp() / "service_tiny_model")
    volume = root / "case.nii.gz"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((64, 64, 6)).astype(np.float32), np.diag([1.5, 1.5, 8.0, 1.0])),
             str(volume))
    return model, volume
