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
* ``torch`` - pure PyTorch, any device: the sequence is split into chunks of 256-4096
  positions (``TORCH_CHUNK``, or sized to the tensor width); each chunk is one checkpointed function, so only the chunk
  boundary states (batch, d_inner, d_state) are kept for backward. Inside a chunk the linear
  recurrence is solved by a blocked parallel scan (vectorised over sub-blocks, no per-position
  autograd nodes) with a hand-written reverse-scan backward.

The scan always computes in float32 (float64 inputs stay float64 on the torch backend), with
autocast disabled: fp16 overflow inside the scan is a known cause of NaN losses in U-Mamba
training. The result is cast back to u's dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "TORCH_CHUNK",
    "cuda_backend_status",
    "resolve_scan_backend",
    "selective_scan",
    "selective_scan_cuda",
    "selective_scan_torch",
]

BACKENDS = ("auto", "cuda", "cpu", "torch")
ENV_VAR = "UUMAMBA_SCAN_BACKEND"
# Positions per checkpointed chunk of the torch backend. None: the largest power of two in
# [256, 4096] whose (batch, d_inner, chunk, d_state) tensors hold at most _CHUNK_ELEMENTS.
TORCH_CHUNK: int | None = None
_CHUNK_ELEMENTS = 1 << 23
# Positions per sub-block inside a chunk. Small on purpose: the in-block steps are large
# multi-threaded ops, the per-sub-block carry steps touch only (batch, d_inner, d_state) and
# run inline, so few large ops keep thread synchronisation (costly on busy CPUs) rare.
_SUB_BLOCK = 8
# Decays exp(delta * A) below exp(-60) ~ 1e-26 are raised to it: the change in y is below
# 1e-26 * |h|, and it keeps float32 products out of the denormal range (100x slower on CPUs).
_LOG_DECAY_MIN = -60.0


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
        "delta": (delta, (batch, d_inner, length)),
        "B": (B, (batch, d_state, length)),
        "C": (C, (batch, d_state, length)),
        "z": (z, (batch, d_inner, length)),
        "D": (D, (d_inner,)),
        "delta_bias": (delta_bias, (d_inner,)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} must have shape {shape} "
                f"(batch, d_inner, d_state, L from u and A), got {tuple(t.shape)}"
            )


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
        ValueError / TypeError: wrong shapes or types (the message names the argument) or an
            unknown backend; RuntimeError: ``cuda`` requested where it cannot run.

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


