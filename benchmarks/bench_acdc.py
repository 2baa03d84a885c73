"""UU-Mamba vs. a MONAI DynUNet (nnU-Net-like) on real ACDC, same budget, split and data.

For every fold of ``--folds`` (patient-grouped cross-validation, ``splits.json``), both models
are trained one after the other on the CPU with the same number of threads and the same
wall-time budget (minutes, counted from the start of each model's training call,
preprocessing included), on the training cases of that fold, with the same plan (``plans.json``: spacing, normalisation, patch size,
strides), the same MONAI training transforms (patch sampling, augmentation) and the same
inference (sliding window, Gaussian blending, inversion to the original grid). They differ in:

- UU-Mamba: our network, the optimizer and the uncertainty-weighted loss of the config
  (``configs/acdc_cpu.yaml``), trained by ``uumamba.engine.train.run_fold``;
- DynUNet: ``monai.networks.nets.DynUNet`` with the plan's kernels and strides and the
  config's feature widths, instance norm, deep supervision, Dice + CE, SGD (lr 0.01,
  Nesterov momentum 0.99, poly schedule) — nnU-Net's recipe, in a plain loop.

Both train in the precision of the config's ``train.amp`` (bf16 autocast on a CPU with AMX or AVX512-BF16
under ``auto``, :func:`uumamba.engine.components.select_precision`) and predict in that of
``inference.amp``, so neither gets arithmetic the other lacks.

Then both predict the validation cases of the fold without postprocessing, interleaved volume
by volume and alternately first, after one untimed warm-up prediction each
(:func:`uumamba.inference.score.predict_and_score_side_by_side`), and are scored (Dice,
HD95, NSD) — the ``raw`` result. Their seconds per volume are thus paired: the geometric
mean of the per-volume ratio, with its bootstrap interval and per fold, is printed below the
per-fold table (not under ``--reference``, whose DynUNet predicted in another run). Both
predict from their last weights (UU-Mamba's ``checkpoint_latest.pt``, not the
``checkpoint_best.pt`` its training chose by the Dice of these same validation cases; records
before 2026-12-04 23:45 UTC used that one, and are refused on resume). The
largest-connected-component postprocessing is then decided for each model by the same rule (nnU-Net's, :func:`determine_postprocessing`, on that
model's own validation masks in the original grid), applied and scored again — the
``postprocessed`` result. Note that this decision is made on the cases it is scored on
(as nnU-Net decides it on its cross-validation predictions); the raw scores carry no such
selection. Each fold's per-case scores, iterations, training and prediction seconds are
written to ``OUTPUT/folds/fold_K.json`` as soon as the fold is done (a rerun into the same
``OUTPUT`` skips the folds already there, so a long cross-validation can be resumed fold by
fold). Over all folds' validation volumes (every volume is unseen by the models that predict
it): per class and for the foreground mean, each model's mean Dice with a 95 % percentile
bootstrap interval over volumes, raw and postprocessed, and the paired difference (ours minus
DynUNet, per volume) with its paired-bootstrap interval and the Wilcoxon signed-rank p
(:mod:`uumamba.evaluation.statistics`). Printed, and written to ``OUTPUT/bench_acdc.json`` and
``OUTPUT/bench_acdc.md``.

``--reference RUN.json`` (a recipe's ablation): the DynUNet is not trained; this run's
UU-Mamba (e.g. with ``--set model.expand=1``) is compared, volume by volume, with the UU-Mamba
of an earlier run of this script (its ``bench_acdc.json``, or a copy such as
``benchmarks/results/acdc_cv_2026-12-02.json``) on the same folds; each fold's validation cases
must be that run's (the same ``splits.json``), or it is refused. The difference is then this
run minus the reference, per volume; where the reference has a DynUNet, this run's UU-Mamba is
also compared with it (``table_dynunet``). The two runs are not side by side in time: compare their
machine lines and iterations before reading a difference as the recipe's. Their predict
seconds are not paired either: this run's UU-Mamba predicts after a warm-up, a reference
written before interleaving (2026-12-04) predicted its first volume cold.

When ``train.schedule_by_time`` is set (configs/acdc_cpu.yaml), the DynUNet's poly schedule
is annealed over the same wall-time budget and its loop runs until the budget is spent (not
until ``epochs x iterations_per_epoch``), as ours does.

Usage::

    python benchmarks/bench_acdc.py --data ../shared/data/ACDC --minutes 20 --folds 0,1,2,3,4 \
        --output runs/bench_acdc_cv
    python benchmarks/bench_acdc.py --minutes 0.5 --output /tmp/bench   # smoke run, fold 0
    python benchmarks/bench_acdc.py --folds 0,1,2,3,4 --set model.d_state=8 \
        --reference benchmarks/results/acdc_5fold_zen4_lastweights_2026-12-06.json --output runs/acdc_dstate8
"""

