"""Clinical indices (uumamba.clinical): volumes, EF and mass on masks with hand-computed
values, BSA, Info.cfg and pairs CSV as hostile input, pairing, agreement statistics,
``evaluate --clinical``, the report, and the expert labels of the real ACDC patients."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uumamba.clinical import (
    PatientInfo,
    body_surface_area,
    clinical_indices,
    indices_from_volumes,
    label_roles,
    pair_phases,
    phase_volumes,
    read_info_cfg,
    read_pairs_csv,
    records_from_volumes,
    write_clinical,
)
from uumamba.clinical_report import mid_slice, write_report
from uumamba.errors import DataError, UserError
from uumamba.evaluation.agreement import agreement, evaluate_clinical, write_clinical_evaluation

LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
SPACING = (2.0, 1.5, 10.0)  # anisotropic: one voxel = 30 mm^3 = 0.03 mL


def _masks(lv_es_voxels: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """ED: LV 400 voxels (12 mL), MYO 100 (3 mL), RV 300 (9 mL); ES: LV ``lv_es_voxels``,
    MYO 100, RV 150 (4.5 mL)."""
    ed = np.zeros((40, 40, 6), np.uint8)
    ed[0:10, 0:10, 0:4] = 3          # 400
    ed[20:30, 0:10, 0:1] = 2         # 100
    ed[0:10, 20:30, 0:3] = 1         # 300
    es = np.zeros_like(ed)
    flat = es[0:10, 0:10, 0:4].reshape(-1)
    flat[:lv_es_voxels] = 3
    es[0:10, 0:10, 0:4] = flat.reshape(10, 10, 4)
    es[20:30, 0:10, 0:1] = 2
    es[0:10, 20:35, 0:1] = 1         # 150
    return ed, es


def test_known_volumes_ef_and_mass_with_anisotropic_spacing():
    ed, es = _masks()
    out = clinical_indices(ed, es, SPACING, SPACING, LABELS)
    assert out["LV_EDV_ml"] == pytest.approx(12.0)
    assert out["LV_ESV_ml"] == pytest.approx(6.0)
    assert out["LV_SV_ml"] == pytest.approx(6.0)
    assert out["LV_EF_pct"] == pytest.approx(50.0)
    assert out["RV_EDV_ml"] == pytest.approx(9.0)
    assert out["RV_ESV_ml"] == pytest.approx(4.5)
    assert out["RV_EF_pct"] == pytest.approx(50.0)
    assert out["MYO_mass_g"] == pytest.approx(3.0 * 1.05)
    assert out["bsa_m2"] is None and out["LV_EDVi_ml_m2"] is None
    assert "height" in out["undefined"]["LV_EDVi_ml_m2"]
    assert out["warnings"] == []


def test_es_spacing_is_its_own():
    ed, es = _masks(lv_es_voxels=400)  # same voxel count at ES, but ES voxels are half as big
    out = clinical_indices(ed, es, SPACING, (1.0, 1.5, 10.0), LABELS)
    assert out["LV_ESV_ml"] == pytest.approx(6.0)
    assert out["LV_EF_pct"] == pytest.approx(50.0)


def test_empty_es_gives_null_ef_with_reason_and_strict_json(tmp_path):
    ed, es = _masks(lv_es_voxels=0)
    out = clinical_indices(ed, es, SPACING, SPACING, LABELS)
    assert out["LV_ESV_ml"] == 0.0
    assert out["LV_EF_pct"] is None and out["LV_SV_ml"] is None
    assert "no LV voxels at ES" in out["undefined"]["LV_EF_pct"]
    assert out["RV_EF_pct"] == pytest.approx(50.0)  # the RV is still defined
    records, _ = records_from_volumes(
        {"patient001_frame01": phase_volumes(ed, SPACING, LABELS),
         "patient001_frame02": phase_volumes(es, SPACING, LABELS)}, LABELS)
    json_path, csv_path = write_clinical(records, tmp_path)
    text = json_path.read_text()
    assert "NaN" not in text
    patient = json.loads(text)["patients"][0]
    assert patient["LV_EF_pct"] is None and "no LV voxels at ES" in patient["undefined"]["LV_EF_pct"]
    header, row = csv_path.read_text().splitlines()[:2]
    cells = dict(zip(header.split(","), row.split(","), strict=False))
    assert cells["LV_EF_pct"] == "" and cells["LV_EDV_ml"] == "12.0"


def test_bsa_mosteller_and_indexed_values():
    assert body_surface_area(180, 80) == pytest.approx(2.0)
    assert body_surface_area(160, 58) == pytest.approx(math.sqrt(160 * 58 / 3600))
    with pytest.raises(ValueError):
        body_surface_area(0, 80)
    ed, es = _masks()
    out = clinical_indices(ed, es, SPACING, SPACING, LABELS, PatientInfo(180.0, 80.0))
    assert out["bsa_m2"] == pytest.approx(2.0)
    assert out["LV_EDVi_ml_m2"] == pytest.approx(6.0)
    assert out["MYO_massi_g_m2"] == pytest.approx(3.15 / 2.0)
    assert "Mosteller" in out["bsa_formula"]


def test_label_roles_by_name_and_refusal_without_lv():
    roles = label_roles({0: "bg", 1: "Right ventricle", 2: "LV myocardium", 3: "LV_cavity"})
    assert (roles.lv, roles.rv, roles.myo) == ("LV_cavity", "Right ventricle", "LV myocardium")
    roles = label_roles({0: "background", 1: "LV"})
    assert roles.rv is None and roles.myo is None
    with pytest.raises(DataError, match="no LV cavity label"):
        label_roles({0: "background", 1: "aorta", 2: "coronary"})
    with pytest.raises(DataError, match="both"):
        label_roles({1: "LV", 2: "left ventricle"})


def test_lv_only_label_set_gives_rv_and_mass_undefined():
    ed, es = _masks()
    out = clinical_indices(np.where(ed == 3, 1, 0), np.where(es == 3, 1, 0), SPACING, SPACING,
                           {0: "background", 1: "LV"})
    assert out["LV_EF_pct"] == pytest.approx(50.0)
    assert out["RV_EF_pct"] is None and "no RV" in out["undefined"]["RV_EF_pct"]
    assert out["MYO_mass_g"] is None


def test_swapped_phases_warn():
    ed, es = _masks()
    out = clinical_indices(es, ed, SPACING, SPACING, LABELS)
    assert out["LV_EF_pct"] == pytest.approx(-100.0)
    assert any("swapped" in w for w in out["warnings"])


INFO = "ED: 1\nES: 12\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n"


def test_read_info_cfg(tmp_path):
    path = tmp_path / "Info.cfg"
    path.write_text(INFO)
    info = read_info_cfg(path)
    assert (info.ed_frame, info.es_frame, info.group) == (1, 12, "DCM")
    assert (info.height_cm, info.weight_kg) == (184.0, 95.0)


@pytest.mark.parametrize("text, words", [
    ("ED: 1\n" + "x" * 5000, "larger than 4096 bytes"),
    ("ED: 1\nED: 2\n", "given twice"),
    ("ED: one\n", "not an integer"),
    ("Height: 1e9\n", "outside 30-250 cm"),
    ("Weight: nan\n", "not a number"),
    ("Group: <script>\n", "Group"),
    ("just text\n", "not 'Key: value'"),
    ("k: v\n" * 70, "more than 64 lines"),
    ("Weight: 1_00\n", "not a number"),
    ("Height: inf\n", "not a number"),
    ("ED: 1\nES: 1\n", "same frame"),
])
def test_hostile_info_cfg_refused_naming_file_and_rule(tmp_path, text, words):
    path = tmp_path / "Info.cfg"
    path.write_text(text)
    with pytest.raises(DataError, match=words) as exc:
        read_info_cfg(path)
    assert str(path) in str(exc.value)


def test_info_cfg_with_byte_order_mark_and_without_height(tmp_path):
    path = tmp_path / "Info.cfg"
    path.write_bytes("\ufeffED: 1\nES: 12\n".encode())  # saved by a Windows editor
    info = read_info_cfg(path)
    assert (info.ed_frame, info.es_frame, info.height_cm) == (1, 12, None)
    roles = label_roles({0: "background", 1: "RV", 2: "MYO", 3: "LV"})
    out = indices_from_volumes({"LV": 100.0, "RV": 90.0, "MYO": 50.0},
                               {"LV": 40.0, "RV": 45.0, "MYO": 50.0}, roles, info)
    assert out["LV_EDVi_ml_m2"] is None
    assert "Info.cfg gives no Height and Weight" in out["undefined"]["LV_EDVi_ml_m2"]


def test_identical_phases_warn_and_duplicate_frame_numbers_refused():
    roles = label_roles({0: "background", 1: "RV", 2: "MYO", 3: "LV"})
    same = {"LV": 100.0, "RV": 90.0, "MYO": 50.0}
    out = indices_from_volumes(same, dict(same), roles)
    assert out["LV_EF_pct"] == 0.0
    assert any("identical volumes" in w for w in out["warnings"])
    lv = {"patient001_frame01": 100.0, "patient001_frame1": 90.0, "patient001_frame12": 40.0}
    with pytest.raises(DataError, match="both frame 1"):
        pair_phases(lv, lv.__getitem__)


def test_read_pairs_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("patient,case_ED,case_ES\nP1,a_ed,a_es\nP2,b_ed,b_es\n")
    pairs = read_pairs_csv(path)
    assert [(p.patient, p.ed, p.es, p.pairing) for p in pairs] == [
        ("P1", "a_ed", "a_es", "pairs CSV"), ("P2", "b_ed", "b_es", "pairs CSV")]


@pytest.mark.parametrize("text, words", [
    ("case_ED,case_ES\na,b\n", "header row"),
    ("case_ED,case_ES,patient\n../etc/passwd,b,P\n", "not a case name"),
    ("case_ED,case_ES,patient\na,a,P\n", "both 'a'"),
    ("case_ED,case_ES,patient\na,b,P\na,c,Q\n", "already paired in row 2"),
    ("case_ED,case_ES,patient\na,b,P\nc,d,P\n", "patient 'P' is already"),
    ("case_ED,case_ES,patient\na,b\n", "2 cells"),
    ("case_ED,case_ES,patient\n" + "a,b,P\n" * 200_000, "larger than"),
])
def test_hostile_pairs_csv_refused(tmp_path, text, words):
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=words) as exc:
        read_pairs_csv(path)
    assert str(path) in str(exc.value)


def test_pairing_rules():
    lv = {"patient001_frame01": 100.0, "patient001_frame12": 40.0, "patient002_frame01": 30.0,
          "patient002_frame05": 90.0, "patient003_frame01": 50.0, "scan_x": 10.0}
    info = {"patient002": PatientInfo(ed_frame=5, es_frame=1)}
    pairs, notes = pair_phases(lv, lv.__getitem__, info_for=info.get)
    assert [(p.patient, p.ed, p.es, p.pairing) for p in pairs] == [
        ("patient001", "patient001_frame01", "patient001_frame12", "larger LV volume"),
        ("patient002", "patient002_frame05", "patient002_frame01", "Info.cfg")]
    assert any("patient003: only one phase" in n for n in notes)
    assert any("scan_x" in n and "pairs CSV" in n for n in notes)


def test_pairing_split_4d_series_by_info_cfg_or_lv_volume_curve():
    """--split-4d frames count from 0 and Info.cfg's from 1; a series is one record, never
    paired by its frames' names (a split patient004.nii.gz gives patient004_frameNN)."""
    curve = [80.0, 120.0, 95.0, 40.0, 60.0]
    cines = {"patient001_4d": [f"patient001_4d_frame{t:02d}" for t in range(5)],
             "patient004": [f"patient004_frame{t:02d}" for t in range(5)],
             "cine": [f"cine_frame{t:02d}" for t in range(5)],
             "short": ["short_frame00"], "part": ["part_frame00", "part_frame01"]}
    lv = {c: v for frames in cines.values() for c, v in zip(frames, curve, strict=False)}
    del lv["part_frame01"]  # that frame failed
    lv.update({"patient002_frame01": 100.0, "patient002_frame12": 40.0})
    info = {"patient001": PatientInfo(ed_frame=1, es_frame=4),
            "patient004": PatientInfo(ed_frame=2, es_frame=9)}
    pairs, notes = pair_phases(lv, lv.__getitem__, info_for=info.get, cines=cines)
    assert [(p.patient, p.ed, p.es, p.pairing) for p in pairs] == [
        ("cine", "cine_frame01", "cine_frame03", "LV volume curve"),
        ("patient001_4d", "patient001_4d_frame00", "patient001_4d_frame03", "Info.cfg"),
        ("patient002", "patient002_frame01", "patient002_frame12", "larger LV volume")]
    assert pairs[1].info is info["patient001"]
    assert any(n.startswith("patient004: Info.cfg names ED frame 2 and ES frame 9, the 4D "
                            "series has frames 1 .. 5") for n in notes)
    assert any(n.startswith("short: a 4D series of one frame") for n in notes)
    assert any(n.startswith("part: not every frame of the 4D series") for n in notes)
    assert not any("patientXXX_frameNN" in n for n in notes)  # no frame left to pair by name


