"""Selective-scan backends against a float64 sequential reference (issue 2, "Selective scan").

The reference below is the recurrence written one position at a time in float64, as in
mamba-ssm's ``selective_scan_ref``. The cpu (numba) and torch backends must match it to
1e-4 of max|y| in float32, and their gradients must match its autograd gradients.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from uumamba.nn.ops import (
    ENV_VAR,
    resolve_scan_backend,
    selective_scan,
    selective_scan_cpu,
    selective_scan_torch,
)

# the package re-exports the function under the submodule's name, so fetch modules explicitly
scan_cpu = importlib.import_module("uumamba.nn.ops.scan_cpu")
scan_mod = importlib.import_module("uumamba.nn.ops.selective_scan")
scan_torch = importlib.import_module("uumamba.nn.ops.scan_torch")

BACKENDS = ["cpu", "torch"]
OPTION_SETS = {
    "plain": dict(use_D=False, use_z=False, use_bias=False, softplus=False),
    "all": dict(use_D=True, use_z=True, use_bias=True, softplus=True),
    "D_z": dict(use_D=True, use_z=True, use_bias=False, softplus=False),
    "bias_softplus": dict(use_D=False, use_z=False, use_bias=True, softplus=True),
}


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Sequential selective scan in float64 (differentiable): h_t = exp(dt A) h_{t-1} + dt B_t u_t."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, length = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * u[:, :, t, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y


def make_inputs(length, batch=2, d_inner=6, d_state=5, dtype=torch.float32, seed=0,
                use_D=True, use_z=True, use_bias=True, softplus=True):
    """Random inputs shaped like a Mamba block's; A < 0 as -exp(A_log)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    delta = rnd(batch, d_inner, length, scale=0.5)
    if not softplus:  # raw step sizes must then be positive themselves
        delta = delta.abs() + 0.05
    A = -torch.exp(rnd(d_inner, d_state, scale=0.5))
    return dict(
        u=rnd(batch, d_inner, length),
        delta=delta,
        A=A,
        B=rnd(batch, d_state, length),
        C=rnd(batch, d_state, length),
        D=rnd(d_inner) if use_D else None,
        z=rnd(batch, d_inner, length) if use_z else None,
        delta_bias=rnd(d_inner, scale=0.3) if use_bias else None,
        delta_softplus=softplus,
    )


@functools.cache
def _case(length, options):
    inputs = make_inputs(length, **OPTION_SETS[options])
    with torch.no_grad():
        return inputs, reference_scan(**inputs)


def _rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 7, 64, 4097])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_forward_matches_reference(backend, length, options):
    inputs, ref = _case(length, options)
    out = selective_scan(**inputs, backend=backend)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", ["D_z", "bias_softplus"])
def test_forward_option_mixes(backend, options):
    inputs, ref = _case(300, options)
    assert _rel_err(selective_scan(**inputs, backend=backend), ref) <= 1e-4


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few positions, so short sequences cross several chunk / sub-block edges."""
    monkeypatch.setattr(scan_cpu, "CHUNK", 8)
    monkeypatch.setattr(scan_torch, "TORCH_CHUNK", 8)
    monkeypatch.setattr(scan_torch, "_BLOCK_MAX", 4)


def _grads(fn, inputs, grad_out):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()
              if isinstance(v, torch.Tensor)}
    flags = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
    out = fn(**leaves, **flags)
    out.backward(grad_out.to(out.dtype))
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", ["all", "plain"])
def test_gradients_match_reference(backend, options, small_chunks):
    inputs = make_inputs(37, **OPTION_SETS[options], seed=1)
    grad_out = torch.randn(2, 6, 37, generator=torch.Generator().manual_seed(2))
    expected = _grads(reference_scan, {k: v.double() if isinstance(v, torch.Tensor) else v
                                       for k, v in inputs.items()}, grad_out.double())
    got = _grads(functools.partial(selective_scan, backend=backend), inputs, grad_out)
    assert set(got) == set(expected)
    for name, g in got.items():
        assert g is not None and g.dtype == torch.float32, name
        assert _rel_err(g, expected[name]) <= 2e-4, name


def test_cpu_kernel_blocks_of_several_scans_over_several_chunks(small_chunks):
    """38 (batch, channel) scans share out into blocks of several (at most 8 x threads
    blocks), each crossing five chunks: outputs and every gradient as the reference's."""
    inputs = make_inputs(37, batch=2, d_inner=19, seed=4)
    grad_out = torch.randn(2, 19, 37, generator=torch.Generator().manual_seed(5))
    expected = _grads(reference_scan, {k: v.double() if isinstance(v, torch.Tensor) else v
                                       for k, v in inputs.items()}, grad_out.double())
    with torch.no_grad():
        ref = reference_scan(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                for k, v in inputs.items()})
    assert _rel_err(selective_scan(**inputs, backend="cpu"), ref) <= 1e-5
    got = _grads(functools.partial(selective_scan, backend="cpu"), inputs, grad_out)
    for name, g in got.items():
        assert _rel_err(g, expected[name]) <= 2e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_step", [12.0, 150.0])
