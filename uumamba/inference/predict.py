"""Segment images with a trained model folder; masks come back in the input's own geometry.

Flow of :meth:`Predictor.predict_file` (one 3D volume, or one file per input channel):

1. the header is read first: a 4D image is refused with the reason (or split into 3D
   frames when asked);
2. ``inference_transforms(plans)`` (the training preprocessing without cropping: load,
   channel first, reorient to ``plans.axcodes``, resample to ``plans.target_spacing``,
   normalise) gives the network's input grid;
3. every fold's network predicts softmax probabilities with Gaussian-weighted sliding windows
   (:func:`uumamba.inference.sliding.sliding_window_probabilities`, optional mirroring TTA);
   the fold ensemble is the mean of the softmax;
4. the probabilities are mapped back to the input's voxel grid with MONAI ``Invertd`` using
   the transforms' own record (inverse resampling with *linear* interpolation of the
   probabilities, inverse reorientation), then renormalised; the mask is their argmax. This is
   nnU-Net's order (resample probabilities, then argmax), which gives smoother boundaries
   than resampling a label map with nearest neighbour. Where the target spacing equals the
   input's, the inversion is exact voxel for voxel (tests check this for RAS, LPS, oblique
   and qform != sform NIfTI inputs);
5. largest-connected-component postprocessing where validation showed that it helps
   (:mod:`uumamba.inference.postprocess`, ``postprocessing.json``);
6. predictive entropy ``-sum_k p_k ln p_k`` (nats) of the averaged softmax and per-class
   volumes (voxel count x voxel volume in mm^3 / 1000 = mL).

Inputs smaller than the patch are padded by the sliding window and cropped back.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from uumamba.config import Config, InferenceConfig, config_from_dict
from uumamba.data.io import Geometry, format_of, read_geometry, read_image, write_image, write_mask
from uumamba.data.layouts import IMAGE_SUFFIXES, split_suffix
from uumamba.data.plan import Plans
from uumamba.data.transforms import inference_transforms
from uumamba.errors import DataError, UserError
from uumamba.inference.postprocess import apply_postprocessing, load_postprocessing
from uumamba.inference.sliding import sliding_window_probabilities
from uumamba.utils import atomic_path, check_output_folder

#: Checkpoint used per fold, in order of preference.
CHECKPOINT_NAMES: tuple[str, ...] = ("checkpoint_best.pt", "checkpoint_latest.pt")
#: Output formats of ``uumamba predict --format``.
OUTPUT_FORMATS: tuple[str, ...] = ("nii.gz", "nii", "nrrd", "mha", "seg.nrrd")
_CHANNEL_TAG = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Prediction:
    """The result of segmenting one 3D volume.

    Attributes:
        mask: (x, y, z) uint8 label map in the input's voxel grid (same shape and axis order
            as :func:`uumamba.data.io.read_image` gives for the input).
        probabilities: (C, x, y, z) float32 softmax of the fold ensemble in the input's grid
            (C = number of classes, background first), or None when not requested.
        entropy: (x, y, z) float32 predictive entropy of that softmax in nats (0 = certain,
            ln C = uniform), or None when not requested.
        geometry: the input's :class:`~uumamba.data.io.Geometry` (LPS; spatial part for a
            4D input split into frames).
        volumes_ml: foreground label name -> volume in mL (voxels x voxel volume / 1000).
        voxel_counts: foreground label name -> voxel count.
    """

    mask: np.ndarray
    probabilities: np.ndarray | None
    entropy: np.ndarray | None
    geometry: Geometry
    volumes_ml: dict[str, float] = field(default_factory=dict)
    voxel_counts: dict[str, int] = field(default_factory=dict)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; the engine's rule
    (:func:`uumamba.engine.distributed.resolve_device`), so every command reads ``--device``
    alike.

    Raises:
        UserError: CUDA was asked for but is not available, or the name is not a device.
    """
    from uumamba.engine.distributed import resolve_device as _resolve

    return _resolve(device)


