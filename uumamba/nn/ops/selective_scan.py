"""Selective scan (Mamba S6 recurrence): backend dispatcher, pure-PyTorch backend, lazy CUDA backend.

The recurrence (Gu & Dao 2023, "Mamba", Algorithm 2 / eq. 2a-2b with the zero-order-hold
discretisation of A and the Euler discretisation of B), per batch b, channel d, state n::

    delta_t = softplus(delta_raw_t + delta_bias)          (softplus only if delta_softplus)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B[b, n, t] * u_t      (h_{-1} = 0)
    y_t     = sum_n C[b, n, t] * h_t[n] + D[d] * u_t
    out_t   = y_t * silu(z_t)                              (only if z is given)

Shapes follow mamba-ssm's ``selective_scan_fn``: u, delta, z (batch, d_inner, L); A
(d_inner, d_state); B, C (batch, d_state, L); D, delta_bias (d_inner,). Only the
input-dependent ("selective") 3-D form of B and C is supported, which is what the Mamba block
uses.

Backends (see :func:`resolve_scan_backend`):

* ``cuda``  - mamba-ssm's fused CUDA kernel, imported lazily, only for CUDA tensors.
* ``cpu``   - fused multi-threaded numba kernels (:mod:`uumamba.nn.ops.scan_cpu`).
* ``torch`` - pure PyTorch, any device (:mod:`uumamba.nn.ops.scan_torch`): blocks of up to
  64 positions solved in closed form by cumulative sums, chunks of blocks whose entry states
  alone are kept for a recomputing, hand-written backward (no per-position autograd nodes).

The scan always computes in float32 (float64 inputs stay float64 on the torch backend), with
autocast disabled: fp16 overflow inside the scan is a known cause of NaN losses in U-Mamba
training. The result is cast back to u's dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from uumamba.nn.ops.scan_torch import scan_core_torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "cuda_backend_status",
    "resolve_scan_backend",
    "selective_scan",
    "selective_scan_cuda",
    "selective_scan_torch",
]

BACKENDS = ("auto", "cuda", "cpu", "torch")
ENV_VAR = "UUMAMBA_SCAN_BACKEND"

# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mamba_ssm_import_error() -> str | None:
    """Return None when mamba-ssm's selective_scan_fn imports, else the import error text."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception as exc:  # ImportError, or OSError / RuntimeError from a broken CUDA build
        return f"{type(exc).__name__}: {exc}"
    return None


