"""Seconds per volume of prediction, UU-Mamba against the DynUNet, in each precision, interleaved.

Four predictors (five with ``--tta``) segment the same ACDC volumes in one process, volume by volume, in an order
that rotates with the volume (so none always runs first after a read): a trained UU-Mamba
model folder (``--model``, fold ``--fold``, e.g. the one ``bench_acdc.py`` leaves in
``OUTPUT/uumamba``) and a DynUNet of ``bench_acdc.py``'s architecture on the same plan, each
with ``inference.amp`` ``auto`` (bf16 autocast where :func:`uumamba.device.native_bf16` holds:
a CPU with AMX or AVX512-BF16) and ``off`` (float32). The DynUNet's weights are its seeded initialisation:
a network's time does not depend on its weights. Everything else is the model's config
(``acdc_cpu.yaml``: overlap 0.5, 16 windows per batch, Gaussian blending, no TTA) and the
fold's postprocessing, which the DynUNet predictor applies too (the same work after the
network; bench_acdc.py decides one for each model by the same rule).

For each predictor: mean seconds per volume of each stage of ``Predictor.predict_file``
(``read``, ``preprocess``, ``network``, ``invert``, ``postprocess``; the first volume is a
warm-up, not counted); for UU-Mamba also what bf16 costs: the Dice between its bf16 and its
float32 masks per class, and each one's Dice against the expert labels. The volumes are the
validation cases of ``--fold`` (unseen by that fold's model), ``--cases`` of them; with
``--volumes all`` every volume of ``--data`` (a timing run over more volumes: the Dice then
includes the model's training volumes, and the table says so). The per-volume ratio of
UU-Mamba over the DynUNet in each precision is the geometric mean of the volumes' ratios
with its 95 % bootstrap interval.

``--tta`` adds UU-Mamba with mirroring test-time augmentation (4 flips in 2D; ``auto``
precision): its seconds and its Dice against the expert labels, the price and the gain of
TTA. ``--startup`` also times ``uumamba predict`` as a user runs it: a fresh process per run
(import, model loading, numba kernels from their on-disk cache) on one volume, the mean of
3 runs, against the in-process seconds of the same volume.

Prints a markdown table with the machine and the date; writes ``--json``.

    python benchmarks/bench_predict.py --model runs/bench_acdc_cv/uumamba --fold 0 --startup
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("read", "preprocess", "network", "invert", "postprocess")


def _dice(a, b) -> float | None:
    """Dice of two boolean arrays; None when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


