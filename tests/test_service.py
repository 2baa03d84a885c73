"""REST service (uumamba_service): every endpoint and every error path, with TestClient.

A tiny model is trained once per module on synthetic data (``model_dir`` fixture) and served by
the real :class:`uumamba.inference.predict.Predictor`. Uploaded volumes are small synthetic
cardiac MRI-like cases with flipped axes and a non-zero origin, so geometry errors show.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import service_fixtures
import SimpleITK as sitk
from fastapi.testclient import TestClient
from service_fixtures import service_settings, wait_ready

from uumamba.data.synthetic import make_synthetic_case
from uumamba.errors import UserError
from uumamba_service.app import create_app, serve_from_cli
from uumamba_service.observability import JsonFormatter, logger
from uumamba_service.settings import ServiceSettings
from uumamba_service.worker import InferencePool, QueueFull

model_dir = service_fixtures.model_dir  # module-scoped fixtures shared with tests/security
predictor = service_fixtures.predictor
client = service_fixtures.client
_settings = service_settings
_ready = wait_ready

RNG = np.random.default_rng(0)
SHAPE = (40, 44, 6)
SPACING = (1.6, 1.4, 8.0)
ORIGIN = (12.5, -30.0, 4.0)
# LPS direction with flipped x and z axes (a common scanner orientation)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    """The same synthetic case as .nii.gz, .nii, .nrrd and .mha (SimpleITK writes all four)."""
    root = tmp_path_factory.mktemp("volumes")
    image, _ = make_synthetic_case(seed=7, shape=(64, 64, 6), spacing=SPACING)
    image = image[12:12 + SHAPE[0], 10:10 + SHAPE[1], :].astype(np.float32)
    paths = {}
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        paths[suffix] = _write_volume(root / f"case{suffix}", image)
    return paths


def _write_volume(path: Path, array: np.ndarray) -> Path:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(path))
    return path


class Gated:
    """The real predictor behind a gate: ``predict_file`` waits until ``gate`` is set."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.device = getattr(inner, "device", "cpu")
        self.gate = threading.Event()
        self.started = threading.Event()

    def predict_file(self, path, tta=None):
        self.started.set()
        if not self.gate.wait(30):
            raise RuntimeError("test gate never opened")
        return self.inner.predict_file(path) if tta is None else self.inner.predict_file(path, tta=tta)


def _upload(path: Path, name: str | None = None) -> dict:
    return {"file": (name or path.name, path.read_bytes(), "application/octet-stream")}


def _work_files(client: TestClient) -> list[Path]:
    root = client.app.state.service.work_root
    return [p for p in root.rglob("*") if p.is_file()]


