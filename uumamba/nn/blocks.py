"""Building blocks of the U-Mamba networks: conv units, residual blocks, the spatial Mamba
layer, the residual encoder and the transposed-conv decoder.

Composition in the style of MIC-DKFZ dynamic-network-architectures (the nnU-Net v2 network
library that U-Mamba builds on): a network is ``Encoder`` + ``Decoder``; the U-Mamba variants
differ only in where the encoder places :class:`SpatialMamba` layers (Ma, Li & Wang,
"U-Mamba: Enhancing Long-range Dependency for Biomedical Image Segmentation", 2024, Fig. 1-2).
All blocks work in 2D and 3D (``spatial_dims``). These classes take already validated
per-stage settings; :class:`uumamba.nn.umamba.UMamba` validates user input.

Per-axis settings (``kernel_size``, ``stride``) are tuples of length ``spatial_dims``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from uumamba.nn.mamba import Mamba

LEAKY_SLOPE = 0.01  # nnU-Net's LeakyReLU negative slope

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def instance_norm(channels: int) -> nn.GroupNorm:
    """Affine instance normalisation of ``channels`` channels, 2D or 3D, eps 1e-5.

    Computed as ``GroupNorm`` with one channel per group: the same statistics (per sample and
    channel, biased variance over the spatial axes), the same ``weight`` / ``bias`` of shape
    ``(channels,)`` and state-dict keys as ``InstanceNorm{2,3}d(affine=True)``, so U-Mamba and
    nnU-Net checkpoints load unchanged; torch's group-norm CPU kernel is faster (forward +
    backward of the 2D acdc_cpu network alone, 2 cores: 335 -> 302 ms).
    """
    return nn.GroupNorm(channels, channels, eps=1e-5, affine=True)


class ConvNormAct(nn.Sequential):
    """Convolution -> InstanceNorm (affine) -> LeakyReLU(0.01), nnU-Net's basic unit.

    ``(B, in_channels, *S) -> (B, out_channels, *S / stride)``; padding ``kernel_size // 2``
    keeps the size at stride 1. ``act=False`` drops the activation (used before a residual
    addition).

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: channel counts.
        kernel_size: per-axis odd kernel size.
        stride: per-axis stride.
        act: append the LeakyReLU.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 kernel_size: Sequence[int], stride: Sequence[int], act: bool = True) -> None:
        layers: list[nn.Module] = [
            _CONV[spatial_dims](in_channels, out_channels, tuple(kernel_size), tuple(stride),
                                padding=tuple(k // 2 for k in kernel_size), bias=True),
            instance_norm(out_channels),
        ]
        if act:
            layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Two-convolution residual block (ResNet basic block as in nnU-Net's residual encoder).

    ``(B, in_channels, *S) -> (B, out_channels, *S / stride)``:
    ``act(conv_norm(conv_norm_act(x)) + skip(x))``, where ``skip`` is the identity or, when
    the channels or the size change, a strided 1x1 convolution + InstanceNorm.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: channel counts.
        kernel_size: per-axis odd kernel size of both convolutions.
        stride: per-axis stride of the first convolution (and of the skip projection).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 kernel_size: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        ones = (1,) * spatial_dims
        self.conv1 = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size, stride)
        self.conv2 = ConvNormAct(spatial_dims, out_channels, out_channels, kernel_size, ones,
                                 act=False)
        if in_channels != out_channels or tuple(stride) != ones:
            self.skip: nn.Module = ConvNormAct(spatial_dims, in_channels, out_channels, ones,
                                               stride, act=False)
        else:
            self.skip = nn.Identity()
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *S) -> (B, out_channels, *S / stride)``."""
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class EncoderStage(nn.Sequential):
    """One encoder resolution level: a strided residual block then ``n_blocks - 1`` more.

    ``(B, in_channels, *S) -> (B, out_channels, *S / stride)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 kernel_size: Sequence[int], stride: Sequence[int], n_blocks: int) -> None:
        ones = (1,) * spatial_dims
        blocks = [ResidualBlock(spatial_dims, in_channels, out_channels, kernel_size, stride)]
        blocks += [ResidualBlock(spatial_dims, out_channels, out_channels, kernel_size, ones)
                   for _ in range(n_blocks - 1)]
        super().__init__(*blocks)


