"""Where one training iteration's time goes: data, forward, loss, backward, optimizer, the rest.

Builds the run exactly as ``uumamba train`` does (``prepare_model_folder``, the datasets with
their cache, ``build_components``, ``make_patch_loader``) for fold 0 of ``--config`` on
``--data``, in a throw-away model folder, then measures three things one after the other:

1. **data**: batches drawn from the training dataset in this process (``num_workers = 0``):
   reading the cached case, patch sampling, augmentation, collation — the CPU cost of the
   input pipeline per batch, whoever pays it;
2. **compute**, on the batches of (1) kept in memory: forward, loss, backward, gradient
   clipping + optimizer step (``optim.name`` of the config; plain optimizers only), each
   timed with ``time.perf_counter`` (CPU: synchronous);
3. **loop**: ``training_step`` fed by the real loader (``train.num_workers`` and
   ``train.loader_nice`` of the config):
   seconds per iteration and iterations per minute as the engine sees them; ``loop - compute``
   is what the loader's waiting, the schedule and the bookkeeping cost on top.

Threads: ``--threads`` torch threads (the CPU config's 2), the loader worker as configured.
Prints a table (ms per iteration, share of the loop time) and writes ``--json``.

    python benchmarks/profile_train.py --data ../shared/data/ACDC --iterations 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


def profile(args: argparse.Namespace) -> dict:
    """Run the three measurements (module docstring); returns medians in ms per iteration."""
    import torch

    from uumamba.config import load_config
    from uumamba.device import precision_name
    from uumamba.engine.components import build_components, seed_everything
    from uumamba.engine.prepare import prepare_model_folder
    from uumamba.engine.sampling import make_patch_loader
    from uumamba.engine.step import _clip, training_step
    from uumamba.errors import UserError
    from uumamba.optim import EMAKL, SAM
    from uumamba.utils import plain_tensor

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    tc = cfg.train
    seed_everything(tc.seed, False, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="uumamba-profile-") as tmp:
        prepared = prepare_model_folder(cfg, args.data, Path(tmp), "0", device_type="cpu")
        cfg, plans = prepared.cfg, prepared.plans
        if isinstance(build_components(cfg, plans, torch.device("cpu"), 1).optimizer,
                      (SAM, EMAKL)):
            raise UserError("profile_train.py times plain optimizers (adamw / sgd); "
                            "use benchmarks/bench_model.py --optimizers for the others")
        t0 = time.perf_counter()
        train_set, _, _ = prepared.datasets(tc, 0, 1, None)
        setup_s = time.perf_counter() - t0
        total = args.warmup + args.iterations
        parts = build_components(cfg, plans, torch.device("cpu"), total)

        def batches(workers: int, n: int):
            return iter(make_patch_loader(train_set, plans.batch_size, tc.seed, 0, 0, n,
                                          workers, worker_nice=tc.loader_nice))

        # 1. data, in this process
        data_s, kept = [], []
        it = batches(0, total)
        for i in range(total):
            t = time.perf_counter()
            batch = next(it)
            if i >= args.warmup:
                data_s.append(time.perf_counter() - t)
            kept.append((plain_tensor(batch["image"]).float(), plain_tensor(batch["label"]).long()))

        # 2. compute phases on those batches
        model, loss_fn, opt = parts.model.train(), parts.loss_fn, parts.optimizer
        precision = _precision(parts.autocast_dtype)
        phases: dict[str, list[float]] = {k: [] for k in ("forward", "loss", "backward", "step")}
        for i, (x, y) in enumerate(kept):
            opt.zero_grad(set_to_none=True)
            t = time.perf_counter()
            with precision():
                out = model(x)
                t1 = time.perf_counter()
                loss = loss_fn(out, y)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            _clip(opt, cfg.optim.grad_clip)
            opt.step()
            t4 = time.perf_counter()
            if i >= args.warmup:
                for key, value in zip(phases, (t1 - t, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    phases[key].append(value)

        # 3. the loop with the configured loader
        loop_s = []
        it = batches(tc.num_workers, total)
        t = time.perf_counter()
        for i in range(total):
            batch = next(it)
            x = plain_tensor(batch["image"]).float()
            y = plain_tensor(batch["label"]).long()
            training_step(model, loss_fn, opt, x, y, grad_clip=cfg.optim.grad_clip,
                          autocast_dtype=parts.autocast_dtype, device_type="cpu")
            parts.scheduler.step()
            now = time.perf_counter()
            if i >= args.warmup:
                loop_s.append(now - t)
            t = now
    result = {"data_ms": _ms(data_s), **{f"{k}_ms": _ms(v) for k, v in phases.items()},
              "loop_ms": _ms(loop_s), "setup_s": setup_s,
              "iterations_per_minute": 60.0 / statistics.median(loop_s),
              "threads": args.threads, "num_workers": tc.num_workers,
              "loader_nice": tc.loader_nice,
              "precision": precision_name(parts.autocast_dtype),
              "batch_size": plans.batch_size, "patch_size": list(plans.patch_size),
              "iterations": args.iterations, "warmup": args.warmup}
    result["compute_ms"] = sum(result[f"{k}_ms"] for k in phases)
    if args.ops:
        result["ops"] = _top_ops(model, loss_fn, opt, kept[args.warmup:], cfg.optim.grad_clip,
                                 args.ops, parts.autocast_dtype)
    return result


def _precision(autocast_dtype):
    """A context factory: the run's autocast (``train.amp``, as ``training_step`` applies it)."""
    import torch

    return lambda: torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)


def _top_ops(model, loss_fn, opt, kept, grad_clip, n: int, autocast_dtype=None) -> list[dict]:
    """``n`` aten / autograd ops with the most self CPU time over the compute phase of the kept
    batches (torch.profiler), in ms per iteration."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from uumamba.engine.step import _clip

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in kept:
            opt.zero_grad(set_to_none=True)
            with _precision(autocast_dtype)():
                loss = loss_fn(model(x), y)
            loss.backward()
            _clip(opt, grad_clip)
            opt.step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [{"op": e.key, "self_ms_per_iteration": e.self_cpu_time_total / 1000 / len(kept),
             "calls_per_iteration": e.count / len(kept)} for e in events]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ACDC")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "acdc_cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--ops", type=int, default=0,
                   help="also list the N ops with the most self CPU time (torch.profiler)")
    args = p.parse_args(argv)
    from uumamba.commands.script import describe_machine

    r = profile(args)
    loop = r["loop_ms"]
    print(f"{describe_machine()}; {args.threads} threads, {r['precision']}, "
          f"loader workers {r['num_workers']} "
          f"(nice +{r['loader_nice']}), "
          f"batch {r['batch_size']} x {r['patch_size']}; medians over {args.iterations} "
          f"iterations after {args.warmup}")
    rows = [("data (load, sample, augment, collate; in-process)", r["data_ms"])]
    rows += [(name, r[f"{name}_ms"]) for name in ("forward", "loss", "backward", "step")]
    rows += [("compute (forward + loss + backward + step)", r["compute_ms"]),
             ("loop: training_step fed by the loader", loop),
             ("loop - compute (loader wait, bookkeeping)", loop - r["compute_ms"])]
    for name, ms in rows:
        print(f"  {name:<52} {ms:8.1f} ms  {100 * ms / loop:5.1f} % of the loop")
    print(f"  iterations per minute: {r['iterations_per_minute']:.1f}; dataset setup "
          f"{r['setup_s']:.1f} s")
    for op in r.get("ops", []):
        print(f"  op {op['op'][:60]:<60} {op['self_ms_per_iteration']:7.1f} ms "
              f"x{op['calls_per_iteration']:g}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