def _geometry(path: Path) -> tuple:
    img = sitk.ReadImage(str(path))
    return (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def _wait_job(client: TestClient, job_id: str, headers=None, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        body = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if body["status"] in ("done", "failed"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished: {body}")


# ------------------------------------------------------------------ health, model, metrics

def test_health_ready_and_model_info(client, model_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["device"].startswith("cpu")
    assert ready["scan_backend"] in ("cpu", "torch")
    assert ready["precision"] == "float32"  # the suite pins UUMAMBA_CPU_BF16=0 (conftest)

    info = client.get("/v1/model").json()
    plans = json.loads((model_dir / "plans.json").read_text())
    assert info["name"] == model_dir.name
    assert {int(k): v for k, v in info["labels"].items()} == {int(k): v for k, v in plans["labels"].items()}
    assert info["target_spacing_mm"] == pytest.approx(plans["target_spacing"])
    assert info["patch_size"] == plans["patch_size"]
    assert info["modality"] == "MRI"
    import uumamba

    assert info["package_version"] == uumamba.__version__
    assert info["folds"] and len(info["weights"]) == len(info["folds"])
    for w in info["weights"]:
        expected = hashlib.sha256((model_dir / w["file"]).read_bytes()).hexdigest()
        assert w["sha256"] == expected
    assert len(info["version"]) == 12


def test_readyz_503_until_loaded_then_200(model_dir, predictor, monkeypatch):
    import uumamba_service.lifespan as app_module

    release = threading.Event()
    real_load = app_module._load_model

    def slow_load(state, pred, *info):
        release.wait(30)
        real_load(state, pred, *info)

    monkeypatch.setattr(app_module, "_load_model", slow_load)
    app = create_app(_settings(model_dir), predictor=predictor)
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert r.headers["retry-after"]
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/segment", files={"file": ("a.nii", b"x" * 400, "application/octet-stream")})
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        release.set()
        assert _ready(c)["status"] == "ready"


def test_readyz_reports_bf16_on_a_cpu_with_bf16_units(model_dir, predictor, monkeypatch):
    from uumamba.config import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "1")  # as on a CPU with AMX tiles or AVX512-BF16
    with TestClient(create_app(_settings(model_dir), predictor=predictor)) as c:
        assert _ready(c)["precision"] == "bfloat16"


def test_warmup_runs_one_inference_before_ready(model_dir, predictor):
    calls = []

    class Counting:
        device = predictor.device

        def predict_file(self, path):
            calls.append(Path(path).name)
            return predictor.predict_file(path)

    app = create_app(_settings(model_dir, warmup=True), predictor=Counting())
    with TestClient(app) as c:
        _ready(c)
        assert calls == ["warmup.nii.gz"]
        assert _work_files(c) == []


def test_readyz_reports_load_failure(tmp_path):
    (tmp_path / "plans.json").write_text("{}")
    app = create_app(_settings(tmp_path))
    with TestClient(app) as c:
        end = time.monotonic() + 10
        while c.get("/readyz").json()["status"] == "loading" and time.monotonic() < end:
            time.sleep(0.02)
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "failed" and "config.yaml" in r.json()["detail"]
        # /readyz needs no key: the model folder's server path is not given away
        assert str(tmp_path) not in r.text and "<model folder>" in r.text
        assert c.get("/v1/model").status_code == 503


def test_metrics_and_request_id(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert generated != "bad id with spaces" and len(generated) == 32
    client.get("/v1/jobs/nope")
    text = client.get("/metrics").text
    assert 'uumamba_http_requests_total{method="GET",route="/healthz",status="200"} 2' in text
    assert 'route="/v1/jobs/{job_id}",status="404"} 1' in text
    assert "uumamba_queue_depth 0" in text
    assert 'uumamba_http_request_duration_seconds_count{route="/healthz"} 2' in text


def test_logs_are_json_lines_with_request_id(client):
    stream = io.StringIO()
    import logging

    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [e for e in lines if e["msg"] == "request"]
    assert access and access[-1]["request_id"] == "trace-42"
    assert access[-1]["status"] == 200 and access[-1]["path"] == "/healthz"
    assert access[-1]["duration_ms"] >= 0


# ------------------------------------------------------------------ synchronous segmentation

@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_segment_returns_mask_in_upload_geometry(client, volumes, suffix):
    src = volumes[suffix]
    r = client.post("/v1/segment", files=_upload(src, f"patient{suffix}"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert 'filename="patient_seg.nii.gz"' in r.headers["content-disposition"]
    out = Path(client.app.state.service.work_root).parent / f"out_{suffix.strip('.')}.nii.gz"
    out.write_bytes(r.content)
    try:
        size, spacing, origin, direction = _geometry(out)
        assert size == SHAPE
        np.testing.assert_allclose(spacing, SPACING, atol=1e-4)
        np.testing.assert_allclose(origin, ORIGIN, atol=1e-3)
        np.testing.assert_allclose(direction, DIRECTION, atol=1e-5)
        mask = np.asarray(nib.load(str(out)).dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2, 3}
    finally:
        out.unlink()
    assert _work_files(client) == []


def test_segment_json_volumes_match_mask(client, volumes):
    r_mask = client.post("/v1/segment", files=_upload(volumes[".nii.gz"]))
    r_json = client.post("/v1/segment?format=json", files=_upload(volumes[".nii.gz"]))
    assert r_json.status_code == 200 and r_json.headers["content-type"] == "application/json"
    body = r_json.json()
    mask = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r_mask.content)).dataobj)
    voxel_ml = np.prod(SPACING) / 1000.0
    assert body["shape"] == list(SHAPE)
    assert body["voxel_volume_ml"] == pytest.approx(voxel_ml)
    for value, name in {1: "RV", 2: "MYO", 3: "LV"}.items():
        assert body["voxel_counts"][name] == int((mask == value).sum())
        # volumes are reported to 0.01 mL
        assert body["volumes_ml"][name] == round(body["voxel_counts"][name] * voxel_ml, 2)
    assert body["tta"] is False
    # what the windows computed in, as /readyz says (float32: the suite pins UUMAMBA_CPU_BF16=0)
    assert body["precision"] == client.get("/readyz").json()["precision"] == "float32"


def test_segment_seg_nrrd_for_slicer(client, volumes, tmp_path):
    r = client.post("/v1/segment?format=seg.nrrd", files=_upload(volumes[".nii.gz"]))
    assert r.status_code == 200, r.text
    assert 'filename="case_seg.seg.nrrd"' in r.headers["content-disposition"]
    path = tmp_path / "out.seg.nrrd"
    path.write_bytes(r.content)
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    names = {s["name"] for s in seg["segments"]}
    assert {"RV", "MYO", "LV"} <= names


def test_segment_with_tta(client, volumes):
    r = client.post("/v1/segment?tta=true&format=json", files=_upload(volumes[".nii.gz"]))
    assert r.status_code == 200, r.text
    assert r.json()["tta"] is True


def test_client_file_name_is_never_a_path(client, volumes, tmp_path):
    r = client.post("/v1/segment", files=_upload(volumes[".nii.gz"], "../../etc/pass wd.nii.gz"))
    assert r.status_code == 200
    assert 'filename="passwd_seg.nii.gz"' in r.headers["content-disposition"]
    assert not (client.app.state.service.work_root.parent / "etc").exists()


# ------------------------------------------------------------------ bad input

def test_oversize_upload_413_by_content_length(model_dir, predictor, volumes):
    app = create_app(_settings(model_dir, max_upload_mb=0.001), predictor=predictor)
    with TestClient(app) as c:
        _ready(c)
        r = c.post("/v1/segment", files=_upload(volumes[".nii"]))
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        assert _work_files(c) == []


def test_oversize_chunked_upload_413_before_body_is_read(model_dir, predictor):
    """Chunked body (no Content-Length), streamed through the ASGI app one chunk at a time:
    the server must answer 413 after reading about the limit, not the whole 3.2 MB body."""
    import asyncio

    import httpx

    app = create_app(_settings(model_dir, max_upload_mb=0.05), predictor=predictor)  # 52 kB
    sent = []
    boundary = "XyZbOuNdArY"

    async def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.nii\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(200):  # 200 x 16 kB = 3.2 MB
            sent.append(1)
            yield b"\0" * 16384
        yield f"\r\n--{boundary}--\r\n".encode()

    async def scenario() -> tuple[int, list[Path]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                for _ in range(600):
                    if (await c.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                r = await c.post("/v1/segment", content=body(),
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
                root = app.state.service.work_root
                return r.status_code, [p for p in root.rglob("*") if p.is_file()]

    status, leftovers = asyncio.run(scenario())
    assert status == 413
    assert len(sent) <= 5, f"server read {len(sent)} of 200 chunks before refusing"
    assert leftovers == []


@pytest.mark.parametrize("name, payload, status, words", [
    ("notes.txt", b"hello", 415, "extension"),
    ("scan.dcm", b"DICM" * 100, 415, "extension"),
    ("fake.nii.gz", b"not gzip at all" * 40, 415, "gzip"),
    ("fake.nrrd", b"P6 pnm image" * 40, 415, "NRRD"),
    ("fake.nii", b"\x00" * 600, 415, "NIfTI"),
    ("fake.mha", b"just text", 415, "MetaImage"),
    ("empty.nii.gz", b"", 422, "empty"),
])
def test_unsupported_or_empty_upload(client, name, payload, status, words):
    r = client.post("/v1/segment", files={"file": (name, payload, "application/octet-stream")})
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower()
    assert _work_files(client) == []


def test_not_multipart_415_and_missing_field_422(client, volumes):
    r = client.post("/v1/segment", content=volumes[".nii"].read_bytes(),
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 415
    r = client.post("/v1/segment", files={"image": ("a.nii.gz", b"x", "application/octet-stream")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post("/v1/segment", data={"note": "no file"}, files={"other": ("", b"", "text/plain")})
    assert r.status_code == 422
    r = client.post("/v1/segment?format=png", files=_upload(volumes[".nii.gz"]))
    assert r.status_code == 422


def test_bad_volumes_422_naming_the_problem(client, volumes, tmp_path):
    good = volumes[".nii.gz"].read_bytes()
    truncated = good[: len(good) // 2]
    r = client.post("/v1/segment", files={"file": ("t.nii.gz", truncated, "application/octet-stream")})
    assert r.status_code == 422 and "truncated" in r.json()["detail"]

    four_d = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(RNG.random((20, 20, 4, 3)).astype(np.float32), np.eye(4)), str(four_d))
    r = client.post("/v1/segment", files=_upload(four_d))
    assert r.status_code == 422 and "4D" in r.json()["detail"]

    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 20, 4), np.nan, np.float32), np.eye(4)), str(nan))
    r = client.post("/v1/segment", files=_upload(nan))
    assert r.status_code == 422 and "NaN-filled" in r.json()["detail"]

    some_nan = tmp_path / "somenan.nii.gz"
    arr = RNG.random((20, 20, 4)).astype(np.float32)
    arr[3, 4, 1] = np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(some_nan))
    r = client.post("/v1/segment", files=_upload(some_nan))
    assert r.status_code == 422 and "1 NaN or infinite" in r.json()["detail"]

    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(RNG.random((20, 20)).astype(np.float32), np.eye(4)), str(flat))
    r = client.post("/v1/segment", files=_upload(flat))
    assert r.status_code == 422 and "2 dimensions" in r.json()["detail"]
    assert str(client.app.state.service.work_root) not in r.text
    assert _work_files(client) == []


# ------------------------------------------------------------------ load: queue, timeout

def test_queue_full_429_with_retry_after(model_dir, predictor, volumes):
    gated = Gated(predictor)
    app = create_app(_settings(model_dir, max_queue=0, workers_per_device=1), predictor=gated)
    with TestClient(app) as c:
        _ready(c)
        first = c.post("/v1/jobs", files=_upload(volumes[".nii.gz"]))
        assert first.status_code == 202
        assert gated.started.wait(10)
        r = c.post("/v1/segment", files=_upload(volumes[".nii.gz"]))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert c.post("/v1/jobs", files=_upload(volumes[".nii.gz"])).status_code == 429
        gated.gate.set()
        assert _wait_job(c, first.json()["id"])["status"] == "done"
        assert c.post("/v1/segment?format=json", files=_upload(volumes[".nii.gz"])).status_code == 200


def test_request_timeout_504_and_cleanup(model_dir, predictor, volumes):
    gated = Gated(predictor)
    app = create_app(_settings(model_dir, request_timeout_s=0.3), predictor=gated)
    with TestClient(app) as c:
        _ready(c)
        r = c.post("/v1/segment", files=_upload(volumes[".nii.gz"]))
        assert r.status_code == 504 and "/v1/jobs" in r.json()["detail"]
        gated.gate.set()
        end = time.monotonic() + 30
        while (_work_files(c) or app.state.service.pool.running) and time.monotonic() < end:
            time.sleep(0.05)
        assert _work_files(c) == []
        assert app.state.service.pool.queued == 0


def test_concurrent_workers_give_the_sequential_result(model_dir, predictor, volumes):
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(_settings(model_dir, workers_per_device=2), predictor=predictor)
    with TestClient(app) as c:
        _ready(c)
        post = lambda _: c.post("/v1/segment?format=json", files=_upload(volumes[".nii.gz"]))  # noqa: E731
        sequential = post(0).json()
        with ThreadPoolExecutor(3) as ex:
            answers = list(ex.map(post, range(3)))
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert all(a.json()["voxel_counts"] == sequential["voxel_counts"] for a in answers)
        assert app.state.service.pool.queued == 0 and _work_files(c) == []


def test_inference_pool_bounds():
    pool = InferencePool(workers=1, max_queue=1)
    try:
        a, b = pool.reserve(), pool.reserve()
        with pytest.raises(QueueFull):
            pool.reserve()
        a.release()
        a.release()  # idempotent
        c = pool.reserve()
        gate = threading.Event()
        f1 = pool.submit(b, gate.wait, 10)
        f2 = pool.submit(c, lambda: 7)
        assert pool.queued == 1 or pool.running == 1
        gate.set()
        assert f2.result(10) == 7 and f1.result(10) is True
        end = time.monotonic() + 5
        while pool.queued and time.monotonic() < end:
            time.sleep(0.01)
        assert pool.queued == 0 and pool.running == 0
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="workers"):
        InferencePool(workers=0, max_queue=1)


# ------------------------------------------------------------------ jobs

def test_job_lifecycle(model_dir, predictor, volumes, tmp_path):
    gated = Gated(predictor)
    app = create_app(_settings(model_dir), predictor=gated)
    with TestClient(app) as c:
        _ready(c)
        r = c.post("/v1/jobs?format=nii.gz", files=_upload(volumes[".nrrd"]))
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == job["status_url"] == f"/v1/jobs/{job['id']}"
        # the submitting request has returned; the job goes on without it
        status = c.get(job["status_url"]).json()
        assert status["status"] in ("queued", "running") and status["progress"] < 1
        # the gated predictor holds the job in `running` once a worker has claimed it, so the
        # 409 below and this status name the same state
        assert gated.started.wait(10)
        status = c.get(job["status_url"]).json()
        assert status["status"] == "running" and status["progress"] < 1
        r = c.get(job["result_url"])
        assert r.status_code == 409 and status["status"] in r.json()["detail"]
        gated.gate.set()
        done = _wait_job(c, job["id"])
        assert done["status"] == "done" and done["progress"] == 1.0 and done["expires_at"]
        for _ in range(2):  # a result can be fetched again until it expires
            r = c.get(job["result_url"])
            assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
        out = tmp_path / "job.nii.gz"
        out.write_bytes(r.content)
        size, spacing, origin, direction = _geometry(out)
        assert size == SHAPE
        np.testing.assert_allclose(origin, ORIGIN, atol=1e-3)
        np.testing.assert_allclose(direction, DIRECTION, atol=1e-5)
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert c.get(job["status_url"]).status_code == 404
        assert c.get(job["result_url"]).status_code == 404
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 404
        assert _work_files(c) == []


def test_job_json_result_and_expiry(model_dir, predictor, volumes):
    app = create_app(_settings(model_dir, job_ttl_s=0.6), predictor=predictor)
    with TestClient(app) as c:
        _ready(c)
        job_id = c.post("/v1/jobs?format=json&tta=false", files=_upload(volumes[".nii.gz"])).json()["id"]
        assert _wait_job(c, job_id)["status"] == "done"
        body = c.get(f"/v1/jobs/{job_id}/result").json()
        assert body["shape"] == list(SHAPE) and set(body["volumes_ml"]) == {"RV", "MYO", "LV"}
        time.sleep(0.8)
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
        assert _work_files(c) == []
        # a crafted id is not echoed whole (it was: 5 kB back for a 5 kB id)
        r = c.get("/v1/jobs/" + "x" * 5000)
        assert r.status_code == 404 and len(r.json()["detail"]) < 150
        assert r.json()["detail"].startswith("job 'xxxx") and "..." in r.json()["detail"]


def test_job_bad_input_rejected_at_submission(client, tmp_path):
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), str(nan))
    r = client.post("/v1/jobs", files=_upload(nan))
    assert r.status_code == 422 and "NaN" in r.json()["detail"]
    assert client.app.state.service.jobs.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0,
                                                     "interrupted": 0}
    assert _work_files(client) == []


