"""U-Mamba networks (Bot, Enc, plain U-Net): shapes, deep supervision, validation, autocast,
initialisation, build_network and a short training run. Tiny channels and patches (CPU)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from uumamba.config import ModelConfig
from uumamba.nn import SpatialMamba, UMamba, UMambaBot, UMambaEnc, build_network

TINY = {"features": [4, 8, 16], "d_state": 4, "scan_backend": "torch"}


def _net(mamba: str, spatial_dims: int, **kwargs) -> UMamba:
    settings = {**TINY, **kwargs}
    return UMamba(spatial_dims, 2, 3, mamba=mamba, **settings)


@pytest.mark.parametrize("mamba", ["bottleneck", "encoder", "none"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_train_and_eval_output_shapes(mamba, spatial_dims):
    torch.manual_seed(0)
    strides = [1, [2] * (spatial_dims - 1) + [1], 2]  # anisotropic second stage
    net = _net(mamba, spatial_dims, strides=strides)
    size = (8, 12, 16)[:spatial_dims] if spatial_dims == 3 else (12, 8)
    x = torch.randn(2, 2, *size)
    net.train()
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == net.n_deep_supervision_outputs == 2
    assert outs[0].shape == (2, 3, *size)
    assert outs[1].shape == (2, 3, *[n // 2 for n in size[:-1]], size[-1])
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_variants_place_mamba_layers():
    counts = {}
    for cls in (UMambaBot, UMambaEnc):
        net = cls(3, 1, 2, **TINY)
        counts[cls.__name__] = [isinstance(m, SpatialMamba) for m in net.encoder.mamba_layers]
    counts["none"] = [isinstance(m, SpatialMamba)
                      for m in UMamba(3, 1, 2, mamba="none", **TINY).encoder.mamba_layers]
    assert counts == {"UMambaBot": [False, False, True], "UMambaEnc": [True, True, True],
                      "none": [False, False, False]}
    bot = UMambaBot(3, 1, 2, **TINY)
    assert bot.mamba == "bottleneck"
    # the Mamba layer at the bottleneck works on the deepest features
    assert bot.encoder.mamba_layers[-1].mamba.d_model == 16


def test_default_features_and_deep_supervision_count():
    net = UMamba(3, 1, 4, strides=[1, 2, 2, 2, 2, 2, 2], mamba="none")
    assert net.features == (32, 64, 128, 256, 320, 320, 320)
    assert net.n_deep_supervision_outputs == 6
    assert net.divisor == (64, 64, 64)
    assert UMamba(2, 1, 4, mamba="none", deep_supervision=False).n_deep_supervision_outputs == 1


def test_no_deep_supervision_returns_tensor_in_training():
    net = _net("bottleneck", 2, deep_supervision=False).train()
    out = net(torch.randn(1, 2, 8, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 8, 8)


def test_bad_spatial_size_names_size_and_divisor():
    net = _net("bottleneck", 3, strides=[1, [1, 2, 2], 2])
    assert net.divisor == (2, 4, 4)
    with pytest.raises(ValueError, match=r"\(4, 10, 8\).*\(2, 4, 4\)"):
        net(torch.randn(1, 2, 4, 10, 8))
    with pytest.raises(ValueError, match="channels|shape"):
        net(torch.randn(1, 1, 4, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"strides": [1, 2]}, "strides"),
        ({"strides": [1, 0, 2]}, r"strides\[1\]"),
        ({"strides": [[1, 1], 2, 2]}, r"strides\[0\]"),
        ({"strides": [2, 2, 2]}, r"strides\[0\]"),
        ({"kernel_sizes": [3, 4, 3]}, "kernel_sizes"),
        ({"n_blocks_per_stage": [1, 1]}, "n_blocks_per_stage"),
        ({"n_conv_per_stage_decoder": [1, 1, 1]}, "n_conv_per_stage_decoder"),
        ({"mamba": "everywhere"}, "mamba"),
        ({"features": [4]}, "at least 2 stages"),
        ({"out_channels": 0}, "out_channels"),
        ({"spatial_dims": 4}, "spatial_dims"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(kwargs, argument):
    settings = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, **TINY, **kwargs}
    with pytest.raises(ValueError, match=argument):
        UMamba(**settings)


def test_convolutions_use_he_initialisation():
    torch.manual_seed(0)
    net = UMamba(3, 1, 2, features=[32, 64, 64], mamba="bottleneck", d_state=4)
    gain = math.sqrt(2.0 / (1 + 0.01**2))
    checked = 0
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            fan_in = torch.nn.init._calculate_fan_in_and_fan_out(module.weight)[0]
            if module.weight.numel() >= 20000:
                std = module.weight.std().item()
                assert abs(std - gain / math.sqrt(fan_in)) < 0.05 * gain / math.sqrt(fan_in)
                checked += 1
            assert torch.count_nonzero(module.bias) == 0
    assert checked >= 4
    # Mamba's depthwise Conv1d keeps PyTorch's default (non-zero bias), as mamba-ssm
    assert torch.count_nonzero(net.encoder.mamba_layers[-1].mamba.conv1d.bias) > 0


def test_autocast_bf16_forward_is_finite_and_mamba_runs_fp32():
    torch.manual_seed(1)
    net = _net("encoder", 3).eval()
    dtypes = []
    for layer in net.encoder.mamba_layers:
        layer.mamba.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.shape == (1, 3, 8, 8, 8) and out.is_floating_point()
    assert torch.isfinite(out.float()).all()
    assert dtypes == [torch.float32] * 3
    with torch.no_grad():
        ref = net(x)
    # bf16 convolutions: agreement to bf16 precision of the logits
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_same_weights_same_output_across_scan_backends():
    torch.manual_seed(2)
    nets = {b: UMambaEnc(2, 1, 2, features=[4, 8], strides=[1, 2], d_state=4, scan_backend=b)
            for b in ("torch", "cpu")}
    nets["cpu"].load_state_dict(nets["torch"].state_dict(), strict=True)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        y = {b: n.eval()(x) for b, n in nets.items()}
    assert (y["cpu"] - y["torch"]).abs().max() < 1e-4 * y["torch"].abs().max()


def _square_data(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with a bright square (label 1) on a dark background (label 0)."""
    g = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(n, 1, size, size, generator=g)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        images[i, 0, r:r + 6, c:c + 6] += 1.0
        labels[i, r:r + 6, c:c + 6] = 1
    return images, labels


