"""The typed configuration: errors name the key, ranges are enforced, overrides parse as YAML."""

from __future__ import annotations

import pytest

from uumamba.config import load_config, save_config
from uumamba.errors import ConfigError


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["optim.rho=0.1", "model.features=[8, 16, 32]", "train.amp=off"])
    assert cfg.optim.rho == 0.1
    assert cfg.model.features == [8, 16, 32]
    assert cfg.train.amp == "off"  # YAML reads unquoted `off` as False


@pytest.mark.parametrize(("override", "message"), [
    ("optim.foo=1", "unknown key 'optim.foo'"),
    ("train.epochs=abc", "'train.epochs'"),
    ("train.epochs=-3", "greater than or equal to 1"),
    ("inference.overlap=1.5", "'inference.overlap'"),
    ("optim.lr=0", "'optim.lr'"),
    ("model.name=vnet", "'model.name'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["garbage"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(None, ["optim.name=asam", "dataset.labels={0: bg, 1: LV}"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary left
