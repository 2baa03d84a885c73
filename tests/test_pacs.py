"""``uumamba pacs`` against a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``).

The fixture starts Orthanc on loopback with a throw-away JSON config: a free HTTP port, the
DICOM server disabled, storage and index in ``tmp_path``, remote access off, HTTP basic
authentication with a test user, and the DICOMweb plugin loaded from its installed path. It
is skipped, with the reason, when the ``Orthanc`` binary or the plugin is absent
(``.ci/run`` installs both).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicom_helpers import rotation, write_series

from uumamba.commands.pacs import pacs_from_cli
from uumamba.data.synthetic import make_synthetic_case
from uumamba.dicom.seg import read_seg_mask
from uumamba.errors import UserError

MODEL = Path(__file__).parent / "fixtures" / "model_v0_1"
PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                "/usr/lib/orthanc/libOrthancDicomWeb.so")
USER, PASSWORD = "tester", "s3cret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """(DICOMweb root URL, REST root URL) of a fresh Orthanc; stopped after the module."""
    binary = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None)
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; "
                    ".ci/run does this)")
    plugin = next((p for p in PLUGIN_PATHS if Path(p).is_file()), None)
    if plugin is None:
        pytest.skip("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "uumamba-test", "HttpPort": port, "DicomServerEnabled": False,
        "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD}, "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpTimeout": 30,
        "StableAge": 1, "SaveJobs": False,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    rest = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited ({proc.returncode}): {(root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{rest}/system", auth=(USER, PASSWORD), timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        else:
            pytest.fail("Orthanc did not answer within 10 s")
        yield f"{rest}/dicom-web", rest
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _upload(rest: str, files) -> None:
    for f in files:
        r = requests.post(f"{rest}/instances", data=Path(f).read_bytes(), auth=(USER, PASSWORD),
                          timeout=10)
        r.raise_for_status()


def test_round_trip_through_orthanc(orthanc, tmp_path, capsys):
    url, rest = orthanc
    image, _ = make_synthetic_case(4, shape=(64, 60, 6), spacing=(1.5, 1.5, 8.0))
    files = write_series((image * 100).astype(np.int16), tmp_path / "series",
                         direction=rotation(0.4, 1.0), study_uid="1.2.826.0.1.3680043.99.1",
                         series_uid="1.2.826.0.1.3680043.99.1.1")
    _upload(rest, files)
    out = tmp_path / "out"
    stored = pacs_from_cli(url, "1.2.826.0.1.3680043.99.1", MODEL, out, user=USER,
                           password=PASSWORD, timeout=30, device="cpu")
    assert len(stored) == 1
    series = requests.get(f"{url}/studies/1.2.826.0.1.3680043.99.1/series",
                          auth=(USER, PASSWORD), timeout=10).json()
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert modalities == ["MR", "SEG"]
    seg_uid = [s["0020000E"]["Value"][0] for s in series if s["00080060"]["Value"][0] == "SEG"][0]
    inst = requests.post(f"{rest}/tools/lookup", data=stored[0], auth=(USER, PASSWORD), timeout=10).json()
    assert inst and inst[0]["Type"] == "Instance"
    seg_bytes = requests.get(f"{rest}/instances/{inst[0]['ID']}/file", auth=(USER, PASSWORD),
                             timeout=10).content
    (tmp_path / "back.dcm").write_bytes(seg_bytes)
    ds = pydicom.dcmread(tmp_path / "back.dcm")
    assert ds.SeriesInstanceUID == seg_uid and ds.SOPInstanceUID == stored[0]
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["RV", "MYO", "LV"]
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.826.0.1.3680043.99.1.1"
    assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    local = out / "PAT1_3.dcm"
    uids = [s.SOPInstanceUID for s in sources]
    np.testing.assert_array_equal(read_seg_mask(tmp_path / "back.dcm", uids), read_seg_mask(local, uids))
    assert "stored 1 DICOM SEG object(s)" in capsys.readouterr().out


def test_server_errors_are_one_line(orthanc, tmp_path):
    url, rest = orthanc
    n_before = len(requests.get(f"{rest}/instances", auth=(USER, PASSWORD), timeout=10).json())
    with pytest.raises(UserError, match=r"study 1\.2\.3\.999: not found on the server") as err:
        pacs_from_cli(url, "1.2.3.999", MODEL, tmp_path / "o", user=USER, password=PASSWORD,
                      timeout=10, device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"not found on the server \(HTTP 404\)"):
        pacs_from_cli(url, "1.2.3.999", MODEL, tmp_path / "o", series="1.2.3.999.1", user=USER,
                      password=PASSWORD, timeout=10, device="cpu")
    with pytest.raises(UserError, match=r"access denied \(HTTP 401\)"):
        pacs_from_cli(url, "1.2.3.999", MODEL, tmp_path / "o", user=USER, password="wrong",
                      timeout=10, device="cpu")
    with pytest.raises(UserError, match="connection refused"):
        pacs_from_cli(f"http://127.0.0.1:{_free_port()}/dicom-web", "1.2.3", MODEL, tmp_path / "o",
                      timeout=5, device="cpu")
    # a series that cannot be segmented (a gap) stores nothing
    files = write_series(np.zeros((64, 60, 6), np.int16), tmp_path / "gap",
                         study_uid="1.2.826.0.1.3680043.99.2")
    _upload(rest, files[:2] + files[3:])
    with pytest.raises(UserError, match="missing slices"):
        pacs_from_cli(url, "1.2.826.0.1.3680043.99.2", MODEL, tmp_path / "o2", user=USER,
                      password=PASSWORD, timeout=10, device="cpu")
    n_after = len(requests.get(f"{rest}/instances", auth=(USER, PASSWORD), timeout=10).json())
    assert n_after == n_before + 5  # the 5 uploaded slices, no SEG


def test_timeout_is_one_line(tmp_path):
    with socket.socket() as server:  # accepts the connection, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with pytest.raises(UserError, match=r"no answer within 0\.5 s"):
            pacs_from_cli(f"http://127.0.0.1:{port}/dicom-web", "1.2.3", MODEL, tmp_path / "o",
                          timeout=0.5, device="cpu")


def _hostile_pacs(answer: bytes, content_type: str = "application/dicom+json"):
    """A loopback server answering every GET with ``answer``; returns (url, server)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/dicom-web", server


