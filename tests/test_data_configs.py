"""Every shipped config loads with the typed schema and states what its dataset defines."""

from __future__ import annotations

from pathlib import Path

import pytest

from uumamba.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.dataset.labels is not None and cfg.dataset.labels[0] == "background"
    if cfg.model.features is not None and cfg.plan.patch_size is not None:
        # a user patch must be divisible by the pooling the stages imply
        assert len(cfg.plan.patch_size) == cfg.model.spatial_dims
        assert all(p % 2 ** (len(cfg.model.features) - 1) == 0 for p in cfg.plan.patch_size)


def test_dataset_definitions() -> None:
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"acdc", "acdc_bot", "acdc_cpu", "imagecas", "aortaseg24", "tiny"} <= names
    acdc = load_config(CONFIGS / "acdc.yaml")
    assert acdc.dataset.labels == {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
    assert acdc.dataset.modality == "MRI" and acdc.model.spatial_dims == 3
    assert acdc.model.name == "umamba_enc" and acdc.optim.name == "sam"  # UU-Mamba's code
    bot = load_config(CONFIGS / "acdc_bot.yaml")
    assert bot.model.name == "umamba_bot" and bot.model_dump(exclude={"model"}) == \
        acdc.model_dump(exclude={"model"})
    cpu = load_config(CONFIGS / "acdc_cpu.yaml")
    assert cpu.model.spatial_dims == 2 and cpu.train.time_limit_minutes == 20
    cas = load_config(CONFIGS / "imagecas.yaml")
    assert cas.dataset.modality == "CT" and cas.dataset.labels == {0: "background", 1: "coronary_artery"}
    aorta = load_config(CONFIGS / "aortaseg24.yaml")
    assert aorta.dataset.modality == "CT" and sorted(aorta.dataset.labels) == list(range(24))
