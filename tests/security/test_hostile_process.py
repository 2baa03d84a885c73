"""One real ``uumamba serve`` process on 127.0.0.1 against hostile uploads.

Checks what only a real process shows: answers over a real socket carry no byte of
/etc/passwd and no server path, the server's RSS (``/proc/PID/status``) stays within +500 MB
while 8 bombs arrive at once, an honest request succeeds right after, and ``uumamba serve``
refuses a public address without a key in one line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hostile_files import (
    gzip_bomb,
    mha_data_file,
    nifti_huge_shape,
    nifti_volume,
    nrrd_data_file,
    secret_lines,
    sitk_volume,
)

from uumamba_service.testing import build_tiny_model


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.getbasetemp() / "service_tiny_model")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    work = tmp_path_factory.mktemp("serve_tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "UUMAMBA_MAX_UPLOADS_PER_CLIENT": "8",
           "UUMAMBA_TMP_DIR": str(work), "UUMAMBA_WARMUP": "false"}
    env.pop("UUMAMBA_API_KEY", None)
    cmd = [sys.executable, "-m", "uumamba.cli", "serve", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("server not ready")
        yield proc, base, work
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _post(base: str, path: Path, timeout: float = 60) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(f"{base}/v1/segment?format=json", files={"file": (path.name, f)},
                          timeout=timeout)


def _assert_no_leak(text: str, work: Path) -> None:
    assert not any(line in text for line in secret_lines()), text
    assert str(work) not in text and "/tmp/" not in text and "/etc/" not in text, text


def test_real_server_refuses_file_disclosure_and_survives_a_bomb_burst(server, tmp_path):
    proc, base, work = server
    honest = sitk_volume(tmp_path / "honest.nii.gz", shape=(40, 44, 6), spacing=(1.6, 1.4, 8.0))
    passwd = nrrd_data_file(tmp_path / "p.nrrd")
    r = _post(base, passwd)
    assert r.status_code == 422 and "self-contained" in r.json()["detail"]
    _assert_no_leak(r.text, work)
    r = _post(base, mha_data_file(tmp_path / "p.mha"))
    assert r.status_code == 422
    _assert_no_leak(r.text, work)

    bombs = [gzip_bomb(tmp_path / f"bomb{i}.nii.gz") for i in range(5)]
    bombs += [nifti_huge_shape(tmp_path / "huge.nii.gz"),
              nrrd_data_file(tmp_path / "zero.nrrd", target="/dev/zero", sizes="4096 4096 4096",
                             encoding="raw"),
              nifti_volume(tmp_path / "spacing.nii.gz", spacing=(300.0, 300.0, 300.0))]
    before = _rss_mb(proc.pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb(proc.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(8) as ex:
            answers = list(ex.map(lambda p: _post(base, p), bombs))
    finally:
        done.set()
        sampler.join()
    assert [a.status_code for a in answers] == [413] * 6 + [422, 422]
    for a in answers:
        _assert_no_leak(a.text, work)
    print(f"real server, 8 bombs at once: RSS {before:.0f} MB -> peak {peak[0]:.0f} MB")
    assert peak[0] - before < 500, f"server RSS grew by {peak[0] - before:.0f} MB"
    r = _post(base, honest)
    assert r.status_code == 200, r.text
    assert proc.poll() is None


def test_serve_refuses_a_public_address_without_a_key(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.getbasetemp() / "service_tiny_model")
    env = {k: v for k, v in os.environ.items() if k != "UUMAMBA_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "uumamba.cli", "serve", "--model", str(model_dir),
                        "--host", "0.0.0.0", "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    assert "UUMAMBA_API_KEY" in r.stderr and "--insecure-no-auth" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
