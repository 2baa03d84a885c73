"""Inputs a model cannot have been trained for are flagged, never a silent confident mask."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uumamba.config import InferenceConfig
from uumamba.data.synthetic import make_synthetic_case
from uumamba.errors import DataError
from uumamba.inference import Predictor, write_prediction
from uumamba.model_folder import ModelFolder

FIXTURE = Path(__file__).parent / "fixtures" / "model_v0_1"
AFFINE = np.diag([1.5, 1.5, 8.0, 1.0])


def _save(tmp_path: Path, name: str, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), affine), str(path))
    return path


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_model_dir(FIXTURE, device="cpu")


def _inputs(tmp_path: Path) -> dict[str, Path]:
    image, _ = make_synthetic_case(11, shape=(48, 48, 4))
    rng = np.random.default_rng(0)
    return {
        "plausible": _save(tmp_path, "plausible", image),
        "blank": _save(tmp_path, "blank", np.zeros_like(image)),
        "constant": _save(tmp_path, "constant", np.full_like(image, 7.5)),
        "noise": _save(tmp_path, "noise", rng.random(image.shape)),
        "ct_range": _save(tmp_path, "ct_range", image / image.max() * 1400.0 - 1000.0),
        "spacing": _save(tmp_path, "spacing", image, np.diag([0.1, 0.1, 8.0, 1.0])),
        "small_fov": _save(tmp_path, "small_fov", image[18:28, 18:28]),
    }


EXPECTED = {
    "blank": "blank or constant", "constant": "blank or constant",
    "noise": "no spatial structure", "ct_range": "negative", "spacing": "spacing 0.1 mm",
    "small_fov": "field of view",
}


def test_each_implausible_input_is_flagged_and_a_plausible_one_is_not(predictor, tmp_path,
                                                                         caplog):
    inputs = _inputs(tmp_path)
    assert predictor.predict_file(inputs["plausible"]).warnings == []
    for name, phrase in EXPECTED.items():
        with caplog.at_level("WARNING", logger="uumamba"):
            caplog.clear()
            pred = predictor.predict_file(inputs[name])
        assert any(phrase in w for w in pred.warnings), (name, pred.warnings)
        assert any(phrase in r.getMessage() and inputs[name].name in r.getMessage()
                   for r in caplog.records), name
    # the warnings travel with the volumes
    blank = predictor.predict_file(inputs["blank"])
    written = write_prediction(blank, "blank", inputs["blank"], tmp_path / "out", predictor.labels)
    info = json.loads(next(p for p in written if p.name.endswith("_volumes.json")).read_text())
    assert info["warnings"] == blank.warnings and "blank or constant" in info["warnings"][0]


def test_refuse_and_off(tmp_path):
    folder = ModelFolder(FIXTURE)
    plans = folder.load_plans()
    from uumamba.engine.checkpoint import load_checkpoint
    from uumamba.nn import build_network

    net = build_network(folder.load_config().model, plans)
    net.load_state_dict(load_checkpoint(folder.fold_checkpoints()["fold_0"])["model"])
    blank = _inputs(tmp_path)["blank"]
    refusing = Predictor([net], plans, InferenceConfig(input_check="refuse"), device="cpu")
    with pytest.raises(DataError, match="blank.nii.gz: refused .*blank or constant"):
        refusing.predict_file(blank)
    quiet = Predictor([net], plans, InferenceConfig(input_check="off"), device="cpu")
    assert quiet.predict_file(blank).warnings == []


def test_service_answer_carries_the_warnings(tmp_path):
    from fastapi.testclient import TestClient

    from uumamba_service.app import create_app
    from uumamba_service.settings import ServiceSettings

    inputs = _inputs(tmp_path)
    app = create_app(ServiceSettings(model_dir=FIXTURE, device="cpu", warmup=False))
    with TestClient(app) as client:
        end = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < end:
            time.sleep(0.05)
        for name, expect in (("blank", True), ("plausible", False)):
            files = {"file": (inputs[name].name, inputs[name].read_bytes(), "application/gzip")}
            r = client.post("/v1/segment?format=json", files=files)
            assert r.status_code == 200, r.text
            assert bool(r.json()["warnings"]) is expect, r.json()
        files = {"file": ("blank.nii.gz", inputs["blank"].read_bytes(), "application/gzip")}
        r = client.post("/v1/segment", files=files)
        assert r.status_code == 200 and int(r.headers["X-Input-Warnings"]) >= 1


def test_a_2d_model_does_not_flag_the_slice_spacing_it_keeps(predictor, tmp_path):
    """The 2D fixture (trained on 8 mm slices) keeps an input's own slices
    (``Plans.resampling_spacing``): 1 mm slices are no reason to warn, 0.1 mm pixels still are."""
    image, _ = make_synthetic_case(11, shape=(48, 48, 4))
    thin = predictor.predict_file(_save(tmp_path, "thin", np.repeat(image, 8, axis=2),
                                        np.diag([1.5, 1.5, 1.0, 1.0])))
    assert thin.warnings == []
    fine = predictor.predict_file(_save(tmp_path, "fine", image, np.diag([1.5, 0.1, 8.0, 1.0])))
    assert any("spacing 0.1 mm along axis 1" in w for w in fine.warnings), fine.warnings
