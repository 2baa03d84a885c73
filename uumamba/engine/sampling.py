"""The seeded patch stream: every training patch is a pure function of
``(train.seed, rank, iteration, position in the batch)``.

:class:`PatchBatchSampler` draws the keys ``(case index, sample seed)`` of each iteration;
:class:`SeededPatchDataset` augments one key reproducibly in any DataLoader worker;
:func:`make_patch_loader` starts the stream at any iteration, so resuming needs only the
iteration counter (see "Reproducibility and exact resume" in :mod:`uumamba.engine.loop`).
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _sample_rng(seed: int, rank: int, iteration: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, iteration])


class PatchBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(case index, sample seed)`` keys for iterations ``start`` .. ``stop - 1``.

    Iteration ``t`` of rank ``r`` draws ``batch_size`` cases uniformly with replacement (as
    nnU-Net's data loader does) and one augmentation seed per patch from
    ``numpy.random.default_rng([seed, r, t])``; nothing depends on earlier iterations.

    Raises:
        ValueError: ``n_cases`` or ``batch_size`` below 1.
    """

    def __init__(self, n_cases: int, batch_size: int, seed: int, rank: int, start: int,
                 stop: int) -> None:
        if n_cases < 1 or batch_size < 1:
            raise ValueError(f"PatchBatchSampler: n_cases={n_cases}, batch_size={batch_size}")
        self.n_cases, self.batch_size, self.seed, self.rank = n_cases, batch_size, seed, rank
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for t in range(self.start, self.stop):
            rng = _sample_rng(self.seed, self.rank, t)
            cases = rng.integers(0, self.n_cases, self.batch_size)
            seeds = rng.integers(0, 2**31 - 1, self.batch_size)
            yield [(int(c), int(s)) for c, s in zip(cases, seeds, strict=True)]


@contextlib.contextmanager
def _seeded_globals(seed: int) -> Iterator[None]:
    """Seed Python / NumPy / torch CPU generators with ``seed``; restore them afterwards."""
    py, th = random.getstate(), torch.get_rng_state()
    npst = np.random.get_state()  # noqa: NPY002 - legacy global RNG on purpose
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - legacy global RNG on purpose
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npst)  # noqa: NPY002 - legacy global RNG on purpose
        torch.set_rng_state(th)


class SeededPatchDataset(Dataset):
    """Wraps a training dataset so item ``(index, seed)`` is a pure function of both.

    Before reading item ``index`` of ``dataset`` the MONAI transform chain
    (``dataset.transform``) gets ``set_random_state(seed)`` and the global generators are
    seeded with ``seed`` (and restored after), so augmentation is reproducible in any worker.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.transform = getattr(dataset, "transform", None)

    @property
    def reproducible(self) -> bool:
        """False when the transform chain exposes no ``set_random_state``."""
        return self.transform is None or hasattr(self.transform, "set_random_state")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with _seeded_globals(seed):
            if self.transform is not None and hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=seed)
            return self.dataset[index]


class _WorkerInit:
    """``worker_init_fn`` of the patch loader: :func:`_ignore_stop_signals`, then
    ``os.nice(nice)`` (a picklable object, so it also works with the spawn start method)."""

    def __init__(self, nice: int) -> None:
        self.nice = nice

    def __call__(self, worker_id: int) -> None:
        _ignore_stop_signals(worker_id)
        if self.nice:
            with contextlib.suppress(OSError):  # lowering priority needs no privilege
                os.nice(self.nice)


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the main process (which saves and stops,
    then shuts the workers down). A signal sent to the whole process group (Ctrl-C, SLURM,
    systemd, ``kill -- -PGID``) would otherwise end the workers, and the main process would
    fail on their exit instead of saving. A worker whose parent dies still exits (the
    DataLoader's watchdog)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def make_patch_loader(dataset: Any, batch_size: int, seed: int, rank: int, start: int,
                      stop: int, num_workers: int, pin_memory: bool = False,
                      worker_nice: int = 0) -> DataLoader:
    """A DataLoader yielding the batches of iterations ``start`` .. ``stop - 1``.

    Collation is MONAI's ``list_data_collate`` (flattens transforms that return lists of
    patches). The loader has its own generator, so creating it does not consume the global
    torch RNG. Its ``dataset`` is the :class:`SeededPatchDataset` wrapper (see its
    ``reproducible``). Workers ignore SIGINT and SIGTERM (:func:`_ignore_stop_signals`) and
    run at ``worker_nice`` more niceness than this process (``train.loader_nice``).
    """
    from monai.data import list_data_collate

    sampler = PatchBatchSampler(len(dataset), batch_size, seed, rank, start, stop)
    return DataLoader(
        SeededPatchDataset(dataset), batch_sampler=sampler, num_workers=num_workers,
        collate_fn=list_data_collate, pin_memory=pin_memory,
        worker_init_fn=_WorkerInit(worker_nice) if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
