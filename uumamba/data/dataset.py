"""Torch datasets of cases: items for the MONAI pipelines, with caching of preprocessing.

Each item is ``{"image": [path per channel], "label": path, "case_id": id}``; the
transforms of :mod:`uumamba.data.transforms` load and stack the channels. Caching keeps the
output of the deterministic part of a pipeline (everything before its first random
transform), so epochs after the first repeat neither file IO nor resampling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose

from uumamba.data.layouts import Case


def case_to_item(case: Case) -> dict:
    """The dataset item of a case: ``{"image": [paths], "label": path, "case_id": id}``
    (no ``label`` key for unlabelled cases)."""
    item: dict = {"image": [str(p) for p in case.images], "case_id": case.id}
    if case.label is not None:
        item["label"] = str(case.label)
    return item


def make_dataset(cases: Sequence[Case], transform: Compose, cache: str = "memory",
                 cache_dir: str | Path | None = None, num_workers: int = 1) -> Dataset:
    """A torch Dataset of transformed case dicts, caching the deterministic preprocessing.

    Args:
        cases: cases to serve (see :func:`case_to_item`).
        transform: a pipeline of :mod:`uumamba.data.transforms` (any MONAI ``Compose`` works).
        cache: ``memory`` (``CacheDataset``: every case preprocessed once, kept in RAM),
            ``disk`` (``PersistentDataset`` under ``cache_dir/<pipeline signature>``, so
            training / validation pipelines and different plans never share entries) or
            ``none``.
        cache_dir: folder for ``disk`` caching.
        num_workers: threads used to fill the memory cache.

    Raises:
        ValueError: unknown ``cache`` value, or ``disk`` without ``cache_dir``.
    """
    items = [case_to_item(c) for c in cases]
    if cache == "memory":
        # pipelines whose first random transform copies its output need no defensive copy
        copy_cache = not getattr(transform, "copies_cached_data", False)
        return CacheDataset(items, transform, num_workers=num_workers, progress=False,
                            copy_cache=copy_cache)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir (a folder for preprocessed cases)")
        signature = getattr(transform, "cache_signature", None)
        if signature is None:  # a pipeline not built by uumamba: key on its transform names
            names = "".join(type(t).__name__ for t in transform.flatten().transforms)
            signature = hashlib.sha1(names.encode()).hexdigest()[:16]
        folder = Path(cache_dir) / signature
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=folder)
    if cache == "none":
        return Dataset(items, transform)
    raise ValueError(f"cache={cache!r}: expected 'memory', 'disk' or 'none'")
