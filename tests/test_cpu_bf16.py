"""bf16 autocast on CPUs with AMX tiles or AVX512-BF16: detection, its override, training
precision and sliding-window inference (``uumamba.device``,
``engine.components.select_precision``, ``inference.sliding.window_autocast``).

The suite runs with ``UUMAMBA_CPU_BF16=0`` (tests/conftest.py); these tests set it themselves.
bf16 autocast runs on any CPU (emulated without those units), so the bf16 path is exercised everywhere.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import uumamba.device
from uumamba.config import CPU_BF16_ENV, Config, InferenceConfig
from uumamba.device import cpu_bf16_unit, cpu_native_bf16, native_bf16
from uumamba.engine.components import select_precision
from uumamba.errors import ConfigError
from uumamba.inference.sliding import sliding_window_probabilities

CPU = torch.device("cpu")


@pytest.mark.parametrize(("amx", "avx512_bf16", "unit"), [
    (True, True, "AMX"), (True, False, "AMX"), (False, True, "AVX512-BF16"), (False, False, None)])
def test_detection_follows_the_cpu_when_unset(monkeypatch, amx, avx512_bf16, unit):
    """AMX tiles or AVX512-BF16 (Zen 4, Cooper Lake) make bf16 native; plain AVX-512 does not."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(uumamba.device, "_onednn_bf16", lambda: True)
    for unset in (None, "", " "):
        if unset is None:
            monkeypatch.delenv(CPU_BF16_ENV, raising=False)
        else:
            monkeypatch.setenv(CPU_BF16_ENV, unset)
        assert cpu_bf16_unit() == unit
        assert cpu_native_bf16() is (unit is not None)
        assert native_bf16(CPU) is (unit is not None)
    monkeypatch.setattr(uumamba.device, "_onednn_bf16", lambda: False)  # units, no oneDNN bf16
    assert not cpu_native_bf16()


def test_a_missing_or_failing_probe_reads_as_absent(monkeypatch):
    def broken():
        raise RuntimeError("cpuinfo failed")

    monkeypatch.delenv(CPU_BF16_ENV)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_bf16_unit() is None and not native_bf16(CPU)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_bf16_unit() == "AVX512-BF16"


def test_override_wins_and_a_bad_value_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert not native_bf16(CPU)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert native_bf16(CPU)
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match=r"UUMAMBA_CPU_BF16='yes': expected 0 .* or 1"):
        native_bf16(CPU)


@pytest.mark.parametrize("native", [True, False])
def test_training_precision_follows_the_cpu(monkeypatch, native):
    """A CPU with bf16 units trains in bf16 under ``auto`` (no scaler); one without stays in
    float32 and refuses a forced bf16 (it would be emulated); fp16 and off are float32 on a
    CPU."""
    monkeypatch.delenv(CPU_BF16_ENV)
    monkeypatch.setattr(uumamba.device, "cpu_native_bf16", lambda: native)
    assert select_precision("auto", CPU) == ((torch.bfloat16, None) if native else (None, None))
    assert select_precision("off", CPU) == (None, None)
    assert select_precision("fp16", CPU) == (None, None)
    if native:
        assert select_precision("bf16", CPU) == (torch.bfloat16, None)
    else:
        with pytest.raises(ConfigError,
                           match=r"train\.amp=bf16: this CPU has neither AMX tiles nor AVX512-BF16"):
            select_precision("bf16", CPU)


def test_yaml_booleans_map_to_amp_values():
    cfg = Config.model_validate({"train": {"amp": False}, "inference": {"amp": False}})
    assert (cfg.train.amp, cfg.inference.amp) == ("off", "off")
    assert Config.model_validate({"inference": {"amp": True}}).inference.amp == "auto"
    with pytest.raises(ValueError, match="inference.amp"):
        Config.model_validate({"inference": {"amp": "bf16"}})


