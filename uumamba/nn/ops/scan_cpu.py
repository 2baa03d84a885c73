"""Fused multi-threaded CPU selective scan (numba), forward and backward.

Same recurrence and shapes as :func:`uumamba.nn.ops.selective_scan.selective_scan`. The design
follows mamba-ssm's CUDA kernel (``selective_scan_fwd_kernel`` / ``selective_scan_bwd_kernel``)
translated to CPU threads:

* forward: the (batch, channel) scans, shared out in contiguous blocks whose buffers are
  allocated once per block. The state h (d_state values) lives in a local array, and the D
  skip is added inside the loop. Chunk by chunk, the decays exp(delta_t A)
  of every position are computed in one vectorised pass before the recurrence runs over
  them. Only the state entering every chunk of ``CHUNK`` positions is stored, (batch,
  d_inner, n_chunks, d_state), never (batch, d_inner, L, d_state).
* backward: one task per (batch, group of channels). For each channel the chunks are visited
  last to first; inside a chunk the states are recomputed from the saved boundary state into a
  (CHUNK + 1, d_state) buffer, then the reverse scan runs
  ``g_t = dL/dh_t = C_t * dy_t + exp(delta_{t+1} A) * g_{t+1}`` and produces the gradients of
  u, delta, A, B, C and D. B and C are shared by all channels: every channel group
  accumulates into its own (L, d_state) partial buffer, and the partials are summed
  afterwards, so no task races and nothing of size (batch, d_inner, d_state, L) is allocated.
* elementwise steps outside the recurrence, delta + bias, softplus and the silu(z) gate, run
  in torch (vectorised; their gradients by autograd) rather than as scalar transcendentals
  per position inside the kernels, where they took 40 % of the forward.

Kernels are compiled on first use (``cache=True`` keeps the machine code on disk for later
processes) for float32, and for float64 if float64 inputs arrive. Thread count follows
``torch.get_num_threads()``. Calls are serialised by a lock because numba's workqueue
threading layer must not be entered from two Python threads at once.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from uumamba.nn.ops.scan_inputs import check_scan_inputs, finish_output, prepare_delta

__all__ = ["CHUNK", "selective_scan_cpu"]

CHUNK = 256  # positions between saved states; the backward recomputes inside each chunk
_LOCK = threading.Lock()


# 2^f = sum_j (ln 2)^j / j! * f^j on |f| <= 1/2; degree 7 leaves a relative error < 1e-8,
# below float32 rounding. Used for float32 only; float64 kernels call math.exp.
_LN2 = math.log(2.0)
_P = [np.float32(_LN2**j / math.factorial(j)) for j in range(8)]
_P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7 = _P
_LOG2E = np.float32(1.0 / _LN2)
_ROUND = np.float32(12582912.0)  # 1.5 * 2^23: (v + _ROUND) - _ROUND rounds v to an integer
_EXP2_MIN = np.float32(-126.0)
_EXP2_MAX = np.float32(127.0)
# LLVM may re-associate every float + and x in the two kernels (what it uses it for: the
# k-loops of y = C_t . h_t and of the gradients); no FMA contraction, no approximate
# functions, no assumption that values are finite (NaN / inf propagate). Float32 kernels sum
# in float64 accumulators, so their results came out bit-identical on the inputs measured
# (not guaranteed: terms spanning more than ~2^25 in magnitude, or float64 kernels, may round
# otherwise, and may then differ between CPUs of other vector widths). Effect measured on the
# 2D bottleneck (16 x 512 channels, L 64, forward kernel alone, one thread; benchmarks/README.md,
# "Prediction"): 13.6 ms; blocked jobs 13.1; reassoc 11.3; both 9.9.
_FASTMATH = {"reassoc"}


# fastmath must stay False here, explicitly: a numba callee without its own setting takes
# its caller's, and re-association would fold (v + _ROUND) - _ROUND into v.
@njit(fastmath=False, cache=True)
def _exp_into(x, out, bits, bits_as_float, n, precise):
    """out[:n] = exp(x[:n]) for 1-D arrays. ``precise`` (float64 kernels): libm exp. Otherwise
    a vectorisable float32 exp: x / ln 2 = k + f with integer k and |f| <= 1/2,
    2^f by its degree-7 Taylor polynomial, 2^k built in the exponent bits of ``bits`` (int32)
    whose float32 view is ``bits_as_float``; arguments below -126 ln 2 give ~1e-38, not 0."""
    if precise:
        for k in range(n):
            out[k] = math.exp(x[k])
        return
    for k in range(n):
        v = x[k] * _LOG2E
        if v < _EXP2_MIN:
            v = _EXP2_MIN
        if v > _EXP2_MAX:
            v = _EXP2_MAX
        whole = (v + _ROUND) - _ROUND
        f = v - whole
        p = _P7 * f + _P6
        p = p * f + _P5
        p = p * f + _P4
        p = p * f + _P3
        p = p * f + _P2
        p = p * f + _P1
        p = p * f + _P0
        bits[k] = (np.int32(whole) + np.int32(127)) * np.int32(8388608)
        out[k] = p
    for k in range(n):
        out[k] = out[k] * bits_as_float[k]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _scan_fwd_kernel(u, delta, A, Bt, Ct, D, chunk, n_blocks, out, states):
    """Forward scan. u, delta, out: (b, d, L); A: (d, n); Bt, Ct: (b, L, n) (transposed B, C);
    D: (d,); states: (b, d, ceil(L / chunk), n), written with the state entering each chunk.
    ``out`` receives y = C_t . h_t + D u_t. The b * d (batch, channel) scans are shared out
    in ``n_blocks`` contiguous blocks, each with its buffers allocated once. Chunk by chunk,
    the decays exp(delta_t A) of all its positions are computed first, in one call of
    :func:`_exp_into` over ``steps * n`` values (long enough to vectorise: a third less time
    than n values per position at d_state 16), then the recurrence runs over them."""
    batch, d_inner, length = u.shape
    n = A.shape[1]
    n_chunks = states.shape[2]
    jobs = batch * d_inner
    precise = states.itemsize == 8  # float64 kernels use libm exp
    for blk in prange(n_blocks):
        h = np.empty(n, dtype=states.dtype)
        arg = np.empty(chunk * n, dtype=states.dtype)
        decay = np.empty(chunk * n, dtype=states.dtype)  # exp(delta_t A), row-major (t, k)
        bits = np.empty(chunk * n, dtype=np.int32)
        bits_as_float = bits.view(np.float32)
        for job in range(blk * jobs // n_blocks, (blk + 1) * jobs // n_blocks):
            bi = job // d_inner
            di = job % d_inner
            h[:] = 0.0
            A_d = A[di]
            for c in range(n_chunks):
                t0 = c * chunk
                steps = min(length - t0, chunk)
                states[bi, di, c, :] = h
                _chunk_exponents(delta, A_d, bi, di, t0, steps, arg)
                _exp_into(arg, decay, bits, bits_as_float, steps * n, precise)
                for i in range(steps):
                    t = t0 + i
                    ut = u[bi, di, t]
                    dtu = delta[bi, di, t] * ut
                    B_t = Bt[bi, t]
                    C_t = Ct[bi, t]
                    row = i * n
                    y = 0.0
                    for k in range(n):
                        hk = decay[row + k] * h[k] + dtu * B_t[k]
                        h[k] = hk
                        y += hk * C_t[k]
                    out[bi, di, t] = y + D[di] * ut


@njit(fastmath=False, cache=True)  # explicit: see _exp_into
def _chunk_exponents(delta, A_d, bi, di, t0, steps, arg):
    """arg[i * n + k] = delta[bi, di, t0 + i] * A_d[k] for i < steps: the exponents of the
    decays of one chunk of (batch bi, channel di)."""
    n = A_d.shape[0]
    for i in range(steps):
        dt = delta[bi, di, t0 + i]
        row = i * n
        for k in range(n):
            arg[row + k] = dt * A_d[k]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _scan_bwd_kernel(u, delta, A, Bt, Ct, D, chunk, states, dout, n_groups,
                     du_out, ddelta_out, dA_part, dD_part, dB_part, dC_part):
    """Backward scan. Inputs as :func:`_scan_fwd_kernel` plus dout (b, d, L). Writes du_out,
    ddelta_out: (b, d, L); per (batch, channel) partials dA_part (b, d, n), dD_part (b, d);
    per (batch, channel group) partials dB_part, dC_part (b, n_groups, L, n). Partials are
    summed by the caller."""
    batch, d_inner, length = u.shape
    n = A.shape[1]
    n_chunks = states.shape[2]
    precise = states.itemsize == 8  # float64 kernels use libm exp
    for job in prange(batch * n_groups):
        bi = job // n_groups
        grp = job % n_groups
        d_start = grp * d_inner // n_groups
        d_stop = (grp + 1) * d_inner // n_groups
        hbuf = np.empty((chunk + 1, n), dtype=states.dtype)  # h_{t-1} at row i, h_t at row i + 1
        abuf = np.empty(chunk * n, dtype=states.dtype)  # exp(delta_t * A), row-major (t, k)
        arg = np.empty(chunk * n, dtype=states.dtype)
        bits = np.empty(chunk * n, dtype=np.int32)
        bits_as_float = bits.view(np.float32)
        g_next = np.zeros(n, dtype=states.dtype)  # exp(delta_{t+1} A) * g_{t+1}
        g = np.empty(n, dtype=states.dtype)  # dL/dh_t
        d_log_a = np.empty(n, dtype=states.dtype)  # dL/d(delta_t * A)
        dA_acc = np.zeros(n, dtype=np.float64)
        dB_g = dB_part[bi, grp]
        dC_g = dC_part[bi, grp]
        for di in range(d_start, d_stop):
            g_next[:] = 0.0
            dA_acc[:] = 0.0
            dD_acc = 0.0
            A_d = A[di]
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                steps = min(length - t0, chunk)
                hbuf[0, :] = states[bi, di, c, :]
                _chunk_exponents(delta, A_d, bi, di, t0, steps, arg)
                _exp_into(arg, abuf, bits, bits_as_float, steps * n, precise)
                for i in range(steps):  # recompute the states of this chunk
                    t = t0 + i
                    dtu = delta[bi, di, t] * u[bi, di, t]
                    B_t = Bt[bi, t]
                    a_i = abuf[i * n:(i + 1) * n]
                    h_prev = hbuf[i]
                    h_i = hbuf[i + 1]
                    for k in range(n):
                        h_i[k] = a_i[k] * h_prev[k] + dtu * B_t[k]
                for i in range(steps - 1, -1, -1):  # reverse scan
                    t = t0 + i
                    ut = u[bi, di, t]
                    dt = delta[bi, di, t]
                    dy = dout[bi, di, t] * 1.0
                    dD_acc += dy * ut
                    dtu = dt * ut
                    B_t = Bt[bi, t]
                    C_t = Ct[bi, t]
                    dB_t = dB_g[t]
                    dC_t = dC_g[t]
                    a_i = abuf[i * n:(i + 1) * n]
                    h_prev = hbuf[i]
                    h_i = hbuf[i + 1]
                    for k in range(n):
                        g[k] = g_next[k] + dy * C_t[k]
                    for k in range(n):
                        dC_t[k] += dy * h_i[k]
                        dB_t[k] += g[k] * dtu
                        d_log_a[k] = g[k] * h_prev[k] * a_i[k]
                        dA_acc[k] += d_log_a[k] * dt
                        g_next[k] = g[k] * a_i[k]
                    d_dtu = 0.0  # dL/d(delta_t * u_t)
                    d_dt = 0.0  # dL/d(delta_t) through the decay
                    for k in range(n):
                        d_dtu += g[k] * B_t[k]
                        d_dt += d_log_a[k] * A_d[k]
                    du_out[bi, di, t] = d_dtu * dt + dy * D[di]
                    ddelta_out[bi, di, t] = d_dt + d_dtu * ut
            for k in range(n):
                dA_part[bi, di, k] = dA_acc[k]
            dD_part[bi, di] = dD_acc


def _numba_threads() -> int:
    """Threads for the kernels: torch's setting, capped by numba's pool size."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def _kernel_launch():
    """Serialise kernel launches and keep torch's intra-op thread count as it was.

    When numba's threading layer is OpenMP, its first parallel launch resets the process-wide
    OpenMP thread count (which torch shares) to numba's pool size; restoring it keeps CPU runs
    reproducible and stops oversubscription.
    """
    torch_threads = torch.get_num_threads()
    with _LOCK:
        try:
            yield
        finally:
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)


