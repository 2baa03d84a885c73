"""A small synthetic cardiac-MRI-like dataset for the demo, tests and quick experiments.

Each case is a short-axis cine-MRI-like volume with ACDC's labels: 1 right-ventricle (RV)
cavity, 2 left-ventricle myocardium, 3 left-ventricle (LV) cavity. The anatomy is drawn in
millimetres, then sampled on an anisotropic grid (default 1.5 x 1.5 mm in-plane, 8 mm slices,
as in cine MRI):

- LV cavity: half an ellipsoid, open at the base slice and closed towards the apex, tilted
  slightly along the long axis;
- myocardium: the shell between the cavity and a larger ellipsoid (wall 5-9 mm thick), which
  also caps the apex;
- RV cavity: an ellipsoid beside the LV minus the myocardium's outer ellipsoid, which leaves
  the crescent seen in short-axis slices; it stops above the apex;
- a bright round "descending aorta" tube outside the heart (background label) so that
  brightness alone does not identify the blood pools.

Intensities follow bright-blood cine MRI: blood bright, myocardium dark, a textured body,
air around it; then in-plane partial-volume blur, a smooth multiplicative bias field, Rician
noise and a random global gain (arbitrary units, like raw scanner values). Every case varies
position, radii, wall thickness, RV angle, tilt, contrast and noise. Output is deterministic
for a given seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from uumamba.utils import atomic_path

#: Label values and names written to ``dataset.json`` (ACDC's convention).
SYNTHETIC_LABELS: dict[int, str] = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}

_LAYOUTS = ("folder", "nnunet")


def make_synthetic_case(
    seed: int,
    shape: tuple[int, int, int] = (64, 64, 12),
    spacing: tuple[float, float, float] = (1.5, 1.5, 8.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic short-axis cardiac MRI case.

    Args:
        seed: random seed; the same seed gives the same case.
        shape: (x, y, z) voxels; z is the slice axis.
        spacing: (x, y, z) voxel spacing in mm.

    Returns:
        ``(image, label)``: image (x, y, z) float32 (arbitrary intensity units, positive),
        label (x, y, z) uint8 with values 0 background, 1 RV, 2 myocardium, 3 LV.

    Raises:
        ValueError: ``shape`` or ``spacing`` is not three positive numbers, or the field of
            view is too small for a heart (< 60 mm in-plane).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive ints (x, y, z), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive mm values, got {spacing}")
    fov = [n * s for n, s in zip(shape, spacing, strict=True)]
    if min(fov[:2]) < 60.0:
        raise ValueError(f"in-plane field of view {fov[:2]} mm is too small; need >= 60 mm")

    rng = np.random.default_rng(seed)
    label = _draw_anatomy(rng, shape, spacing, fov)
    image = _draw_intensities(rng, label, shape, spacing, fov)
    return image, label


def _grid_mm(shape, spacing, fov):
    """Voxel-centre coordinates in mm, centred on the field of view."""
    axes = [(np.arange(n) + 0.5) * s - f / 2.0 for n, s, f in zip(shape, spacing, fov, strict=True)]
    return np.meshgrid(*axes, indexing="ij")


def _draw_anatomy(rng, shape, spacing, fov) -> np.ndarray:
    x, y, z = _grid_mm(shape, spacing, fov)
    half = min(fov[0], fov[1]) / 2.0

    # LV geometry (mm). Cavity semi-axes a, b in-plane, c along the long axis.
    a = rng.uniform(0.13, 0.19) * 2 * half
    b = a * rng.uniform(0.85, 1.15)
    wall = rng.uniform(5.0, 9.0)
    c = max(0.7 * fov[2], 3.0 * spacing[2]) * rng.uniform(0.85, 1.05)
    # Base plane near the top of the stack; the apex points towards z < 0.
    z_base = fov[2] / 2.0 - rng.uniform(0.5, 1.5) * spacing[2]
    centre = np.array([rng.uniform(0.05, 0.2), rng.uniform(-0.1, 0.1)]) * half
    tilt = rng.uniform(-0.15, 0.15, size=2)  # in-plane shift per mm towards the apex
    theta = rng.uniform(-0.3, 0.3)  # in-plane rotation of the ellipse

    depth = z_base - z  # >= 0 below the base
    cx = centre[0] + tilt[0] * depth
    cy = centre[1] + tilt[1] * depth
    dx, dy = x - cx, y - cy
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    below_base = depth >= 0

    cavity = below_base & ((u / a) ** 2 + (v / b) ** 2 + (depth / c) ** 2 <= 1.0)
    outer = below_base & (
        (u / (a + wall)) ** 2 + (v / (b + wall)) ** 2 + (depth / (c + wall)) ** 2 <= 1.0
    )

    # RV: ellipsoid on the LV's -x side (rotated by phi), shorter than the LV.
    phi = np.pi + rng.uniform(-0.5, 0.5)
    offset = a + wall + rng.uniform(-8.0, 0.0)
    ra = rng.uniform(0.9, 1.3) * a
    rb = rng.uniform(1.5, 2.0) * b
    rc = c * rng.uniform(0.6, 0.8)
    ru = np.cos(phi) * u + np.sin(phi) * v - offset
    rv = -np.sin(phi) * u + np.cos(phi) * v
    rv_blob = below_base & ((ru / ra) ** 2 + (rv / rb) ** 2 + (depth / rc) ** 2 <= 1.0)
    rv_cavity = rv_blob & ~outer

    label = np.zeros(shape, dtype=np.uint8)
    label[rv_cavity] = 1
    label[outer] = 2
    label[cavity] = 3
    return label


def _smooth_noise(rng, shape, sigma_vox) -> np.ndarray:
    """Gaussian-filtered white noise, scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma_vox, mode="wrap")
    return field / (field.std() + 1e-8)


