"""``--device`` for every command: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch device.

One rule for ``train``, ``predict``, ``serve`` and the library entry points, so a device name
means the same everywhere and an unavailable one fails with the same message.
"""

from __future__ import annotations

import torch

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
    """True when ``device`` is a GPU with bf16 tensor cores (compute capability 8.0 or newer:
    Ampere, Ada, Hopper, Blackwell), the rule by which training and inference pick bf16 over
    fp16. ``torch.cuda.is_bf16_supported()`` is not this: it also counts bf16 that torch
    emulates on older GPUs (V100 7.0, T4 7.5), slowly and without kernels for some 3D
    convolutions. False for every non-CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8