def test_hostile_uids_are_refused_before_any_path(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    evil = "../../" + "9" * 300
    url, server = _hostile_pacs(json.dumps(
        [{"0020000E": {"vr": "UI", "Value": [evil]}, "00080060": {"vr": "CS", "Value": ["MR"]}}]).encode())
    try:
        with pytest.raises(UserError, match=r"the server's SeriesInstanceUID '\.\./\.\./9+\.\.\. is "
                                            r"not a DICOM UID \(digits and dots, at most 64"):
            pacs_from_cli(url, "1.2.3", MODEL, tmp_path / "o", timeout=5, device="cpu")
        with pytest.raises(UserError, match=r"--series '1\.2/\.\./x' is not a DICOM UID"):
            pacs_from_cli(url, "1.2.3", MODEL, tmp_path / "o", series="1.2/../x", timeout=5,
                          device="cpu")
        with pytest.raises(UserError, match=r"--study '1\.2\.3a' is not a DICOM UID"):
            pacs_from_cli(url, "1.2.3a", MODEL, tmp_path / "o", timeout=5, device="cpu")
    finally:
        server.shutdown()
    assert not list((tmp_path / "tmp").rglob("*"))  # no folder made from the server's UID


def test_malformed_dicomweb_answer_is_one_line(tmp_path):
    url, server = _hostile_pacs(b"{not json", "application/dicom+json")
    try:
        with pytest.raises(UserError) as err:
            pacs_from_cli(url, "1.2.3", MODEL, tmp_path / "o", timeout=5, device="cpu")
    finally:
        server.shutdown()
    message = str(err.value)
    assert "\n" not in message and "is not valid DICOMweb" in message
