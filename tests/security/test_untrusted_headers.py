"""uumamba.data.untrusted: every hostile header refused before a voxel is decoded."""

from __future__ import annotations

import os
import time
import tracemalloc

import pytest
import torch
from hostile_files import (
    SECRET,
    gzip_bomb,
    mha_data_file,
    nifti_huge_shape,
    nifti_volume,
    nrrd_data_file,
    secret_lines,
    sitk_volume,
)

from uumamba.data.untrusted import (
    HeaderLimits,
    VolumeTooLarge,
    check_image_header,
    check_local_inputs,
)
from uumamba.errors import DataError

UPLOAD = "uploaded volume"


def _refused(path, match: str, exc=DataError, **kw) -> str:
    with pytest.raises(exc, match=match) as info:
        check_image_header(path, name=UPLOAD, **kw)
    message = str(info.value)
    assert message.startswith(UPLOAD) and str(path.parent) not in message
    assert not any(line in message for line in secret_lines())
    return message


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_honest_volumes_pass(tmp_path, suffix):
    path = sitk_volume(tmp_path / f"v{suffix}", shape=(20, 18, 6), spacing=(1.5, 1.25, 8.0))
    info = check_image_header(path, target_spacing=(1.25, 1.25, 10.0), name=UPLOAD)
    assert info.shape == (20, 18, 6)
    assert info.spacing == pytest.approx((1.5, 1.25, 8.0))
    assert info.declared_bytes == 20 * 18 * 6 * 4


@pytest.mark.parametrize("field", ["data file", "datafile"])
def test_nrrd_data_file_refused_for_uploads(tmp_path, field):
    path = nrrd_data_file(tmp_path / "x.nrrd", field=field)
    message = _refused(path, "self-contained")
    assert str(SECRET) not in message


def test_nrrd_dev_zero_with_huge_sizes_refused_without_reading(tmp_path):
    path = nrrd_data_file(tmp_path / "z.nrrd", target="/dev/zero", sizes="4096 4096 4096",
                          encoding="raw")
    _refused(path, "data file")
    with pytest.raises(DataError, match="inside the header's folder"):
        check_local_inputs(path)


def test_detached_headers_only_locally_and_only_inside_their_folder(tmp_path):
    nhdr = sitk_volume(tmp_path / "d.nhdr")
    mhd = sitk_volume(tmp_path / "d.mhd")
    _refused(nhdr, r"\.nhdr")
    _refused(mhd, r"\.mhd")
    check_local_inputs([nhdr])
    check_local_inputs(mhd)
    # absolute, '..', symlink out of the folder: refused even locally
    sub = tmp_path / "case"
    sub.mkdir()
    (tmp_path / "outside.raw").write_bytes(b"\0" * 4096)
    (sub / "link.raw").symlink_to(tmp_path / "outside.raw")
    for target in ("/etc/passwd", "../outside.raw", "link.raw", "/proc/self/environ",
                   "LIST", "slice%03d.raw 1 4 1"):
        with pytest.raises(DataError, match="inside the header's folder"):
            check_local_inputs(nrrd_data_file(sub / "x.nhdr", target=target))
        with pytest.raises(DataError, match="inside the header's folder"):
            check_local_inputs(mha_data_file(sub / "x.mhd", target=target))


def test_mha_element_data_file_elsewhere_refused(tmp_path):
    message = _refused(mha_data_file(tmp_path / "x.mha"), "ElementDataFile must be LOCAL")
    assert str(SECRET) not in message


def test_nifti_pairs_refused_for_uploads(tmp_path):
    _refused(nifti_volume(tmp_path / "p.nii", magic=b"ni1"), "separate .img")
    (tmp_path / "a.hdr").write_bytes(b"\0" * 348)
    _refused(tmp_path / "a.hdr", "pairs are refused")


def test_sixty_byte_nifti_declaring_a_huge_shape_is_413(tmp_path):
    path = nifti_huge_shape(tmp_path / "huge.nii.gz")
    assert os.path.getsize(path) < 100
    _refused(path, "voxels", exc=VolumeTooLarge)


def test_gzip_bomb_refused_without_inflating_it(tmp_path):
    path = gzip_bomb(tmp_path / "bomb.nii.gz", inflated_mib=1024)
    assert os.path.getsize(path) < 1.2e6  # ~1000:1
    tracemalloc.start()
    start = time.perf_counter()
    _refused(path, "beyond the declared size", exc=VolumeTooLarge)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 16 * 2**20, (elapsed, peak)


