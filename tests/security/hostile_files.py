"""Hostile image files built in the tests (no binary blobs in git), shared by tests/security."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

#: A file every Linux test machine has, whose bytes must never appear in an answer.
SECRET = Path("/etc/passwd")


def secret_lines() -> list[str]:
    """Non-trivial lines of :data:`SECRET` (what a leak would show)."""
    if not SECRET.is_file():
        return []
    return [line for line in SECRET.read_text(errors="replace").splitlines() if len(line) > 8]


def nrrd_data_file(path: Path, target: str = str(SECRET), field: str = "data file",
                   sizes: str = "16 16 16", encoding: str = "ascii") -> Path:
    """An .nrrd whose header points SimpleITK at another file (``data file: /etc/passwd``)."""
    path.write_text(f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: {sizes}\n"
                    f"encoding: {encoding}\nline skip: 0\n{field}: {target}\n\n")
    return path


def mha_data_file(path: Path, target: str = str(SECRET)) -> Path:
    """An .mha whose ``ElementDataFile`` names another file."""
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementType = MET_UCHAR\n"
                    f"ElementDataFile = {target}\n")
    return path


def nifti_huge_shape(path: Path, shape=(30000, 30000, 30000)) -> Path:
    """A tiny .nii.gz (about 60 bytes) whose header declares ``shape`` float32 voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4, compresslevel=9))
    return path


def gzip_bomb(path: Path, inflated_mib: int = 1024) -> Path:
    """A .nii.gz declaring 16^3 uint8 voxels followed by ``inflated_mib`` MiB of zeros (~1000:1).

    Built from gzip members (the header's, then one per MiB of zeros, all the same bytes), as
    multi-member gzip files are valid and read by nibabel: instant to build.
    """
    header = nib.Nifti1Header()
    header.set_data_shape((16, 16, 16))
    header.set_data_dtype(np.uint8)
    member = gzip.compress(b"\0" * (1 << 20), compresslevel=9)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4) + member * inflated_mib)
    return path


def nifti_volume(path: Path, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), magic: bytes | None = None
                 ) -> Path:
    """A valid NIfTI volume of noise with the given spacing (mm); ``magic`` overrides the magic
    of an uncompressed ``.nii``."""
    img = nib.Nifti1Image(np.random.default_rng(0).random(shape, dtype=np.float32),
                          np.diag([*spacing, 1.0]))
    nib.save(img, str(path))
    if magic is not None:  # patched after saving (nibabel writes the single-file magic)
        data = bytearray(path.read_bytes())
        data[344:348] = magic.ljust(4, b"\0")
        path.write_bytes(bytes(data))
    return path


def sitk_volume(path: Path, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0)) -> Path:
    """A valid volume written by SimpleITK (.nrrd, .mha, .nhdr, .mhd: the format of ``path``)."""
    arr = np.random.default_rng(0).random(shape[::-1], dtype=np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path
