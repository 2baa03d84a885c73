"""3D on a CPU: the default (GPU-sized) plan and the CPU plan side by side, same wall time.

For each dataset, two models are trained one after the other on this CPU with the same
wall-time budget (``--minutes`` per model, ``train.time_limit_minutes``: preprocessing
included, the learning rate annealed over it), on fold ``all`` of the training cases, then
predict the same held-out volumes:

- ``gpu``: ``plan.target=gpu`` and every other setting at its default: the plan a new user
  got before the CPU planner (3D U-Mamba-Bot, features 32 -> 320, SAM);
- ``cpu``: ``plan.target=cpu`` (:mod:`uumamba.data.plan`: a 3D patch and network sized to
  ``plan.cpu_budget_s`` by the cost model, or 2D for anisotropic data; AdamW).

Datasets:

- ``atrium``: synthetic LGE-MRI-like left atria, 0.625 mm isotropic, about 200 x 140 x 88
  (the issue's case): an ellipsoidal cavity with pulmonary-vein stubs (label 1), an enhanced
  wall around it, textured background, smooth bias and Rician-like noise;
- ``acdc3d``: ACDC (``--data``, skipped with a message when absent) trained in 3D
  (``model.spatial_dims=3`` is stated, so the CPU plan keeps 3D and sizes it), the last
  patients held out.

Reported per dataset and plan: the plan (patch, batch, features, optimizer), the cost model's
estimate, the measured seconds per iteration (``time_estimate.json``: the loop's measurement
after warm-up), iterations done in the budget, seconds per predicted volume, and the held-out
Dice (foreground mean). ``--calibrate`` instead times single training steps of a range of
topologies (no data loading) next to the cost model's estimate (how the constants of
:mod:`uumamba.data.cost` were fitted). Then the 512 x 512 x 300 peak-RSS row from
``benchmarks/predict_3d_memory.py --cases a`` (skip with ``--no-memory``).

Usage::

    python benchmarks/bench_3d_cpu.py --minutes 3 --output /tmp/bench3d
    python benchmarks/bench_3d_cpu.py --datasets atrium --minutes 1 --no-memory   # quick
    python benchmarks/bench_3d_cpu.py --calibrate

Prints the machine, the date and the load average; writes ``OUTPUT/bench_3d_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from uumamba.commands.script import describe_machine

REPO = Path(__file__).resolve().parents[1]
ATRIUM_SPACING = (0.625, 0.625, 0.625)


def make_atrium(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic LGE-MRI-like left atrium (see the module docstring)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, ATRIUM_SPACING,
                                                                   strict=True)],
                                indexing="ij"), axis=-1)
    fov = np.asarray(shape) * np.asarray(ATRIUM_SPACING)
    centre = fov / 2 + rng.uniform(-8, 8, 3)
    radii = rng.uniform([22, 16, 12], [30, 22, 17])
    d = np.sqrt((((grid - centre) / radii) ** 2).sum(-1))
    cavity = d < 1.0
    for _ in range(4):  # pulmonary-vein stubs
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        start = centre + direction * radii * 0.8
        t = np.clip(((grid - start) @ direction), 0, rng.uniform(8, 16))
        axis_point = start + t[..., None] * direction
        cavity |= (np.linalg.norm(grid - axis_point, axis=-1) < rng.uniform(3, 5)) & (t > 0)
    wall = ndimage.binary_dilation(cavity, iterations=3) & ~cavity
    image = rng.normal(0.0, 1.0, shape)
    image = ndimage.gaussian_filter(image, 2.0) * 60 + 180  # textured background
    image[cavity] = 260 + rng.uniform(-30, 30)
    image[wall] = 420 + rng.uniform(-40, 40)  # enhanced (scarred) wall
    bias = ndimage.zoom(rng.uniform(0.8, 1.2, (3, 3, 3)), np.asarray(shape) / 3, order=1)
    image = image * bias[:shape[0], :shape[1], :shape[2]]
    noise = rng.normal(0, 25, (2, *shape))
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return image.astype(np.float32), cavity.astype(np.uint8)


def write_atrium_dataset(root: Path, n_train: int, n_test: int) -> tuple[Path, list[Path]]:
    """``root/train/{images,labels}`` and ``root/test/{images,labels}`` (reused when there)."""
    import nibabel as nib

    affine = np.diag([*ATRIUM_SPACING, 1.0])
    paths = []
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        for i in range(n):
            name = f"atrium_{offset + i:04d}.nii.gz"
            img_path = root / split / "images" / name
            paths.append(img_path) if split == "test" else None
            if img_path.is_file():
                continue
            shape = (196 + 4 * (i % 3), 140, 88)
            image, label = make_atrium(offset + i, shape)
            for folder, data in (("images", image), ("labels", label)):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(data, affine), str(root / split / folder / name))
    return root / "train", paths


def acdc_split(data: Path, root: Path, n_test: int) -> tuple[Path, list[Path]] | None:
    """Training patients linked into ``root/train``; the ED frames of the last ``n_test``."""
    patients = sorted(p for p in data.glob("patient*") if p.is_dir())
    if len(patients) <= n_test:
        return None
    train = root / "train"
    train.mkdir(parents=True, exist_ok=True)
    for p in patients[:-n_test]:
        link = train / p.name
        if not link.exists():
            link.symlink_to(p.resolve(), target_is_directory=True)
    tests = [sorted(p.glob("*_frame??.nii.gz"))[0] for p in patients[-n_test:]]
    return train, tests


def label_of(image: Path) -> Path:
    """The reference mask of a held-out image (atrium: labels/; ACDC: *_gt)."""
    if image.parent.name == "images":
        return image.parent.parent / "labels" / image.name
    return image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz"))


def dice(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> float:
    """Mean Dice over the foreground labels present in either mask."""
    scores = []
    for k in labels:
        p, r = pred == k, ref == k
        if p.any() or r.any():
            scores.append(2.0 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return float(np.mean(scores)) if scores else float("nan")


def run_model(name: str, train_dir: Path, tests: list[Path], out: Path, minutes: float,
              base: dict[str, Any], target: str) -> dict[str, Any]:
    """Train one plan for ``minutes`` (fold all), predict the held-out volumes, score them."""
    from uumamba.config import config_from_dict
    from uumamba.data.io import read_image
    from uumamba.engine.train import run_fold
    from uumamba.inference.predict import Predictor

    data = json.loads(json.dumps(base))
    data.setdefault("plan", {})["target"] = target
    data.setdefault("train", {}).update({
        "epochs": 1000, "iterations_per_epoch": 50, "time_limit_minutes": minutes,
        "schedule_by_time": True, "cache": "memory", "num_workers": 1, "amp": "off",
        "checkpoint_every_minutes": None})
    cfg = config_from_dict(data, f"bench {name}")
    model_dir = out / name
    t0 = time.monotonic()
    result = run_fold(cfg, train_dir, model_dir, fold="all", device="cpu", progress=False)
    train_s = time.monotonic() - t0
    plans = json.loads((model_dir / "plans.json").read_text())
    saved_cfg = json.loads(json.dumps(
        __import__("yaml").safe_load((model_dir / "config.yaml").read_text())))
    est_path = result.fold_dir / "time_estimate.json"
    est = json.loads(est_path.read_text()) if est_path.is_file() else {}
    predictor = Predictor.from_model_dir(model_dir, device="cpu")
    labels = [k for k in plans["labels"] if int(k) != 0]
    seconds, scores = [], []
    for image in tests:
        t1 = time.monotonic()
        pred = predictor.predict_file(image)
        seconds.append(time.monotonic() - t1)
        ref, _ = read_image(label_of(image))
        scores.append(dice(np.asarray(pred.mask), np.asarray(ref), [int(k) for k in labels]))
    decision = plans.get("decision") or {}
    row = {
        "model": name, "target": plans.get("target"), "dims": plans["spatial_dims"],
        "patch": plans["patch_size"], "batch": plans["batch_size"],
        "features": saved_cfg["model"]["features"] or "32-320",
        "optim": saved_cfg["optim"]["name"],
        "plan_estimate_s": decision.get("estimated_seconds_per_iteration"),
        "measured_s_per_it": est.get("seconds_per_iteration"),
        "iterations": result.iteration, "train_s": round(train_s, 1),
        "predict_s_per_volume": round(float(np.mean(seconds)), 1),
        "dice": round(float(np.mean(scores)), 4), "dice_per_case": [round(s, 4) for s in scores],
        "load_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(row), flush=True)
    return row


def calibrate() -> list[dict[str, Any]]:
    """Time single AdamW training steps of a range of topologies next to the cost model."""
    import torch

    from uumamba.config import LossConfig, OptimConfig
    from uumamba.data.cost import iteration_cost
    from uumamba.data.plan import plan_topology
    from uumamba.engine.step import training_step
    from uumamba.losses import build_loss
    from uumamba.nn.umamba import UMamba
    from uumamba.optim import build_optimizer

    cases = [(3, [32, 32, 32], 16, 256, 2), (3, [48, 48, 48], 16, 256, 1),
             (3, [64, 64, 64], 16, 256, 2), (3, [64, 48, 32], 32, 320, 2),
             (3, [96, 80, 64], 16, 256, 1), (3, [112, 80, 40], 32, 320, 2),
             (2, [128, 128], 16, 256, 8), (2, [256, 224], 32, 512, 4)]
    rows = []
    for dims, patch, base, top, batch in cases:
        patch, strides, kernels = plan_topology([1.0] * dims, patch, None, False)
        feats = [min(base * 2**s, top) for s in range(len(strides))]
        net = UMamba(dims, 1, 2, features=feats, strides=strides, kernel_sizes=kernels)
        loss = build_loss(LossConfig(), 2, None, net.n_deep_supervision_outputs)
        opt = build_optimizer(OptimConfig(name="adamw", lr=1e-3), net, loss)
        x, y = torch.randn(batch, 1, *patch), (torch.rand(batch, 1, *patch) > 0.7).long()
        times = []
        for _ in range(4):
            t = time.perf_counter()
            training_step(net, loss, opt, x, y)
            times.append(time.perf_counter() - t)
        cost = iteration_cost(patch, strides, kernels, feats, batch_size=batch)
        step_model = cost.seconds - batch * cost.voxels * 1.0e-6 - 0.05  # without data / fixed
        row = {"dims": dims, "patch": patch, "base": base, "batch": batch,
               "measured_min_s": round(min(times[1:]), 3), "model_step_s": round(step_model, 3),
               "load": round(os.getloadavg()[0], 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| dataset | plan | dims | patch x batch | features | optim | model s/it | "
            "measured s/it | iterations | s / volume | Dice |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['target']} | {r['dims']}D | "
            f"{'x'.join(map(str, r['patch']))} x {r['batch']} | {r['features']} | "
            f"{r['optim']} | {r['plan_estimate_s']} | "
            f"{'-' if r['measured_s_per_it'] is None else round(r['measured_s_per_it'], 2)} | "
            f"{r['iterations']} | {r['predict_s_per_volume']} | {r['dice']:.3f} |")
    return "\n".join(lines)


def memory_row(work: Path) -> str:
    """``predict_3d_memory.py --cases a``'s table line, or why there is none."""
    script = REPO / "benchmarks" / "predict_3d_memory.py"
    if not script.is_file():
        return "(benchmarks/predict_3d_memory.py not present: no 512 x 512 x 300 row)"
    proc = subprocess.run([sys.executable, str(script), "--cases", "a", "--work", str(work)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"(predict_3d_memory.py failed, exit {proc.returncode}: " \
               f"{proc.stderr.strip().splitlines()[-1:] or ''})"
    lines = proc.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("| case")]
    rows = lines[heads[-1]:] if heads else lines  # the final table, not the progress lines
    return "\n".join(line for line in rows if line.startswith("|"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from uumamba.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="training wall time per model (default 3)")
    parser.add_argument("--datasets", default="atrium,acdc3d",
                        help="comma list of atrium, acdc3d")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ACDC",
                        help="ACDC training folder (acdc3d)")
    parser.add_argument("--train-cases", type=int, default=8)
    parser.add_argument("--test-cases", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("/tmp/uumamba_bench_3d_cpu"))
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the 512 x 512 x 300 peak-RSS row")
    parser.add_argument("--calibrate", action="store_true",
                        help="time training steps against the cost model instead")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.train_cases < 2 or args.test_cases < 1:
        raise UserError("--minutes must be > 0, --train-cases >= 2, --test-cases >= 1")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in ("atrium", "acdc3d")]
    if unknown:
        raise UserError(f"--datasets: unknown {unknown}; choose from atrium, acdc3d")
    print(f"machine: {describe_machine()}", flush=True)
    if args.calibrate:
        return {"calibration": calibrate(), "machine": describe_machine()}
    args.output.mkdir(parents=True, exist_ok=True)
    rows = []
    for ds in datasets:
        if ds == "atrium":
            train_dir, tests = write_atrium_dataset(args.output / "atrium_data", args.train_cases,
                                                    args.test_cases)
            base: dict[str, Any] = {"dataset": {"labels": {0: "background", 1: "atrium"}}}
        else:
            if not args.data.is_dir():
                print(f"acdc3d: skipped, {args.data} not found (--data ACDC/training)",
                      flush=True)
                continue
            split = acdc_split(args.data, args.output / "acdc_data", args.test_cases)
            if split is None:
                print(f"acdc3d: skipped, {args.data} has too few patients", flush=True)
                continue
            train_dir, tests = split
            base = {"dataset": {"labels": {0: "background", 1: "RV", 2: "MYO", 3: "LV"}},
                    "model": {"spatial_dims": 3}}
        for target in ("gpu", "cpu"):
            print(f"{ds} / {target}: training {args.minutes:g} min (load "
                  f"{os.getloadavg()[0]:.2f}) ...", flush=True)
            row = run_model(f"{ds}_{target}", train_dir, tests, args.output, args.minutes,
                            base, target)
            rows.append({"dataset": ds, **row})
    print(f"\nmachine: {describe_machine()}\n{args.minutes:g} min of training per model\n")
    print(table(rows))
    memory = "" if args.no_memory else memory_row(args.output / "predict_3d_memory")
    if memory:
        print("\n512 x 512 x 300 prediction (benchmarks/predict_3d_memory.py --cases a):")
        print(memory)
    result = {"machine": describe_machine(), "minutes": args.minutes, "rows": rows, "memory": memory}
    (args.output / "bench_3d_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