def test_strong_decay_forward_and_gradients(backend, max_step, small_chunks):
    """Step sizes far above Mamba's init (max delta * |A| of 12 and 150 per step): the torch
    backend then shortens its blocks to 4 positions and, for 150, floors log-decays at -16;
    both backends must still match the reference in value and gradient."""
    inputs = make_inputs(157, **OPTION_SETS["plain"], seed=4)
    inputs["delta"] = inputs["delta"] * (max_step / inputs["delta"].max() / inputs["A"].abs().max())
    block, floored = scan_torch._block_length(inputs["delta"].transpose(1, 2), inputs["A"])
    assert block == 4 and floored == (max_step > 16)
    grad_out = torch.randn(2, 6, 157, generator=torch.Generator().manual_seed(5))
    expected = _grads(reference_scan, {k: v.double() if isinstance(v, torch.Tensor) else v
                                       for k, v in inputs.items()}, grad_out.double())
    got = _grads(functools.partial(selective_scan, backend=backend), inputs, grad_out)
    for name, g in got.items():
        tol = 1e-4 if name == "A" else 2e-5  # A's gradient sums products of tiny decays
        assert _rel_err(g, expected[name]) <= tol, name
    with torch.no_grad():
        out = selective_scan(**inputs, backend=backend)
    assert _rel_err(out, reference_scan(**inputs)) <= 1e-5


