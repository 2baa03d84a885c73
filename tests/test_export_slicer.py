"""3D Slicer export: .seg.nrrd geometry, segments, terminology, colour table, labels, CLI.

References are written in RAS, LPS and oblique orientations (NIfTI via nibabel, NRRD / MHA via
SimpleITK); the written .seg.nrrd is read back with slicerio, pynrrd and SimpleITK and its voxel
centres are compared, in LPS mm, with the reference's as SimpleITK computes them.
"""

from __future__ import annotations

import json
import sys

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from typer.testing import CliRunner

from uumamba.cli import app
from uumamba.errors import UserError
from uumamba.export import (
    assign_colors,
    lookup_terminology,
    resolve_labels,
    write_color_table,
    write_seg_nrrd,
)
from uumamba.export.colors import MIN_DISTANCE
from uumamba.export.labels import labels_from_dataset_json, parse_label_pairs

SHAPE = (7, 6, 5)
SPACING = (1.5, 1.25, 5.0)
ORIGIN_RAS = (12.0, -31.5, 48.25)
ACDC_LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.deg2rad(degrees_z), np.deg2rad(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _write_nifti(path, direction_ras: np.ndarray) -> None:
    affine = np.eye(4)
    affine[:3, :3] = direction_ras * np.asarray(SPACING)
    affine[:3, 3] = ORIGIN_RAS
    image = nib.Nifti1Image(np.zeros(SHAPE, np.float32), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _write_itk(path, direction_lps: np.ndarray) -> None:
    image = sitk.GetImageFromArray(np.zeros(SHAPE[::-1], np.float32))
    image.SetSpacing(SPACING)
    image.SetOrigin((-ORIGIN_RAS[0], -ORIGIN_RAS[1], ORIGIN_RAS[2]))
    image.SetDirection(direction_lps.ravel().tolist())
    sitk.WriteImage(image, str(path))


REFERENCES = {
    "nifti_ras": ("ref.nii.gz", lambda p: _write_nifti(p, np.eye(3))),
    "nifti_lps": ("ref.nii", lambda p: _write_nifti(p, np.diag([-1.0, -1.0, 1.0]))),
    "nifti_oblique": ("ref.nii.gz", lambda p: _write_nifti(p, _rotation(30, 20))),
    "nrrd_lps": ("ref.nrrd", lambda p: _write_itk(p, np.eye(3))),
    "nrrd_ras": ("ref.nrrd", lambda p: _write_itk(p, np.diag([-1.0, -1.0, 1.0]))),
    "mha_oblique": ("ref.mha", lambda p: _write_itk(p, _rotation(-25, 40))),
}

PROBE_VOXELS = [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1), (6, 5, 4)]


def _reference(tmp_path, kind):
    name, writer = REFERENCES[kind]
    path = tmp_path / name
    writer(path)
    return path


def _mask(rng=None) -> np.ndarray:
    rng = rng or np.random.default_rng(0)
    mask = rng.integers(0, 4, size=SHAPE).astype(np.uint8)
    mask[6, 5, 4] = 3  # an asymmetric corner value
    mask[0, 0, 0] = 0
    return mask


def _world_from_nrrd_header(header, index) -> np.ndarray:
    directions = np.asarray(header["space directions"], dtype=float)
    return np.asarray(header["space origin"], dtype=float) + np.asarray(index, float) @ directions


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_voxel_grid_maps_to_reference_points(tmp_path, kind):
    reference = _reference(tmp_path, kind)
    mask = _mask()
    out = write_seg_nrrd(mask, reference, tmp_path / "out.seg.nrrd", ACDC_LABELS)

    ref_itk = sitk.ReadImage(str(reference))
    seg_itk = sitk.ReadImage(str(out))
    voxels, header = nrrd.read(str(out))
    seg = slicerio.read_segmentation(str(out))
    assert header["space"] == "left-posterior-superior"
    for index in PROBE_VOXELS:
        expected = np.array(ref_itk.TransformContinuousIndexToPhysicalPoint(index))
        np.testing.assert_allclose(_world_from_nrrd_header(header, index), expected, atol=1e-4)
        np.testing.assert_allclose(seg_itk.TransformContinuousIndexToPhysicalPoint(index), expected, atol=1e-4)
        np.testing.assert_allclose((seg["ijkToLPS"] @ [*index, 1.0])[:3], expected, atol=1e-4)
    if kind.startswith("nifti"):
        # The same points from nibabel's RAS affine, flipped to LPS by hand.
        affine = nib.load(str(reference)).affine
        for index in PROBE_VOXELS:
            ras = (affine @ [*index, 1.0])[:3]
            lps = np.array([-ras[0], -ras[1], ras[2]])
            np.testing.assert_allclose(seg_itk.TransformContinuousIndexToPhysicalPoint(index), lps, atol=1e-4)
    np.testing.assert_array_equal(voxels, mask)
    np.testing.assert_array_equal(seg["voxels"], mask)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg_itk).transpose(2, 1, 0), mask)