def _draw_intensities(rng, label, shape, spacing, fov) -> np.ndarray:
    x, y, z = _grid_mm(shape, spacing, fov)
    half = min(fov[0], fov[1]) / 2.0

    # Body: an ellipse filling most of the in-plane field of view; air outside.
    body = (x / (0.95 * half * rng.uniform(0.9, 1.0))) ** 2 + (
        y / (0.8 * half * rng.uniform(0.9, 1.0))
    ) ** 2 <= 1.0
    in_plane_sigma = (2.5, 2.5, 0.5)
    tissue = 0.35 + 0.12 * _smooth_noise(rng, shape, in_plane_sigma)
    image = np.where(body, tissue, 0.0)

    # Descending aorta: a bright tube behind the heart, outside every label.
    ang = rng.uniform(-0.6, 0.6) - np.pi / 2
    ax_c = 0.62 * half * np.array([np.cos(ang), np.sin(ang)])
    aorta = ((x - ax_c[0]) ** 2 + (y - ax_c[1]) ** 2 <= rng.uniform(5.0, 7.5) ** 2) & (label == 0)
    image[aorta] = rng.uniform(0.8, 1.0)

    blood = rng.uniform(0.85, 1.05)
    myo = rng.uniform(0.15, 0.3)
    image[label == 3] = blood + 0.03 * rng.standard_normal(int((label == 3).sum()))
    image[label == 1] = blood * rng.uniform(0.85, 0.98) + 0.03 * rng.standard_normal(
        int((label == 1).sum())
    )
    image[label == 2] = myo + 0.03 * rng.standard_normal(int((label == 2).sum()))

    # Partial-volume blur in-plane (slices are acquired separately).
    image = ndimage.gaussian_filter(image, sigma=(0.7, 0.7, 0.0))

    # Smooth multiplicative bias field: exp of a random linear + quadratic in-plane trend.
    xn, yn, zn = x / half, y / half, z / max(fov[2] / 2.0, 1e-6)
    coeffs = rng.uniform(-0.25, 0.25, size=6)
    log_bias = (
        coeffs[0] * xn + coeffs[1] * yn + coeffs[2] * zn * 0.5
        + coeffs[3] * xn * yn + coeffs[4] * xn**2 + coeffs[5] * yn**2
    )
    image = image * np.exp(log_bias)

    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
    sigma = rng.uniform(0.03, 0.07)
    real = image + sigma * rng.standard_normal(shape)
    imag = sigma * rng.standard_normal(shape)
    image = np.sqrt(real**2 + imag**2)

    gain = rng.uniform(200.0, 800.0)
    return (image * gain).astype(np.float32)


