"""The service against hostile files and clients (TestClient / ASGI, one tiny real model).

Every answer is checked for leaks: no line of /etc/passwd, no server path (work folder, temp
folder). Slow clients, chunked bodies, timeouts and cancelled jobs must not hold a slot or
a worker; an honest request must succeed right after each attack.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import service_fixtures
import torch
from fastapi.testclient import TestClient
from hostile_files import (
    gzip_bomb,
    mha_data_file,
    nifti_huge_shape,
    nifti_volume,
    nrrd_data_file,
    secret_lines,
    sitk_volume,
)
from service_fixtures import service_settings, wait_ready

from uumamba.errors import UserError
from uumamba_service.app import create_app, serve_from_cli
from uumamba_service.lifespan import make_work_root

BOUNDARY = "hostileBoundary42"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    return {
        "honest": sitk_volume(root / "honest.nii.gz", shape=(40, 44, 6), spacing=(1.6, 1.4, 8.0)),
        "small": nifti_volume(root / "small.nii", shape=(16, 16, 8), spacing=(1.5, 1.5, 8.0)),
        "wide": sitk_volume(root / "wide.nii.gz", shape=(400, 400, 8), spacing=(1.5, 1.5, 8.0)),
        "nrrd_passwd": nrrd_data_file(root / "passwd.nrrd"),
        "nrrd_zero": nrrd_data_file(root / "zero.nrrd", target="/dev/zero",
                                    sizes="4096 4096 4096", encoding="raw"),
        "mha_passwd": mha_data_file(root / "passwd.mha"),
        "huge": nifti_huge_shape(root / "huge.nii.gz"),
        "bomb": gzip_bomb(root / "bomb.nii.gz", inflated_mib=1024),
        "spacing": nifti_volume(root / "spacing.nii.gz", spacing=(300.0, 300.0, 300.0)),
        "origin": _with_origin(nifti_volume(root / "origin.nii.gz"), (np.inf, 0.0, 0.0)),
    }


def _with_origin(path: Path, origin) -> Path:
    import nibabel as nib

    img = nib.load(str(path))
    affine = img.affine.copy()
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(path))
    return path


model_dir = service_fixtures.model_dir  # module-scoped fixtures shared with tests/security
predictor = service_fixtures.predictor
client = service_fixtures.client
_settings = service_settings
_ready = wait_ready


def _upload(path: Path) -> dict:
    return {"file": (path.name, path.read_bytes(), "application/octet-stream")}


def _assert_no_leak(text: str, app) -> None:
    assert not any(line in text for line in secret_lines()), text
    root = app.state.service.work_root
    assert str(root) not in text and str(root.parent) not in text, text
    assert tempfile.gettempdir() + "/" not in text and "/etc/" not in text, text


class SlowNet(torch.nn.Module):
    """A network that sleeps ``delay`` seconds per window batch (a long inference)."""

    def __init__(self, inner: torch.nn.Module, delay: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay = delay
        self.batches = 0

    def forward(self, x):
        self.batches += 1
        time.sleep(self.delay)
        return self.inner(x)


@pytest.fixture()
def slow_predictor(model_dir):
    from uumamba.inference.predict import Predictor

    pred = Predictor.from_model_dir(model_dir, device="cpu")
    pred.networks = [SlowNet(net, 0.5) for net in pred.networks]
    return pred


# ------------------------------------------------------------------ crafted files

@pytest.mark.parametrize("name, status, words", [
    ("nrrd_passwd", 422, "self-contained"),
    ("nrrd_zero", 422, "data file"),
    ("mha_passwd", 422, "ElementDataFile must be LOCAL"),
    ("huge", 413, "voxels"),
    ("bomb", 413, "beyond the declared size"),
    ("spacing", 422, "implausible"),
    ("origin", 422, "is not a position in a scanner"),  # crashed the resampling: a 500
])
def test_hostile_file_refused_without_leak(client, files, name, status, words):
    for endpoint in ("/v1/segment", "/v1/jobs"):
        start = time.perf_counter()
        r = client.post(endpoint, files=_upload(files[name]))
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert words in detail and detail.startswith("uploaded volume"), detail
        _assert_no_leak(r.text, client.app)
        assert time.perf_counter() - start < 5
    state = client.app.state.service
    assert state.pool.queued == 0 and state.uploads == {}
    assert [p for p in state.work_root.rglob("*") if p.is_file()] == []
    assert client.post("/v1/segment?format=json", files=_upload(files["honest"])).status_code == 200


def test_reader_messages_are_scrubbed(client, tmp_path):
    """A broken self-contained NRRD: SimpleITK's text (paths, file content) never reaches the client."""
    path = tmp_path / "broken.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n\n" + b"\1" * 99)
    r = client.post("/v1/segment", files=_upload(path))
    assert r.status_code == 422 and "unreadable or truncated" in r.json()["detail"]
    _assert_no_leak(r.text, client.app)
    assert "ITK" not in r.text and ".cxx" not in r.text