def test_lv_volume_curve_leaves_out_blank_frames_and_half_info_cfg_is_said():
    """A blank frame (or one without any LV) is no point of the curve: it would be taken for
    ES. An Info.cfg with ED but no ES, or whose NbFrame is not the series', is said in the
    record's warnings; the phases' input warnings go into the record."""
    from uumamba.clinical import patient_record

    frames = [f"cine_frame{t:02d}" for t in range(4)]
    lv = dict(zip(frames, [120.0, 90.0, 10.0, 50.0], strict=True))  # frame02: a blank image
    blank = ["the image is blank or constant (intensities 0 to 0): there is no anatomy"]
    (pair,), _ = pair_phases(lv, lv.__getitem__, cines={"cine": frames},
                             no_anatomy=["cine_frame02"])
    assert (pair.ed, pair.es) == ("cine_frame00", "cine_frame03")
    assert pair.warnings == ("1 frame(s) blank or without any LV left out of the LV volume "
                             "curve (cine_frame02)",)
    lv["cine_frame03"] = 0.0  # no LV segmented: left out as well; one frame left is no curve
    pairs, notes = pair_phases(lv, lv.__getitem__, cines={"cine": frames},
                               no_anatomy=["cine_frame02", "cine_frame01"])
    assert pairs == [] and notes[0].startswith("cine: 1 of the 4D series' 4 frames")
    lv["cine_frame03"] = 50.0
    half = {"cine": PatientInfo(ed_frame=2, n_frames=30)}
    (pair,), _ = pair_phases(lv, lv.__getitem__, info_for=half.get, cines={"cine": frames})
    assert pair.pairing == "LV volume curve" and (pair.ed, pair.es) == ("cine_frame00",
                                                                        "cine_frame02")
    assert pair.warnings[:2] == (
        "Info.cfg says NbFrame 30, the 4D series has 4 frames: is it this series' Info.cfg?",
        "Info.cfg gives ED but no ES: both taken from the LV volume curve instead")
    roles = label_roles({0: "background", 3: "LV"})
    record = patient_record(pair, {"LV": 120.0}, {"LV": 10.0}, roles,
                            {"cine_frame02": blank})
    assert record["warnings"][2] == f"ES cine_frame02: {blank[0]}"
    assert record["LV_EF_pct"] == pytest.approx(100 * 110 / 120)  # computed, and flagged


