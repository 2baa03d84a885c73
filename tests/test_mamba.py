"""Mamba block and SpatialMamba layer: parameters, initialisation, forward, backends, autocast.

The block is checked against a float64 sequential re-implementation of mamba-ssm's reference
path (Gu & Dao 2023, Algorithm 2) written here from the equations, so wiring errors (softplus,
sign of A, conv cropping, gate) fail even when every scan backend agrees with the others.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import uumamba.nn.mamba as mamba_module
from uumamba.nn import Mamba, SpatialMamba

BACKENDS = ("torch", "cpu")


def mamba_ssm_layout(d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2
                     ) -> dict[str, tuple[int, ...]]:
    """state_dict keys and shapes of mamba_ssm.Mamba (modules/mamba_simple.py), defaults."""
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    return {
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


def reference_mamba(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Float64 sequential Mamba forward from the equations, using ``m``'s parameters."""
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    x = x.double()
    batch, length, _ = x.shape
    d_inner, d_state, k = m.d_inner, m.d_state, m.d_conv
    xz = x @ p["in_proj.weight"].T
    u, z = xz[..., :d_inner], xz[..., d_inner:]  # (B, L, d_inner)
    u_pad = torch.cat([u.new_zeros(batch, k - 1, d_inner), u], dim=1)
    w = p["conv1d.weight"][:, 0, :]  # (d_inner, k), last tap = current position
    conv = torch.stack([(u_pad[:, t:t + k, :] * w.T).sum(1) for t in range(length)], dim=1)
    u = F.silu(conv + p["conv1d.bias"])
    x_dbl = u @ p["x_proj.weight"].T
    dt, bm, cm = x_dbl.split([m.dt_rank, d_state, d_state], dim=-1)
    delta = F.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])  # (B, L, d_inner)
    a = -torch.exp(p["A_log"])
    h = x.new_zeros(batch, d_inner, d_state)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * a) * h \
            + delta[:, t, :, None] * bm[:, t, None, :] * u[:, t, :, None]
        ys.append((h * cm[:, t, None, :]).sum(-1) + p["D"] * u[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ p["out_proj.weight"].T


def test_parameter_names_and_shapes_match_mamba_ssm():
    m = Mamba(40)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == mamba_ssm_layout(40)
    assert (m.d_inner, m.dt_rank) == (80, 3)
    # A state_dict with exactly mamba_ssm's keys and shapes loads strictly.
    foreign = {k: torch.randn(s) for k, s in mamba_ssm_layout(40).items()}
    m.load_state_dict(foreign, strict=True)
    assert torch.equal(m.A_log, foreign["A_log"])


def test_initialisation_statistics():
    torch.manual_seed(0)
    m = Mamba(256, d_state=8)  # d_inner 512, dt_rank 16
    expected_a_log = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(512, 8)
    torch.testing.assert_close(m.A_log.detach(), expected_a_log)
    assert torch.equal(m.D.detach(), torch.ones(512))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay

    dt = F.softplus(m.dt_proj.bias.detach().double())
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform on [log 0.001, log 0.1]: mean log 0.01, std (log 100) / sqrt(12).
    log_dt = dt.log()
    assert abs(log_dt.mean().item() - math.log(0.01)) < 0.25
    assert abs(log_dt.std().item() - math.log(100) / math.sqrt(12)) < 0.2

    bound = 16 ** -0.5
    w = m.dt_proj.weight.detach()
    assert w.abs().max() <= bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_reference(backend):
    torch.manual_seed(1)
    m = Mamba(16, d_state=4, scan_backend=backend)
    x = torch.randn(2, 37, 16)
    y = m(x)
    assert y.shape == (2, 37, 16) and y.dtype == torch.float32
    ref = reference_mamba(m, x)
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-4


def test_forward_is_causal():
    torch.manual_seed(2)
    m = Mamba(16, scan_backend="torch")
    x = torch.randn(1, 20, 16)
    x2 = x.clone()
    x2[:, 12:] += torch.randn(1, 8, 16)
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, :12], y2[:, :12])
    assert (y[:, 12:] - y2[:, 12:]).abs().max() > 1e-3


