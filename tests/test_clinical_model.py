"""Clinical outputs of a trained (tiny) model: ``uumamba predict`` writes clinical.csv /
clinical.json and the per-patient report when both phases are predicted; the service's
two-phase answer (``file`` = ED + ``file_es`` = ES, ``format=json``) gives both phases' volumes
and the indices, and the second file obeys the same upload rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import service_fixtures
import SimpleITK as sitk
from fastapi.testclient import TestClient
from service_fixtures import service_settings, wait_ready

from uumamba.data.synthetic import make_synthetic_case
from uumamba_service.app import create_app

model_dir = service_fixtures.model_dir
predictor = service_fixtures.predictor
client = service_fixtures.client
SPACING = (1.5, 1.5, 8.0)


def _volume(path: Path, seed: int) -> Path:
    image, _ = make_synthetic_case(seed=seed, shape=(64, 64, 6), spacing=SPACING)
    img = sitk.GetImageFromArray(np.ascontiguousarray(image.astype(np.float32).transpose(2, 1, 0)))
    img.SetSpacing(SPACING)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def phases(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("phases")
    return _volume(root / "ed.nii.gz", 3), _volume(root / "es.nii.gz", 4)


def _files(ed: Path, es: Path | None) -> list:
    files = [("file", (ed.name, ed.read_bytes(), "application/octet-stream"))]
    if es is not None:
        files.append(("file_es", (es.name, es.read_bytes(), "application/octet-stream")))
    return files


def test_two_phases_give_volumes_and_indices(client, phases):
    ed, es = phases
    one = client.post("/v1/segment?format=json", files=_files(ed, None)).json()
    assert one["es"] is None and one["clinical"] is None
    r = client.post("/v1/segment?format=json", files=_files(ed, es))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["volumes_ml"] == pytest.approx(one["volumes_ml"])  # the ED phase's own
    es_alone = client.post("/v1/segment?format=json", files=_files(es, None)).json()
    assert body["es"]["volumes_ml"] == pytest.approx(es_alone["volumes_ml"])
    clinical = body["clinical"]
    assert "file_es" in clinical["pairing"]
    idx = clinical["indices"]
    lv_ed, lv_es = one["volumes_ml"]["LV"], es_alone["volumes_ml"]["LV"]
    assert idx["LV_EDV_ml"] == pytest.approx(lv_ed)
    assert idx["LV_ESV_ml"] == pytest.approx(lv_es)
    if lv_ed > 0 and lv_es > 0:
        assert idx["LV_EF_pct"] == pytest.approx(100 * (lv_ed - lv_es) / lv_ed)
    else:
        assert idx["LV_EF_pct"] is None and "LV_EF_pct" in clinical["undefined"]
    assert idx["MYO_mass_g"] == pytest.approx(one["volumes_ml"]["MYO"] * 1.05) \
        if one["volumes_ml"]["MYO"] > 0 else idx["MYO_mass_g"] is None


def test_implausible_phase_pairs_are_flagged(client, phases, tmp_path):
    """The same file twice, or two phases on different grids, are answered with a warning."""
    ed, _es = phases
    body = client.post("/v1/segment?format=json", files=_files(ed, ed)).json()
    assert any("identical volumes" in w for w in body["clinical"]["warnings"])
    other = tmp_path / "other.nii.gz"
    image, _ = make_synthetic_case(seed=4, shape=(48, 52, 7), spacing=(1.4, 1.4, 7.0))
    img = sitk.GetImageFromArray(np.ascontiguousarray(image.astype(np.float32).transpose(2, 1, 0)))
    img.SetSpacing((1.4, 1.4, 7.0))
    sitk.WriteImage(img, str(other))
    body = client.post("/v1/segment?format=json", files=_files(ed, other)).json()
    assert any("different grids" in w for w in body["clinical"]["warnings"])


def test_second_phase_needs_json_and_obeys_upload_rules(client, phases, tmp_path):
    ed, es = phases
    r = client.post("/v1/segment", files=_files(ed, es))
    assert r.status_code == 422 and "format=json" in r.json()["detail"]
    r = client.post("/v1/jobs", files=_files(ed, es))  # refused at submission, not queued
    assert r.status_code == 422 and "format=json" in r.json()["detail"]
    bad = tmp_path / "es.nii.gz"
    bad.write_bytes(b"not gzip at all")
    r = client.post("/v1/segment?format=json", files=_files(ed, bad))
    assert r.status_code == 415 and "gzip" in r.json()["detail"]
    r = client.post("/v1/segment?format=json", files=[*_files(ed, es), _files(ed, es)[1]])
    assert r.status_code == 422 and "more than one 'file_es'" in r.json()["detail"]
    four_d = tmp_path / "es4d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 6, 64, 64), np.float32)), str(four_d))
    r = client.post("/v1/segment?format=json", files=_files(ed, four_d))
    assert r.status_code == 422
    # the refusal says which of the two files it is about
    assert r.json()["detail"].startswith("uploaded second phase ('file_es')"), r.json()
    nan = tmp_path / "nan.nii.gz"
    array = np.ones((6, 64, 64), np.float32)
    array[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(nan))
    r = client.post("/v1/segment?format=json", files=_files(ed, nan))
    assert r.status_code == 422 and r.json()["detail"] == (
        "uploaded second phase ('file_es'): volume has 1 NaN or infinite voxels of 24576; "
        "replace them before segmenting")


def test_both_files_share_the_upload_limit(model_dir, predictor, phases):
    ed, es = phases
    limit_mb = (ed.stat().st_size + es.stat().st_size * 0.5) / (1024 * 1024)
    app = create_app(service_settings(model_dir, max_upload_mb=limit_mb), predictor=predictor)
    with TestClient(app) as c:
        wait_ready(c)
        assert c.post("/v1/segment?format=json", files=_files(ed, None)).status_code == 200
        r = c.post("/v1/segment?format=json", files=_files(ed, es))
        assert r.status_code == 413


def test_predict_writes_clinical_outputs_and_report(model_dir, phases, tmp_path):
    import csv
    import json
    import shutil

    from uumamba.commands.predict import predict_from_cli
    from uumamba.errors import DataError

    ed, es = phases
    inp = tmp_path / "in" / "patient004"
    inp.mkdir(parents=True)
    shutil.copy(ed, inp / "patient004_frame01.nii.gz")
    shutil.copy(es, inp / "patient004_frame07.nii.gz")
    (inp / "Info.cfg").write_text("ED: 1\nES: 7\nGroup: NOR\nHeight: 180\nWeight: 80\n")
    out = tmp_path / "out"
    predict_from_cli(model_dir, inp, out, device="cpu", report=True)
    record = json.loads((out / "clinical.json").read_text())["patients"][0]
    ed_vol = json.loads((out / "patient004_frame01_volumes.json").read_text())["labels"]
    es_vol = json.loads((out / "patient004_frame07_volumes.json").read_text())["labels"]
    assert record["pairing"] == "Info.cfg" and record["group"] == "NOR"
    assert record["LV_EDV_ml"] == pytest.approx(ed_vol["LV"]["volume_ml"])
    assert record["LV_ESV_ml"] == pytest.approx(es_vol["LV"]["volume_ml"])
    assert record["bsa_m2"] == pytest.approx(2.0)
    assert record["LV_EDVi_ml_m2"] == pytest.approx(ed_vol["LV"]["volume_ml"] / 2.0)
    rows = list(csv.DictReader((out / "clinical.csv").open()))
    assert [r["patient"] for r in rows] == ["patient004"]
    body = json.loads((out / "clinical.json").read_text())
    assert len(body["model"]["version"]) == 12 and body["model"]["weights"][0]["sha256"]
    html = (out / "patient004_report.html").read_text()
    assert body["model"]["version"] in html and (out / "patient004_report.png").is_file()
    # --checkpoint latest: clinical.json names the final weights, hashed as loaded
    import hashlib

    import torch

    chosen = tmp_path / "model_latest"
    shutil.copytree(model_dir, chosen)
    (fold_dir,) = [p for p in chosen.glob("fold_*") if (p / "checkpoint_latest.pt").is_file()]
    state = torch.load(fold_dir / "checkpoint_latest.pt", weights_only=True)
    # a best checkpoint of other bytes beside it, which the default would load
    torch.save({**state, "iteration": state["iteration"] - 1}, fold_dir / "checkpoint_best.pt")
    predict_from_cli(chosen, inp, tmp_path / "out_latest", device="cpu", checkpoint="latest")
    (weights,) = json.loads((tmp_path / "out_latest" / "clinical.json").read_text())["model"]["weights"]
    latest = fold_dir / "checkpoint_latest.pt"
    assert weights == {"file": f"{fold_dir.name}/checkpoint_latest.pt",
                       "sha256": hashlib.sha256(latest.read_bytes()).hexdigest()}
    bad = tmp_path / "pairs.csv"
    bad.write_text("case_ED,case_ES,patient\n/etc/passwd,b,P\n")
    with pytest.raises(DataError, match="not a case name"):
        predict_from_cli(model_dir, inp, tmp_path / "out2", device="cpu", pairs=bad)


def test_predict_split_4d_series_gives_its_clinical_record(model_dir, phases, tmp_path):
    """A cine split with --split-4d is one patient: ED and ES from Info.cfg, whose frames
    count from 1 (``ED: 1`` is ``CASE_frame00``), else from the LV volume curve."""
    import json
    import shutil

    import nibabel as nib

    from uumamba.commands.predict import predict_from_cli

    ed, es = phases
    third = _volume(tmp_path / "third.nii.gz", 5)
    frames = [nib.load(str(p)) for p in (es, ed, third)]
    cine = nib.Nifti1Image(np.stack([np.asarray(f.dataobj) for f in frames], axis=-1),
                           frames[0].affine)
    inp = tmp_path / "in" / "patient004"
    inp.mkdir(parents=True)
    nib.save(cine, str(inp / "patient004_4d.nii.gz"))
    (inp / "Info.cfg").write_text("ED: 2\nES: 1\nGroup: NOR\nHeight: 180\nWeight: 80\n")
    out = tmp_path / "out"
    predict_from_cli(model_dir, inp, out, device="cpu", split_4d=True)
    lv = [json.loads((out / f"patient004_4d_frame{t:02d}_volumes.json").read_text())
          ["labels"]["LV"]["volume_ml"] for t in range(3)]
    (record,) = json.loads((out / "clinical.json").read_text())["patients"]
    assert (record["patient"], record["pairing"], record["group"]) == (
        "patient004_4d", "Info.cfg", "NOR")
    assert (record["ed_case"], record["es_case"]) == ("patient004_4d_frame01",
                                                       "patient004_4d_frame00")
    assert record["LV_EDV_ml"] == pytest.approx(lv[1]) and record["LV_ESV_ml"] == pytest.approx(lv[0])
    assert record["bsa_m2"] == pytest.approx(2.0)

    (inp / "Info.cfg").unlink()
    shutil.rmtree(out)
    predict_from_cli(model_dir, inp, out, device="cpu", split_4d=True)
    (record,) = json.loads((out / "clinical.json").read_text())["patients"]
    assert record["pairing"] == "LV volume curve"
    assert record["LV_EDV_ml"] == pytest.approx(max(lv))
    assert record["LV_ESV_ml"] == pytest.approx(min(lv))
    assert record["ed_case"] == f"patient004_4d_frame{int(np.argmax(lv)):02d}"


def test_one_4d_file_with_a_blank_frame_gets_its_record_and_report(model_dir, phases, tmp_path):
    """A single cine file (not a folder) gets its clinical record and report; its Info.cfg
    beside it counts in a folder named otherwise when the folder holds no other patient's
    images; the blank ES frame is said in the record, and left out of an LV volume curve."""
    import json

    import nibabel as nib

    from uumamba.commands.predict import predict_from_cli

    ed, es = phases
    frames = [np.asarray(nib.load(str(p)).dataobj) for p in (es, ed)]
    cine = nib.Nifti1Image(np.stack([*frames, np.zeros_like(frames[0])], axis=-1),
                           nib.load(str(ed)).affine)
    folder = tmp_path / "scans"
    folder.mkdir()
    nib.save(cine, str(folder / "patient004_4d.nii.gz"))
    (folder / "Info.cfg").write_text("ED: 2\nES: 3\nNbFrame: 3\n")
    out = tmp_path / "out"
    predict_from_cli(model_dir, folder / "patient004_4d.nii.gz", out, device="cpu",
                     split_4d=True, report=True)
    (record,) = json.loads((out / "clinical.json").read_text())["patients"]
    assert (record["pairing"], record["ed_case"], record["es_case"]) == (
        "Info.cfg", "patient004_4d_frame01", "patient004_4d_frame02")
    assert record["warnings"][0].startswith("ES patient004_4d_frame02: the image is blank")
    assert (out / "patient004_4d_report.html").is_file()

    (folder / "Info.cfg").unlink()
    out = tmp_path / "out2"
    predict_from_cli(model_dir, folder, out, device="cpu", split_4d=True)
    (record,) = json.loads((out / "clinical.json").read_text())["patients"]
    assert record["pairing"] == "LV volume curve"
    assert "patient004_4d_frame02" not in (record["ed_case"], record["es_case"])
    assert record["warnings"][0].startswith("1 frame(s) blank or without any LV left out")


def test_a_blank_second_phase_is_said_beside_the_indices(client, phases, tmp_path):
    ed, _es = phases
    blank = tmp_path / "blank.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 64, 64), np.float32)), str(blank))
    r = client.post("/v1/segment?format=json", files=_files(ed, blank))
    assert r.status_code == 200, r.text
    assert r.json()["clinical"]["warnings"][0].startswith("ES 'file_es': the image is blank")
