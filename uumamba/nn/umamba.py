"""U-Mamba networks (Bot, Enc) and the plain residual U-Net baseline; ``build_network``.

Ma, Li & Wang, "U-Mamba: Enhancing Long-range Dependency for Biomedical Image Segmentation"
(2024), as used by UU-Mamba (Tsai et al. 2024): an nnU-Net residual encoder with Mamba layers
either at the bottleneck (U-Mamba Bot) or after every encoder stage (U-Mamba Enc), and a
transposed-convolution decoder with one 1x1 segmentation head per level for deep supervision.
``mamba="none"`` gives the same residual U-Net without Mamba: the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from uumamba.config import ModelConfig
from uumamba.nn.blocks import Decoder, Encoder

if TYPE_CHECKING:
    from uumamba.data.plan import Plans

MAMBA_MODES = ("bottleneck", "encoder", "none")
MODEL_NAME_TO_MAMBA = {"umamba_bot": "bottleneck", "umamba_enc": "encoder", "unet": "none"}
DEFAULT_N_STAGES = 5


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"UMamba: {name} must be a positive integer, got {value!r}")
    return value


def _per_stage_ints(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """One positive int per stage from an int (broadcast) or a list of length ``n``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * n
    if not isinstance(value, Sequence) or len(value) != n:
        raise ValueError(f"UMamba: {name} must be an int or a list of {n} ints, got {value!r}")
    return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))


