"""Multi-process training with ``torch.distributed``.

The same ``uumamba train`` command runs single-process or under
``torchrun --nproc_per_node N`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Under torchrun each process joins one process group
(``nccl`` on CUDA, ``gloo`` on CPU), wraps the network and the loss's trainable σ in
:class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged across ranks, so all
ranks keep identical weights), and draws its own training patches (per-rank seeding, see
:mod:`uumamba.engine.sampling`). Only rank 0 writes files and logs (:func:`main_rank_logs`). This mirrors the behaviour of
nnU-Net's DDP training (one process per GPU, per-process batch, rank 0 logs).

Multi-node runs need the model folder on a filesystem all nodes share.

``uumamba predict`` uses the same process group to share a folder of cases out
(:mod:`uumamba.commands.predict`); :class:`SharedCounter` lets its rank 0 show one progress
bar for all ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from uumamba.device import resolve_device
from uumamba.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """Where this process runs and which rank it is.

    Attributes:
        rank / world_size / local_rank: from torchrun's environment (0 / 1 / 0 alone).
        device: the torch device this rank computes on (``cuda:LOCAL_RANK`` under torchrun).
        owns_group: True when :func:`init_distributed` created the process group (and
            :func:`cleanup` therefore destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and logs."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def launched() -> bool:
    """True when this process is one of several started by torchrun (``WORLD_SIZE`` > 1).

    Raises:
        UserError: ``WORLD_SIZE`` is not an integer.
    """
    return _env_int("WORLD_SIZE", 1) > 1


def init_distributed(device: str | torch.device = "auto", timeout_minutes: float = 60.0) -> DistContext:
    """Resolve the device and, under torchrun (``WORLD_SIZE`` > 1), join the process group.

    Uses ``env://`` initialisation (``MASTER_ADDR`` / ``MASTER_PORT`` / ``RANK`` /
    ``WORLD_SIZE``), backend ``nccl`` on CUDA and ``gloo`` on CPU. An already initialised
    default group is reused (and left alone by :func:`cleanup`).

    Args:
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        timeout_minutes: collective timeout (rank 0 validates while others may wait).

    Raises:
        UserError: see :func:`resolve_device`.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        owns = True
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                       owns_group=owns)


def wrap_ddp(module: nn.Module, ctx: DistContext, find_unused_parameters: bool = True) -> nn.Module:
    """Wrap ``module`` in DistributedDataParallel when distributed and it has trainable
    parameters; otherwise return it unchanged.

    DDP broadcasts rank 0's parameters at construction and averages gradients in every
    backward pass (both passes of SAM), so the ranks stay bit-identical.
    ``find_unused_parameters`` defaults to True for the network because a deep-supervision
    head weighted 0 may not enter the loss graph; the loss's σ are always used (pass False).
    """
    if not ctx.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    kwargs: dict[str, Any] = {"find_unused_parameters": find_unused_parameters}
    if ctx.device.type == "cuda":
        kwargs["device_ids"] = [ctx.device.index]
        kwargs["output_device"] = ctx.device.index
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The underlying module of a DDP wrapper (or ``module`` itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks (no-op when not distributed)."""
    if ctx.enabled:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` alone)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flags: list[bool], ctx: DistContext) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (``flags`` itself when alone)."""
    if not ctx.enabled:
        return list(flags)
    dev = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class SharedCounter:
    """A count that every rank adds to and any rank reads at any moment, without waiting for
    the others (no collective): a key in the process group's key-value store (the
    ``MASTER_ADDR:MASTER_PORT`` store torchrun's ranks already share). Alone it is a plain
    number.

    Creating one is a collective (rank 0 picks a fresh key for it): every rank must create
    it, in the same order. ``add`` and ``value`` may be called from any thread.
    """

    def __init__(self, ctx: DistContext) -> None:
        self._local = 0
        self._store = None
        if ctx.enabled:
            import uuid

            self._key = "uumamba/counter/" + broadcast_object(uuid.uuid4().hex, ctx)
            # torch has no public accessor; this is the store init_process_group made
            self._store = dist.distributed_c10d._get_default_store()

    def add(self, n: int = 1) -> int:
        """Add ``n`` (this rank's share) and return the total over all ranks so far."""
        if self._store is None:
            self._local += n
            return self._local
        return int(self._store.add(self._key, n))

    def value(self) -> int:
        """The total over all ranks so far."""
        return self.add(0)


def cleanup(ctx: DistContext, wait: bool = True) -> None:
    """Barrier (when ``wait``), then destroy the process group if :func:`init_distributed`
    created it. Pass ``wait=False`` on an error path, where other ranks may never arrive."""
    if ctx.enabled and ctx.owns_group and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def main_rank_logs(ctx: DistContext, logger: str = "uumamba.engine") -> Iterator[None]:
    """Inside: records of ``logger`` (and its children) are dropped on ranks other than 0.

    Each rank is its own process, so the logger's level is changed for this process only;
    it is restored on exit.
    """
    if ctx.is_main:
        yield
        return
    target = logging.getLogger(logger)
    previous = target.level
    target.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        target.setLevel(previous)
