"""One training iteration: forward, loss, backward, optimizer update — plain, SAM / ASAM, or a
cheaper sharpness-aware variant (LookSAM and RST take SAM's two passes on some iterations and
one pass on the others; EMA-KL adds a gradient-free forward with the averaged weights and a KL
term to the loss).

The training loop calls :func:`training_step` once per batch. It owns the details that are easy
to get wrong with SAM:

- Mixed precision: forward and loss under ``torch.autocast(device_type, autocast_dtype)``;
  with a ``GradScaler`` (fp16) the first-pass gradients are unscaled before SAM's perturbation
  norm, the second pass is unscaled with ``scaler.unscale_`` (which records the inf check), and a
  non-finite pass ends the iteration with ``scaler.update()`` so the scale backs off. Weights
  are then bit-identical to before the step (restored by copy) — never NaN.
- Clipping: the global gradient norm (all optimizer parameters, including the loss's sigma)
  is clipped to ``grad_clip`` (nnU-Net: 12) on the gradients that are applied — for SAM the
  second-pass gradients at w + e.
- BatchNorm: the second SAM forward runs inside :func:`frozen_batchnorm_stats`, so running
  statistics are updated once per iteration, by the pass at the real weights. (InstanceNorm, the
  nnU-Net default, has no running statistics.)
- Distributed: with DDP the model's gradients are all-reduced by each backward; the loss's own
  parameters (sigma, not inside the DDP module) are averaged here after each backward, and the
  "loss is finite" flag is agreed across ranks, so all ranks skip or step together. Backward is
  always run (even for a non-finite loss) because DDP's all-reduce is collective.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from uumamba.optim.ema_kl import EMAKL
from uumamba.optim.sam import SAM


@dataclass(frozen=True)
class StepResult:
    """Outcome of one :func:`training_step`.

    Attributes:
        loss: loss at the current weights (for SAM: the first pass, at w, not at w + e).
        finite: the loss(es) and the applied gradients were finite.
        skipped: no weight update happened (non-finite loss or gradients).
        grad_norm: global L2 norm of the gradients before clipping (SAM: second pass; the
            first-pass norm when the step was skipped in the first pass); may be inf / nan.
    """

    loss: float
    finite: bool
    skipped: bool
    grad_norm: float


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Keep running statistics of all norm layers unchanged inside the block.

    Snapshots ``running_mean``, ``running_var`` and ``num_batches_tracked`` of every
    BatchNorm / SyncBatchNorm (and InstanceNorm with ``track_running_stats=True``) and copies
    them back on exit. Normalisation inside the block still uses batch statistics (train mode),
    so the second SAM pass sees the same function as the first; a non-finite batch cannot
    corrupt the buffers (unlike the ``momentum = 0`` trick, where 0 * NaN = NaN).
    """
    saved = []
    for module in model.modules():
        # _NormBase: the common base of BatchNorm*, SyncBatchNorm and InstanceNorm*.
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
            saved.append(
                (module, {name: buf.clone() for name, buf in module.named_buffers(recurse=False)})
            )
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _average_grads(module: nn.Module) -> None:
    """All-reduce (mean) the gradients of ``module``'s parameters across DDP ranks."""
    world = _world_size()
    if world == 1:
        return
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def _finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank (one collective when distributed)."""
    flag = torch.isfinite(loss.detach()).to(torch.int32)
    if _world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def _forward_backward(
    model: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    scaler: torch.amp.GradScaler | None,
    autocast_dtype: torch.dtype | None,
    device_type: str,
    extra: Callable[[torch.Tensor | list[torch.Tensor]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward, loss (+ ``extra(outputs)``, e.g. EMA-KL's term), backward; returns the task
    loss alone, detached."""
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        outputs = model(images)
        loss = loss_fn(outputs, targets)
        total = loss if extra is None else loss + extra(outputs)
    (scaler.scale(total) if scaler is not None else total).backward()
    _average_grads(loss_fn)
    return loss.detach()