class _Recorder(torch.nn.Module):
    """Two 3x3 convolutions; remembers the dtype the first one computed in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 3, 3, padding=1)
        self.seen: set[torch.dtype] = set()

    def forward(self, x):
        h = self.a(x)
        self.seen.add(h.dtype)
        return self.b(torch.tanh(h))


def test_windows_run_in_bf16_where_the_cpu_has_it_and_float32_with_amp_off(monkeypatch):
    image = torch.randn(1, 1, 24, 20, 3)
    plans = SimpleNamespace(spatial_dims=2, patch_size=[16, 16], slice_axis=2)
    model = _Recorder()
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    bf16 = sliding_window_probabilities(model, image, plans, InferenceConfig(sw_batch_size=2))
    assert model.seen == {torch.bfloat16}
    model.seen.clear()
    fp32 = sliding_window_probabilities(model, image, plans,
                                        InferenceConfig(sw_batch_size=2, amp="off"))
    assert model.seen == {torch.float32}
    # blending and softmax stay float32: a distribution at every voxel, close to float32's
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16.sum(1), torch.ones(1, 24, 20, 3), atol=1e-5, rtol=0)
    diff = (bf16 - fp32).abs().max().item()
    assert 0 < diff < 0.03
    monkeypatch.setenv(CPU_BF16_ENV, "0")  # a CPU without bf16 units: float32 under auto
    model.seen.clear()
    again = sliding_window_probabilities(model, image, plans, InferenceConfig(sw_batch_size=2))
    assert model.seen == {torch.float32}
    torch.testing.assert_close(again, fp32)


def test_the_training_log_names_the_precision(monkeypatch):
    from uumamba.device import precision_name
    from uumamba.engine.components import describe_precision

    monkeypatch.delenv(CPU_BF16_ENV)

    assert precision_name(torch.bfloat16) == "bfloat16" and precision_name(None) == "float32"
    for amx, avx512_bf16, where in ((True, True, " on AMX"), (False, True, " on AVX512-BF16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert describe_precision("auto", torch.bfloat16, None, CPU).startswith(
            f"bf16 autocast (train.amp=auto{where}; normalisation statistics")
    assert describe_precision("auto", None, None, CPU) == \
        "float32 (train.amp=auto; cpu without bf16 units: AMX or AVX512-BF16)"
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert describe_precision("bf16", torch.bfloat16, None, CPU).startswith(
        "bf16 autocast (train.amp=bf16 with UUMAMBA_CPU_BF16=1;")
    assert describe_precision("off", None, None, CPU) == "float32 (train.amp=off)"
    assert describe_precision("fp16", None, None, CPU) == \
        "float32 (train.amp=fp16, which a CPU does not use)"


def test_the_training_log_says_when_validation_runs_in_another_precision(monkeypatch):
    from uumamba.engine.components import describe_validation_precision

    monkeypatch.setenv(CPU_BF16_ENV, "1")  # a CPU with bf16 units
    assert describe_validation_precision(InferenceConfig(), None, CPU) == (
        "validation windows in bfloat16 (inference.amp=auto; also the model's default for "
        "prediction)")
    assert describe_validation_precision(InferenceConfig(), torch.bfloat16, CPU) is None
    assert describe_validation_precision(InferenceConfig(amp="off"), None, CPU) is None
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert describe_validation_precision(InferenceConfig(), None, CPU) is None


def _restore(precision, caplog):
    """Restore a float32 run (a linear model) from a checkpoint that says ``precision``;
    returns the loop state and the warnings logged."""
    import logging

    from uumamba.engine.checkpoint import capture_rng_state
    from uumamba.engine.resume import restore_from_checkpoint
    from uumamba.optim import PolyLRScheduler

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = SimpleNamespace(model=model, loss_fn=torch.nn.Module(), optimizer=opt,
                            scheduler=PolyLRScheduler(opt, total_iters=10), scaler=None,
                            autocast_dtype=None)
    saved = {"model": model.state_dict(), "loss": {}, "optimizer": opt.state_dict(),
             "scheduler": parts.scheduler.state_dict(), "scaler": None,
             "rng": capture_rng_state(), "iteration": 3, "best_metric": None,
             "metric_history": [], "config": Config().model_dump(mode="json"),
             "precision": precision}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uumamba.engine.resume"):
        state = restore_from_checkpoint(parts, saved, total=10)
    return state, caplog.text


def test_resuming_in_another_precision_is_a_warning(caplog):
    """The checkpoint records what train.amp resolved to; resuming where it resolves
    differently (e.g. a bf16 run moved to a CPU without bf16 units) continues with a warning."""
    state, text = _restore("bfloat16", caplog)
    assert state.iteration == 3
    assert "trained in bfloat16 and continues in float32 (train.amp=auto" in text
    assert "continues in" not in _restore("float32", caplog)[1]


def test_messages_name_the_variable_that_turned_bf16_off(monkeypatch):
    """UUMAMBA_CPU_BF16=0 on a CPU with AMX: the refusal and the log line say it was the
    variable, not the CPU."""
    from uumamba.engine.components import describe_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    with pytest.raises(ConfigError, match=r"train\.amp=bf16: UUMAMBA_CPU_BF16=0 turns bf16 off"):
        select_precision("bf16", CPU)
    assert describe_precision("auto", None, None, CPU) == \
        "float32 (train.amp=auto; UUMAMBA_CPU_BF16=0)"


def test_a_bad_variable_fails_before_any_command_runs(tmp_path, monkeypatch):
    """The CLI checks UUMAMBA_CPU_BF16 first (a float32 training would otherwise run an epoch
    before its validation met it); one line, exit 1."""
    from typer.testing import CliRunner

    from uumamba.commands import app

    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    result = CliRunner().invoke(app, ["check-data", str(tmp_path)])
    assert result.exit_code == 1
    assert "UUMAMBA_CPU_BF16='yes': expected 0" in result.output
    assert "Traceback" not in result.output


def test_a_bad_variable_does_not_block_help(tmp_path, monkeypatch):
    """``--help`` does no work, so it is shown whatever UUMAMBA_CPU_BF16 holds; the command
    itself still fails on it, also when ``--help`` is an option's value (a folder name)."""
    from typer.testing import CliRunner

    from uumamba.commands import app

    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    for args in (["--help"], ["predict", "--help"], ["serve", "--help"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output, result.output
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["predict", "--model", "m", "--input", "i", "--output",
                                      "--help"])
    assert result.exit_code == 1 and "Usage" not in result.output
    assert result.output.strip().splitlines() == [
        "error: UUMAMBA_CPU_BF16='yes': expected 0 (float32 on the CPU) or 1 (bf16 autocast on "
        "the CPU), or unset (bf16 where the CPU has AMX or AVX512-BF16)"]
    assert list(tmp_path.iterdir()) == []  # no folder named --help


def test_a_crafted_checkpoint_precision_is_not_echoed(caplog):
    _, text = _restore("bf\n16\x1b[31m" + "x" * 10_000, caplog)
    assert "trained in an unknown precision and continues in float32" in text
    assert "\x1b" not in text and len(text) < 1000
