"""Image IO: geometry in LPS for every format, writers that keep the reference's geometry."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from uumamba.data.io import read_geometry, read_image, write_image, write_mask
from uumamba.errors import DataError


def _oblique_affine() -> np.ndarray:
    """RAS affine: rotation about z, anisotropic spacing (0.9, 1.3, 6.0) mm, flipped x."""
    t = 0.4
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.9, 1.3, 6.0])
    affine[:3, 3] = [12.5, -40.0, 7.25]
    return affine


@pytest.fixture()
def reference(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = nib.Nifti1Image(rng.normal(size=(11, 9, 5)).astype(np.float32), None)
    img.header.set_qform(_oblique_affine(), code=1)
    sform = _oblique_affine()
    sform[:3, 3] += [0.5, 0.0, 0.0]  # distinct sform, to see that both are kept
    img.header.set_sform(sform, code=2)
    path = tmp_path / "ref.nii.gz"
    nib.save(img, str(path))
    return path


def test_nifti_geometry_is_lps(reference: Path) -> None:
    array, geom = read_image(reference)
    assert array.shape == (11, 9, 5) and array.dtype == np.float32
    # nibabel's affine is the sform (code 2); LPS negates the first two world axes
    sform = nib.load(str(reference)).header.get_sform()
    np.testing.assert_allclose(nib.load(str(reference)).affine, sform)
    np.testing.assert_allclose(geom.origin, [-sform[0, 3], -sform[1, 3], sform[2, 3]], atol=1e-5)
    np.testing.assert_allclose(geom.spacing, [0.9, 1.3, 6.0], rtol=1e-6)
    np.testing.assert_allclose(geom.affine_ras(), sform, atol=1e-5)
    # the same geometry SimpleITK reports from an NRRD written from it
    itk = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    itk.SetSpacing(geom.spacing)
    itk.SetOrigin(geom.origin)
    itk.SetDirection(np.asarray(geom.direction).ravel().tolist())
    sitk.WriteImage(itk, str(reference.with_name("same.nrrd")))
    array2, geom2 = read_image(reference.with_name("same.nrrd"))
    np.testing.assert_array_equal(array2, array)
    assert geom2.mismatch(geom) == []


@pytest.mark.parametrize("fmt", [None, "nii", "nrrd", "mha"])
def test_write_mask_round_trip(reference: Path, tmp_path: Path, fmt: str | None) -> None:
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 4, size=(11, 9, 5)).astype(np.int64)
    out = write_mask(mask, reference, tmp_path / "pred", format=fmt)
    expected_suffix = {None: ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha"}[fmt]
    assert out.name == "pred" + expected_suffix
    back, geom = read_image(out)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)
    assert geom.mismatch(read_geometry(reference)) == []
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_write_mask_nifti_keeps_qform_and_sform(reference: Path, tmp_path: Path) -> None:
    scaled_ref = tmp_path / "scaled_ref.nii.gz"
    raw = bytearray(gzip.decompress(reference.read_bytes()))
    raw[112:116] = np.float32(2.0).tobytes()  # scl_slope: the reference's values are scaled
    scaled_ref.write_bytes(gzip.compress(bytes(raw)))
    assert nib.load(str(scaled_ref)).dataobj.slope == 2.0
    out = write_mask(np.ones((11, 9, 5), np.uint8) * 3, scaled_ref, tmp_path / "m.nii.gz")
    hdr = nib.load(str(out)).header
    ref_hdr = nib.load(str(scaled_ref)).header
    q, qcode = hdr.get_qform(coded=True)
    s, scode = hdr.get_sform(coded=True)
    np.testing.assert_allclose(q, ref_hdr.get_qform(), atol=1e-6)
    np.testing.assert_allclose(s, ref_hdr.get_sform(), atol=1e-6)
    assert (int(qcode), int(scode)) == (1, 2)
    assert not np.allclose(q, s)  # the two differ in the reference, and still do
    assert hdr.get_data_dtype() == np.uint8
    assert np.asanyarray(nib.load(str(out)).dataobj).max() == 3  # no scaling applied


def test_a_nifti2_reference_gives_a_nifti2_mask_with_its_float64_affine(tmp_path: Path
                                                                         ) -> None:
    """A NIfTI-2 input's mask was written as NIfTI-1: its float64 sform rounded to float32
    (here 1.9e-6 mm off an origin of 123.4567890123 mm) and nibabel's 'sizeof_hdr should be 348'
    on the console."""
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[:3, 3] = (123.4567890123, -87.6543210987, 45.0000001234)
    ref = tmp_path / "ref2.nii.gz"
    nib.save(nib.Nifti2Image(np.zeros((6, 5, 4), np.float32), affine), str(ref))
    out = write_mask(np.ones((6, 5, 4), np.uint8), ref, tmp_path / "m.nii.gz")
    mask = nib.load(str(out))
    assert isinstance(mask, nib.Nifti2Image) and int(mask.header["sizeof_hdr"]) == 540
    assert np.array_equal(mask.affine, nib.load(str(ref)).affine)
    assert np.array_equal(mask.affine, affine)


def test_cross_format_and_float_maps(reference: Path, tmp_path: Path) -> None:
    mask = (np.arange(11 * 9 * 5).reshape(11, 9, 5) % 3).astype(np.uint8)
    nrrd = write_mask(mask, reference, tmp_path / "m.nrrd")
    nii = write_mask(mask, nrrd, tmp_path / "back.nii.gz")  # NRRD reference -> NIfTI output
    back, geom = read_image(nii)
    np.testing.assert_array_equal(back, mask)
    assert geom.mismatch(read_geometry(reference)) == []
    probs = np.stack([mask == k for k in range(3)], axis=-1).astype(np.float32) * 0.5
    for name in ("p.nii.gz", "p.mha"):
        out = write_image(probs, reference, tmp_path / name)
        arr, g = read_image(out)
        assert arr.shape == (11, 9, 5, 3) and arr.dtype == np.float32
        np.testing.assert_allclose(arr, probs)
        assert g.mismatch(read_geometry(reference)) == []


def test_writer_errors(reference: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match the voxel grid"):
        write_mask(np.zeros((11, 9, 4), np.uint8), reference, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="non-integer"):
        write_mask(np.full((11, 9, 5), 0.5), reference, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="do not fit uint8"):
        write_mask(np.full((11, 9, 5), 300), reference, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="does not match format 'nrrd'"):
        write_mask(np.zeros((11, 9, 5), np.uint8), reference, tmp_path / "x.nii.gz", format="nrrd")
    with pytest.raises(ValueError, match="format='png'"):
        write_mask(np.zeros((11, 9, 5), np.uint8), reference, tmp_path / "x", format="png")
    assert not (tmp_path / "x.nii.gz").exists()


def test_mask_for_4d_reference(tmp_path: Path) -> None:
    ref = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 3), np.float32), _oblique_affine()), str(ref))
    out = write_mask(np.ones((6, 5, 4), np.uint8), ref, tmp_path / "frame.nii.gz")
    back, geom = read_image(out)
    assert back.shape == (6, 5, 4)
    assert geom.mismatch(read_geometry(ref)) == []


def test_truncated_and_missing_files(reference: Path, tmp_path: Path) -> None:
    data = reference.read_bytes()
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.nii.gz"):
        read_image(truncated)
    not_gzip = tmp_path / "junk.nii.gz"
    not_gzip.write_bytes(gzip.compress(b"not a nifti header" * 3))
    with pytest.raises(DataError, match="junk.nii.gz"):
        read_image(not_gzip)
    with pytest.raises(DataError, match="nope.mha"):
        read_image(tmp_path / "nope.mha")
    bad_mha = tmp_path / "bad.mha"
    bad_mha.write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(DataError, match="bad.mha"):
        read_image(bad_mha)


def test_simpleitk_loads_only_for_nrrd_and_metaimage():
    """A NIfTI prediction never pays SimpleITK's import (a fifth of a second of start-up)."""
    import subprocess
    import sys

    code = ("import sys, uumamba.data.io, uumamba.commands.predict; "
            "print('SimpleITK' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def _nifti_with_affine(path: Path, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.float32), affine), str(path))
    return path


@pytest.mark.parametrize("name, column, value, words", [
    ("origin_inf", 3, [np.inf, 0, 0],
     r"origin \((-)?inf, 0, 0\) mm (RAS|LPS) is not a position in a scanner"),
    ("origin_nan", 3, [0, np.nan, 0], r"origin \(0, nan, 0\) mm (RAS|LPS)"),
    ("origin_far", 3, [1e37, 0, 0], r"within 1e\+06 mm of the isocentre"),
    ("shear", 1, [0.5, 1.5, 0], r"voxel axes 0 and 1 meet at 71\.6°, not 90°"),
    ("singular", 1, [1.5, 0, 0], r"voxel axes 0 and 1 meet at 0\.0°"),
])
def test_grids_that_are_not_a_scanners_are_refused_before_decoding(tmp_path, name, column,
                                                                   value, words):
    """An origin that is not finite or km away, or axes that are not perpendicular: refused
    by the header check (uploads), the header reader and the image reader, naming the rule
    (an inf origin crashed the resampling; a sheared grid's volumes came out 5 % too large)."""
    from uumamba.data.untrusted import check_image_header

    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    affine[:3, column] = value
    path = _nifti_with_affine(tmp_path / f"{name}.nii.gz", affine)
    for read in (read_geometry, read_image,
                 lambda p: check_image_header(p, name="uploaded volume")):
        with pytest.raises(DataError, match=words):
            read(path)


def test_rotated_float32_affines_are_perpendicular_enough(tmp_path):
    from uumamba.data.orientation import world_rotation

    affine = world_rotation(0, 33.0) @ world_rotation(2, 71.0) @ np.diag([1.5625, 1.5625, 10.0, 1])
    affine[:3, 3] = [-180.2, 95.5, 310.0]
    path = _nifti_with_affine(tmp_path / "oblique.nii.gz", affine.astype(np.float32))
    geometry = read_geometry(path)
    np.testing.assert_allclose(geometry.spacing, (1.5625, 1.5625, 10.0), rtol=1e-6)


@pytest.mark.parametrize("matrix", ["2 0 0 0 2 0 0 0 2", "0 0 0 0 0 0 0 0 0"])
def test_metaimage_direction_of_other_than_unit_length_is_refused(tmp_path, matrix):
    """ITK keeps a MetaImage TransformMatrix as given: 2 I was read as direction 2 I beside
    1.5 mm spacing and changed the mask; all zeros failed later with a misleading message."""
    data = np.ones((4, 5, 6), np.float32)
    path = tmp_path / "scaled.mha"
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"TransformMatrix = {matrix}\nOffset = 0 0 0\nElementSpacing = 1.5 1.5 8\n"
              "DimSize = 4 5 6\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + data.tobytes())
    with pytest.raises(DataError, match=r"scaled\.mha: direction cosines of voxel axis 0 have "
                                        r"length (2|0), not 1"):
        read_geometry(path)


def test_an_nrrd_itk_refuses_is_one_line_naming_its_reason(tmp_path):
    """ITK's refusal was ten lines (its source file, an object address, teem's trace)."""
    path = tmp_path / "both.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 2\nspace: left-posterior-"
                     b"superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspacings: 1 1 1\n"
                     b"encoding: raw\nendian: little\n\n" + b"\0" * 128)
    with pytest.raises(DataError) as info:
        read_geometry(path)
    message = str(info.value)
    assert "\n" not in message and "0x" not in message and ".cxx" not in message, message
    assert message == (f"{path}: cannot read image header: NRRD: axis[0] has a direction "
                       "vector, and so can't have min, max, spacing, or units set")