def _predictors(args: argparse.Namespace) -> dict:
    """``{"uumamba auto": Predictor, "uumamba off": ..., "dynunet auto": ..., ...}``."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_acdc import build_dynunet

    from uumamba.inference.predict import Predictor
    from uumamba.model_folder import ModelFolder

    ours = Predictor.from_model_dir(args.model, folds=str(args.fold), device="cpu")
    features = None if args.dynunet_default_features else \
        list(ModelFolder(args.model).load_config().model.features)
    torch.manual_seed(0)
    dynunet = build_dynunet(ours.plans, features).net.eval()
    out = {}
    for name, nets in (("uumamba", ours.networks), ("dynunet", [dynunet])):
        for amp in ("auto", "off"):
            cfg = ours.inference_cfg.model_copy(update={"amp": amp})
            # the DynUNet gets the fold's postprocessing too: the same work after the network
            out[f"{name} {amp}"] = Predictor(nets, ours.plans, cfg, device="cpu", tta=False,
                                             labels=ours.labels,
                                             postprocessing=ours.postprocessing)
    if args.tta:
        out["uumamba auto tta"] = Predictor(ours.networks, ours.plans, ours.inference_cfg,
                                            device="cpu", tta=True, labels=ours.labels,
                                            postprocessing=ours.postprocessing)
    return out


def _cases(args: argparse.Namespace) -> list:
    from uumamba.data import layouts
    from uumamba.data.splits import load_splits

    val = set(load_splits(args.model / "splits.json")[args.fold]["val"])
    index = layouts.discover(args.data, layout="auto")
    cases = [c for c in index.cases if args.volumes == "all" or c.id in val][: args.cases]
    if len(cases) < 2:
        from uumamba.errors import UserError

        raise UserError(f"--data {args.data}: fewer than 2 validation cases of fold "
                        f"{args.fold} of {args.model / 'splits.json'} (one is the warm-up)")
    return cases


def measure(args: argparse.Namespace) -> dict:
    """Interleaved predictions (module docstring); per predictor the mean seconds per stage
    over volumes 2.., and UU-Mamba's bf16-vs-float32 agreement."""
    import nibabel as nib
    import numpy as np
    import torch

    from uumamba.device import native_bf16

    torch.set_num_threads(args.threads)
    predictors = _predictors(args)
    names = list(predictors)
    cases = _cases(args)
    seconds: dict[str, dict[str, list[float]]] = {n: {s: [] for s in STAGES} for n in names}
    totals: dict[str, list[float]] = {n: [] for n in names}
    agreement: list[dict] = []
    labels = predictors[names[0]].labels
    for i, case in enumerate(cases):
        masks = {}
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t = time.perf_counter()
            pred = predictors[name].predict_file(case.images)
            wall = time.perf_counter() - t
            masks[name] = pred.mask
            if i > 0:
                totals[name].append(wall)
                for stage in STAGES:
                    seconds[name][stage].append(pred.timings.get(stage, 0.0))
        truth = np.asarray(nib.load(str(case.label)).dataobj).astype(np.int16)
        row = {"case": case.id}
        for value, label in sorted(labels.items()):
            if value == 0:
                continue
            a, b = masks["uumamba auto"] == value, masks["uumamba off"] == value
            row[label] = {"bf16_vs_float32": _dice(a, b)}
            for name in names:
                if name.startswith("uumamba"):
                    key = name.removeprefix("uumamba ").replace(" ", "_") + "_vs_truth"
                    row[label][key] = _dice(masks[name] == value, truth == value)
        agreement.append(row)
    return {
        "volume_set": args.volumes,
        "ratios": _ratios(totals, {n: seconds[n]["postprocess"] for n in names}),
        "auto_precision": "bfloat16" if native_bf16(torch.device("cpu")) else "float32",
        "volumes": [c.id for c in cases], "warmup": cases[0].id, "threads": args.threads,
        "stages": {n: {s: statistics.mean(v) for s, v in seconds[n].items()} for n in names},
        "total": {n: statistics.mean(v) for n, v in totals.items()},
        "agreement": agreement,
    }


def _ratios(totals: dict[str, list[float]], postprocess: dict[str, list[float]] | None = None
            ) -> dict:
    """UU-Mamba over the DynUNet per volume, in each precision: the geometric mean of the
    per-volume ratios of wall seconds (both predicted the same volume, interleaved) with its
    95 % percentile bootstrap interval over volumes; with ``postprocess`` (name -> seconds per
    volume) also of the wall seconds without the postprocessing (``before_postprocess``),
    whose time depends on the mask: the DynUNet's here has random weights, its mask many
    islands."""
    from uumamba.evaluation.statistics import paired_bootstrap_ratio

    def ratio(ours: list[float], theirs: list[float]) -> dict:
        r = paired_bootstrap_ratio(ours, theirs)
        return {"ratio": r.estimate, "low": r.low, "high": r.high, "n": r.n}

    out = {}
    for amp in ("auto", "off"):
        a, b = f"uumamba {amp}", f"dynunet {amp}"
        if totals.get(a) and totals.get(b):
            out[amp] = ratio(totals[a], totals[b])
            if postprocess is not None and postprocess.get(a) and postprocess.get(b):
                out[amp]["before_postprocess"] = ratio(
                    [t - p for t, p in zip(totals[a], postprocess[a], strict=True)],
                    [t - p for t, p in zip(totals[b], postprocess[b], strict=True)])
    return out


def startup(args: argparse.Namespace, in_process: float) -> dict:
    """Mean wall seconds of 3 ``uumamba predict`` processes on the first validation volume."""
    case = _cases(args)[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="uumamba-bench-predict-") as tmp:
        for k in range(3):
            cmd = [sys.executable, "-m", "uumamba.cli", "predict", "--model", str(args.model),
                   "--folds", str(args.fold), "--device", "cpu", "--output",
                   str(Path(tmp) / str(k)), "--input", str(case.images[0])]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            runs.append(time.perf_counter() - t)
            if done.returncode != 0:
                from uumamba.errors import UserError

                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise UserError(f"uumamba predict exited {done.returncode}: {last}")
    return {"case": case.id, "process_seconds": runs, "mean": statistics.mean(runs),
            "in_process_seconds": in_process}


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.mean(kept) if kept else None