def test_segments_round_trip_with_names_colours_values_and_terminology(tmp_path):
    reference = _reference(tmp_path, "nifti_ras")
    mask = _mask()
    labels = {**ACDC_LABELS, 4: "aorta", 7: "true lumen"}  # 4 and 7 are absent from the mask
    out = write_seg_nrrd(mask, reference, tmp_path / "case.seg.nrrd", labels)
    seg = slicerio.read_segmentation(str(out))
    segments = {s["labelValue"]: s for s in seg["segments"]}

    assert sorted(segments) == [1, 2, 3, 4, 7]
    assert {v: s["name"] for v, s in segments.items()} == {
        1: "RV", 2: "MYO", 3: "LV", 4: "aorta", 7: "true lumen"}
    assert not slicerio.segment_mask(seg, "aorta").any()
    assert slicerio.segment_mask(seg, "LV").sum() == int((mask == 3).sum())
    expected_colors = assign_colors(labels)
    for value, segment in segments.items():
        np.testing.assert_allclose(segment["color"], expected_colors[value], atol=1e-6)
        assert segment["layer"] == 0
        assert segment["extent"] == [0, SHAPE[0] - 1, 0, SHAPE[1] - 1, 0, SHAPE[2] - 1]
    colors = [np.array(s["color"]) for s in segments.values()]
    assert min(np.linalg.norm(a - b) for i, a in enumerate(colors) for b in colors[i + 1:]) > 0.1
    types = {v: s["terminology"]["type"][:2] for v, s in segments.items()}
    assert types == {1: ["SCT", "53085002"], 2: ["SCT", "74281007"], 3: ["SCT", "87878005"],
                     4: ["SCT", "15825003"], 7: ["SCT", "85756007"]}
    assert segments[1]["terminology"]["category"][:2] == ["SCT", "123037004"]
    assert segments[7]["terminology"]["category"][:2] == ["SCT", "85756007"]
    raw = nrrd.read_header(str(out))
    assert raw["Segment0_Tags"].startswith(
        "TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^53085002^Right ventricle~")
    assert len({s["id"] for s in segments.values()}) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.seg.nrrd", "ref.nii.gz"]


def test_mask_values_without_a_name_become_segments(tmp_path):
    reference = _reference(tmp_path, "nrrd_lps")
    mask = _mask()
    mask[2, 2, 2] = 9
    out = write_seg_nrrd(mask, reference, tmp_path / "m.seg.nrrd", {1: "RV"})
    names = {s["labelValue"]: s["name"] for s in slicerio.read_segmentation(str(out))["segments"]}
    assert names == {1: "RV", 2: "label_2", 3: "label_3", 9: "label_9"}


def test_large_label_values_use_uint16(tmp_path):
    reference = _reference(tmp_path, "nifti_ras")
    mask = _mask().astype(np.int32)
    mask[1, 1, 1] = 300
    out = write_seg_nrrd(mask, reference, tmp_path / "big.seg.nrrd", {300: "coronary artery"})
    voxels, header = nrrd.read(str(out))
    assert header["type"] == "uint16"
    np.testing.assert_array_equal(voxels, mask)


def test_shape_mismatch_suffix_and_dtype_errors(tmp_path):
    reference = _reference(tmp_path, "nifti_ras")
    with pytest.raises(UserError, match=r"ref\.nii\.gz.*\(7, 6, 5\)"):
        write_seg_nrrd(np.zeros((7, 6, 4), np.uint8), reference, tmp_path / "x.seg.nrrd", {})
    with pytest.raises(UserError, match=r"\.seg\.nrrd"):
        write_seg_nrrd(_mask(), reference, tmp_path / "x.nrrd", {})
    with pytest.raises(ValueError, match="integer dtype"):
        write_seg_nrrd(_mask().astype(np.float32), reference, tmp_path / "x.seg.nrrd", {})
    with pytest.raises(ValueError, match="negative"):
        write_seg_nrrd(_mask().astype(np.int16) - 1, reference, tmp_path / "x.seg.nrrd", {})
    assert not list(tmp_path.glob("*.seg.nrrd"))


