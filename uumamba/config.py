"""The one typed configuration schema of uumamba, loaded from YAML.

A configuration file (``configs/*.yaml``) has the sections ``dataset``, ``plan``, ``model``,
``loss``, ``optim``, ``train`` and ``inference``; every key has a default, so a file only
states what differs. Unknown keys and values of the wrong type are errors that name the key
(:class:`uumamba.errors.ConfigError`). Code receives the section it needs, not the whole
config.

Overrides from the command line use dotted keys: ``--set optim.rho=0.1 --set train.epochs=5``;
the value is parsed as YAML (``[1, 2]``, ``true``, ``null`` work).
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from uumamba.errors import ConfigError
from uumamba.utils import atomic_path

#: Environment variable that overrides the CPU's bf16 detection (:func:`uumamba.device.
#: cpu_native_bf16`): ``0`` (float32 on every CPU) or ``1`` (bf16 autocast on any CPU, emulated
#: where there is neither AMX nor AVX512-BF16: for testing the bf16 path). The test suite sets ``0`` so that its
#: float32 expectations do not depend on the host CPU.
CPU_BF16_ENV = "UUMAMBA_CPU_BF16"


def cpu_bf16_override() -> bool | None:
    """:data:`CPU_BF16_ENV` read (no torch needed, so commands check it before loading
    anything): True for ``1``, False for ``0``, None when unset or empty.

    Raises:
        ConfigError: any other value (quoted, cut to 20 characters).
    """
    import os

    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if not forced:
        return None
    if forced not in ("0", "1"):
        from uumamba.errors import shown

        raise ConfigError(f"{CPU_BF16_ENV}={shown(forced)}: expected 0 (float32 on the CPU) or "
                          "1 (bf16 autocast on the CPU), or unset (bf16 where the CPU has AMX or AVX512-BF16)")
    return forced == "1"


def _amp_from_yaml_bool(v: Any) -> Any:
    """``amp: off`` / ``amp: on`` unquoted: YAML reads them as booleans; map them back to
    ``off`` / ``auto``."""
    if v is False:
        return "off"
    if v is True:
        return "auto"
    return v


class _Section(BaseModel):
    # allow_inf_nan=False: a crafted .inf / .nan (lr, rho, kl_weight, ...) would otherwise pass
    # the range checks and train nothing, every step skipped as non-finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: Longest ``--set`` value and config file accepted (characters / bytes): bounded before parsing.
MAX_OVERRIDE_CHARS = 10_000
MAX_CONFIG_BYTES = 1 << 20


class _PlainLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases (``&a`` / ``*a``): nested aliases expand
    exponentially (a 300-character value can stand for gigabytes), and no config needs them."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"anchors and aliases (&name, *name) are not allowed "
                                 f"(line {mark.line + 1}, column {mark.column + 1})")
        return super().compose_node(parent, index)


class _PlainDumper(yaml.SafeDumper):
    """Writes a repeated object out again instead of as an alias (``parse_yaml`` refuses
    aliases)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def parse_yaml(text: str) -> Any:
    """``text`` parsed as YAML by the safe loader, refusing anchors / aliases.

    Raises:
        yaml.YAMLError: not valid YAML, or an anchor / alias.
    """
    return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader subclass


class DatasetConfig(_Section):
    """What the data are.

    Attributes:
        layout: folder layout; ``auto`` detects nnU-Net v2 raw, MSD, ACDC, ImageCAS,
            AortaSeg24 or a plain ``images/`` + ``labels/`` folder.
        labels: label value -> name, background (0) included. ``None``: read from the
            dataset's ``dataset.json`` where it has one.
        modality: ``MRI`` (per-case z-score) or ``CT`` (percentile clip + global z-score).
        ignore_label: a label value that contributes to no loss term and no metric.
        split_4d: split 4D images into 3D frames instead of refusing them.
        spatial_tolerance: relative tolerance for image/label spacing, origin and direction
            agreement in the integrity check.
    """

    layout: Literal["auto", "nnunet", "msd", "acdc", "imagecas", "aortaseg24", "folder"] = "auto"
    labels: dict[int, str] | None = None
    modality: Literal["MRI", "CT"] = "MRI"
    ignore_label: int | None = None
    split_4d: bool = False
    spatial_tolerance: float = 1e-3


