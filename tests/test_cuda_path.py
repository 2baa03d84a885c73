"""The CUDA path without a GPU (issue 19): the kernel probe, the fallback warning, explicit
``cuda`` as an error, the CUDA kernels' limits, precision by compute capability, and the
warning in the predictor and ``/readyz``.

mamba-ssm and causal-conv1d are replaced by small fake packages written to ``tmp_path``
(with ``.dist-info`` metadata, so versions are reported as for a real install); the probe's
checks run on the CPU through :func:`uumamba.nn.ops.selective_scan.probe_kernels`, and a GPU
is faked by patching ``torch.cuda.is_available`` and the per-GPU probe. The ``gpu``-marked
tests at the end run the real kernels.
"""

from __future__ import annotations

import importlib
import logging
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from uumamba.config import Config, ModelConfig, config_from_dict
from uumamba.errors import ConfigError, UserError
from uumamba.nn import Mamba, UMambaBot, network_scan_backend

scan_mod = importlib.import_module("uumamba.nn.ops.selective_scan")
# uumamba.engine.components (monai, ...) is imported inside the tests that use it, so the gpu
# tests here also collect on a bare GPU machine (scripts/gpu_check.sh).

GPU = torch.device("cuda", 0)

# A faithful stand-in for mamba-ssm's selective_scan_fn (same signature, our reference).
_CORRECT_SCAN = """
from uumamba.nn.ops.selective_scan import selective_scan_torch


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, return_last_state=False):
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
"""

_CORRECT_CONV = """
import torch.nn.functional as F


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    width = weight.shape[-1]
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])
    y = y[..., :x.shape[-1]]
    return F.silu(y) if activation == "silu" else y
"""


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A folder on sys.path for fake packages; every module imported from it (and the probe
    caches) are forgotten afterwards."""
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(scan_mod, "_warned", set())
    cached_probe = scan_mod.probe_cuda_kernels  # tests may patch it; clear the real cache
    cached_probe.cache_clear()
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.split(".")[0] in {"mamba_ssm", "causal_conv1d", "transformers"}:
            del sys.modules[name]
    cached_probe.cache_clear()
    importlib.invalidate_caches()


def _package(root, dist: str, version: str, files: dict[str, str]) -> None:
    """Write a package (``files``: relative path -> source) and its dist-info."""
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


def _mamba_ssm(root, version: str = "2.3.1", init: str = "", scan: str = _CORRECT_SCAN) -> None:
    _package(root, "mamba-ssm", version, {
        "mamba_ssm/__init__.py": init,
        "mamba_ssm/ops/__init__.py": "",
        "mamba_ssm/ops/selective_scan_interface.py": scan,
    })


def _causal_conv1d(root, source: str = _CORRECT_CONV) -> None:
    _package(root, "causal-conv1d", "1.5.3.post1", {"causal_conv1d/__init__.py": source})


def _fake_gpu(monkeypatch) -> None:
    """torch sees a GPU; the per-GPU probe runs its checks (on the fake modules) on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(scan_mod, "probe_cuda_kernels",
                        lambda index: scan_mod.probe_kernels(torch.device("cpu")))


# ------------------------------------------------------------------ the probe

def test_probe_names_the_transformers_5_import_error(fake_site):
    """mamba-ssm 2.2.x with transformers 5: the import fails in mamba_ssm/__init__."""
    _package(fake_site, "transformers", "5.0.0", {
        "transformers/__init__.py": "",
        "transformers/generation/__init__.py": "GenerateDecoderOnlyOutput = object\n",
    })
    _mamba_ssm(fake_site, "2.2.6.post3",
               init="from transformers.generation import GreedySearchDecoderOnlyOutput\n")
    probe = scan_mod.probe_kernels(torch.device("cpu"))
    assert probe.reason.startswith("mamba-ssm 2.2.6.post3 is installed but 'import mamba_ssm' "
                                   "fails: ImportError: cannot import name "
                                   "'GreedySearchDecoderOnlyOutput'")
    assert "install mamba-ssm>=2.3 or transformers<5" in probe.reason
    assert probe.causal_conv1d is False