def test_sgd_steps_reduce_segmentation_loss():
    torch.manual_seed(3)
    net = UMambaBot(2, 1, 2, features=[8, 16, 32], d_state=4, deep_supervision=False,
                    scan_backend="torch").train()
    images, labels = _square_data(4, 16, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    net.eval()
    with torch.no_grad():
        pred = net(images).argmax(1)
    inter = ((pred == 1) & (labels == 1)).sum().item()
    dice = 2 * inter / ((pred == 1).sum().item() + (labels == 1).sum().item())
    assert dice > 0.9


def _plans(spatial_dims: int) -> SimpleNamespace:
    return SimpleNamespace(
        spatial_dims=spatial_dims,
        num_input_channels=2,
        labels={0: "background", 1: "RV", 2: "MYO", 3: "LV"},
        num_classes=4,
        strides=[[1] * spatial_dims, [2] * spatial_dims, [1] + [2] * (spatial_dims - 1)],
        kernel_sizes=[[3] * spatial_dims] * 3,
    )


@pytest.mark.parametrize(("name", "mode"), [("umamba_bot", "bottleneck"),
                                            ("umamba_enc", "encoder"), ("unet", "none")])
def test_build_network_from_config_and_plans(name, mode):
    cfg = ModelConfig(name=name, spatial_dims=3, features=[4, 8, 16], d_state=4,
                      n_blocks_per_stage=[1, 2, 2], scan_backend="torch")
    net = build_network(cfg, _plans(3))
    assert net.mamba == mode
    assert (net.in_channels, net.out_channels, net.features) == (2, 4, (4, 8, 16))
    assert net.strides == ((1, 1, 1), (2, 2, 2), (1, 2, 2))
    assert len(net.encoder.stages[1]) == 2
    out = net.eval()(torch.randn(1, 2, 4, 8, 8))
    assert out.shape == (1, 4, 4, 8, 8)


def test_build_network_rejects_spatial_dims_mismatch():
    cfg = ModelConfig(name="umamba_bot", spatial_dims=3)
    with pytest.raises(ValueError, match="spatial_dims"):
        build_network(cfg, _plans(2))
