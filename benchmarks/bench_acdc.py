"""UU-Mamba vs. a MONAI DynUNet (nnU-Net-like) on real ACDC, same budget, split and data.

Both models are trained one after the other on the CPU with the same number of threads and
the same wall-time budget (minutes, counted from the start of each model's training call,
preprocessing included), on the training cases of our fold 0 (patient-grouped split,
``splits.json``), with the same plan (``plans.json``: spacing, normalisation, patch size,
strides), the same MONAI training transforms (patch sampling, augmentation) and the same
inference (sliding window, Gaussian blending, inversion to the original grid). They differ in:

- UU-Mamba: our network, the optimizer and the uncertainty-weighted loss of the config
  (``configs/acdc_cpu.yaml``), trained by ``uumamba.engine.train.run_fold``;
- DynUNet: ``monai.networks.nets.DynUNet`` with the plan's kernels and strides and the
  config's feature widths, instance norm, deep supervision, Dice + CE, SGD (lr 0.01,
  Nesterov momentum 0.99, poly schedule) — nnU-Net's recipe, in a plain loop.

Then both predict the validation cases of fold 0 without postprocessing and are scored (Dice,
HD95, NSD) — the ``raw`` result. The largest-connected-component postprocessing is then
decided for each model by the same rule (nnU-Net's, :func:`determine_postprocessing`, on that
model's own validation masks in the original grid), applied and scored again — the
``postprocessed`` result. Note that this decision is made on the cases it is scored on
(as nnU-Net decides it on its cross-validation predictions); the raw scores carry no such
selection. Per-class Dice and the foreground mean of both models, raw and postprocessed, are
printed and written to ``OUTPUT/bench_acdc.json``.

When ``train.schedule_by_time`` is set (configs/acdc_cpu.yaml), the DynUNet's poly schedule
is annealed over the same wall-time budget and its loop runs until the budget is spent (not
until ``epochs x iterations_per_epoch``), as ours does.

Usage::

    python benchmarks/bench_acdc.py --data ../shared/data/ACDC --minutes 20 --output runs/bench_acdc
    python benchmarks/bench_acdc.py --minutes 0.5 --output /tmp/bench   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


class _DeepSupervisionList(nn.Module):
    """DynUNet returns deep-supervision heads stacked on dim 1 in training mode; the loss
    takes a list (full resolution first)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        if self.training and out.dim() == x.dim() + 1:
            return list(torch.unbind(out, dim=1))
        return out


def build_dynunet(plans, features: list[int] | None) -> nn.Module:
    """DynUNet on the plan's topology (kernels, strides) with ``features`` channels per stage."""
    from monai.networks.nets import DynUNet

    n_stages = len(plans.strides)
    filters = features[:n_stages] if features else None
    net = DynUNet(
        spatial_dims=plans.spatial_dims,
        in_channels=plans.num_input_channels,
        out_channels=len(plans.labels),
        kernel_size=plans.kernel_sizes,
        strides=plans.strides,
        upsample_kernel_size=plans.strides[1:],
        filters=filters,
        norm_name="instance",
        deep_supervision=n_stages > 2,
        deep_supr_num=max(1, min(2, n_stages - 2)),
        res_block=False,
    )
    return _DeepSupervisionList(net)