def test_an_upload_refused_by_a_geometry_rule_says_which(client, tmp_path):
    """A MetaImage whose direction is 2 I: the reader's own rule (not SimpleITK's text) is
    shown, without the server path; it was 'unreadable or truncated (the NRRD / MetaImage
    reader failed)', where the CLI named the rule."""
    import numpy as np

    path = tmp_path / "scaled.mha"
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              "TransformMatrix = 2 0 0 0 2 0 0 0 2\nOffset = 0 0 0\nElementSpacing = 1.5 1.5 8\n"
              "DimSize = 32 32 4\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + np.ones((4, 32, 32), np.float32).tobytes())
    r = client.post("/v1/segment", files=_upload(path))
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == ("uploaded volume: direction cosines of voxel axis 0 have "
                                  "length 2, not 1 (the voxel size belongs in the spacing)"), r.text
    _assert_no_leak(r.text, client.app)

# ------------------------------------------------------------------ memory under a burst

def _rss_mb(pid: str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_eight_bombs_at_once_keep_rss_bounded(model_dir, predictor, files):
    app = create_app(_settings(model_dir, max_uploads_per_client=8), predictor=predictor)
    names = ["bomb", "huge", "nrrd_zero", "bomb", "spacing", "bomb", "mha_passwd", "bomb"]
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    async def scenario() -> list[int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
                while (await c.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.05)
                before = _rss_mb()
                sampler = threading.Thread(target=sample)
                sampler.start()
                answers = await asyncio.gather(*(c.post("/v1/segment", files=_upload(files[n]))
                                                 for n in names))
                done.set()
                sampler.join()
                for a in answers:
                    _assert_no_leak(a.text, app)
                honest = await c.post("/v1/segment?format=json", files=_upload(files["honest"]))
                assert honest.status_code == 200, honest.text
                return [a.status_code for a in answers], before

    statuses, before = asyncio.run(scenario())
    assert statuses == [413, 413, 422, 413, 422, 413, 422, 413]
    print(f"8 bombs at once: RSS {before:.0f} MB -> peak {peak[0]:.0f} MB")
    assert peak[0] - before < 500, f"RSS grew by {peak[0] - before:.0f} MB"


# ------------------------------------------------------------------ slow and chunked clients

def _multipart_head(name: str = "v.nii") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def _run_asgi(app, scenario):
    async def wrapped():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
                while (await c.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.05)
                return await scenario(c)
    return asyncio.run(wrapped())


HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def _trickle(chunks: int):
    """A multipart body that arrives at 160 bytes/s (a slow client), ``chunks`` x 0.1 s."""
    yield _multipart_head()
    for _ in range(chunks):
        await asyncio.sleep(0.1)
        yield b"\0" * 16


def test_slow_client_gets_408_and_holds_no_slot(model_dir, predictor, files):
    """One worker, no queue: a trickling upload neither blocks an honest request (the slot
    is taken only after a complete upload) nor outlives the upload deadline."""
    app = create_app(_settings(model_dir, max_queue=0, workers_per_device=1, upload_timeout_s=1.5),
                     predictor=predictor)

    async def scenario(c):
        slow = asyncio.create_task(c.post("/v1/segment", content=_trickle(40), headers=HEADERS))
        await asyncio.sleep(0.2)
        start = time.monotonic()
        honest = await c.post("/v1/segment?format=json", files=_upload(files["honest"]))
        slow_answer = await slow
        return honest.status_code, slow_answer, time.monotonic() - start

    honest, slow, _ = _run_asgi(app, scenario)
    assert honest == 200
    assert slow.status_code == 408 and "within 1.5 s" in slow.json()["detail"]
    assert app.state.service.uploads == {} and app.state.service.pool.queued == 0


def test_per_client_upload_limit(model_dir, predictor, files):
    app = create_app(_settings(model_dir, max_uploads_per_client=1, upload_timeout_s=1.0),
                     predictor=predictor)

    async def scenario(c):
        slow = asyncio.create_task(c.post("/v1/segment", content=_trickle(30), headers=HEADERS))
        await asyncio.sleep(0.2)
        second = await c.post("/v1/jobs", files=_upload(files["honest"]))
        await slow
        third = await c.post("/v1/segment?format=json", files=_upload(files["honest"]))
        return second, third

    second, third = _run_asgi(app, scenario)
    assert second.status_code == 429 and "this client" in second.json()["detail"]
    assert int(second.headers["retry-after"]) >= 1
    assert third.status_code == 200


def test_chunked_body_over_the_total_cap_is_413(model_dir, predictor, files):
    """A small valid file part followed by megabytes after the closing boundary (not file
    data, so not counted by the part limit): the whole-body cap stops it."""
    app = create_app(_settings(model_dir, max_upload_mb=0.05), predictor=predictor)
    sent = []

    async def body():
        yield _multipart_head("small.nii") + files["small"].read_bytes()
        yield f"\r\n--{BOUNDARY}--\r\n".encode()
        for _ in range(200):  # 3.2 MB of epilogue
            sent.append(1)
            yield b"x" * 16384

    async def scenario(c):
        r = await c.post("/v1/segment", content=body(), headers=HEADERS)
        honest = await c.post("/v1/segment?format=json", files=_upload(files["small"]))
        return r, honest

    r, honest = _run_asgi(app, scenario)
    assert r.status_code == 413 and len(sent) <= 10, (r.status_code, len(sent))
    assert honest.status_code == 200


def test_oversized_part_headers_and_too_many_parts_refused(client, files):
    long_header = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                   f"filename=\"{'a' * 20000}.nii\"\r\n\r\n").encode() + b"x" * 10
    r = client.post("/v1/segment", content=long_header, headers=HEADERS)
    assert r.status_code == 422
    many = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nv\r\n".encode()
                    for i in range(40)) + f"--{BOUNDARY}--\r\n".encode()
    r = client.post("/v1/segment", content=many, headers=HEADERS)
    assert r.status_code == 422 and "parts" in r.json()["detail"]
    assert client.post("/v1/segment?format=json", files=_upload(files["honest"])).status_code == 200