def test_same_weights_same_output_across_backends():
    torch.manual_seed(3)
    m_torch = Mamba(32, scan_backend="torch")
    m_cpu = Mamba(32, scan_backend="cpu")
    m_cpu.load_state_dict(m_torch.state_dict(), strict=True)
    x = torch.randn(2, 300, 32)
    y_torch, y_cpu = m_torch(x), m_cpu(x)
    scale = y_torch.abs().max()
    assert (y_torch - y_cpu).abs().max() / scale < 1e-5
    # and back: the cpu layer's state_dict reproduces the torch layer exactly
    m_back = Mamba(32, scan_backend="torch")
    m_back.load_state_dict(m_cpu.state_dict(), strict=True)
    assert torch.equal(m_back(x), y_torch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_every_parameter(backend):
    torch.manual_seed(4)
    m = Mamba(16, scan_backend=backend)
    x = torch.randn(2, 25, 16, requires_grad=True)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_gradients_match_between_backends():
    torch.manual_seed(5)
    layers = {b: Mamba(16, scan_backend=b) for b in BACKENDS}
    layers["cpu"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(1, 50, 16)
    grads = {}
    for b, m in layers.items():
        m(x).sum().backward()
        grads[b] = {n: p.grad for n, p in m.named_parameters()}
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["cpu"][name], g, rtol=1e-4, atol=1e-5 * g.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_or_sequence_gives_an_empty_output(backend):
    """B = 0 raised a reshape error on the torch backend and passed on the cpu one; L = 0
    raised conv1d's error on both."""
    layer = Mamba(8, d_state=4, scan_backend=backend)
    for shape in ((0, 5, 8), (2, 0, 8)):
        assert layer(torch.randn(*shape)).shape == shape
        assert layer.mix(torch.randn(*shape).transpose(1, 2)).shape == (shape[0], 8, shape[1])


def test_an_input_of_another_dtype_than_the_layer_is_a_named_type_error():
    layer = Mamba(8, d_state=4, scan_backend="torch")
    for dtype in (torch.float64, torch.bfloat16, torch.int64):
        with pytest.raises(TypeError, match=rf"Mamba: input dtype {dtype} differs from the "
                                            r"layer's parameters \(torch.float32\)"):
            layer(torch.ones(1, 5, 8, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: allowed
        assert layer(torch.randn(1, 5, 8).to(torch.bfloat16)).shape == (1, 5, 8)
    assert layer.double()(torch.randn(1, 5, 8, dtype=torch.float64)).dtype == torch.float64


def test_bad_arguments_raise_named_errors():
    with pytest.raises(ValueError, match="d_state"):
        Mamba(16, d_state=0)
    with pytest.raises(ValueError, match="dt_min"):
        Mamba(16, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match=r"\(batch, length, 16\)"):
        Mamba(16)(torch.randn(2, 5, 8))


@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 5)])
def test_spatial_mamba_is_norm_then_mamba_over_voxels(spatial):
    torch.manual_seed(6)
    layer = SpatialMamba(8, d_state=4, scan_backend="torch")
    x = torch.randn(2, 8, *spatial)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    tokens = x.flatten(2).transpose(1, 2)  # (B, L, C), row-major voxel order
    expected = layer.mamba(layer.norm(tokens)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(y, expected)  # no residual connection, as U-Mamba
    # laid out as a plain (B, C, *S) map, not a channels-last view of the tokens: the
    # decoder's oneDNN convolutions would otherwise run their mixed-layout paths
    assert y.is_contiguous()
    assert layer(x.to(torch.bfloat16)).is_contiguous()


def test_spatial_mamba_runs_in_float32_under_autocast(monkeypatch):
    torch.manual_seed(7)
    layer = SpatialMamba(8, d_state=4, scan_backend="torch")
    seen = []
    scan = mamba_module.selective_scan

    def recording_scan(u, delta, *args, **kwargs):  # in_proj's, x_proj's, dt_proj's outputs
        seen.extend([u.dtype, delta.dtype])
        return scan(u, delta, *args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", recording_scan)
    layer.mamba.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))  # out_proj
    x = torch.randn(1, 8, 4, 4, 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert seen == [torch.float32] * 3
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    # identical to the float32 computation on the same (bf16-representable) values
    expected = layer(x.float()).to(torch.bfloat16)
    assert torch.equal(y, expected)


@pytest.mark.gpu
def test_state_dict_round_trip_with_mamba_ssm(cuda_kernels):
    from mamba_ssm import Mamba as MambaSSM

    torch.manual_seed(8)
    theirs = MambaSSM(d_model=32).cuda()
    ours = Mamba(32, scan_backend="torch").cuda()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 128, 32, device="cuda")
    with torch.no_grad():
        y_theirs, y_ours = theirs(x), ours(x)
    assert (y_ours - y_theirs).abs().max() / y_theirs.abs().max() < 1e-3
    ours_cuda = Mamba(32, scan_backend="cuda").cuda()
    ours_cuda.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert (ours_cuda(x) - y_theirs).abs().max() / y_theirs.abs().max() < 1e-3
    theirs.load_state_dict(ours.cpu().state_dict(), strict=True)
