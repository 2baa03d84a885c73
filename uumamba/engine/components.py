"""What one run trains with: network, loss, optimizer, schedule and precision, plus the
seeding of the global generators before they are built."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from uumamba.config import CPU_BF16_ENV, Config, cpu_bf16_override
from uumamba.data.plan import Plans
from uumamba.device import cpu_bf16_unit, native_bf16, precision_name
from uumamba.errors import ConfigError
from uumamba.inference.sliding import window_precision
from uumamba.losses import build_loss
from uumamba.nn import build_network, network_scan_backend
from uumamba.optim import PolyLRScheduler, build_optimizer
from uumamba.optim.build import describe_optimizer

log = logging.getLogger(__name__)


def select_precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """Autocast dtype and GradScaler for ``train.amp`` on ``device``.

    ``auto`` is bf16 (no scaler) wherever :func:`uumamba.device.native_bf16` holds: a GPU of
    compute capability 8.0 or newer (bf16 tensor cores), or a CPU with AMX tiles or
    AVX512-BF16 (oneDNN's bf16 convolutions on those units). Elsewhere ``auto`` is fp16 with
    :class:`torch.amp.GradScaler` on a GPU (Volta 7.0, Turing 7.5, Pascal 6.x; not
    ``torch.cuda.is_bf16_supported()``, which counts emulated bf16) and float32 on a CPU.
    ``bf16`` forces bf16 (refused where it would be emulated); ``fp16`` is fp16 + scaler on a
    GPU and float32 on a CPU; ``off`` is float32 everywhere.

    Returns:
        ``(autocast dtype or None for float32, GradScaler or None)``.

    Raises:
        ConfigError: ``train.amp=bf16`` on a GPU of compute capability below 8.0 or on a CPU
            without AMX or AVX512-BF16 (naming the device and what it lacks).
    """
    if amp == "off" or device.type not in ("cuda", "cpu"):
        return None, None
    bf16_native = native_bf16(device)
    if amp == "bf16" and not bf16_native:
        if device.type == "cpu":
            if cpu_bf16_override() is False:
                raise ConfigError(f"train.amp=bf16: {CPU_BF16_ENV}=0 turns bf16 off on the CPU; "
                                  f"unset it or use train.amp=auto or off")
            raise ConfigError("train.amp=bf16: this CPU has neither AMX tiles nor AVX512-BF16 "
                              "(or torch's oneDNN has no bf16 kernels), so bf16 would be "
                              "emulated and slower than float32; use train.amp=auto or off")
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"train.amp=bf16: {device} has compute capability {major}.{minor}, "
                          "without bf16 tensor cores (bf16 needs 8.0 or newer); use "
                          "train.amp=auto or fp16 (with a GradScaler)")
    if amp in ("auto", "bf16") and bf16_native:
        return torch.bfloat16, None
    if device.type == "cpu":
        return None, None
    return torch.float16, torch.amp.GradScaler("cuda")


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed Python, NumPy and torch (MONAI ``set_determinism`` when ``deterministic``).

    On CUDA, ``deterministic`` also turns on deterministic algorithms (warn-only, so an op
    without a deterministic kernel warns instead of failing) and disables cuDNN benchmarking.
    CPU kernels are deterministic for a fixed thread count already (and
    ``torch.use_deterministic_algorithms`` costs seconds of import time), so it is not called
    there. mamba-ssm's CUDA backward uses atomic adds, so GPU runs are seeded but not
    bit-reproducible.
    """
    if deterministic:
        from monai.utils import set_determinism

        set_determinism(seed=seed)
        if device.type == "cuda":
            # cuBLAS needs a fixed workspace for reproducible GEMMs (set before its first use)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - legacy global RNG on purpose
        torch.manual_seed(seed)
        torch.backends.cudnn.benchmark = True


@dataclass
class Components:
    """Network, objective and optimisation state of one run.

    Attributes:
        model: the unwrapped network; ``train_model`` is the same module, DDP-wrapped when
            distributed (what the step runs).
        loss_fn: deep-supervision wrapper over the configured loss (holds the σ).
        optimizer / scheduler: from :func:`uumamba.optim.build_optimizer` and
            :class:`uumamba.optim.PolyLRScheduler` (total = epochs × iterations per epoch).
        scaler / autocast_dtype: from :func:`select_precision`.
    """

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    autocast_dtype: torch.dtype | None
    train_model: torch.nn.Module | None = None

    def sigmas(self) -> dict[str, float]:
        """σ values of an uncertainty-weighted loss (empty for fixed-weight losses)."""
        loss_fn = self.loss_fn
        return {str(k): float(v) for k, v in loss_fn.sigmas().items()} if hasattr(
            loss_fn, "sigmas") else {}

    def lr(self) -> float:
        """Learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])


def build_components(cfg: Config, plans: Plans, device: torch.device,
                     total_iterations: int) -> Components:
    """Build network, loss (``n_outputs`` = deep-supervision outputs), optimizer (σ in their
    own group), poly schedule and AMP settings, all on ``device``.

    The network's selective-scan backend is resolved on ``device`` before anything else
    (:func:`uumamba.nn.network_scan_backend`): a fallback from mamba-ssm's kernels is logged
    with its reason.

    Raises:
        ConfigError: invalid optimizer / loss / schedule settings (naming the key);
            ``model.scan_backend=cuda`` that cannot run on ``device``, or ``d_state`` /
            ``d_conv`` outside the CUDA kernels' limits where they may run; ``train.amp=bf16``
            on a GPU older than compute capability 8.0 or on a CPU without AMX or AVX512-BF16.
    """
    try:
        model = build_network(cfg.model, plans).to(device)
    except ValueError as exc:  # settings the schema cannot check alone (lengths per stage)
        raise ConfigError(f"model: {exc}") from None
    try:  # probe the scan backend now (logs a fallback warning), not at the first batch
        network_scan_backend([model], device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"model.scan_backend={cfg.model.scan_backend!r} on {device}: "
                          f"{exc}") from None
    n_outputs = model.n_deep_supervision_outputs if cfg.model.deep_supervision else 1
    try:
        loss_fn = build_loss(cfg.loss, plans.num_classes, cfg.dataset.ignore_label, n_outputs)
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from None
    loss_fn = loss_fn.to(device)
    optimizer = build_optimizer(cfg.optim, model, loss_fn)
    log.info(f"optimizer: {describe_optimizer(cfg.optim)}")
    if cfg.optim.name == "ema_kl" and cfg.optim.kl_weight > 0 and \
            cfg.optim.kl_start >= total_iterations:
        log.warning(f"warning: optim.kl_start = {cfg.optim.kl_start} but the run plans "
                    f"{total_iterations} iterations: the EMA-KL term never starts (this is "
                    "the base optimizer); lower optim.kl_start")
    try:
        scheduler = PolyLRScheduler(optimizer, total_iterations,
                                    exponent=cfg.optim.poly_exponent,
                                    warmup_iters=cfg.optim.warmup_iterations)
    except ValueError as exc:
        raise ConfigError(f"optim (poly schedule over {total_iterations} iterations): "
                          f"{exc}") from None
    autocast_dtype, scaler = select_precision(cfg.train.amp, device)
    log.info(f"precision: {describe_precision(cfg.train.amp, autocast_dtype, scaler, device)}")
    validation = describe_validation_precision(cfg.inference, autocast_dtype, device)
    if validation is not None:
        log.info(validation)
    return Components(model, loss_fn, optimizer, scheduler, scaler, autocast_dtype)


def describe_validation_precision(inference_cfg: Any, autocast_dtype: torch.dtype | None,
                                  device: torch.device) -> str | None:
    """The training log's line for validation when its windows compute in another precision
    than training (``inference.amp`` is its own key: a run with ``train.amp=off`` validates,
    and later predicts, in bf16 under ``inference.amp=auto`` on bf16 hardware); None when
    they agree."""
    windows = window_precision(inference_cfg, device)
    if windows == precision_name(autocast_dtype):
        return None
    return (f"validation windows in {windows} (inference.amp={inference_cfg.amp}; also the "
            "model's default for prediction)")


def describe_precision(amp: str, autocast_dtype: torch.dtype | None, scaler: Any,
                       device: torch.device) -> str:
    """One line for the training log: what ``train.amp`` resolved to on ``device`` and why,
    e.g. ``bf16 autocast (train.amp=auto on AVX512-BF16; normalisation statistics, any
    selective scan and the loss in float32)`` or ``float32 (train.amp=auto; cpu without bf16
    units: AMX or AVX512-BF16)``."""
    forced = cpu_bf16_override() if device.type == "cpu" else None
    if autocast_dtype is None:
        lacks = (f"{CPU_BF16_ENV}=0" if forced is False
                 else "cpu without bf16 units: AMX or AVX512-BF16" if device.type == "cpu"
                 else f"{device.type} without bf16 matrix units")
        why = {"off": "off", "fp16": "fp16, which a CPU does not use"}.get(amp, f"{amp}; {lacks}")
        return f"float32 (train.amp={why})"
    name = {"bfloat16": "bf16", "float16": "fp16"}[precision_name(autocast_dtype)]
    extra = " with a GradScaler" if scaler is not None else ""
    where = ""
    if device.type == "cpu":
        unit = cpu_bf16_unit()
        where = (f" with {CPU_BF16_ENV}=1" if forced else f" on {unit}" if unit else "")
    return (f"{name} autocast{extra} (train.amp={amp}{where}; normalisation statistics, any "
            "selective scan and the loss in float32)")