def test_truncated_gzip_refused(tmp_path):
    good = nifti_volume(tmp_path / "g.nii.gz", shape=(40, 40, 20)).read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(good[: len(good) // 2])
    _refused(tmp_path / "t.nii.gz", "truncated")


def test_implausible_spacing_and_resampled_size(tmp_path):
    _refused(nifti_volume(tmp_path / "s.nii.gz", spacing=(300.0, 300.0, 300.0)),
             "300 mm along axis 0 is implausible")
    _refused(nifti_volume(tmp_path / "f.nii.gz", spacing=(0.01, 1.0, 1.0)), "implausible")
    big = nifti_volume(tmp_path / "b.nii.gz", spacing=(40.0, 40.0, 40.0))
    check_image_header(big)  # fine without a target spacing
    _refused(big, "resampled", exc=VolumeTooLarge, target_spacing=(0.5, 0.5, 0.5))
    small = HeaderLimits(max_voxels=1000)
    _refused(nifti_volume(tmp_path / "n.nii.gz"), "4096 voxels", exc=VolumeTooLarge, limits=small)


def test_an_axis_kept_at_its_own_spacing_is_bounded_by_the_finest_spacing(tmp_path):
    # A 2D model keeps the slice spacing (target 0 there): the header alone cannot tell which
    # voxel axis that is, so the cap counts it at the finest declared spacing (2 mm here):
    # 32 x 32 mm in-plane at 1 mm, 128 mm / 2 mm = 65536 voxels (the true count is 16384).
    path = nifti_volume(tmp_path / "k.nii.gz", shape=(16, 16, 16), spacing=(2.0, 2.0, 8.0))
    check_image_header(path, target_spacing=(1.0, 1.0, 0.0),
                       limits=HeaderLimits(max_resampled_voxels=65536))
    message = _refused(path, "about 6.55e[+]04 voxels", exc=VolumeTooLarge,
                       target_spacing=(1.0, 1.0, 0.0),
                       limits=HeaderLimits(max_resampled_voxels=65535))
    assert "(1 x 1 x own mm)" in message


def test_only_3d_unless_4d_allowed(tmp_path):
    four = nifti_volume(tmp_path / "c.nii.gz", shape=(8, 8, 8, 3))
    _refused(four, "4D")
    assert check_image_header(four, allow_4d=True).shape == (8, 8, 8, 3)
    _refused(nifti_volume(tmp_path / "flat.nii.gz", shape=(8, 8)), "2 dimensions")


def test_overlong_text_header_refused(tmp_path):
    path = tmp_path / "long.nrrd"
    path.write_text("NRRD0004\n" + "# padding\n" * 8000)
    _refused(path, "longer than 64 KiB")
    dup = tmp_path / "dup.mha"
    dup.write_text("NDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nelementdatafile = x\n"
                   "ElementDataFile = LOCAL\n")
    _refused(dup, "ElementDataFile must be LOCAL")


def test_predictor_refuses_a_hostile_local_file_before_reading(tmp_path):
    """``Predictor.predict_file`` runs the guard first (local mode)."""
    from uumamba.data.plan import Plans  # noqa: F401  (import cost only)
    from uumamba.inference.predict import Predictor

    class Plan:
        resampling_spacing = (1.0, 1.0, 1.0)
        num_input_channels = 1

    predictor = Predictor.__new__(Predictor)
    predictor.plans = Plan()
    with pytest.raises(DataError, match="inside the header's folder"):
        predictor.predict_file(nrrd_data_file(tmp_path / "x.nrrd"))
    with pytest.raises(DataError, match="implausible"):
        predictor.predict_file(nifti_volume(tmp_path / "s.nii.gz", spacing=(300.0, 1, 1)))


def test_sliding_window_stops_within_one_batch_once_cancelled():
    import threading
    from types import SimpleNamespace

    from uumamba.inference.sliding import InferenceCancelled, sliding_window_probabilities

    cancel = threading.Event()
    calls = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            calls.append(x.shape[0])
            if len(calls) == 2:
                cancel.set()
            return torch.zeros(x.shape[0], 2, *x.shape[2:]) + self.w

    plans = SimpleNamespace(spatial_dims=3, patch_size=[8, 8, 8], slice_axis=2)
    cfg = SimpleNamespace(overlap=0.0, gaussian=False, sw_batch_size=1)
    image = torch.zeros(1, 1, 32, 32, 8)  # 16 windows, one per batch
    with pytest.raises(InferenceCancelled):
        sliding_window_probabilities(Net(), image, plans, cfg, cancel=cancel)
    assert len(calls) == 2
    calls.clear()
    out = sliding_window_probabilities(Net(), image, plans, cfg, cancel=threading.Event())
    assert out.shape == (1, 2, 32, 32, 8)


def test_multi_member_gzip_is_read_to_the_end(tmp_path):
    """Valid multi-member gzip (what a bomb also uses) is inflated member by member."""
    import gzip

    plain = nifti_volume(tmp_path / "v.nii", shape=(20, 20, 10)).read_bytes()
    path = tmp_path / "m.nii.gz"
    path.write_bytes(gzip.compress(plain[:1000]) + gzip.compress(plain[1000:5000])
                     + gzip.compress(plain[5000:]))
    assert check_image_header(path).shape == (20, 20, 10)
    path.write_bytes(gzip.compress(plain[:1000]) + gzip.compress(plain[1000:5000]))
    _refused(path, "truncated")


@pytest.mark.parametrize("suffix, field, old, new", [
    (".mha", "MetaImage Offset", "Offset = 0 0 0", "Offset = inf 0 0"),
    (".mha", "MetaImage Offset", "Offset = 0 0 0", "Offset = 5 nan 3"),
    (".nrrd", "NRRD 'space origin'", "space origin: (0,0,0)", "space origin: (1e300,0,0)"),
])
def test_text_header_origins_that_are_not_a_scanners_are_refused(tmp_path, suffix, field, old,
                                                                 new):
    """ITK reads a MetaImage Offset of inf or nan as 0 (the volume was accepted at another
    place); for NRRD its own refusal named only an ITK source line."""
    path = sitk_volume(tmp_path / f"v{suffix}")
    data = path.read_bytes()
    assert old.encode() in data, data[:400]
    path.write_bytes(data.replace(old.encode(), new.encode(), 1))
    with pytest.raises(DataError, match=rf"uploaded volume: {field}: origin \(.*\) mm as written "
                                        r"is not a position in a scanner"):
        check_image_header(path, name="uploaded volume")


def test_the_default_resampled_cap_follows_the_machines_memory(monkeypatch):
    """Half the memory at 64 B per resampled voxel (62 measured), at most 2 x 512 x 512 x 1000:
    the old fixed cap would have let a crafted 197 KB upload ask for ~30 GB on a 24 GB
    machine."""
    import os

    from uumamba.data import untrusted

    pages = {"SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    monkeypatch.setattr(untrusted.Path, "read_text", lambda self: "max")  # no cgroup limit
    pages["SC_PHYS_PAGES"] = 24 * 1024**3 // 4096
    assert untrusted.memory_bounded_voxels() == 24 * 1024**3 // 2 // 64 == 201_326_592
    assert untrusted.HeaderLimits().max_resampled_voxels == 201_326_592
    pages["SC_PHYS_PAGES"] = 512 * 1024**3 // 4096
    assert untrusted.memory_bounded_voxels() == 2 * 512 * 512 * 1000
    monkeypatch.setattr(untrusted.Path, "read_text", lambda self: str(8 * 1024**3))  # container
    assert untrusted.memory_bounded_voxels() == 8 * 1024**3 // 2 // 64


def _raw_nrrd(path, geometry: str, sizes: str = "8 8 4", dimension: int = 3):
    n = 1
    for v in sizes.split():
        n *= int(v)
    path.write_bytes(f"NRRD0004\ntype: float\ndimension: {dimension}\nsizes: {sizes}\n"
                     f"{geometry}\nencoding: raw\nendian: little\n\n".encode() + b"\0" * 4 * n)
    return path


@pytest.mark.parametrize("geometry, match", [
    # the squares of 1e200 overflowed: a traceback in the CLI, a 500 in the service
    ("space: left-posterior-superior\nspace directions: (1e200,0,0) (0,1.5625,0) (0,0,10)",
     r"voxel spacing 1e\+200 mm along axis 0 is implausible"),
    ("space: left-posterior-superior\nspace directions: none (0,1.5625,0) (0,0,10)",
     r"NRRD 'space directions' gives a spacing for 2 of the image's 3 spatial axes"),
    ("spacings: nan 1.5625 10", r"NRRD 'spacings' gives a spacing for 2 of the image's 3"),
    ("spacings: 1.5 inf 10", r"NRRD 'spacings' gives a spacing for 2 of the image's 3"),
])
def test_nrrd_spacings_that_are_unknown_or_out_of_range_are_refused(tmp_path, geometry, match):
    """An axis marked none / nan in a 3D image read as 1 mm (volumes off by that factor)."""
    _refused(_raw_nrrd(tmp_path / "v.nrrd", geometry), match)


def test_a_cine_nrrds_time_axis_may_have_no_spacing(tmp_path):
    path = _raw_nrrd(tmp_path / "c.nrrd", "space: left-posterior-superior\nspace directions: "
                     "(1.5,0,0) (0,1.5,0) (0,0,10) none\nkinds: domain domain domain time",
                     sizes="8 8 4 3", dimension=4)
    info = check_image_header(path, name=UPLOAD, allow_4d=True)
    assert info.shape == (8, 8, 4, 3) and info.spacing[:3] == (1.5, 1.5, 10.0)


def test_the_spacing_limits_hold_to_float32_rounding_of_a_rotated_header(tmp_path):
    """A 0.05 mm grid under a double-oblique float32 affine reads 0.0499999 mm: it was refused
    (named as '0.05 mm ... allowed 0.05-50 mm') while its straight copy was accepted."""
    import nibabel as nib
    import numpy as np

    from uumamba.data.orientation import voxel_spacing, world_rotation

    rotation = (world_rotation(0, 23.0) @ world_rotation(1, 37.0) @ world_rotation(2, 61.0))[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = rotation * 0.05
    path = tmp_path / "iso.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), affine), str(path))
    assert min(voxel_spacing(nib.load(str(path)).affine)) < 0.05  # what the header holds
    check_image_header(path, name=UPLOAD)
    affine[:3, :3] = rotation * 0.0499
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), affine), str(path))
    _refused(path, r"voxel spacing 0\.0499\d* mm along axis \d is implausible \(allowed 0\.05-50")


def test_a_nifti_whose_qfac_is_zero_reads_as_qfac_one(tmp_path):
    """pixdim[0] (qfac) = 0, as some converters write it: the NIfTI-1 reference library and
    nibabel (which reads our NIfTI files) take it as 1. It was refused as 'orientation
    (qform / sform) is invalid' before any reader saw it."""
    import nibabel as nib
    import numpy as np

    from uumamba.data.io import read_geometry, read_image
    from uumamba.data.orientation import world_rotation

    affine = world_rotation(0, 20.0) @ world_rotation(2, 35.0)
    affine[:3, :3] = affine[:3, :3] @ np.diag([1.5, 1.25, 8.0])
    affine[:3, 3] = (-40.0, 12.5, 30.0)
    img = nib.Nifti1Image(np.random.default_rng(3).random((10, 9, 4), dtype=np.float32), None)
    img.set_qform(affine, code=1)  # the qform alone carries the rotation
    img.set_sform(None, code=0)
    straight, patched = tmp_path / "qfac1.nii", tmp_path / "qfac0.nii"
    nib.save(img, str(straight))
    raw = bytearray(straight.read_bytes())
    assert raw[76:80] == np.float32(1.0).tobytes()  # pixdim[0] as nibabel wrote it
    raw[76:80] = np.float32(0.0).tobytes()
    patched.write_bytes(bytes(raw))

    info = check_image_header(patched, name=UPLOAD)
    assert info.spacing == pytest.approx((1.5, 1.25, 8.0))
    assert read_geometry(patched) == read_geometry(straight)
    data, geometry = read_image(patched)
    assert geometry == read_geometry(straight) and data.shape == (10, 9, 4)
    np.testing.assert_allclose(geometry.affine_ras(), affine, atol=1e-5)

    # a negative qfac other than -1: nibabel reads 1, ITK -1 (the qform's slice axis flips),
    # so a mask written with qfac 1 would not overlay the image in ITK: refused, naming it
    for value, shown in ((-0.5, "-0.5"), (-np.inf, "-inf"), (-1.0000001, "-1.00000012")):
        raw[76:80] = np.float32(value).tobytes()
        patched.write_bytes(bytes(raw))
        message = _refused(patched, r"qfac \(pixdim\[0\]\) is " + shown + ", neither 1 nor -1")
        assert "store 1 or -1" in message
    raw[76:80] = np.float32(-1.0).tobytes()  # -1 is a left-handed qform, read the same by all
    patched.write_bytes(bytes(raw))
    assert check_image_header(patched, name=UPLOAD).spacing == pytest.approx((1.5, 1.25, 8.0))


def test_complex_and_rgb_niftis_are_refused_naming_the_datatype(tmp_path):
    """A complex NIfTI was segmented from its real part alone (MONAI's ComplexWarning on
    stderr, the imaginary part dropped); an RGB one is three values per voxel."""
    import nibabel as nib
    import numpy as np

    values = np.random.default_rng(5).random((12, 10, 4))
    path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image((values + 1j * values).astype(np.complex64), np.eye(4)), str(path))
    _refused(path, r"NIfTI datatype complex \(code 32\) is not supported: voxels must be real")
    rgb = np.zeros((12, 10, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    _refused(path, r"NIfTI datatype RGB / RGBA \(code 128\) is not supported")