def test_clinical_csv_text_cannot_run_as_a_formula(tmp_path):
    import csv

    record = {"patient": '=HYPERLINK("http://x")_4d', "ed_case": "-a", "es_case": "b",
              "LV_EF_pct": -12.5, "warnings": ["@SUM(A1)"]}
    _json, path = write_clinical([record], tmp_path)
    (row,) = list(csv.DictReader(path.open()))
    assert row["patient"] == '\'=HYPERLINK("http://x")_4d' and row["ed_case"] == "'-a"
    assert row["es_case"] == "b" and row["LV_EF_pct"] == "-12.5" and row["notes"] == "'@SUM(A1)"


def test_info_cfg_and_dicom_sniffing_never_block_on_a_fifo(tmp_path):
    import os

    from uumamba.data.dicom_series import is_part10

    fifo = tmp_path / "Info.cfg"
    os.mkfifo(fifo)  # opening it for a blocking read would wait for a writer forever
    assert is_part10(fifo) is False
    with pytest.raises(DataError, match="Info.cfg .*not a regular file"):
        read_info_cfg(fifo)


def test_agreement_hand_computed():
    s = agreement([1.0, 2.0, 3.0, 4.0, None], [1.0, 2.0, 3.0, 5.0, 7.0])
    assert s["n"] == 4 and s["n_undefined"] == 1
    assert s["bias"] == pytest.approx(-0.25)
    assert s["sd_diff"] == pytest.approx(0.5)
    assert (s["loa_low"], s["loa_high"]) == pytest.approx((-0.25 - 0.98, -0.25 + 0.98))
    assert s["mae"] == pytest.approx(0.25)
    assert s["pearson_r"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 2, 3, 5])[0, 1])
    s = agreement([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    assert s["pearson_r"] is None and "variance" in s["reasons"]["pearson_r"]


def _write(path: Path, mask: np.ndarray, spacing=SPACING) -> Path:
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))
    return path