def test_probe_catches_a_kernel_that_imports_but_raises_on_first_call(fake_site):
    """The next mamba-ssm builds selective_scan_cuda only on request: imports, then raises."""
    _mamba_ssm(fake_site, scan="""
        def selective_scan_fn(*args, **kwargs):
            raise RuntimeError("selective_scan_cuda was not built (set MAMBA_BUILD_SELECTIVE_SCAN)")
        """)
    reason = scan_mod.probe_kernels(torch.device("cpu")).reason
    assert reason == ("mamba-ssm 2.3.1 imports, but its selective_scan_fn failed a test call on "
                      "cpu: RuntimeError: selective_scan_cuda was not built "
                      "(set MAMBA_BUILD_SELECTIVE_SCAN)")


def test_probe_catches_wrong_values(fake_site):
    """A kernel that runs but computes something else (here: D skip ignored) is refused."""
    _mamba_ssm(fake_site, scan=_CORRECT_SCAN.replace("D, z", "None, z"))
    reason = scan_mod.probe_kernels(torch.device("cpu")).reason
    assert "selective_scan_fn failed a test call" in reason
    assert "selective_scan_fn's output differs from the PyTorch reference" in reason


def test_probe_passes_working_kernels_and_reports_causal_conv1d(fake_site):
    _mamba_ssm(fake_site)
    probe = scan_mod.probe_kernels(torch.device("cpu"))
    assert probe == scan_mod.KernelProbe(None, False, "causal-conv1d is not installed: the "
                                         "causal convolution runs as F.conv1d")
    _causal_conv1d(fake_site)
    importlib.invalidate_caches()
    assert scan_mod.probe_kernels(torch.device("cpu")) == scan_mod.KernelProbe(None, True, None)


def test_probe_refuses_a_broken_causal_conv1d(fake_site):
    _mamba_ssm(fake_site)
    _causal_conv1d(fake_site, _CORRECT_CONV.replace('activation == "silu"', "False"))
    reason = scan_mod.probe_kernels(torch.device("cpu")).reason
    assert reason.startswith("causal-conv1d 1.5.3.post1 is installed but its causal_conv1d_fn "
                             "failed a test call on cpu: RuntimeError: causal_conv1d_fn's "
                             "output differs from the PyTorch reference")


def test_probe_without_mamba_ssm():
    assert not scan_mod.mamba_ssm_installed()  # this CPU machine has none
    assert scan_mod.probe_kernels(torch.device("cpu")).reason == (
        "mamba-ssm is not installed (pip install 'uumamba[gpu]')")


# ------------------------------------------------------------------ auto falls back loudly, cuda fails

def test_auto_on_a_gpu_warns_once_with_the_reason(fake_site, monkeypatch, caplog):
    _mamba_ssm(fake_site, scan="""
        def selective_scan_fn(*args, **kwargs):
            raise RuntimeError("no kernel image is available for execution on the device")
        """)
    _fake_gpu(monkeypatch)
    choice = scan_mod.choose_scan_backend("auto", GPU)
    assert choice.backend == "torch"
    assert choice.warning == (
        "selective scan on cuda:0 runs the torch backend, not mamba-ssm's CUDA kernels: "
        "mamba-ssm 2.3.1 imports, but its selective_scan_fn failed a test call on cpu: "
        "RuntimeError: no kernel image is available for execution on the device")
    with caplog.at_level(logging.WARNING, logger="uumamba"):
        assert scan_mod.resolve_scan_backend("auto", GPU) == "torch"
        assert scan_mod.resolve_scan_backend("auto", GPU) == "torch"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [choice.warning]


def test_explicit_cuda_that_cannot_run_is_an_error_with_the_reason(fake_site, monkeypatch):
    _package(fake_site, "transformers", "5.0.0", {
        "transformers/__init__.py": "", "transformers/generation/__init__.py": ""})
    _mamba_ssm(fake_site, "2.2.6.post3",
               init="from transformers.generation import GreedySearchDecoderOnlyOutput\n")
    _fake_gpu(monkeypatch)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is unavailable: mamba-ssm 2\.2\.6\.post3 "
                       r"is installed but 'import mamba_ssm' fails: ImportError: cannot import "
                       r"name 'GreedySearchDecoderOnlyOutput'"):
        scan_mod.resolve_scan_backend("cuda", GPU)
    monkeypatch.setenv(scan_mod.ENV_VAR, "cuda")  # the environment asks for it: same error
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        scan_mod.resolve_scan_backend("auto", GPU)