class _SelectiveScanCPU(torch.autograd.Function):
    """autograd wrapper around the fused kernels: y = scan(u, delta, A, B, C) + D u, where
    delta is already delta + bias (softplus'd); all tensors contiguous, one dtype."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D):
        batch, d_inner, length = u.shape
        n = A.shape[1]
        n_chunks = max(1, -(-length // CHUNK))
        Bt = B.transpose(1, 2).contiguous()
        Ct = C.transpose(1, 2).contiguous()
        out = torch.empty_like(u)
        states = u.new_empty((batch, d_inner, n_chunks, n))
        with _kernel_launch():
            threads = _numba_threads()
            _scan_fwd_kernel(*_np(u, delta, A, Bt, Ct, D), CHUNK,
                             max(1, min(batch * d_inner, 8 * threads)), *_np(out, states))
        ctx.save_for_backward(u, delta, A, Bt, Ct, D, states)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, Bt, Ct, D, states = ctx.saved_tensors
        batch, d_inner, length = u.shape
        n = A.shape[1]
        dout = dout.to(u.dtype).contiguous()
        du = torch.empty_like(u)
        ddelta = torch.empty_like(u)
        dA = u.new_empty((batch, d_inner, n))
        dD = u.new_empty((batch, d_inner))
        with _kernel_launch():
            n_groups = min(d_inner, _numba_threads())
            dB = u.new_zeros((batch, n_groups, length, n))
            dC = u.new_zeros((batch, n_groups, length, n))
            _scan_bwd_kernel(*_np(u, delta, A, Bt, Ct, D), CHUNK, *_np(states, dout), n_groups,
                             *_np(du, ddelta, dA, dD, dB, dC))
        dB = dB.sum(1).transpose(1, 2)
        dC = dC.sum(1).transpose(1, 2)
        return du, ddelta, dA.sum(0), dB, dC, dD.sum(0)


def _np(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Zero-copy numpy views of contiguous CPU tensors (detached)."""
    return [t.detach().numpy() for t in tensors]