from __future__ import annotations

import argparse
import json
import math
import signal
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


def train_dynunet(cfg, data_dir: Path, model_dir: Path, minutes: float, device: torch.device,
                  fold: int = 0) -> tuple[nn.Module, int]:
    """Train the DynUNet on ``fold``'s training cases of ``model_dir``'s splits for ``minutes``;
    return the network (eval mode) and the number of iterations run."""
    from torch.utils.data import DataLoader, RandomSampler

    from uumamba.config import LossConfig, OptimConfig
    from uumamba.data import layouts
    from uumamba.data.dataset import make_dataset
    from uumamba.data.plan import Plans
    from uumamba.data.splits import load_splits
    from uumamba.data.transforms import training_transforms
    from uumamba.engine.components import select_precision
    from uumamba.engine.step import training_step
    from uumamba.losses import build_loss
    from uumamba.optim import PolyLRScheduler, build_optimizer

    t0 = time.monotonic()
    torch.manual_seed(cfg.train.seed)
    plans = Plans.load(model_dir / "plans.json")
    index = layouts.discover(data_dir, layout=cfg.dataset.layout)
    train_ids = set(load_splits(model_dir / "splits.json")[fold]["train"])
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
    # the precision ours trains in (train.amp: bf16 on a CPU with AMX or AVX512-BF16), so that the budget buys
    # both models the same arithmetic
    autocast_dtype, scaler = select_precision(cfg.train.amp, device)
    losses: list[float] = []
    it = 0
    for batch in loader:
        images = torch.as_tensor(batch["image"]).to(device).float()
        targets = torch.as_tensor(batch["label"]).to(device).long()
        res = training_step(model, loss_fn, optimizer, images, targets, grad_clip=12.0,
                            scaler=scaler, autocast_dtype=autocast_dtype,
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


def run_fold_pair(cfg, args, fold: int) -> dict:
    """Train both models (only UU-Mamba with ``--reference``) on one fold, predict and score
    its validation volumes; the fold's record (per-case Dice per class raw / postprocessed,
    iterations, seconds; one entry per model trained)."""
    from uumamba.data import layouts
    from uumamba.data.plan import Plans
    from uumamba.data.splits import load_splits
    from uumamba.engine.train import run_fold
    from uumamba.inference.predict import Predictor
    from uumamba.inference.score import predict_and_score_side_by_side

    device = torch.device("cpu")
    ours_dir = args.output / "uumamba"
    print(f"--- fold {fold}: UU-Mamba ({args.config.name}), {args.minutes:g} min", flush=True)
    t = time.monotonic()
    trained = run_fold(cfg, args.data, ours_dir, fold=str(fold), device="cpu")
    if trained.reason == "signal":  # saved, not finished: no record, no DynUNet, no table
        number = int(trained.signal or signal.SIGTERM)
        print(f"--- fold {fold}: stopped by {signal.Signals(number).name}; the fold is not "
              f"recorded (remove {ours_dir / f'fold_{fold}'} to run it again)",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + number)
    ours_iterations = trained.iteration
    ours_train_s = time.monotonic() - t
    iterations, train_seconds = {"uumamba": ours_iterations}, {"uumamba": ours_train_s}
    if args.reference is None:
        print(f"--- fold {fold}: DynUNet (nnU-Net-like), {args.minutes:g} min", flush=True)
        t = time.monotonic()
        dynunet, iterations["dynunet"] = train_dynunet(cfg, args.data, ours_dir, args.minutes,
                                                       device, fold)
        train_seconds["dynunet"] = time.monotonic() - t

    index = layouts.discover(args.data, layout=cfg.dataset.layout)
    val_ids = load_splits(ours_dir / "splits.json")[fold]["val"]
    val_cases = [c for c in index.cases if c.id in set(val_ids)]
    # The final weights, as the DynUNet's: checkpoint_best.pt was chosen by the Dice of
    # these very cases (fold 1, 2026-12-04: 0.859 against the final 0.851 raw).
    ours = Predictor.from_model_dir(ours_dir, folds=str(fold), device="cpu",
                                    checkpoint="latest")
    labels = ours.labels
    tol = cfg.inference.nsd_tolerance_mm
    pred_dir = args.output / "predictions" / f"fold_{fold}"
    predictors = {"uumamba": ours}
    if args.reference is None:
        predictors["dynunet"] = Predictor([dynunet], Plans.load(ours_dir / "plans.json"),
                                          cfg.inference, device="cpu", tta=cfg.inference.tta,
                                          labels=labels)
    # volume by volume, alternately first, after one untimed warm-up prediction each: the
    # machine's speed drifts by up to 30 % within minutes (benchmarks/README.md), more than
    # the difference measured, when each model predicts all volumes in turn
    scored = predict_and_score_side_by_side(
        predictors, val_cases, {name: pred_dir / name for name in predictors}, labels, tol,
        warmup=True)

    def per_case(summary: dict) -> dict:
        return {c["case"]: {labels[int(v)]: (None if math.isnan(m["Dice"]) else m["Dice"])
                            for v, m in c["metrics"].items()}
                for c in summary["metric_per_case"]}

    from uumamba.commands.script import describe_machine
    from uumamba.device import precision_name
    from uumamba.engine.components import select_precision
    from uumamba.inference.sliding import window_precision

    return {
        "fold": fold, "val_cases": sorted(val_ids), "machine": describe_machine(),
        "weights": "last", "minutes": args.minutes, "config": str(args.config),
        "overrides": list(args.overrides or []),
        "train_precision": precision_name(select_precision(cfg.train.amp, device)[0]),
        "inference_precision": window_precision(cfg.inference, device),
        "iterations": iterations, "train_seconds": train_seconds,
        "predict_seconds": {k: v["predict_seconds"] for k, v in scored.items()},
        # both models' seconds paired volume by volume (not under --reference: one model)
        **({"predict_interleaved": True} if len(predictors) > 1 else {}),
        "dice": {k: {"raw": per_case(v["raw"]), "postprocessed": per_case(v["postprocessed"])}
                 for k, v in scored.items()},
        "postprocessing_labels": {k: v["postprocessing"]["largest_component_labels"]
                                  for k, v in scored.items()},
    }


def pooled_table(records: list[dict], classes: list[str], other: str = "dynunet") -> dict:
    """Means with 95 % bootstrap intervals over all folds' volumes, and the paired
    differences (``uumamba`` minus ``other``: ``dynunet``, or ``reference`` after
    :func:`with_reference`), per class and for the foreground mean."""
    from dataclasses import asdict

    import numpy as np

    from uumamba.evaluation.statistics import (
        bootstrap_mean,
        paired_bootstrap_difference,
        wilcoxon_signed_rank,
    )

    def values(model: str, kind: str, name: str) -> list[float]:
        """Per volume, in the order of UU-Mamba's cases of each fold (both models' values of
        one volume at the same position: paired by case, never by sorted position)."""
        out = []
        for r in records:
            for case in sorted(r["dice"]["uumamba"][kind]):
                d = r["dice"][model][kind][case]
                if name == "foreground":
                    present = [v for v in d.values() if v is not None]
                    out.append(float(np.mean(present)) if present else float("nan"))
                else:
                    out.append(float("nan") if d.get(name) is None else float(d[name]))
        return out

    table: dict = {}
    for kind in ("raw", "postprocessed"):
        for name in [*classes, "foreground"]:
            ours, dyn = values("uumamba", kind, name), values(other, kind, name)
            keep = [i for i, (a, b) in enumerate(zip(ours, dyn, strict=True))
                    if math.isfinite(a) and math.isfinite(b)]
            a, b = [ours[i] for i in keep], [dyn[i] for i in keep]
            w = wilcoxon_signed_rank(a, b)
            table.setdefault(kind, {})[name] = {
                "uumamba": asdict(bootstrap_mean(a)), other: asdict(bootstrap_mean(b)),
                "difference": asdict(paired_bootstrap_difference(a, b)),
                "wilcoxon_p": w.p_value, "n": len(keep),
            }
    return table


def predict_ratio(records: list[dict]) -> dict | None:
    """UU-Mamba's predict seconds over the DynUNet's, per volume: the geometric mean of the
    ratios over the volumes of every fold whose two models predicted interleaved in the run
    that wrote the fold's record (``predict_interleaved``; a resumed fold keeps its own run's
    seconds), with its 95 % paired-bootstrap interval, and per fold. Left out: folds merged
    with a ``--reference`` (their DynUNet predicted in another run) and records from before
    interleaving (sequential seconds, which drifted more than the difference).

    Returns:
        ``{"ratio", "low", "high", "n" (volumes), "per_fold": {fold: ratio}}``, or None when
        no fold qualifies.

    Raises:
        UserError: a qualifying record's seconds are not two lists of the same length of
            finite numbers > 0 (a hand-edited or truncated ``folds/fold_K.json``), naming the
            fold.
    """
    from uumamba.errors import UserError
    from uumamba.evaluation.statistics import paired_bootstrap_ratio

    def positive(v: object) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and v > 0)

    ours, theirs, per_fold = [], [], {}
    for r in records:
        if r.get("predict_interleaved") is not True or "reference_machine" in r:
            continue
        seconds = r.get("predict_seconds")
        a = seconds.get("uumamba") if isinstance(seconds, dict) else None
        b = seconds.get("dynunet") if isinstance(seconds, dict) else None
        if not (isinstance(a, list) and isinstance(b, list) and a and len(a) == len(b)
                and all(map(positive, a + b))):
            raise UserError(f"fold {r.get('fold')}: predict_seconds must hold two lists of the "
                            "same length of seconds > 0, 'uumamba' and 'dynunet'; remove the "
                            "fold's record to rerun it")
        ours, theirs = ours + a, theirs + b
        per_fold[str(r["fold"])] = paired_bootstrap_ratio(a, b).estimate
    if not ours:
        return None
    pooled = paired_bootstrap_ratio(ours, theirs)
    return {"ratio": pooled.estimate, "low": pooled.low, "high": pooled.high, "n": pooled.n,
            "per_fold": per_fold}


