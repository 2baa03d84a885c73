"""Selective-scan kernels (no nn.Module here).

``selective_scan`` dispatches to one of three backends (see
:func:`uumamba.nn.ops.selective_scan.resolve_scan_backend`): ``cuda`` (mamba-ssm, lazy import),
``cpu`` (fused numba kernels, :mod:`uumamba.nn.ops.scan_cpu`, compiled on first use) and
``torch`` (pure PyTorch, :mod:`uumamba.nn.ops.scan_torch`: blocked cumulative sums, chunked,
recomputing backward).
"""

from uumamba.nn.ops.selective_scan import (
    BACKENDS,
    ENV_VAR,
    cuda_backend_status,
    resolve_scan_backend,
    selective_scan,
    selective_scan_cuda,
    selective_scan_torch,
)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Fused numba CPU backend; see :func:`uumamba.nn.ops.scan_cpu.selective_scan_cpu`.

    Imported on first call so that ``import uumamba.nn`` does not load numba.
    """
    from uumamba.nn.ops.scan_cpu import selective_scan_cpu as _impl

    return _impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "cuda_backend_status",
    "resolve_scan_backend",
    "selective_scan",
    "selective_scan_cpu",
    "selective_scan_cuda",
    "selective_scan_torch",
]