def test_working_kernels_are_chosen_by_auto_without_warning(fake_site, monkeypatch, caplog):
    _mamba_ssm(fake_site)
    _causal_conv1d(fake_site)
    _fake_gpu(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="uumamba"):
        assert scan_mod.choose_scan_backend("auto", GPU) == scan_mod.ScanBackendChoice("cuda")
        assert scan_mod.resolve_scan_backend("cuda", GPU) == "cuda"
    assert caplog.records == []
    assert scan_mod.causal_conv1d_usable(GPU)
    # an explicit torch / cpu choice is the user's: no warning even with mamba-ssm installed
    assert scan_mod.choose_scan_backend("torch", GPU) == scan_mod.ScanBackendChoice("torch")


def test_mamba_ssm_installed_but_cpu_runs_is_reported(fake_site):
    _mamba_ssm(fake_site)
    choice = scan_mod.choose_scan_backend("auto", "cpu")
    assert choice == scan_mod.ScanBackendChoice(
        "cpu", "mamba-ssm is installed but the selective scan runs the cpu backend: the tensors "
               "are on device 'cpu', not on a CUDA device")


def test_no_warning_on_cpu_without_mamba_ssm(monkeypatch):
    monkeypatch.setattr(scan_mod, "_warned", set())
    assert scan_mod.choose_scan_backend("auto", "cpu") == scan_mod.ScanBackendChoice("cpu")


# ------------------------------------------------------------------ the CUDA kernels' limits

@pytest.mark.parametrize(("key", "value", "words"), [
    ("d_conv", 5, "model.d_conv=5 is outside 2..4, the widths causal-conv1d's CUDA kernel supports"),
    ("d_conv", 1, "model.d_conv=1 is outside 2..4"),
    ("d_state", 257, "model.d_state=257 exceeds 256, the largest state size mamba-ssm's "
                     "selective_scan CUDA kernel supports"),
])
def test_config_with_cuda_backend_names_the_key_and_the_limit(key, value, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"scan_backend": "cuda", key: value}}, "run.yaml")
    assert "run.yaml: invalid configuration: 'model.scan_backend'" in str(err.value)
    assert words in str(err.value)
    # the same settings are fine for backends without these limits
    assert getattr(config_from_dict({"model": {"scan_backend": "torch", key: value}}).model,
                   key) == value
    assert getattr(ModelConfig(**{key: value}), key) == value  # auto: checked on the device


def test_mamba_layer_limits_for_explicit_cuda_and_for_auto_on_a_gpu():
    with pytest.raises(ValueError, match=r"Mamba\(scan_backend='cuda'\): d_conv=5 is outside 2\.\.4"):
        Mamba(16, d_conv=5, scan_backend="cuda")
    with pytest.raises(ValueError, match="d_state=300 exceeds 256"):
        Mamba(16, d_state=300, scan_backend="cuda")
    layer = Mamba(16, d_conv=5)  # auto: built anywhere, refused where the kernels may run
    with pytest.raises(ValueError, match=r"scan_backend='auto' on cuda:0, where the scan is or "
                       r"may be mamba-ssm's CUDA kernels\): d_conv=5 is outside 2\.\.4"):
        network_scan_backend([layer], GPU)
    with pytest.raises(TypeError, match=r"dtype torch\.float64 is not one of float32 / float16 / "
                       r"bfloat16"):
        Mamba(16).check_cuda_limits(torch.float64, GPU)
    assert scan_mod.cuda_may_run("auto", GPU) and not scan_mod.cuda_may_run("auto", "cpu")
    assert not scan_mod.cuda_may_run("torch", GPU)
    # on the CPU and with the torch backend the layer runs outside those limits (float64 too)
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    assert layer.double()(x).dtype == torch.float64
    assert network_scan_backend([Mamba(16, d_conv=5, scan_backend="torch")], GPU).backend == "torch"


