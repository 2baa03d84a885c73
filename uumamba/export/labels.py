"""Label names for export: from a ``--labels`` string, a model folder or a dataset.json.

Accepted forms (mirroring the dataset.json conventions users bring from nnU-Net and MSD):

- ``"1=RV,2=MYO,3=LV"`` — value=name pairs, comma separated;
- a model folder (``MODEL/dataset.json``, written by ``uumamba train``) or a dataset.json
  path. Both dataset.json label layouts are read: value -> name (MSD / nnU-Net v1,
  ``{"labels": {"0": "background", "1": "RV"}}``) and name -> value (nnU-Net v2,
  ``{"labels": {"background": 0, "RV": 1}}``). nnU-Net v2 region labels (a list of values
  for one name) are refused: a region is not one label value;
- nothing: every value found in the mask is named ``label_N``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from uumamba.errors import UserError


def default_labels(values: Iterable[int]) -> dict[int, str]:
    """``{v: "label_v"}`` for every non-zero value (the names used when none are given)."""
    return {int(v): f"label_{int(v)}" for v in sorted(set(values)) if int(v) != 0}


def parse_label_pairs(spec: str) -> dict[int, str]:
    """Parse ``"1=RV,2=MYO,3=LV"`` into ``{1: "RV", 2: "MYO", 3: "LV"}``.

    Raises:
        UserError: an item is not ``VALUE=NAME``, a value is not a non-negative integer, a
            name is empty, or a value repeats.
    """
    labels: dict[int, str] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        value_text, sep, name = item.partition("=")
        value_text, name = value_text.strip(), name.strip()
        if not sep or not name or not value_text.isdigit():
            raise UserError(
                f"--labels: {item!r} is not VALUE=NAME with a non-negative integer VALUE "
                "(expected e.g. '1=RV,2=MYO,3=LV')"
            )
        value = int(value_text)
        if value in labels:
            raise UserError(f"--labels: value {value} is given twice ({labels[value]!r}, {name!r})")
        labels[value] = name
    if not labels:
        raise UserError(f"--labels: no VALUE=NAME pairs in {spec!r}")
    return labels


def labels_from_dataset_json(path: str | Path) -> dict[int, str]:
    """Read the ``labels`` mapping of a dataset.json (either layout) as value -> name.

    Raises:
        UserError: the file is missing, not JSON, has no ``labels`` object, or holds region
            labels / non-integer values.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"labels file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"labels file {path} is not readable JSON: {exc}") from None
    raw = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"labels file {path} has no 'labels' object")
    labels: dict[int, str] = {}
    for key, item in raw.items():
        if str(key).strip().isdigit():
            value, name = int(key), str(item)
        elif isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            value, name = item, str(key)
        elif isinstance(item, list):
            raise UserError(
                f"labels file {path}: label {key!r} is a region ({item}); region-based labels "
                "cannot be exported as one label value each"
            )
        else:
            raise UserError(f"labels file {path}: cannot read label {key!r}: {item!r}")
        if value in labels:
            raise UserError(f"labels file {path}: value {value} is given twice")
        labels[value] = name
    return labels


def resolve_labels(spec: str | None, mask_values: Iterable[int]) -> dict[int, str]:
    """Turn a ``--labels`` argument into value -> name (see the module docstring).

    Args:
        spec: ``None``, ``"VALUE=NAME,..."``, a model folder or a dataset.json path.
        mask_values: the values present in the mask (used only when ``spec`` is None).

    Raises:
        UserError: ``spec`` names no existing folder / file and is not VALUE=NAME pairs, a
            model folder has no dataset.json, or the pairs / file are malformed.
    """
    if spec is None or not spec.strip():
        return default_labels(mask_values)
    path = Path(spec).expanduser()
    if path.is_dir():
        dataset_json = path / "dataset.json"
        if not dataset_json.is_file():
            raise UserError(f"--labels: model folder {path} has no dataset.json")
        return labels_from_dataset_json(dataset_json)
    if path.is_file():
        return labels_from_dataset_json(path)
    if "=" in spec:
        return parse_label_pairs(spec)
    raise UserError(
        f"--labels: {spec!r} is neither VALUE=NAME pairs (e.g. '1=RV,2=MYO,3=LV') nor an "
        "existing model folder / dataset.json"
    )
