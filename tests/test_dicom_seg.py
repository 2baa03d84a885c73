"""DICOM SEG output: frames on the source slices, read back voxel for voxel (highdicom and
plain pydicom), segment metadata, ``predict --format dcm`` and ``export-dicom``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import rotation, write_series

from uumamba.commands.export import export_dicom_from_cli
from uumamba.commands.predict import predict_from_cli
from uumamba.data.dicom_series import discover_series, series_geometry
from uumamba.data.io import read_image, write_mask
from uumamba.data.synthetic import make_synthetic_case
from uumamba.dicom.seg import Algorithm, read_seg_mask, write_seg
from uumamba.errors import UserError

MODEL = Path(__file__).parent / "fixtures" / "model_v0_1"
LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
GRIDS = {"axial": np.eye(3), "oblique": rotation(0.6, 1.2), "flipped": np.diag([-1.0, -1.0, 1.0])}


def _case(folder: Path, direction, seed=0, shape=(64, 60, 8)):
    image, label = make_synthetic_case(seed, shape=shape, spacing=(1.5, 1.5, 8.0))
    files = write_series((image * 100).astype(np.int16), folder, direction=direction,
                         spacing=(1.5, 1.5, 8.0), origin=(-50.0, 20.0, -33.3))
    plan = series_geometry(discover_series(folder)[0])
    assert [s.path for s in plan.slices] == files
    return label, plan


def _pydicom_mask(ds, source_uids: list[str], shape) -> np.ndarray:
    """Rebuild the label map from the SEG with pydicom alone (PS3.3 §C.8.20: one bit plane
    per frame, each frame naming its segment and its source instance)."""
    numbers = {int(item.SegmentNumber): item.SegmentLabel for item in ds.SegmentSequence}
    value_of = {n: [v for v, name in LABELS.items() if name == label][0] for n, label in numbers.items()}
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    out = np.zeros(shape, dtype=np.uint8)
    for frame, group in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = source_uids.index(uid)
        out[:, :, k][frame.T == 1] = value_of[segment]
    return out


@pytest.mark.parametrize("kind", sorted(GRIDS))
def test_seg_frames_sit_on_source_slices(tmp_path, kind):
    label, plan = _case(tmp_path / "s", GRIDS[kind])
    algorithm = Algorithm("acdc", "0123456789ab", {"fold_0": "f" * 64})
    out = write_seg(label, [s.path for s in plan.slices], tmp_path / "seg.dcm", LABELS, algorithm)
    ds = pydicom.dcmread(out)
    src = {s.sop_instance_uid: pydicom.dcmread(s.path, stop_before_pixels=True) for s in plan.slices}
    first = next(iter(src.values()))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert (ds.StudyInstanceUID, ds.PatientID, ds.PatientName) == (
        first.StudyInstanceUID, first.PatientID, first.PatientName)
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in iop],
                               [float(v) for v in first.ImageOrientationPatient], atol=1e-6)
    for group in ds.PerFrameFunctionalGroupsSequence:
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, [float(v) for v in src[uid].ImagePositionPatient], atol=1e-3)
    # empty frames omitted: one frame per (segment, slice) where the segment is present
    expected_frames = sum(int(np.any(label[:, :, k] == v)) for v in (1, 2, 3)
                          for k in range(label.shape[2]))
    assert int(ds.NumberOfFrames) == expected_frames < 3 * label.shape[2]
    uids = [s.sop_instance_uid for s in plan.slices]
    np.testing.assert_array_equal(read_seg_mask(out, uids), label)  # highdicom
    np.testing.assert_array_equal(_pydicom_mask(ds, uids, label.shape), label)  # pydicom only
    seg = ds.SegmentSequence
    assert [s.SegmentLabel for s in seg] == ["RV", "MYO", "LV"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg] == [
        "53085002", "74281007", "87878005"]
    assert all(s.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT" for s in seg)
    assert len({tuple(s.RecommendedDisplayCIELabValue) for s in seg}) == 3
    alg = seg[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (alg.AlgorithmName, alg.AlgorithmVersion) == ("uumamba", "0.1.0 model 0123456789ab")
    assert "f" * 64 in alg.AlgorithmParameters
    assert seg[0].SegmentAlgorithmType == "AUTOMATIC"


def test_seg_refuses_wrong_shape_and_unknown_values(tmp_path):
    label, plan = _case(tmp_path / "s", np.eye(3))
    files = [s.path for s in plan.slices]
    with pytest.raises(UserError, match="does not match the source series"):
        write_seg(label[:, :, :-1], files, tmp_path / "x.dcm", LABELS)
    bad = label.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(UserError, match=r"mask values \[7\] have no label name"):
        write_seg(bad, files, tmp_path / "x.dcm", LABELS)
    assert not (tmp_path / "x.dcm").exists()


def test_predict_dicom_folder_to_seg_and_nifti(tmp_path):
    _case(tmp_path / "in" / "study" / "series1", rotation(0.3, 0.8))
    predict_from_cli(MODEL, tmp_path / "in", tmp_path / "nii", device="cpu")
    mask, geometry = read_image(tmp_path / "nii" / "PAT1_3.nii.gz")
    plan = series_geometry(discover_series(tmp_path / "in")[0])
    assert geometry.mismatch(plan.geometry, atol=1e-4) == []
    written = predict_from_cli(MODEL, tmp_path / "in", tmp_path / "dcm", out_format="dcm",
                               device="cpu")
    assert sorted(p.name for p in written) == ["PAT1_3.dcm", "PAT1_3_volumes.json"]
    uids = [s.sop_instance_uid for s in plan.slices]
    np.testing.assert_array_equal(read_seg_mask(tmp_path / "dcm" / "PAT1_3.dcm", uids), mask)
    ds = pydicom.dcmread(tmp_path / "dcm" / "PAT1_3.dcm")
    alg = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmVersion.startswith("0.1.0 model ") and len(alg.AlgorithmVersion) == 24
    info = json.loads((tmp_path / "dcm" / "PAT1_3_volumes.json").read_text())
    assert info["input"].endswith(f"series {ds.ReferencedSeriesSequence[0].SeriesInstanceUID}")
    with pytest.raises(UserError, match="--format dcm needs DICOM input"):
        predict_from_cli(MODEL, tmp_path / "nii" / "PAT1_3.nii.gz", tmp_path / "x",
                         out_format="dcm", device="cpu")


def test_export_dicom_command(tmp_path, capsys):
    label, plan = _case(tmp_path / "s", GRIDS["flipped"])
    from uumamba.dicom.cases import write_volume

    ref = tmp_path / "ref.nii"
    write_volume(plan, discover_series(tmp_path / "s")[0], ref, tmp_path / "s")
    mask_path = write_mask(label, ref, tmp_path / "mask.nii.gz")
    out = export_dicom_from_cli(mask_path, tmp_path / "s", tmp_path / "out.dcm", labels=str(MODEL))
    assert "DICOM SEG with 3 segments (RV, MYO, LV)" in capsys.readouterr().out
    np.testing.assert_array_equal(read_seg_mask(out, [s.sop_instance_uid for s in plan.slices]), label)
    alg = pydicom.dcmread(out).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmVersion.startswith("0.1.0 model ")
    shifted = write_mask(label[:, :, :-1], _cut(ref, tmp_path), tmp_path / "short.nii.gz")
    with pytest.raises(UserError, match="has shape"):
        export_dicom_from_cli(shifted, tmp_path / "s", tmp_path / "bad.dcm", labels="1=RV,2=MYO,3=LV")


def _cut(ref: Path, tmp_path: Path) -> Path:
    import nibabel as nib

    img = nib.load(str(ref))
    out = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine, img.header), str(out))
    return out


def test_predict_zip_with_a_refused_and_a_4d_series(tmp_path):
    import zipfile

    image, _ = make_synthetic_case(2, shape=(64, 60, 5), spacing=(1.5, 1.5, 8.0))
    vol = (image * 100).astype(np.int16)
    files = write_series(vol, tmp_path / "s" / "a") + write_series(
        vol, tmp_path / "s" / "cine", series_number=5, trigger_times=[0.0, 35.0])
    bad = write_series(vol, tmp_path / "s" / "gap", series_number=6)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in [*(tmp_path / "s" / "cine").iterdir(), *files[:5], *bad[:2], *bad[3:]]:
            zf.write(f, f"x/{f.parent.name}/{f.name}")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"1 of 4 input\(s\) failed \(3 others were written") as err:
        predict_from_cli(MODEL, archive, out, split_4d=True, device="cpu")
    assert f"series PAT1_6 ({archive}): missing slices" in str(err.value)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "PAT1_3.nii.gz", "PAT1_5_frame00.nii.gz", "PAT1_5_frame01.nii.gz"]