@pytest.mark.parametrize(
    ("name", "code", "modifier"),
    [
        ("RV", "53085002", None),
        ("right_ventricle", "53085002", None),
        ("LV cavity", "87878005", None),
        ("left ventricle", "87878005", None),
        ("MLV", "74281007", None),
        ("Myocardium", "74281007", None),
        ("Coronary arteries", "41801008", None),
        ("Ascending Aorta", "54247002", None),
        ("Left Subclavian", "36765005", "7771000"),
        ("right_renal_artery", "2841007", "24028007"),
        ("Zone 3", "113262008", None),
        ("Zone 10 R", "73634005", "24028007"),
        ("zone_11_l", "113269004", "7771000"),
        ("true lumen", "85756007", None),
    ],
)
def test_terminology_lookup(name, code, modifier):
    term = lookup_terminology(name)
    assert term.type[1] == code
    assert (term.type_modifier[1] if term.type_modifier else None) == modifier
    assert term.is_generic == (code == "85756007")


def test_colours_distinct_for_many_labels_mapping_to_one_structure():
    labels = {i + 1: f"Zone {i}" for i in range(12)} | {20 + i: f"label_{i}" for i in range(20)}
    colors = assign_colors(labels)
    assert sorted(colors) == sorted(labels)
    values = list(colors.values())
    for i, a in enumerate(values):
        assert all(0.0 <= c <= 1.0 for c in a)
        for b in values[i + 1:]:
            assert np.linalg.norm(np.subtract(a, b)) >= MIN_DISTANCE - 1e-9
    assert assign_colors(labels) == colors


def test_color_table_lines(tmp_path):
    labels = {0: "background", 1: "RV", 2: "left ventricle myocardium", 3: "LV"}
    out = write_color_table(labels, tmp_path / "acdc.ctbl")
    rows = [line.split() for line in out.read_text().splitlines() if not line.startswith("#")]
    assert [r[:2] for r in rows] == [["0", "background"], ["1", "RV"],
                                     ["2", "left_ventricle_myocardium"], ["3", "LV"]]
    assert rows[0][2:] == ["0", "0", "0", "0"]
    colors = assign_colors(labels)
    for row in rows[1:]:
        rgb = [int(x) for x in row[2:5]]
        assert rgb == [round(255 * c) for c in colors[int(row[0])]]
        assert row[5] == "255"


def test_label_specs(tmp_path):
    assert parse_label_pairs("1=RV, 2=MYO,3=LV") == {1: "RV", 2: "MYO", 3: "LV"}
    with pytest.raises(UserError, match="twice"):
        parse_label_pairs("1=RV,1=LV")
    with pytest.raises(UserError, match="VALUE=NAME"):
        parse_label_pairs("RV=1")
    msd = tmp_path / "msd.json"
    msd.write_text(json.dumps({"labels": {"0": "background", "1": "RV", "2": "MLV", "3": "LVC"}}))
    assert labels_from_dataset_json(msd) == {0: "background", 1: "RV", 2: "MLV", 3: "LVC"}
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps({"labels": {"background": 0, "aorta": 1}}))
    assert labels_from_dataset_json(v2) == {0: "background", 1: "aorta"}
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
    with pytest.raises(UserError, match="region"):
        labels_from_dataset_json(regions)
    model = tmp_path / "model"
    model.mkdir()
    (model / "dataset.json").write_text(msd.read_text())
    assert resolve_labels(str(model), [0, 1]) == {0: "background", 1: "RV", 2: "MLV", 3: "LVC"}
    assert resolve_labels(None, [0, 3, 1, 3]) == {1: "label_1", 3: "label_3"}
    with pytest.raises(UserError, match="nowhere"):
        resolve_labels(str(tmp_path / "nowhere"), [0])


def _write_itk_mask(path, mask: np.ndarray, like) -> None:
    image = sitk.GetImageFromArray(mask.transpose(2, 1, 0).copy())
    image.CopyInformation(sitk.ReadImage(str(like)))
    sitk.WriteImage(image, str(path))