def test_cuda_scan_refuses_float64_and_large_states(monkeypatch):
    """float64 would be computed in float32 by mamba-ssm without a word: refused instead."""
    monkeypatch.setattr(scan_mod, "cuda_backend_status", lambda device: None)
    u = torch.randn(1, 2, 5, dtype=torch.float64)
    A = -torch.rand(2, 3, dtype=torch.float64)
    B = torch.randn(1, 3, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="selective-scan backend 'cuda': dtype torch.float64"):
        scan_mod.selective_scan_cuda(u, u, A, B, B)
    A, B = -torch.rand(2, 300), torch.randn(1, 300, 5)
    with pytest.raises(ValueError, match="d_state=300 exceeds 256"):
        scan_mod.selective_scan_cuda(u.float(), u.float(), A, B, B)


def test_network_scan_backend_reports_the_fallback(fake_site, monkeypatch):
    _mamba_ssm(fake_site, scan="def selective_scan_fn(*a, **k):\n    raise OSError('libcudart.so.12: cannot open')\n")
    _fake_gpu(monkeypatch)
    net = UMambaBot(2, 1, 2, features=[4, 8], strides=[1, 2], d_state=4)
    choice = network_scan_backend([net], GPU)
    assert choice.backend == "torch"
    assert choice.warning.endswith("failed a test call on cpu: OSError: libcudart.so.12: cannot open")
    assert network_scan_backend([torch.nn.Conv2d(1, 1, 1)], GPU) is None


def test_build_components_refuses_cuda_that_cannot_run():
    from uumamba.engine.components import build_components

    cfg = Config(model=ModelConfig(name="umamba_bot", spatial_dims=2, features=[4, 8],
                                   d_state=4, scan_backend="cuda"))
    plans = SimpleNamespace(spatial_dims=2, num_input_channels=1, num_classes=2,
                            strides=[[1, 1], [2, 2]], kernel_sizes=[[3, 3]] * 2)
    with pytest.raises(ConfigError, match=r"model\.scan_backend='cuda' on cpu: selective-scan "
                       r"backend 'cuda' is unavailable: the tensors are on device 'cpu'"):
        build_components(cfg, plans, torch.device("cpu"), 10)


# ------------------------------------------------------------------ precision by compute capability

@pytest.mark.parametrize(("capability", "dtype", "scaled"), [
    ((6, 0), torch.float16, True), ((7, 0), torch.float16, True), ((7, 5), torch.float16, True),
    ((8, 0), torch.bfloat16, False), ((8, 6), torch.bfloat16, False), ((9, 0), torch.bfloat16, False),
])
def test_auto_precision_follows_compute_capability(monkeypatch, capability, dtype, scaled):
    from uumamba.engine.components import select_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts
    autocast, scaler = select_precision("auto", GPU)
    assert autocast == dtype
    assert isinstance(scaler, torch.amp.GradScaler) if scaled else scaler is None
    assert select_precision("off", GPU) == (None, None)


def test_forced_bf16_on_an_old_gpu_is_a_config_error(monkeypatch):
    from uumamba.engine.components import select_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ConfigError, match=r"train\.amp=bf16: cuda:0 has compute capability 7\.5"):
        select_precision("bf16", GPU)
    autocast, scaler = select_precision("fp16", GPU)
    assert autocast == torch.float16 and isinstance(scaler, torch.amp.GradScaler)


# ------------------------------------------------------------------ predictor and /readyz

def test_predictor_and_readyz_report_the_fallback(fake_site, monkeypatch):
    """mamba-ssm installed, yet the cpu backend runs: the predictor and /readyz say why."""
    import service_fixtures
    from fastapi.testclient import TestClient

    from uumamba.inference.predict import Predictor
    from uumamba_service.app import create_app

    model_dir = service_fixtures.build_tiny_model(fake_site / "tiny")
    plain = Predictor.from_model_dir(model_dir, device="cpu")
    assert plain.scan_backend == "cpu" and plain.scan_backend_warning is None
    _mamba_ssm(fake_site)
    predictor = Predictor.from_model_dir(model_dir, device="cpu")
    assert predictor.scan_backend == "cpu"
    assert predictor.scan_backend_warning == (
        "mamba-ssm is installed but the selective scan runs the cpu backend: the tensors are "
        "on device 'cpu', not on a CUDA device")
    app = create_app(service_fixtures.service_settings(model_dir), predictor=predictor)
    with TestClient(app) as client:
        ready = service_fixtures.wait_ready(client)
    assert ready["scan_backend"] == "cpu"
    assert ready["scan_backend_warning"] == predictor.scan_backend_warning