class PlanConfig(_Section):
    """Overrides of the automatic plan (``plans.json``); ``None`` keeps the planned value.

    Attributes:
        target_spacing: voxel spacing in mm per reoriented axis (``voxel``: in-plane, in-plane,
            slice axis; ``ras``: x, y, z).
        reorientation: ``voxel`` (default): each image's own voxel axes, the slice axis last —
            oblique and double-oblique short-axis series keep their slice axis whatever their
            direction; ``ras``: MONAI ``Orientationd("RAS")``, the 0.1 behaviour, which picks
            the wrong slice axis for slice normals tilted over 45°.
        patch_size: patch size in voxels (2 values for 2D models, 3 for 3D).
        batch_size: patches per iteration.
        normalization: ``zscore`` or ``ct``.
        memory_budget_mb: activation-memory budget used to choose patch and batch size.
        max_patch_size: upper bound per axis on the planned patch size (voxels).
        target: what the plan is sized for: ``gpu`` (nnU-Net's rules: the patch and batch
            that fit ``memory_budget_mb``), ``cpu`` (also sized to ``cpu_budget_s`` seconds
            per training iteration: 2D slice-wise for anisotropic data, a small 3D U-Mamba-Bot
            and patch otherwise, AdamW instead of SAM; only settings the configuration does
            not state are chosen, see :mod:`uumamba.data.plan`), or ``auto`` (default: by
            the training device, ``cpu`` on a CPU).
        cpu_budget_s: with the CPU plan, the seconds one training iteration may take on the
            reference machine (2 cores) by the planner's cost model
            (:mod:`uumamba.data.cost`); on an N times faster CPU, N times this gives the same
            wall time.
    """

    target_spacing: list[float] | None = None
    patch_size: list[int] | None = None
    batch_size: int | None = Field(None, ge=1)
    normalization: Literal["zscore", "ct"] | None = None
    memory_budget_mb: float = 2000.0
    max_patch_size: list[int] | None = None
    reorientation: Literal["voxel", "ras"] = "voxel"
    target: Literal["auto", "gpu", "cpu"] = "auto"
    cpu_budget_s: float = Field(3.0, gt=0, allow_inf_nan=False)


class ModelConfig(_Section):
    """Network settings (see :mod:`uumamba.nn.umamba`).

    Attributes:
        name: ``umamba_bot`` (Mamba at the bottleneck), ``umamba_enc`` (Mamba after every
            encoder stage) or ``unet`` (same residual U-Net, no Mamba: the baseline).
        spatial_dims: 2 (slice-wise) or 3.
        features: channels per stage; ``None``: min(base_features * 2^s, max_features).
        base_features / max_features: used when ``features`` is None.
        n_blocks_per_stage: residual blocks per encoder stage (one int for all, or a list).
        n_conv_per_stage_decoder: convolutions per decoder stage.
        deep_supervision: return one output per decoder level in training mode.
        d_state, d_conv, expand: Mamba state size, causal-conv width and expansion factor.
        scan_backend: ``auto`` | ``cuda`` | ``cpu`` | ``torch`` (env ``UUMAMBA_SCAN_BACKEND``
            overrides ``auto``). ``cuda`` (mamba-ssm's kernels) needs ``d_state <= 256`` and
            ``2 <= d_conv <= 4``: outside them it is a configuration error here; with ``auto``
            the same limits are checked when the network is built on a GPU (the device is
            not known here). ``cuda`` that cannot run on the device is an error, never a
            fallback.
    """

    name: Literal["umamba_bot", "umamba_enc", "unet"] = "umamba_bot"
    spatial_dims: Literal[2, 3] = 3
    features: list[int] | None = None
    base_features: int = 32
    max_features: int = 320
    n_blocks_per_stage: int | list[int] = 1
    n_conv_per_stage_decoder: int = 1
    deep_supervision: bool = True
    d_state: int = Field(16, ge=1)
    d_conv: int = Field(4, ge=1)
    expand: int = Field(2, ge=1)
    scan_backend: Literal["auto", "cuda", "cpu", "torch"] = "auto"

    @field_validator("scan_backend")
    @classmethod
    def _cuda_kernel_limits(cls, v: str, info: ValidationInfo) -> str:
        # d_state and d_conv are declared above, so they are validated (and in info.data) here.
        if v == "cuda":
            from uumamba.nn.ops.selective_scan import cuda_kernel_limit_errors

            errors = cuda_kernel_limit_errors(info.data.get("d_state"), info.data.get("d_conv"))
            if errors:
                raise ValueError("'cuda' runs mamba-ssm's kernels, which refuse this model: "
                                 + "; ".join(f"model.{e}" for e in errors)
                                 + " (use model.scan_backend torch for these settings)")
        return v


