"""Segment images with a trained model folder; masks come back in the input's own geometry.

Flow of :meth:`Predictor.predict_file` (one 3D volume, or one file per input channel):

1. the header is read first: a 4D image is refused with the reason (or split into 3D
   frames when asked);
2. ``inference_transforms(plans)`` (the training preprocessing without cropping: load,
   channel first, reorient to ``plans.axcodes``, resample to ``plans.resampling_spacing``
   (2D models keep the input's slice spacing), normalise) gives the network's input grid;
3. every fold's network predicts softmax probabilities with Gaussian-weighted sliding windows
   (:func:`uumamba.inference.sliding.accumulate_window_probabilities`, optional mirroring
   TTA), all folds adding into one (K, X, Y, Z) float32 buffer: the fold ensemble is the mean
   of the softmax;
4. the probabilities are mapped back to the input's voxel grid with MONAI ``Invertd`` using
   the transforms' own record (inverse resampling with *linear* interpolation of the
   probabilities, inverse reorientation); the mask is their argmax. This is nnU-Net's order
   (resample probabilities, then argmax), which gives smoother boundaries than resampling a
   label map with nearest neighbour. Where the target spacing equals the input's, the
   inversion is exact voxel for voxel (tests check this for RAS, LPS, oblique and qform !=
   sform NIfTI inputs);
   (before the network runs, :mod:`uumamba.inference.plausibility` flags inputs the model
   cannot have been trained for: blank, constant, noise, another modality, far-off spacing or
   field of view — per ``inference.input_check``);
5. largest-connected-component postprocessing where validation showed that it helps
   (:mod:`uumamba.inference.postprocess`, ``postprocessing.json``);
6. predictive entropy ``-sum_k p_k ln p_k`` (nats) of the averaged softmax and per-class
   volumes (voxel count x voxel volume in mm^3 / 1000 = mL).

Inputs smaller than the patch are padded by the sliding window and cropped back.

Memory (:meth:`Predictor.invert_argmax`): the mask is taken as the inversion goes — a running
maximum and the uint8 mask, both on the input grid — so the K probability volumes on the input
grid exist only when ``probabilities`` or ``entropy`` is asked for (then once, renormalised in
place). Plans in voxel axes (all plans since 0.2: a permutation, then an axis-aligned
resampling) are inverted separably, slab by slab of the output (:data:`INVERT_SLAB_BYTES`),
equal to MONAI's inverse resampling to float32 rounding; other records go through
``Invertd``, a few classes per call (:data:`INVERT_CHUNK_BYTES`). MONAI's inverse resamples in
float64 with a float64 sampling grid (about 24 bytes per output voxel per call plus float64
copies), which is what made a 512 x 512 x 300 CT with 4 classes peak at 5.6 GB. The argmax is
taken of the clipped inverted probabilities before renormalisation (dividing every class of a
voxel by the same sum cannot change which is largest, except for two classes within one
float32 rounding step of each other: a near-tie, where either answer is the argmax); the
probabilities and entropy written are renormalised as before.

Timing: :attr:`Prediction.timings` holds the seconds of each stage (``read``, ``preprocess``,
``network``, ``invert``, ``postprocess``); the writer adds ``write`` and records them in
``CASE_volumes.json`` (``timings_s``), and ``uumamba predict`` prints one line per case.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from uumamba.config import InferenceConfig, config_from_dict
from uumamba.data.io import Geometry, read_geometry, read_image, write_image
from uumamba.data.plan import Plans
from uumamba.data.transforms import inference_transforms
from uumamba.data.untrusted import check_local_inputs
from uumamba.device import resolve_device
from uumamba.errors import DataError, UserError, escape_quoted, printable
from uumamba.evaluation.metrics import label_volumes
from uumamba.inference.plausibility import assess_input
from uumamba.inference.postprocess import apply_postprocessing
from uumamba.inference.sliding import accumulate_window_probabilities
from uumamba.model_folder import ModelFolder, WeightsDigest
from uumamba.model_folder.checkpoints import read_checkpoint
from uumamba.utils import plain_tensor

log = logging.getLogger(__name__)

#: Decimals of the reported volumes (mL): 0.01 mL is far below one voxel of any clinical scan
#: that matters for a volume, and ``41.471999999999994`` helps no reader.
VOLUME_DECIMALS = 2

#: Output bytes (float32, input grid) of one inversion call: classes are inverted this much at
#: a time (at least one class per call); MONAI's resampling grid adds 12 bytes per output voxel
#: to each call.
INVERT_CHUNK_BYTES = 256 * 2**20

#: Bytes of one output slab (all classes, float32) of the axis-aligned inversion: small enough
#: that its temporaries come and go without growing the heap (16 MB slabs measured 6x the
#: peak of 4 MB ones).
INVERT_SLAB_BYTES = 4 * 2**20


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
        volumes_ml: foreground label name -> volume in mL (voxels x voxel volume / 1000),
            rounded to :data:`VOLUME_DECIMALS` decimals (the sum's float noise removed).
        voxel_counts: foreground label name -> voxel count.
        warnings: reasons why the model cannot have been trained for this input
            (:mod:`uumamba.inference.plausibility`; empty when none or when
            ``inference.input_check`` is ``off``).
        timings: seconds per stage: ``read`` (the file), ``preprocess`` (reorient, resample,
            normalise, input check), ``network`` (sliding windows, blending, folds, TTA),
            ``invert`` (back to the input grid, with the argmax), ``postprocess`` (connected
            components, entropy, volumes).
    """

    mask: np.ndarray
    probabilities: np.ndarray | None
    entropy: np.ndarray | None
    geometry: Geometry
    volumes_ml: dict[str, float] = field(default_factory=dict)
    voxel_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def predictive_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Voxel-wise entropy ``-sum_k p_k ln p_k`` (nats) of (C, *spatial) probabilities.

    Computed in float64 one class at a time (two float64 volumes, never C of them).

    Returns (*spatial) float32; 0 where one class has probability 1, ln C for a uniform
    distribution.
    """
    total = np.zeros(probabilities.shape[1:], dtype=np.float64)
    for p in probabilities:
        p64 = p.astype(np.float64)
        total -= p64 * np.log(np.clip(p64, 1e-12, 1.0))
    return total.astype(np.float32)


class _Stages:
    """Seconds per named stage (``with stages("network"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def check_weights(weights: dict[str, torch.Tensor], model_cfg: Any, plans: Plans,
                  path: Path) -> None:
    """Refuse a checkpoint's ``model`` state that the network ``model_cfg`` describes does not
    fit (a missing, extra or differently shaped parameter), checked on a network built on the
    ``meta`` device, so that a crafted config (``features`` of 16384) allocates nothing; and
    weights that are not finite (NaN / Inf would segment every voxel as background).

    Raises:
        UserError: the weights do not fit the network (the first mismatch named).
        DataError: a floating-point parameter holds NaN or Inf (named).
    """
    from uumamba.nn import build_network

    with torch.device("meta"):
        expected = build_network(model_cfg, plans).state_dict()
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {printable(k)[:80]}" for k in weights if k not in expected]
    problems += [f"{k}: {tuple(weights[k].shape)} for {tuple(v.shape)}" for k, v in expected.items()
                 if k in weights and weights[k].shape != v.shape]
    problems += [f"{k}: {weights[k].dtype} for {v.dtype}" for k, v in expected.items()
                 if k in weights and weights[k].is_floating_point() != v.is_floating_point()]
    if problems:
        raise UserError(f"{path}: weights do not fit the network of its config "
                        f"({len(problems)} mismatches, first: {problems[0]})")
    for name, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise DataError(f"{path}: weights {name} hold NaN or Inf; the checkpoint is "
                            "corrupt or its training diverged")


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

    Attributes:
        scan_backend: the selective-scan backend the networks run on ``device`` (``cpu``,
            ``torch`` or ``cuda``; from each Mamba layer's configured ``model.scan_backend``
            and ``UUMAMBA_SCAN_BACKEND``), None for networks without Mamba layers. This is what
            the service reports in ``/readyz``.
        scan_backend_warning: why mamba-ssm's CUDA kernels are not used where they were
            wanted (``auto`` on a GPU, or mamba-ssm installed), else None; also logged as a
            warning (``uumamba predict`` shows it) and reported by ``/readyz``.
        weights: per fold, the file, SHA-256 and size of the bytes its weights were loaded
            from (what a DICOM SEG and ``clinical.json`` name; a checkpoint replaced on disk
            after loading does not change them); empty when built from networks directly.
        checkpoint_files: fold name -> the checkpoint file name of ``weights`` (``best``
            falls back to ``checkpoint_latest.pt`` where a fold has no best).

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
        self.weights: list[WeightsDigest] = []
        self.scan_backend, self.scan_backend_warning = self._resolve_scan_backend(
            self.networks, self.device)
        self.transforms = inference_transforms(
            plans, record_statistics=self.inference_cfg.input_check != "off")
        self._invert = Invertd(keys="pred", transform=self.transforms, orig_keys="image",
                               nearest_interp=False, to_tensor=True)

    @property
    def precision(self) -> str:
        """``bfloat16`` / ``float16`` / ``float32``: what the windows compute in on this
        device under ``inference_cfg.amp`` (:func:`~uumamba.inference.sliding.window_precision`);
        case records and ``/readyz`` report it."""
        from uumamba.inference.sliding import window_precision

        return window_precision(self.inference_cfg, self.device)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        folds: str | int | Sequence[str | int] | None = None,
        device: str | torch.device = "auto",
        tta: bool | None = None,
        checkpoint: str = "best",
    ) -> Predictor:
        """Load ``config.yaml``, ``plans.json``, ``dataset.json`` and the folds' checkpoints.

        Args:
            model_dir: folder written by ``uumamba train`` (see docs/architecture.md).
            folds: folds to ensemble (see :meth:`ModelFolder.fold_checkpoints
                <uumamba.model_folder.ModelFolder.fold_checkpoints>`); None: all present.
            device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
            tta: mirroring TTA; None uses the model's ``inference.tta``.
            checkpoint: ``best`` (``checkpoint_best.pt``, else the latest) or ``latest``
                (the final weights, ``checkpoint_latest.pt``: what a cross-validation scores,
                as ``checkpoint_best.pt`` was chosen on the validation cases).

        Raises:
            UserError: the folder, ``config.yaml`` or ``plans.json`` is missing, an unknown
                ``checkpoint``, a requested fold has no such checkpoint, or a checkpoint does
                not fit the network the config describes.
            DataError / ConfigError: an unreadable checkpoint, config or plan.
        """
        from uumamba.nn import build_network

        folder = ModelFolder(model_dir).require(folds, checkpoint)
        cfg = folder.load_config()
        plans = folder.load_plans()
        labels = folder.labels(plans)
        checkpoints = folder.fold_checkpoints(folds, checkpoint)
        dev = resolve_device(device)
        networks, weights = [], []
        for fold, path in checkpoints.items():
            state, sha256, size = read_checkpoint(path, map_location="cpu")
            weights.append(WeightsDigest(fold, path.relative_to(folder.root).as_posix(),
                                         sha256, size))
            fold_cfg = cfg
            if isinstance(state.get("config"), dict):
                fold_cfg = config_from_dict(state["config"], f"{path} (config)")
            check_weights(state["model"], fold_cfg.model, plans, path)
            net = build_network(fold_cfg.model, plans)
            net.load_state_dict(state["model"])
            networks.append(net)
        postprocessing = folder.postprocessing([path.parent for path in checkpoints.values()])
        predictor = cls(networks, plans, cfg.inference, device=dev,
                        tta=cfg.inference.tta if tta is None else tta,
                        postprocessing=postprocessing, labels=labels,
                        fold_names=list(checkpoints))
        predictor.weights = weights
        return predictor

    @property
    def checkpoint_files(self) -> dict[str, str]:
        """Fold name -> the checkpoint file its weights came from (from :attr:`weights`)."""
        return {d.fold: d.file.rsplit("/", 1)[-1] for d in self.weights}

    @staticmethod
    def _resolve_scan_backend(networks: Sequence[torch.nn.Module], device: torch.device
                              ) -> tuple[str | None, str | None]:
        """The selective-scan backend the networks' Mamba layers run on ``device`` (each
        layer's configured ``scan_backend`` = the model's ``model.scan_backend``, resolved
        as its forward resolves it, mamba-ssm's kernels probed on a GPU) and the fallback
        warning, if any (:func:`uumamba.nn.network_scan_backend`, which also logs it);
        (None, None) when the networks have no Mamba layer.

        Raises:
            UserError: a configured backend cannot run on ``device``, or the model's
                ``d_state`` / ``d_conv`` are outside the CUDA kernels' limits there (why).
        """
        from uumamba.nn import network_scan_backend

        try:
            choice = network_scan_backend(networks, device)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise UserError(f"model.scan_backend: {exc}") from None
        return (None, None) if choice is None else (choice.backend, choice.warning)

    # ------------------------------------------------------------------------------------
    def predict_file(
        self,
        path: str | Path | Sequence[str | Path],
        split_4d: bool = False,
        tta: bool | None = None,
        probabilities: bool = False,
        entropy: bool = False,
        cancel: Any = None,
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
            cancel: optional flag (``is_set() -> bool``) checked between window batches;
                once set, :class:`uumamba.inference.sliding.InferenceCancelled` is raised.

        Returns:
            A :class:`Prediction` in the input's voxel grid (a list of them for a split 4D
            input).

        Raises:
            UserError: a 4D input without ``split_4d`` (the message names the file and the
                number of frames), a channel count that differs from the plan, or channels on
                different grids.
            DataError: a missing, unreadable or truncated file, or a header refused by
                :func:`uumamba.data.untrusted.check_local_inputs` (too large, implausible
                spacing, a data file outside the header's folder).
        """
        check_local_inputs(path, self.plans.resampling_spacing)
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
            return self._predict_frames(paths, tta, probabilities, entropy, cancel)
        if spatial_ndim != 3:
            raise UserError(f"{paths[0]}: expected a 3D volume, got shape {geometry.shape}")
        return self._predict_volume(paths, geometry, tta, probabilities, entropy, cancel)

    def _predict_frames(self, paths: list[Path], tta: bool | None, probabilities: bool,
                        entropy: bool, cancel: Any = None) -> list[Prediction]:
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
                # messages name the input and the frame (as its outputs: CASE_frameNN), never
                # the temporary copy
                out.append(self._predict_volume(frame_paths, geometry, tta, probabilities, entropy,
                                                cancel, where=f"{paths[0]} frame {t:02d}"))
        return out

    def _predict_volume(self, paths: list[Path], geometry: Geometry, tta: bool | None,
                        want_probabilities: bool, want_entropy: bool, cancel: Any = None,
                        where: str | None = None) -> Prediction:
        """One 3D volume (one file per channel); ``where`` names it in messages (default: the
        first file)."""
        where = str(paths[0]) if where is None else where
        use_tta = self.tta if tta is None else bool(tta)
        stages = _Stages()
        try:
            with stages("read"):  # the chain's first transform is the reader
                data = self.transforms({"image": [str(p) for p in paths]}, end=1)
            with stages("preprocess"):
                data = self.transforms(data, start=1)
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
            raise DataError(f"{where}: cannot read the image ({_root_cause(exc, paths)}); "
                            "is the file corrupt or truncated?") from None
        with stages("preprocess"):
            warnings = self._check_input(where, data.pop("image_statistics", []), geometry)
            image = data["image"]
            finite = bool(torch.isfinite(plain_tensor(image)).all())
        if not finite:
            raise DataError(f"{where}: the image contains NaN or infinite voxel values; "
                            "fix or mask them before segmenting (see `uumamba check-data`)")
        with stages("network"):
            probs = self.ensemble_probabilities(image[None], tta=use_tta, cancel=cancel)
        expected = tuple(geometry.shape[:3])
        with stages("invert"):
            mask, probs_orig = self.invert_argmax(probs[0], data,
                                                  keep_probabilities=want_probabilities
                                                  or want_entropy)
            del probs
        if tuple(mask.shape) != expected:
            raise RuntimeError(f"{where}: inverted prediction has shape {tuple(mask.shape)}, "
                               f"the input {expected}")
        with stages("postprocess"):
            mask = apply_postprocessing(mask, self.postprocessing)
            counts, volumes = label_volumes(mask, geometry.spacing, self.labels)
            entropy = predictive_entropy(probs_orig) if want_entropy else None
        return Prediction(
            mask=mask,
            probabilities=probs_orig if want_probabilities else None,
            entropy=entropy,
            geometry=Geometry(expected, geometry.spacing, geometry.origin, geometry.direction),
            volumes_ml={name: round(ml, VOLUME_DECIMALS) for name, ml in volumes.items()},
            voxel_counts=counts,
            warnings=warnings,
            timings={k: round(v, 3) for k, v in stages.seconds.items()},
        )

    def _check_input(self, where: str, statistics: list[dict[str, Any]], geometry: Geometry
                     ) -> list[str]:
        """Apply ``inference.input_check`` (:mod:`uumamba.inference.plausibility`) to the
        input ``where`` (its path, or ``PATH frame NN``).

        Returns:
            The reasons (logged as warnings) for ``warn``; [] for ``off`` or a plausible input.

        Raises:
            DataError: ``refuse`` and at least one reason (all listed, the file named).
        """
        if self.inference_cfg.input_check == "off":
            return []
        reasons = assess_input(statistics, geometry, self.plans)
        if reasons and self.inference_cfg.input_check == "refuse":
            raise DataError(f"{where}: refused (inference.input_check = refuse): "
                            + "; ".join(reasons))
        for reason in reasons:
            log.warning(f"warning: {Path(where).name}: {reason}; the mask is unlikely to be "
                        "meaningful")
        return reasons

    def ensemble_probabilities(self, image: torch.Tensor, tta: bool | None = None,
                               cancel: Any = None) -> torch.Tensor:
        """Mean softmax of all folds over a preprocessed (1, C, X, Y, Z) volume.

        Every fold adds ``1 / n_folds`` of its softmax into one buffer
        (:func:`~uumamba.inference.sliding.accumulate_window_probabilities`). ``cancel``
        (``is_set() -> bool``) is checked between window batches.

        Returns (1, K, X, Y, Z) float32 on the CPU.
        """
        use_tta = self.tta if tta is None else bool(tta)
        total = None
        for net in self.networks:
            total = accumulate_window_probabilities(net, image, self.plans, self.inference_cfg,
                                                    out=total, scale=1.0 / len(self.networks),
                                                    tta=use_tta, cancel=cancel)
        return total.cpu()

    def _invert_classes(self, probs: torch.Tensor, data: dict[str, Any]) -> np.ndarray:
        """(c, x, y, z) float32 in the input's grid: ``Invertd`` of these classes, clipped at 0
        (linear interpolation of probabilities is never negative but for rounding)."""
        with torch.no_grad():
            pred = MetaTensor(probs.detach().float().cpu().contiguous())
            inverted = self._invert({**data, "pred": pred})["pred"]
        arr = plain_tensor(inverted).numpy()
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return np.maximum(arr, 0.0, out=arr if arr.flags.writeable else None)

    def _classes_per_call(self, n_classes: int, data: dict[str, Any]) -> int:
        """Classes per ``Invertd`` call: :data:`INVERT_CHUNK_BYTES` of float32 output."""
        voxels = max(1, int(np.prod(_input_shape(data))))
        return int(min(n_classes, max(1, INVERT_CHUNK_BYTES // (4 * voxels))))

    def invert_argmax(self, probs: torch.Tensor, data: dict[str, Any],
                      keep_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The mask (and, if asked, the probabilities) in the input's grid, without K copies.

        Plans in voxel axes (``plans.axcodes == "voxel"``: a permutation, then an axis-aligned
        resampling) are inverted by :class:`_AxisAlignedInverse`: separable linear
        interpolation, slab by slab of the output, equal to MONAI's inverse resampling to
        float32 rounding (~1e-7) and without its float64 grid (24 bytes per output voxel) and
        float64 copies. Other records (RAS plans of 0.1) go through MONAI ``Invertd``, a few
        classes per call (:data:`INVERT_CHUNK_BYTES`).

        Args:
            probs: (K, X, Y, Z) softmax on the grid of ``data["image"]``.
            data: the transforms' output (its ``image`` carries the applied operations).
            keep_probabilities: also return the (K, x, y, z) float32 probabilities,
                renormalised to sum 1 per voxel (as :meth:`invert`).

        Returns:
            ``(mask, probabilities or None)``: the (x, y, z) uint8 argmax of the inverted
            (clipped) probabilities — the first class on exact ties, as ``np.argmax`` — and
            the probabilities. Without ``keep_probabilities`` only the running maximum and
            the mask are kept on the input grid (see the module docstring).
        """
        n_classes = int(probs.shape[0])
        if n_classes > 256:
            raise ValueError(f"{n_classes} classes do not fit a uint8 mask")
        probs = plain_tensor(probs).detach().float().cpu()
        fast = _AxisAlignedInverse.from_data(data)
        argmax = _RunningArgmax(n_classes, keep_probabilities)
        if fast is not None:
            for rows, k, p in fast.classes(probs):
                argmax.add(k, p, fast, rows)
            return argmax.result()
        step = self._classes_per_call(n_classes, data)
        for start in range(0, n_classes, step):
            part = self._invert_classes(probs[start:start + step], data)
            for j, p in enumerate(part):
                argmax.add(start + j, p, None, slice(None))
            del part
        return argmax.result()

    def invert(self, probs: torch.Tensor, data: dict[str, Any]) -> np.ndarray:
        """Map (K, X, Y, Z) probabilities on the preprocessed grid back to the input's grid.

        Args:
            probs: softmax on the grid of ``data["image"]`` (the output of
                ``self.transforms``).
            data: that transforms output (its ``image`` carries the applied operations).

        Returns:
            (K, x, y, z) float32 in the input's voxel grid, renormalised to sum 1 per voxel
            (:meth:`invert_argmax` also gives the mask without keeping all of them).
        """
        return self.invert_argmax(probs, data, keep_probabilities=True)[1]


class _RunningArgmax:
    """Argmax over classes added one at a time (slab by slab or whole), plus optionally the
    probabilities: a float32 running maximum and a uint8 mask; strict ``>`` keeps the first
    class on exact ties (``np.argmax``'s rule)."""

    def __init__(self, n_classes: int, keep: bool) -> None:
        self.n_classes = n_classes
        self.keep = keep
        self.best: np.ndarray | None = None
        self.mask: np.ndarray | None = None
        self.kept: np.ndarray | None = None

    def _allocate(self, shape: tuple[int, ...]) -> None:
        self.best = np.empty(shape, dtype=np.float32)
        self.mask = np.zeros(shape, dtype=np.uint8)
        if self.keep:
            self.kept = np.empty((self.n_classes, *shape), dtype=np.float32)

    def add(self, k: int, p: np.ndarray, grid: _AxisAlignedInverse | None, rows: slice) -> None:
        """Class ``k``'s clipped probabilities ``p`` on rows ``rows`` of axis 0 of ``grid``'s
        oriented (plan-axes) grid (None: ``p`` is a whole volume on the input grid)."""
        if self.best is None:
            self._allocate(tuple(grid.input_shape if grid is not None else p.shape))

        def part(array: np.ndarray) -> np.ndarray:
            return (grid.oriented_view(array) if grid is not None else array)[rows]

        best, mask = part(self.best), part(self.mask)
        if k == 0:
            best[...] = p
        else:
            larger = np.greater(p, best)
            np.copyto(mask, np.uint8(k), where=larger)
            np.maximum(best, p, out=best)
        if self.kept is not None:
            part(self.kept[k])[...] = p

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(mask, renormalised probabilities or None)`` on the input grid."""
        self.best = None
        kept = self.kept
        if kept is not None:
            total = kept.sum(axis=0)
            np.maximum(total, 1e-8, out=total)
            kept /= total
        return self.mask, kept


class _AxisAlignedInverse:
    """The inverse of ``PlanAxes`` + an axis-aligned ``Spacingd`` (linear, border padding),
    done separably: along each axis, linear interpolation between the two neighbouring
    network-grid voxels at the source coordinate ``xform[d, d] * i + xform[d, 3]`` (clamped to
    the grid: border padding), which is what trilinear ``grid_sample`` computes; then the
    permutation back. Produced slab by slab along the first oriented axis, so no temporary is
    larger than :data:`INVERT_SLAB_BYTES`.

    Attributes:
        input_shape: the input's spatial shape (voxel axes as read).
        order: plan axis k = input axis ``order[k]``.
    """

    def __init__(self, xform: np.ndarray, oriented_shape: tuple[int, ...],
                 order: Sequence[int]) -> None:
        self.xform = xform
        self.oriented_shape = tuple(int(n) for n in oriented_shape)
        self.order = [int(o) for o in order]
        shape = [0, 0, 0]
        for k, axis in enumerate(self.order):
            shape[axis] = self.oriented_shape[k]
        self.input_shape = tuple(shape)

    def oriented_view(self, array: np.ndarray) -> np.ndarray:
        """The plan-axes view (no copy) of an array on the input grid (last 3 axes)."""
        lead = array.ndim - 3
        return array.transpose(*range(lead), *(lead + o for o in self.order))

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> _AxisAlignedInverse | None:
        """The inverse for this record, or None when it is not PlanAxes + an axis-aligned
        linear resampling with border padding (then ``Invertd`` is used)."""
        image = data.get("image")
        ops = getattr(image, "applied_operations", None) or []
        if len(ops) != 2 or ops[0].get("class") != "PlanAxes" \
                or ops[1].get("class") != "SpatialResample":
            return None
        info = ops[1].get("extra_info", {})
        if info.get("mode") != "bilinear" or info.get("padding_mode") != "border":
            return None
        try:
            net = np.asarray(plain_tensor(image.affine), dtype=np.float64)
            src = np.asarray(plain_tensor(info["src_affine"]), dtype=np.float64)
            xform = np.linalg.solve(net, src)
        except (KeyError, ValueError, np.linalg.LinAlgError):
            return None
        off = xform[:3, :3] - np.diag(np.diag(xform[:3, :3]))
        if np.abs(off).max() > 1e-6 or np.any(np.diag(xform[:3, :3]) <= 0):
            return None
        return cls(xform, tuple(ops[1]["orig_size"]), ops[0]["extra_info"]["order"])

    def _axis(self, d: int, n_out: slice | int, n_src: int) -> tuple[torch.Tensor, ...]:
        idx = np.arange(n_out.start, n_out.stop) if isinstance(n_out, slice) else np.arange(n_out)
        coords = np.clip(self.xform[d, d] * idx + self.xform[d, 3], 0.0, n_src - 1)
        i0 = np.minimum(np.floor(coords).astype(np.int64), n_src - 1)
        i1 = np.minimum(i0 + 1, n_src - 1)
        w = (coords - i0).astype(np.float32)
        return torch.as_tensor(i0), torch.as_tensor(i1), torch.as_tensor(w)

    @staticmethod
    def _lerp(x: torch.Tensor, dim: int, axis: tuple[torch.Tensor, ...]) -> torch.Tensor:
        i0, i1, w = axis
        shape = [1] * x.ndim
        shape[dim] = -1
        return torch.lerp(x.index_select(dim, i0), x.index_select(dim, i1), w.reshape(shape))

    def classes(self, probs: torch.Tensor) -> Iterator[tuple[slice, int, np.ndarray]]:
        """Yield ``(rows, k, p)``: class ``k`` on oriented output rows ``rows``, (rows, y, z)
        float32, clipped at 0, slab after slab."""
        n_classes, *src = probs.shape
        out = self.oriented_shape
        row_bytes = 4 * n_classes * out[1] * max(out[2], src[2])
        step = max(1, min(out[0], INVERT_SLAB_BYTES // max(1, row_bytes)))
        ax1, ax2 = self._axis(1, out[1], src[1]), self._axis(2, out[2], src[2])
        with torch.inference_mode():
            for r0 in range(0, out[0], step):
                rows = slice(r0, min(r0 + step, out[0]))
                x = self._lerp(probs, 1, self._axis(0, rows, src[0]))
                x = self._lerp(self._lerp(x, 2, ax1), 3, ax2).clamp_(min=0.0).numpy()
                for k in range(n_classes):
                    yield rows, k, x[k]


def _input_shape(data: dict[str, Any]) -> tuple[int, ...]:
    """Spatial shape of the input grid ``Invertd`` maps back to: the first recorded
    operation's ``orig_size`` (the reorientation's, i.e. the loaded image's)."""
    ops = getattr(data["image"], "applied_operations", None) or []
    for op in ops:
        size = op.get("orig_size") if isinstance(op, dict) else None
        if size is not None:
            return tuple(int(n) for n in size)
    return tuple(int(n) for n in data["image"].shape[1:])


def _root_cause(exc: BaseException, paths: Sequence[Path] = ()) -> str:
    """The innermost exception of a chain (MONAI's transform wrappers hide the reader's), its
    first line; a line break inside one of ``paths``, where the message quotes it, is escaped
    first."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = escape_quoted(str(exc).strip(), *paths)
    text = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