def train_dynunet(cfg, data_dir: Path, model_dir: Path, minutes: float, device: torch.device) -> tuple[nn.Module, int]:
    """Train the DynUNet on fold 0's training cases of ``model_dir``'s splits for ``minutes``;
    return the network (eval mode) and the number of iterations run."""
    from torch.utils.data import DataLoader, RandomSampler

    from uumamba.config import LossConfig, OptimConfig
    from uumamba.data import layouts
    from uumamba.data.dataset import make_dataset
    from uumamba.data.plan import Plans
    from uumamba.data.splits import load_splits
    from uumamba.data.transforms import training_transforms
    from uumamba.engine.step import training_step
    from uumamba.losses import build_loss
    from uumamba.optim import PolyLRScheduler, build_optimizer

    t0 = time.monotonic()
    torch.manual_seed(cfg.train.seed)
    plans = Plans.load(model_dir / "plans.json")
    index = layouts.discover(data_dir, layout=cfg.dataset.layout)
    train_ids = set(load_splits(model_dir / "splits.json")[0]["train"])
    cases = [c for c in index.cases if c.id in train_ids]
    dataset = make_dataset(cases, training_transforms(plans, cfg.train), cache=cfg.train.cache)
    total = cfg.train.epochs * cfg.train.iterations_per_epoch
    if cfg.train.schedule_by_time:  # stop on time only, like run_fold; never run dry
        total = max(total, 1_000_000)
    loader = DataLoader(dataset, batch_size=plans.batch_size,
                        sampler=RandomSampler(dataset, replacement=True,
                                              num_samples=total * plans.batch_size),
                        num_workers=cfg.train.num_workers, drop_last=True)
    model = build_dynunet(plans, cfg.model.features).to(device).train()
    n_outputs = 1 + model.net.deep_supr_num if model.net.deep_supervision else 1
    loss_fn = build_loss(LossConfig(name="dice_ce"), len(plans.labels),
                         cfg.dataset.ignore_label, n_outputs).to(device)
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.01, momentum=0.99, nesterov=True),
                                model, loss_fn)
    scheduler = PolyLRScheduler(optimizer, total_iters=total)
    losses: list[float] = []
    it = 0
    for batch in loader:
        images = torch.as_tensor(batch["image"]).to(device).float()
        targets = torch.as_tensor(batch["label"]).to(device).long()
        res = training_step(model, loss_fn, optimizer, images, targets, grad_clip=12.0,
                            device_type=device.type)
        scheduler.step()
        if cfg.train.schedule_by_time:  # anneal over the same budget as ours
            scheduler.set_time_progress((time.monotonic() - t0) / (minutes * 60))
        losses.append(res.loss)
        it += 1
        if it % 50 == 0:
            print(f"  dynunet iteration {it}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}",
                  flush=True)
        if time.monotonic() - t0 > minutes * 60:
            break
    print(f"  dynunet: {it} iterations in {time.monotonic() - t0:.0f} s", flush=True)
    return model.net.eval(), it