class LossConfig(_Section):
    """Training objective (see :mod:`uumamba.losses`).

    Attributes:
        name: ``uncertainty`` (learned sigma weights, the paper's loss), ``fixed`` (the same
            three terms, equal weights) or ``dice_ce`` (Dice + cross-entropy).
        focal_gamma: focal-loss focusing parameter.
        focal_alpha: optional per-class focal weights (length = number of classes).
        batch_dice: Dice over the whole batch (nnU-Net style) instead of per sample.
    """

    name: Literal["uncertainty", "fixed", "dice_ce"] = "uncertainty"
    focal_gamma: float = 2.0
    focal_alpha: list[float] | None = None
    batch_dice: bool = True


class OptimConfig(_Section):
    """Optimizer settings (see :mod:`uumamba.optim`).

    Attributes:
        name: ``sam`` | ``asam`` | ``looksam`` | ``rst`` | ``ema_kl`` (each wrapping
            ``base``) | ``sgd`` | ``adamw``; see :mod:`uumamba.optim`.
        base: base optimizer under the wrapping ones.
        lr: initial learning rate; momentum / nesterov for SGD; weight_decay (not applied
            to the loss's sigma parameters).
        rho: SAM neighbourhood radius; ``None``: 0.05 for SAM, 0.5 for ASAM.
        grad_clip: max global gradient norm (second-pass gradients under SAM); 0 disables.
        poly_exponent: lr = lr0 * (1 - t/T)^exponent.
        warmup_iterations: linear warm-up before the poly schedule.
        looksam_k, looksam_alpha: LookSAM's SAM-gradient interval and reuse weight (5, 0.7).
        sam_probability: RST's chance of a SAM step per iteration (0.5).
        ema_decay, kl_weight, kl_temperature, kl_start: EMA-KL's weight-average decay per
            update, KL weight lambda, temperature tau and the updates before the KL term.
    """

    name: Literal["sam", "asam", "looksam", "rst", "ema_kl", "sgd", "adamw"] = "sam"
    base: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    rho: float | None = Field(None, ge=0, le=10)
    grad_clip: float = Field(12.0, ge=0)
    poly_exponent: float = 0.9
    warmup_iterations: int = Field(0, ge=0)
    looksam_k: int = Field(5, ge=1)
    looksam_alpha: float = Field(0.7, ge=0, le=10)
    sam_probability: float = Field(0.5, ge=0, le=1)
    ema_decay: float = Field(0.99, ge=0, lt=1)
    kl_weight: float = Field(0.8, ge=0, le=100)
    kl_temperature: float = Field(1.0, ge=0.05, le=20)
    kl_start: int = Field(100, ge=0)


class AugmentationConfig(_Section):
    """Training-time augmentation probabilities and ranges (MONAI transforms)."""

    rotate_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.25)
    p_spatial: float = 0.2
    elastic: bool = False
    mirror: bool = True
    p_noise: float = 0.1
    p_blur: float = 0.1
    p_brightness: float = 0.15
    p_contrast: float = 0.15
    p_gamma: float = 0.3
    p_lowres: float = 0.1