#: The largest --reference file read (a five-fold result is about 100 kB).
REFERENCE_MAX_BYTES = 64 << 20


def read_reference(path: Path) -> object:
    """The JSON of ``--reference``, read as untrusted input: a regular file (never a FIFO or
    a device), at most :data:`REFERENCE_MAX_BYTES`, strict JSON (no NaN), nesting bounded.

    Raises:
        UserError: unreadable, too large, or not JSON; the message names the file.
    """
    from uumamba.errors import UserError
    from uumamba.utils import read_regular

    try:
        raw = read_regular(path, REFERENCE_MAX_BYTES + 1)
    except OSError as exc:
        raise UserError(f"--reference {path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > REFERENCE_MAX_BYTES:
        raise UserError(f"--reference {path}: larger than {REFERENCE_MAX_BYTES >> 20} MiB; "
                        "not a bench_acdc result")

    def no_constant(name: str) -> float:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise UserError(f"--reference {path}: not a bench_acdc result "
                        f"({type(exc).__name__})") from None


def check_reference(reference: object, source: str, folds: list[int], classes: list[str],
                    val_cases: dict[int, list[str]] | None = None) -> dict[int, dict]:
    """Each of ``folds``' records of a ``--reference`` result, checked before anything is
    trained: a JSON object with ``folds``, each fold an object with an integer ``fold``,
    ``val_cases`` (names), ``dice`` with a ``uumamba`` entry (and maybe ``dynunet``) holding
    ``raw`` and ``postprocessed`` per-case Dice — exactly the fold's ``val_cases``, each a
    mapping of this run's ``classes`` to a number in [0, 1] or null — and ``iterations``,
    ``train_seconds`` with a finite number >= 0 per model of ``dice`` (``predict_seconds``: a
    list of them, one per volume).
    With ``val_cases`` (fold -> this run's validation cases) they must be the same.

    Returns:
        fold -> its record.

    Raises:
        UserError: the first rule broken, naming the fold, the field and the rule.
    """
    from uumamba.errors import UserError, shown

    def fail(where: str, rule: str) -> UserError:
        return UserError(f"--reference {source}: {where} {rule}; not a bench_acdc result "
                         "of this configuration")

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(reference, dict) or not isinstance(reference.get("folds"), list):
        raise fail("the file", "is not a JSON object with a list of 'folds'")
    theirs: dict[int, dict] = {}
    for r in reference["folds"]:
        if isinstance(r, dict) and isinstance(r.get("fold"), int) and not isinstance(r["fold"], bool):
            theirs.setdefault(r["fold"], r)
    out = {}
    for fold in folds:
        r = theirs.get(fold)
        where = f"fold {fold}"
        if r is None or not isinstance(r.get("dice"), dict) or "uumamba" not in r["dice"]:
            raise fail(where, "has no UU-Mamba record")
        cases = r.get("val_cases")
        if not isinstance(cases, list) or not cases or not all(isinstance(c, str) for c in cases) \
                or len(set(cases)) != len(cases):
            raise fail(f"{where}'s val_cases", "are not a list of distinct case names")
        if val_cases is not None and sorted(cases) != sorted(val_cases[fold]):
            raise UserError(f"--reference {source}: fold {fold}'s validation cases differ from "
                            "this run's (another splits.json); the volumes do not pair")
        models = [m for m in ("uumamba", "dynunet") if m in r["dice"]]
        for model in models:
            for kind in ("raw", "postprocessed"):
                table = r["dice"][model].get(kind) if isinstance(r["dice"][model], dict) else None
                at = f"{where}'s dice.{model}.{kind}"
                if not isinstance(table, dict) or set(table) != set(cases):
                    raise fail(at, "does not hold one entry per validation case")
                for case, per_class in table.items():
                    if not isinstance(per_class, dict) or set(per_class) != set(classes):
                        raise fail(f"{at}[{shown(case)}]", f"does not hold the classes "
                                   f"{', '.join(classes)}")
                    for name, v in per_class.items():
                        if v is not None and not (number(v) and 0.0 <= v <= 1.0):
                            raise fail(f"{at}[{shown(case)}].{name}",
                                       "is not a Dice in [0, 1] or null")
        for key in ("iterations", "train_seconds", "predict_seconds"):
            values = r.get(key)
            for model in models:
                v = values.get(model) if isinstance(values, dict) else None
                if key == "predict_seconds":  # seconds per validation volume
                    ok = isinstance(v, list) and all(number(x) and x >= 0 for x in v)
                else:
                    ok = number(v) and v >= 0
                if not ok:
                    raise fail(f"{where}'s {key}.{model}", "is not a finite number >= 0"
                               + (" per volume" if key == "predict_seconds" else ""))
        if "machine" in r and not isinstance(r["machine"], str):
            raise fail(f"{where}'s machine", "is not text")
        out[fold] = r
    return out


def with_reference(records: list[dict], reference: dict, source: str) -> list[dict]:
    """This run's fold records with an earlier run's UU-Mamba as a second model,
    ``reference`` (its per-case Dice, iterations and seconds, and its machine line), fold by
    fold; and that run's DynUNet as ``dynunet`` where it has one.

    Raises:
        UserError: ``reference`` lacks one of ``records``' folds, or a fold's validation cases
            differ (another ``splits.json``): the volumes would not pair.
    """
    from uumamba.errors import printable

    classes = sorted({name for r in records for d in r["dice"]["uumamba"]["raw"].values()
                      for name in d})
    theirs = check_reference(reference, source, [r["fold"] for r in records], classes,
                             {r["fold"]: r["val_cases"] for r in records})
    merged = []
    for r in records:
        ref = theirs[r["fold"]]
        r = {**r, "reference_machine": printable(ref.get("machine", "not recorded"))[:400],
             "reference_precision": printable(ref.get("train_precision", "float32"))[:40],
             "reference_interleaved": ref.get("predict_interleaved") is True,
             # records before 2026-12-04 carry no "weights": UU-Mamba from checkpoint_best.pt
             "reference_weights": printable(ref.get("weights", "best"))[:20]}
        for key in ("dice", "iterations", "train_seconds", "predict_seconds"):
            r[key] = {**r[key], "reference": ref[key]["uumamba"]}
            if "dynunet" in ref.get("dice", {}):  # the earlier run's DynUNet, as it was there
                r[key]["dynunet"] = ref[key]["dynunet"]
        merged.append(r)
    return merged


def write_markdown(result: dict, path: Path) -> None:
    """``bench_acdc.md``: the pooled table and the per-fold iterations and seconds."""
    def ci(d: dict, signed: bool = False) -> str:
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(d['estimate'])} [{f.format(d['low'])}, {f.format(d['high'])}]"

    other = result.get("other", "dynunet")
    name_of = {"dynunet": "DynUNet", "reference": f"reference ({result.get('reference')})"}
    folds = ", ".join(str(r["fold"]) for r in result["folds"])
    n = result["table"]["raw"]["foreground"]["n"]
    budget = f"{result['minutes']:g} min per model and fold"
    if other == "reference":
        ref_minutes = result.get("reference_minutes")
        budget = (f"{result['minutes']:g} min per fold for this run's UU-Mamba, "
                  + (f"{ref_minutes:g} min for the reference's"
                     if isinstance(ref_minutes, (int, float)) and not isinstance(ref_minutes, bool)
                     and math.isfinite(ref_minutes) else "the reference's budget not recorded"))
    lines = [f"# UU-Mamba vs {name_of[other]} on ACDC: folds {folds}, {budget}, "
             f"{result['threads']} threads", "",
             f"Mean Dice over {n} validation volumes (each predicted by the models of the fold "
             "that did not train on it), 95 % percentile bootstrap interval over volumes; "
             f"difference = UU-Mamba minus {name_of[other]} per volume (paired bootstrap, "
             "Wilcoxon signed-rank p).", ""]
    if other == "reference":
        lines += [f"UU-Mamba: this run, overrides {result.get('overrides') or 'none'}. The "
                  "reference was trained in another run: compare the machine lines and "
                  "iterations below.", ""]
        differ = sorted({(r.get("train_precision", "float32"), r["reference_precision"])
                         for r in result["folds"] if "reference_precision" in r
                         and r["reference_precision"] != r.get("train_precision", "float32")})
        lines += [f"**Precision differs**: this run trained in {a}, the reference in {b}; the "
                  "difference is partly the precision's." for a, b in differ]
        weights = sorted({(r.get("weights", "best"), r["reference_weights"])
                          for r in result["folds"] if "reference_weights" in r
                          and r["reference_weights"] != r.get("weights", "best")})
        lines += [f"**Weights differ**: this run's UU-Mamba predicted from its {a} weights, the "
                  f"reference's from its {b} (\"best\": checkpoint_best.pt, chosen by the Dice "
                  "of these same validation cases); the difference is partly the selection's."
                  for a, b in weights]
        lines += [""] if differ or weights else []
    head = "DynUNet" if other == "dynunet" else "reference"
    for kind in ("raw", "postprocessed"):
        lines += [f"## {kind}", "", f"| class | UU-Mamba | {head} | difference | Wilcoxon p |",
                  "|---|---|---|---|---|"]
        for name, row in result["table"][kind].items():
            p = row["wilcoxon_p"]
            lines.append(f"| {name} | {ci(row['uumamba'])} | {ci(row[other])} | "
                         f"{ci(row['difference'], True)} | {'n/a' if p is None else f'{p:.3g}'} |")
        lines.append("")
    if "table_dynunet" in result:
        lines += ["## Against the reference run's DynUNet", "",
                  "This run's UU-Mamba minus the DynUNet trained in the reference run (not "
                  "side by side in time), per volume:", "",
                  "| class | UU-Mamba raw | DynUNet raw | difference raw | difference post |",
                  "|---|---|---|---|---|"]
        raw, post = result["table_dynunet"]["raw"], result["table_dynunet"]["postprocessed"]
        for name, row in raw.items():
            lines.append(f"| {name} | {ci(row['uumamba'])} | {ci(row['dynunet'])} | "
                         f"{ci(row['difference'], True)} | "
                         f"{ci(post[name]['difference'], True)} |")
        lines.append("")
    lines += ["## Per fold", "", "| fold | model | run | precision | iterations | train s | "
              "predict s per volume | predicted |", "|---|---|---|---|---|---|---|---|"]
    for r in result["folds"]:
        models = ["uumamba", other]
        if other == "reference" and "dynunet" in r["iterations"]:
            models.append("dynunet")  # the reference run's DynUNet, as it was there
        for model in models:
            sec = r["predict_seconds"][model]
            ours = other == "dynunet" or model == "uumamba"
            precision = r.get("train_precision", "float32") if ours \
                else r.get("reference_precision", "float32")
            interleaved = r.get("predict_interleaved" if ours else "reference_interleaved")
            timing = "interleaved" if interleaved is True else (
                "alone, after a warm-up" if ours and other == "reference" else "in turn")
            lines.append(f"| {r['fold']} | {model} | {'this run' if ours else 'reference run'} | "
                         f"{precision} | {r['iterations'][model]} | "
                         f"{r['train_seconds'][model]:.0f} | {sum(sec) / len(sec):.2f} | "
                         f"{timing} |")
    lines += ["", "train s: wall seconds to the end of training; UU-Mamba's include its "
              "periodic and final validations (the DynUNet runs none). predicted: "
              "\"interleaved\" = the two models of that run took turns volume by volume after "
              "a warm-up each; \"in turn\" = one model's volumes after the other's (the machine's "
              "drift is in the difference); seconds of different runs do not pair."]
    if (q := result.get("predict_ratio")) is not None:
        per_fold = ", ".join(f"fold {f} {v:.3f}" for f, v in q["per_fold"].items())
        lines += ["", f"Predict seconds per volume, UU-Mamba / DynUNet, interleaved volume by "
                  f"volume: **{q['ratio']:.3f}** [{q['low']:.3f}, {q['high']:.3f}] (geometric "
                  f"mean over {q['n']} volumes, paired bootstrap; {per_fold})."]
    def by_machine(key: str) -> list[tuple[str, str]]:
        """(folds, machine) per distinct machine line, in the order of the first fold."""
        folds_of: dict[str, list[str]] = {}
        for r in sorted(result["folds"], key=lambda r: r["fold"]):
            if key in r:
                folds_of.setdefault(r[key], []).append(str(r["fold"]))
        return [(("folds " if len(f) > 1 else "fold ") + ", ".join(f), m)
                for m, f in folds_of.items()]

    lines += ["", *(f"Machine ({f}): {m}" for f, m in by_machine("machine"))]
    lines += [f"Reference's machine ({f}): {m}" for f, m in by_machine("reference_machine")]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ACDC")
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per model")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "bench_acdc")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "acdc_cpu.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folds", default="0",
                        help="comma-separated folds, e.g. 0,1,2,3,4 (cross-validation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override KEY=VALUE (both models)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="an earlier run's bench_acdc.json: compare with its UU-Mamba "
                             "instead of training the DynUNet")
    args = parser.parse_args(argv)
    from uumamba.errors import UserError, shown

    if not args.data.is_dir() or not any(args.data.glob("patient*")):  # before any training
        raise UserError(f"--data {args.data}: no ACDC patientXXX folders (README, 'The ACDC "
                        "data', says where to obtain them)")
    from uumamba.config import load_config
    from uumamba.utils import atomic_path

    reference = read_reference(args.reference) if args.reference is not None else None
    cfg = load_config(args.config, args.overrides + [f"train.time_limit_minutes={args.minutes}"])
    try:
        folds = sorted({int(f) for f in args.folds.split(",")})
    except ValueError:
        raise UserError(f"--folds {args.folds!r}: comma-separated fold numbers") from None
    if not folds or min(folds) < 0 or max(folds) >= cfg.train.n_folds:
        raise UserError(f"--folds {args.folds!r}: folds are 0 .. {cfg.train.n_folds - 1}")
    classes = [name for value, name in sorted(cfg.dataset.labels.items()) if value != 0]
    if reference is not None:  # checked before any training, against this run's split
        from uumamba.data import layouts
        from uumamba.model_folder import ModelFolder

        index = layouts.discover(args.data, layout=cfg.dataset.layout)
        splits = ModelFolder(args.output / "uumamba").splits(index.cases, cfg.train.n_folds,
                                                             cfg.train.seed)
        check_reference(reference, str(args.reference), folds, classes,
                        {f: splits[f]["val"] for f in folds})
    torch.set_num_threads(args.threads)
    from uumamba.device import precision_name
    from uumamba.engine.components import select_precision
    from uumamba.inference.sliding import window_precision

    precision = precision_name(select_precision(cfg.train.amp, torch.device("cpu"))[0])
    inference_precision = window_precision(cfg.inference, torch.device("cpu"))
    records = []
    for fold in folds:
        path = args.output / "folds" / f"fold_{fold}.json"
        if path.is_file():
            print(f"--- fold {fold}: done before ({path})", flush=True)
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"{path}: not a fold record ({type(exc).__name__}); remove it "
                                "to rerun the fold") from None
            if not isinstance(record, dict) or not {"dice", "iterations"} <= record.keys():
                raise UserError(f"{path}: not a fold record (expected a JSON object with "
                                "'dice' and 'iterations'); remove it to rerun the fold")
            if (args.reference is None) != ("dynunet" in record["dice"]):
                raise UserError(f"{path}: fold {fold} was run "
                                f"{'with' if args.reference is None else 'without'} --reference"
                                "; folds of one table share the mode: use another --output")
            if record.get("weights") != "last":
                raise UserError(f"{path}: fold {fold} predicted UU-Mamba from checkpoint_best.pt "
                                "(chosen on these validation cases); this run predicts both "
                                "models from their last weights: use another --output")
            for key, now in (("minutes", args.minutes), ("config", str(args.config)),
                             ("overrides", list(args.overrides or []))):
                if record.get(key) != now:
                    raise UserError(f"{path}: fold {fold} has {key} {shown(record.get(key))}, "
                                    f"this run {shown(now)}: folds of one table share them; "
                                    "use another --output")
            # records older than the fields trained and predicted in float32 (no CPU autocast)
            for key, now in (("train_precision", precision),
                             ("inference_precision", inference_precision)):
                if (saved := record.get(key, "float32")) != now:
                    raise UserError(f"{path}: fold {fold} has {key} {shown(saved)}, this run "
                                    f"{now} (train.amp={cfg.train.amp}, inference.amp="
                                    f"{cfg.inference.amp} on this CPU): folds of one table "
                                    "must share them; use another --output")
            records.append(record)
            continue
        if (args.output / "uumamba" / f"fold_{fold}" / "checkpoint_latest.pt").exists():
            raise UserError(f"{args.output}: fold {fold} was started but not finished; remove "
                            f"{args.output / 'uumamba' / f'fold_{fold}'} to rerun it")
        record = run_fold_pair(cfg, args, fold)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, durable=True) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        records.append(record)

    other = "dynunet"
    if reference is not None:
        other, records = "reference", with_reference(records, reference, str(args.reference))
    result = {
        "data": str(args.data), "minutes": args.minutes, "threads": args.threads,
        "config": str(args.config), "overrides": args.overrides, "folds": records,
        "other": other, "table": pooled_table(records, classes, other),
        "predict_ratio": predict_ratio(records),
    }
    if reference is not None:
        result["reference"] = str(args.reference)
        result["reference_minutes"] = reference.get("minutes")
        if all("dynunet" in r["dice"] for r in records):
            result["table_dynunet"] = pooled_table(records, classes, "dynunet")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench_acdc.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, args.output / "bench_acdc.md")
    print((args.output / "bench_acdc.md").read_text())
    print(f"wrote {args.output / 'bench_acdc.json'} and {args.output / 'bench_acdc.md'}")
    return result


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
