"""Model benchmark: one training step of UMambaBot / UMambaEnc vs the plain residual U-Net.

Measures forward + backward + SGD update time (seconds; min and median over ``--repeats``
after ``--warmup`` steps, pooled over ``--rounds`` alternating runs; ratios use the min, the
least disturbed by other load on a shared machine) and the process CPU time of the step (all
threads; insensitive to waiting for a shared CPU) and peak memory of one training step, for the same network with Mamba at
the bottleneck (``UMambaBot``), after every encoder stage (``UMambaEnc``) and without Mamba
(``mamba="none"``, the baseline). Default: 3D patch (16, 128, 128), batch 2, channels
(16, 32, 64, 128, 256), strides ((1,1,1), (1,2,2), (2,2,2), (2,2,2), (2,2,2)), deep
supervision on, cross-entropy summed over the deep-supervision outputs. Target from issue 2:
UMambaBot step time <= 1.25x the baseline.

Each model runs in its own subprocess so that its peak memory is its own:
on CUDA ``torch.cuda.max_memory_allocated`` during the step; on CPU the growth of the
process's resident-set high-water mark (``VmHWM``, Linux, reset before the timed steps) over
the resident size after the model, optimiser state and batch exist (so the step's
activations, gradients and workspace).

    python benchmarks/bench_model.py                      # CPU, 2 threads, all three models
    python benchmarks/bench_model.py --device cuda --repeats 10
    python benchmarks/bench_model.py --models bot none --patch 16 64 64

``--optimizers adamw sam looksam rst ema_kl`` times instead the training step of
``uumamba.engine.step.training_step`` (the one ``uumamba train`` runs: uncertainty-weighted
loss over the deep-supervision outputs, clipping) of the first ``--models`` network under each
optimizer of :mod:`uumamba.optim` (all over AdamW), each in its own subprocess, as seconds per
update averaged over ``--steps`` consecutive updates (a multiple of LookSAM's k = 5, so its
SAM updates are counted in proportion; EMA-KL's KL term active from the first update), and
prints each one's ratio to the plain AdamW update. Default there: the 2D setting of
``configs/acdc_cpu.yaml`` (patch 128 x 128, batch 8, features 16-256)::

    python benchmarks/bench_model.py --optimizers adamw sam looksam rst ema_kl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = {"bot": "bottleneck", "enc": "encoder", "none": "none"}
LABELS = {"bot": "UMambaBot", "enc": "UMambaEnc", "none": "U-Net (no Mamba)"}
OPTIMIZERS = {"adamw": "AdamW (plain)", "sam": "SAM", "asam": "ASAM", "looksam": "LookSAM k=5",
              "rst": "RST p=0.5", "ema_kl": "EMA-KL"}
TARGETS = {"sam": "~2x", "looksam": "<= 1.3x", "ema_kl": "<= 1.4x"}
_STRIDES_3D = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["none", "bot", "enc"])
    p.add_argument("--patch", nargs="+", type=int, default=[16, 128, 128],
                   help="3 values (3D) or 2 (2D)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--features", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    p.add_argument("--strides", type=json.loads,
                   default=_STRIDES_3D,
                   help="JSON list of per-stage strides")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the models this many times, alternating order; stats over all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scan-backend", default="auto")
    p.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS),
                   help="time training_step under these optimizers instead (see above)")
    p.add_argument("--steps", type=int, default=10,
                   help="--optimizers: updates per timed repeat (a multiple of LookSAM's k)")
    p.add_argument("--child", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--child-optim", choices=list(OPTIMIZERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.optimizers and "--patch" not in (argv if argv is not None else sys.argv[1:]):
        args.patch = [128, 128]
    if len(args.patch) == 2 and args.strides == _STRIDES_3D:
        args.strides = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]
    if args.optimizers and "--batch" not in (argv if argv is not None else sys.argv[1:]):
        args.batch = 8
    if args.optimizers and "--models" not in (argv if argv is not None else sys.argv[1:]):
        args.models = ["bot"]
    return args


def _vm_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB; 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` value 5); ignored where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _saved_activation_bytes(net, x) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward pass.

    A deterministic measure of activation memory (independent of the allocator and of other
    load on the machine); storages shared by several saved tensors are counted once.
    """
    import torch

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = net(x)
    del outs
    return sum(storages.values())


