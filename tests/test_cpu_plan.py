"""The CPU-aware planner (``plan.target``): deterministic for a fingerprint and budget, 2D for
anisotropic data, a 3D patch sized down to the budget for isotropic data, AdamW instead of an
unstated SAM, only unstated settings chosen, the GPU plan unchanged, old plans loadable."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uumamba.config import (
    Config,
    DatasetConfig,
    ModelConfig,
    OptimConfig,
    PlanConfig,
    config_from_dict,
    load_config,
)
from uumamba.data.cost import iteration_cost, optimizer_passes
from uumamba.data.layouts import discover
from uumamba.data.plan import Plans, apply_plan_decision, plan_dataset, resolve_target

LABELS = {0: "background", 1: "atrium"}


def _write(root: Path, name: str, shape: tuple[int, int, int], spacing: tuple[float, ...],
           rng) -> None:
    image = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    c = [s // 2 for s in shape]
    label[c[0] - shape[0] // 5:c[0] + shape[0] // 5, c[1] - shape[1] // 5:c[1] + shape[1] // 5,
          c[2] - shape[2] // 5:c[2] + shape[2] // 5] = 1
    affine = np.diag([*spacing, 1.0])
    for folder, data in (("images", image), ("labels", label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(root / folder / f"{name}.nii"))


@pytest.fixture(scope="module")
def lge(tmp_path_factory) -> Path:
    """The issue's case: LGE-MRI atria, 0.625 mm isotropic, about 200 x 140 x 88."""
    root = tmp_path_factory.mktemp("lge")
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(196, 140, 88), (200, 140, 88), (204, 140, 88)]):
        _write(root, f"la_{i:03d}", shape, (0.625, 0.625, 0.625), rng)
    return root


@pytest.fixture(scope="module")
def cine(tmp_path_factory) -> Path:
    """Short-axis cine-MRI-like: 1.5 mm in-plane, 8 mm slices."""
    root = tmp_path_factory.mktemp("cine")
    rng = np.random.default_rng(1)
    for i in range(3):
        _write(root, f"sa_{i:03d}", (160, 144, 10), (1.5, 1.5, 8.0), rng)
    return root


def _plan(root: Path, device: str = "cpu", plan: dict | None = None,
          model: dict | None = None, optim: dict | None = None) -> Plans:
    return plan_dataset(discover(root), DatasetConfig(labels=LABELS),
                        PlanConfig.model_validate(plan or {}),
                        ModelConfig.model_validate(model or {}),
                        OptimConfig.model_validate(optim or {}), device_type=device)


def test_target_resolution() -> None:
    assert resolve_target("auto", "cpu") == "cpu" and resolve_target("auto", "cuda") == "gpu"
    assert resolve_target("gpu", "cpu") == "gpu" and resolve_target("cpu", "cuda") == "cpu"


def test_gpu_plan_unchanged(lge: Path) -> None:
    gpu = _plan(lge, device="cuda")
    # the plan: 3D, 0.625 mm, 112 x 80 x 40, batch 2 (today's rules)
    assert (gpu.target, gpu.spatial_dims, gpu.patch_size, gpu.batch_size) == \
        ("gpu", 3, [112, 80, 40], 2)
    assert gpu.decision.model == {} and gpu.decision.optim == {}
    assert "plan.target gpu" in gpu.decision.reason
    asked = _plan(lge, device="cpu", plan={"target": "gpu"})
    assert asked.model_dump(exclude={"decision"}) == gpu.model_dump(exclude={"decision"})


def test_isotropic_cpu_plan_sized_to_the_budget(lge: Path) -> None:
    cpu = _plan(lge)
    d = cpu.decision
    assert cpu.target == "cpu" and cpu.spatial_dims == 3
    assert d.model["spatial_dims"] == 3 and d.model["features"][0] == 16
    assert d.optim == {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4}
    # measured once by benchmarks/bench_3d_cpu.py: the model's estimate must stay <= 3 s
    assert d.estimated_seconds_per_iteration <= 3.0 and d.budget_seconds == 3.0
    gpu = _plan(lge, device="cuda")
    assert gpu.decision.estimated_seconds_per_iteration > 4 * d.estimated_seconds_per_iteration
    assert np.prod(cpu.patch_size) <= np.prod(gpu.patch_size)
    assert "3D" in d.reason and "adamw" in d.reason and "within" in d.reason
    # deterministic for a fingerprint and a budget; a smaller budget, a smaller patch
    assert _plan(lge).model_dump() == cpu.model_dump()
    small = _plan(lge, plan={"cpu_budget_s": 1.0})
    assert np.prod(small.patch_size) < np.prod(cpu.patch_size)
    assert small.decision.estimated_seconds_per_iteration <= 1.0