def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
) -> torch.Tensor:
    """Fused numba selective scan on CPU tensors, autograd-capable.

    Shapes as :func:`uumamba.nn.ops.selective_scan.selective_scan`: u, delta, z
    (batch, d_inner, L); A (d_inner, d_state); B, C (batch, d_state, L); D, delta_bias
    (d_inner,). Computes in float32 (float64 when an input is float64); returns
    (batch, d_inner, L) in that dtype. Gradients reach every input that requires them, in the
    input's own dtype. Extra memory: (batch, d_inner, ceil(L / CHUNK), d_state) saved states,
    plus 2 * (batch, threads, L, d_state) partial B / C gradients in backward, plus what
    autograd keeps of the elementwise steps in torch: up to four (batch, d_inner, L) tensors
    (delta + bias, its softplus, y and silu(z)).

    Raises:
        ValueError: a tensor is not on the CPU, or the shapes do not agree (the kernels index
            by u's and A's sizes: a short B would be read past its end).
        TypeError: a non-tensor or non-floating-point input.

    Source: mamba-ssm's selective_scan_fwd / bwd CUDA kernels (chunked states, recomputation,
    reverse scan), Gu & Dao 2023 Algorithm 2.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for name, t in zip(names, tensors, strict=True):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"selective_scan_cpu: {name} is on device '{t.device}', not the CPU")
    dtype = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    d_inner = u.shape[1]
    u, delta, A, B, C = (t.to(dtype).contiguous() for t in (u, delta, A, B, C))
    D = u.new_zeros(d_inner) if D is None else D.to(dtype).contiguous()
    # The elementwise steps run in torch, vectorised, their gradients by autograd; inside the
    # kernels their scalar transcendentals per position (softplus's log1p(exp(x)), the gate's
    # sigmoid, forward and backward) took 40 % of the forward.
    delta = prepare_delta(delta, None if delta_bias is None else delta_bias.to(dtype),
                           delta_softplus)
    y = _SelectiveScanCPU.apply(u, delta.contiguous(), A, B, C, D)
    return finish_output(y, u, None, None if z is None else z.to(dtype))  # D: in the kernel