def test_cli_export_slicer_with_mha_mask(tmp_path):
    reference = _reference(tmp_path, "mha_oblique")
    mask = _mask()
    mask_path = tmp_path / "pred.mha"
    _write_itk_mask(mask_path, mask, reference)
    out = tmp_path / "sub" / "pred.seg.nrrd"
    result = CliRunner().invoke(app, [
        "export-slicer", "--mask", str(mask_path), "--reference", str(reference),
        "--output", str(out), "--labels", "1=RV,2=MYO,3=LV"])
    assert result.exit_code == 0, result.output
    assert "3 segments (RV, MYO, LV)" in result.output
    seg = slicerio.read_segmentation(str(out))
    np.testing.assert_array_equal(seg["voxels"], mask)
    assert [s["name"] for s in seg["segments"]] == ["RV", "MYO", "LV"]


def test_cli_refuses_a_mask_off_the_reference_grid(tmp_path):
    from uumamba.commands.export import export_from_cli

    reference = _reference(tmp_path, "nifti_oblique")
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(_mask(), np.eye(4)), str(mask_path))
    with pytest.raises(UserError, match="mask.nii.gz does not lie on the grid"):
        export_from_cli(mask_path, reference, tmp_path / "w.seg.nrrd", None)
    assert not (tmp_path / "w.seg.nrrd").exists()


def test_cli_warns_when_mask_geometry_differs_slightly(tmp_path, capsys):
    from uumamba.commands.export import export_from_cli

    reference = _reference(tmp_path, "nifti_oblique")
    affine = nib.load(str(reference)).affine.copy()
    affine[:3, 3] += 0.01  # 0.017 mm: header rounding, well under half a voxel
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(_mask(), affine), str(mask_path))
    export_from_cli(mask_path, reference, tmp_path / "w.seg.nrrd", None)
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "mask.nii.gz" in captured.err
    names = [s["name"] for s in slicerio.read_segmentation(str(tmp_path / "w.seg.nrrd"))["segments"]]
    assert names == ["label_1", "label_2", "label_3"]


@pytest.mark.parametrize("problem", ["shape", "missing", "negative"])
def test_cli_one_line_error(tmp_path, monkeypatch, capsys, problem):
    from uumamba import cli

    reference = _reference(tmp_path, "nifti_ras")
    mask_path = tmp_path / "mask.nii.gz"
    if problem == "shape":
        nib.save(nib.Nifti1Image(np.zeros((7, 6, 4), np.uint8), np.eye(4)), str(mask_path))
    elif problem == "negative":
        nib.save(nib.Nifti1Image(-_mask().astype(np.int16), np.eye(4)), str(mask_path))
    monkeypatch.setattr(sys, "argv", [
        "uumamba", "export-slicer", "--mask", str(mask_path), "--reference", str(reference),
        "--output", str(tmp_path / "o.seg.nrrd")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "mask.nii.gz" in err[0]
    if problem == "shape":
        assert "(7, 6, 4)" in err[0] and "(7, 6, 5)" in err[0]
    if problem == "negative":
        assert "min -3" in err[0]
    assert not (tmp_path / "o.seg.nrrd").exists()


def test_acdc_ground_truth_exports_with_its_image_geometry(acdc_dir, tmp_path):
    patient = sorted(acdc_dir.glob("patient*"))[0]
    gt = sorted(patient.glob("*_frame01_gt.nii.gz"))[0]
    image = gt.with_name(gt.name.replace("_gt", ""))
    out = tmp_path / "acdc.seg.nrrd"
    from uumamba.commands.export import export_from_cli

    export_from_cli(gt, image, out, "1=RV,2=MYO,3=LV")
    label = np.asanyarray(nib.load(str(gt)).dataobj)
    seg = slicerio.read_segmentation(str(out))
    np.testing.assert_array_equal(seg["voxels"], label)
    ras = nib.load(str(image)).affine
    np.testing.assert_allclose(seg["ijkToLPS"], np.diag([-1, -1, 1, 1]) @ ras, atol=1e-5)
    voxel_ml = abs(np.linalg.det(seg["ijkToLPS"][:3, :3])) / 1000.0
    for segment in seg["segments"]:
        volume_ml = slicerio.segment_mask(seg, segment["id"]).sum() * voxel_ml
        expected_ml = (label == segment["labelValue"]).sum() * np.prod(nib.load(str(gt)).header.get_zooms()[:3]) / 1000.0
        assert volume_ml == pytest.approx(expected_ml, rel=1e-6)
        assert volume_ml > 1.0  # every ACDC structure is at least a millilitre
