"""Peak memory and seconds per stage of 3D prediction on a CPU, before and after, side by side.

Each case is predicted in a fresh subprocess (so one case's peak does not hide another's), by
the code of this checkout ("after") and by an older checkout given with ``--before`` (e.g. a
``git worktree add /tmp/before COMMIT``), interleaved so that both see the same machine load.
The models are untrained (random weights: speed and memory do not depend on training): a
small 3D U-Mamba-Bot of the size a CPU planner chooses (features 16-32-64-128, patch
96 x 96 x 64, batch of windows and overlap from the model's config defaults), written as
``uumamba train`` writes a model folder. Inputs are synthetic (ellipsoids and noise), written
once under ``--work`` and reused.

Cases:

- ``a``: CT 512 x 512 x 300 at 0.7 mm, 4 classes, network grid 1.4 mm (256 x 256 x 150);
- ``b``: CT 256 x 256 x 200 at 0.7 mm, 24 classes (AortaSeg24's 23 + background), grid 1.4 mm;
- ``b512``: CT 512 x 512 x 300 at 0.7 mm, 24 classes, grid 1.4 mm ("before" is not run for it
  unless ``--before-b512``: its inversion alone needs about 34 GB);
- ``c``: LGE-MRI 200 x 140 x 88 at 0.625 mm, binary, predicted at 0.625 mm.

Stages (seconds): ``preprocess`` (read, reorient, resample, normalise), ``network`` (sliding
windows, blending, fold ensemble), ``invert`` (back to the input grid; "after": with the
streaming argmax), ``other`` (the rest of ``predict_file``: checks, "before": its argmax,
postprocessing, volumes), ``write`` (mask and ``CASE_volumes.json``). Peak RSS is the child's
``ru_maxrss`` (model loading included); ``base`` its RSS with the model loaded, before the
case.

Usage::

    git worktree add /tmp/before HEAD     # before changing anything (or any older commit)
    python benchmarks/predict_3d_memory.py --before /tmp/before
    python benchmarks/predict_3d_memory.py --cases c,a --before /tmp/before --work /tmp/p3d

Prints a markdown table with the machine, the date and the load average before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from uumamba.commands.script import describe_machine

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """One synthetic input and the model that segments it."""

    name: str
    title: str
    shape: tuple[int, int, int]
    spacing: float
    classes: int
    target: float
    modality: str


CASES = {
    "a": Case("a", "CT 512x512x300 @0.7 mm, 4 classes", (512, 512, 300), 0.7, 4, 1.4, "CT"),
    "b": Case("b", "CT 256x256x200 @0.7 mm, 24 classes", (256, 256, 200), 0.7, 24, 1.4, "CT"),
    "b512": Case("b512", "CT 512x512x300 @0.7 mm, 24 classes", (512, 512, 300), 0.7, 24, 1.4,
                 "CT"),
    "c": Case("c", "MRI 200x140x88 @0.625 mm, 2 classes", (200, 140, 88), 0.625, 2, 0.625,
              "MRI"),
}

#: A CPU-sized 3D plan (what a planner sizing to ~3 s per iteration on 2 cores picks).
FEATURES = [16, 32, 64, 128]
PATCH = [96, 96, 64]


# --------------------------------------------------------------------------------------------
# inputs and model folders (written with this checkout's code, read by both)


def _write_input(case: Case, path: Path) -> None:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    shape = case.shape
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    image = np.full(shape, -800.0 if case.modality == "CT" else 50.0, dtype=np.float32)
    for k in range(6):  # a few ellipsoids of different intensity
        centre = [n * f for n, f in zip(shape, rng.uniform(0.25, 0.75, 3), strict=True)]
        radii = [n * f for n, f in zip(shape, rng.uniform(0.08, 0.25, 3), strict=True)]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
        image[inside] = (40.0 + 60 * k) if case.modality == "CT" else (150.0 + 40 * k)
        del inside
    image += rng.normal(0, 20, size=shape).astype(np.float32)
    dtype = np.int16 if case.modality == "CT" else np.float32
    affine = np.diag([case.spacing] * 3 + [1.0])
    img = nib.Nifti1Image(image.astype(dtype), affine)
    img.set_sform(affine, code=2)
    img.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    nib.save(img, str(tmp))
    tmp.replace(path)


def _write_model(case: Case, folder: Path) -> None:
    import torch
    import yaml

    from uumamba.config import config_from_dict
    from uumamba.data.plan import ChannelNormalization, Plans
    from uumamba.engine.checkpoint import CHECKPOINT_KEYS
    from uumamba.nn import build_network

    labels = {i: ("background" if i == 0 else f"class{i}") for i in range(case.classes)}
    # only what a user's config would say: the inference settings stay each version's defaults
    raw = {"dataset": {"labels": labels},
           "model": {"name": "umamba_bot", "spatial_dims": 3, "features": FEATURES}}
    cfg = config_from_dict(raw)
    norm = (ChannelNormalization(scheme="ct", clip_low=-1000.0, clip_high=1000.0, mean=0.0,
                                 std=500.0)
            if case.modality == "CT" else ChannelNormalization(scheme="zscore"))
    plans = Plans(spatial_dims=3, modality=case.modality, labels=labels, num_input_channels=1,
                  axcodes="voxel", target_spacing=[case.target] * 3, slice_axis=2,
                  normalization=[norm], patch_size=PATCH,
                  strides=[[1, 1, 1]] + [[2, 2, 2]] * (len(FEATURES) - 1),
                  kernel_sizes=[[3, 3, 3]] * len(FEATURES), batch_size=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    # only the fields every version of Plans knows, so that an older checkout reads it too
    known = ("spatial_dims", "modality", "labels", "num_input_channels", "axcodes",
             "target_spacing", "slice_axis", "normalization", "patch_size", "strides",
             "kernel_sizes", "batch_size")
    (folder / "plans.json").write_text(json.dumps(
        {k: v for k, v in plans.model_dump(mode="json").items() if k in known}, indent=2))
    (folder / "dataset.json").write_text(json.dumps(
        {"labels": {str(k): v for k, v in labels.items()}}))
    torch.manual_seed(0)
    net = build_network(cfg.model, plans)
    state = dict.fromkeys(CHECKPOINT_KEYS)
    state["model"] = net.state_dict()
    (folder / "fold_all").mkdir(exist_ok=True)
    torch.save(state, folder / "fold_all" / "checkpoint_latest.pt")


def _prepare(case: Case, work: Path) -> tuple[Path, Path]:
    image = work / "inputs" / f"{case.name}.nii.gz"
    model = work / "models" / case.name
    if not image.is_file():
        print(f"writing input {image} ...", flush=True)
        _write_input(case, image)
    if not (model / "fold_all" / "checkpoint_latest.pt").is_file():
        _write_model(case, model)
    return image, model


# --------------------------------------------------------------------------------------------
# one case in a fresh process


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(src: Path, image: Path, model: Path, output: Path) -> dict:
    """Predict one case with the code under ``src``; return stages, peak and base RSS."""
    import resource

    sys.path.insert(0, str(src))
    import uumamba
    from uumamba.inference.predict import Predictor
    from uumamba.inference.writer import write_prediction

    predictor = Predictor.from_model_dir(model, device="cpu")
    stages: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    # the old code's stages, measured from outside (the new code reports its own)
    predictor.transforms = timed("preprocess", predictor.transforms)
    predictor.ensemble_probabilities = timed("network", predictor.ensemble_probabilities)
    predictor.invert = timed("invert", predictor.invert)
    base = _rss_mb()
    t0 = time.perf_counter()
    pred = predictor.predict_file(image)
    t_predict = time.perf_counter() - t0
    own = getattr(pred, "timings", None)
    if own:
        stages = {"preprocess": own.get("read", 0.0) + own.get("preprocess", 0.0),
                  "network": own.get("network", 0.0), "invert": own.get("invert", 0.0)}
    stages["other"] = max(0.0, t_predict - sum(stages.values()))
    t1 = time.perf_counter()
    write_prediction(pred, image.name.split(".")[0], image, output, predictor.labels)
    stages["write"] = time.perf_counter() - t1
    stages["total"] = time.perf_counter() - t0
    overlap, batch = predictor.inference_cfg.overlap, predictor.inference_cfg.sw_batch_size
    if overlap is None or batch is None:  # unset: the device's defaults (this checkout)
        from uumamba.inference.sliding import resolve_window_settings

        overlap, batch = resolve_window_settings(predictor.inference_cfg, predictor.device)
    return {"stages": stages, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "base_mb": base, "uumamba": uumamba.__file__, "overlap": overlap,
            "sw_batch_size": batch,
            "threads": __import__("torch").get_num_threads()}


def _run_child(src: Path, image: Path, model: Path, output: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(src), str(image),
           str(model), str(output)]
    # cwd outside the checkout: the child imports uumamba from ``src`` only
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(output.parent),
                          timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"error": f"exit status {proc.returncode}: {tail}"}


# --------------------------------------------------------------------------------------------
# the table


def _row(case: Case, code: str, load: float, r: dict) -> str:
    if "error" in r:
        return f"| {case.name}: {case.title} | {code} | {load:.1f} | " + " | " * 8 + r["error"] + " |"
    s = r["stages"]
    return (f"| {case.name}: {case.title} | {code} | {load:.1f} | {r['overlap']:g} / "
            f"{r['sw_batch_size']} | {s['preprocess']:.1f} | {s['network']:.1f} | "
            f"{s['invert']:.1f} | {s['other']:.1f} | {s['write']:.1f} | **{s['total']:.1f}** | "
            f"**{r['peak_mb'] / 1024:.2f}** | {r['base_mb'] / 1024:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="c,a,b", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--before", type=Path, default=None,
                        help="checkout of the code to compare with (omit: 'after' only)")
    parser.add_argument("--before-b512", action="store_true",
                        help="also run the old code on b512 (needs ~34 GB)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/uumamba_predict_3d_memory"))
    parser.add_argument("--timeout-minutes", type=float, default=30.0)
    args = parser.parse_args(argv)
    from uumamba.errors import UserError

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise UserError(f"--cases {args.cases}: expected a comma list of {', '.join(CASES)}")
    if args.before is not None and not (args.before / "uumamba" / "__init__.py").is_file():
        raise UserError(f"--before {args.before}: no uumamba package there "
                        "(make one with `git worktree add /tmp/before COMMIT`)")
    work = args.work.resolve()
    lines = [f"machine: {describe_machine()}", f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}", "",
             "| case | code | load (1 min) | overlap / windows per batch | preprocess s | "
             "network s | invert s | other s | write s | total s | peak RSS GB | base GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        case = CASES[name]
        image, model = _prepare(case, work)
        runs = []
        if args.before is not None and (name != "b512" or args.before_b512):
            runs.append(("before", args.before.resolve()))
        runs.append(("after", REPO))
        for code, src in runs:
            out = work / "outputs" / f"{name}_{code}"
            out.mkdir(parents=True, exist_ok=True)
            load = os.getloadavg()[0]
            print(f"{name} {code}: predicting (load {load:.1f}) ...", flush=True)
            result = _run_child(src, image, model, out, args.timeout_minutes * 60)
            lines.append(_row(case, code, load, result))
            print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        result = _child(*(Path(a) for a in sys.argv[2:]))
        print("RESULT " + json.dumps(result), flush=True)
        sys.exit(0)
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
