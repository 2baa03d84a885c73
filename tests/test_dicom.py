"""DICOM input: discovery, geometry (checked against ITK's GDCM series reader), refusals,
hostile zip archives, and pydicom's bundled test files."""

from __future__ import annotations

import zipfile

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_helpers import CT, MR, rotation, write_series
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from uumamba.data.dicom_series import (
    DicomLimits,
    discover_series,
    find_dicom_files,
    read_series_volume,
    series_geometry,
)
from uumamba.data.io import read_image
from uumamba.data.untrusted import HeaderLimits, VolumeTooLarge
from uumamba.dicom.archive import ZipLimits, extract_zip
from uumamba.dicom.cases import materialize_cases, read_sidecar
from uumamba.errors import DataError, UserError

FLIP = np.diag([-1.0, -1.0, 1.0])  # RAS-like in-plane axes; normal still +z
GRIDS = {
    "axial": np.eye(3),
    "oblique": rotation(0.5, 1.1),           # double-oblique short axis
    "flipped": FLIP,
}


def _volume(shape=(24, 20, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 1500, shape).astype(np.int16)


@pytest.mark.parametrize("kind", sorted(GRIDS))
def test_geometry_matches_gdcm_series_reader(tmp_path, kind):
    vol = _volume()
    write_series(vol, tmp_path / "s", direction=GRIDS[kind], spacing=(1.25, 1.4, 6.5),
                 origin=(-31.5, 17.25, -80.0))
    (series,) = discover_series(tmp_path)
    assert series.case == "PAT1_3"
    plan = series_geometry(series)
    array = read_series_volume(plan)
    assert array.dtype == np.int16
    np.testing.assert_array_equal(array, vol)  # sorted by position, not by file name
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    img = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), vol)
    g = plan.geometry
    assert g.shape == img.GetSize() == (24, 20, 7)
    np.testing.assert_allclose(g.spacing, img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(g.spacing, (1.25, 1.4, 6.5), atol=1e-5)
    np.testing.assert_allclose(g.origin, img.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g.direction).ravel(), img.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g.direction), GRIDS[kind], atol=1e-7)


