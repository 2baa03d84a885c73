"""The model folder's one owner (``uumamba.model_folder``), against a folder written by 0.1.0.

``tests/fixtures/model_v0_1`` was written by the code before this module existed (see
``tests/fixtures/make_model_v0_1.py``): it must still validate, describe, predict and resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uumamba.config import load_config
from uumamba.errors import ConfigError, UserError
from uumamba.model_folder import CHECKPOINT_KEYS, ModelFolder, load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "model_v0_1"


def test_folder_of_the_previous_layout_reads_through_the_owner():
    folder = ModelFolder(FIXTURE).require()
    assert folder.root == FIXTURE.resolve()
    plans = folder.load_plans()
    assert plans.spatial_dims == 2 and list(plans.patch_size) == [32, 32]
    assert folder.labels(plans) == {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
    assert folder.load_config().model.features == [4, 8, 16]
    checkpoints = folder.fold_checkpoints()
    assert checkpoints == {"fold_0": folder.root / "fold_0" / "checkpoint_best.pt"}
    assert folder.fold_checkpoints("0") == checkpoints
    # the decision the old training wrote, read back for an ensemble of its one fold
    assert folder.postprocessing([folder.root / "fold_0"])["largest_component_labels"] == [2, 3]
    (digest,) = folder.digests()
    raw = checkpoints["fold_0"].read_bytes()
    assert digest.sha256 == hashlib.sha256(raw).hexdigest() and digest.size_bytes == len(raw)
    assert digest.file == "fold_0/checkpoint_best.pt"
    assert ModelFolder.version([digest]) == hashlib.sha256(digest.sha256.encode()).hexdigest()[:12]
    state = load_checkpoint(checkpoints["fold_0"])
    assert set(CHECKPOINT_KEYS) <= set(state) and state["finished"] is True


def test_checkpoint_latest_is_the_final_weights_and_never_falls_back(tmp_path):
    """``checkpoint="latest"`` loads ``checkpoint_latest.pt`` even where a best one exists
    (what a cross-validation scores), refuses a fold without one by name, and an unknown
    choice is a UserError; the default still prefers ``checkpoint_best.pt``."""
    import torch

    from uumamba.inference import Predictor

    root = tmp_path / "model"
    shutil.copytree(FIXTURE, root)
    folder = ModelFolder(root)
    (root / "fold_0" / "checkpoint_latest.pt").unlink()  # training stopped before its end
    with pytest.raises(UserError, match="fold_0 has no checkpoint_latest.pt"):
        Predictor.from_model_dir(root, folds="0", device="cpu", checkpoint="latest")
    # all folds: the folds with only a best are named, not "is this a model folder?"
    with pytest.raises(UserError, match=r"fold_0 has no checkpoint_latest.pt, only checkpoint_best"):
        Predictor.from_model_dir(root, device="cpu", checkpoint="latest")
    assert Predictor.from_model_dir(root, device="cpu").checkpoint_files == {
        "fold_0": "checkpoint_best.pt"}
    with pytest.raises(UserError, match="checkpoint: 'final' is not one of best, latest"):
        folder.fold_checkpoints(checkpoint="final")
    state = load_checkpoint(root / "fold_0" / "checkpoint_best.pt")
    state["model"] = {k: v + 1.0 if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    torch.save(state, root / "fold_0" / "checkpoint_latest.pt")
    assert folder.fold_checkpoints() == {"fold_0": root / "fold_0" / "checkpoint_best.pt"}
    latest = {"fold_0": root / "fold_0" / "checkpoint_latest.pt"}
    assert folder.fold_checkpoints(checkpoint="latest") == latest
    assert [d.file for d in folder.digests(checkpoint="latest")] == ["fold_0/checkpoint_latest.pt"]
    best_net = Predictor.from_model_dir(root, device="cpu").networks[0]
    (latest_net,) = Predictor.from_model_dir(root, device="cpu", checkpoint="latest").networks
    for name, value in latest_net.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, state["model"][name].to(value.dtype))
            assert not torch.equal(value, best_net.state_dict()[name])


def test_cli_predict_checkpoint_latest_is_recorded_and_a_bad_choice_refused(tmp_path):
    from typer.testing import CliRunner

    from uumamba.cli import app
    from uumamba.data.synthetic import make_synthetic_case

    image, _ = make_synthetic_case(3, shape=(44, 42, 3))
    path = tmp_path / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0])), str(path))
    args = ["predict", "--model", str(FIXTURE), "--input", str(path), "--device", "cpu"]
    done = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "out"),
                                    "--checkpoint", "latest"])
    assert done.exit_code == 0, done.output
    info = json.loads((tmp_path / "out" / "case_volumes.json").read_text())
    assert info["checkpoint"] == "latest" and info["folds"] == ["fold_0"]
    assert info["checkpoint_files"] == {"fold_0": "checkpoint_latest.pt"}
    # best falls back to the latest where a fold has no best: the file says which was loaded
    nobest = tmp_path / "nobest"
    shutil.copytree(FIXTURE, nobest)
    (nobest / "fold_0" / "checkpoint_best.pt").unlink()
    done = CliRunner().invoke(app, ["predict", "--model", str(nobest), "--input", str(path),
                                    "--device", "cpu", "--output", str(tmp_path / "out2")])
    assert done.exit_code == 0, done.output
    info = json.loads((tmp_path / "out2" / "case_volumes.json").read_text())
    assert info["checkpoint"] == "best"
    assert info["checkpoint_files"] == {"fold_0": "checkpoint_latest.pt"}
    # an unknown choice is a usage error (exit 2), shown cut, before any file is read
    bad = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "bad"),
                                   "--checkpoint", "final" * 10])
    assert bad.exit_code == 2
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", bad.output).split())  # the usage box unwrapped
    assert "'finalfinalfinalfinal'... is not one of best, latest" in said
    assert not (tmp_path / "bad").exists()


def test_cli_checkpoint_choices_are_the_model_folders():
    from uumamba.commands import CHECKPOINT_CHOICES as cli_choices
    from uumamba.model_folder import CHECKPOINT_CHOICES

    assert cli_choices == tuple(CHECKPOINT_CHOICES)


def test_old_folder_predicts_in_the_input_grid(tmp_path):
    from uumamba.data.synthetic import make_synthetic_case
    from uumamba.inference import Predictor

    image, _ = make_synthetic_case(7, shape=(44, 42, 3))
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    affine[:3, 3] = (-20.0, 10.0, 5.0)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(path))
    predictor = Predictor.from_model_dir(FIXTURE, device="cpu")
    assert predictor.fold_names == ["fold_0"] and predictor.scan_backend == "cpu"
    assert predictor.postprocessing["largest_component_labels"] == [2, 3]
    pred = predictor.predict_file(path)
    assert pred.mask.shape == (44, 42, 3) and pred.mask.dtype == np.uint8
    assert int(pred.mask.max()) <= 3
    assert set(pred.volumes_ml) == {"RV", "MYO", "LV"}


def test_old_finished_run_resumes_as_finished(tmp_path):
    from uumamba.engine.train import run_fold

    copy = tmp_path / "model"
    shutil.copytree(FIXTURE, copy)
    cfg = load_config(copy / "config.yaml")
    result = run_fold(cfg, tmp_path / "no-data-needed", copy, fold="0", resume=True,
                      device="cpu", progress=False)
    assert (result.reason, result.finished, result.iteration) == ("already_finished", True, 2)


def test_require_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ModelFolder(tmp_path / "missing").require()
    with pytest.raises(UserError, match="plans.json is missing"):
        ModelFolder(tmp_path).require()
    (tmp_path / "plans.json").write_text("[1, 2]")
    (tmp_path / "config.yaml").write_text("{}\n")
    with pytest.raises(UserError, match="must be a JSON object"):
        ModelFolder(tmp_path).require()
    (tmp_path / "plans.json").write_text("{}")
    with pytest.raises(UserError, match="no fold_"):
        ModelFolder(tmp_path).require()
    with pytest.raises(UserError, match="fold_3 has no checkpoint"):
        ModelFolder(FIXTURE).require("3")


def test_write_config_refuses_other_shared_settings(tmp_path):
    folder = ModelFolder(tmp_path)
    cfg = load_config(FIXTURE / "config.yaml")
    folder.write_config(cfg)
    cfg.train.epochs = 7  # runtime settings may differ between folds
    folder.write_config(cfg)
    other = load_config(FIXTURE / "config.yaml")
    other.model.d_state = 8
    with pytest.raises(ConfigError, match="different model settings"):
        folder.write_config(other)
    assert load_config(tmp_path / "config.yaml").train.epochs == 7


def test_dataset_json_labels_one_reader(tmp_path):
    from uumamba.data.labels import read_dataset_labels
    from uumamba.errors import DataError

    path = tmp_path / "dataset.json"
    for raw in ({"background": 0, "RV": 1}, {"0": "background", "1": "RV"}):
        path.write_text(json.dumps({"labels": raw}))
        assert read_dataset_labels(path) == {0: "background", 1: "RV"}
    path.write_text(json.dumps({"labels": {"whole": [1, 2]}}))
    with pytest.raises(DataError, match="region"):
        read_dataset_labels(path)
    path.write_text(json.dumps({"labels": {"a": 1, "b": 1}}))
    with pytest.raises(DataError, match="given twice"):
        read_dataset_labels(path)
    path.write_text(json.dumps({"name": "x"}))
    assert read_dataset_labels(path) is None


def test_import_directions():
    """Inference never imports the engine; library packages never import the CLI framework."""
    code = (
        "import sys\n"
        "import uumamba.inference, uumamba.model_folder, uumamba.evaluation.evaluate\n"
        "import uumamba.export, uumamba.data.check, uumamba.demo\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('uumamba.engine', "
        "'uumamba.commands', 'typer')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("folds", ["q" * 100_000, "../../x", "0,fold_../1", "\u0663", "1e3"])
def test_a_crafted_fold_name_is_refused_in_one_short_line(folds):
    from uumamba.model_folder import parse_folds

    with pytest.raises(UserError, match="expected a fold number") as err:
        parse_folds(folds)
    assert len(str(err.value)) < 120


def test_fold_names_and_numbers_parse():
    from uumamba.model_folder import parse_folds

    assert parse_folds(" 0, fold_1 ,all") == ["fold_0", "fold_1", "fold_all"]
    assert parse_folds([2, "3"]) == ["fold_2", "fold_3"]
    assert parse_folds(None) is None
