"""Integrity check: every listed problem is reported at once, with file names; CLI exit codes."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from uumamba.cli import app
from uumamba.config import DatasetConfig, load_config
from uumamba.data.check import check_dataset
from uumamba.data.layouts import discover

SHAPE = (8, 7, 5)
AFFINE = np.diag([1.5, 1.5, 6.0, 1.0])


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _good_pair(root: Path, name: str, rng: np.random.Generator) -> tuple[Path, Path]:
    image = _save(root / "images" / f"{name}.nii.gz", rng.random(SHAPE, dtype=np.float32))
    label = np.zeros(SHAPE, np.uint8)
    label[2:5, 2:5, 1:4] = 1
    label[3, 3, 2] = 2
    return image, _save(root / "labels" / f"{name}.nii.gz", label)


def _set_slope(path: Path, slope: float) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[112:116] = np.float32(slope).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.fixture()
def broken_dataset(tmp_path: Path) -> Path:
    """A folder dataset with one case per problem (file names say which)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("good", "truncated", "shape", "spacing", "origin", "floatlab", "undeclared",
                 "scaled", "nan", "fourd", "empty"):
        _good_pair(root, name, rng)
    data = (root / "images" / "truncated.nii.gz").read_bytes()
    (root / "images" / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    _save(root / "labels" / "shape.nii.gz", np.ones((8, 7, 4), np.uint8))
    lab = np.asanyarray(nib.load(str(root / "labels" / "spacing.nii.gz")).dataobj)
    _save(root / "labels" / "spacing.nii.gz", lab, np.diag([1.5, 1.5, 5.0, 1.0]))
    shifted = AFFINE.copy()
    shifted[:3, 3] = [0.0, 4.0, 0.0]
    _save(root / "labels" / "origin.nii.gz", lab, shifted)
    floats = lab.astype(np.float32)
    floats[0, 0, 0] = 0.5
    _save(root / "labels" / "floatlab.nii.gz", floats)
    undeclared = lab.copy()
    undeclared[0, 0, 0] = 7
    _save(root / "labels" / "undeclared.nii.gz", undeclared)
    _save(root / "labels" / "scaled.nii.gz", lab.astype(np.int16))
    _set_slope(root / "labels" / "scaled.nii.gz", 0.999)  # 1 reads back as 0.999
    nan_image = rng.random(SHAPE, dtype=np.float32)
    nan_image[1, 1, 1] = np.nan
    nan_image[2, 1, 1] = np.inf
    _save(root / "images" / "nan.nii.gz", nan_image)
    _save(root / "images" / "fourd.nii.gz", rng.random((*SHAPE, 3), dtype=np.float32))
    _save(root / "labels" / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    # a 2D image + label pair
    _save(root / "images" / "flat.nii.gz", rng.random((8, 7), dtype=np.float32))
    _save(root / "labels" / "flat.nii.gz", np.ones((8, 7), np.uint8))
    return root


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"labels": {0: "background", 1: "LV", 2: "MYO"}},
                                    "model": {"spatial_dims": 3}}))
    return path


def test_all_problems_reported_at_once(broken_dataset: Path) -> None:
    index = discover(broken_dataset)
    cfg = DatasetConfig(labels={0: "background", 1: "LV", 2: "MYO"})
    report = check_dataset(index, cfg, spatial_dims=3)
    assert report.fatal and report.n_cases == 12

    def messages(name: str, severity: str = "error") -> str:
        return " | ".join(p.message for p in report.problems
                          if Path(p.file).name.startswith(name) and p.severity == severity)

    assert "truncated" in messages("truncated.nii.gz")
    assert "shape (8, 7, 4) differs from image" in messages("shape.nii.gz")
    assert "spacing [1.5, 1.5, 5.0] differs" in messages("spacing.nii.gz")
    assert "origin" in messages("origin.nii.gz") and "spacing" not in messages("origin.nii.gz")
    assert "not integers, e.g. 0.5" in messages("floatlab.nii.gz")
    assert "[7] are not declared" in messages("undeclared.nii.gz")
    scaled = messages("scaled.nii.gz")
    assert "not integers, e.g. 0.999" in scaled and "scl_slope=0.999" in scaled
    assert "2 NaN / Inf voxel(s)" in messages("nan.nii.gz")
    assert "4D image (8, 7, 5, 3)" in messages("fourd.nii.gz")
    assert "2D image (8, 7) given to a 3D model" in messages("flat.nii.gz")
    assert "empty" in messages("empty.nii.gz", "warning") and messages("empty.nii.gz") == ""
    assert not [p for p in report.problems if "good" in Path(p.file).name]
    # each problem names its file in the text report
    text = report.format()
    for name in ("truncated", "shape", "spacing", "origin", "floatlab", "undeclared", "scaled",
                 "nan", "fourd", "flat", "empty"):
        assert f"{name}.nii.gz" in text
    assert len(report.errors) == 10 and len(report.warnings) == 1


