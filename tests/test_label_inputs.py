"""Label maps and headers read without narrowing (issue 23): label values are checked in their
own dtype (2**32 + 3 is never label 3), inventories never allocate by value (2**40), messages
print values exactly (1.0000001), 2D images are refused as train / predict refuse them, and a
zero or negative voxel size is an error naming the axis — in the library, check-data, evaluate
and predict."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from typer.testing import CliRunner

from uumamba.cli import app
from uumamba.config import DatasetConfig
from uumamba.data.check import check_dataset, label_values
from uumamba.data.io import read_geometry, read_image
from uumamba.data.layouts import discover
from uumamba.errors import DataError
from uumamba.evaluation.evaluate import evaluate_folders
from uumamba.evaluation.metrics import label_volumes

SHAPE = (6, 5, 4)
AFFINE = np.diag([1.5, 1.5, 6.0, 1.0])
LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model_v0_1"


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine, dtype=array.dtype), str(path))
    return path


def _reference() -> np.ndarray:
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:3, 1:3, 1:3] = 3
    ref[3:5, 1:3, 1:3] = 1
    return ref


def _dataset(root: Path, label: np.ndarray, image: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    image = rng.random(label.shape, dtype=np.float32) if image is None else image
    _save(root / "images" / "case.nii.gz", image)
    _save(root / "labels" / "case.nii.gz", label)
    return root


def _config(tmp_path: Path, spatial_dims: int = 3) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"labels": LABELS},
                                    "model": {"spatial_dims": spatial_dims}}))
    return path


def _errors(report, name: str) -> list[str]:
    return [p.message for p in report.problems
            if Path(p.file).name == name and p.severity == "error"]


def _set_pixdim(path: Path, index: int, value: float) -> Path:
    """Store ``pixdim[index] = value`` in an uncompressed .nii (nibabel would fix it on save)."""
    raw = bytearray(path.read_bytes())
    raw[76 + 4 * index: 80 + 4 * index] = np.float32(value).tobytes()
    path.write_bytes(bytes(raw))
    return path


# --- evaluate: values checked in their own dtype ---------------------------------------------


def _eval_folders(tmp_path: Path, pred: np.ndarray, dataset_json: bool = True) -> tuple[Path, Path]:
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    _save(gt_dir / "case.nii.gz", _reference())
    _save(pred_dir / "case.nii.gz", pred)
    if dataset_json:
        (gt_dir / "dataset.json").write_text(json.dumps({"labels": {str(k): n for k, n in LABELS.items()}}))
    return pred_dir, gt_dir


def test_evaluate_refuses_int64_value_that_int32_would_wrap_to_a_label(tmp_path):
    ref = _reference()
    pred = ref.astype(np.int64)
    pred[ref == 3] = 2**32 + 3  # int32 cast: 3
    pred_dir, gt_dir = _eval_folders(tmp_path, pred)
    with pytest.raises(DataError) as info:
        evaluate_folders(pred_dir, gt_dir, LABELS)
    message = str(info.value)
    assert str(pred_dir / "case.nii.gz") in message
    assert "label value 4294967299 is not a declared label" in message
    assert "declared: [0, 1, 2, 3]" in message


def test_evaluate_without_labels_scores_the_value_as_its_own_label(tmp_path):
    ref = _reference()
    pred = ref.astype(np.int64)
    pred[ref == 3] = 2**32 + 3
    pred_dir, gt_dir = _eval_folders(tmp_path, pred, dataset_json=False)
    summary = evaluate_folders(pred_dir, gt_dir, None)
    assert set(summary["labels"]) == {"0", "1", "3", "4294967299"}
    assert summary["mean"]["3"]["Dice"] == 0.0 and summary["mean"]["1"]["Dice"] == 1.0
    assert summary["mean"]["4294967299"]["volume_pred_ml"] == pytest.approx(8 * 1.5 * 1.5 * 6 / 1000)


@pytest.mark.parametrize("dtype, value, shown", [
    (np.uint64, 2**64 - 1, "18446744073709551615"),
    (np.float64, 1e20, "100000000000000000000"),
])
def test_evaluate_refuses_values_beyond_int64_without_wrapping(tmp_path, dtype, value, shown):
    pred = _reference().astype(dtype)
    pred[0, 0, 0] = value
    pred_dir, gt_dir = _eval_folders(tmp_path, pred, dataset_json=False)
    with pytest.raises(DataError, match=f"label value {shown} is outside the int64 range"):
        evaluate_folders(pred_dir, gt_dir, None)


def test_evaluate_integer_valued_float_maps_are_scored_and_fractions_refused(tmp_path):
    pred_dir, gt_dir = _eval_folders(tmp_path, _reference().astype(np.float64))
    summary = evaluate_folders(pred_dir, gt_dir, LABELS)
    assert summary["mean"]["3"]["Dice"] == 1.0 and summary["mean"]["1"]["Dice"] == 1.0
    fractional = _reference().astype(np.float32)
    fractional[0, 0, 0] = 1.25
    _save(pred_dir / "case.nii.gz", fractional)
    with pytest.raises(DataError, match=r"non-integer values, e\.g\. 1\.25 \(dtype float32\)"):
        evaluate_folders(pred_dir, gt_dir, LABELS)


def test_evaluate_cli_prints_one_line(tmp_path, monkeypatch, capsys):
    from uumamba import cli

    ref = _reference()
    pred = ref.astype(np.int64)
    pred[ref == 3] = 2**32 + 3
    pred_dir, gt_dir = _eval_folders(tmp_path, pred)
    monkeypatch.setattr(sys, "argv", ["uumamba", "evaluate", "--pred", str(pred_dir),
                                      "--gt", str(gt_dir)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "4294967299" in err[0] and "case.nii.gz" in err[0]
    assert not (pred_dir / "summary.json").exists()


# --- inventories by np.unique or a bounded count ---------------------------------------------


def test_label_values_never_allocate_by_value():
    label = np.zeros(SHAPE, np.int64)
    label[0, 0, 0] = 2**40
    label[1, 0, 0] = 2
    values = label_values(label)
    assert values.tolist() == [0, 2, 2**40] and values.dtype == np.int64
    label[2, 0, 0] = -7
    assert label_values(label).tolist() == [-7, 0, 2, 2**40]
    assert label_values(np.array([[[3, 0, 3]]], np.uint8)).tolist() == [0, 3]
    assert label_values(np.array([[[2**64 - 1]]], np.uint64)).tolist() == [2**64 - 1]


def test_label_volumes_count_only_declared_labels():
    mask = np.zeros(SHAPE, np.int64)
    mask[0, :, :] = 1
    mask[1, 0, 0] = 2**40
    mask[2, 0, 0] = -5
    counts, volumes = label_volumes(mask, (1.0, 2.0, 5.0), {0: "bg", 1: "RV", 7: "LV"})
    assert counts == {"RV": 20, "LV": 0}
    assert volumes == {"RV": pytest.approx(20 * 10 / 1000), "LV": 0.0}


def test_check_data_reports_huge_label_value_without_crashing(tmp_path):
    label = _reference().astype(np.int64)
    label[0, 0, 0] = 2**40
    root = _dataset(tmp_path / "data", label)
    report = check_dataset(discover(root), DatasetConfig(labels=LABELS), spatial_dims=3)
    assert _errors(report, "case.nii.gz") == [
        "label values [1099511627776] are not declared (declared: [0, 1, 2, 3])"]
    with pytest.raises(DataError, match="1099511627776"):  # what train runs before planning
        report.raise_if_fatal()
    result = CliRunner().invoke(app, ["check-data", str(root), "--config", str(_config(tmp_path))],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert "1099511627776" in result.output and "1 error(s), 0 warning(s)" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --- check-data: the 3D requirement of train / predict -----------------------------------------


@pytest.mark.parametrize("spatial_dims, expected", [
    (3, "2D image (6, 5) given to a 3D model (model.spatial_dims: 3)"),
    (2, "2D image (6, 5): training and prediction need 3D volumes"),
])
def test_check_data_refuses_2d_images_for_either_model(tmp_path, spatial_dims, expected):
    root = _dataset(tmp_path / "data", np.ones((6, 5), np.uint8))
    report = check_dataset(discover(root), DatasetConfig(labels=LABELS), spatial_dims)
    messages = _errors(report, "case.nii.gz")
    assert report.fatal and any(m.startswith(expected) for m in messages), messages
    result = CliRunner().invoke(
        app, ["check-data", str(root), "--config", str(_config(tmp_path, spatial_dims))],
        env={"COLUMNS": "400"})
    assert result.exit_code == 1 and "2D image (6, 5)" in result.output


# --- messages print the value exactly ---------------------------------------------------------


def test_non_integer_label_is_reported_exactly(tmp_path):
    label = _reference().astype(np.float32)
    label[0, 0, 0] = 1.0000001  # float32: the next value above 1
    root = _dataset(tmp_path / "data", label)
    report = check_dataset(discover(root), DatasetConfig(labels=LABELS), spatial_dims=3)
    assert _errors(report, "case.nii.gz") == ["label values are not integers, e.g. 1.0000001"]


# --- zero or negative voxel sizes --------------------------------------------------------------


@pytest.mark.parametrize("index, value, expected", [
    (3, 0.0, "spacing along axis 2 is 0 mm (pixdim[3] = 0)"),
    (2, -1.5, "spacing along axis 1 is -1.5 mm (pixdim[2] = -1.5)"),
    (1, float("nan"), "spacing along axis 0 is nan mm (pixdim[1] = nan)"),
])
def test_nifti_pixdim_zero_or_negative_is_refused(tmp_path, index, value, expected):
    path = _set_pixdim(_save(tmp_path / "scan.nii", np.zeros(SHAPE, np.float32)), index, value)
    if value == value:  # nibabel reads 0 as 1 mm and -1.5 as 1.5 mm
        assert nib.load(str(path)).header.get_zooms()[index - 1] == (abs(value) or 1.0)
    for read in (read_image, read_geometry):
        with pytest.raises(DataError) as info:
            read(path)
        assert str(info.value).startswith(f"{path}: {expected}")


def test_nifti_sform_with_a_zero_column_is_refused(tmp_path):
    affine = AFFINE.copy()
    affine[:3, 1] = 0.0
    path = tmp_path / "scan.nii.gz"
    img = nib.Nifti1Image(np.zeros(SHAPE, np.float32), None)
    img.header.set_sform(affine, code=2)
    nib.save(img, str(path))
    with pytest.raises(DataError, match=r"spacing along axis 1 is 0 mm \(column 1 of the sform"):
        read_geometry(path)


def _sitk_file(path: Path, spacing_line: bytes) -> Path:
    img = sitk.GetImageFromArray(np.zeros(SHAPE[::-1], np.uint8))
    img.SetSpacing((1.5, 1.5, 6.0))
    sitk.WriteImage(img, str(path), useCompression=False)
    text = path.read_bytes()
    old = b"ElementSpacing = 1.5 1.5 6" if path.suffix == ".mha" else b"(0,0,6)"
    assert old in text
    path.write_bytes(text.replace(old, spacing_line))
    return path


@pytest.mark.parametrize("name, line, expected", [
    ("z.mha", b"ElementSpacing = 1.5 1.5 0", "spacing along axis 2 is 0 mm (header spacing (1.5, 1.5, 0))"),
    ("n.mha", b"ElementSpacing = 1.5 -1.5 6", "spacing along axis 1 is -1.5 mm (header spacing (1.5, -1.5, 6))"),
    ("z.nrrd", b"(0,0,0)", "spacing along axis 2 is 0 mm (header spacing (1.5, 1.5, 0))"),
])
def test_sitk_spacing_zero_or_negative_is_refused(tmp_path, name, line, expected):
    path = _sitk_file(tmp_path / name, line)
    for read in (read_image, read_geometry):
        with pytest.raises(DataError) as info:
            read(path)
        assert str(info.value).startswith(f"{path}: {expected}")


def test_check_data_reports_zero_pixdim_as_an_error(tmp_path):
    root = tmp_path / "data"
    label = _save(root / "labels" / "case.nii", _reference())
    _save(root / "images" / "case.nii", np.ones(SHAPE, np.float32))
    _set_pixdim(label, 3, 0.0)
    report = check_dataset(discover(root), DatasetConfig(labels=LABELS), spatial_dims=3)
    errors = [(Path(p.file).parent.name, p.message) for p in report.errors]
    assert errors == [("labels", "spacing along axis 2 is 0 mm (pixdim[3] = 0); "
                                 "voxel sizes must be positive")]
    result = CliRunner().invoke(app, ["check-data", str(root), "--config", str(_config(tmp_path))],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 1 and "pixdim[3] = 0" in result.output


def _predict_cli(monkeypatch, capsys, input_path, output, *extra):
    """``uumamba predict`` with the fixture model in this process: (exit code, stderr + stdout
    captured)."""
    from uumamba import cli

    monkeypatch.setattr(sys, "argv", [
        "uumamba", "predict", "--model", str(FIXTURE_MODEL), "--input", str(input_path),
        "--output", str(output), "--device", "cpu", *extra])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err, captured.out


def test_predict_zero_pixdim_is_one_line(tmp_path, monkeypatch, capsys):
    path = _set_pixdim(_save(tmp_path / "scan.nii", np.ones((44, 42, 3), np.float32)), 3, 0.0)
    code, err, _ = _predict_cli(monkeypatch, capsys, path, tmp_path / "out")
    assert code == 1
    assert err.strip().splitlines() == [f"error: {path}: spacing along axis 2 is 0 mm "
                                        "(pixdim[3] = 0); voxel sizes must be positive"]
    assert not list((tmp_path / "out").glob("scan*"))


def test_predict_folder_skip_line_is_not_wrapped_when_piped(tmp_path, monkeypatch, capsys):
    """Each message is one line in a log, however long the path (rich wraps at 80 columns when
    the output is not a terminal)."""
    folder = tmp_path / ("input_folder_with_a_long_name_" * 3)
    folder.mkdir()
    _save(folder / "good_0000.nii.gz", np.ones((44, 42, 3), np.float32))
    bad = _set_pixdim(_save(folder / "bad_0000.nii", np.ones((44, 42, 3), np.float32)), 3, 0.0)
    monkeypatch.delenv("COLUMNS", raising=False)
    code, err, _ = _predict_cli(monkeypatch, capsys, folder, tmp_path / "out")
    assert code == 1
    lines = err.splitlines()
    skipped = [line for line in lines if line.startswith("skipped")]
    assert skipped and all(str(bad) in line and "pixdim[3] = 0" in line for line in skipped), lines
    assert (tmp_path / "out" / "good.nii.gz").exists()


def test_predict_set_changes_the_models_inference_settings(tmp_path, monkeypatch, capsys):
    """``--set inference.input_check=refuse`` refuses a blank scan the model's own setting
    (``warn``) would segment; keys outside ``inference`` and bad values are one-line errors."""
    path = _save(tmp_path / "blank.nii.gz", np.zeros((44, 42, 3), np.float32))

    def run(*extra):
        code, err, _ = _predict_cli(monkeypatch, capsys, path, tmp_path / "out", *extra)
        return code, err.strip().splitlines()

    code, err = run("--set", "inference.input_check=refuse")
    assert code == 1 and err == [f"error: {path}: refused (inference.input_check = refuse): "
                                 "the image is blank or constant (intensities 0 to 0): there is "
                                 "no anatomy to segment"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    code, err = run("--set", "train.epochs=3")
    assert code == 1 and len(err) == 1 and "predict changes only the inference section" in err[0]
    code, err = run("--set", "inference.overlap=2")
    assert code == 1 and err == ["error: --set: invalid configuration: 'inference.overlap': "
                                 "Input should be less than 1 (got 2)"]


def test_a_single_input_named_with_a_line_break_is_one_line_with_its_reason(tmp_path,
                                                                          monkeypatch, capsys):
    """One file given as --input (not a folder): its error went out through the CLI's
    multi-line path and a line break in the name started a line of its own ('error: forged')."""
    name = "bad\nerror: forged line\n.nii"
    path = _set_pixdim(_save(tmp_path / name, np.ones((44, 42, 3), np.float32)), 3, 0.0)
    code, err, _ = _predict_cli(monkeypatch, capsys, path, tmp_path / "out")
    assert code == 1
    assert err.splitlines() == [err.rstrip("\n")], err
    assert "bad\\x0aerror: forged line\\x0a.nii" in err and "voxel sizes must be positive" in err


def test_a_truncated_file_named_with_a_line_break_keeps_the_readers_reason(tmp_path,
                                                                          monkeypatch, capsys):
    """The reader's message quotes the path: escaped before its first line is taken, so the
    reason names the whole file instead of the part before the break."""
    folder = tmp_path / "in"
    _save(folder / "good.nii", np.ones((44, 42, 3), np.float32))
    path = _save(folder / "trunc\nU.nii", np.ones((44, 42, 3), np.float32))
    path.write_bytes(path.read_bytes()[:2000])
    code, err, out = _predict_cli(monkeypatch, capsys, folder, tmp_path / "out")
    skipped = [line for line in (err + out).splitlines() if line.startswith("skipped ")]
    assert code == 1 and len(skipped) == 1, err + out
    assert skipped[0].count("trunc\\x0aU.nii") == 2  # the case and the reader's own path
    assert "is the file corrupt or truncated?" in skipped[0]


def test_crafted_file_names_cannot_forge_lines_or_drive_the_terminal(tmp_path, monkeypatch,
                                                                     capsys):
    """A file named with a newline, an OSC title sequence and rich markup prints escaped, in
    the skipped line and in the final error line."""
    folder = tmp_path / "in"
    folder.mkdir()
    _save(folder / "good_0000.nii.gz", np.ones((44, 42, 3), np.float32))
    name = "bad\x1b]0;TITLE\x07\nINJECTED error: fake [bold red]x[not bold] .nii"
    _set_pixdim(_save(folder / name, np.ones((44, 42, 3), np.float32)), 3, 0.0)
    code, err, out = _predict_cli(monkeypatch, capsys, folder, tmp_path / "out")
    err += out
    assert code == 1
    assert "\x1b" not in err and "\x07" not in err
    assert not any(line.startswith("INJECTED") for line in err.splitlines()), err
    assert "\\x1b]0;TITLE\\x07\\x0aINJECTED" in err and "[bold red]x[not bold]" in err
    # the newline in the name does not cut the reason off the skipped line
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].endswith("voxel sizes must be positive"), err
