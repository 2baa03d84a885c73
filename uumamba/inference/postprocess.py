"""Largest-connected-component postprocessing and nnU-Net's rule for when to apply it.

Keeping only the largest connected component of a class removes spurious islands (a blob of
"LV" in the liver), but it can also delete real disconnected parts of a structure (a vessel
split by the field of view). nnU-Net therefore decides empirically: on the validation
predictions of a trained model, it keeps the postprocessing for a class only where it raises
that class's mean Dice. This module does the same, per class:

1. :func:`determine_postprocessing` compares the mean Dice of each foreground class on the
   validation cases without and with largest-component filtering of that class, and enables
   it where the mean Dice increases (strictly);
2. the decision is stored as ``postprocessing.json`` in the fold folder, and read back for a
   fold ensemble, by the model folder (:class:`uumamba.model_folder.ModelFolder`);
3. the predictor applies it to every mask (:func:`apply_postprocessing`).

A model trained on all cases (``--fold all``) has no validation cases of its own: its
decision is pooled from the cross-validation folds' decisions in the same model folder
(:func:`pool_fold_decisions`), or recorded as "none decided" when there are none.

Connectivity is full (26-neighbourhood in 3D, 8 in 2D), as MONAI's
``KeepLargestConnectedComponent`` uses by default; removed voxels become background (0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from uumamba.evaluation.metrics import dice_per_class, nan_mean


def bounding_box(binary: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every True voxel of ``binary``; None
    when there is none."""
    box = []
    for axis in range(binary.ndim):
        hit = np.flatnonzero(binary.any(axis=tuple(a for a in range(binary.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def largest_component(binary: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest connected component (full connectivity) of ``binary``.

    Labelled inside the bounding box of ``binary`` only (a heart's label fills a few percent
    of a cine volume): the components, their C-order numbering and so the tie rule are those
    of the whole array.

    Args:
        binary: boolean array (any number of dimensions).

    Returns:
        Boolean array of the same shape; all False when ``binary`` is empty. Ties keep the
        component found first in C order.
    """
    binary = np.asarray(binary, dtype=bool)
    out = np.zeros_like(binary)
    box = bounding_box(binary)
    if box is not None:
        out[box] = _largest_in(binary[box])
    return out


def _largest_in(binary: np.ndarray) -> np.ndarray:
    """:func:`largest_component` of a non-empty boolean array, labelled as a whole."""
    structure = ndimage.generate_binary_structure(binary.ndim, binary.ndim)
    components, n = ndimage.label(binary, structure=structure)
    if n <= 1:
        return binary.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def apply_postprocessing(mask: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """Keep only the largest connected component of each class listed in ``spec``.

    Args:
        mask: integer label map (x, y, z) (any integer dtype; returned with the same dtype).
        spec: ``{"largest_component_labels": [values...], ...}`` as written by
            :func:`determine_postprocessing`; ``None`` or an empty list leaves ``mask`` as is.

    Returns:
        A new label map; voxels of the removed components are set to 0. Each class is
        filtered inside its bounding box (:func:`bounding_box`): the same result, in about a
        tenth of the time on an ACDC volume.
    """
    out = np.array(mask, copy=True)
    for value in (spec or {}).get("largest_component_labels", []):
        binary = out == int(value)
        box = bounding_box(binary)
        if box is not None:
            inside = binary[box]
            out[box][inside & ~_largest_in(inside)] = 0  # out[box] is a view
    return out


def _mean_dice(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], value: int) -> float:
    """Mean Dice of label ``value`` over the cases, NaN cases skipped."""
    return nan_mean(dice_per_class(p, r, [value])[value]
                    for p, r in zip(preds, refs, strict=True))[0]


def determine_postprocessing(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: dict[int, str]
) -> dict[str, Any]:
    """Decide per class whether largest-component filtering improves validation Dice.

    Args:
        preds: predicted label maps of the validation cases (integer arrays).
        refs: the reference label maps, same order and shapes.
        labels: label value -> name; background (0) is never filtered.

    Returns:
        The spec saved as ``postprocessing.json``: ``largest_component_labels`` (values
        where it helps), ``dice_before`` / ``dice_after`` (per class name: mean Dice over the
        cases, NaN-ignoring, without / with filtering of that class alone), ``n_cases``,
        ``connectivity``.

    Raises:
        ValueError: the lists differ in length, are empty, or a pair differs in shape.

    Source: nnU-Net's postprocessing selection (Isensee et al., Nature Methods 2021), per
    class; the "all foreground as one region" step is not done.
    """
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"need equally many predictions and references, got {len(preds)} and {len(refs)}")
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        if p.shape != r.shape:
            raise ValueError(f"case {i}: prediction shape {p.shape} differs from reference {r.shape}")
    enabled: list[int] = []
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for value in sorted(v for v in labels if v != 0):
        name = labels[value]
        spec = {"largest_component_labels": [value]}
        before[name] = _mean_dice(preds, refs, value)
        after[name] = _mean_dice([apply_postprocessing(p, spec) for p in preds], refs, value)
        if after[name] > before[name]:
            enabled.append(value)
    return {
        "largest_component_labels": enabled,
        "dice_before": before,
        "dice_after": after,
        "n_cases": len(preds),
        "connectivity": "full",
    }


def pool_fold_decisions(decisions: Sequence[tuple[str, dict[str, Any]]],
                        labels: dict[int, str]) -> dict[str, Any]:
    """Decide for a model trained on all cases from the cross-validation folds' decisions.

    Each fold's ``dice_before`` / ``dice_after`` (mean Dice over its ``n_cases`` validation
    cases without / with filtering of that class) is weighted by ``n_cases``, which gives the
    mean over all cross-validation cases of the folds (exact where no case of the fold lacks
    the class; a fold whose mean is NaN for a class is left out for that class). A class is
    filtered when the pooled mean rises (strictly), as in :func:`determine_postprocessing`:
    nnU-Net likewise decides its postprocessing on the pooled cross-validation predictions.

    Args:
        decisions: ``(fold name, its postprocessing.json)`` for every fold used.
        labels: label value -> name; background (0) is never filtered.

    Returns:
        A postprocessing spec with ``largest_component_labels``, the pooled ``dice_before`` /
        ``dice_after``, ``n_cases`` and ``decided`` (how); with no decisions, no class and
        ``decided = "none decided: ..."``.
    """
    if not decisions:
        return {"largest_component_labels": [], "dice_before": {}, "dice_after": {},
                "n_cases": 0, "connectivity": "full",
                "decided": ("none decided: no cross-validation fold of this model folder has a "
                            "postprocessing.json (train its folds 0 .. n_folds-1 first, then "
                            "fold all, to decide it from their validation cases)")}
    enabled: list[int] = []
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for value in sorted(v for v in labels if v != 0):
        name = labels[value]
        pairs = [(float(d["dice_before"][name]), float(d["dice_after"][name]), int(d["n_cases"]))
                 for _, d in decisions
                 if d.get("dice_before", {}).get(name) is not None
                 and d.get("dice_after", {}).get(name) is not None and int(d["n_cases"]) > 0]
        pairs = [(b, a, n) for b, a, n in pairs if np.isfinite(b) and np.isfinite(a)]
        weight = sum(n for _, _, n in pairs)
        if not weight:
            before[name] = after[name] = float("nan")
            continue
        before[name] = sum(b * n for b, _, n in pairs) / weight
        after[name] = sum(a * n for _, a, n in pairs) / weight
        if after[name] > before[name]:
            enabled.append(value)
    folds = [name for name, _ in decisions]
    n_cases = sum(int(d.get("n_cases", 0)) for _, d in decisions)
    return {"largest_component_labels": enabled, "dice_before": before, "dice_after": after,
            "n_cases": n_cases, "connectivity": "full",
            "decided": f"from the cross-validation folds {', '.join(folds)} ({n_cases} "
                       "validation cases, case-weighted)"}
