"""Deterministic compute-cost model of one training iteration, for sizing a plan to a CPU.

The planner (:mod:`uumamba.data.plan`) sizes GPU plans to memory; on a CPU the binding limit
is time. This module counts the work of one training iteration of the U-Mamba network
(:mod:`uumamba.nn.umamba`) from the topology the planner computes — no timing of the machine,
so the same fingerprint and budget always give the same plan:

* ``macs``: multiply-accumulates of one forward pass of one sample: the stem, every encoder
  residual block (two k-convolutions, plus a 1x1 projection where channels or stride change),
  each decoder level (transposed convolution, k-convolutions on the concatenated skip, 1x1
  head) and the Mamba layers (input / output projections, ``x_proj``, ``dt_proj``, causal
  conv, and the selective scan's ``d_inner x d_state`` recurrence per token);
* ``elements``: activation elements written by one forward pass of one sample (each
  convolution's output passes instance norm and LeakyReLU; these memory-bound passes cost
  per element, not per MAC);
* ``voxels``: voxels per patch (data loading, augmentation, loss: per voxel).

Seconds per iteration on the reference machine::

    t = passes x batch x (macs / MACS_PER_S + elements / ELEMENTS_PER_S)
        + batch x voxels x SECONDS_PER_VOXEL + SECONDS_PER_ITERATION

where ``passes`` (:func:`optimizer_passes`) is 1 for SGD / AdamW, 2 for SAM / ASAM (a second
forward-backward at the perturbed weights), ``1 + 1/k`` for LookSAM, ``1 + p`` for RST and
``1 + 1/BACKWARD_FACTOR`` for EMA-KL (one forward without backward), and the per-pass costs
include the backward pass (about twice the forward).

Calibration (the constants below), measured 2026-12-01 on the reference machine: 2 cores
(Intel Xeon, AVX-512 and AMX), torch 2.13 CPU, 2 threads, float32 (``train.amp=auto``
trains in bf16 on CPUs with AMX or AVX512-BF16, where a 2D step's compute takes about 2/3
to 3/4 of this: the plan is then sized conservatively, never too large), shared with other
jobs (load average 1.6-2.5; the fastest of 4 repetitions after a warm-up was kept). The step terms
come from ``benchmarks/bench_3d_cpu.py --calibrate`` (single AdamW training steps, no data
loading) over eight U-Mamba-Bot topologies: 3D 32^3 to 112 x 80 x 40 at base features 16 and
32, batch 1-2, and 2D 128^2 x 8 and 256 x 224 x 4; a two-term fit (MACs, elements) to the
64^3 x 2 (1.64 s) and 112 x 80 x 40 x 2 (6.8 s) steps puts every other topology within 1.0-
1.5x of its measurement, never under (e.g. 48^3 x 1: 0.34 s model and measured; 96 x 80 x 64
x 1: 1.5 s model, 1.05 s measured). The data term was checked against whole training
iterations of the benchmark (its ``time_estimate.json``: 13.6 s measured vs 14.5 s model for
the GPU-sized plan of the 200 x 140 x 88 atrium with SAM, about 3.4 s vs 2.5 s for its CPU
plan, at load 2-3). 8 base features were measured slower than 16 (oneDNN is inefficient
with so few channels), so the CPU plan never goes below 16. A machine N times faster needs
``plan.cpu_budget_s`` N times larger for the same wall time; the estimate ranks plans and
gives their scale, it is not a promise: the training loop measures the real rate
(:mod:`uumamba.engine.estimate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Effective multiply-accumulates per second of forward + backward (measured, see above).
MACS_PER_S = 9.3e10
#: Activation elements per second (norm, activation, their backward; measured).
ELEMENTS_PER_S = 2.6e8
#: Data loading, augmentation and loss per patch voxel (measured).
SECONDS_PER_VOXEL = 1.0e-6
#: Fixed cost of an iteration (optimizer step, bookkeeping; measured).
SECONDS_PER_ITERATION = 0.05
#: Forward + backward relative to the forward pass alone.
BACKWARD_FACTOR = 3.0


@dataclass(frozen=True)
class IterationCost:
    """The work of one training iteration (see the module docstring).

    Attributes:
        macs: forward multiply-accumulates of one sample.
        elements: forward activation elements of one sample.
        voxels: voxels per patch.
        batch_size: patches per iteration.
        passes: forward-backward passes per iteration (:func:`optimizer_passes`).
    """

    macs: float
    elements: float
    voxels: float
    batch_size: int
    passes: float

    @property
    def seconds(self) -> float:
        """Estimated seconds per iteration on the reference machine (module docstring)."""
        per_pass = BACKWARD_FACTOR * (self.macs / MACS_PER_S + self.elements / ELEMENTS_PER_S)
        return (self.passes * self.batch_size * per_pass
                + self.batch_size * self.voxels * SECONDS_PER_VOXEL + SECONDS_PER_ITERATION)


def _prod(values: Sequence[int | float]) -> float:
    return float(math.prod(float(v) for v in values))


def iteration_cost(patch: Sequence[int], strides: Sequence[Sequence[int]],
                   kernel_sizes: Sequence[Sequence[int]], features: Sequence[int], *,
                   in_channels: int = 1, num_classes: int = 2, batch_size: int = 2,
                   model_name: str = "umamba_bot", n_blocks: int | Sequence[int] = 1,
                   n_conv_decoder: int = 1, d_state: int = 16, expand: int = 2,
                   d_conv: int = 4, passes: float = 1.0) -> IterationCost:
    """Count the work of one training iteration of a U-Mamba network.

    Args:
        patch: patch size (voxels) per axis.
        strides / kernel_sizes: per stage, per axis (the plan's).
        features: channels per stage (at least as many entries as ``strides``).
        in_channels / num_classes: input channels and output classes.
        batch_size: patches per iteration.
        model_name: ``umamba_bot`` (Mamba at the bottleneck), ``umamba_enc`` (after every
            stage) or ``unet`` (none).
        n_blocks: residual blocks per encoder stage (one int or one per stage).
        n_conv_decoder: convolutions per decoder level.
        d_state / expand / d_conv: Mamba settings.
        passes: forward-backward passes per iteration (:func:`optimizer_passes`).

    Returns:
        :class:`IterationCost`.

    Raises:
        ValueError: ``features`` has fewer stages than ``strides``.
    """
    n_stages = len(strides)
    if len(features) < n_stages:
        raise ValueError(f"features has {len(features)} stages, the topology {n_stages}")
    blocks = list(n_blocks) if isinstance(n_blocks, Sequence) else [n_blocks] * n_stages
    voxels = [_prod(patch)]
    for stride in strides[1:]:
        voxels.append(voxels[-1] / _prod(stride))
    macs = elements = 0.0
    k0 = _prod(kernel_sizes[0])
    macs += voxels[0] * k0 * in_channels * features[0]  # stem
    elements += voxels[0] * features[0]
    for s in range(n_stages):
        v, k, c = voxels[s], _prod(kernel_sizes[s]), features[s]
        c_in = features[max(s - 1, 0)]
        for b in range(blocks[min(s, len(blocks) - 1)]):
            first = b == 0
            cin = c_in if first else c
            macs += v * k * (cin * c + c * c)
            elements += 2 * v * c
            if first and (cin != c or _prod(strides[s]) > 1):
                macs += v * cin * c
                elements += v * c
        if model_name == "umamba_enc" or (model_name == "umamba_bot" and s == n_stages - 1):
            d_inner = expand * c
            dt_rank = math.ceil(c / 16)
            per_token = (c * 2 * d_inner + d_inner * c + d_inner * (dt_rank + 2 * d_state)
                         + dt_rank * d_inner + d_conv * d_inner + 3 * d_inner * d_state)
            macs += v * per_token
            elements += v * (4 * d_inner + c)
    for s in range(n_stages - 1):  # decoder level producing stage s's resolution
        v, k, c = voxels[s], _prod(kernel_sizes[s]), features[s]
        macs += voxels[s + 1] * _prod(strides[s + 1]) * features[s + 1] * c  # transposed conv
        macs += v * k * (2 * c * c + (n_conv_decoder - 1) * c * c)
        macs += v * c * num_classes  # head (deep supervision: every level)
        elements += v * c * (2 + n_conv_decoder) + v * num_classes
    return IterationCost(macs=macs, elements=elements, voxels=voxels[0],
                         batch_size=int(batch_size), passes=float(passes))


def optimizer_passes(name: str, *, looksam_k: int = 5, sam_probability: float = 0.5) -> float:
    """Forward-backward passes per iteration of an ``optim.name`` (see the module docstring):
    what a sharpness-aware optimizer costs relative to a plain step, before overheads."""
    if name in ("sam", "asam"):
        return 2.0
    if name == "looksam":
        return 1.0 + 1.0 / looksam_k
    if name == "rst":
        return 1.0 + sam_probability
    if name == "ema_kl":
        return 1.0 + 1.0 / BACKWARD_FACTOR
    return 1.0