def test_evaluate_clinical_folders_and_figures(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for k in range(3):
        ed, es = _masks(lv_es_voxels=100 + 50 * k)
        for d, es_pred in ((ref, es), (pred, _masks(lv_es_voxels=150 + 50 * k)[1])):
            suffix = "_gt" if d is ref else ""
            _write(d / f"patient00{k}_frame01{suffix}.nii.gz", ed)
            _write(d / f"patient00{k}_frame09{suffix}.nii.gz", es_pred)
    from uumamba.evaluation.evaluate import case_files

    result = evaluate_clinical(*case_files(pred, ref), LABELS)
    assert result["n_patients"] == 3
    lv_ef = result["agreement"]["LV_EF_pct"]
    # reference ESV 3, 4.5, 6 mL vs predicted 4.5, 6, 7.5 of EDV 12 mL: EF 12.5 points lower
    assert lv_ef["bias"] == pytest.approx(-12.5)
    assert lv_ef["mae"] == pytest.approx(12.5)
    assert lv_ef["sd_diff"] == pytest.approx(0.0, abs=1e-9)
    assert result["agreement"]["LV_EDV_ml"]["bias"] == pytest.approx(0.0)
    paths = write_clinical_evaluation(result, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"clinical_bland_altman.png", "clinical_scatter.png", "clinical_summary.json",
            "clinical_agreement.csv"} <= names
    assert (tmp_path / "out" / "clinical_bland_altman.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "out" / "clinical_summary.json").read_text())
    assert summary["patients"][0]["pairing"] == "larger LV volume"


def test_evaluate_cli_clinical_and_its_errors(tmp_path, capsys):
    from uumamba.commands.evaluate import evaluate_from_cli
    from uumamba.config import Config

    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    ed, es = _masks()
    for d, suffix in ((pred, ""), (ref, "_gt")):
        _write(d / f"patient001_frame01{suffix}.nii.gz", ed)
        _write(d / f"patient001_frame02{suffix}.nii.gz", es)
    cfg = Config()
    cfg.dataset.labels = dict(LABELS)
    summary = evaluate_from_cli(pred, ref, tmp_path / "out", cfg, clinical=True)
    assert summary["clinical"]["agreement"]["LV_EF_pct"]["bias"] == pytest.approx(0.0)
    assert (tmp_path / "out" / "clinical_bland_altman.png").is_file()
    out = capsys.readouterr().out
    assert "LV_EF_pct" in out and "larger LV volume" in out
    cfg.dataset.labels = {0: "background", 1: "aorta"}
    with pytest.raises(UserError, match="no LV cavity"):
        evaluate_from_cli(pred, ref, tmp_path / "out2", cfg, clinical=True)
    cfg.dataset.labels = dict(LABELS)
    with pytest.raises(UserError, match="--pairs is only used with --clinical"):
        evaluate_from_cli(pred, ref, None, cfg, pairs=tmp_path / "p.csv")


def test_report_html_and_png(tmp_path):
    ed, es = _masks()
    image = np.random.default_rng(0).random(ed.shape).astype(np.float32)
    records, _ = records_from_volumes(
        {"patient007_frame01": phase_volumes(ed, SPACING, LABELS),
         "patient007_frame07": phase_volumes(es, SPACING, LABELS)}, LABELS)
    model = {"name": "m<x>", "version": "3fa94c1b27de", "folds": ["fold_0"],
             "weights": [{"file": "fold_0/checkpoint_best.pt", "sha256": "ab" * 32}],
             "package_version": "0.1.0"}
    html_path, png_path = write_report(records[0], (image, ed, SPACING), (image, es, SPACING),
                                       LABELS, tmp_path, model)
    text = html_path.read_text()
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in text and "3fa94c1b27de" in text and "ab" * 32 in text
    assert "m&lt;x&gt;" in text and "<x>" not in text  # escaped
    assert "50.0" in text and "Hudsmith" in text and "Chuang" in text and "Mosteller" in text
    assert "160 (103–217)" in text  # LV EDV, men: 160 ± 1.96 × 29 mL (Hudsmith 2005)
    assert mid_slice(ed, SPACING, 3) == (2, 2)  # LV on slices 0-3 of the 10 mm axis


def test_acdc_expert_labels_indices(acdc_dir):
    """The 20 real patients: without Info.cfg the larger-LV rule must find frame01 as ED
    (shared/data/README.md), and the indices must be physiological."""
    from uumamba.data.io import read_image

    volumes = {}
    for gt in sorted(acdc_dir.glob("patient*/patient*_frame*_gt.nii.gz")):
        mask, geometry = read_image(gt)
        volumes[gt.name.split("_gt")[0]] = phase_volumes(mask, geometry.spacing, LABELS)
    records, notes = records_from_volumes(volumes, LABELS)
    assert len(records) == len({c.split("_")[0] for c in volumes}) >= 2 and not notes
    for r in records:
        assert r["ed_case"].endswith("_frame01"), r["patient"]
        assert r["pairing"] == "larger LV volume"
        assert 5.0 < r["LV_EF_pct"] < 90.0 and 20.0 < r["LV_EDV_ml"] < 500.0
        assert 30.0 < r["MYO_mass_g"] < 400.0
    p001 = next((r for r in records if r["patient"] == "patient001"), None)
    if p001 is not None:  # a DCM patient of ACDC: large LV, low EF
        assert p001["LV_EDV_ml"] == pytest.approx(295.5, abs=0.1)
        assert p001["LV_EF_pct"] == pytest.approx(23.7, abs=0.1)


def test_cli_bad_pairs_csv_is_one_line_exit_1(tmp_path):
    import subprocess
    import sys

    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    ed, es = _masks()
    _write(pred / "a.nii.gz", ed)
    _write(ref / "a.nii.gz", ed)
    (ref / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "RV": 1, "MYO": 2, "LV": 3}}))
    bad = tmp_path / "pairs.csv"
    bad.write_text("case_ED,case_ES,patient\n../x,b,P\n")
    proc = subprocess.run([sys.executable, "-m", "uumamba.cli", "evaluate", "--pred", str(pred),
                           "--gt", str(ref), "--clinical", "--pairs", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: row 2: case_ED '../x' is not a case name (1-200 characters of "
        "A-Z a-z 0-9 . _ -, no paths)"]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_indices_carry_no_float_noise():
    """SV = EDV - ESV of volumes given to 0.01 mL came out e.g. 58.84000000000002 in
    clinical.json and the service's answer (the CSV rounded it)."""
    roles = label_roles({0: "background", 1: "RV", 2: "MYO", 3: "LV"})
    out = indices_from_volumes({"RV": 100.12, "MYO": 90.3, "LV": 120.07},
                               {"RV": 41.28, "MYO": 91.0, "LV": 50.01}, roles)
    assert out["RV_SV_ml"] == 58.84 and out["LV_SV_ml"] == 70.06
    assert out["LV_EF_pct"] == round(100 * 70.06 / 120.07, 4) == 58.3493
    assert out["MYO_mass_g"] == 94.815  # 90.3 mL x 1.05 g/mL
    assert json.dumps(out["RV_SV_ml"]) == "58.84"


def test_a_broken_info_cfg_stops_predict_before_any_inference(tmp_path):
    """`uumamba predict` reads the Info.cfg of every ACDC case and cine before the model
    runs (a broken one used to be found after every frame had been predicted)."""
    from uumamba.commands.predict import _check_info_cfgs

    folder = tmp_path / "patient001"
    folder.mkdir()
    cine = folder / "patient001_4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2, 3), np.float32), np.eye(4)), str(cine))
    (folder / "Info.cfg").write_text("ED: -1\nES: 3\n")
    labels = {0: "background", 1: "LV"}
    with pytest.raises(DataError, match=r"Info.cfg: ED '-1' is not an integer"):
        _check_info_cfgs([("patient001_4d", [cine])], tmp_path, True, labels)
    _check_info_cfgs([("patient001_4d", [cine])], tmp_path, True, {0: "background", 1: "aorta"})
    # the same lookup as the records': an Info.cfg beside the only patient of a folder is
    # that patient's, whatever the folder's name; in a folder of two patients it is no one's
    with pytest.raises(DataError, match=r"Info.cfg: ED '-1' is not an integer"):
        _check_info_cfgs([("other_4d", [cine])], tmp_path, True, labels)
    shared = tmp_path / "scans"
    shared.mkdir()
    (shared / "Info.cfg").write_text("ED: -1\nES: 3\n")
    pair = [(name, [shared / f"{name}.nii.gz"]) for name in ("other_4d", "third_4d")]
    for _, (path,) in pair:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2, 3), np.float32), np.eye(4)), str(path))
    _check_info_cfgs(pair, tmp_path, True, labels)