# ------------------------------------------------------------------ timeouts free the worker

def _wait_idle(app, within: float) -> float:
    start = time.monotonic()
    while app.state.service.pool.running and time.monotonic() - start < within:
        time.sleep(0.02)
    return time.monotonic() - start


def test_timed_out_request_frees_its_worker_within_one_batch(model_dir, slow_predictor, files):
    app = create_app(_settings(model_dir, request_timeout_s=0.8, max_queue=0), predictor=slow_predictor)
    with TestClient(app) as c:
        _ready(c)
        r = c.post("/v1/segment", files=_upload(files["wide"]))  # 16 windows: 4 batches x 0.5 s
        assert r.status_code == 504
        assert _wait_idle(app, 5) < 2.0
        assert slow_predictor.networks[0].batches < 4
        r = c.post("/v1/segment?format=json", files=_upload(files["honest"]))
        assert r.status_code == 200, r.text
        end = time.monotonic() + 5
        while [p for p in app.state.service.work_root.rglob("*") if p.is_file()] and time.monotonic() < end:
            time.sleep(0.05)
        assert [p for p in app.state.service.work_root.rglob("*") if p.is_file()] == []


def test_wall_time_cap_and_deleted_job_free_the_worker(model_dir, slow_predictor, files):
    app = create_app(_settings(model_dir, max_inference_s=0.6), predictor=slow_predictor)
    with TestClient(app) as c:
        _ready(c)
        r = c.post("/v1/segment", files=_upload(files["wide"]))
        assert r.status_code == 504 and "wall-time cap" in r.json()["detail"]
        job = c.post("/v1/jobs", files=_upload(files["wide"])).json()
        r = c.get(f"/v1/jobs/{job['id']}")
        end = time.monotonic() + 10
        while c.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued" and time.monotonic() < end:
            time.sleep(0.02)
        body = c.get(f"/v1/jobs/{job['id']}").json()
        assert body["status"] in ("running", "failed")
        _wait_idle(app, 10)
        assert "wall-time cap" in c.get(f"/v1/jobs/{job['id']}").json()["error"]

    app = create_app(_settings(model_dir), predictor=slow_predictor)
    with TestClient(app) as c:
        _ready(c)
        job = c.post("/v1/jobs", files=_upload(files["wide"])).json()
        end = time.monotonic() + 10
        while not app.state.service.pool.running and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.3)
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert _wait_idle(app, 5) < 2.0
        assert c.post("/v1/segment?format=json", files=_upload(files["small"])).status_code == 200


# ------------------------------------------------------------------ resources on failure paths

def test_work_folder_failure_is_503_and_releases_everything(client, files, monkeypatch):
    import uumamba_service.routes as routes

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    state = client.app.state.service
    monkeypatch.setattr(routes.tempfile, "mkdtemp", disk_full)
    monkeypatch.setattr(state.jobs, "create", disk_full)
    for _ in range(12):  # more than workers + max_queue
        assert client.post("/v1/segment", files=_upload(files["honest"])).status_code == 503
        assert client.post("/v1/jobs", files=_upload(files["honest"])).status_code == 503
    assert state.pool.queued == 0 and state.uploads == {}
    monkeypatch.undo()
    assert client.post("/v1/segment?format=json", files=_upload(files["honest"])).status_code == 200


