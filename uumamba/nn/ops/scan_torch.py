"""Pure-PyTorch selective scan: blocked cumulative-sum form with a hand-written backward.

The portable backend (any device torch runs on; the fallback where neither mamba-ssm's CUDA
kernel nor the numba CPU kernel applies). The recurrence and shapes are those of
:func:`uumamba.nn.ops.selective_scan.selective_scan`; here, per batch b, position t,
channel d and state n::

    a_t = exp(delta_t * A)            x_t = delta_t * u_t * B_t
    h_t = a_t * h_{t-1} + x_t         y_t = sum_n C_t * h_t

Method (all tensors in the (batch, L, d_inner, d_state) layout, so every large operation
runs over contiguous (d_inner, d_state) rows):

* The sequence is cut into blocks of T positions (T = 64 or less, see below). Inside a
  block, with S_t the inclusive cumulative sum of log a over the block and E_t = exp(-S_t),
  the recurrence has the closed form

      h_t = (sum_{s <= t} E_s x_s + H) / E_t,

  where H is the state entering the block: one multiply, one ``cumsum``, one add and one
  divide over all blocks at once. A short loop over blocks carries H (tensors of
  (batch, d_inner, d_state) only).
* The adjoint recurrence g_t = a_{t+1} g_{t+1} + C_t dy_t runs backwards in time: it is the
  same blocked forward scan applied to the chunk in reversed order, with delta shifted by one
  position (a suffix sum taken as total minus prefix would cancel catastrophically). The
  input gradients follow from g without a per-position loop: dx_t = g_t and
  d(log a)_t = g_t * (h_t - x_t) (since a_t h_{t-1} = h_t - x_t).
* Blocks are grouped into chunks of about ``_CHUNK_ELEMENTS`` (batch, chunk, d_inner,
  d_state) elements. The forward keeps only each chunk's entry state; the backward
  recomputes a chunk's states from it, then runs the adjoint scan over that chunk, last
  chunk first — the same save-boundaries-and-recompute scheme as mamba-ssm's CUDA kernel.
  Memory is O(batch * L * d_inner) for inputs and gradients plus a few chunk-sized buffers;
  no (batch, d_inner, L, d_state) tensor is ever made.

Numerical range: E_t spans exp(|S_t|), so the block length T is chosen per call as the
largest power of two in [4, 64] with T * max|delta * A| <= 64 (exp(64) ~ 6e27, far inside
float32); within a block |S_t| <= 64, and the cumulative sums lose at most ~64 float32
ulps of S (relative error ~1e-5 in the worst case, ~1e-7 typically). When even T = 4 would
exceed the range (steps with delta * A < -16), those log-decays are raised to -16: the
decay exp(-16) ~ 1.1e-7 replaces a smaller one, a change in h below float32 resolution of
the previous state. In float64 the same rules use a range of 512 and a floor of -37, so
float64 results keep float64 accuracy. Growing recurrences (delta * A > 16, only possible
with A > 0) overflow as the exact recurrence does.

Cost: about 17 contiguous passes over a chunk's (positions, d_inner, d_state) elements in the
forward and 50 in the backward, plus a Python loop over blocks (L / T iterations of small
operations). On a GPU that loop means many small kernel launches: prefer the ``cuda``
backend (mamba-ssm) there; this one is the portable fallback.

Source: the recurrence is Gu & Dao 2023 (Mamba), Algorithm 2; the chunked save-and-recompute
backward mirrors mamba-ssm's ``selective_scan`` CUDA kernel (csrc/selective_scan); the
cumulative-sum solution of a first-order linear recurrence is the classical one (e.g. Blelloch
1990, "Prefix sums and their applications", section 1.4).
"""

from __future__ import annotations

import torch

__all__ = ["TORCH_CHUNK", "scan_core_torch"]

