"""Label maps (value -> name) from a ``dataset.json``: one reader for every caller.

Two forms exist in the field and both are read:

- nnU-Net v2: ``"labels": {"background": 0, "RV": 1, ...}`` (name -> value);
- MSD / nnU-Net v1: ``"labels": {"0": "background", "1": "RV", ...}`` (value -> name).

Region-based labels (nnU-Net v2's ``"whole": [1, 2]``) are refused: every caller here (training,
evaluation, Slicer export) needs one integer value per label.

Callers: dataset layouts (training data), the model folder (``MODEL/dataset.json``), ``evaluate``
(a ``dataset.json`` beside the references) and ``export-slicer --labels``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uumamba.errors import DataError


def labels_from_mapping(raw: dict[str, Any], source: str | Path) -> dict[int, str]:
    """Convert a ``labels`` object of either form into value -> name, sorted by value.

    Args:
        raw: the ``labels`` object as parsed from JSON.
        source: the file it came from (named in errors).

    Raises:
        DataError: a region label (list of values), a value that is not a non-negative integer,
            or a value given twice; the message names ``source`` and the label.
    """
    by_value = all(str(k).strip().isdigit() for k in raw)
    labels: dict[int, str] = {}
    for key, item in raw.items():
        number, name = (key, item) if by_value else (item, key)
        if isinstance(number, list):
            raise DataError(f"{source}: label {name!r} is a region ({number}); region-based "
                            "labels are not supported, give one integer value per label")
        if isinstance(number, bool) or not str(number).strip().isdigit():
            raise DataError(f"{source}: label value {number!r} of {name!r} is not a "
                            "non-negative integer")
        value = int(str(number).strip())
        if value in labels:
            raise DataError(f"{source}: label value {value} is given twice "
                            f"({labels[value]!r}, {str(name)!r})")
        labels[value] = str(name)
    return dict(sorted(labels.items()))


def read_json_object(path: str | Path, what: str = "dataset.json") -> dict[str, Any]:
    """Parse a JSON file that must hold an object.

    Raises:
        DataError: missing, unreadable, not JSON, or not an object (names the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read {what}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: {what} must be a JSON object")
    return data


def read_dataset_labels(path: str | Path) -> dict[int, str] | None:
    """The label map of a ``dataset.json``; None when it has no (or an empty) ``labels`` object.

    Raises:
        DataError: as :func:`read_json_object` and :func:`labels_from_mapping`.
    """
    raw = read_json_object(path).get("labels")
    if not isinstance(raw, dict) or not raw:
        return None
    return labels_from_mapping(raw, path)
