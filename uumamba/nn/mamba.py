"""The Mamba (S6) sequence block, parameter-compatible with ``mamba_ssm.Mamba``.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), Sec. 3
and Algorithm 2. The block owns the parameters; the recurrence itself is
:func:`uumamba.nn.ops.selective_scan.selective_scan`, so the same weights run on the CUDA
kernels of mamba-ssm, the fused CPU kernel or the portable PyTorch scan.

Parameter names, shapes and initialisation mirror ``mamba_ssm.modules.mamba_simple.Mamba``
(in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so a ``state_dict`` trained with
mamba-ssm on a GPU loads here with ``strict=True`` and back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uumamba.nn.ops.selective_scan import (
    ScanBackendChoice,
    causal_conv1d_usable,
    choose_scan_backend,
    cuda_kernel_limit_errors,
    cuda_may_run,
    resolve_scan_backend,
    selective_scan,
)


class Mamba(nn.Module):
    """Mamba block: gated selective state-space layer over a token sequence.

    Input ``(B, L, d_model)`` float tensor, output ``(B, L, d_model)`` in the input's dtype.
    With ``d_inner = expand * d_model`` the forward pass is (mamba-ssm's reference path):

    1. ``in_proj``: ``(B, L, d_model) -> (B, 2*d_inner, L)``, split into ``x`` and the gate
       ``z``;
    2. causal depthwise convolution of ``x`` (width ``d_conv``), then SiLU
       (``causal_conv1d_fn`` when the scan backend is ``cuda`` and causal-conv1d passed the
       start-up probe, :func:`~uumamba.nn.ops.selective_scan.probe_cuda_kernels`; else ``F.conv1d`` with ``d_conv - 1`` padding, cropped to the first ``L`` outputs);
    3. ``x_proj``: per position ``dt`` (rank ``dt_rank``), ``B`` and ``C`` (``d_state`` each);
    4. ``dt_proj`` weight only: ``delta_raw = W_dt dt``; its bias enters the scan as
       ``delta_bias`` with ``delta_softplus=True``;
    5. selective scan with ``A = -exp(A_log)``, skip ``D`` and gate ``silu(z)``;
    6. ``out_proj``: ``(B, L, d_inner) -> (B, L, d_model)``.

    Parameters (names and shapes exactly as ``mamba_ssm.Mamba``):
        ``in_proj.weight`` (2*d_inner, d_model); ``conv1d.weight`` (d_inner, 1, d_conv),
        ``conv1d.bias`` (d_inner,); ``x_proj.weight`` (dt_rank + 2*d_state, d_inner);
        ``dt_proj.weight`` (d_inner, dt_rank), ``dt_proj.bias`` (d_inner,);
        ``A_log`` (d_inner, d_state); ``D`` (d_inner,); ``out_proj.weight`` (d_model, d_inner).

    Initialisation (as mamba-ssm): ``A_log[d, n] = log(n + 1)`` (S4D-real), ``D = 1``,
    ``dt_proj.bias = softplus^-1(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]`` and
    floored at ``dt_init_floor``; ``dt_proj.weight`` uniform in ``±dt_rank^-0.5 * dt_scale``
    (or constant for ``dt_init="constant"``); the other layers keep PyTorch's defaults.
    ``A_log`` and ``D`` carry ``_no_weight_decay = True`` as in mamba-ssm.

    Args:
        d_model: token (channel) dimension.
        d_state: SSM state size N per channel (default 16).
        d_conv: width of the causal depthwise convolution (default 4).
        expand: ``d_inner = expand * d_model`` (default 2).
        dt_rank: rank of the ``dt`` projection; ``"auto"`` = ``ceil(d_model / 16)``.
        dt_min, dt_max: range of the initial step size ``dt`` (default 0.001, 0.1).
        dt_init: ``"random"`` or ``"constant"`` initialisation of ``dt_proj.weight``.
        dt_scale: scale of the ``dt_proj.weight`` initialisation (default 1.0).
        dt_init_floor: lower bound of the initial ``dt`` (default 1e-4).
        conv_bias: bias in ``conv1d`` (default True).
        bias: bias in ``in_proj`` and ``out_proj`` (default False).
        scan_backend: ``"auto" | "cuda" | "cpu" | "torch"``, resolved per call by
            :func:`uumamba.nn.ops.selective_scan.resolve_scan_backend` from the input's device
            (env ``UUMAMBA_SCAN_BACKEND`` overrides ``auto``).

    CUDA kernels' limits: mamba-ssm's selective_scan takes ``d_state <= 256`` and
    causal-conv1d ``2 <= d_conv <= 4``, both float32 / float16 / bfloat16 only. They are
    checked whenever the scan is or may be those kernels (``scan_backend="cuda"``, or ``auto``
    on a CUDA device; :func:`~uumamba.nn.ops.selective_scan.cuda_may_run`); the torch and cpu
    backends have none of them (float64 included).

    Raises:
        ValueError: a size argument is not a positive integer, ``dt_min``/``dt_max`` are not
            ``0 < dt_min <= dt_max``, or ``dt_init`` is unknown (messages name the argument);
            ``scan_backend="cuda"`` with ``d_state`` / ``d_conv`` outside the kernels'
            limits (naming the limit).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                            ("expand", expand)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Mamba: {name} must be a positive integer, got {value!r}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or isinstance(dt_rank, bool) or dt_rank < 1:
            raise ValueError(f"Mamba: dt_rank must be 'auto' or a positive integer, got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        if scan_backend == "cuda":
            for error in cuda_kernel_limit_errors(d_state=d_state, d_conv=d_conv):
                raise ValueError(f"Mamba(scan_backend='cuda'): {error}; use scan_backend='torch'")

        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv,
                                groups=self.d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self._init_ssm(dt_min, dt_max, dt_init, dt_scale, dt_init_floor)

    @torch.no_grad()
    def _init_ssm(self, dt_min: float, dt_max: float, dt_init: str, dt_scale: float,
                  dt_init_floor: float) -> None:
        """mamba-ssm's initialisation of ``dt_proj``, ``A_log`` and ``D`` (see class doc);
        none on the ``meta`` device (shapes only: :func:`~uumamba.inference.predict.check_weights`),
        where its ops would import torch's compiler (about 1.5 s)."""
        if self.A_log.is_meta:
            return
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        # Inverse of softplus: softplus(dt + log(1 - exp(-dt))) == dt.
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

        states = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(states).expand(self.d_inner, -1))
        self.A_log._no_weight_decay = True
        self.D.fill_(1.0)
        self.D._no_weight_decay = True

    def check_cuda_limits(self, dtype: torch.dtype | None, device: torch.device | str) -> None:
        """Raise when this layer's ``d_state`` / ``d_conv`` or ``dtype`` are outside the CUDA
        kernels' limits (the message names the layer's setting, the limit and ``device``).

        Raises:
            ValueError: ``d_state`` > 256 or ``d_conv`` outside 2..4; TypeError: float64.
        """
        for error in cuda_kernel_limit_errors(self.d_state, self.d_conv, dtype):
            kind = TypeError if error.startswith("dtype") else ValueError
            raise kind(f"Mamba (scan_backend={self.scan_backend!r} on {device}, where the scan "
                       f"is or may be mamba-ssm's CUDA kernels): {error}; use "
                       "scan_backend='torch' to run outside these limits")

    def _conv_silu(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """Causal depthwise conv + SiLU of ``x`` (B, d_inner, L) -> (B, d_inner, L)."""
        if backend == "cuda" and causal_conv1d_usable(x.device):
            from causal_conv1d import causal_conv1d_fn

            weight = self.conv1d.weight.squeeze(1)
            return causal_conv1d_fn(x, weight, self.conv1d.bias, activation="silu")
        length = x.shape[-1]
        return F.silu(self.conv1d(x)[..., :length])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Map ``(B, L, d_model)`` -> ``(B, L, d_model)`` (a transposed view of
        :meth:`mix`'s output).

        Raises:
            ValueError: the input is not 3-D or its last dimension is not ``d_model``;
                ``d_state`` / ``d_conv`` outside the CUDA kernels' limits where the scan is or
                may be those kernels (see the class docstring).
            TypeError: a float64 input there; an input dtype other than the parameters' with
                autocast off.
            RuntimeError: ``scan_backend="cuda"`` cannot run on the input's device (why).
        """
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba: expected input of shape (batch, length, {self.d_model}), "
                f"got {tuple(hidden_states.shape)}"
            )
        return self.mix(hidden_states.transpose(1, 2)).transpose(1, 2)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The block channels first: ``(B, d_model, L)`` -> ``(B, d_model, L)``, contiguous;
        an empty batch or sequence (B or L = 0) gives an empty output.

        Every projection is a weight times a (B, channels, L) map (``W @ x``, as mamba-ssm's
        reference path computes ``in_proj``), so the scan's (B, d_inner, L) and (B, d_state,
        L) inputs come out in its layout with no transposed copies (a 16 x 256 x 64 block on
        2 CPU cores: ``in_proj`` and its split 4.8 -> 3.5 ms, results identical).

        Raises:
            As :meth:`forward`, for an input that is not ``(B, d_model, L)``; TypeError: the
            input's dtype is not the parameters' and autocast is off (torch's own error, "expected
            m1 and m2 to have the same dtype", named neither).
        """
        if x.ndim != 3 or x.shape[1] != self.d_model:
            raise ValueError(
                f"Mamba: expected channels-first input of shape (batch, {self.d_model}, "
                f"length), got {tuple(x.shape)}"
            )
        weight = self.in_proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"Mamba: input dtype {x.dtype} differs from the layer's parameters "
                            f"({weight.dtype}); cast one to the other, or run under autocast")
        device = x.device
        if cuda_may_run(self.scan_backend, device):
            self.check_cuda_limits(x.dtype, device)
        backend = resolve_scan_backend(self.scan_backend, device)
        if x.shape[0] == 0 or x.shape[2] == 0:  # nothing to scan: the same on every backend
            return x.new_zeros(x.shape)
        xz = _project(self.in_proj, x)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = self._conv_silu(x.contiguous(), backend)  # (B, d_inner, L)

        x_dbl = _project(self.x_proj, x)  # (B, dt_rank + 2*d_state, L)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = torch.matmul(self.dt_proj.weight, dt)  # (B, d_inner, L); bias in the scan
        y = selective_scan(
            x, delta, -torch.exp(self.A_log.float()), b, c,
            D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, backend=backend,
        )
        return _project(self.out_proj, y)


def _project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` applied along dim 1 of ``x`` (B, in_features, L) -> (B, out_features, L),
    contiguous: ``W @ x (+ b)``."""
    out = torch.matmul(linear.weight, x)
    return out if linear.bias is None else out + linear.bias[:, None]


def network_scan_backend(networks: Sequence[nn.Module], device: torch.device | str
                         ) -> ScanBackendChoice | None:
    """The selective-scan backend the Mamba layers of ``networks`` will run on ``device``.

    Resolves each layer's ``scan_backend`` as its forward does (probing mamba-ssm's kernels
    on a GPU once) and checks the CUDA kernels' limits where the scan is or may be those
    kernels, so a run fails at start-up rather than at its first batch. Any fallback warning
    is logged (once) by :func:`~uumamba.nn.ops.selective_scan.resolve_scan_backend`.

    Returns:
        None when the networks have no Mamba layer; else the backend names (comma-joined
        when layers differ) and the fallback warnings joined, or None.

    Raises:
        ValueError / TypeError: ``d_state`` / ``d_conv`` outside the CUDA kernels' limits
            where they may run (:meth:`Mamba.check_cuda_limits`); an unknown backend name.
        RuntimeError: a layer's ``scan_backend="cuda"`` cannot run on ``device`` (why).
    """
    layers = [m for net in networks for m in net.modules() if isinstance(m, Mamba)]
    if not layers:
        return None
    for layer in layers:
        if cuda_may_run(layer.scan_backend, device):
            layer.check_cuda_limits(None, device)
    configured = sorted({layer.scan_backend for layer in layers})
    backends = sorted({resolve_scan_backend(b, device) for b in configured})
    warnings = sorted({w for b in configured
                       if (w := choose_scan_backend(b, device).warning) is not None})
    return ScanBackendChoice(",".join(backends), "; ".join(warnings) or None)