def _blocked_scan(a, log_a, x, h0, reverse=False):
    """Solve h_t = a_t * h_{t-1} + x_t along dim 2 of (batch, d_inner, T, d_state) tensors.

    ``a = exp(log_a)``; ``h0`` (batch, d_inner, d_state) is the state before the first
    position (after the last one when ``reverse``; then h_t = a_t * h_{t+1} + x_t). No
    autograd. The T positions are split into sub-blocks of ``_SUB_BLOCK``: one vectorised pass
    per in-block position computes every sub-block's local scan at once, the decay from each
    sub-block's start is exp(cumsum(log_a)) (clamped at ``_LOG_DECAY_MIN`` so no product
    underflows into slow denormals), a short pass over sub-blocks carries the states, and one
    fused multiply-add applies the carries: O(T) work in ``_SUB_BLOCK`` large vectorised
    steps plus ``T / _SUB_BLOCK`` small ones.

    Returns h, (batch, d_inner, T, d_state).
    """
    b, d, T, n = a.shape
    K = min(T, _SUB_BLOCK)
    M = -(-T // K)
    pad = M * K - T
    if pad:  # a = 1 (log_a = 0), x = 0 leaves the state unchanged, in either direction
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        log_a = F.pad(log_a, (0, 0, 0, pad))
        x = F.pad(x, (0, 0, 0, pad))
    a5 = a.reshape(b, d, M, K, n)
    x5 = x.reshape(b, d, M, K, n)
    log_p = log_a.reshape(b, d, M, K, n).cumsum(dim=3)
    if reverse:  # sum over positions k..K-1 of each sub-block
        log_p = log_p[:, :, :, -1:] - log_p + log_a.reshape(b, d, M, K, n)
    P = log_p.clamp_min_(_LOG_DECAY_MIN).exp_()  # decay from the sub-block's entry to k
    h = torch.empty_like(x5)
    order = range(K - 1, -1, -1) if reverse else range(K)
    first, *rest = order
    h[:, :, :, first] = x5[:, :, :, first]
    prev = first
    for k in rest:
        torch.addcmul(x5[:, :, :, k], a5[:, :, :, k], h[:, :, :, prev], out=h[:, :, :, k])
        prev = k
    last = prev
    carry = torch.empty(b, d, M, 1, n, dtype=h.dtype, device=h.device)  # state entering block
    state = h0
    for m in range(M - 1, -1, -1) if reverse else range(M):
        carry[:, :, m, 0] = state
        state = torch.addcmul(h[:, :, m, last], P[:, :, m, last], state)
    h.addcmul_(P, carry)
    h = h.reshape(b, d, M * K, n)
    return h[:, :, :T] if pad else h


class _LinearScan(torch.autograd.Function):
    """h_t = exp(log_a_t) * h_{t-1} + x_t over dim 2 of (batch, d_inner, T, d_state), h_{-1} = h0.

    Backward is the reverse scan g_t = dh_t + a_{t+1} g_{t+1}; then dx = g,
    d(log_a)_t = g_t * h_{t-1} * a_t, dh0 = a_0 * g_0 (the adjoint of a first-order linear
    recurrence, as in mamba-ssm's backward kernel).
    """

    @staticmethod
    def forward(ctx, log_a, x, h0):
        a = log_a.exp()
        h = _blocked_scan(a, log_a, x, h0)
        ctx.save_for_backward(a, log_a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, log_a, h, h0 = ctx.saved_tensors
        a_next = torch.cat([a[:, :, 1:], torch.ones_like(a[:, :, :1])], dim=2)
        log_a_next = torch.cat([log_a[:, :, 1:], torch.zeros_like(log_a[:, :, :1])], dim=2)
        g = _blocked_scan(
            a_next, log_a_next, grad_h.contiguous(), torch.zeros_like(h0), reverse=True
        )
        h_prev = torch.cat([h0[:, :, None], h[:, :, :-1]], dim=2)
        return g * h_prev * a, g, a[:, :, 0] * g[:, :, 0]


def _scan_chunk(u, delta, A, B, C, h0):
    """Selective scan of one chunk without D / z: returns y (batch, d_inner, T) and the last
    state (batch, d_inner, d_state). u, delta (batch, d_inner, T); A (d_inner, d_state);
    B, C (batch, d_state, T); h0 (batch, d_inner, d_state)."""
    # log-decay clamped at _LOG_DECAY_MIN: exp(-60) ~ 1e-26 instead of a denormal or zero
    log_a = (delta[..., None] * A[None, :, None, :]).clamp_min(_LOG_DECAY_MIN)  # (b, d, T, n)
    x = (delta * u)[..., None] * B.transpose(1, 2)[:, None]  # (b, d, T, n)
    h = _LinearScan.apply(log_a, x, h0)
    y = (h * C.transpose(1, 2)[:, None]).sum(-1)
    return y, h[:, :, -1].clone()  # a copy: a view would keep the chunk's h alive


def _auto_chunk(elements_per_position: int) -> int:
    """Largest power of two in [256, 4096] with chunk * elements_per_position <= 2^23."""
    chunk = 4096
    while chunk > 256 and chunk * elements_per_position > _CHUNK_ELEMENTS:
        chunk //= 2
    return chunk


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk_size=None
):
    """Pure-PyTorch selective scan, autograd-capable, any device.

    Shapes as :func:`selective_scan`; returns (batch, d_inner, L) in float32 (float64 when an
    input is float64). The sequence is processed in chunks of ``chunk_size`` (default
    ``TORCH_CHUNK``, else sized to about 2^23 elements per (batch, d_inner, chunk, d_state)
    tensor) positions, each wrapped in ``torch.utils.checkpoint`` when gradients are
    needed, so peak memory is O(batch * d_inner * L + batch * d_inner * chunk * d_state)
    instead of O(batch * d_inner * L * d_state).
    """
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C, D, z, delta_bias = (
        None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    batch, d_inner, length = u.shape
    chunk = int(chunk_size or TORCH_CHUNK or _auto_chunk(batch * d_inner * A.shape[1]))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    state = u.new_zeros(batch, d_inner, A.shape[1])
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (u, delta, A, B, C)
    )
    ys = [u.new_zeros(batch, d_inner, 0)]
    # split (not per-chunk slicing): its backward concatenates the chunk gradients once
    # instead of scattering every chunk into a full-length zero tensor.
    pieces = (t.split(chunk, dim=2) for t in (u, delta, B, C))
    for u_c, delta_c, B_c, C_c in zip(*pieces, strict=True):
        args = (u_c, delta_c, A, B_c, C_c, state)
        if need_grad:
            y, state = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, state = _scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=2)
    return _finish_output(y, u, D, z)