def predictive_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Voxel-wise entropy ``-sum_k p_k ln p_k`` (nats) of (C, *spatial) probabilities.

    Returns (*spatial) float32; 0 where one class has probability 1, ln C for a uniform
    distribution.
    """
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    return (-(probabilities * np.log(p)).sum(axis=0)).astype(np.float32)


def label_volumes(mask: np.ndarray, spacing: Sequence[float], labels: dict[int, str]
                  ) -> tuple[dict[str, int], dict[str, float]]:
    """Voxel counts and volumes in mL of every foreground label of ``mask``.

    mL = count x prod(spacing in mm) / 1000. Labels absent from ``mask`` get 0.
    """
    voxel_ml = float(np.prod([float(s) for s in spacing[:3]])) / 1000.0
    counts = np.bincount(np.asarray(mask).ravel(), minlength=max(labels) + 1)
    voxel_counts = {name: int(counts[v]) for v, name in sorted(labels.items()) if v != 0}
    return voxel_counts, {name: n * voxel_ml for name, n in voxel_counts.items()}


def _parse_folds(folds: str | int | Sequence[str | int] | None) -> list[str] | None:
    if folds is None:
        return None
    if isinstance(folds, (str, int)):
        folds = [f for f in str(folds).split(",") if f.strip()]
    names = []
    for f in folds:
        f = str(f).strip()
        names.append(f if f.startswith("fold_") else f"fold_{f}")
    return names


def find_fold_checkpoints(model_dir: Path, folds: str | int | Sequence[str | int] | None = None
                          ) -> dict[str, Path]:
    """Map fold folder name -> checkpoint (``checkpoint_best.pt``, else ``checkpoint_latest.pt``).

    Args:
        model_dir: trained model folder.
        folds: fold indices / names (``0``, ``"fold_0"``, ``"all"``, ``"0,1"``); None: every
            ``fold_*`` folder with a checkpoint.

    Raises:
        UserError: no fold has a checkpoint, or a requested fold has none.
    """
    found: dict[str, Path] = {}
    for fold_dir in sorted(p for p in model_dir.glob("fold_*") if p.is_dir()):
        for name in CHECKPOINT_NAMES:
            if (fold_dir / name).is_file():
                found[fold_dir.name] = fold_dir / name
                break
    wanted = _parse_folds(folds)
    if wanted is None:
        if not found:
            raise UserError(f"{model_dir}: no fold_*/checkpoint_best.pt or checkpoint_latest.pt; "
                            "is this a model folder written by 'uumamba train'?")
        return found
    missing = [f for f in wanted if f not in found]
    if missing:
        raise UserError(f"{model_dir}: {', '.join(missing)} has no checkpoint "
                        f"(folds with one: {', '.join(found) or 'none'})")
    return {f: found[f] for f in wanted}


class Predictor:
    """A fold ensemble of networks plus the plan's preprocessing and its inversion.

    Args:
        networks: one or more modules mapping (N, C, *patch) to logits (N, K, *patch)
            (2D or 3D as ``plans.spatial_dims``); moved to ``device`` and set to eval mode.
        plans: the model's plan (preprocessing, patch size, labels).
        inference_cfg: sliding-window settings (overlap, Gaussian weighting, window batch).
        device: torch device (``auto`` picks CUDA when available).
        tta: default mirroring TTA (``predict_file(tta=...)`` overrides it per call).
        postprocessing: spec for :func:`~uumamba.inference.postprocess.apply_postprocessing`
            or None.
        labels: value -> name (default ``plans.labels``).
        fold_names: names of the folds, for reports.

    Build it from a model folder with :meth:`from_model_dir`.
    """

    def __init__(
        self,
        networks: Sequence[torch.nn.Module],
        plans: Plans,
        inference_cfg: InferenceConfig | None = None,
        device: str | torch.device = "auto",
        tta: bool = False,
        postprocessing: dict[str, Any] | None = None,
        labels: dict[int, str] | None = None,
        fold_names: Sequence[str] | None = None,
    ) -> None:
        if not networks:
            raise ValueError("Predictor needs at least one network")
        self.device = resolve_device(device)
        self.networks = [net.to(self.device).eval() for net in networks]
        self.plans = plans
        self.inference_cfg = inference_cfg or InferenceConfig()
        self.tta = bool(tta)
        self.postprocessing = postprocessing
        self.labels = dict(labels or plans.labels)
        self.fold_names = list(fold_names or [f"net_{i}" for i in range(len(networks))])
        self.transforms = inference_transforms(plans)
        self._invert = Invertd(keys="pred", transform=self.transforms, orig_keys="image",
                               nearest_interp=False, to_tensor=True)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        folds: str | int | Sequence[str | int] | None = None,
        device: str | torch.device = "auto",
        tta: bool | None = None,
    ) -> Predictor:
        """Load ``config.yaml``, ``plans.json``, ``dataset.json`` and the folds' checkpoints.

        Args:
            model_dir: folder written by ``uumamba train`` (see docs/architecture.md).
            folds: folds to ensemble (see :func:`find_fold_checkpoints`); None: all present.
            device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
            tta: mirroring TTA; None uses the model's ``inference.tta``.

        Raises:
            UserError: the folder, ``config.yaml`` or ``plans.json`` is missing, a requested
                fold has no checkpoint, or a checkpoint does not fit the network the config
                describes.
            DataError / ConfigError: an unreadable checkpoint, config or plan.
        """
        from uumamba.config import load_config
        from uumamba.engine.checkpoint import load_checkpoint
        from uumamba.evaluation.evaluate import labels_from_dataset_json
        from uumamba.nn import build_network

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise UserError(f"model folder {model_dir} not found")
        for name in ("config.yaml", "plans.json"):
            if not (model_dir / name).is_file():
                raise UserError(f"{model_dir}: {name} missing; is this a model folder written "
                                "by 'uumamba train'?")
        cfg: Config = load_config(model_dir / "config.yaml")
        plans = Plans.load(model_dir / "plans.json")
        dataset_json = model_dir / "dataset.json"
        labels = (labels_from_dataset_json(dataset_json) if dataset_json.is_file() else None) or plans.labels
        checkpoints = find_fold_checkpoints(model_dir, folds)
        dev = resolve_device(device)
        networks = []
        for path in checkpoints.values():
            state = load_checkpoint(path, map_location="cpu")
            fold_cfg = cfg
            if isinstance(state.get("config"), dict):
                fold_cfg = config_from_dict(state["config"], f"{path} (config)")
            net = build_network(fold_cfg.model, plans)
            try:
                net.load_state_dict(state["model"])
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise UserError(f"{path}: weights do not fit the network of {model_dir / 'config.yaml'}"
                                f" ({first})") from None
            networks.append(net)
        postprocessing = load_postprocessing(model_dir, [path.parent for path in checkpoints.values()])
        return cls(networks, plans, cfg.inference, device=dev,
                   tta=cfg.inference.tta if tta is None else tta, postprocessing=postprocessing,
                   labels=labels, fold_names=list(checkpoints))

    @property
    def scan_backend(self) -> str | None:
        """Selective-scan backend the networks use on this device (None if unknown)."""
        try:
            from uumamba.nn import resolve_scan_backend

            return resolve_scan_backend("auto", self.device)
        except Exception:  # pragma: no cover - informative only
            return None

    # ------------------------------------------------------------------------------------
    def predict_file(
        self,
        path: str | Path | Sequence[str | Path],
        split_4d: bool = False,
        tta: bool | None = None,
        probabilities: bool = False,
        entropy: bool = False,
    ) -> Prediction | list[Prediction]:
        """Segment one image file (or one file per input channel).

        Args:
            path: image file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` ...), or a list with
                one file per channel in channel order (all on one voxel grid).
            split_4d: segment each frame of a 4D image; then a list of per-frame predictions
                is returned (frame t = ``[..., t]`` of the input).
            tta: mirroring TTA for this call (None: the predictor's default).
            probabilities / entropy: also return the softmax / its entropy (memory: C + 1
                float32 volumes of the input's size).

        Returns:
            A :class:`Prediction` in the input's voxel grid (a list of them for a split 4D
            input).

        Raises:
            UserError: a 4D input without ``split_4d`` (the message names the file and the
                number of frames), a channel count that differs from the plan, or channels on
                different grids.
            DataError: a missing, unreadable or truncated file.
        """
        paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
        if len(paths) != self.plans.num_input_channels:
            raise UserError(f"{paths[0]}: the model takes {self.plans.num_input_channels} input "
                            f"channel(s), got {len(paths)} file(s)")
        geometries = [read_geometry(p) for p in paths]
        geometry = geometries[0]
        for p, g in zip(paths[1:], geometries[1:], strict=True):
            if g.mismatch(geometry, rtol=1e-3, atol=1e-3):
                raise UserError(f"{p}: channel grid differs from {paths[0]} "
                                f"({', '.join(g.mismatch(geometry, rtol=1e-3, atol=1e-3))})")
        spatial_ndim = len(geometry.shape)
        if spatial_ndim == 4:
            if not split_4d:
                raise UserError(
                    f"{paths[0]}: 4D image of shape {geometry.shape} ({geometry.shape[3]} frames) "
                    "refused: the model segments 3D volumes; pass --split-4d to segment every "
                    "frame, or extract the frame you want"
                )
            return self._predict_frames(paths, tta, probabilities, entropy)
        if spatial_ndim != 3:
            raise UserError(f"{paths[0]}: expected a 3D volume, got shape {geometry.shape}")
        return self._predict_volume(paths, geometry, tta, probabilities, entropy)

    def _predict_frames(self, paths: list[Path], tta: bool | None, probabilities: bool,
                        entropy: bool) -> list[Prediction]:
        """Write each frame to a temporary 3D NIfTI with the input's spatial geometry; predict."""
        arrays = [read_image(p)[0] for p in paths]
        n_frames = arrays[0].shape[3]
        out = []
        with tempfile.TemporaryDirectory(prefix="uumamba_frames_") as tmp:
            for t in range(n_frames):
                frame_paths = []
                for c, (p, arr) in enumerate(zip(paths, arrays, strict=True)):
                    frame_path = Path(tmp) / f"frame{t:03d}_{c:04d}.nii.gz"
                    write_image(arr[..., t], p, frame_path, dtype=np.float32, format="nii.gz")
                    frame_paths.append(frame_path)
                geometry = read_geometry(frame_paths[0])
                out.append(self._predict_volume(frame_paths, geometry, tta, probabilities, entropy))
        return out

    def _predict_volume(self, paths: list[Path], geometry: Geometry, tta: bool | None,
                        want_probabilities: bool, want_entropy: bool) -> Prediction:
        use_tta = self.tta if tta is None else bool(tta)
        try:
            data = self.transforms({"image": [str(p) for p in paths]})
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
            raise DataError(f"{paths[0]}: cannot read the image ({_root_cause(exc)}); "
                            "is the file corrupt or truncated?") from None
        image = data["image"]
        if not bool(torch.isfinite(image.as_tensor() if hasattr(image, "as_tensor") else image).all()):
            raise DataError(f"{paths[0]}: the image contains NaN or infinite voxel values; "
                            "fix or mask them before segmenting (see `uumamba check-data`)")
        probs = self.ensemble_probabilities(image[None], tta=use_tta)
        probs_orig = self.invert(probs[0], data)
        expected = tuple(geometry.shape[:3])
        if tuple(probs_orig.shape[1:]) != expected:
            raise RuntimeError(f"{paths[0]}: inverted prediction has shape {tuple(probs_orig.shape[1:])}, "
                               f"the input {expected}")
        mask = np.argmax(probs_orig, axis=0).astype(np.uint8)
        mask = apply_postprocessing(mask, self.postprocessing)
        counts, volumes = label_volumes(mask, geometry.spacing, self.labels)
        return Prediction(
            mask=mask,
            probabilities=probs_orig if want_probabilities else None,
            entropy=predictive_entropy(probs_orig) if want_entropy else None,
            geometry=Geometry(expected, geometry.spacing, geometry.origin, geometry.direction),
            volumes_ml=volumes,
            voxel_counts=counts,
        )

    def ensemble_probabilities(self, image: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Mean softmax of all folds over a preprocessed (1, C, X, Y, Z) volume.

        Returns (1, K, X, Y, Z) float32 on the CPU.
        """
        use_tta = self.tta if tta is None else bool(tta)
        total = None
        for net in self.networks:
            probs = sliding_window_probabilities(net, image, self.plans, self.inference_cfg,
                                                 tta=use_tta).cpu()
            total = probs if total is None else total + probs
        return total / len(self.networks)

    def invert(self, probs: torch.Tensor, data: dict[str, Any]) -> np.ndarray:
        """Map (K, X, Y, Z) probabilities on the preprocessed grid back to the input's grid.

        Args:
            probs: softmax on the grid of ``data["image"]`` (the output of
                ``self.transforms``).
            data: that transforms output (its ``image`` carries the applied operations).

        Returns:
            (K, x, y, z) float32 in the input's voxel grid, renormalised to sum 1 per voxel.
        """
        with torch.no_grad():
            pred = MetaTensor(probs.detach().clone().float().cpu())
            inverted = self._invert({**data, "pred": pred})["pred"]
        arr = np.asarray(inverted.as_tensor() if hasattr(inverted, "as_tensor") else inverted,
                         dtype=np.float32)
        arr = np.clip(arr, 0.0, None)
        return arr / np.maximum(arr.sum(axis=0, keepdims=True), 1e-8)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain (MONAI's transform wrappers hide the reader's)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------
# uumamba predict


def _input_cases(input_path: Path, n_channels: int) -> list[tuple[str, list[Path]]]:
    """Cases in a file or folder: (case id, one file per channel).

    nnU-Net naming ``CASE_0000`` (``_0001`` ...) groups channels; the suffix is dropped from
    the case id (so ``imagesTs/CASE_0000.nii.gz`` gives ``CASE``). Hidden files and Slicer
    ``.seg.nrrd`` files are skipped.
    """
    if input_path.is_file():
        files = [input_path]
    elif input_path.is_dir():
        files = sorted(p for p in input_path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and split_suffix(p)[1] in IMAGE_SUFFIXES
                       and not split_suffix(p)[0].endswith(".seg"))
        if not files:
            raise UserError(f"{input_path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    else:
        raise UserError(f"--input {input_path}: no such file or folder")
    groups: dict[str, dict[int, Path]] = {}
    for f in files:
        stem = split_suffix(f)[0]
        m = _CHANNEL_TAG.match(stem)
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        if not m and n_channels > 1:
            raise UserError(f"{f}: the model takes {n_channels} channels; name the files "
                            "CASE_0000, CASE_0001, ... (nnU-Net convention)")
        previous = groups.setdefault(case, {}).get(channel)
        if previous is not None:
            raise UserError(f"{f} and {previous} would both be written as case '{case}'; "
                            "rename one of them")
        groups[case][channel] = f
    return [(case, [chans[c] for c in sorted(chans)]) for case, chans in sorted(groups.items())]


def _check_output_dir(input_path: Path, output_dir: Path) -> None:
    """Refuse an output folder that is a file or the input's own folder (masks named like
    their images would overwrite the scans).

    Raises:
        UserError: naming ``--output`` and the reason.
    """
    check_output_folder(output_dir)
    input_dir = input_path if input_path.is_dir() else input_path.parent
    if output_dir.exists() and output_dir.resolve() == input_dir.resolve():
        raise UserError(f"--output {output_dir} is the input folder: masks would overwrite the "
                        "input images; choose another folder")


def _mask_suffix(reference: Path, out_format: str | None) -> tuple[str, str | None]:
    """(file ending of the mask, io format name or None for seg.nrrd)."""
    fmt = out_format or format_of(reference)
    if fmt not in OUTPUT_FORMATS:
        raise UserError(f"--format {out_format}: expected one of {', '.join(OUTPUT_FORMATS)}")
    return ("." + fmt, None) if fmt == "seg.nrrd" else ("." + fmt, fmt)


def write_prediction(prediction: Prediction, case: str, reference: Path, output_dir: Path,
                     labels: dict[int, str], out_format: str | None = None,
                     extra: dict[str, Any] | None = None) -> list[Path]:
    """Write a prediction's files into ``output_dir`` (all atomically); return their paths.

    ``CASE.<ext>`` (mask; input's format unless ``out_format``; ``seg.nrrd`` via the Slicer
    exporter), ``CASE_probabilities.nii.gz`` (x, y, z, C float32; when present),
    ``CASE_entropy.<ext>`` (float32 nats; NRRD when the mask is ``seg.nrrd``; when present),
    ``CASE_volumes.json`` (per-label value, voxel count and mL, spacing and voxel volume).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    suffix, fmt = _mask_suffix(reference, out_format)
    written = []
    mask_path = output_dir / f"{case}{suffix}"
    if fmt is None:
        from uumamba.export.slicer import write_seg_nrrd

        written.append(write_seg_nrrd(prediction.mask, reference, mask_path, labels))
    else:
        written.append(write_mask(prediction.mask, reference, mask_path, format=fmt))
    if prediction.probabilities is not None:
        written.append(write_image(np.moveaxis(prediction.probabilities, 0, -1), reference,
                                   output_dir / f"{case}_probabilities.nii.gz", format="nii.gz"))
    if prediction.entropy is not None:
        efmt = fmt or "nrrd"
        written.append(write_image(prediction.entropy, reference,
                                   output_dir / f"{case}_entropy.{efmt}", format=efmt))
    spacing = [float(s) for s in prediction.geometry.spacing]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    names_to_value = {n: v for v, n in labels.items()}
    info = {
        "case": case,
        "input": str(reference),
        "mask": str(mask_path),
        "spacing_mm": spacing,
        "voxel_volume_ml": voxel_ml,
        "labels": {
            name: {"value": int(names_to_value[name]), "voxels": prediction.voxel_counts[name],
                   "volume_ml": prediction.volumes_ml[name]}
            for name in prediction.volumes_ml
        },
        **(extra or {}),
    }
    json_path = output_dir / f"{case}_volumes.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    written.append(json_path)
    return written


def predict_from_cli(model_dir: Path, input_path: Path, output_dir: Path, folds: str | None = None,
                     tta: bool = False, out_format: str | None = None, probabilities: bool = False,
                     uncertainty: bool = False, split_4d: bool = False, device: str = "auto") -> list[Path]:
    """``uumamba predict``: segment a file or every image in a folder.

    ``tta=False`` means "as the model's config says" (``inference.tta``); ``True`` forces
    mirroring. A folder shows a progress bar; a file that fails (unreadable, 4D without
    ``--split-4d``, wrong channels ...) is reported in one line and skipped, the others are
    written; at the end a :class:`UserError` summarises the failures (exit status 1). A 4D
    input with ``split_4d`` gives one set of outputs per frame, ``CASE_frameNN``.

    Returns:
        Paths written.

    Raises:
        UserError: bad model folder / input / format, or at least one input failed.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if out_format is not None and out_format.lstrip(".") not in OUTPUT_FORMATS:
        raise UserError(f"--format {out_format}: expected one of {', '.join(OUTPUT_FORMATS)}")
    out_format = out_format.lstrip(".") if out_format else None
    _check_output_dir(Path(input_path), Path(output_dir))
    predictor = Predictor.from_model_dir(model_dir, folds=folds, device=device,
                                         tta=True if tta else None)
    cases = _input_cases(Path(input_path), predictor.plans.num_input_channels)
    console = Console(stderr=True)
    extra = {"model": str(model_dir), "folds": predictor.fold_names,
             "tta": predictor.tta, "device": str(predictor.device)}
    written: list[Path] = []
    failures: list[str] = []

    def run(case: str, files: list[Path]) -> None:
        result = predictor.predict_file(files, split_4d=split_4d, probabilities=probabilities,
                                        entropy=uncertainty)
        items = ([(case, result)] if isinstance(result, Prediction)
                 else [(f"{case}_frame{t:02d}", r) for t, r in enumerate(result)])
        for name, pred in items:
            written.extend(write_prediction(pred, name, files[0], Path(output_dir),
                                            predictor.labels, out_format, extra))

    if len(cases) == 1 and Path(input_path).is_file():
        run(*cases[0])
        return written
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("predicting", total=len(cases))
        for case, files in cases:
            progress.update(task, description=f"predicting {case}")
            try:
                run(case, files)
            except (UserError, ValueError, RuntimeError, OSError) as exc:
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                # messages from the readers already name the file: do not repeat it
                failures.append(message if files[0].name in message else f"{files[0].name}: {message}")
                progress.console.print(f"[red]skipped[/red] {files[0]}: {message}")
            progress.advance(task)
    if failures:
        done = (f"the other {len(cases) - len(failures)} were written to {output_dir}"
                if len(failures) < len(cases) else "nothing was written")
        raise UserError(f"{len(failures)} of {len(cases)} input(s) failed ({done}): "
                        + "; ".join(failures))
    console.print(f"wrote {len(cases)} prediction(s) to {output_dir}")
    return written