def run_child(args: argparse.Namespace) -> dict:
    """Build one model, time ``warmup + repeats`` training steps, measure peak memory."""
    import torch
    import torch.nn.functional as F

    from uumamba.nn import UMamba

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = UMamba(3, 1, args.classes, features=args.features, strides=args.strides,
                 mamba=MODELS[args.child], scan_backend=args.scan_backend).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(args.batch, 1, *args.patch, device=device)
    full = torch.randint(0, args.classes, (args.batch, 1, *args.patch), device=device).float()
    # Deep-supervision targets: nearest-neighbour downsampled labels, one per output.
    with torch.no_grad():
        shapes = [o.shape[2:] for o in net(x)]
    targets = [F.interpolate(full, size=s, mode="nearest")[:, 0].long() for s in shapes]
    opt.zero_grad(set_to_none=True)

    def step() -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        outs = net(x)
        loss = sum(F.cross_entropy(o, t) for o, t in zip(outs, targets, strict=True))
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    step()  # allocate optimiser state before the memory baseline
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _reset_peak_rss()
        base = _vm_kib("VmRSS") * 1024
    for _ in range(max(args.warmup - 1, 0)):
        step()
    times, cpu_times = zip(*(step() for _ in range(args.repeats)), strict=True)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else _vm_kib("VmHWM") * 1024)
    n_params = sum(p.numel() for p in net.parameters())
    saved = _saved_activation_bytes(net, x)
    return {"model": args.child, "times_s": list(times), "cpu_times_s": list(cpu_times),
            "peak_step_mib": (peak - base) / 2**20, "baseline_mib": base / 2**20,
            "saved_activations_mib": saved / 2**20, "params": n_params}


def run_optim_child(args: argparse.Namespace) -> dict:
    """Time ``--steps`` consecutive ``training_step`` updates under one optimizer, repeated."""
    import torch

    from uumamba.config import LossConfig, OptimConfig
    from uumamba.engine.step import training_step
    from uumamba.losses import build_loss
    from uumamba.nn import UMamba
    from uumamba.optim import build_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dims = len(args.patch)
    net = UMamba(dims, 1, args.classes, features=args.features, strides=args.strides,
                 mamba=MODELS[args.models[0]], scan_backend=args.scan_backend).to(device).train()
    loss_fn = build_loss(LossConfig(), args.classes, None, net.n_deep_supervision_outputs)
    loss_fn = loss_fn.to(device)
    name = args.child_optim
    cfg = OptimConfig(name=name, base="adamw", lr=2e-3, weight_decay=1e-4, kl_start=0)
    opt = build_optimizer(cfg, net, loss_fn)
    x = torch.randn(args.batch, 1, *args.patch, device=device)
    y = torch.randint(0, args.classes, (args.batch, 1, *args.patch), device=device)

    def updates(n: int) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(n):
            training_step(net, loss_fn, opt, x, y, device_type=device.type)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n, (time.process_time() - cpu_start) / n

    updates(max(args.warmup, 1) * 5)  # warm-up in whole LookSAM cycles
    times, cpu_times = zip(*(updates(args.steps) for _ in range(args.repeats)), strict=True)
    return {"optimizer": name, "times_s": list(times), "cpu_times_s": list(cpu_times)}


