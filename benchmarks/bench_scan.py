"""Selective-scan benchmark: forward + backward time and peak memory, side by side in one run.

Methods (same inputs: delta_softplus, delta_bias, D and the silu(z) gate on every method):

* ``cpu``     - uumamba's fused numba kernels (``backend="cpu"``).
* ``torch``   - uumamba's pure-PyTorch scan: blocked cumulative sums, chunked, hand-written
  recomputing backward (``backend="torch"``).
* ``loop``    - per-step loop: exp(delta A) and delta B u materialised as (batch, d_inner, L,
  d_state), one vectorised step per position over ``unbind`` views, ``stack``, autograd (the
  form of mamba-ssm's ``selective_scan_ref``).
* ``mambapy`` - mambapy's parallel scan ``mambapy.pscan.pscan`` (Blelloch, custom backward),
  when the ``mambapy`` package is importable (``pip install mambapy``; not a uumamba
  dependency).

Every measurement runs in a fresh subprocess (``--child``) so peak memory is per case: after a
warm-up on a short sequence (numba compilation included there), the kernel's peak-RSS counter
is reset (``/proc/self/clear_refs``), then the timed forward + backward runs and the peak RSS
(VmHWM) is read; ``peak`` is that peak minus the RSS before the inputs were made. Times are
wall-clock seconds of one run; on a shared machine they are noisy, so compare the ratios,
which come from the same run. Peak RSS includes heap that glibc keeps after ``free`` (it
grows its mmap threshold dynamically); ``--mmap-threshold`` fixes the threshold so the peak
tracks live memory.

Usage::

    python benchmarks/bench_scan.py                      # L 4096, 32768; d_inner 64, 640
    python benchmarks/bench_scan.py --lengths 4096 --d-inner 64 --methods cpu torch loop
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("cpu", "torch", "loop", "mambapy")


def _rss_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process in bytes from /proc (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _make_inputs(length, d_inner, d_state, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, d_inner, length, generator=g)
    delta = torch.randn(1, d_inner, length, generator=g) * 0.5 - 1.0
    A = -torch.exp(torch.randn(d_inner, d_state, generator=g) * 0.5)
    B = torch.randn(1, d_state, length, generator=g)
    C = torch.randn(1, d_state, length, generator=g)
    D = torch.randn(d_inner, generator=g)
    z = torch.randn(1, d_inner, length, generator=g)
    delta_bias = torch.randn(d_inner, generator=g) * 0.1
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]


def _loop_scan(u, delta, A, B, C, D, z, delta_bias):
    """Per-step reference loop (autograd through unbind / stack)."""
    import torch
    import torch.nn.functional as F

    delta = F.softplus(delta + delta_bias[None, :, None])
    decay = torch.exp(delta[..., None] * A[None, :, None, :])  # (b, d, L, n)
    drive = (delta * u)[..., None] * B.transpose(1, 2)[:, None]  # (b, d, L, n)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for a_t, x_t, c_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(2), strict=True):
        h = a_t * h + x_t
        ys.append((h * c_t[:, None]).sum(-1))
    y = torch.stack(ys, dim=2) + D[None, :, None] * u
    return y * F.silu(z)


def _mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """mambapy's pscan on (b, L, d, n) tensors, as mambapy.mamba.MambaBlock.selective_scan."""
    import torch.nn.functional as F
    from mambapy.pscan import pscan

    delta = F.softplus(delta + delta_bias[None, :, None]).transpose(1, 2)  # (b, L, d)
    decay = (delta.unsqueeze(-1) * A).exp()  # (b, L, d, n)
    drive = (delta * u.transpose(1, 2)).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)
    hs = pscan(decay, drive)  # (b, L, d, n)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # (b, d, L)
    y = y + D[None, :, None] * u
    return y * F.silu(z)


def _method_fn(method):
    if method in ("cpu", "torch"):
        from uumamba.nn.ops import selective_scan

        def run(u, delta, A, B, C, D, z, delta_bias):
            return selective_scan(u, delta, A, B, C, D, z, delta_bias, True, backend=method)

        return run
    return {"loop": _loop_scan, "mambapy": _mambapy_scan}[method]