def _per_stage_axes(name: str, value: Sequence[Any], n: int, spatial_dims: int
                    ) -> tuple[tuple[int, ...], ...]:
    """One per-axis tuple per stage; each entry an int (all axes) or a list of ``spatial_dims``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != n:
        raise ValueError(f"UMamba: {name} must be a list of {n} entries (one per stage), "
                         f"got {value!r}")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, int) and not isinstance(entry, bool):
            entry = [entry] * spatial_dims
        if not isinstance(entry, Sequence) or len(entry) != spatial_dims:
            raise ValueError(f"UMamba: {name}[{i}] must be an int or {spatial_dims} ints, "
                             f"got {entry!r}")
        out.append(tuple(_positive_int(f"{name}[{i}]", v) for v in entry))
    return tuple(out)


class UMamba(nn.Module):
    """U-Mamba segmentation network (2D or 3D): residual encoder, optional Mamba layers,
    transposed-conv decoder with deep supervision.

    ``forward``: input ``(B, in_channels, *S)`` float32 with every ``S[a]`` divisible by
    ``divisor[a] = prod_s strides[s][a]``. Training mode with ``deep_supervision``: a list of
    ``n_stages - 1`` logits tensors, full resolution ``(B, out_channels, *S)`` first, then each
    coarser decoder level (``S / prod(strides[:i+1])``). Eval mode, or without deep
    supervision: one ``(B, out_channels, *S)`` logits tensor.

    Architecture (nnU-Net ResEnc / U-Mamba): a conv-InstanceNorm-LeakyReLU stem, then per stage
    a strided residual block and ``n_blocks_per_stage[s] - 1`` more; Mamba layers
    (:class:`~uumamba.nn.blocks.SpatialMamba`, no residual, as U-Mamba) after the last stage
    (``mamba="bottleneck"``, U-Mamba Bot), after every stage (``"encoder"``, U-Mamba Enc) or
    nowhere (``"none"``, residual U-Net baseline). Convolutions are initialised with Kaiming
    normal (a = 0.01) and zero bias, as nnU-Net's ``InitWeights_He``; Mamba layers keep
    mamba-ssm's initialisation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (modalities).
        out_channels: classes, background included.
        features: channels per stage; ``None``: ``min(base_features * 2^s, max_features)``.
        strides: per stage an int or ``spatial_dims`` ints; ``strides[0]`` must be all 1 (the
            first stage keeps full resolution). ``None``: ``[1, 2, 2, ...]``.
        kernel_sizes: per stage an odd int or ``spatial_dims`` odd ints; ``None``: 3.
        n_blocks_per_stage: residual blocks per encoder stage (int or list per stage).
        n_conv_per_stage_decoder: conv units per decoder level (int or list of
            ``n_stages - 1``, finest level first).
        mamba: ``"bottleneck" | "encoder" | "none"``.
        deep_supervision: return every decoder level's logits in training mode.
        d_state, d_conv, expand: Mamba state size, causal-conv width, expansion factor.
        scan_backend: ``"auto" | "cuda" | "cpu" | "torch"`` for the selective scan.
        base_features, max_features: default channel rule (32, 320) when ``features`` is None.

    The number of stages is ``len(features)``, else ``len(strides)``, else
    ``len(kernel_sizes)``, else 5; it must be at least 2.

    Attributes: ``n_deep_supervision_outputs`` (training-mode list length), ``divisor``
    (per-axis stride product), ``mamba``, and the validated per-stage ``features``,
    ``strides``, ``kernel_sizes`` (tuples); ``encoder`` and ``decoder`` submodules.

    Raises:
        ValueError: an argument has the wrong length, a non-positive value, an even kernel
            size, an unknown ``mamba`` mode or a first stride other than 1 (the message names
            the argument and value); in ``forward``, an input whose shape or spatial size
            does not fit (names the size and the divisor).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] | None = None,
        strides: Sequence[int | Sequence[int]] | None = None,
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
        n_blocks_per_stage: int | Sequence[int] = 1,
        n_conv_per_stage_decoder: int | Sequence[int] = 1,
        mamba: str = "bottleneck",
        deep_supervision: bool = True,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        scan_backend: str = "auto",
        base_features: int = 32,
        max_features: int = 320,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"UMamba: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if mamba not in MAMBA_MODES:
            raise ValueError(f"UMamba: mamba must be one of {MAMBA_MODES}, got {mamba!r}")
        _positive_int("in_channels", in_channels)
        _positive_int("out_channels", out_channels)
        for name, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                            ("base_features", base_features), ("max_features", max_features)):
            _positive_int(name, value)

        given = [v for v in (features, strides, kernel_sizes) if v is not None]
        n_stages = len(given[0]) if given else DEFAULT_N_STAGES
        if n_stages < 2:
            raise ValueError(f"UMamba: need at least 2 stages, got {n_stages} "
                             f"(from features/strides/kernel_sizes)")
        if features is None:
            features = [min(base_features * 2**s, max_features) for s in range(n_stages)]
        if strides is None:
            strides = [1] + [2] * (n_stages - 1)
        if kernel_sizes is None:
            kernel_sizes = [3] * n_stages
        features = _per_stage_ints("features", list(features), n_stages)
        strides = _per_stage_axes("strides", strides, n_stages, spatial_dims)
        kernel_sizes = _per_stage_axes("kernel_sizes", kernel_sizes, n_stages, spatial_dims)
        if any(k % 2 == 0 for ks in kernel_sizes for k in ks):
            raise ValueError(f"UMamba: kernel_sizes must be odd, got {kernel_sizes}")
        if any(s != 1 for s in strides[0]):
            raise ValueError(f"UMamba: strides[0] must be 1 on every axis (the first stage "
                             f"keeps full resolution), got {strides[0]}")
        n_blocks = _per_stage_ints("n_blocks_per_stage", n_blocks_per_stage, n_stages)
        n_convs = _per_stage_ints("n_conv_per_stage_decoder", n_conv_per_stage_decoder,
                                  n_stages - 1)

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.mamba = mamba
        self.features = features
        self.strides = strides
        self.kernel_sizes = kernel_sizes
        self.encoder = Encoder(spatial_dims, in_channels, features, strides, kernel_sizes,
                               n_blocks, mamba, d_state, d_conv, expand, scan_backend)
        self.decoder = Decoder(spatial_dims, out_channels, features, strides, kernel_sizes,
                               n_convs, deep_supervision)
        self.apply(_init_conv_he)

    @property
    def n_deep_supervision_outputs(self) -> int:
        """Length of the training-mode output list: ``n_stages - 1``, or 1 without deep
        supervision (``decoder.deep_supervision`` False)."""
        return len(self.decoder.seg_heads) if self.decoder.deep_supervision else 1

    @property
    def divisor(self) -> tuple[int, ...]:
        """Per-axis product of the strides: every input spatial size must be a multiple."""
        return self.encoder.divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``(B, in_channels, *S)`` -> logits, or a list of logits (see class doc)."""
        skips = self.encoder(x)
        return self.decoder(skips)


class UMambaBot(UMamba):
    """U-Mamba Bot: :class:`UMamba` with one Mamba layer at the bottleneck
    (``mamba="bottleneck"``); takes every other :class:`UMamba` argument."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 **kwargs: Any) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, mamba="bottleneck", **kwargs)