class TrainConfig(_Section):
    """Training loop settings (see :mod:`uumamba.engine`).

    Attributes:
        epochs / iterations_per_epoch: length of the run.
        time_limit_minutes: total wall-time budget of the run in minutes, summed over
            ``--resume`` sessions (kept in the checkpoint); when spent, the run validates,
            saves and ends as finished. ``None`` = no limit.
        schedule_by_time: with a time limit, the poly learning-rate decay advances by the
            larger of the iteration fraction and the elapsed fraction of the time budget, so
            the rate anneals within the budget (not reproducible step for step; off by
            default).
        val_every: validate every N epochs (and at the end).
        checkpoint_every_minutes: also save ``checkpoint_latest.pt`` when this many minutes
            of training passed since the last save (besides every epoch's end); bounds what
            a SIGKILL or power loss can lose. ``None``: only at epoch ends.
        n_folds / seed: patient-grouped k-fold split.
        foreground_oversample: fraction of patches centred on a random foreground class.
        cache: ``memory`` | ``disk`` | ``none`` caching of preprocessed cases.
        num_workers: DataLoader workers.
        loader_nice: niceness added to each DataLoader worker process (0..19, ``os.nice``),
            so that on a CPU run the workers yield the cores to the compute threads (the
            threads of one step wait for each other at every parallel op, so a worker that
            takes a core from one stalls both). 0 (default) keeps the trainer's priority: on
            ACDC with 2 cores +10 made no difference measurable through the machine's
            run-to-run spread (benchmarks/README.md, "Training throughput").
        amp: ``auto`` (bf16 where the device has bf16 matrix units: a GPU of compute
            capability 8.0+, a CPU with AMX or AVX512-BF16; else fp16 with a scaler on a GPU and
            float32 on a CPU), ``bf16``, ``fp16`` or ``off``
            (:func:`uumamba.engine.components.select_precision`).
        max_nonfinite_steps: consecutive non-finite losses after which the run stops.
        deterministic: seeded, deterministic algorithms (CPU runs are reproducible).
    """

    epochs: int = Field(100, ge=1)
    iterations_per_epoch: int = Field(250, ge=1)
    time_limit_minutes: float | None = Field(None, gt=0)
    schedule_by_time: bool = False
    val_every: int = Field(5, ge=1)
    checkpoint_every_minutes: float | None = Field(5.0, gt=0)
    n_folds: int = Field(5, ge=2)
    seed: int = Field(12345, ge=0, le=2**32 - 1)  # numpy / torch generator range
    foreground_oversample: float = Field(0.33, ge=0.0, le=1.0)
    cache: Literal["memory", "disk", "none"] = "memory"
    num_workers: int = Field(2, ge=0)
    loader_nice: int = Field(0, ge=0, le=19, strict=True)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    max_nonfinite_steps: int = Field(25, ge=0)
    deterministic: bool = True
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)

    _amp_bool = field_validator("amp", mode="before")(classmethod(
        lambda cls, v: _amp_from_yaml_bool(v)))


class InferenceConfig(_Section):
    """Sliding-window inference settings (see :mod:`uumamba.inference`).

    Attributes:
        overlap: fraction of overlap between windows; unset (``null``, the default): 0.5 on
            a GPU (nnU-Net's), 0.25 on a CPU, where the network's time grows with the number
            of windows (:func:`uumamba.inference.sliding.resolve_window_settings`). An
            explicit value is used on every device.
        gaussian: Gaussian importance weighting of window outputs (else constant).
        tta: mirroring test-time augmentation.
        sw_batch_size: windows per forward pass; unset (default): 2 on a GPU, 4 on a CPU.
        amp: ``auto`` (default): windows run under bf16 autocast where the device has bf16
            matrix units (:func:`uumamba.device.native_bf16`: a GPU of compute capability
            8.0+, a CPU with AMX or AVX512-BF16), fp16 autocast on an older GPU, float32 on any other CPU;
            softmax and blending stay float32. ``off``: float32 everywhere.
        nsd_tolerance_mm: tolerance of the normalised surface distance in evaluation.
        input_check: what to do with an input the model cannot have been trained for (blank,
            constant or noise-like images, intensities, spacing or field of view far outside
            the training fingerprint; :mod:`uumamba.inference.plausibility`): ``warn``
            (default: segment, and put the reasons in the log, ``CASE_volumes.json`` and the
            service's answer), ``refuse`` (a DataError with the reasons) or ``off``.
    """

    overlap: float | None = Field(None, ge=0.0, lt=1.0)
    gaussian: bool = True
    tta: bool = False
    sw_batch_size: int | None = Field(None, ge=1)
    amp: Literal["auto", "off"] = "auto"
    nsd_tolerance_mm: float = Field(2.0, gt=0)
    input_check: Literal["warn", "refuse", "off"] = "warn"

    _amp_bool = field_validator("amp", mode="before")(classmethod(
        lambda cls, v: _amp_from_yaml_bool(v)))