def _mean_or_dash(values: list[float | None]) -> str:
    mean = _mean_or_none(values)
    return "-" if mean is None else f"{mean:.4f}"


def markdown(r: dict, machine: str) -> str:
    names = list(r["stages"])
    lines = [f"{machine}; `inference.amp=auto` is {r['auto_precision']} here; "
             f"{len(r['volumes']) - 1} volumes after the warm-up {r['warmup']}", "",
             "| stage (s per volume) | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for stage in STAGES:
        lines.append(f"| {stage} | " + " | ".join(f"{r['stages'][n][stage]:.3f}" for n in names)
                     + " |")
    lines.append("| **total (wall)** | " + " | ".join(f"**{r['total'][n]:.3f}**" for n in names)
                 + " |")
    for amp, q in r.get("ratios", {}).items():
        lines += ["", f"UU-Mamba / DynUNet per volume, `inference.amp={amp}`: "
                  f"**{q['ratio']:.3f}** [{q['low']:.3f}, {q['high']:.3f}] (geometric mean of "
                  f"{q['n']} per-volume ratios, 95 % bootstrap interval)"]
        if "before_postprocess" in q:
            b = q["before_postprocess"]
            lines[-1] += (f"; without the postprocessing (its time depends on the mask, and "
                          f"the DynUNet's weights are random) **{b['ratio']:.3f}** "
                          f"[{b['low']:.3f}, {b['high']:.3f}]")
    classes = [k for k in r["agreement"][0] if k != "case"]
    keys = list(r["agreement"][0][classes[0]])
    titles = {"bf16_vs_float32": "bf16 vs float32", "auto_vs_truth": "vs truth, auto",
              "off_vs_truth": "vs truth, float32", "auto_tta_vs_truth": "vs truth, auto + TTA"}
    seen = (" — `--volumes all`: the model's training volumes are among them, these are not "
            "unseen Dice" if r.get("volume_set") == "all" else "")
    lines += ["", f"UU-Mamba's masks, Dice, mean over all volumes (the warm-up included){seen}:",
              "",
              "| class | " + " | ".join(titles.get(k, k) for k in keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    for c in classes + ["foreground mean"]:
        if c == "foreground mean":
            cells = [_mean_or_dash([_mean_or_none([row[x][key] for x in classes])
                                    for row in r["agreement"]]) for key in keys]
        else:
            cells = [_mean_or_dash([row[c][key] for row in r["agreement"]]) for key in keys]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if "startup" in r:
        s = r["startup"]
        lines += ["", f"`uumamba predict` as a process on {s['case']}: {s['mean']:.2f} s "
                  f"(runs {', '.join(f'{v:.2f}' for v in s['process_seconds'])}), against "
                  f"{s['in_process_seconds']:.2f} s in process"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "runs" / "bench_acdc_cv" / "uumamba",
                   help="trained model folder (default: the one bench_acdc.py leaves in "
                        "runs/bench_acdc_cv/uumamba)")
    p.add_argument("--fold", type=int, default=0, help="its fold: model and validation cases")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ACDC",
                   help="ACDC folder of patientXXX folders")
    p.add_argument("--cases", type=int, default=8, help="volumes (first: warm-up)")
    p.add_argument("--volumes", choices=("val", "all"), default="val",
                   help="the fold's validation volumes, or every volume of --data (a longer "
                        "timing run; its Dice then includes training volumes)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2: the CPU configs')")
    p.add_argument("--startup", action="store_true", help="also time `uumamba predict` processes")
    p.add_argument("--tta", action="store_true",
                   help="also UU-Mamba with mirroring TTA (auto precision): seconds and Dice")
    p.add_argument("--dynunet-default-features", action="store_true",
                   help="MONAI's default DynUNet widths instead of the model's")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    from uumamba.commands.script import describe_machine
    from uumamba.errors import UserError

    if not (args.model / "splits.json").is_file():
        raise UserError(f"--model {args.model}: not a trained model folder (no splits.json); "
                        "train one, e.g. with benchmarks/bench_acdc.py")
    if not args.data.is_dir() or not any(args.data.glob("patient*")):
        raise UserError(f"--data {args.data}: no ACDC patientXXX folders")
    r = measure(args)
    if args.startup:
        name = "uumamba auto"
        r["startup"] = startup(args, r["total"][name])
    text = markdown(r, describe_machine())
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
