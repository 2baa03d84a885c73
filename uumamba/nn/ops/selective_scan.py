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

* ``cuda``  - mamba-ssm's fused CUDA kernel, imported lazily, only for CUDA tensors; before
  first use on a GPU its kernels are imported and run once on small inputs
  (:func:`probe_cuda_kernels`), so a build that imports but cannot run is reported, never
  used. An explicit ``cuda`` that cannot run is an error; ``auto`` falls back with a logged
  warning that gives the reason.
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
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from uumamba.nn.ops.scan_inputs import check_scan_inputs, finish_output, prepare_delta
from uumamba.nn.ops.scan_torch import scan_core_torch

__all__ = [
    "BACKENDS",
    "CUDA_DTYPES",
    "CUDA_D_CONV_RANGE",
    "CUDA_MAX_D_STATE",
    "ENV_VAR",
    "KernelProbe",
    "ScanBackendChoice",
    "causal_conv1d_usable",
    "choose_scan_backend",
    "cuda_backend_status",
    "cuda_kernel_limit_errors",
    "cuda_may_run",
    "mamba_ssm_installed",
    "probe_cuda_kernels",
    "probe_kernels",
    "requested_scan_backend",
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


#: Limits of mamba-ssm's and causal-conv1d's CUDA kernels (their ``TORCH_CHECK``s):
#: ``selective_scan_fwd``: "selective_scan only supports state dimension <= 256", inputs
#: float32 / float16 / bfloat16; ``causal_conv1d_fwd``: "causal_conv1d only supports width
#: between 2 and 4", the same three dtypes.
CUDA_MAX_D_STATE = 256
CUDA_D_CONV_RANGE = (2, 4)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

log = logging.getLogger(__name__)


def cuda_kernel_limit_errors(d_state: int | None = None, d_conv: int | None = None,
                             dtype: torch.dtype | None = None) -> list[str]:
    """Say which of ``d_state``, ``d_conv`` and ``dtype`` mamba-ssm's / causal-conv1d's CUDA
    kernels refuse (one sentence each, naming the value and the kernel's limit); empty when
    all are within the limits (None is not checked)."""
    errors = []
    if d_state is not None and d_state > CUDA_MAX_D_STATE:
        errors.append(f"d_state={d_state} exceeds {CUDA_MAX_D_STATE}, the largest state size "
                      "mamba-ssm's selective_scan CUDA kernel supports")
    low, high = CUDA_D_CONV_RANGE
    if d_conv is not None and not low <= d_conv <= high:
        errors.append(f"d_conv={d_conv} is outside {low}..{high}, the widths causal-conv1d's "
                      "CUDA kernel supports")
    if dtype is not None and dtype not in CUDA_DTYPES:
        errors.append(f"dtype {dtype} is not one of float32 / float16 / bfloat16, the input "
                      "types of the selective_scan and causal_conv1d CUDA kernels")
    return errors


def mamba_ssm_installed() -> bool:
    """True when a ``mamba_ssm`` package can be found (whether or not it imports or runs)."""
    return importlib.util.find_spec("mamba_ssm") is not None


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


@dataclass(frozen=True)
class KernelProbe:
    """What :func:`probe_cuda_kernels` found on one GPU.

    Attributes:
        reason: why the ``cuda`` backend cannot run there, or None when it can.
        causal_conv1d: causal-conv1d's kernel imported and ran correctly (the Mamba layer
            then uses ``causal_conv1d_fn``; without the package it uses ``F.conv1d``).
        note: what the probe saw besides (e.g. causal-conv1d not installed).
    """

    reason: str | None
    causal_conv1d: bool = False
    note: str | None = None


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = float((got.double() - expected.double()).abs().max()
                / expected.double().abs().max().clamp_min(1e-30))
    if not err <= 1e-3:  # also catches NaN
        raise RuntimeError(f"{what} differs from the PyTorch reference (relative error {err:.2e})")


def _exercise_selective_scan(device: torch.device) -> None:
    """One small forward and backward of ``selective_scan_fn`` on ``device``, compared with
    :func:`selective_scan_torch` on the same inputs; raises on any failure or mismatch."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    g = torch.Generator().manual_seed(0)
    batch, d_inner, d_state, length = 1, 4, 4, 16
    shapes = {"u": (batch, d_inner, length), "delta": (batch, d_inner, length),
              "B": (batch, d_state, length), "C": (batch, d_state, length),
              "z": (batch, d_inner, length), "D": (d_inner,), "delta_bias": (d_inner,)}
    inputs = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    inputs["A"] = -torch.rand(d_inner, d_state, generator=g) - 0.5
    results = []
    for fn, dev in ((selective_scan_fn, device), (selective_scan_torch, torch.device("cpu"))):
        leaves = {k: v.clone().to(dev).requires_grad_() for k, v in inputs.items()}
        out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                 D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"],
                 delta_softplus=True)
        out.sum().backward()
        results.append((out.detach().cpu(), leaves["u"].grad.cpu(), leaves["A"].grad.cpu()))
    (y, du, dA), (y_ref, du_ref, dA_ref) = results
    _close(y, y_ref, "selective_scan_fn's output")
    _close(du, du_ref, "selective_scan_fn's gradient of u")
    _close(dA, dA_ref, "selective_scan_fn's gradient of A")


def _exercise_causal_conv1d(device: torch.device) -> None:
    """One small ``causal_conv1d_fn`` (width 4, SiLU) forward and backward on ``device``,
    compared with ``F.conv1d``; raises on any failure or mismatch."""
    from causal_conv1d import causal_conv1d_fn

    g = torch.Generator().manual_seed(0)
    x0, w0, b0 = torch.randn(1, 8, 16, generator=g), torch.randn(8, 4, generator=g), torch.randn(8, generator=g)
    x, w, b = (t.clone().to(device).requires_grad_() for t in (x0, w0, b0))
    y = causal_conv1d_fn(x, w, b, activation="silu")
    y.sum().backward()
    xr, wr, br = (t.clone().requires_grad_() for t in (x0, w0, b0))
    y_ref = F.silu(F.conv1d(xr, wr.unsqueeze(1), br, padding=3, groups=8)[..., :16])
    y_ref.sum().backward()
    _close(y.detach().cpu(), y_ref.detach(), "causal_conv1d_fn's output")
    _close(x.grad.cpu(), xr.grad, "causal_conv1d_fn's gradient of x")


@functools.cache
def probe_cuda_kernels(index: int) -> KernelProbe:
    """Import mamba-ssm (and causal-conv1d) and run their compiled kernels once on GPU ``index``.

    Cached per GPU; see :func:`probe_kernels` for what is checked. Never raises.
    """
    return probe_kernels(torch.device("cuda", index))


def probe_kernels(device: torch.device) -> KernelProbe:
    """Import mamba-ssm (and causal-conv1d) and run their kernels once on ``device``.

    Cached per GPU: the first Mamba forward (or the predictor / training start-up) on a GPU
    pays a few milliseconds, later calls nothing. Checks, in order, each failure giving the
    ``reason`` with the exception's first line:

    1. a ``mamba_ssm`` package is installed;
    2. ``import mamba_ssm`` succeeds (its ``__init__`` imports the whole package: mamba-ssm
       < 2.3 fails there with transformers >= 5, "cannot import name
       'GreedySearchDecoderOnlyOutput'");
    3. ``selective_scan_fn`` runs forward and backward on the GPU and matches the PyTorch
       reference (catches extensions built without ``selective_scan_cuda``, which import but
       raise on first call, or built for another GPU architecture: "no kernel image");
    4. causal-conv1d, when installed, imports and ``causal_conv1d_fn`` matches ``F.conv1d``
       (an installed but broken causal-conv1d also makes the backend unavailable; a missing
       one only means the convolution runs as ``F.conv1d``, as in ``mamba_ssm.Mamba``).

    Never raises: every failure is reported in ``reason``. (``device`` is a GPU in use;
    the tests run the same checks with fake modules on the CPU.)
    """
    if not mamba_ssm_installed():
        return KernelProbe("mamba-ssm is not installed (pip install 'uumamba[gpu]')")
    version = _installed_version("mamba-ssm")
    try:
        import mamba_ssm  # noqa: F401
    except Exception as exc:  # ImportError, or OSError / RuntimeError from a broken build
        hint = ""
        if "GreedySearchDecoderOnlyOutput" in str(exc):
            hint = (" (mamba-ssm < 2.3 imports GreedySearchDecoderOnlyOutput, which "
                    "transformers 5 removed: install mamba-ssm>=2.3 or transformers<5)")
        return KernelProbe(f"mamba-ssm {version} is installed but 'import mamba_ssm' fails: "
                           f"{_first_line(exc)}{hint}")
    try:
        with torch.autocast(device.type, enabled=False):
            _exercise_selective_scan(device)
    except Exception as exc:
        return KernelProbe(f"mamba-ssm {version} imports, but its selective_scan_fn failed "
                           f"a test call on {device}: {_first_line(exc)}")
    if importlib.util.find_spec("causal_conv1d") is None:
        return KernelProbe(None, False, "causal-conv1d is not installed: the causal "
                           "convolution runs as F.conv1d")
    conv_version = _installed_version("causal-conv1d")
    try:
        with torch.autocast(device.type, enabled=False):
            _exercise_causal_conv1d(device)
    except Exception as exc:
        return KernelProbe(f"causal-conv1d {conv_version} is installed but its "
                           f"causal_conv1d_fn failed a test call on {device}: "
                           f"{_first_line(exc)}")
    return KernelProbe(None, True, None)


def _probe_for(device: torch.device) -> KernelProbe:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return probe_cuda_kernels(index)


def cuda_backend_status(device: torch.device | str) -> str | None:
    """Say why the ``cuda`` backend cannot run on ``device``, or return None when it can.

    Checks, in order: the tensors are on a CUDA device, torch sees a GPU, and mamba-ssm's
    (and causal-conv1d's) kernels import and run on that GPU (:func:`probe_cuda_kernels`,
    cached per GPU; its reason is included).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"the tensors are on device '{device}', not on a CUDA device"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU or no CUDA build of torch)"
    return _probe_for(device).reason


def causal_conv1d_usable(device: torch.device | str) -> bool:
    """True when causal-conv1d's kernel passed :func:`probe_cuda_kernels` on ``device``."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available()
            and _probe_for(device).causal_conv1d)


def _check_backend_name(name: str, origin: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{origin}={name!r} is not a selective-scan backend; choose one of {BACKENDS}")
    return name.lower()


def requested_scan_backend(backend: str) -> str:
    """The backend name asked for: ``backend``, with ``auto`` replaced by the environment
    variable ``UUMAMBA_SCAN_BACKEND`` when it is set (an explicit name wins).

    Raises:
        ValueError: unknown backend name (argument or environment variable).
    """
    name = _check_backend_name(backend, "backend")
    if name == "auto":
        name = _check_backend_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)
    return name


def cuda_may_run(backend: str, device: torch.device | str) -> bool:
    """True when the scan for ``backend`` on ``device`` is, or may be, mamba-ssm's kernels:
    ``cuda`` asked for, or ``auto`` on a CUDA device. The CUDA kernels' limits
    (:func:`cuda_kernel_limit_errors`) are enforced then, whether or not mamba-ssm is
    installed here, so a model does not stop working when it moves to a machine that has it.
    """
    name = requested_scan_backend(backend)
    return name == "cuda" or (name == "auto" and torch.device(device).type == "cuda")


@dataclass(frozen=True)
class ScanBackendChoice:
    """The backend a scan runs on and, when it is not the one wanted, why.

    Attributes:
        backend: ``cuda`` | ``cpu`` | ``torch``.
        warning: set when ``auto`` does not run the cuda backend on a CUDA device, or
            mamba-ssm is installed but another backend runs; says which runs and the reason
            (:func:`cuda_backend_status`). None otherwise (and for an explicit ``cpu`` /
            ``torch``, the user's own choice).
    """

    backend: str
    warning: str | None = None


_warned: set[tuple[str, str, str]] = set()


def choose_scan_backend(backend: str, device: torch.device | str) -> ScanBackendChoice:
    """:func:`resolve_scan_backend` plus the warning to show when cuda was wanted and another
    backend runs (logged once per backend / device by :func:`resolve_scan_backend`).

    Raises:
        ValueError / RuntimeError: as :func:`resolve_scan_backend`.
    """
    device = torch.device(device)
    name = requested_scan_backend(backend)
    if name != "auto":
        return ScanBackendChoice(_check_explicit(name, device))
    if device.type == "cuda":
        reason = cuda_backend_status(device)
        if reason is None:
            return ScanBackendChoice("cuda")
        return ScanBackendChoice("torch", f"selective scan on {device} runs the torch backend, "
                                 f"not mamba-ssm's CUDA kernels: {reason}")
    chosen = "cpu" if device.type == "cpu" else "torch"
    if mamba_ssm_installed():
        return ScanBackendChoice(chosen, f"mamba-ssm is installed but the selective scan runs "
                                 f"the {chosen} backend: {cuda_backend_status(device)}")
    return ScanBackendChoice(chosen)


def _check_explicit(name: str, device: torch.device) -> str:
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


def resolve_scan_backend(backend: str, device: torch.device | str) -> str:
    """Pick the concrete backend (``"cuda"``, ``"cpu"`` or ``"torch"``) for tensors on ``device``.

    Args:
        backend: ``auto`` | ``cuda`` | ``cpu`` | ``torch``. ``auto`` is first replaced by the
            environment variable ``UUMAMBA_SCAN_BACKEND`` when it is set; an explicit name wins
            over the environment. ``auto`` then means: ``cuda`` for CUDA tensors when
            mamba-ssm's kernels import and pass their test call (:func:`probe_cuda_kernels`),
            ``cpu`` for CPU tensors, ``torch`` otherwise (e.g. a GPU without a working
            mamba-ssm, MPS). When ``auto`` does not get the cuda backend on a GPU, or
            mamba-ssm is installed but unusable, a warning with the reason is logged (once
            per backend and device; :func:`choose_scan_backend`).
        device: the device the scan inputs live on.

    Raises:
        ValueError: unknown backend name (argument or environment variable), or ``cpu``
            requested for tensors that are not on the CPU.
        RuntimeError: ``cuda`` requested where it cannot run; the message says why (not a
            CUDA device, no GPU, mamba-ssm missing, not importable or failing its test call,
            with the error). An explicit ``cuda`` never falls back.
    """
    device = torch.device(device)
    choice = choose_scan_backend(backend, device)
    if choice.warning is not None:
        key = (str(backend), str(device), choice.backend)
        if key not in _warned:
            _warned.add(key)
            log.warning(choice.warning)
    return choice.backend


# --------------------------------------------------------------------------------------------
# Argument checks and the public entry point
# --------------------------------------------------------------------------------------------


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
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
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


# --------------------------------------------------------------------------------------------
# CUDA backend (mamba-ssm)
# --------------------------------------------------------------------------------------------


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's fused CUDA selective scan on float32 copies of the inputs.

    Shapes as :func:`selective_scan`; returns (batch, d_inner, L) float32. mamba-ssm is
    imported here, never at module import.

    Raises:
        RuntimeError: the tensors are not on a CUDA device, there is no GPU, or mamba-ssm's
            kernels do not import or fail their test call (:func:`cuda_backend_status`).
        ValueError: ``d_state`` (A's second size) above 256, the kernel's limit.
        TypeError: a float64 input (the kernel takes float32 / float16 / bfloat16 only; it
            would otherwise be computed in float32 without a word): use the torch backend.
    """
    reason = cuda_backend_status(u.device)
    if reason is not None:
        raise RuntimeError(f"selective-scan backend 'cuda' is unavailable: {reason}")
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    for error in cuda_kernel_limit_errors(d_state=A.shape[1], dtype=dtype):
        kind = TypeError if error.startswith("dtype") else ValueError
        raise kind(f"selective-scan backend 'cuda': {error}; use backend='torch' for it")
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
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    y = scan_core_torch(u.transpose(1, 2), delta.transpose(1, 2), A,
                        B.transpose(1, 2), C.transpose(1, 2))
    return finish_output(y.transpose(1, 2), u, D, z)