def test_split_4d_and_2d_model(broken_dataset: Path) -> None:
    index = discover(broken_dataset)
    cfg = DatasetConfig(labels={0: "background", 1: "LV", 2: "MYO"}, split_4d=True)
    report = check_dataset(index, cfg, spatial_dims=2)
    four_d = [p for p in report.problems if "fourd.nii.gz" in p.file]
    assert [p.severity for p in four_d] == ["warning"] and "3 3D frames" in four_d[0].message
    # train (planning) and predict read 3D volumes for 2D models too: the same refusal here
    flat = [p for p in report.problems if "images/flat.nii.gz" in p.file]
    assert [p.severity for p in flat] == ["error"]
    assert "2D image (8, 7): training and prediction need 3D volumes" in flat[0].message


def test_undeclared_labels_use_dataset_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _good_pair(tmp_path, "a", rng)
    index = discover(tmp_path)
    report = check_dataset(index, DatasetConfig(), spatial_dims=3)
    assert report.fatal and "no label names declared" in report.problems[0].message
    report = check_dataset(index, DatasetConfig(labels={0: "bg", 1: "x"}, ignore_label=2), 3)
    assert not report.problems


def test_cli_exit_codes(broken_dataset: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cfg = _config_file(tmp_path)
    env = {"COLUMNS": "400"}
    result = runner.invoke(app, ["check-data", str(broken_dataset), "--config", str(cfg)], env=env)
    assert result.exit_code == 1, result.output
    assert "truncated.nii.gz" in result.output and "10 error(s), 1 warning(s)" in result.output

    clean = tmp_path / "clean"
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        _good_pair(clean, name, rng)
    result = runner.invoke(app, ["check-data", str(clean), "--config", str(cfg)], env=env)
    assert result.exit_code == 0, result.output
    assert "0 error(s), 0 warning(s)" in result.output

    result = runner.invoke(app, ["check-data", str(tmp_path / "nothing"), "--config", str(cfg)], env=env)
    assert result.exit_code == 1 and "not found" in result.output


def test_real_acdc_is_clean(acdc_dir: Path) -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "acdc.yaml")
    report = check_dataset(discover(acdc_dir), cfg.dataset, cfg.model.spatial_dims)
    assert report.n_cases == 40
    assert not report.fatal, report.format()


def test_a_file_name_with_a_line_break_stays_on_its_problems_line(tmp_path: Path) -> None:
    """The report is several lines, one per problem: a name holding a line break, escapes or
    rich markup is written escaped in it (text report, the error the CLI prints, the table)."""
    from uumamba.errors import ReportError, cli_text

    rng = np.random.default_rng(4)
    _good_pair(tmp_path, "good", rng)
    name = "bad\nERROR forged: [bold red]x \x1b[31m"
    image, _ = _good_pair(tmp_path, name, rng)
    image.write_bytes(image.read_bytes()[:100])  # truncated
    report = check_dataset(discover(tmp_path), DatasetConfig(labels={0: "bg", 1: "LV", 2: "MYO"}),
                           spatial_dims=3)
    assert len(report.errors) == 1
    text = report.format()
    assert not any(line.startswith("ERROR forged") for line in text.splitlines())
    assert "bad\\x0aERROR forged: [bold red]x \\x1b[31m.nii.gz" in text
    # a reader's reason that quotes the path: escaped before its first line is taken, so
    # the reason names the whole file (it stopped at the break)
    trunc = _save(tmp_path / "images" / "trunc\nU.nii", rng.random(SHAPE, dtype=np.float32))
    trunc.write_bytes(trunc.read_bytes()[:400])
    _save(tmp_path / "labels" / "trunc\nU.nii", np.zeros(SHAPE, np.uint8))
    again = check_dataset(discover(tmp_path), DatasetConfig(labels={0: "bg", 1: "LV", 2: "MYO"}),
                          spatial_dims=3).format()
    line = next(line for line in again.splitlines() if "trunc\\x0aU" in line)
    assert line.count("trunc\\x0aU.nii") == 2, line
    (tmp_path / "images" / "trunc\nU.nii").unlink()
    (tmp_path / "labels" / "trunc\nU.nii").unlink()
    with pytest.raises(ReportError) as info:
        report.raise_if_fatal()
    printed = cli_text(info.value)
    assert printed.splitlines()[0] == "dataset integrity check failed:"  # a report keeps its lines
    assert len(printed.splitlines()) == 1 + len(report.problems) + 1
    result = CliRunner().invoke(app, ["check-data", str(tmp_path), "--config",
                                      str(_config_file(tmp_path))], env={"COLUMNS": "400"})
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "[bold red]x" in result.output  # no markup
    assert not any(line.lstrip("│ ").startswith("ERROR forged") for line in result.output.splitlines())
