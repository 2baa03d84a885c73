"""Input checks and the elementwise steps every selective-scan backend shares.

Used by the dispatcher and the torch backend (:mod:`uumamba.nn.ops.selective_scan`) and by
the numba kernels' wrapper (:mod:`uumamba.nn.ops.scan_cpu`), which run the recurrence only:
delta + bias and softplus before it, the D skip and the silu(z) gate after it, as mamba-ssm's
``selective_scan_ref`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_scan_inputs", "finish_output", "prepare_delta"]


def check_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Check the inputs of :func:`uumamba.nn.ops.selective_scan.selective_scan` (shapes in
    its docstring) before any backend indexes them.

    Raises:
        TypeError: u, delta, A, B or C is not a tensor, or an input is not floating point.
        ValueError: u is not 3-D, A is not (d_inner, d_state) or is complex, or another
            input's shape disagrees with the sizes taken from u and A (the message names it).
    """
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


def prepare_delta(delta, delta_bias, delta_softplus):
    """delta + delta_bias, then softplus (threshold 20 as mamba-ssm), on (batch, d_inner, L)."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)  # beta=1, threshold=20: identity above 20, as mamba-ssm
    return delta


def finish_output(y, u, D, z):
    """Add the D skip and apply the silu(z) gate on (batch, d_inner, L)."""
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y