def test_predictor_reports_the_configured_backend(tmp_path):
    """model.scan_backend is what the predictor reports (not what auto would pick)."""
    import service_fixtures

    from uumamba.inference.predict import Predictor

    model_dir = service_fixtures.build_tiny_model(tmp_path / "tiny")
    nets = Predictor.from_model_dir(model_dir, device="cpu").networks
    for layer in (m for net in nets for m in net.modules() if isinstance(m, Mamba)):
        layer.scan_backend = "torch"
    predictor = Predictor(nets, Predictor.from_model_dir(model_dir, device="cpu").plans,
                          device="cpu")
    assert predictor.scan_backend == "torch" and predictor.scan_backend_warning is None
    for layer in (m for net in nets for m in net.modules() if isinstance(m, Mamba)):
        layer.scan_backend = "cuda"
    with pytest.raises(UserError, match="model.scan_backend: selective-scan backend 'cuda' is "
                       "unavailable: the tensors are on device 'cpu'"):
        Predictor(nets, predictor.plans, device="cpu")


# ------------------------------------------------------------------ on a GPU with mamba-ssm

@pytest.mark.gpu
def test_real_kernels_pass_the_probe_and_are_chosen(cuda_kernels):
    probe = scan_mod.probe_cuda_kernels(torch.cuda.current_device())
    assert probe.reason is None and probe.causal_conv1d, probe
    assert scan_mod.choose_scan_backend("auto", "cuda") == scan_mod.ScanBackendChoice("cuda")


@pytest.mark.gpu
def test_real_kernel_limits_on_the_gpu(cuda_kernels):
    with pytest.raises(ValueError, match="d_conv=5 is outside 2..4"):
        Mamba(16, d_conv=5).cuda()(torch.randn(1, 8, 16, device="cuda"))
    with pytest.raises(TypeError, match="float64"):
        Mamba(16).cuda().double()(torch.randn(1, 8, 16, device="cuda", dtype=torch.float64))
    y = Mamba(16, d_conv=5, scan_backend="torch").cuda()(torch.randn(1, 8, 16, device="cuda"))
    assert y.shape == (1, 8, 16) and torch.isfinite(y).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_precision_matches_the_capability():
    from uumamba.device import native_bf16

    major, _ = torch.cuda.get_device_capability()
    assert native_bf16(torch.device("cuda")) == (major >= 8)


# ------------------------------------------------------------------ scripts/gpu_check.*

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_comparison_runs_on_the_cpu_backends():
    """The comparison the GPU script makes, with the backends this machine has."""
    gpu_check = _gpu_check_module()
    results = gpu_check.compare_backends(
        {"ours torch": (lambda: Mamba(16, scan_backend="torch"), "cpu"),
         "ours cpu": (lambda: Mamba(16, scan_backend="cpu"), "cpu")},
        d_model=16, length=300, batch=1)
    assert [r.name for r in results] == ["ours torch", "ours cpu"]
    assert results[0].value_error == 0.0 and results[0].grad_error == 0.0  # the reference itself
    assert results[1].ok and 0 < results[1].value_error < gpu_check.VALUE_TOL
    assert results[1].line().endswith("OK")

    class Off(Mamba):  # a wrong backend must be reported as FAIL
        def forward(self, x):
            return super().forward(x) * 1.01

    (bad,) = gpu_check.compare_backends({"off": (lambda: Off(16, scan_backend="torch"), "cpu")},
                                        d_model=16, length=50, batch=1)
    assert not bad.ok and bad.value_error == pytest.approx(0.01, rel=1e-3)
    assert bad.line().endswith("FAIL")


def test_gpu_check_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _gpu_check_module().main([]) == 1
    assert "no CUDA device" in capsys.readouterr().out


def test_gpu_check_shell_script_builds_the_dockerfile_pins():
    import subprocess

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    assert "sed -n 's/^ARG MAMBA_SSM_VERSION=//p' Dockerfile" in script
    assert "sed -n 's/^ARG CAUSAL_CONV1D_VERSION=//p' Dockerfile" in script
    assert "TORCH_CUDA_ARCH_LIST=$ARCH" in script and "get_device_capability" in script
    assert "-m gpu" in script and "scripts/gpu_check.py" in script