def test_stale_work_folders_of_a_dead_process_are_swept(model_dir, predictor, tmp_path):
    live_root, live_lock = make_work_root(tmp_path)  # another live app: must be kept
    parent = live_root.parent
    stale = parent / "pid999999-crashed"
    stale.mkdir()
    (stale / "segment-1").mkdir()
    (stale / "segment-1" / "upload.nii.gz").write_bytes(b"patient scan")
    (parent / "pid999999-crashed.lock").write_bytes(b"")
    old = parent / "pid999998-nolock"
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    app = create_app(_settings(model_dir, tmp_dir=tmp_path), predictor=predictor)
    with TestClient(app) as c:
        _ready(c)
        assert not stale.exists() and not old.exists()
        assert live_root.exists() and app.state.service.work_root.parent == parent
    assert not app.state.service.work_root.exists()
    os.close(live_lock)


# ------------------------------------------------------------------ hosts and keys

def test_trusted_hosts(model_dir, predictor, files):
    app = create_app(_settings(model_dir, allowed_hosts=["localhost", "127.0.0.1"]), predictor=predictor)
    with TestClient(app, base_url="http://localhost") as c:
        _ready(c)
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"Host": "evil.example"}).status_code == 400


@pytest.fixture()
def library_logger_restored():
    """``serve_from_cli`` routes the ``uumamba`` logger to JSON for the server process; undo it
    for the tests that run after this one in the same process."""
    import logging

    lib = logging.getLogger("uumamba")
    state = (list(lib.handlers), lib.propagate, lib.level)
    yield
    lib.handlers[:] = state[0]
    lib.propagate, lib.level = state[1], state[2]


def test_serve_refuses_a_public_host_without_a_key(model_dir, monkeypatch, library_logger_restored):
    import uvicorn

    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw["host"]))
    monkeypatch.delenv("UUMAMBA_API_KEY", raising=False)
    with pytest.raises(UserError, match="UUMAMBA_API_KEY") as info:
        serve_from_cli(model_dir, host="0.0.0.0", device="cpu")
    assert "\n" not in str(info.value) and ran == []
    serve_from_cli(model_dir, host="0.0.0.0", device="cpu", insecure_no_auth=True)
    monkeypatch.setenv("UUMAMBA_API_KEY", "k" * 32)
    serve_from_cli(model_dir, host="10.1.2.3", device="cpu")
    serve_from_cli(model_dir, host="127.0.0.1", device="cpu")
    assert ran == ["0.0.0.0", "10.1.2.3", "127.0.0.1"]


def test_header_caps_follow_the_settings(model_dir, predictor, files):
    app = create_app(_settings(model_dir, max_voxels=1000), predictor=predictor)
    with TestClient(app) as c:
        _ready(c)
        r = c.post("/v1/segment", files=_upload(files["small"]))
        assert r.status_code == 413 and "limit of 1000" in r.json()["detail"]
    assert np.prod((16, 16, 8)) > 1000



def test_both_endpoints_cap_a_2d_models_thin_upload_at_its_own_slices(model_dir, predictor,
                                                                       tmp_path, monkeypatch):
    """A 2D model keeps each volume's slices (``plans.resampling_spacing``): /v1/jobs refuses a
    thin-slice upload that would exceed the resampled-size cap at submission, as /v1/segment
    does (it used to accept it against the 8 mm target grid and fail it in the worker)."""
    plans2d = predictor.plans.model_copy(update={"spatial_dims": 2, "slice_axis": 2})
    monkeypatch.setattr(predictor, "plans", plans2d)
    thin = nifti_volume(tmp_path / "thin.nii.gz", shape=(40, 40, 200), spacing=(1.5, 1.5, 0.05))
    # 200 slices kept at their own 0.05 mm: 40 x 40 x 200 voxels; on an 8 mm grid about 2
    app = create_app(_settings(model_dir, max_resampled_voxels=100_000), predictor=predictor)
    with TestClient(app) as c:
        _ready(c)
        for endpoint in ("/v1/segment", "/v1/jobs"):
            r = c.post(endpoint, files=_upload(thin))
            assert r.status_code == 413, (endpoint, r.text)
            assert "1.5 x 1.5 x own mm" in r.json()["detail"], r.text
            _assert_no_leak(r.text, c.app)
        assert c.app.state.service.pool.queued == 0