def _affine(spacing, shape) -> np.ndarray:
    """RAS affine with the given spacing and the volume centred on the origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) * s / 2.0 for n, s in zip(shape, spacing, strict=True)]
    return affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_synthetic_dataset(
    root: str | Path,
    n_cases: int = 8,
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 64, 12),
    spacing: tuple[float, float, float] = (1.5, 1.5, 8.0),
    layout: str = "folder",
    prefix: str = "synth",
) -> Path:
    """Write ``n_cases`` synthetic cardiac MRI cases (see the module docstring) to ``root``.

    Layouts:
        ``folder``: ``root/images/CASE.nii.gz`` + ``root/labels/CASE.nii.gz``;
        ``nnunet``: nnU-Net v2 raw, ``root/imagesTr/CASE_0000.nii.gz`` +
        ``root/labelsTr/CASE.nii.gz``.
    Both write ``root/dataset.json`` in nnU-Net v2's form (``channel_names``, ``labels`` as
    name -> value, ``numTraining``, ``file_ending``). Case ids are ``PREFIX_000``, ...; case i
    is drawn with seed ``seed * 1000 + i``, so a dataset is reproducible and a larger
    ``n_cases`` extends a smaller one with the same first cases. Images are float32 and labels
    uint8 NIfTI with identical RAS affines (qform = sform, code 1), spacing in mm.

    Args:
        root: output folder (created).
        n_cases: number of cases (>= 1).
        seed: dataset seed.
        shape: (x, y, z) voxels; spacing: (x, y, z) mm.
        layout: ``folder`` or ``nnunet``.
        prefix: case-id prefix (letters, digits, ``-``; e.g. ``heldout`` for a test set).

    Returns:
        ``root`` as a Path.

    Raises:
        ValueError: ``n_cases`` < 1, unknown ``layout``, a bad ``prefix``, or a bad shape /
            spacing.
    """
    if not prefix or not all(c.isalnum() or c == "-" for c in prefix):
        raise ValueError(f"prefix must be letters, digits or '-', got {prefix!r}")
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    root = Path(root)
    img_dir, lbl_dir = (
        (root / "images", root / "labels") if layout == "folder" else (root / "imagesTr", root / "labelsTr")
    )
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    affine = _affine(tuple(float(s) for s in spacing), tuple(int(s) for s in shape))

    for i in range(n_cases):
        case_id = f"{prefix}_{i:03d}"
        image, label = make_synthetic_case(seed * 1000 + i, shape, spacing)
        img_name = f"{case_id}.nii.gz" if layout == "folder" else f"{case_id}_0000.nii.gz"
        _save_nifti(image, affine, img_dir / img_name)
        _save_nifti(label, affine, lbl_dir / f"{case_id}.nii.gz")

    dataset_json = {
        "name": "uumamba synthetic cardiac MRI",
        "description": "Synthetic short-axis cine-MRI-like volumes (uumamba.data.synthetic)",
        "channel_names": {"0": "MRI"},
        "labels": {name: value for value, name in SYNTHETIC_LABELS.items()},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    with atomic_path(root / "dataset.json") as tmp:
        tmp.write_text(json.dumps(dataset_json, indent=2))
    return root
