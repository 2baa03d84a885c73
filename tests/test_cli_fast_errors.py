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

# The console script itself (UserError -> one line on stderr, exit 1).
MAIN_PROBE = """
import sys
from uumamba.cli import main
sys.argv = ["uumamba", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    print(exc.code, "torch" in sys.modules, "monai" in sys.modules)
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


def test_predict_bad_single_file_is_refused_from_its_header_before_torch(tmp_path):
    """A corrupt image given as --input is refused from its header, before torch and MONAI
    load: one line naming the file, exit 1, nothing written."""
    (tmp_path / "model").mkdir()
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"this is a text file, not a gzip stream\n" * 4)
    proc = subprocess.run([sys.executable, "-c", MAIN_PROBE, "predict", "--model", str(tmp_path / "model"),
                           "--input", str(bad), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["1", "False", "False"], proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and "scan.nii.gz" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_predict_format_list_matches_the_writer():
    from uumamba.commands.predict import OUTPUT_FORMATS as cli_formats
    from uumamba.inference.writer import OUTPUT_FORMATS, mask_suffix

    assert cli_formats is OUTPUT_FORMATS
    assert mask_suffix(__import__("pathlib").Path("a.nii.gz"), "seg.nrrd") == (".seg.nrrd", None)
