"""UU-Mamba vs. a MONAI DynUNet (nnU-Net-like) on real ACDC, same budget, split and data.

Both models are trained one after the other on the CPU with the same number of threads and
the same wall-time budget (minutes, counted from the start of each model's training call,
preprocessing included), on the training cases of our fold 0 (patient-grouped split,
``splits.json``), with the same plan (``plans.json``: spacing, normalisation, patch size,
strides), the same MONAI training transforms (patch sampling, augmentation) and the same
inference (sliding window, Gaussian blending, inversion to the original grid). They differ in:

- UU-Mamba: our network, the optimizer and the uncertainty-weighted loss of the config
  (``configs/acdc_cpu.yaml``), trained by ``uumamba.engine.train.train_fold``;
- DynUNet: ``monai.networks.nets.DynUNet`` with the plan's kernels and strides and the
  config's feature widths, instance norm, deep supervision, Dice + CE, SGD (lr 0.01,
  Nesterov momentum 0.99, poly schedule) — nnU-Net's recipe, in a plain loop.

Then both predict the validation cases of fold 0 and are scored (Dice, HD95, NSD);
the per-class Dice and the foreground mean of both are printed and written to
``OUTPUT/bench_acdc.json``.

Usage::

    python benchmarks/bench_acdc.py --data ../shared/data/ACDC --minutes 20 --output runs/bench_acdc
    python benchmarks/bench_acdc.py --minutes 0.5 --output /tmp/bench   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
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


def train_dynunet(cfg, data_dir: Path, model_dir: Path, minutes: float, device: torch.device) -> nn.Module:
    """Train the DynUNet on fold 0's training cases of ``model_dir``'s splits for ``minutes``."""
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
    return model.net.eval()


def predict_and_score(predictor, val_cases, out_dir: Path, labels, tolerance_mm: float) -> dict:
    """Predict every validation case into ``out_dir`` and evaluate against its label."""
    from uumamba.evaluation.evaluate import evaluate_pairs, write_summary
    from uumamba.inference.predict import write_prediction

    pairs = []
    for case in val_cases:
        pred = predictor.predict_file(case.images)
        written = write_prediction(pred, case.id, case.images[0], out_dir, labels)
        pairs.append((case.id, written[0], case.label))
    summary = evaluate_pairs(pairs, labels, tolerance_mm)
    write_summary(summary, out_dir)
    return summary


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

    from rich.console import Console
    from rich.table import Table

    from uumamba.config import load_config
    from uumamba.data import layouts
    from uumamba.data.splits import load_splits
    from uumamba.engine.train import train_fold
    from uumamba.evaluation.evaluate import print_summary
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
    train_fold(cfg, args.data, ours_dir, fold="0", device="cpu")
    ours_train_s = time.monotonic() - t

    console.rule(f"DynUNet (nnU-Net-like), {args.minutes:g} min")
    t = time.monotonic()
    dynunet = train_dynunet(cfg, args.data, ours_dir, args.minutes, device)
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
    print_summary(s_ours, title="UU-Mamba")
    print_summary(s_dyn, title="DynUNet")

    table = Table(title=f"ACDC fold 0 validation Dice ({len(val_cases)} cases, "
                        f"{args.minutes:g} min each, {args.threads} threads)")
    table.add_column("class")
    table.add_column("UU-Mamba", justify="right")
    table.add_column("DynUNet", justify="right")

    def f(v: float) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{v:.4f}"

    for key, m in s_ours["mean"].items():
        table.add_row(m["name"], f(m["Dice"]), f(s_dyn["mean"][key]["Dice"]))
    table.add_row("foreground mean", f(s_ours["foreground_mean"]["Dice"]),
                  f(s_dyn["foreground_mean"]["Dice"]), style="bold")
    console.print(table)

    result = {
        "data": str(args.data), "minutes": args.minutes, "threads": args.threads,
        "config": str(args.config), "val_cases": sorted(val_ids),
        "train_seconds": {"uumamba": ours_train_s, "dynunet": dyn_train_s},
        "dice": {
            name: {**{m["name"]: m["Dice"] for m in s["mean"].values()},
                   "foreground_mean": s["foreground_mean"]["Dice"]}
            for name, s in (("uumamba", s_ours), ("dynunet", s_dyn))
        },
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench_acdc.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.output / 'bench_acdc.json'}")
    return result


if __name__ == "__main__":
    main()
