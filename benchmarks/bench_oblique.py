"""Oblique short-axis inputs on real ACDC: Dice of one held-out patient under tilted affines.

Real short-axis series are double-oblique; the shared ACDC copies have diagonal affines. This
benchmark trains the CPU recipe (``configs/acdc_cpu.yaml``, fold ``all`` without the held-out
patient) twice for the same wall time — once with the 0.1 rule (``plan.reorientation=ras``:
reorient to RAS, the z axis is the slice axis) and once with the current one
(``plan.reorientation=voxel``: each image's own thickest voxel axis is the slice axis) — then
segments the held-out patient's ED and ES volumes with their affines rotated by 0°, 30°, 44°,
46°, 60° and 90° about the world x axis and by a double-oblique short-axis-like direction
(50° about x, then 35° about y). The voxel arrays are untouched, so the reference labels stay
valid; the mask comes back in the input grid and is scored against them (Dice per class,
foreground mean over ED and ES).

Usage::

    python benchmarks/bench_oblique.py --data ../shared/data/ACDC --minutes 4 --output runs/oblique
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROTATIONS = [("x", 0.0), ("x", 30.0), ("x", 44.0), ("x", 46.0), ("x", 60.0), ("x", 90.0),
             ("sax", None)]


def _matrix(name: str, angle: float | None) -> np.ndarray:
    from uumamba.data.orientation import world_rotation

    return world_rotation(1, 35.0) @ world_rotation(0, 50.0) if name == "sax" \
        else world_rotation(0, angle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ACDC")
    parser.add_argument("--minutes", type=float, default=4.0, help="training minutes per model")
    parser.add_argument("--held-out", default=None, help="patient folder name (default: last)")
    parser.add_argument("--output", type=Path, default=Path("runs/bench_oblique"))
    args = parser.parse_args(argv)
    if not args.data.is_dir() or not any(args.data.glob("patient*")):
        from uumamba.errors import UserError

        raise UserError(f"--data {args.data}: no ACDC patientXXX folders (README, 'The ACDC "
                        "data', says where to obtain them)")

    import nibabel as nib

    from uumamba.config import load_config
    from uumamba.engine.train import run_fold
    from uumamba.evaluation.metrics import dice_per_class
    from uumamba.inference import Predictor

    patients = sorted(p for p in args.data.glob("patient*") if p.is_dir())
    held = next(p for p in patients if p.name == args.held_out) if args.held_out else patients[-1]
    train_root = args.output / "train_data"
    train_root.mkdir(parents=True, exist_ok=True)
    for p in patients:
        link = train_root / p.name
        if p != held and not link.exists():
            link.symlink_to(p.resolve(), target_is_directory=True)
    frames = sorted(f for f in held.glob("*_frame??.nii.gz"))
    result: dict = {"held_out": held.name, "minutes": args.minutes, "date": time.strftime("%Y-%m-%d"),
                    "modes": {}}
    for mode in ("ras", "voxel"):
        cfg = load_config(REPO / "configs" / "acdc_cpu.yaml",
                          [f"plan.reorientation={mode}", f"train.time_limit_minutes={args.minutes}",
                           "train.num_workers=0"])
        model_dir = args.output / f"model_{mode}"
        fit = run_fold(cfg, train_root, model_dir, fold="all", device="cpu", resume=True,
                       progress=False)
        predictor = Predictor.from_model_dir(model_dir, device="cpu")
        rows = {}
        for name, angle in ROTATIONS:
            scores = []
            for frame in frames:
                img = nib.load(str(frame))
                gt = np.asanyarray(nib.load(str(frame).replace(".nii.gz", "_gt.nii.gz")).dataobj)
                tilted = args.output / f"{frame.name[:-7]}_{name}{angle}.nii.gz"
                nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), _matrix(name, angle) @ img.affine),
                         str(tilted))
                mask = predictor.predict_file(tilted).mask
                scores.append(dice_per_class(mask, gt.astype(np.int64), [1, 2, 3]))
            per_class = {c: float(np.nanmean([s[v] for s in scores]))
                         for v, c in ((1, "RV"), (2, "MYO"), (3, "LV"))}
            per_class["mean"] = float(np.mean(list(per_class.values())))
            rows[f"{name} {'' if angle is None else f'{angle:g} deg'}".strip()] = per_class
        result["modes"][mode] = {"iterations": fit.iteration, "dice": rows}
    out = args.output / "bench_oblique.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"held-out {held.name}, {args.minutes:g} min per model; foreground mean Dice (RV MYO LV)")
    print(f"{'rotation':<12} {'ras (0.1)':>24} {'voxel (now)':>24}")
    for key in result["modes"]["ras"]["dice"]:
        cells = [result["modes"][m]["dice"][key] for m in ("ras", "voxel")]
        print(f"{key:<12} " + " ".join(
            f"{c['mean']:.3f} ({c['RV']:.2f} {c['MYO']:.2f} {c['LV']:.2f})".rjust(24) for c in cells))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