def cuda_backend_status(device: torch.device | str) -> str | None:
    """Say why the ``cuda`` backend cannot run on ``device``, or return None when it can.

    Checks, in order: the tensors are on a CUDA device, torch sees a GPU, and
    ``mamba_ssm.ops.selective_scan_interface`` imports (its error text is included).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"the tensors are on device '{device}', not on a CUDA device"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU or no CUDA build of torch)"
    error = _mamba_ssm_import_error()
    if error is not None:
        return (
            "mamba-ssm is not importable (install the 'gpu' extra: pip install 'uumamba[gpu]'); "
            f"import error: {error}"
        )
    return None


def _check_backend_name(name: str, origin: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{origin}={name!r} is not a selective-scan backend; choose one of {BACKENDS}")
    return name.lower()


def resolve_scan_backend(backend: str, device: torch.device | str) -> str:
    """Pick the concrete backend (``"cuda"``, ``"cpu"`` or ``"torch"``) for tensors on ``device``.

    Args:
        backend: ``auto`` | ``cuda`` | ``cpu`` | ``torch``. ``auto`` is first replaced by the
            environment variable ``UUMAMBA_SCAN_BACKEND`` when it is set; an explicit name wins
            over the environment. ``auto`` then means: ``cuda`` for CUDA tensors when mamba-ssm
            imports, ``cpu`` for CPU tensors, ``torch`` otherwise (e.g. a GPU without
            mamba-ssm, MPS).
        device: the device the scan inputs live on.

    Raises:
        ValueError: unknown backend name (argument or environment variable), or ``cpu``
            requested for tensors that are not on the CPU.
        RuntimeError: ``cuda`` requested where it cannot run; the message says why (not a
            CUDA device, no GPU, mamba-ssm missing with its import error).
    """
    device = torch.device(device)
    name = _check_backend_name(backend, "backend")
    if name == "auto":
        name = _check_backend_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)
    if name == "auto":
        if device.type == "cuda" and cuda_backend_status(device) is None:
            return "cuda"
        return "cpu" if device.type == "cpu" else "torch"
    if name == "cuda":
        reason = cuda_backend_status(device)
        if reason is not None:
            raise RuntimeError(f"selective-scan backend 'cuda' is unavailable: {reason}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(
            f"selective-scan backend 'cpu' needs CPU tensors, got device '{device}'; "
            "use backend='torch' or 'cuda' there"
        )
    return name


# --------------------------------------------------------------------------------------------
# Argument checks and the public entry point
# --------------------------------------------------------------------------------------------


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, d_inner, length = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(
            f"selective_scan: A must be (d_inner={d_inner}, d_state), got shape {tuple(A.shape)}"
        )
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (Mamba uses real A)")
    d_state = A.shape[1]
    expected = {
        "delta": (delta, (batch, d_inner, length), "(batch, d_inner, L)"),
        "B": (B, (batch, d_state, length), "(batch, d_state, L)"),
        "C": (C, (batch, d_state, length), "(batch, d_state, L)"),
        "z": (z, (batch, d_inner, length), "(batch, d_inner, L)"),
        "D": (D, (d_inner,), "(d_inner,)"),
        "delta_bias": (delta_bias, (d_inner,), "(d_inner,)"),
    }
    for name, (t, shape, dims) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} must have shape {shape} = {dims} "
                f"(sizes from u and A), got {tuple(t.shape)}"
            )
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("z", z), ("delta_bias", delta_bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"selective_scan: {name} must be a floating-point tensor, got {t.dtype}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Run the Mamba selective scan; same contract as mamba-ssm's ``selective_scan_fn``.

    Args:
        u: input, (batch, d_inner, L).
        delta: step size before bias/softplus, (batch, d_inner, L).
        A: state matrix (diagonal per channel), (d_inner, d_state); Mamba uses
            ``-exp(A_log)`` (negative), but any real value is accepted.
        B, C: input-dependent input/output projections, (batch, d_state, L).
        D: skip connection per channel, (d_inner,), optional.
        z: gate, (batch, d_inner, L), optional; the output is multiplied by ``silu(z)``.
        delta_bias: added to delta before the softplus, (d_inner,), optional.
        delta_softplus: apply ``softplus`` (threshold 20, as mamba-ssm) to delta + bias.
        backend: ``auto`` | ``cuda`` | ``cpu`` | ``torch`` (see :func:`resolve_scan_backend`).

    Returns:
        (batch, d_inner, L) tensor in u's dtype, computed in float32 (autocast disabled).
        All inputs are differentiable on every backend.

    Raises:
        ValueError / TypeError: wrong shapes or non-floating-point tensors (the message names
            the argument) or an unknown backend; RuntimeError: ``cuda`` requested where it cannot run.

    Source: Gu & Dao 2023 (Mamba), Algorithm 2; behaviour mirrors mamba-ssm
    ``selective_scan_ref`` / ``selective_scan_fn``.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_scan_backend(backend, u.device)
    if name == "cuda":
        fn = selective_scan_cuda
    elif name == "cpu":
        from uumamba.nn.ops.scan_cpu import selective_scan_cpu as fn
    else:
        fn = selective_scan_torch
    with torch.autocast(device_type=u.device.type, enabled=False):
        out = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return out.to(u.dtype)


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _prepare_delta(delta, delta_bias, delta_softplus):
    """delta + delta_bias, then softplus (threshold 20 as mamba-ssm), on (batch, d_inner, L)."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)  # beta=1, threshold=20: identity above 20, as mamba-ssm
    return delta


def _finish_output(y, u, D, z):
    """Add the D skip and apply the silu(z) gate on (batch, d_inner, L)."""
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


# --------------------------------------------------------------------------------------------
# CUDA backend (mamba-ssm)
# --------------------------------------------------------------------------------------------


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's fused CUDA selective scan on float32 copies of the inputs.

    Shapes as :func:`selective_scan`; returns (batch, d_inner, L) float32. mamba-ssm is
    imported here, never at module import. Raises RuntimeError (with the reason) when the
    tensors are not on a CUDA device, there is no GPU, or mamba-ssm does not import.
    """
    reason = cuda_backend_status(u.device)
    if reason is not None:
        raise RuntimeError(f"selective-scan backend 'cuda' is unavailable: {reason}")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    f32 = [None if t is None else t.float() for t in (u, delta, A, B, C, D, z, delta_bias)]
    u, delta, A, B, C, D, z, delta_bias = f32
    return selective_scan_fn(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus
    )


# --------------------------------------------------------------------------------------------
# Torch backend
# --------------------------------------------------------------------------------------------


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Pure-PyTorch selective scan, autograd-capable, any device (:mod:`.scan_torch`).

    Shapes as :func:`selective_scan`; returns (batch, d_inner, L) in float32 (float64 when an
    input is float64). The scan runs in blocks solved by cumulative sums and chunks whose
    entry states alone are kept for backward, so peak memory is O(batch * d_inner * L) plus
    a few buffers of about 2^20 elements, never O(batch * d_inner * L * d_state).
    """
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C, D, z, delta_bias = (
        None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    y = scan_core_torch(u.transpose(1, 2), delta.transpose(1, 2), A,
                        B.transpose(1, 2), C.transpose(1, 2))
    return _finish_output(y.transpose(1, 2), u, D, z)
