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


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lr=.inf", "'optim.lr': Input should be a finite number"),
    ("optim.momentum=.nan", "'optim.momentum': Input should be a finite number"),
    ("optim.kl_weight=1e30", "'optim.kl_weight': Input should be less than or equal to 100"),
    ("train.seed=99999999999999999999", "'train.seed': Input should be less than or equal to 4294967295"),
    ("train.seed=-5", "'train.seed': Input should be greater than or equal to 0"),
    ("loss.focal_alpha=[&a [1, 1], *a]", "anchors and aliases (&name, *name) are not allowed"),
])
def test_crafted_override_values_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_override_and_config_sizes_are_bounded_and_errors_do_not_echo_whole_inputs(tmp_path):
    with pytest.raises(ConfigError, match="more than 10000"):
        load_config(None, ["optim.lr=" + "1" * 20_000])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lr=[" + ",".join(["1"] * 5000) + "]"])
    assert len(str(err.value)) < 300  # the 5000-element list is shortened, not echoed
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="more than a config file may have"):
        load_config(big)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("loss:\n  focal_alpha: &a [1, 1]\n")
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(bomb)


@pytest.mark.parametrize("override", [
    "inference.overlap=" + "[" * 9000,           # RecursionError in the YAML composer
    "inference.sw_batch_size=" + "9" * 9000,     # ValueError: int beyond 4300 digits
])
def test_overrides_that_break_the_yaml_parser_are_one_line_errors(override):
    from uumamba.config import InferenceConfig, inference_overrides

    with pytest.raises(ConfigError, match=r"nests too deep or holds a number too long") as info:
        inference_overrides(InferenceConfig(), [override])
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)
