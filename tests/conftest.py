"""Shared pytest fixtures.

``acdc_dir``: the real ACDC patients in ``../shared/data/ACDC`` (beside the checkout); tests that
use it are skipped with a clear reason when the folder is absent. The data are never copied into
the repository. ``UUMAMBA_ACDC_DIR`` points elsewhere if needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see uumamba/__init__.py
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ACDC_DIR = Path(os.environ.get("UUMAMBA_ACDC_DIR", REPO_ROOT.parent / "shared" / "data" / "ACDC"))

# The service's default state folder ($XDG_STATE_HOME/uumamba/service/...) must never be the
# user's real one in tests: one throw-away folder per test session (subprocesses inherit it).
if "UUMAMBA_TEST_STATE_HOME" not in os.environ:
    import tempfile

    os.environ["UUMAMBA_TEST_STATE_HOME"] = os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(
        prefix="uumamba-test-state-")

# float32 on every CPU unless a test asks for bf16 (monkeypatch.setenv(..., "1")): the suite's
# numerical expectations must not depend on whether the host CPU has bf16 units (AMX or
# AVX512-BF16; uumamba.device).
os.environ["UUMAMBA_CPU_BF16"] = "0"

# Two threads: CI and developer machines have 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def acdc_dir() -> Path:
    """Path of the real ACDC folder; skips the test when it is not there."""
    if not ACDC_DIR.is_dir() or not any(ACDC_DIR.glob("patient*")):
        pytest.skip(f"real ACDC data not found at {ACDC_DIR}: set UUMAMBA_ACDC_DIR to a folder of "
                    "ACDC patientXXX folders (README, 'The ACDC data')")
    return ACDC_DIR


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: the same float reductions in every run compared
    (results depend on the thread count) and less contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cuda_kernels() -> None:
    """For ``gpu`` tests of mamba-ssm's kernels: skip without a CUDA device or without an
    installed mamba-ssm; *fail* (with the probe's reason) when mamba-ssm is installed but its
    kernels do not import or run (issue 19: an unusable build must not pass as a skip)."""
    from uumamba.nn.ops.selective_scan import cuda_backend_status, mamba_ssm_installed

    if not torch.cuda.is_available() or not mamba_ssm_installed():
        pytest.skip("needs a CUDA device and mamba-ssm (pip install 'uumamba[gpu]')")
    reason = cuda_backend_status("cuda")
    assert reason is None, f"mamba-ssm is installed but unusable: {reason}"
