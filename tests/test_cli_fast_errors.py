"""Missing input paths fail before torch / MONAI are imported: one line, exit 1, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from typer.testing import CliRunner
from uumamba.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print(result.exit_code, "torch" in sys.modules, "monai" in sys.modules)
print(result.output.strip())
"""


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/nope/data", "--output", "/tmp/x"], "--data /nope/data: folder not found"),
    (["predict", "--model", "/nope/model", "--input", "/x", "--output", "/tmp/y"],
     "--model /nope/model: folder not found"),
    (["evaluate", "--pred", "/nope/pred", "--gt", "/tmp"], "--pred /nope/pred: folder not found"),
])
def test_missing_paths_fail_before_heavy_imports(args, message):
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          timeout=60)
    status, output = proc.stdout.split("\n", 1)
    assert status.split() == ["1", "False", "False"], proc.stdout + proc.stderr
    assert output.strip() == f"error: {message}"


def test_predict_input_file_missing(tmp_path):
    (tmp_path / "model").mkdir()
    proc = subprocess.run([sys.executable, "-c", PROBE, "predict", "--model", str(tmp_path / "model"),
                           "--input", str(tmp_path / "scan.nii.gz"), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines()[0].split()[0] == "1"
    assert "scan.nii.gz: no such file or folder" in proc.stdout
    assert not (tmp_path / "o").exists()