def test_reversed_stack_is_sorted_along_the_normal(tmp_path):
    # slices stored from top to bottom (positions decreasing along the normal): the volume
    # is read bottom-up, origin = the lowest slice, direction z = +normal (as ITK does)
    vol = _volume()
    down = np.eye(3) @ np.diag([1.0, 1.0, -1.0])
    write_series(vol, tmp_path / "s", direction=down, origin=(0.0, 0.0, 100.0), spacing=(1.5, 1.5, 5.0))
    plan = series_geometry(discover_series(tmp_path)[0])
    np.testing.assert_array_equal(read_series_volume(plan), vol[:, :, ::-1])
    np.testing.assert_allclose(plan.geometry.origin, (0.0, 0.0, 70.0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(plan.geometry.direction)[:, 2], (0, 0, 1))


def test_rescale_and_case_names(tmp_path):
    vol = (np.random.default_rng(3).integers(0, 400, (20, 20, 3)) * 0.5 - 20).astype(np.float32)
    write_series(vol, tmp_path / "a", rescale=(0.5, -20.0), sop_class=CT)
    write_series(_volume((20, 20, 3)), tmp_path / "b", patient_id="P 2/x", series_number=7)
    write_series(_volume((20, 20, 3)), tmp_path / "c", patient_id="", series_number=7,
                 series_uid="1.2.3.4")
    series = discover_series(tmp_path)
    assert [s.case for s in series] == ["1.2.3.4", "PAT1_3", "P_2_x_7"]
    array = read_series_volume(series_geometry(series[1]))
    assert array.dtype == np.float32
    np.testing.assert_allclose(array, vol)


def _refusal(tmp_path, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        series_geometry(discover_series(tmp_path)[0], **kwargs)
    return str(err.value)


def test_refuses_mixed_orientation(tmp_path):
    files = write_series(_volume(), tmp_path / "s")
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    ds.save_as(files[3])
    assert "mixed orientations" in _refusal(tmp_path)


def test_refuses_missing_uneven_and_duplicated_slices(tmp_path):
    files = write_series(_volume(), tmp_path / "gap")
    files[3].unlink()
    message = _refusal(tmp_path)
    assert "missing slices" in message and "16 mm" in message and "PAT1_3" in message
    files = write_series(_volume(), tmp_path / "uneven", series_number=4)
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(files[2])
    with pytest.raises(DataError, match="uneven slice spacing"):
        series_geometry([s for s in discover_series(tmp_path) if s.case == "PAT1_4"][0])
    files = write_series(_volume(), tmp_path / "dup", series_number=5)
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[2])
    with pytest.raises(DataError, match="duplicated slice positions"):
        series_geometry([s for s in discover_series(tmp_path) if s.case == "PAT1_5"][0])


def test_refuses_tilted_stack(tmp_path):
    files = write_series(_volume(), tmp_path / "s")
    for k, f in enumerate(files):  # each slice shifted 0.5 mm more along y: gantry tilt
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.5 * k
        ds.save_as(f)
    assert "gantry tilt" in _refusal(tmp_path)


def test_4d_needs_a_frame_and_splits(tmp_path):
    vol = _volume((20, 18, 4))
    write_series(vol, tmp_path / "cine", trigger_times=[0.0, 40.0, 80.0])
    message = _refusal(tmp_path)
    assert "3 temporal positions" in message and "--frame" in message and "--split-4d" in message
    plan = series_geometry(discover_series(tmp_path)[0], frame=2)
    assert plan.n_frames == 3 and plan.geometry.shape == (20, 18, 4)
    np.testing.assert_array_equal(read_series_volume(plan), vol)
    assert "out of range" in _refusal(tmp_path, frame=3)
    work = tmp_path / "work"
    work.mkdir()
    result = materialize_cases(tmp_path / "cine", work, split_4d=True)
    assert [c for c, _ in result.cases] == ["PAT1_3_frame00", "PAT1_3_frame01", "PAT1_3_frame02"]
    assert result.refused == []
    with pytest.raises(UserError, match="exclude each other"):
        materialize_cases(tmp_path / "cine", work, frame=0, split_4d=True)


def test_refuses_multiframe_nonimage_and_undecodable(tmp_path):
    files = write_series(_volume((20, 18, 3)), tmp_path / "mf")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.NumberOfFrames = 1 if f != files[1] else 3
        ds.save_as(f)
    assert "multi-frame object" in _refusal(tmp_path)
    files = write_series(_volume((20, 18, 3)), tmp_path / "jls", series_number=9)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K: no decoder here
        ds.PixelData = encapsulate([b"\xff\xd8not-really-htj2k\xff\xd9"])
        ds["PixelData"].is_undefined_length = True
        ds.save_as(f, enforce_file_format=True)
    jls = [s for s in discover_series(tmp_path) if s.case == "PAT1_9"][0]
    with pytest.raises(DataError, match=r"transfer syntax 1\.2\.840\.10008\.1\.2\.4\.201 cannot be decoded"):
        series_geometry(jls)


def test_non_image_objects_are_skipped_or_refused(tmp_path, caplog):
    files = write_series(_volume((20, 18, 3)), tmp_path / "seg", series_number=8)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(f)
    with pytest.raises(DataError, match=r"only non-image objects \(Segmentation Storage\)"):
        discover_series(tmp_path)
    write_series(_volume((20, 18, 3)), tmp_path / "img")
    assert [s.case for s in discover_series(tmp_path)] == ["PAT1_3"]
    assert "skipping 3 non-image object(s) (Segmentation Storage)" in caplog.text


def test_size_and_file_caps_before_decoding(tmp_path):
    write_series(_volume((20, 18, 5)), tmp_path / "s")
    small = DicomLimits(volume=HeaderLimits(max_voxels=20 * 18 * 4))
    with pytest.raises(VolumeTooLarge, match="1800 voxels is above the limit of 1440"):
        series_geometry(discover_series(tmp_path)[0], limits=small)
    with pytest.raises(DataError, match="more than 4 files"):
        find_dicom_files(tmp_path, DicomLimits(max_files=4))
    (tmp_path / "notes.txt").write_text("not dicom")
    assert len(find_dicom_files(tmp_path)) == 5


def test_pydicom_bundled_files(tmp_path):
    # files nobody here wrote: CT with rescale intercept -1024, MR without rescale
    for name, expected_class in (("CT_small.dcm", CT), ("MR_small.dcm", MR)):
        folder = tmp_path / name
        folder.mkdir()
        src = get_testdata_file(name)
        (folder / "x.dcm").write_bytes(open(src, "rb").read())
        ds = pydicom.dcmread(src)
        (series,) = discover_series(folder)
        assert series.slices[0].sop_class_uid == expected_class
        assert series.case == f"{ds.PatientID}_{ds.SeriesNumber}"
        plan = series_geometry(series)
        array = read_series_volume(plan)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        np.testing.assert_array_equal(array[:, :, 0], (ds.pixel_array * slope + intercept).T)
        assert plan.geometry.shape == (ds.Columns, ds.Rows, 1)
        np.testing.assert_allclose(plan.geometry.origin, [float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(plan.geometry.spacing[:2],
                                   [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    assert read_series_volume(series_geometry(discover_series(tmp_path / "CT_small.dcm")[0])).min() < 0


def test_zip_members_get_safe_names_and_caps(tmp_path):
    files = write_series(_volume((20, 18, 3)), tmp_path / "s")
    archive = tmp_path / "in.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, f in enumerate(files):
            zf.write(f, ["../../escape.dcm", "/abs/x.dcm", "dir/../../y.dcm"][k])
        zf.writestr("folder/", "")
    dest = tmp_path / "out"
    dest.mkdir()
    written = extract_zip(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["000000.dcm", "000001.dcm", "000002.dcm"]
    assert [p.parent for p in written] == [dest] * 3
    assert not (tmp_path / "escape.dcm").exists() and not (tmp_path.parent / "escape.dcm").exists()
    with pytest.raises(DataError, match="4 entries, above the limit of 2"):
        extract_zip(archive, dest, ZipLimits(max_entries=2))
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * (8 << 20))
    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(DataError, match="zip bomb"):
        extract_zip(bomb, empty)
    with pytest.raises(VolumeTooLarge, match="above the limit of 1000"):
        extract_zip(bomb, empty, ZipLimits(max_total_bytes=1000, max_ratio=1e9))
    assert list(empty.iterdir()) == []


def test_materialize_zip_of_two_series_with_one_refused(tmp_path):
    vol = _volume((20, 18, 4))
    a = write_series(vol, tmp_path / "a", direction=rotation(0.3, 0.9))
    b = write_series(_volume((20, 18, 6)), tmp_path / "b", series_number=4)
    b[1].unlink()  # 6 -> 5 slices with a gap: refused
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in [*a, *b[:1], *b[2:]]:
            zf.write(f, f"{f.parent.name}/{f.name}")
    work = tmp_path / "work"
    work.mkdir()
    result = materialize_cases(archive, work)
    assert [c for c, _ in result.cases] == ["PAT1_3"]
    assert len(result.refused) == 1 and "PAT1_4" in result.refused[0] and "missing slices" in result.refused[0]
    image, geometry = read_image(result.cases[0][1][0])
    np.testing.assert_array_equal(image, vol)
    assert geometry.mismatch(series_geometry(discover_series(tmp_path / "a")[0]).geometry,
                             atol=1e-4) == []
    sidecar = read_sidecar(result.cases[0][1][0])
    assert sidecar["sop_instance_uids"] == [pydicom.dcmread(f).SOPInstanceUID for f in a]


def test_service_upload_of_one_series(tmp_path):
    from uumamba.dicom.cases import materialize_upload

    vol = _volume((20, 18, 4))
    files = write_series(vol, tmp_path / "a")
    one = tmp_path / "one.zip"
    with zipfile.ZipFile(one, "w") as zf:
        for f in files:
            zf.write(f, f"../{f.name}")
    work = tmp_path / "w1"
    work.mkdir()
    image, _ = read_image(materialize_upload(one, work))
    np.testing.assert_array_equal(image, vol)
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        for f in files + write_series(vol, tmp_path / "b", series_number=9):
            zf.write(f, f"{f.parent.name}/{f.name}")
    work = tmp_path / "w2"
    work.mkdir()
    with pytest.raises(DataError, match="^uploaded archive: holds 2 image series"):
        materialize_upload(two, work)
    gap = tmp_path / "gap.zip"
    with zipfile.ZipFile(gap, "w") as zf:
        for f in files[:1] + files[2:]:
            zf.write(f, f.name)
    work = tmp_path / "w3"
    work.mkdir()
    with pytest.raises(DataError, match=r"^series PAT1_3 \(uploaded archive\): missing slices") as err:
        materialize_upload(gap, work)
    assert str(tmp_path) not in str(err.value)  # no server path in what a client sees


# ----------------------------------------------------------------------------- hostile headers

def _raw(path, keyword: str, text: str) -> None:
    """Store ``text`` as the raw value of ``keyword`` (invalid values pydicom would refuse)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(path)
    tag = tag_for_keyword(keyword)
    if tag in ds:
        del ds[tag]
    value = text.encode() + b" " * (len(text) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
    ds.save_as(path)


@pytest.mark.parametrize("keyword, text, rule", [
    ("RescaleSlope", "abc", "RescaleSlope 'abc' is not a finite number"),
    ("RescaleSlope", "NaN", "RescaleSlope 'NaN' is not a finite number"),
    ("RescaleSlope", "1e400", "RescaleSlope '1e400' is not a finite number"),
    ("NumberOfFrames", "abc", "NumberOfFrames 'abc' is not a whole number"),
    ("TriggerTime", "abc", "TriggerTime 'abc' is not a finite number"),
])
def test_invalid_numbers_refuse_their_series_only(tmp_path, keyword, text, rule):
    write_series(_volume(), tmp_path / "in" / "good", patient_id="GOOD")
    bad = write_series(_volume(), tmp_path / "in" / "bad", patient_id="BAD")
    _raw(bad[2], keyword, text)
    (tmp_path / "w").mkdir()
    result = materialize_cases(tmp_path / "in", tmp_path / "w")
    assert [c for c, _ in result.cases] == ["GOOD_3"]
    (message,) = result.refused
    assert message.startswith("series BAD_3 (") and f"{bad[2].name}: {rule}" in message


def test_float32_overflowing_rescale_is_refused(tmp_path):
    files = write_series(_volume(), tmp_path / "s")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = "1e38", "0.5"
        ds.save_as(f)
    (tmp_path / "w").mkdir()
    result = materialize_cases(tmp_path / "s", tmp_path / "w")
    assert not result.cases
    assert "give values beyond the float32 range" in result.refused[0]
    assert str(tmp_path / "w") not in result.refused[0]


def test_garbage_dataset_after_preamble_is_a_file_refusal(tmp_path):
    write_series(_volume(), tmp_path / "in" / "good")
    (tmp_path / "in" / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)
    (tmp_path / "w").mkdir()
    result = materialize_cases(tmp_path / "in", tmp_path / "w")
    assert [c for c, _ in result.cases] == ["PAT1_3"]
    assert len(result.refused) == 1 and "junk.dcm" in result.refused[0]
    assert "file skipped" in result.refused[0]


def test_long_identifiers_give_short_unique_case_names(tmp_path):
    write_series(_volume(), tmp_path / "in" / "a", patient_id="P" * 300, series_number=3)
    write_series(_volume(), tmp_path / "in" / "b", patient_id="", series_uid="1." + "2" * 250)
    (tmp_path / "w").mkdir()
    result = materialize_cases(tmp_path / "in", tmp_path / "w")
    names = [c for c, _ in result.cases]
    assert len(names) == 2 and not result.refused
    assert all(len(n) <= 100 for n in names) and len(set(names)) == 2
    assert all((tmp_path / "w" / f"{n}.nii").is_file() for n in names)


def test_huge_header_element_is_refused_without_loading_it(tmp_path):
    import resource

    files = write_series(_volume(), tmp_path / "s")
    ds = pydicom.dcmread(files[1])
    ds.SeriesDescription = "A" * (40 << 20)
    ds.save_as(files[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (tmp_path / "w").mkdir()
    result = materialize_cases(tmp_path / "s", tmp_path / "w")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert not result.cases
    assert f"{files[1].name}: header element (0008,103E) holds {40 << 20} bytes" in result.refused[0]
    assert grown_mb < 30


def test_decoder_errors_are_one_line_without_reader_text(tmp_path):
    files = write_series(_volume(), tmp_path / "s")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.5"  # RLE Lossless
        ds.PixelData = encapsulate([b"\0" * 64])
        ds["PixelData"].VR = "OB"
        ds.save_as(f, enforce_file_format=False)
    (s,) = discover_series(tmp_path / "s")
    with pytest.raises(DataError) as err:
        read_series_volume(series_geometry(s), s.label)
    assert str(err.value).endswith("cannot decode pixel data (transfer syntax RLE Lossless)")
    assert "\n" not in str(err.value) and "0x" not in str(err.value)


def test_implausible_positions_are_refused_not_duplicates(tmp_path):
    files = write_series(_volume(), tmp_path / "s")
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = ["0", "0", f"{1e300 * (k + 1)}"]
        ds.save_as(f)
    (tmp_path / "w").mkdir()
    with pytest.raises(DataError, match=r"is not a plausible position \(beyond 1e\+06 mm\)") as err:
        materialize_cases(tmp_path / "s", tmp_path / "w")
    assert "duplicated" not in str(err.value)


def test_many_small_bomb_members_hit_the_total_ratio(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(40):
            zf.writestr(f"{i}.dcm", b"\0" * (1 << 20))
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=r"members compress \d+:1 together, above 200:1"):
        extract_zip(archive, tmp_path / "out")
    # lying central directory: the ratio is counted while inflating too
    buf = tmp_path / "lie.zip"
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(8):
            zf.writestr(f"{i}.dcm", b"\0" * (1 << 20))
    with pytest.raises(DataError, match="zip bomb"):
        extract_zip(buf, tmp_path / "out", ZipLimits(max_ratio=200.0))
    assert not any((tmp_path / "out").iterdir())


def test_zip_messages_name_the_archive_not_the_temporary_folder(tmp_path):
    archive = tmp_path / "notdicom.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", b"hello")
    work = tmp_path / "w"
    work.mkdir()
    with pytest.raises(DataError) as err:
        materialize_cases(archive, work)
    assert str(err.value) == f"{archive}: no DICOM files (Part 10, 'DICM' at byte 128)"
    files = write_series(_volume(), tmp_path / "s")
    _raw(files[0], "RescaleSlope", "abc")
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        for k, f in enumerate(files):
            zf.write(f, f"{k}.dcm")
    work2 = tmp_path / "w2"
    work2.mkdir()
    (message,) = materialize_cases(tmp_path / "bad.zip", work2).refused
    assert str(work2) not in message and f"({tmp_path / 'bad.zip'})" in message
    assert "RescaleSlope 'abc' is not a finite number" in message