def test_failed_job_reports_user_error(model_dir, volumes):
    class Refuses:
        device = "cpu"

        def predict_file(self, path):
            raise UserError("volume has 1 channel, model expects 2")

    app = create_app(_settings(model_dir), predictor=Refuses())
    with TestClient(app) as c:
        _ready(c)
        job_id = c.post("/v1/jobs", files=_upload(volumes[".nii.gz"])).json()["id"]
        status = _wait_job(c, job_id)
        assert status["status"] == "failed" and "model expects 2" in status["error"]
        r = c.get(f"/v1/jobs/{job_id}/result")
        assert r.status_code == 409 and "model expects 2" in r.json()["detail"]
        r = c.post("/v1/segment", files=_upload(volumes[".nii.gz"]))
        assert r.status_code == 422 and "model expects 2" in r.json()["detail"]
        assert _work_files(c) == []


# ------------------------------------------------------------------ security, CORS, OpenAPI

def test_api_key_required_except_health(model_dir, predictor, volumes):
    app = create_app(_settings(model_dir, api_key="s3cret"), predictor=predictor)
    key = {"X-API-Key": "s3cret"}
    with TestClient(app) as c:
        _ready(c)
        assert c.get("/healthz").status_code == 200
        for method, url in [("get", "/v1/model"), ("get", "/metrics"), ("get", "/v1/jobs/x"),
                            ("delete", "/v1/jobs/x"), ("get", "/v1/jobs/x/result"),
                            ("get", "/openapi.json")]:
            assert getattr(c, method)(url).status_code == 401, url
            assert getattr(c, method)(url, headers={"X-API-Key": "wrong"}).status_code == 401, url
        r = c.post("/v1/segment", files=_upload(volumes[".nii.gz"]))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "ApiKey"
        assert c.post("/v1/jobs", files=_upload(volumes[".nii.gz"])).status_code == 401
        assert c.get("/v1/model", headers=key).status_code == 200
        assert c.get("/openapi.json", headers=key).status_code == 200
        assert c.post("/v1/segment?format=json", files=_upload(volumes[".nii.gz"]), headers=key).status_code == 200


