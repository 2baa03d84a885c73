"""``--device`` for every command: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch device.

One rule for ``train``, ``predict``, ``serve`` and the library entry points, so a device name
means the same everywhere and an unavailable one fails with the same message.
"""

from __future__ import annotations

import torch

from uumamba.config import cpu_bf16_override
from uumamba.errors import UserError


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` into a :class:`torch.device`.

    ``auto`` is CUDA when available, else CPU. Under torchrun, ``cuda`` means
    ``cuda:LOCAL_RANK`` (``local_rank``).

    Raises:
        UserError: an unknown device string, or CUDA requested where none is available.
    """
    text = str(device).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}); use --device cpu"
            )
        if text == "cuda":
            return torch.device("cuda", local_rank)
        try:
            return torch.device(text)
        except RuntimeError:
            pass
    raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


def native_bf16(device: torch.device | str) -> bool:
    """True when ``device`` computes bf16 convolutions and matrix products in hardware, the
    rule by which training (``train.amp=auto``) and inference pick bf16 autocast:

    * CUDA: a GPU with bf16 tensor cores (compute capability 8.0 or newer: Ampere, Ada,
      Hopper, Blackwell). ``torch.cuda.is_bf16_supported()`` is not this: it also counts bf16
      that torch emulates on older GPUs (V100 7.0, T4 7.5), slowly and without kernels for
      some 3D convolutions.
    * CPU: a processor with bf16 dot-product instructions, AMX tiles (Intel Sapphire Rapids
      and newer) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and newer), and a torch whose
      oneDNN has bf16 kernels (:func:`cpu_bf16_unit`): oneDNN then multiplies bf16 and sums
      in float32 on those units. On 2 AMX cores a training step of
      ``configs/acdc_cpu.yaml``'s network took 155 ms in bf16 against 227 ms in float32, and
      a 16-window inference batch 89 against 160 ms; on 2 Zen 4 cores (AVX512-BF16) the
      step's compute 190-197 against 283-316 ms and the batch 95 against 195 ms
      (benchmarks/README.md, "Training throughput"). Plain AVX-512 or AVX2 CPUs get float32:
      bf16 would be emulated there.

    False for every other device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, _minor = torch.cuda.get_device_capability(device)
        return major >= 8
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


def cpu_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product units (:func:`cpu_bf16_unit`) and torch's
    oneDNN has bf16 kernels (see :func:`native_bf16`), unless
    :data:`uumamba.config.CPU_BF16_ENV` says otherwise (``1``: True, ``0``: False; empty
    counts as unset).

    Raises:
        ConfigError: the variable is set to anything but ``0``, ``1`` or nothing.
    """
    forced = cpu_bf16_override()
    if forced is not None:
        return forced
    return cpu_bf16_unit() is not None and _onednn_bf16()


def cpu_bf16_unit() -> str | None:
    """``"AMX"`` or ``"AVX512-BF16"``: the bf16 dot-product units this CPU reports (torch's own
    CPU feature probes, AMX first), None when it has neither. The probes
    (``torch.cpu._is_amx_tile_supported``, ``torch.cpu._is_avx512_bf16_supported``) are private
    API (torch >= 2.3); a missing or failing probe reads as absent."""
    for unit, name in (("AMX", "_is_amx_tile_supported"),
                       ("AVX512-BF16", "_is_avx512_bf16_supported")):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return unit
        except RuntimeError:
            continue
    return None


def _onednn_bf16() -> bool:
    """torch's oneDNN is enabled and has bf16 kernels for this CPU."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (RuntimeError, AttributeError):
        return False


def precision_name(autocast_dtype: torch.dtype | None) -> str:
    """``bfloat16`` / ``float16`` / ``float32``: the arithmetic of an autocast dtype (None:
    float32), as training (:func:`uumamba.engine.components.select_precision`) and inference
    (:func:`uumamba.inference.sliding.window_precision`) record it in checkpoints, case
    records and benchmarks."""
    return str(autocast_dtype or torch.float32).removeprefix("torch.")
