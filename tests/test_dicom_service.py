"""The service with DICOM: a ``.zip`` of one series in, ``format=dcm`` (DICOM SEG) or NIfTI out;
archives that break the upload rules are refused with a message naming no server path."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pydicom
from dicom_helpers import rotation, write_series
from service_fixtures import client, model_dir, predictor  # noqa: F401

from uumamba.data.synthetic import make_synthetic_case
from uumamba.dicom.seg import read_seg_mask


def _zip(files, names=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, f in enumerate(files):
            zf.write(f, names[k] if names else f"../../{f.name}")
    return buf.getvalue()


def _series(tmp_path, n=5):
    image, _ = make_synthetic_case(5, shape=(64, 60, n), spacing=(1.5, 1.5, 8.0))
    return write_series((image * 100).astype(np.int16), tmp_path / "s", direction=rotation(0.2, 1.0))


def test_zip_series_to_dicom_seg_and_nifti(client, tmp_path):  # noqa: F811
    files = _series(tmp_path)
    body = _zip(files)
    r = client.post("/v1/segment?format=dcm", files={"file": ("study.zip", body, "application/zip")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    assert 'filename="study_seg.dcm"' in r.headers["content-disposition"]
    (tmp_path / "seg.dcm").write_bytes(r.content)
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert ds.Modality == "SEG" and ds.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == {s.SOPInstanceUID for s in src}
    seg_mask = read_seg_mask(tmp_path / "seg.dcm", [s.SOPInstanceUID for s in src])
    r = client.post("/v1/segment?format=nii.gz", files={"file": ("study.zip", body, "application/zip")})
    assert r.status_code == 200, r.text
    (tmp_path / "m.nii.gz").write_bytes(r.content)
    from uumamba.data.io import read_image

    mask, _ = read_image(tmp_path / "m.nii.gz")
    assert mask.shape == (64, 60, 5)
    # segment numbers follow label order (1 RV, 2 MYO, 3 LV): same voxels as the NIfTI mask
    np.testing.assert_array_equal(seg_mask, mask)


def test_bad_archives_are_refused(client, tmp_path):  # noqa: F811
    files = _series(tmp_path)
    r = client.post("/v1/segment", files={"file": ("x.zip", b"not a zip" * 50, "application/zip")})
    assert r.status_code == 415 and "not a zip archive" in r.json()["detail"]
    gap = _zip(files[:2] + files[3:])
    r = client.post("/v1/segment", files={"file": ("x.zip", gap, "application/zip")})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "uploaded archive" in detail and "missing slices" in detail and "/tmp" not in detail
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((64, 60, 5), np.float32), np.diag([1.5, 1.5, 8.0, 1])),
             str(tmp_path / "v.nii.gz"))
    r = client.post("/v1/segment?format=dcm", files={
        "file": ("v.nii.gz", (tmp_path / "v.nii.gz").read_bytes(), "application/gzip")})
    assert r.status_code == 422 and "upload it as a .zip" in r.json()["detail"]
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * (16 << 20))
    r = client.post("/v1/segment", files={"file": ("x.zip", bomb.getvalue(), "application/zip")})
    assert r.status_code == 422 and "zip bomb" in r.json()["detail"]


def test_zip_series_as_a_job(client, tmp_path):  # noqa: F811
    import time

    files = _series(tmp_path, n=4)
    r = client.post("/v1/jobs?format=dcm", files={"file": ("s.zip", _zip(files), "application/zip")})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    end = time.monotonic() + 60
    while (body := client.get(f"/v1/jobs/{job}").json())["status"] not in ("done", "failed"):
        assert time.monotonic() < end, body
        time.sleep(0.05)
    assert body["status"] == "done", body
    result = client.get(f"/v1/jobs/{job}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "application/dicom"
    (tmp_path / "j.dcm").write_bytes(result.content)
    ds = pydicom.dcmread(tmp_path / "j.dcm")
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 4


def test_hostile_headers_answer_422_json(client, tmp_path):  # noqa: F811
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    for keyword, text in [("RescaleSlope", "abc"), ("RescaleSlope", "NaN"), ("NumberOfFrames", "abc")]:
        files = write_series(np.zeros((16, 16, 4), np.int16), tmp_path / f"{keyword}{text}")
        ds = pydicom.dcmread(files[1])
        tag = tag_for_keyword(keyword)
        if tag in ds:
            del ds[tag]
        value = text.encode() + b" " * (len(text) % 2)
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
        ds.save_as(files[1])
        r = client.post("/v1/segment", files={"file": ("x.zip", _zip(files), "application/zip")})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert f"{keyword} '{text}' is not a" in detail and "uploaded archive" in detail
        assert "/tmp" not in detail and str(tmp_path) not in detail