def test_cors_off_by_default_and_configurable(model_dir, predictor):
    preflight = {"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(_settings(model_dir), predictor=predictor)) as c:
        r = c.options("/v1/segment", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    app = create_app(_settings(model_dir, cors_origins=["https://viewer.example.org"]), predictor=predictor)
    with TestClient(app) as c:
        r = c.options("/v1/segment", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://viewer.example.org"


def test_openapi_documents_every_endpoint_and_error(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {"/healthz", "/readyz", "/metrics", "/v1/model", "/v1/segment", "/v1/jobs",
                          "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result"}
    seg = paths["/v1/segment"]["post"]
    assert {"200", "401", "413", "415", "422", "429", "503", "504"} <= set(seg["responses"])
    body = seg["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["file"]["format"] == "binary"
    assert {"application/gzip", "application/octet-stream", "application/json"} <= set(seg["responses"]["200"]["content"])
    params = {p["name"]: p for p in seg["parameters"]}
    assert params["format"]["description"] and params["tta"]["description"]
    assert paths["/v1/jobs"]["post"]["responses"]["202"]
    assert "409" in paths["/v1/jobs/{job_id}/result"]["get"]["responses"]
    schemas = spec["components"]["schemas"]
    for name in ("ModelInfo", "JobStatus", "VolumeSummary", "ErrorResponse", "Readiness"):
        for field_name, field in schemas[name]["properties"].items():
            assert field.get("description"), f"{name}.{field_name} undocumented"
    assert schemas["ModelInfo"]["properties"]["labels"]["examples"]


# ------------------------------------------------------------------ settings, CLI entry

def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UUMAMBA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("UUMAMBA_MAX_UPLOAD_MB", "2")
    monkeypatch.setenv("UUMAMBA_CORS_ORIGINS", "https://a.org, https://b.org")
    monkeypatch.setenv("UUMAMBA_API_KEY", "")
    s = ServiceSettings()
    assert s.model_dir == tmp_path and s.max_upload_bytes == 2 * 1024 * 1024
    assert s.cors_origins == ["https://a.org", "https://b.org"] and s.api_key is None
    assert s.workers_per_device == 1 and s.cors_origins


def test_serve_from_cli_rejects_bad_model_folder(tmp_path, model_dir, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        serve_from_cli(tmp_path / "missing", "127.0.0.1", 0, "cpu")
    with pytest.raises(UserError, match="plans.json is missing"):
        serve_from_cli(tmp_path, "127.0.0.1", 0, "cpu")
    monkeypatch.setenv("UUMAMBA_MAX_QUEUE", "-3")
    with pytest.raises(UserError, match="UUMAMBA_MAX_QUEUE"):
        serve_from_cli(model_dir, "127.0.0.1", 0, "cpu")
