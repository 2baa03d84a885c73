"""The Python half of ``scripts/gpu_check.sh``: the CUDA path checked on one GPU (issue 19).

Run by the shell script after the pinned kernels are built; prints one report (a script, so it
prints). Sections, in order:

1. the kernel probe (``uumamba.nn.ops.selective_scan.probe_cuda_kernels``) and what ``auto``
   picks on the GPU;
2. values and every gradient (input and each parameter) of one Mamba layer with the same
   weights on the cuda, torch-on-cuda and cpu backends and ``mamba_ssm.Mamba``, against the
   float32 torch backend on the CPU, plus how often the cuda kernel was really called;
3. SpatialMamba under bf16 autocast; float64 and ``d_conv=5`` on the cuda backend (must be
   refused with the limit named);
4. a few SAM steps of a 3D U-Mamba-Enc with the uncertainty loss under bf16, fp16 +
   GradScaler, and the torch backend (loss, finiteness, seconds per step);
5. the scan forward + backward timed at three shapes, cuda against torch on the same GPU.

:func:`compare_backends` holds the comparison of section 2 and runs on any device set (the
CPU tests run it with the torch and cpu backends). Exit status 1 when a comparison or a check
fails, so the shell script and the log say FAIL.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from uumamba.nn import Mamba

#: Relative tolerances of :func:`compare_backends` (float32 kernels against the float32
#: reference; the CUDA backward accumulates in another order).
VALUE_TOL, GRAD_TOL = 1e-4, 1e-3


@dataclass(frozen=True)
class Comparison:
    """One run against the reference: worst relative errors of the output and the gradients."""

    name: str
    value_error: float
    worst_grad: str
    grad_error: float

    @property
    def ok(self) -> bool:
        return self.value_error < VALUE_TOL and self.grad_error < GRAD_TOL

    def line(self) -> str:
        return (f"{self.name:16s} y {self.value_error:.1e}  worst grad {self.worst_grad} "
                f"{self.grad_error:.1e}  {'OK' if self.ok else 'FAIL'}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (b is the reference)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_layer(module: torch.nn.Module, state: dict, device: str, x0: torch.Tensor,
              grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Load ``state`` into ``module`` on ``device``, run ``x0`` forward and ``grad_out``
    backward; the output ``y``, the input gradient ``dx`` and every parameter's gradient."""
    module.load_state_dict(state)
    module.to(device)
    x = x0.to(device).requires_grad_()
    y = module(x)
    y.backward(grad_out.to(device))
    grads = {name: p.grad.detach().cpu() for name, p in module.named_parameters()}
    return {"y": y.detach().cpu(), "dx": x.grad.detach().cpu(), **grads}


def compare_backends(runs: dict[str, tuple[Callable[[], torch.nn.Module], str]],
                     d_model: int = 64, length: int = 3000, batch: int = 2, seed: int = 0
                     ) -> list[Comparison]:
    """Compare Mamba layers with the same weights against the float32 torch backend on CPU.

    Args:
        runs: name -> (factory of a module with ``Mamba(d_model)``'s parameters, device).
        d_model, length, batch: layer width and input size (batch, length, d_model).
        seed: weights and inputs.

    Returns:
        One :class:`Comparison` per run, in order.
    """
    torch.manual_seed(seed)
    reference = Mamba(d_model, scan_backend="torch")
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(batch, length, d_model, generator=g)
    grad_out = torch.randn(batch, length, d_model, generator=g)
    ref = run_layer(reference, state, "cpu", x0, grad_out)
    results = []
    for name, (factory, device) in runs.items():
        got = run_layer(factory(), state, device, x0, grad_out)
        grads = {k: rel_err(v, ref[k]) for k, v in got.items() if k != "y"}
        worst = max(grads, key=grads.get)
        results.append(Comparison(name, rel_err(got["y"], ref["y"]), worst, grads[worst]))
    return results


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _limits(cu: str) -> bool:
    """float64 and d_conv=5 on the cuda backend must be refused with the limit named."""
    ok = True
    cases = {
        "float64": (lambda: Mamba(16, scan_backend="cuda").double().to(cu)(
            torch.randn(1, 8, 16, device=cu, dtype=torch.float64)), TypeError),
        "d_conv=5": (lambda: Mamba(16, d_conv=5, scan_backend="cuda"), ValueError),
        "d_conv=5, auto": (lambda: Mamba(16, d_conv=5).to(cu)(torch.randn(1, 8, 16, device=cu)),
                           ValueError),
    }
    for name, (fn, kind) in cases.items():
        try:
            fn()
            print(f"{name} on the cuda backend: ran (FAIL: should be refused)")
            ok = False
        except kind as exc:
            print(f"{name} refused: {str(exc).splitlines()[0][:200]}  OK")
    return ok