class Config(_Section):
    """The whole configuration; one section per concern."""

    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    @field_validator("dataset")
    @classmethod
    def _background_named(cls, v: DatasetConfig) -> DatasetConfig:
        if v.labels is not None and 0 not in v.labels:
            raise ValueError("dataset.labels must include 0 (background)")
        return v


_SHORT = reprlib.Repr()  # values echoed in errors, shortened (keyword arguments: Python 3.12+)
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = 8
_SHORT.maxlevel = 3


def _format_validation_error(err: ValidationError, source: str, within: tuple = ()) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in (*within, *e["loc"]))
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {_SHORT.repr(key)}")
        else:
            parts.append(f"{_SHORT.repr(key)}: {e['msg']} (got {_SHORT.repr(e.get('input'))})")
    return f"{source}: invalid configuration: " + "; ".join(parts)


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a nested dict into a :class:`Config`.

    Raises:
        ConfigError: naming every unknown key or wrong-typed value, prefixed with ``source``.
    """
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (value parsed as YAML) to a nested dict in place.

    Raises:
        ConfigError: when an override is not of the form ``a.b=value``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {_SHORT.repr(item)}: expected KEY=VALUE, e.g. optim.rho=0.1")
        key, raw = item.split("=", 1)
        path = [p for p in key.strip().split(".") if p]
        if not path:
            raise ConfigError(f"--set {_SHORT.repr(item)}: empty key")
        if len(raw) > MAX_OVERRIDE_CHARS:
            raise ConfigError(f"--set {key.strip()}=...: the value has {len(raw)} characters, "
                              f"more than {MAX_OVERRIDE_CHARS}")
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {_SHORT.repr(item)}: value is not valid YAML: "
                              f"{_SHORT.repr(' '.join(str(exc).split()))}") from None
        except (RecursionError, ValueError):  # nesting thousands deep; a 9000-digit integer
            raise ConfigError(f"--set {_SHORT.repr(key.strip())}=...: the value nests too deep "
                              "or holds a number too long to be a setting") from None
        node = data
        for p in path[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {_SHORT.repr(item)}: {_SHORT.repr(p)} is not a section")
            node = child
        node[path[-1]] = value
    return data


def inference_overrides(cfg: InferenceConfig, overrides: list[str]) -> InferenceConfig:
    """``cfg`` with ``inference.KEY=VALUE`` strings applied (``predict --set``: a trained
    model's other sections are fixed by its weights and plans), validated like a config file.

    Raises:
        ConfigError: a key outside ``inference``, an unknown key, a wrong-typed value, or an
            override not of the form ``inference.key=value`` (the message names it).
    """
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("inference.") or key == "inference.":
            raise ConfigError(f"--set {_SHORT.repr(key)}: predict changes only the inference "
                              "section (e.g. --set inference.input_check=refuse); the others "
                              "are the trained model's")
    data = apply_overrides({"inference": cfg.model_dump()}, overrides)
    try:
        return InferenceConfig.model_validate(data["inference"])
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "--set", ("inference",))) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: the file is missing, not YAML, not a mapping, or fails validation.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than a config file "
                              f"may have ({MAX_CONFIG_BYTES})")
        try:
            loaded = parse_yaml(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        except (RecursionError, ValueError):
            raise ConfigError(f"{path}: a value nests too deep or holds a number too long to "
                              "be a setting") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (with --set overrides)"
    return config_from_dict(data, source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.dump(cfg.model_dump(mode="json"), Dumper=_PlainDumper,
                                 sort_keys=False))