# Positions per chunk; None: as many whole blocks as fit in _CHUNK_ELEMENTS elements of a
# (batch, chunk, d_inner, d_state) tensor (small chunks stay in the CPU caches).
TORCH_CHUNK: int | None = None
_CHUNK_ELEMENTS = 1 << 20
# Block length bounds (powers of two) and the cumulative log-decay range allowed in a block.
_BLOCK_MAX = 64
_BLOCK_MIN = 4
# (range of the cumulative log-decay in a block, floor of one step's log-decay):
# float32: |S| <= 64 keeps exp(+-S) ~ 6e27 / 2e-28 normal; exp(-16) ~ 1.1e-7 ~ float32 eps.
# float64: exp(+-512) is still normal; exp(-37) ~ 8.5e-17 is below float64 eps.
_LIMITS_FLOAT32 = (64.0, -16.0)
_LIMITS_FLOAT64 = (512.0, -37.0)


def _limits(dtype: torch.dtype) -> tuple[float, float]:
    """(range, floor) of the log-decay for ``dtype`` (float32's for anything but float64)."""
    return _LIMITS_FLOAT64 if dtype == torch.float64 else _LIMITS_FLOAT32


def _block_length(delta: torch.Tensor, A: torch.Tensor) -> tuple[int, bool]:
    """Block length T and whether log-decays need the floor, from max|delta| * max|A| per channel.

    delta: (batch, L, d_inner); A: (d_inner, d_state), float32 or float64 (the allowed range
    and the floor depend on it). NaN inputs give T = _BLOCK_MAX (the output is NaN either way).
    """
    if delta.numel() == 0 or A.numel() == 0:
        return _BLOCK_MAX, False
    step = float((delta.detach().abs().amax(dim=(0, 1)) * A.detach().abs().amax(dim=1)).max())
    limit = _limits(delta.dtype)[0]
    block = _BLOCK_MAX
    while block > _BLOCK_MIN and block * step > limit:
        block //= 2
    return block, block * step > limit