class UMambaEnc(UMamba):
    """U-Mamba Enc: :class:`UMamba` with a Mamba layer after every encoder stage
    (``mamba="encoder"``); takes every other :class:`UMamba` argument."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 **kwargs: Any) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, mamba="encoder", **kwargs)


def _init_conv_he(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: Kaiming normal (a=0.01) weights, zero bias, for 2D /
    3D (transposed) convolutions only (Mamba's Conv1d keeps its own initialisation). Nothing
    on the ``meta`` device (shapes only), where ``normal_`` would import torch's compiler."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)) \
            and not module.weight.is_meta:
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_network(model_cfg: ModelConfig, plans: Plans) -> UMamba:
    """Build the network of a :class:`uumamba.config.ModelConfig` for a dataset plan.

    ``model_cfg.name`` picks the Mamba placement (``umamba_bot`` -> bottleneck, ``umamba_enc``
    -> encoder, ``unet`` -> none); channel rule, blocks, deep supervision and Mamba settings
    come from ``model_cfg``. From the plan (``uumamba.data.plan.Plans``, read duck-typed):
    ``spatial_dims``, ``num_input_channels`` -> ``in_channels``, ``num_classes`` (highest label
    value + 1, so output channel k is label value k even for non-consecutive labels) ->
    ``out_channels``, ``strides`` and ``kernel_sizes`` per stage.

    Raises:
        ValueError: ``model_cfg.spatial_dims`` differs from ``plans.spatial_dims``, the model
            name is unknown, or the settings are invalid (see :class:`UMamba`).
    """
    if model_cfg.spatial_dims != plans.spatial_dims:
        raise ValueError(
            f"model.spatial_dims={model_cfg.spatial_dims} does not match the plan's "
            f"spatial_dims={plans.spatial_dims}; re-plan the dataset or change model.spatial_dims"
        )
    if model_cfg.name not in MODEL_NAME_TO_MAMBA:
        raise ValueError(f"model.name must be one of {tuple(MODEL_NAME_TO_MAMBA)}, "
                         f"got {model_cfg.name!r}")
    return UMamba(
        spatial_dims=plans.spatial_dims,
        in_channels=plans.num_input_channels,
        out_channels=plans.num_classes,
        features=model_cfg.features,
        strides=plans.strides,
        kernel_sizes=plans.kernel_sizes,
        n_blocks_per_stage=model_cfg.n_blocks_per_stage,
        n_conv_per_stage_decoder=model_cfg.n_conv_per_stage_decoder,
        mamba=MODEL_NAME_TO_MAMBA[model_cfg.name],
        deep_supervision=model_cfg.deep_supervision,
        d_state=model_cfg.d_state,
        d_conv=model_cfg.d_conv,
        expand=model_cfg.expand,
        scan_backend=model_cfg.scan_backend,
        base_features=model_cfg.base_features,
        max_features=model_cfg.max_features,
    )
