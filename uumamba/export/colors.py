"""Segment display colours and Slicer colour-table files.

Colours are RGB triples in [0, 1]. Known structures get the colour recommended by
:mod:`uumamba.export.terminology`; every other label (and a known structure whose colour is
already taken, e.g. several AortaSeg24 zones that all map to "Aorta") gets the next colour of
a golden-ratio hue sequence, skipping any too close to one already used, so all segments of a
file are told apart.

The colour-table file is 3D Slicer's text format (``.ctbl`` / ``.txt``, the format of Slicer's
``GenericColors.txt``): ``#`` comment lines, then one ``value name R G B A`` line per label with
0-255 integers; names may not contain spaces (Slicer splits on whitespace).
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping
from pathlib import Path

from uumamba.errors import UserError
from uumamba.export.terminology import lookup_terminology
from uumamba.utils import atomic_path

RGB = tuple[float, float, float]

MIN_DISTANCE = 0.12
"""Smallest Euclidean RGB distance (in [0, 1] units) allowed between two assigned colours."""

_GOLDEN = 0.6180339887498949


def _distance(a: RGB, b: RGB) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5


def _palette():
    """Endless sequence of saturated colours with well-spread hues (golden-ratio steps)."""
    index = 0
    while True:
        hue = (0.07 + index * _GOLDEN) % 1.0
        saturation = 0.70 if (index // 6) % 2 == 0 else 0.50
        value = 0.92 if index % 2 == 0 else 0.75
        yield colorsys.hsv_to_rgb(hue, saturation, value)
        index += 1


def assign_colors(labels: Mapping[int, str]) -> dict[int, RGB]:
    """Give every foreground label a display colour, all pairwise distinct.

    Args:
        labels: label value -> name; value 0 (background) is skipped.

    Returns:
        value -> (r, g, b) in [0, 1], in ascending label order. Deterministic: the same labels
        give the same colours. Known structures (terminology) keep their recommended colour
        unless an earlier label already took it or one within ``MIN_DISTANCE`` of it.
    """
    assigned: dict[int, RGB] = {}
    palette = _palette()

    def free(color: RGB) -> bool:
        return all(_distance(color, other) >= MIN_DISTANCE for other in assigned.values())

    for value in sorted(v for v in labels if v != 0):
        recommended = lookup_terminology(labels[value]).color
        if recommended is not None and free(recommended):
            assigned[value] = recommended
            continue
        candidate = next(palette)
        while not free(candidate):
            candidate = next(palette)
        assigned[value] = candidate
    return assigned


def _table_name(name: str) -> str:
    cleaned = "_".join(name.split())
    return cleaned or "unnamed"


def write_color_table(
    labels: Mapping[int, str],
    out_path: str | Path,
    colors: Mapping[int, RGB] | None = None,
) -> Path:
    """Write a 3D Slicer colour table for a label map (``.ctbl`` or ``.txt``).

    Users who load a NIfTI / NRRD mask as a *labelmap volume* (instead of the .seg.nrrd
    segmentation) select this table in the Volumes module to see names and colours.

    Args:
        labels: label value -> name; value 0 is written as fully transparent (alpha 0), named
            ``labels[0]`` or "background".
        out_path: destination file; written atomically (temporary name, then rename).
        colors: value -> RGB in [0, 1]; default :func:`assign_colors` (the same colours
            :func:`uumamba.export.slicer.write_seg_nrrd` gives the segments).

    Returns:
        ``out_path`` as a Path.

    Raises:
        UserError: a label value is negative.
    """
    out_path = Path(out_path)
    bad = [v for v in labels if int(v) < 0]
    if bad:
        raise UserError(f"colour table {out_path}: label values must be >= 0, got {bad}")
    colors = dict(colors) if colors is not None else assign_colors(labels)
    lines = [
        "# 3D Slicer colour table written by uumamba",
        "# value name R G B A (0-255)",
        f"0 {_table_name(labels.get(0, 'background'))} 0 0 0 0",
    ]
    for value in sorted(v for v in labels if v != 0):
        r, g, b = (round(255 * c) for c in colors[value])
        lines.append(f"{int(value)} {_table_name(labels[value])} {r} {g} {b} 255")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_path