def _sam_steps(cu: str, steps: int) -> bool:
    from uumamba.config import LossConfig, OptimConfig
    from uumamba.device import native_bf16
    from uumamba.engine.step import training_step
    from uumamba.losses import build_loss
    from uumamba.nn import UMambaEnc
    from uumamba.optim import build_optimizer

    print("train.amp=auto on this GPU ->", "bf16" if native_bf16(cu) else "fp16 + GradScaler",
          "(compute capability {}.{})".format(*torch.cuda.get_device_capability(0)))
    torch.backends.cudnn.benchmark = True
    ok = True
    for backend, dtype, scaled in (("cuda", torch.bfloat16, False), ("cuda", torch.float16, True),
                                   ("torch", torch.bfloat16, False)):
        torch.manual_seed(0)
        net = UMambaEnc(3, 1, 3, features=[16, 32, 64, 128], scan_backend=backend).to(cu).train()
        img = torch.randn(2, 1, 64, 64, 64, device=cu)
        tgt = torch.randint(0, 3, (2, 1, 64, 64, 64), device=cu)
        loss_fn = build_loss(LossConfig(), 3, None, net.n_deep_supervision_outputs).to(cu)
        opt = build_optimizer(OptimConfig(), net, loss_fn)  # SAM over SGD, uncertainty loss
        scaler = torch.amp.GradScaler("cuda") if scaled else None
        results, seconds = [], []
        for _ in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            results.append(training_step(net, loss_fn, opt, img, tgt, scaler=scaler,
                                         autocast_dtype=dtype, device_type="cuda"))
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
        finite = [r.finite for r in results]
        ok &= all(finite[1:])  # fp16's first step may be skipped while the scale settles
        print(f"SAM step {backend:5s} {str(dtype)[6:]:8s}{' + GradScaler' if scaled else ''}: "
              f"loss {[round(r.loss, 4) for r in results]} finite {finite} "
              f"{min(seconds):.3f} s/step (best of {steps})")
    return ok


def _bench_scan(cu: str) -> None:
    from uumamba.nn import selective_scan

    def bench(backend: str, B: int, D: int, L: int, reps: int, N: int = 16) -> float:
        u, z, dl = (torch.randn(B, D, L, device=cu).requires_grad_() for _ in range(3))
        Bm, Cm = (torch.randn(B, N, L, device=cu).requires_grad_() for _ in range(2))
        A = (-torch.rand(D, N, device=cu) - 0.5).requires_grad_()

        def step() -> None:  # Mamba-like step sizes (softplus(-3) ~ 0.05)
            selective_scan(u, dl * 0.5 - 3, A, Bm, Cm, torch.ones(D, device=cu), z,
                           torch.zeros(D, device=cu), True, backend=backend).sum().backward()

        step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    for B, D, L in ((2, 32, 262144), (2, 256, 4096), (2, 640, 64)):
        print(f"scan fwd+bwd B={B} d_inner={D} L={L}: cuda {bench('cuda', B, D, L, 20):.2f} ms, "
              f"torch@cuda {bench('torch', B, D, L, 2):.1f} ms", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="SAM steps per precision")
    parser.add_argument("--skip-bench", action="store_true", help="no timing section")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (run scripts/gpu_check.sh on a GPU machine)")
        return 1
    cu = "cuda"
    scan_mod = importlib.import_module("uumamba.nn.ops.selective_scan")
    print("GPU", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "torch", torch.__version__, "CUDA", torch.version.cuda)

    _section("kernel probe")
    probe = scan_mod.probe_cuda_kernels(torch.cuda.current_device())
    print("probe:", probe)
    print("auto on cuda ->", scan_mod.choose_scan_backend("auto", cu))
    ok = probe.reason is None and probe.causal_conv1d

    _section("one Mamba layer, same weights: values and every gradient vs torch on CPU (fp32)")
    real, calls = scan_mod.selective_scan_cuda, [0]

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    scan_mod.selective_scan_cuda = counted
    runs = {"ours cuda": (lambda: Mamba(64, scan_backend="cuda"), cu),
            "ours torch@cuda": (lambda: Mamba(64, scan_backend="torch"), cu)}
    if importlib.util.find_spec("numba") is not None:
        runs["ours cpu"] = (lambda: Mamba(64, scan_backend="cpu"), "cpu")
    else:
        print("numba absent: the cpu backend is not compared here (the CPU tests cover it)")
    try:
        from mamba_ssm import Mamba as MambaSSM

        runs["mamba_ssm.Mamba"] = (lambda: MambaSSM(64), cu)
    except Exception as exc:  # reported, and the check fails below
        print("mamba_ssm.Mamba unavailable:", exc)
        ok = False
    try:
        for result in compare_backends(runs):
            print(result.line(), flush=True)
            ok &= result.ok
    finally:
        scan_mod.selective_scan_cuda = real
    print("cuda kernel calls (ours cuda):", calls[0], "OK" if calls[0] >= 1 else "FAIL")
    ok &= calls[0] >= 1

    _section("bf16 autocast, kernel limits")
    from uumamba.nn import SpatialMamba

    sm = SpatialMamba(32, scan_backend=cu).to(cu)
    xs = torch.randn(2, 32, 12, 12, 12, device=cu)
    with torch.autocast(cu, dtype=torch.bfloat16):
        ys = sm(xs.bfloat16())
    err = rel_err(ys, sm(xs.bfloat16().float()))
    print(f"SpatialMamba under bf16 autocast: {ys.dtype}, finite {bool(ys.float().isfinite().all())}, "
          f"vs fp32 {err:.1e}")
    ok &= bool(ys.float().isfinite().all())
    ok &= _limits(cu)

    _section(f"SAM training steps of a 3D U-Mamba-Enc (64^3, batch 2, {args.steps} steps)")
    ok &= _sam_steps(cu, args.steps)

    if not args.skip_bench:
        _section("scan forward + backward, cuda vs torch on this GPU")
        _bench_scan(cu)
    print("\npeak GPU memory", torch.cuda.max_memory_allocated() >> 20, "MiB")
    print("RESULT:", "OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