class SpatialMamba(nn.Module):
    """Mamba over the voxels of a feature map: U-Mamba's ``MambaLayer``.

    ``(B, C, *S)`` -> flatten to a ``(B, L = prod(S), C)`` token sequence (row-major voxel
    order) -> ``LayerNorm(C)`` -> :class:`~uumamba.nn.mamba.Mamba` -> back to ``(B, C, *S)``.

    No residual connection: like the official U-Mamba ``MambaLayer`` (Ma et al. 2024), the
    layer returns the Mamba output of the normalised tokens, and the map it replaces reaches
    the decoder only through it. Pretrained U-Mamba weights therefore behave as published.

    Numerics: autocast is disabled inside; a half-precision input is cast to float32 and the
    output cast back to the input's dtype (fp16 overflow in the scan is a known source of NaN
    losses in U-Mamba training).

    Args:
        channels: C, the Mamba ``d_model``.
        d_state, d_conv, expand: Mamba state size, causal-conv width, expansion factor.
        scan_backend: ``"auto" | "cuda" | "cpu" | "torch"`` (see :class:`Mamba`).
    """

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand,
                           scan_backend=scan_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, C, *S)`` in ``x``'s dtype, computed in float32 (or float64)."""
        in_dtype = x.dtype
        compute_dtype = torch.promote_types(in_dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            batch, channels, *spatial = x.shape
            tokens = x.to(compute_dtype).reshape(batch, channels, -1).transpose(1, 2)
            out = self.mamba(self.norm(tokens)).transpose(1, 2)  # (B, C, L)
        # contiguous (Mamba.mix's layout; .contiguous() is then free), not a reshaped view of
        # (B, L, C) tokens, which would be channels-last: the decoder's transposed convolution
        # and skip concatenation then take oneDNN's slower mixed-layout paths (a bf16
        # 16-window inference batch of acdc_cpu.yaml's network: 126 -> 121 ms, same output)
        return out.contiguous().to(in_dtype).reshape(batch, channels, *spatial)


class Encoder(nn.Module):
    """Residual encoder with optional :class:`SpatialMamba` layers: U-Mamba's encoder.

    ``stem`` (conv unit, ``in_channels -> features[0]``), then one :class:`EncoderStage` per
    entry of ``features``. ``mamba="encoder"`` places a SpatialMamba after every stage
    (U-Mamba Enc), ``"bottleneck"`` only after the last stage (U-Mamba Bot), ``"none"``
    nowhere (plain residual U-Net encoder).

    Input ``(B, in_channels, *S)``, each ``S[a]`` divisible by ``divisor[a]`` (the product of
    the strides on axis ``a``); output: the list of stage outputs (skips), finest first,
    stage ``s`` of shape ``(B, features[s], *S / prod(strides[:s+1]))``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        features, strides, kernel_sizes, n_blocks: per-stage settings (same length).
        mamba: ``"bottleneck" | "encoder" | "none"``.
        d_state, d_conv, expand, scan_backend: settings of the Mamba layers.
    """

    def __init__(self, spatial_dims: int, in_channels: int, features: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 n_blocks: Sequence[int], mamba: str = "bottleneck", d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, scan_backend: str = "auto") -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.features = tuple(features)
        self.strides = tuple(tuple(s) for s in strides)
        self.kernel_sizes = tuple(tuple(k) for k in kernel_sizes)
        self.divisor = tuple(math.prod(s[a] for s in self.strides) for a in range(spatial_dims))
        n_stages = len(features)
        self.stem = ConvNormAct(spatial_dims, in_channels, features[0], kernel_sizes[0],
                                (1,) * spatial_dims)
        self.stages = nn.ModuleList(
            EncoderStage(spatial_dims, features[max(s - 1, 0)], features[s], kernel_sizes[s],
                         strides[s], n_blocks[s])
            for s in range(n_stages)
        )
        with_mamba = {"encoder": range(n_stages), "bottleneck": [n_stages - 1], "none": []}[mamba]
        self.mamba_layers = nn.ModuleList(
            SpatialMamba(features[s], d_state, d_conv, expand, scan_backend)
            if s in with_mamba else nn.Identity()
            for s in range(n_stages)
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Validate ``x``'s rank, channels and spatial size.

        Raises:
            ValueError: wrong number of dimensions or channels, or a spatial size not
                divisible by the product of the strides (the message names both).
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (batch, {self.in_channels}, "
                f"{', '.join('*' * self.spatial_dims)}) for a {self.spatial_dims}D network, "
                f"got {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        if any(n % d for n, d in zip(size, self.divisor, strict=True)):
            raise ValueError(
                f"input spatial size {size} is not divisible by {self.divisor} (the product "
                f"of the strides per axis); pad or crop each axis to a multiple of it"
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, in_channels, *S)`` -> stage outputs, finest first (see class doc)."""
        self.check_input(x)
        x = self.stem(x)
        skips = []
        for stage, mamba_layer in zip(self.stages, self.mamba_layers, strict=True):
            x = mamba_layer(stage(x))
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """U-Net decoder: transposed-conv upsampling, skip concatenation, conv units, 1x1 heads.

    For each decoder level (coarsest first), the coarser map is upsampled by a transposed
    convolution (kernel = stride = that encoder stage's stride) to the skip's channels,
    concatenated with the skip, and passed through ``n_convs`` conv units; a 1x1 convolution
    (with bias) gives the logits of that level (nnU-Net / U-Mamba decoder).

    Input: the encoder's skips, finest first. Output ``(B, out_channels, *S)`` float logits at
    the finest skip's resolution, or, when ``deep_supervision`` and in training mode, the list
    of every level's logits, finest first (``len == n_stages - 1``), level ``i`` at
    ``S / prod(strides[:i+1])``. The coarser heads are only evaluated when returned.

    Args:
        spatial_dims: 2 or 3.
        out_channels: number of classes (background included).
        features, strides, kernel_sizes: the encoder's per-stage settings.
        n_convs: conv units per decoder level, ``n_convs[s]`` for the level producing the
            resolution of encoder stage ``s`` (length ``n_stages - 1``).
        deep_supervision: return every level's logits in training mode.
    """

    def __init__(self, spatial_dims: int, out_channels: int, features: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 n_convs: Sequence[int], deep_supervision: bool = True) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        ones = (1,) * spatial_dims
        upsample, convs, heads = [], [], []
        for s in reversed(range(len(features) - 1)):  # level producing stage s's resolution
            below, skip = features[s + 1], features[s]
            upsample.append(_TRANSPOSED_CONV[spatial_dims](
                below, skip, tuple(strides[s + 1]), tuple(strides[s + 1]), bias=True))
            units = [ConvNormAct(spatial_dims, 2 * skip, skip, kernel_sizes[s], ones)]
            units += [ConvNormAct(spatial_dims, skip, skip, kernel_sizes[s], ones)
                      for _ in range(n_convs[s] - 1)]
            convs.append(nn.Sequential(*units))
            heads.append(_CONV[spatial_dims](skip, out_channels, 1, 1, bias=True))
        self.upsample = nn.ModuleList(upsample)
        self.convs = nn.ModuleList(convs)
        self.seg_heads = nn.ModuleList(heads)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Skips (finest first) -> logits or list of logits (see class doc)."""
        all_levels = self.deep_supervision and self.training
        x = skips[-1]
        outputs = []
        for level, (up, conv) in enumerate(zip(self.upsample, self.convs, strict=True)):
            x = conv(torch.cat((up(x), skips[-(level + 2)]), dim=1))
            if all_levels:
                outputs.append(self.seg_heads[level](x))
        if not all_levels:
            return self.seg_heads[-1](x)
        return outputs[::-1]