def _chunk_length(block: int, width: int) -> int:
    """Positions per chunk: a multiple of ``block``; ``width`` = batch * d_inner * d_state."""
    if TORCH_CHUNK is not None:
        return max(block, int(TORCH_CHUNK) // block * block)
    return max(block, _CHUNK_ELEMENTS // max(width, 1) // block * block)


def _decay_weights(delta_c, neg_A, block, floor):
    """E = exp(-S) per block, (batch, M, T, d_inner, d_state); S = cumsum of delta * A in a block.

    delta_c: (batch, M*T, d_inner); neg_A: -A, (d_inner, d_state).
    """
    b, length, d = delta_c.shape
    E = delta_c[..., None] * neg_A  # -log a, (b, M*T, d, n)
    if floor:
        E.clamp_max_(-_limits(E.dtype)[1])
    E = E.view(b, length // block, block, d, neg_A.shape[1])
    return E.cumsum_(dim=2).exp_()


def _inputs(delta_u, B_c, shape):
    """x = (delta * u) * B as (batch, M, T, d_inner, d_state) blocks; delta_u (batch, M*T,
    d_inner), B_c (batch, M*T, d_state)."""
    return (delta_u[..., None] * B_c[:, :, None, :]).view(shape)


def _scan_blocks(E, x, h0):
    """States h (in x's storage) of the blocks of one chunk, and the state after the chunk.

    E, x: (batch, M, T, d_inner, d_state); h0: (batch, d_inner, d_state), the state before.
    """
    x.mul_(E).cumsum_(dim=2)
    entry = torch.empty_like(x[:, :, :1])
    state = h0
    for m in range(x.shape[1]):
        entry[:, m, 0] = state
        state = (x[:, m, -1] + state) / E[:, m, -1]
    return x.add_(entry).div_(E), state


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of a (batch, L, k) tensor to ``length`` (contiguous)."""
    if t.shape[1] == length:
        return t.contiguous()
    out = t.new_zeros(t.shape[0], length, t.shape[2])
    out[:, : t.shape[1]] = t
    return out


class _ScanCore(torch.autograd.Function):
    """y = sum_n C * h over (batch, L, ·) inputs; see the module docstring."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        b, length, d = u.shape
        n = A.shape[1]
        block, floor = _block_length(delta, A)
        padded = -(-length // block) * block  # padding: delta = 0 (a = 1) and u = 0 (x = 0)
        u, delta, B, C = (_pad_to(t, padded) for t in (u, delta, B, C))
        chunk = _chunk_length(block, b * d * n)
        neg_A = -A
        y = u.new_empty(b, padded, d)
        entries = []
        state = u.new_zeros(b, d, n)
        for s in range(0, padded, chunk):
            sl = slice(s, min(s + chunk, padded))
            entries.append(state)
            E = _decay_weights(delta[:, sl], neg_A, block, floor)
            x = _inputs(delta[:, sl] * u[:, sl], B[:, sl], E.shape)
            h, state = _scan_blocks(E, x, state)
            y[:, sl] = torch.matmul(h.view(b, -1, d, n), C[:, sl, :, None])[..., 0]
        entries = torch.stack(entries) if entries else u.new_zeros(0, b, d, n)
        ctx.save_for_backward(u, delta, A, B, C, entries)
        ctx.setup = (length, block, floor, chunk)
        return y[:, :length]

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, entries = ctx.saved_tensors
        length, block, floor, chunk = ctx.setup
        b, padded, d = u.shape
        n = A.shape[1]
        dy = _pad_to(dy, padded)
        # the adjoint runs backwards in time with decay a_{t+1}: delta shifted by one
        # position (0, i.e. a = 1, after the end), in reversed order inside each chunk
        delta_next = _pad_to(delta[:, 1:], padded)
        du, ddelta, dB, dC = (torch.empty_like(t) for t in (u, delta, B, C))
        dA = torch.zeros_like(A)
        neg_A = -A
        carry = u.new_zeros(b, d, n)  # adjoint g at the first position after the chunk
        starts = list(range(0, padded, chunk))
        for k in range(len(starts) - 1, -1, -1):
            sl = slice(starts[k], min(starts[k] + chunk, padded))
            delta_c, u_c, B_c = delta[:, sl], u[:, sl], B[:, sl]
            du_c = delta_c * u_c
            E = _decay_weights(delta_c, neg_A, block, floor)
            h, _ = _scan_blocks(E, _inputs(du_c, B_c, E.shape), entries[k])
            rows = h.view(b, -1, d, n)
            dC[:, sl] = torch.matmul(dy[:, sl, None, :], rows)[:, :, 0]  # sum_d dy * h
            # adjoint g_t = a_{t+1} g_{t+1} + C_t dy_t: a forward scan in reversed time
            E = _decay_weights(delta_next[:, sl].flip(1), neg_A, block, floor)
            c = (dy[:, sl].flip(1)[..., None] * C[:, sl].flip(1)[:, :, None, :]).view(E.shape)
            g, carry = _scan_blocks(E, c, carry)
            del E
            g_rows = g.view(b, -1, d, n).flip(1)
            del g, c
            gB = torch.matmul(g_rows, B_c[..., None])[..., 0]  # sum_n g * B, (b, chunk, d)
            dB[:, sl] = torch.matmul(du_c[:, :, None, :], g_rows)[:, :, 0]  # sum_d g * delta u
            # d(log a)_t = g_t * a_t * h_{t-1} = g_t * (h_t - x_t)
            dlog_a = _inputs(du_c, B_c, rows.shape)
            torch.sub(rows, dlog_a, out=dlog_a).mul_(g_rows)
            del g_rows, h, rows
            if floor:  # log a was raised to the floor there: its derivative is zero
                dlog_a.masked_fill_(delta_c[..., None] * neg_A > -_limits(A.dtype)[1], 0.0)
            du[:, sl] = gB * delta_c
            dA.add_((dlog_a * delta_c[..., None]).sum(dim=(0, 1)))
            ddelta[:, sl] = torch.addcmul(dlog_a.mul_(A).sum(dim=-1), gB, u_c)
        return du[:, :length], ddelta[:, :length], dA, dB[:, :length], dC[:, :length]


def scan_core_torch(u, delta, A, B, C):
    """Selective scan without D / gate / delta preprocessing, in the sequence-major layout.

    Args:
        u, delta: (batch, L, d_inner) (delta already biased / softplus-ed, float32 or
            float64); A: (d_inner, d_state); B, C: (batch, L, d_state); one dtype and device.

    Returns:
        y: (batch, L, d_inner), y_t = sum_n C_t h_t; differentiable in every input.
    """
    return _ScanCore.apply(u, delta, A, B, C)