def _teacher_term(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    autocast_dtype: torch.dtype | None,
    device_type: str,
) -> Callable[[torch.Tensor | list[torch.Tensor]], torch.Tensor] | None:
    """For :class:`uumamba.optim.EMAKL` with its KL term active: the EMA weights' outputs on
    this batch (no gradient, norm statistics frozen) and the KL term against them; else None."""
    if not (isinstance(optimizer, EMAKL) and optimizer.kl_active()):
        return None
    with (
        torch.no_grad(),
        frozen_batchnorm_stats(model),
        optimizer.averaged_weights(),
        torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
    ):
        teacher = model(images)
    return lambda outputs: optimizer.kl_term(outputs, teacher)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _clip(optimizer: torch.optim.Optimizer, grad_clip: float | None) -> float:
    """Clip the global gradient norm to ``grad_clip`` (None / 0: measure only); return it."""
    max_norm = grad_clip if grad_clip else math.inf
    params = _optimizer_params(optimizer)
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def training_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = 12.0,
    device_type: str = "cpu",
) -> StepResult:
    """Run one optimisation step on a batch and return what happened.

    Args:
        model: network in train mode (possibly DDP-wrapped); returns logits or a list of
            deep-supervision logits, as ``loss_fn`` expects.
        loss_fn: e.g. :func:`uumamba.losses.build_loss`'s module; its parameters (sigma) must
            be in ``optimizer`` (:func:`uumamba.optim.build_optimizer` puts them there).
        optimizer: :class:`uumamba.optim.SAM` (two passes), a subclass (LookSAM / RandomSAM:
            two passes when ``perturb_this_step()``, else one), :class:`uumamba.optim.EMAKL`
            (one pass plus a teacher forward) or any torch optimizer (one pass).
        images: (B, C_in, *S) float32 on the model's device.
        targets: (B, 1, *S) integer-valued labels on the same device.
        scaler: ``torch.amp.GradScaler`` for fp16 autocast; None otherwise.
        autocast_dtype: ``torch.float16`` / ``torch.bfloat16`` to run under autocast; None: off.
        grad_clip: max global gradient norm; None or 0 disables clipping.
        device_type: ``"cuda"`` or ``"cpu"``, for autocast.

    Returns:
        :class:`StepResult`. A non-finite loss or gradient skips the update (weights and
        optimizer state unchanged, scaler backed off) and reports ``finite=False``.
    """
    optimizer.zero_grad(set_to_none=True)
    extra = _teacher_term(model, optimizer, images, autocast_dtype, device_type)
    loss = _forward_backward(model, loss_fn, images, targets, scaler, autocast_dtype,
                             device_type, extra)
    loss_value = float(loss)
    loss_finite = _finite_on_all_ranks(loss)

    sharpness_aware = isinstance(optimizer, SAM)
    if not (sharpness_aware and optimizer.perturb_this_step()):
        # One pass: a plain optimizer, EMA-KL, or a LookSAM / RST iteration without SAM.
        if scaler is not None:
            scaler.unscale_(optimizer)
        if sharpness_aware:
            optimizer.prepare_plain_step()
        grad_norm = _clip(optimizer, grad_clip)
        if not (loss_finite and math.isfinite(grad_norm)):
            return _skip(optimizer, scaler, loss_value, grad_norm, unscaled=True)
        if sharpness_aware:
            optimizer.plain_step()  # finiteness checked above, as the scaler would
        elif scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        if scaler is not None:
            scaler.update()
        return StepResult(loss=loss_value, finite=True, skipped=False, grad_norm=grad_norm)

    # SAM / ASAM, first pass: gradient at w, unscaled by hand (scaler.unscale_ is kept for the
    # second pass, the one whose gradients are applied; it may be called once per update()).
    if scaler is not None and scaler.is_enabled():
        inv_scale = 1.0 / scaler.get_scale()
        for p in _optimizer_params(optimizer):
            p.grad.mul_(inv_scale)
    perturbed = loss_finite and optimizer.first_step(zero_grad=False)
    if not perturbed:
        first_norm = _clip(optimizer, None)
        return _skip(optimizer, scaler, loss_value, first_norm, unscaled=False)

    # Second pass: gradient at w + e, BatchNorm statistics frozen.
    optimizer.zero_grad(set_to_none=True)
    with frozen_batchnorm_stats(model):
        loss_perturbed = _forward_backward(
            model, loss_fn, images, targets, scaler, autocast_dtype, device_type
        )
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = _clip(optimizer, grad_clip)
    if not (_finite_on_all_ranks(loss_perturbed) and math.isfinite(grad_norm)):
        optimizer.restore()
        return _skip(optimizer, scaler, loss_value, grad_norm, unscaled=True)
    optimizer.second_step(zero_grad=True)
    if scaler is not None:
        scaler.update()
    return StepResult(loss=loss_value, finite=True, skipped=False, grad_norm=grad_norm)


def _skip(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    loss_value: float,
    grad_norm: float,
    *,
    unscaled: bool,
) -> StepResult:
    """End an iteration without an update; the scaler backs off when it saw inf/NaN grads.

    ``unscaled``: ``scaler.unscale_`` already ran in this iteration (it records the inf check
    that ``update()`` backs off on, and may run only once per update).
    """
    if scaler is not None and scaler.is_enabled():
        if not unscaled:
            scaler.unscale_(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_value, finite=False, skipped=True, grad_norm=grad_norm)