def test_anisotropic_data_get_2d(cine: Path) -> None:
    cpu = _plan(cine)
    assert cpu.spatial_dims == 2 and cpu.decision.model["spatial_dims"] == 2
    assert "anisotropic" in cpu.decision.reason and len(cpu.patch_size) == 2
    assert 2 <= cpu.batch_size <= 32 and cpu.decision.estimated_seconds_per_iteration <= 3.0
    # stated settings are kept: 3D asked for, SAM asked for, features given
    kept = _plan(cine, model={"spatial_dims": 3, "features": [16, 32, 64]},
                 optim={"name": "sam"})
    assert kept.spatial_dims == 3 and kept.decision.model == {} and kept.decision.optim == {}
    assert len(kept.strides) == 3
    # a stated 3-value patch states 3D as well (before plan.target, 3D was the only default)
    patch_3d = _plan(cine, plan={"patch_size": [64, 64, 4]})
    assert patch_3d.spatial_dims == 3 and patch_3d.patch_size == [64, 64, 4]
    assert "3-value patch" in patch_3d.decision.reason


def test_cost_model_counts() -> None:
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    kernels = [[3, 3, 3]] * 3
    base = iteration_cost([32, 32, 32], strides, kernels, [16, 32, 64], batch_size=1)
    assert base.passes == 1 and base.macs > 0 and base.voxels == 32**3
    sam = iteration_cost([32, 32, 32], strides, kernels, [16, 32, 64], batch_size=1, passes=2)
    double = iteration_cost([32, 32, 32], strides, kernels, [32, 64, 128], batch_size=1)
    big = iteration_cost([64, 64, 64], strides, kernels, [16, 32, 64], batch_size=2)
    assert sam.seconds > base.seconds and double.macs > 3 * base.macs
    assert big.seconds > 8 * (base.seconds - 0.05)
    with pytest.raises(ValueError, match="features"):
        iteration_cost([32, 32, 32], strides, kernels, [16, 32])
    assert [optimizer_passes(n) for n in ("adamw", "sam", "looksam", "rst", "ema_kl")] == \
        pytest.approx([1.0, 2.0, 1.2, 1.5, 4 / 3])
    assert optimizer_passes("looksam", looksam_k=10) == pytest.approx(1.1)


def test_decision_applied_to_unstated_settings_only(lge: Path, tmp_path: Path) -> None:
    plans = _plan(lge)
    cfg = apply_plan_decision(Config(), plans)
    assert cfg.model.spatial_dims == 3 and cfg.model.features == plans.decision.model["features"]
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 2e-3, 1e-4)
    assert apply_plan_decision(cfg, plans) == cfg  # idempotent
    stated = config_from_dict({"optim": {"name": "sam", "lr": 0.05}})
    assert apply_plan_decision(stated, plans).optim.name == "sam"
    # plans.json round trip, and a plans.json of 0.3 (no target / decision) is a GPU plan
    plans.save(tmp_path / "plans.json")
    assert Plans.load(tmp_path / "plans.json") == plans
    old = json.loads((tmp_path / "plans.json").read_text())
    del old["target"], old["decision"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = Plans.load(tmp_path / "old.json")
    assert loaded.target == "gpu" and loaded.decision is None
    assert apply_plan_decision(Config(), loaded) == Config()


@pytest.mark.parametrize("name", ["imagecas", "aortaseg24"])
def test_cpu_configs_next_to_the_gpu_ones(name: str, lge: Path) -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    gpu, cpu = load_config(configs / f"{name}.yaml"), load_config(configs / f"{name}_cpu.yaml")
    assert cpu.dataset == gpu.dataset and cpu.plan.target == "cpu"
    assert cpu.optim.name == "adamw" and cpu.train.time_limit_minutes == 60
    assert cpu.train.schedule_by_time and cpu.model.spatial_dims == 3
    plans = plan_dataset(discover(lge), DatasetConfig(labels=LABELS), cpu.plan, cpu.model,
                         cpu.optim, device_type="cpu")
    assert plans.spatial_dims == 3 and plans.decision.estimated_seconds_per_iteration <= 3.0


def test_folds_and_resume_share_the_cpu_decision(tmp_path: Path) -> None:
    """A config that leaves model.features and optim.name open: the CPU plan chooses them, and
    fold 1 and a --resume with the same (unresolved) config agree with fold 0's settings."""
    import yaml

    from uumamba.data.synthetic import write_synthetic_dataset
    from uumamba.engine.train import run_fold

    data = write_synthetic_dataset(tmp_path / "data", n_cases=2, seed=0)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/tiny.yaml").read_text())
    del raw["optim"], raw["model"]["features"]
    raw["train"].update({"epochs": 1, "iterations_per_epoch": 2, "time_limit_minutes": None})
    cfg = config_from_dict(raw)
    first = run_fold(cfg, data, tmp_path / "model", fold="0", device="cpu", progress=False)
    plans = Plans.load(tmp_path / "model" / "plans.json")
    assert plans.target == "cpu" and plans.decision.optim["name"] == "adamw"
    saved = load_config(tmp_path / "model" / "config.yaml")
    assert saved.optim.name == "adamw" and saved.model.features == plans.decision.model["features"]
    again = run_fold(cfg, data, tmp_path / "model", fold="0", resume=True, device="cpu",
                     progress=False)
    assert first.finished and again.reason == "already_finished"
    assert run_fold(cfg, data, tmp_path / "model", fold="1", device="cpu",
                    progress=False).finished
