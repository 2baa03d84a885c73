"""Synthetic DICOM series for the DICOM tests: real MR / CT Image Storage files written with
pydicom from a volume and a grid (LPS), in shuffled file order with scrambled InstanceNumbers,
so readers must sort by position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"


def rotation(a: float, b: float) -> np.ndarray:
    """A double-oblique rotation (about z by a, then about x by b; radians)."""
    ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    return rz @ rx


def write_series(volume: np.ndarray, folder: Path, *, spacing=(1.5, 1.5, 8.0),
                 origin=(-40.0, -30.0, 12.5), direction=np.eye(3), sop_class=MR,
                 patient_id="PAT1", series_number=3, seed=0, series_uid=None, study_uid=None,
                 frame_of_reference=None, trigger_times=None, rescale=(1.0, 0.0),
                 names="shuffled") -> list[Path]:
    """Write ``volume`` (x, y, z) int16-able as one file per slice; return the files in z order.

    ``direction`` columns: row cosine, column cosine, slice direction (must be the normal
    row x column for a right-handed stack; pass a negated normal to store slices reversed).
    ``trigger_times``: write the volume once per time (4D cine), same positions.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = np.asarray(direction, dtype=np.float64)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    nx, ny, nz = volume.shape
    times = trigger_times if trigger_times is not None else [None]
    order = rng.permutation(nz * len(times))
    paths_by_slice: list[Path] = [None] * nz  # type: ignore[list-item]
    for n, idx in enumerate(order):
        t, k = divmod(int(idx), nz)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PatientID, ds.PatientName = patient_id, "Test^Patient"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.Modality = "MR" if sop_class == MR else "CT"
        ds.Manufacturer = "synthetic"
        ds.SeriesNumber, ds.InstanceNumber = series_number, int(nz * len(times) - n)
        ds.SeriesDescription = "synthetic"
        position = np.asarray(origin) + direction[:, 2] * spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([direction[:, 0], direction[:, 1]])]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # [between rows, between columns]
        ds.SliceThickness = spacing[2]
        if times[t] is not None:
            ds.TriggerTime = times[t]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if rescale != (1.0, 0.0):
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        stored = np.round((volume[:, :, k] - rescale[1]) / rescale[0]).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(stored.T).tobytes()
        name = f"IM{n:04d}.dcm" if names == "shuffled" else f"{k:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        if t == 0:
            paths_by_slice[k] = path
    return paths_by_slice
