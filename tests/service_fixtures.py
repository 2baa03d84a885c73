"""Fixtures and helpers shared by the service's test modules (tests/test_service.py,
tests/security/): the tiny trained model, its real predictor, a ready client, settings and
readiness.

Import the fixtures by name into a test module (``from service_fixtures import model_dir``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from uumamba_service.settings import ServiceSettings
from uumamba_service.testing import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Tiny trained model, shared with test_service_process.py within a session."""
    return build_tiny_model(tmp_path_factory.getbasetemp() / "service_tiny_model")


@pytest.fixture(scope="module")
def predictor(model_dir):
    """The real predictor of the tiny model, loaded once for the module."""
    from uumamba.inference.predict import Predictor

    return Predictor.from_model_dir(model_dir, device="cpu")


@pytest.fixture()
def client(model_dir, predictor):
    """A TestClient of an app serving the real tiny predictor, ready; its work folder must be
    gone after shutdown."""
    from fastapi.testclient import TestClient

    from uumamba_service.app import create_app

    app = create_app(service_settings(model_dir), predictor=predictor)
    with TestClient(app) as c:
        wait_ready(c)
        yield c
    assert not app.state.service.work_root.exists(), "work folder left after shutdown"


def service_settings(model_dir: Path, **kw) -> ServiceSettings:
    """Settings for tests: CPU, no warm-up, a fresh job-store folder, ``kw`` on top."""
    import tempfile

    kw.setdefault("device", "cpu")
    kw.setdefault("warmup", False)
    kw.setdefault("state_dir", Path(tempfile.mkdtemp(prefix="state-", dir=os.environ.get("XDG_STATE_HOME"))))
    return ServiceSettings(model_dir=model_dir, **kw)


def wait_ready(client, timeout: float = 60.0) -> dict:
    """Poll ``/readyz`` of a TestClient until 200 (its JSON); fails after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 503
        time.sleep(0.05)
    raise AssertionError(f"service not ready after {timeout} s: {r.json()}")