def predict_and_score(predictor, val_cases, out_dir: Path, labels, tolerance_mm: float) -> dict:
    """Predict every validation case, score it raw and with postprocessing decided by one rule.

    The predictor's own postprocessing is switched off; the raw masks go to ``out_dir/raw``.
    Then :func:`determine_postprocessing` (nnU-Net's largest-component rule) is run on those
    masks against the references (original grid), the chosen filtering is applied and the
    masks are written to ``out_dir/postprocessed`` and scored again.

    Returns ``{"raw": summary, "postprocessed": summary, "postprocessing": spec}``.
    """
    from dataclasses import replace

    from uumamba.evaluation.evaluate import _read_labels, evaluate_pairs, write_summary
    from uumamba.evaluation.metrics import label_volumes
    from uumamba.inference.postprocess import apply_postprocessing, determine_postprocessing
    from uumamba.inference.writer import write_prediction

    predictor.postprocessing = None
    preds = []
    for case in val_cases:
        pred = predictor.predict_file(case.images)
        path = write_prediction(pred, case.id, case.images[0], out_dir / "raw", labels)[0]
        preds.append((case, pred, path))
    refs = [_read_labels(case.label)[0] for case, _, _ in preds]  # the input's voxel grid, as masks
    spec = determine_postprocessing([pred.mask for _, pred, _ in preds], refs, labels)
    pairs_raw, pairs_post = [], []
    for case, pred, path in preds:
        mask = apply_postprocessing(pred.mask, spec)
        counts, volumes = label_volumes(mask, pred.geometry.spacing, labels)
        post = replace(pred, mask=mask, voxel_counts=counts, volumes_ml=volumes)
        written = write_prediction(post, case.id, case.images[0], out_dir / "postprocessed", labels)
        pairs_raw.append((case.id, path, case.label))
        pairs_post.append((case.id, written[0], case.label))
    result = {"postprocessing": spec}
    for key, pairs in (("raw", pairs_raw), ("postprocessed", pairs_post)):
        result[key] = evaluate_pairs(pairs, labels, tolerance_mm)
        write_summary(result[key], out_dir / key)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ACDC")
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per model")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "bench_acdc")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "acdc_cpu.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override KEY=VALUE (both models)")
    args = parser.parse_args(argv)
    from uumamba.errors import UserError

    if not args.data.is_dir() or not any(args.data.glob("patient*")):  # before any training
        raise UserError(f"--data {args.data}: no ACDC patientXXX folders (README, 'The ACDC "
                        "data', says where to obtain them)")

    from rich.console import Console
    from rich.table import Table

    from uumamba.commands.evaluate import print_summary
    from uumamba.config import load_config
    from uumamba.data import layouts
    from uumamba.data.splits import load_splits
    from uumamba.engine.train import run_fold
    from uumamba.inference.predict import Predictor

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = load_config(args.config, args.overrides + [f"train.time_limit_minutes={args.minutes}"])
    console = Console()
    ours_dir, dyn_dir = args.output / "uumamba", args.output / "dynunet"
    if (ours_dir / "fold_0" / "checkpoint_latest.pt").exists():
        raise SystemExit(f"{ours_dir} already holds a run; choose another --output")

    console.rule(f"UU-Mamba ({args.config.name}), {args.minutes:g} min")
    t = time.monotonic()
    ours_iterations = run_fold(cfg, args.data, ours_dir, fold="0", device="cpu").iteration
    ours_train_s = time.monotonic() - t

    console.rule(f"DynUNet (nnU-Net-like), {args.minutes:g} min")
    t = time.monotonic()
    dynunet, dyn_iterations = train_dynunet(cfg, args.data, ours_dir, args.minutes, device)
    dyn_train_s = time.monotonic() - t

    index = layouts.discover(args.data, layout=cfg.dataset.layout)
    val_ids = set(load_splits(ours_dir / "splits.json")[0]["val"])
    val_cases = [c for c in index.cases if c.id in val_ids]
    ours = Predictor.from_model_dir(ours_dir, folds="0", device="cpu")
    labels = ours.labels
    from uumamba.data.plan import Plans

    theirs = Predictor([dynunet], Plans.load(ours_dir / "plans.json"), cfg.inference,
                       device="cpu", tta=cfg.inference.tta, labels=labels)
    tol = cfg.inference.nsd_tolerance_mm
    console.rule(f"Evaluating on {len(val_cases)} validation cases of fold 0")
    s_ours = predict_and_score(ours, val_cases, args.output / "pred_uumamba", labels, tol)
    s_dyn = predict_and_score(theirs, val_cases, dyn_dir / "predictions", labels, tol)
    for key in ("raw", "postprocessed"):
        print_summary(s_ours[key], title=f"UU-Mamba ({key})")
        print_summary(s_dyn[key], title=f"DynUNet ({key})")

    table = Table(title=f"ACDC fold 0 validation Dice ({len(val_cases)} volumes, "
                        f"{args.minutes:g} min each, {args.threads} threads)")
    table.add_column("class")
    for name in ("UU-Mamba", "DynUNet"):
        table.add_column(f"{name} raw", justify="right")
        table.add_column(f"{name} post", justify="right")

    def f(v: float) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{v:.4f}"

    def row(s: dict, key: str | None) -> list[str]:
        return [f((s[k]["mean"][key] if key else s[k]["foreground_mean"])["Dice"])
                for k in ("raw", "postprocessed")]

    for key, m in s_ours["raw"]["mean"].items():
        table.add_row(m["name"], *row(s_ours, key), *row(s_dyn, key))
    table.add_row("foreground mean", *row(s_ours, None), *row(s_dyn, None), style="bold")
    console.print(table)

    def scores(s: dict) -> dict:
        return {k: {**{m["name"]: m["Dice"] for m in s[k]["mean"].values()},
                    "foreground_mean": s[k]["foreground_mean"]["Dice"],
                    "foreground_mean_HD95_mm": s[k]["foreground_mean"].get("HD95")}
                for k in ("raw", "postprocessed")}

    result = {
        "data": str(args.data), "minutes": args.minutes, "threads": args.threads,
        "config": str(args.config), "val_cases": sorted(val_ids),
        "train_seconds": {"uumamba": ours_train_s, "dynunet": dyn_train_s},
        "iterations": {"uumamba": ours_iterations, "dynunet": dyn_iterations},
        "dice": {"uumamba": scores(s_ours), "dynunet": scores(s_dyn)},
        "postprocessing_labels": {"uumamba": s_ours["postprocessing"]["largest_component_labels"],
                                  "dynunet": s_dyn["postprocessing"]["largest_component_labels"]},
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench_acdc.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.output / 'bench_acdc.json'}")
    return result


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