def main_optimizers(args: argparse.Namespace, forwarded: list[str]) -> int:
    """``--optimizers``: one child per optimizer and round, then the ratios to AdamW."""
    print(f"training_step per update ({LABELS[args.models[0]]}, patch {tuple(args.patch)}, batch "
          f"{args.batch}, features {tuple(args.features)}, device {args.device}, {args.threads} "
          f"threads; mean over {args.steps} consecutive updates, {args.repeats} repeats after "
          f"{max(args.warmup, 1) * 5} warm-up updates, {args.rounds} round(s))")
    runs: dict[str, list[dict]] = {o: [] for o in args.optimizers}
    for rnd in range(args.rounds):
        for name in args.optimizers if rnd % 2 == 0 else args.optimizers[::-1]:
            cmd = [sys.executable, __file__, *forwarded, "--child-optim", name]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{OPTIMIZERS[name]}: failed\n{proc.stderr[-2000:]}")
                return 1
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {name: _merge(r) for name, r in runs.items()}
    base = results.get("adamw")
    for name in args.optimizers:
        r = results[name]
        ratio = ""
        if base is not None:
            ratio = (f"  {r['min_s'] / base['min_s']:.2f}x AdamW (min), CPU time "
                     f"{r['cpu_min_s'] / base['cpu_min_s']:.2f}x"
                     + (f"  (target {TARGETS[name]})" if name in TARGETS else ""))
        print(f"  {OPTIMIZERS[name]:<14} min {r['min_s']:6.3f} s  median {r['median_s']:6.3f} s"
              f"  CPU time min {r['cpu_min_s']:6.3f} s{ratio}")
    return 0


def _merge(runs: list[dict]) -> dict:
    """Pool the step times of several rounds of one model; median of the memory figures."""
    times = [t for r in runs for t in r["times_s"]]
    cpu_times = [t for r in runs for t in r["cpu_times_s"]]
    merged = {**runs[0], "times_s": times, "min_s": min(times),
              "median_s": statistics.median(times), "cpu_min_s": min(cpu_times)}
    if "peak_step_mib" in runs[0]:
        merged["peak_step_mib"] = statistics.median(r["peak_step_mib"] for r in runs)
    return merged


def main(argv: list[str] | None = None) -> int:
    """Run every model in a subprocess, print a table and the ratios to the baseline."""
    args = _parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    if args.child_optim:
        print(json.dumps(run_optim_child(args)))
        return 0
    from uumamba.device import resolve_device

    resolve_device(args.device)  # --device cuda without CUDA: one line, before any child starts
    forwarded = list(argv if argv is not None else sys.argv[1:])
    if args.optimizers:
        return main_optimizers(args, forwarded)
    print(f"one training step (forward + backward + SGD), patch {tuple(args.patch)}, batch "
          f"{args.batch}, features {tuple(args.features)}, device {args.device}, "
          f"{args.threads} threads, scan backend {args.scan_backend}; "
          f"{args.repeats} timed steps after {args.warmup} warm-up, {args.rounds} round(s)")
    # Fixed glibc mmap threshold: large tensors are mmapped and returned at free, so the
    # resident-set peak follows live tensor memory instead of the allocator's history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    runs: dict[str, list[dict]] = {m: [] for m in args.models}
    for rnd in range(args.rounds):
        for model in args.models if rnd % 2 == 0 else args.models[::-1]:
            cmd = [sys.executable, __file__, *forwarded, "--child", model]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{LABELS[model]}: failed\n{proc.stderr[-2000:]}")
                return 1
            runs[model].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {m: _merge(r) for m, r in runs.items()}
    for model in args.models:
        r = results[model]
        print(f"  {LABELS[model]:<18} min {r['min_s']:7.2f} s  median {r['median_s']:7.2f} s  "
              f"CPU time min {r['cpu_min_s']:7.2f} s  "
              f"peak step memory "
              f"{r['peak_step_mib']:6.0f} MiB  saved activations {r['saved_activations_mib']:6.0f} MiB"
              f"  params {r['params'] / 1e6:5.2f} M  "
              f"(steps: {', '.join(f'{t:.2f}' for t in r['times_s'])} s)")
    if "none" in results:
        base = results["none"]
        for model in (m for m in args.models if m != "none"):
            r = results[model]
            print(f"  ratio {LABELS[model]} / U-Net: time {r['min_s'] / base['min_s']:.2f}x (min), "
                  f"{r['median_s'] / base['median_s']:.2f}x (median), "
                  f"CPU time {r['cpu_min_s'] / base['cpu_min_s']:.2f}x, "
                  f"peak memory {r['peak_step_mib'] / max(base['peak_step_mib'], 1e-9):.2f}x, "
                  f"saved activations "
                  f"{r['saved_activations_mib'] / max(base['saved_activations_mib'], 1e-9):.2f}x"
                  + ("  (target <= 1.25x)" if model == "bot" else ""))
    return 0


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