def child(method, length, d_inner, d_state, threads):
    """Run one measurement; print a JSON line with seconds and bytes."""
    import torch

    torch.set_num_threads(threads)
    fn = _method_fn(method)
    for _ in range(2):  # loads / compiles numba kernels; one-time costs stay out of the timing
        warm = _make_inputs(64, d_inner, d_state)
        out = fn(*warm)
        out.backward(torch.ones_like(out))
    del warm, out
    resettable = _reset_peak_rss()
    base = _rss_bytes("VmRSS") or 0
    inputs = _make_inputs(length, d_inner, d_state)
    t0 = time.perf_counter()
    out = fn(*inputs)
    t1 = time.perf_counter()
    out.backward(torch.ones_like(out))
    t2 = time.perf_counter()
    finite = all(torch.isfinite(t.grad).all().item() for t in inputs)
    if resettable:
        peak = _rss_bytes("VmHWM") or 0
    else:  # ru_maxrss (kB) may include the warm-up
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"forward_s": t1 - t0, "backward_s": t2 - t1, "total_s": t2 - t0,
                      "peak_bytes": max(0, peak - base), "finite": bool(finite)}))


def _available(method):
    if method != "mambapy":
        return True
    try:
        import mambapy.pscan  # noqa: F401
    except ImportError:
        return False
    return True


def _measure(method, length, d_inner, d_state, threads, timeout, mmap_threshold=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, str(length),
           str(d_inner), str(d_state), str(threads)]
    env = dict(os.environ)
    if mmap_threshold:  # glibc: fixed threshold, freed large blocks go back to the OS
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {last[:60]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_ratio(num, den):
    return f"{num / den:6.1f}x" if num and den else "     -"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--d-inner", type=int, nargs="+", default=[64, 640])
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc MALLOC_MMAP_THRESHOLD_ in the children (e.g. 1048576) so "
                        "peak RSS tracks live tensors rather than heap glibc keeps after free")
    parser.add_argument("--child", nargs=5, metavar=("METHOD", "L", "D", "N", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, length, d_inner, d_state, threads = args.child
        child(method, int(length), int(d_inner), int(d_state), int(threads))
        return

    methods = [m for m in args.methods if _available(m)]
    skipped = sorted(set(args.methods) - set(methods))
    print(f"selective scan, batch 1, d_state {args.d_state}, {args.threads} threads, "
          "forward + backward" + (f"; not installed: {', '.join(skipped)}" if skipped else ""))
    header = (f"{'L':>6} {'d_inner':>7} {'method':>8} {'fwd s':>7} {'bwd s':>7} {'total s':>8}"
              f" {'peak GB':>8} {'loop/x':>7} {'mambapy/x':>9} {'mem x/mambapy':>13}")
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        for d_inner in args.d_inner:
            results = {m: _measure(m, length, d_inner, args.d_state, args.threads, args.timeout,
                                   args.mmap_threshold)
                       for m in methods}
            loop_t = results.get("loop", {}).get("total_s")
            mpy = results.get("mambapy", {})
            for m, r in results.items():
                if "error" in r:
                    print(f"{length:>6} {d_inner:>7} {m:>8}  {r['error']}")
                    continue
                mem_ratio = (f"{r['peak_bytes'] / mpy['peak_bytes']:13.2f}"
                             if mpy.get("peak_bytes") else f"{'-':>13}")
                print(f"{length:>6} {d_inner:>7} {m:>8} {r['forward_s']:7.2f} "
                      f"{r['backward_s']:7.2f} {r['total_s']:8.2f} {r['peak_bytes'] / 1e9:8.2f} "
                      f"{_fmt_ratio(loop_t, r['total_s']):>7} "
                      f"{_fmt_ratio(mpy.get('total_s'), r['total_s']):>9} {mem_ratio}"
                      + ("" if r["finite"] else "  (non-finite grads!)"))
            sys.stdout.flush()


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