def test_torch_backend_float64_keeps_float64_accuracy():
    """Range and floor follow the dtype: at large steps float64 stays ~1e-12 accurate."""
    inputs = make_inputs(157, dtype=torch.float64, **OPTION_SETS["plain"], seed=6)
    inputs["delta"] = inputs["delta"] * (40.0 / inputs["delta"].max() / inputs["A"].abs().max())
    grad_out = torch.randn(2, 6, 157, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = _grads(reference_scan, inputs, grad_out)
    got = _grads(selective_scan_torch, inputs, grad_out)
    for name, g in got.items():
        assert g.dtype == torch.float64 and _rel_err(g, expected[name]) <= 1e-11, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_inputs_are_refused(backend):
    inputs = make_inputs(8, **OPTION_SETS["all"])
    inputs["u"] = inputs["u"].long()
    with pytest.raises(TypeError, match="u must be a floating-point tensor"):
        selective_scan(**inputs, backend=backend)


def test_empty_sequence():
    inputs = make_inputs(0, **OPTION_SETS["all"])
    for backend in BACKENDS:
        assert selective_scan(**inputs, backend=backend).shape == (2, 6, 0)


@pytest.mark.parametrize("fn", [selective_scan_torch, selective_scan_cpu],
                         ids=["torch", "cpu"])
@pytest.mark.parametrize("softplus", [True, False])
def test_gradcheck_float64(fn, softplus, small_chunks):
    """Both backends compute in float64 for float64 inputs, so gradcheck applies to both."""
    inputs = make_inputs(9, batch=1, d_inner=2, d_state=2, dtype=torch.float64, seed=3,
                         softplus=softplus)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    tensors = [inputs[k].requires_grad_() for k in names]
    assert torch.autograd.gradcheck(
        lambda *t: fn(*t, delta_softplus=softplus), tensors, eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bfloat16_keeps_float32_accuracy(backend):
    inputs, ref = _case(64, "all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(**inputs, backend=backend)
    assert out.dtype == torch.float32
    assert _rel_err(out, ref) <= 1e-4
    # bfloat16 inputs: computed in float32, returned in u's dtype (one bfloat16 rounding)
    half = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = selective_scan(**half, backend=backend)
    assert out_bf16.dtype == torch.bfloat16
    ref_rounded = reference_scan(**half)
    assert _rel_err(out_bf16, ref_rounded) <= 8e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_saved_for_backward_is_bounded(backend):
    """Storage kept for backward stays far below one (batch, d_inner, L, d_state) tensor."""
    inputs = make_inputs(1024, batch=1, d_inner=16, d_state=64)
    leaves = {k: v.requires_grad_() if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    storages = {}

    def pack(t):  # chunk views share their storage: count each storage once
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan(**leaves, backend=backend)
    out.sum().backward()
    full = 1 * 16 * 1024 * 64 * 4
    assert 0 < sum(storages.values()) < full / 4
    assert leaves["A"].grad.shape == (16, 64) and torch.isfinite(leaves["A"].grad).all()


def test_resolve_auto_and_env_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_scan_backend("auto", cpu) == "cpu"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_scan_backend("auto", cpu) == "torch"
    assert resolve_scan_backend("cpu", cpu) == "cpu"  # an explicit choice wins
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='fast'"):
        resolve_scan_backend("auto", cpu)
    with pytest.raises(ValueError, match="'numba'"):
        resolve_scan_backend("numba", cpu)


def test_env_override_changes_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(scan_mod, "selective_scan_torch",
                        lambda *a: calls.append("torch") or scan_mod.finish_output(a[0], a[0], None, None))
    inputs, _ = _case(7, "plain")
    monkeypatch.setenv(ENV_VAR, "torch")
    selective_scan(**inputs)
    assert calls == ["torch"]


def test_cuda_backend_on_cpu_is_a_clear_error():
    inputs, _ = _case(7, "plain")
    with pytest.raises(RuntimeError, match="'cuda' is unavailable: the tensors are on device 'cpu'"):
        selective_scan(**inputs, backend="cuda")


def test_cpu_backend_rejects_non_cpu_device():
    with pytest.raises(ValueError, match="needs CPU tensors"):
        resolve_scan_backend("cpu", torch.device("meta"))


def test_wrong_shapes_name_the_argument():
    inputs, _ = _case(7, "all")
    bad = dict(inputs, B=inputs["B"][:, :, :5])
    with pytest.raises(ValueError, match=r"B must have shape \(2, 5, 7\)"):
        selective_scan(**bad, backend="torch")
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**dict(inputs, A=inputs["A"][:3]), backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("options", ["plain", "all"])
def test_parity_with_mamba_ssm(options, cuda_kernels):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    inputs = make_inputs(1000, batch=2, d_inner=16, d_state=16, **OPTION_SETS[options])
    cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    grad_out = torch.randn(2, 16, 1000, device="cuda")
    expected = _grads(selective_scan_fn, cuda, grad_out)
    ref_out = selective_scan_fn(**cuda)
    for backend in ("cuda", "torch"):
        out = selective_scan(**cuda, backend=backend)
        assert _rel_err(out, ref_out.double()) <= 1e-4, backend
        got = _grads(functools.partial(selective_scan, backend=backend), cuda, grad_out)
        for name, g in got.items():
            assert _rel_err(g, expected[name].double()) <= 1e-3, (backend, name)
    cpu_out = selective_scan(**inputs, backend="cpu")
    assert _rel_err(cpu_out, ref_out.cpu().double()) <= 1e-4


def test_cpu_kernel_keeps_torch_thread_count():
    """numba's OpenMP launch must not change torch's intra-op thread count (reproducibility,
    no oversubscription)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        u = torch.randn(1, 4, 8, requires_grad=True)
        y = selective_scan(u, torch.rand(1, 4, 8), -torch.rand(4, 2), torch.randn(1, 2, 8),
                           torch.randn(1, 2, 8), backend="cpu")
        y.sum().backward()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_kernel_refuses_shapes_it_would_read_past():
    """The fused kernels index by u's and A's sizes: a short B (or delta, A) must be refused
    before them, not read past its end (which returned NaN or crashed the process)."""
    from uumamba.nn.ops.scan_cpu import selective_scan_cpu

    inputs = make_inputs(16)
    short_b = dict(inputs, B=inputs["B"][:, :, :3])
    with pytest.raises(ValueError, match=r"selective_scan: B must have shape"):
        selective_scan_cpu(**short_b)
    with pytest.raises(ValueError, match=r"selective_scan: A must be \(d_inner="):
        selective_scan_cpu(**dict(inputs, A=inputs["A"][:1]))
